"""How the expand kernels spread column tiles over slices of different widths (shared by both SGMV paths).

Slice i's columns are [O_i, O_{i+1}) and its tiles start at tile index T_i; up to
four slices per launch (q/k/v, gate/up), the unused ones pushed past the end.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_SLICES = 4


def column_tiles(offs: tuple[int, ...], block_n: int) -> tuple[list[int], list[int], int]:
    """(slice end columns O1..O4, first tile of slices 1..3 T1..T3, total tiles) for ``out_offsets``."""
    n_slices = len(offs) - 1
    tiles = [triton.cdiv(b - a, block_n) for a, b in zip(offs, offs[1:])]
    tile_starts = [sum(tiles[:i]) for i in range(1, n_slices)] + [1 << 30] * (MAX_SLICES - n_slices)
    ends = list(offs[1:]) + [offs[-1]] * (MAX_SLICES - n_slices)
    return ends, tile_starts[:MAX_SLICES - 1], sum(tiles)


@triton.jit
def _column_tile(pid_n, O1, O2, O3, O4, T1, T2, T3, BLOCK_N: tl.constexpr):
    """The slice of column tile ``pid_n``, its columns, and which of them lie inside the slice."""
    sl = (pid_n >= T1).to(tl.int32) + (pid_n >= T2).to(tl.int32) + (pid_n >= T3).to(tl.int32)
    col_lo = tl.where(sl == 0, 0, tl.where(sl == 1, O1, tl.where(sl == 2, O2, O3)))
    col_hi = tl.where(sl == 0, O1, tl.where(sl == 1, O2, tl.where(sl == 2, O3, O4)))
    tile0 = tl.where(sl == 0, 0, tl.where(sl == 1, T1, tl.where(sl == 2, T2, T3)))
    cols = col_lo + (pid_n - tile0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return sl, cols, cols < col_hi
