"""SiLU-mul with gate/up's expand as one dense product over the step's staged adapters.

With several adapters in a step of few tokens, ``fused_lora.silu_mul_lora`` has each row gather its own
adapter's B rank by rank ("rows"): 9.8 us a call at 32 tokens over 6 adapters against 3.2 for the plain
SiLU-mul, and 8.6 even when every row has the same adapter, so it is the gathers, not the bytes
(bench/NOTES-kernels.md v14). Here B is staged like A: ``ExpandTails`` holds, per layer, the B rows of the
adapter at tail position p in rows [p * R, (p + 1) * R), filled when ``stage_lora`` puts its A rows under the
gate_up GEMM. The GEMM's extra columns already hold h of every token against every staged adapter, so

    gate[t] += scaling(t) * (h_gate[t, :] masked to pos(t) and rank(t)) @ B_tail[:, gate columns]

is one tensor-core product [rows, positions * R] x [positions * R, columns] a tile, whose B loads wait on
no metadata; a row's own position, rank and scaling only mask h. B rows past a rank and positions no row
uses are multiplied by zeros, so the tails must hold finite values there: the slots do (zeros past each rank,
``AdapterSlots._write``; adapters load only when finite).

Down's shrink, when SiLU-mul runs it, stays per row (``_shrink_rows``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fused_lora import (MANY_TOKENS, _block_m, _block_r, _position, _row_slots, _shrink_rows, _silu_load,
                                _silu_mul, _silu_store, check_silu_args)
from kernels.lora_meta import LoRAMeta
from kernels.mma import mma, native_dot

# steps of at most this many tail positions take the dense expand (at 32 tokens on the H100: one adapter 5.8 us a
# call against 6.5 for the segment grid, 6 adapters 8.6 against 9.7 per row; 13 adapters in a bucket of 16 lost,
# 26.0 against 14.4, and 32 52.9 against 21.4: bench/NOTES-kernels.md v14)
DENSE_POSITIONS = 8
DENSE_INNER = 128         # ... and at most this many (position, rank) rows of B a tile: measured at rank 16 only
DENSE_SILU = {True: (32, 4), False: (128, 8)}      # (columns a program, warps) for one position, and several
# past MANY_TOKENS tokens only one-adapter steps take it, on wider tiles (256 tokens on the H100, 16 rows a program:
# 14.3 us a call at 128 columns and 4 warps, 18.9 at 32 and 4, against 18.6 for the blocks grid; v17)
DENSE_POSITIONS_MANY = 1
DENSE_SILU_MANY = (128, 4)
DENSE_ROWS = 16           # rows a program takes at most (one adapter at 32 tokens: 5.3 us a call, 5.9 with 32 rows)
# shared memory a program's two products may stage, h and B tiles of gate and up (Triton stages both operands:
# 2 x (inner x columns + rows x inner) elements; 256 KB at float32, rank 64, 5 positions ran out on the H100)
SHARED_BUDGET = 96 * 1024


def takes(positions: int, max_rank: int, tokens: int, dtype: torch.dtype) -> bool:
    """Whether a step of ``tokens`` tokens whose h holds ``positions`` tail positions takes the dense expand."""
    most = DENSE_POSITIONS if tokens <= MANY_TOKENS else DENSE_POSITIONS_MANY
    return positions <= most and _inner(positions, max_rank) <= DENSE_INNER and fits(positions, max_rank, tokens, dtype)


def fits(positions: int, max_rank: int, tokens: int, dtype: torch.dtype) -> bool:
    """Whether ``silu_mul_lora_dense`` can take such a step at all (shared memory)."""
    return _columns(_inner(positions, max_rank), _rows(tokens), dtype.itemsize, 16) is not None


def _rows(tokens: int) -> int:
    return min(_block_m(tokens), DENSE_ROWS)


def _columns(inner: int, block_m: int, itemsize: int, most: int) -> int | None:
    """Columns a program takes: at most ``most``, within SHARED_BUDGET; None if not even 16 fit."""
    fit = SHARED_BUDGET // (2 * itemsize * inner) - block_m
    if fit < 16:
        return None
    return min(most, 1 << (fit.bit_length() - 1))


def _inner(positions: int, max_rank: int) -> int:
    """The product's inner dimension: positions and ranks each padded to a power of two, at least 16."""
    return max(16, triton.next_power_of_2(positions) * triton.next_power_of_2(max_rank))


class ExpandTails:
    """Per layer, the B rows of the adapters at tail positions 0 .. positions - 1: ``b[layer]`` is
    [positions * max_rank, out], position p's adapter in rows p * max_rank on (all of its B, rank or not)."""

    def __init__(self, layers: int, positions: int, max_rank: int, out: int, dtype: torch.dtype,
                 device: torch.device | str):
        if positions < 1 or layers < 1:
            raise ValueError(f"layers and positions must be >= 1, got {layers}, {positions}")
        self.positions, self.max_rank = positions, max_rank
        self.b = [torch.zeros(positions * max_rank, out, dtype=dtype, device=device) for _ in range(layers)]

    def rows(self, layer: int, position: int) -> torch.Tensor:
        """[max_rank, out]: where the B of the adapter at ``position`` goes."""
        if not 0 <= position < self.positions:
            raise ValueError(f"position must be in [0, {self.positions}), got {position}")
        return self.b[layer][position * self.max_rank: (position + 1) * self.max_rank]


@triton.jit
def _silu_mul_lora_dense_kernel(gu_ptr, out_ptr, slot_ptr, tail_pos_ptr, hg_ptr, bt_ptr, rank_g_ptr, scal_g_ptr,
                                a_ptr, rank_d_ptr, hd_ptr, T, n, n_pos, stride_g, stride_o, stride_ht, stride_hpos,
                                stride_hs, stride_bt, stride_as, stride_ar, stride_hdp, stride_hdt,
                                R, BLOCK_M: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, KP: tl.constexpr,
                                BLOCK_R: tl.constexpr, SHRINK: tl.constexpr, NATIVE: tl.constexpr,
                                IEEE: tl.constexpr):
    """One column tile (program_id 0) of one block of BLOCK_M rows (program_id 1); the product's inner
    dimension runs over KP positions of RP (>= R, a power of two) ranks."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_ok = cols < n
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    g, u = _silu_load(gu_ptr, rows, row_ok, cols, col_ok, n, stride_g)
    j = tl.arange(0, KP * RP)                      # (position, rank) of the product's inner dimension
    pj = j // RP
    rj = j % RP
    j_ok = (pj < n_pos) & (rj < R)
    bm = j_ok[:, None] & col_ok[None, :]
    b_at = bt_ptr + (pj * R + rj)[:, None] * stride_bt + cols[None, :]
    bg = tl.load(b_at, mask=bm, other=0.0)
    bu = tl.load(b_at + n, mask=bm, other=0.0)
    h_at = hg_ptr + rows[:, None] * stride_ht + pj[None, :] * stride_hpos + rj[None, :]
    hm = row_ok[:, None] & j_ok[None, :]
    hg = tl.load(h_at, mask=hm, other=0.0)
    hu = tl.load(h_at + stride_hs, mask=hm, other=0.0)
    s0, use = _row_slots(slot_ptr, rows, row_ok)
    p, use = _position(tail_pos_ptr, s0, use, n_pos, True)
    own = use[:, None] & (pj[None, :] == p[:, None])
    rank_g = tl.load(rank_g_ptr + s0 * 2, mask=use, other=0)
    rank_u = tl.load(rank_g_ptr + s0 * 2 + 1, mask=use, other=0)
    hg = tl.where(own & (rj[None, :] < rank_g[:, None]), hg, 0.0)   # (where, not a product: h may hold NaN there)
    hu = tl.where(own & (rj[None, :] < rank_u[:, None]), hu, 0.0)
    g += tl.load(scal_g_ptr + s0 * 2, mask=use, other=0.0)[:, None] * mma(hg.to(bg.dtype), bg, NATIVE, IEEE)
    u += tl.load(scal_g_ptr + s0 * 2 + 1, mask=use, other=0.0)[:, None] * mma(hu.to(bu.dtype), bu, NATIVE, IEEE)
    act = _silu_mul(g, u, out_ptr.dtype.element_ty)
    part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if SHRINK:
        part = _shrink_rows(act.to(tl.float32), a_ptr + s0 * stride_as, stride_ar,
                            tl.load(rank_d_ptr + s0, mask=use, other=0), cols, col_ok, BLOCK_M, BLOCK_R)
    _silu_store(hd_ptr, out_ptr, part, act, row_ok, rows, cols, col_ok, stride_hdp, stride_hdt, stride_o, BLOCK_R,
                SHRINK)


def silu_mul_lora_dense(gate_up: torch.Tensor, meta: LoRAMeta, h_gate_up: torch.Tensor, gate_up_fam, down_fam,
                        tail_pos: torch.Tensor, b_tail: torch.Tensor, block_n: int | None = None,
                        num_warps: int | None = None, block_m: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fused_lora.silu_mul_lora`` with gate/up's B read from ``b_tail`` ([positions * R, 2I], an
    ``ExpandTails`` layer: the B of the adapter at position p in rows p * R on, R the slots' max rank), so that
    the expand of every row is one dense product. h_gate_up [1, T, k, 2, R], k <= positions."""
    t, n = check_silu_args(gate_up, meta, h_gate_up, gate_up_fam, down_fam, tail_pos)
    n2 = 2 * n
    r, k = gate_up_fam.lora_a.shape[2], h_gate_up.shape[2]       # B tail rows a position: the slots' max rank
    if b_tail.dim() != 2 or b_tail.shape[1] != n2 or b_tail.shape[0] < k * r or b_tail.shape[0] % r \
            or b_tail.stride(1) != 1 or b_tail.dtype != gate_up_fam.lora_b.dtype:
        raise ValueError(f"b_tail must be [positions * {r} >= {k * r}, {n2}] of the family's dtype with unit column "
                         f"stride, got {b_tail.dtype} {tuple(b_tail.shape)}")
    if meta.num_segments > k:
        raise ValueError(f"{meta.num_segments} adapters in the step but h holds {k} tail positions")
    shrink = down_fam is not None
    rp = triton.next_power_of_2(r)
    inner = _inner(k, r)
    block_m = block_m or _rows(t)
    config = DENSE_SILU_MANY if t > MANY_TOKENS else DENSE_SILU[k == 1]
    block_n = block_n or _columns(inner, block_m, gate_up.element_size(), config[0])
    if block_n is None:
        raise ValueError(f"the dense expand over {k} positions of rank {r} is too large for shared memory in "
                         f"{gate_up.dtype}: use fused_lora.silu_mul_lora")
    num_warps = num_warps or config[1]
    tiles = triton.cdiv(n, block_n)
    a_fam = down_fam if shrink else gate_up_fam        # (without the shrink: pointers nothing reads)
    block_r = max(16, _block_r(a_fam))
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    h_down = torch.empty((tiles if shrink else 1, t, block_r), dtype=torch.float32, device=gate_up.device)
    if t:
        _silu_mul_lora_dense_kernel[(tiles, triton.cdiv(t, block_m))](
            gate_up, out, meta.token_slot, tail_pos, h_gate_up, b_tail, gate_up_fam.ranks, gate_up_fam.scalings,
            a_fam.lora_a, a_fam.ranks, h_down, t, n, k, gate_up.stride(0), out.stride(0), *h_gate_up.stride()[1:4],
            b_tail.stride(0), a_fam.lora_a.stride(0), a_fam.lora_a.stride(2), h_down.stride(0), h_down.stride(1), r,
            BLOCK_M=block_m, BN=block_n, RP=rp, KP=inner // rp, BLOCK_R=block_r,
            SHRINK=shrink,
            NATIVE=native_dot(gate_up.dtype) and h_gate_up.dtype == b_tail.dtype, IEEE=not native_dot(gate_up.dtype),
            num_warps=num_warps)
    if not shrink:
        return out, None
    return out, h_down.as_strided((tiles, t, 1, 1, block_r), (h_down.stride(0), h_down.stride(1), 0, block_r, 1))
