"""Grouped LoRA for decode-sized steps (few tokens, many adapters): one program per adapter segment.

    y[t, o_i:o_{i+1}] += scalings[s, i] * (x[t] @ lora_a[s, i, :r].T) @ lora_b[s, :r, o_i:o_{i+1}]
    for every token t with slot s = slot(t) >= 0 and slice i of rank r = ranks[s, i] > 0

The general kernels (``sgmv.py``) cut the sorted tokens into blocks and loop over
the segments inside a block, so with one token per adapter a program walks many
adapters one after another. Here the grid is segment-major instead: shrink runs
one program per (segment, slice, K split), expand one per (segment, column tile);
each adapter's A and B are read once, by programs that run side by side.
Shrink stores its K-split partial sums (no atomics, so no zeroed buffer and no
extra launch); expand adds the partials as it loads them, which costs little
while a step holds few tokens. Grids depend on static shapes only (tokens in x,
slot capacity), so a decode step with these kernels can be captured in a graph.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.lora_meta import SEG_BLOCK, LoRAMeta, max_seg_blocks
from kernels.mma import mma, native_dot
from kernels.sgmv_tiles import _column_tile, column_tiles

MAX_TOKENS = 64          # above this, the block-walking kernels of sgmv.py take over


@triton.jit
def _segment(indptr_ptr, seg_slot_ptr, ranks_ptr, seg, sl, n_slices, max_rank):
    start = tl.load(indptr_ptr + seg)
    end = tl.load(indptr_ptr + seg + 1)
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(ranks_ptr + tl.maximum(slot, 0) * n_slices + sl)
    rank = tl.where(slot >= 0, tl.minimum(rank, max_rank), 0)
    return start, end, slot.to(tl.int64), rank


@triton.jit
def _shrink_k_range(x_ptr, tok, row_ok, stride_xt, a_base, a_ok, k_lo, K, K_PER_PROG: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                    NATIVE: tl.constexpr, IEEE: tl.constexpr):
    """[BLOCK_M, BLOCK_R] float32: x[tok, k_lo : k_lo + K_PER_PROG] @ A[:, same].T, A's rows at ``a_base``
    (a column vector of row pointers), rows ``a_ok`` of them."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_lo + K_PER_PROG, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_base + kk[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        acc += mma(xt, tl.trans(at), NATIVE, IEEE)
    return acc


@triton.jit
def _shrink_seg_kernel(x_ptr, a_ptr, hp_ptr, ranks_ptr, sorted_ptr, indptr_ptr, seg_slot_ptr,
                       K, stride_xt, stride_as, stride_ai, stride_ar, stride_hp, stride_hi, stride_ht,
                       n_slices, max_rank, K_PER_PROG: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       NATIVE: tl.constexpr, IEEE: tl.constexpr):
    seg = tl.program_id(0)
    sl = tl.program_id(1)
    split = tl.program_id(2)
    start, end, slot, rank = _segment(indptr_ptr, seg_slot_ptr, ranks_ptr, seg, sl, n_slices, max_rank)
    if (end > start) & (rank > 0):
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        k_lo = split * K_PER_PROG
        a_base = a_ptr + slot * stride_as + sl * stride_ai + offs_r[:, None] * stride_ar
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            tok = tl.load(sorted_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            acc = _shrink_k_range(x_ptr, tok, row_ok, stride_xt, a_base, r_ok, k_lo, K, K_PER_PROG,
                                  BLOCK_M, BLOCK_R, BLOCK_K, NATIVE, IEEE)
            tl.store(hp_ptr + split * stride_hp + sl * stride_hi + tok[:, None] * stride_ht + offs_r[None, :], acc,
                     mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_seg_kernel(hp_ptr, b_ptr, y_ptr, ranks_ptr, scal_ptr, sorted_ptr, indptr_ptr, seg_slot_ptr,
                       stride_hp, stride_hi, stride_ht, stride_bs, stride_br, stride_yt, n_slices, max_rank,
                       O1, O2, O3, O4, T1, T2, T3, SPLIT_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    seg = tl.program_id(0)
    pid_n = tl.program_id(1)
    sl, cols, col_ok = _column_tile(pid_n, O1, O2, O3, O4, T1, T2, T3, BLOCK_N)
    start, end, slot, rank = _segment(indptr_ptr, seg_slot_ptr, ranks_ptr, seg, sl, n_slices, max_rank)
    if (end > start) & (rank > 0):
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        scale = tl.load(scal_ptr + slot * n_slices + sl)
        bt = tl.load(b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + cols[None, :],
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            tok = tl.load(sorted_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            h_ptrs = hp_ptr + sl * stride_hi + tok[:, None] * stride_ht + offs_r[None, :]
            h_mask = row_ok[:, None] & r_ok[None, :]
            h = tl.load(h_ptrs, mask=h_mask, other=0.0)
            for p in range(1, SPLIT_K):
                h += tl.load(h_ptrs + p * stride_hp, mask=h_mask, other=0.0)
            acc = mma(h, bt, False, IEEE)                    # both fp32 already
            y_ptrs = y_ptr + tok[:, None] * stride_yt + cols[None, :]
            y_mask = row_ok[:, None] & col_ok[None, :]
            y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def block_k_of(k: int) -> int:
    """Input features a shrink step loads (128, or k rounded up to a power of two, at least 16)."""
    return 128 if k >= 128 else max(16, triton.next_power_of_2(k))


def _k_split(k: int, split_k: int | None, block_k: int) -> tuple[int, int]:
    """(input features a shrink program streams, K splits) for about ``split_k`` splits (None: about 512
    features a program) of whole block_k steps."""
    if split_k is None:
        split_k = max(1, triton.cdiv(k, 512))
    k_per_prog = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return k_per_prog, triton.cdiv(k, k_per_prog)


def _step_shape(x: torch.Tensor, lora_a: torch.Tensor, out_offsets: tuple[int, ...]):
    """(tokens, in features, slices, max rank, output offsets as ints) of a decode-path step, which
    takes at most MAX_TOKENS tokens."""
    t, k = x.shape
    if t > MAX_TOKENS:
        raise ValueError(f"the decode path takes at most {MAX_TOKENS} tokens, got {t}")
    return t, k, lora_a.shape[1], lora_a.shape[2], tuple(int(o) for o in out_offsets)


def lora_apply_decode(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      ranks: torch.Tensor, scalings: torch.Tensor, out_offsets: tuple[int, ...], meta: LoRAMeta,
                      *, split_k: int | None = None, block_n: int = 128) -> torch.Tensor:
    """y += LoRA(x) for a step of at most MAX_TOKENS tokens (semantics above); in place, returns y.

    Inputs are checked by the caller (``sgmv.lora_apply``).
    """
    t, k, n_slices, max_rank, offs = _step_shape(x, lora_a, out_offsets)
    if meta.no_lora or t == 0:
        return y
    num_seg = min(t, meta.seg_slot.numel())             # a step has at most one segment per token
    block_r = max(16, triton.next_power_of_2(max_rank))
    block_k = block_k_of(k)
    k_per_prog, split_k = _k_split(k, split_k, block_k)
    hp = torch.empty((split_k, n_slices, t, max_rank), dtype=torch.float32, device=x.device)
    native = native_dot(x.dtype)
    ieee = x.dtype == torch.float32
    _shrink_seg_kernel[(num_seg, n_slices, split_k)](
        x, lora_a, hp, ranks, meta.sorted_idx, meta.seg_indptr, meta.seg_slot,
        k, x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        hp.stride(0), hp.stride(1), hp.stride(2), n_slices, max_rank,
        K_PER_PROG=k_per_prog, BLOCK_M=16, BLOCK_R=block_r, BLOCK_K=block_k, NATIVE=native, IEEE=ieee,
        num_warps=4, num_stages=3)
    o, tile_starts, num_tiles = column_tiles(offs, block_n)
    _expand_seg_kernel[(num_seg, num_tiles)](
        hp, lora_b, y, ranks, scalings, meta.sorted_idx, meta.seg_indptr, meta.seg_slot,
        hp.stride(0), hp.stride(1), hp.stride(2), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        n_slices, max_rank, o[0], o[1], o[2], o[3], tile_starts[0], tile_starts[1], tile_starts[2],
        SPLIT_K=split_k, BLOCK_M=16, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=ieee, num_warps=4)
    return y


# ---- segment blocks ------------------------------------------------------------------------------------------
# Larger steps with several adapters (a batch of 256 decodes over 16-50 adapters): the block-walking kernels of
# sgmv.py give a program a block of the sorted tokens and loop over the segments inside it, so with many small
# segments each program runs a dozen dependent iterations one after another (batch 256, 47 Zipf-skewed
# adapters: 21.7 us a shrink on the H100, bench/NOTES-kernels.md v10), and they need a zeroed h (a memset) for
# their atomics. Here every segment is cut into blocks of SEG_BLOCK sorted positions and every (block, slice,
# K split) gets its own work: no loop over segments, stored partials (no memset, no atomics). The host lists
# the blocks (``LoRAMeta.blk_*``); a program loads a block's bounds and slot, one round trip before the weights.
# A captured graph fixes the grid, so it cannot follow the step's block count: programs along the block axis
# (``block_programs``: two a 16-token block of the step) take blocks g, g + programs, ... up to the count. A grid
# as large as the most blocks a step can have (``max_seg_blocks``: 272 at 256 tokens and 256 slots) left 240 of
# 272 programs empty with 16 adapters, and cost 16 us an expand in the engine's step against 8.6 for the
# block-walking kernels (bench/NOTES-kernels.md v10).


@triton.jit
def _seg_block(blk_start_ptr, blk_end_ptr, blk_slot_ptr, indptr_ptr, g, NUM_SEG: tl.constexpr):
    """(slot, first sorted position, end of the segment) of block ``g`` (``LoRAMeta.blk_*``, filled on the
    host); start >= end past the step's blocks. A step without LoRA rewrites only seg_indptr's last entry
    (to 0), so the bounds are clamped to it."""
    start = tl.load(blk_start_ptr + g)
    end = tl.minimum(tl.load(blk_end_ptr + g), tl.load(indptr_ptr + NUM_SEG))
    slot = tl.load(blk_slot_ptr + g).to(tl.int64)
    return slot, start, end


@triton.jit
def _shrink_blocks_kernel(x_ptr, a_ptr, hp_ptr, sorted_ptr, indptr_ptr, blk_count_ptr, blk_start_ptr, blk_end_ptr,
                          blk_slot_ptr, K, stride_xt, stride_as, stride_ai, stride_ar, stride_hp, stride_hi,
                          stride_ht, max_rank, NUM_SEG: tl.constexpr, K_PER_PROG: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                          NATIVE: tl.constexpr, IEEE: tl.constexpr):
    sl = tl.program_id(1)
    split = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    # A's rows up to max_rank, past the rank too (not waiting on it): they land in h's columns past the rank,
    # which expand drops
    r_in = offs_r < max_rank
    for g in range(tl.program_id(0), tl.load(blk_count_ptr), tl.num_programs(0)):
        slot, start, end = _seg_block(blk_start_ptr, blk_end_ptr, blk_slot_ptr, indptr_ptr, g, NUM_SEG)
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end                             # none past the step's LoRA tokens
        tok = tl.load(sorted_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        a_base = a_ptr + slot * stride_as + sl * stride_ai + offs_r[:, None] * stride_ar
        acc = _shrink_k_range(x_ptr, tok, row_ok, stride_xt, a_base, r_in, split * K_PER_PROG, K, K_PER_PROG,
                              BLOCK_M, BLOCK_R, BLOCK_K, NATIVE, IEEE)
        tl.store(hp_ptr + split * stride_hp + sl * stride_hi + rows[:, None] * stride_ht + offs_r[None, :], acc,
                 mask=row_ok[:, None] & r_in[None, :])


@triton.jit
def _expand_blocks_kernel(hp_ptr, b_ptr, y_ptr, ranks_ptr, scal_ptr, sorted_ptr, indptr_ptr, blk_count_ptr,
                          blk_start_ptr, blk_end_ptr, blk_slot_ptr, stride_hp, stride_hi, stride_ht, stride_bs,
                          stride_br, stride_yt, n_slices, max_rank, O1, O2, O3, O4, T1, T2, T3,
                          NUM_SEG: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    sl, cols, col_ok = _column_tile(tl.program_id(1), O1, O2, O3, O4, T1, T2, T3, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < max_rank
    for g in range(tl.program_id(0), tl.load(blk_count_ptr), tl.num_programs(0)):
        slot, start, end = _seg_block(blk_start_ptr, blk_end_ptr, blk_slot_ptr, indptr_ptr, g, NUM_SEG)
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        # everything that waits on the slot alone goes out together; the rank only masks what came back
        rank = tl.minimum(tl.load(ranks_ptr + slot * n_slices + sl), max_rank)
        scale = tl.load(scal_ptr + slot * n_slices + sl)
        bt = tl.load(b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + cols[None, :],
                     mask=r_in[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        tok = tl.load(sorted_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        h_ptrs = hp_ptr + sl * stride_hi + rows[:, None] * stride_ht + offs_r[None, :]
        h_mask = row_ok[:, None] & r_in[None, :]
        h = tl.load(h_ptrs, mask=h_mask, other=0.0)
        for p in tl.static_range(1, SPLIT_K):
            h += tl.load(h_ptrs + p * stride_hp, mask=h_mask, other=0.0)
        y_ptrs = y_ptr + tok[:, None] * stride_yt + cols[None, :]
        y = tl.load(y_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        r_ok = offs_r < rank                             # past the rank: A's and B's unused rows (maybe NaN)
        acc = mma(tl.where(r_ok[None, :], h, 0.0), tl.where(r_ok[:, None], bt, 0.0), False, IEEE)
        # a slice of rank 0 leaves y as it was
        tl.store(y_ptrs, (y + scale * acc).to(y_ptr.dtype.element_ty),
                 mask=tl.where(rank > 0, row_ok, False)[:, None] & col_ok[None, :])   # (the interpreter cannot & a scalar in)


def block_programs(num_tokens: int, max_blocks: int) -> int:
    """Programs along the segment-block kernels' block axis: two a SEG_BLOCK of the step's tokens (a step of
    16 adapters over 256 tokens has 32 blocks), at most one a block."""
    return min(max_blocks, 2 * triton.cdiv(num_tokens, SEG_BLOCK))


def lora_apply_blocks(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      ranks: torch.Tensor, scalings: torch.Tensor, out_offsets: tuple[int, ...], meta: LoRAMeta,
                      *, split_k: int | None = None, block_n: int = 128) -> torch.Tensor:
    """y += LoRA(x), the semantics of ``lora_apply_decode``, for a step of any size: a program per (segment
    block, slice, K split) in shrink, per (segment block, column tile) in expand; in place, returns y.

    Inputs are checked by the caller (``sgmv.lora_apply``).
    """
    t, k = x.shape
    n_slices, max_rank, offs = lora_a.shape[1], lora_a.shape[2], tuple(int(o) for o in out_offsets)
    if meta.no_lora or t == 0:
        return y
    num_seg = meta.seg_slot.numel()
    blocks = block_programs(t, min(max_seg_blocks(t, num_seg), meta.blk_start.numel()))
    block_r = max(16, triton.next_power_of_2(max_rank))
    block_k = block_k_of(k)
    k_per_prog, split_k = _k_split(k, split_k, block_k)
    hp = torch.empty((split_k, n_slices, t, max_rank), dtype=torch.float32, device=x.device)
    ieee = x.dtype == torch.float32
    _shrink_blocks_kernel[(blocks, n_slices, split_k)](
        x, lora_a, hp, meta.sorted_idx, meta.seg_indptr, meta.blk_count, meta.blk_start, meta.blk_end, meta.blk_slot,
        k, x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        hp.stride(0), hp.stride(1), hp.stride(2), max_rank, NUM_SEG=num_seg,
        K_PER_PROG=k_per_prog, BLOCK_M=SEG_BLOCK, BLOCK_R=block_r, BLOCK_K=block_k, NATIVE=native_dot(x.dtype),
        IEEE=ieee, num_warps=4, num_stages=3)
    o, tile_starts, num_tiles = column_tiles(offs, block_n)
    _expand_blocks_kernel[(blocks, num_tiles)](
        hp, lora_b, y, ranks, scalings, meta.sorted_idx, meta.seg_indptr, meta.blk_count, meta.blk_start,
        meta.blk_end, meta.blk_slot, hp.stride(0), hp.stride(1), hp.stride(2), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        n_slices, max_rank, o[0], o[1], o[2], o[3], tile_starts[0], tile_starts[1], tile_starts[2],
        NUM_SEG=num_seg, SPLIT_K=split_k, BLOCK_M=SEG_BLOCK, BLOCK_N=block_n, BLOCK_R=block_r,
        IEEE=ieee, num_warps=4)
    return y


# ---- one adapter ---------------------------------------------------------------------------------------------
# A step whose LoRA tokens all share one adapter (one segment) needs no segment walk at all. These two kernels
# take the segment from fixed places (seg_slot[0], the LoRA token count in seg_indptr's last entry) and load
# them side by side with the token order, so each kernel waits on one round trip before its weight loads where
# the block-walking kernels wait on four or five (indptr -> segment bounds -> slot -> rank -> weights), and
# shrink stores K-split partials indexed by sorted position, so no zeroed buffer (no memset launch) and expand
# reads them without waiting on the token order. Partials are summed in expand: at most 32K fp32 elements a
# program (``single_split``), read from L2.

SINGLE_TILE = 2048       # tokens x max rank (both padded) of a one-adapter step these kernels take


def single_tile(num_tokens: int, max_rank: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_R) of the one-adapter kernels: all the step's tokens and the stack's whole rank."""
    return max(16, triton.next_power_of_2(num_tokens)), max(16, triton.next_power_of_2(max_rank))


def single_fits(num_tokens: int, max_rank: int) -> bool:
    """Whether the one-adapter kernels take this step: past SINGLE_TILE their partial tiles spill registers
    and the block-walking kernels win (64 tokens at max rank 64: 18.5 against 21.5 us for down on the H100)."""
    block_m, block_r = single_tile(num_tokens, max_rank)
    return num_tokens <= MAX_TOKENS and block_m * block_r <= SINGLE_TILE


def single_split(k: int, block_m: int, block_r: int, block_k: int) -> int:
    """K splits of the one-adapter shrink.

    A shrink program streams k / split input features of block_m x rows and block_r
    A rows (bf16, from DRAM); an expand program sums split partial tiles of
    block_m x block_r (fp32, from L2), which costs about half as much a byte on the
    H100. Balancing the two gives split^2 = k (block_m + block_r) / (block_m block_r):
    32 splits of 128 features for in=4096 at 16 x 16 tiles, 16 at 32 x 16, 38 of 384
    for down (in=14336) at 16 x 16. The partial tiles an expand program holds are capped at 32K elements
    (past that they spill: 28 splits at 32 x 64 took 44 against 16 us).
    Measured: bench/results/2026-11-24-h100-sgmv-single.txt, bench/NOTES-kernels.md (v8).
    """
    split = math.sqrt(k * (block_m + block_r) / (block_m * block_r))
    split = max(1, min(split, 32768 // (block_m * block_r)))
    k_per_prog = block_k * max(1, int(k / split / block_k + 0.5))
    while triton.cdiv(k, k_per_prog) * block_m * block_r > 32768:      # rounding down may pass the cap
        k_per_prog += block_k
    return triton.cdiv(k, k_per_prog)


@triton.jit
def _shrink_single_kernel(x_ptr, a_ptr, hp_ptr, sorted_ptr, indptr_ptr, seg_slot_ptr,
                          T, K, NUM_SEG, stride_xt, stride_as, stride_ai, stride_ar, stride_hp, stride_hi,
                          stride_ht, max_rank, K_PER_PROG: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                          NATIVE: tl.constexpr, IEEE: tl.constexpr):
    split = tl.program_id(0)
    sl = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)                        # sorted positions: the segment is [0, end)
    tok = tl.load(sorted_ptr + rows, mask=rows < T, other=0).to(tl.int64)
    end = tl.load(indptr_ptr + NUM_SEG)                 # LoRA tokens this step; 0 for a step without LoRA
    slot = tl.load(seg_slot_ptr).to(tl.int64)
    if (end > 0) & (slot >= 0):
        offs_r = tl.arange(0, BLOCK_R)
        # rows of A past the adapter's rank are read too (max_rank of them at most) and land in h's
        # columns past the rank, which expand never uses: masking them here would wait on the rank load
        a_base = a_ptr + slot * stride_as + sl * stride_ai + offs_r[:, None] * stride_ar
        r_in = offs_r < max_rank
        acc = _shrink_k_range(x_ptr, tok, rows < end, stride_xt, a_base, r_in, split * K_PER_PROG, K, K_PER_PROG,
                              BLOCK_M, BLOCK_R, BLOCK_K, NATIVE, IEEE)
        tl.store(hp_ptr + split * stride_hp + sl * stride_hi + rows[:, None] * stride_ht + offs_r[None, :], acc,
                 mask=(rows < T)[:, None] & r_in[None, :])


@triton.jit
def _expand_single_kernel(hp_ptr, b_ptr, y_ptr, ranks_ptr, scal_ptr, sorted_ptr, indptr_ptr, seg_slot_ptr,
                          T, NUM_SEG, stride_hp, stride_hi, stride_ht, stride_bs, stride_br, stride_yt,
                          n_slices, max_rank, O1, O2, O3, O4, T1, T2, T3, SPLIT_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    sl, cols, col_ok = _column_tile(tl.program_id(0), O1, O2, O3, O4, T1, T2, T3, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    tok = tl.load(sorted_ptr + rows, mask=rows < T, other=0).to(tl.int64)
    end = tl.load(indptr_ptr + NUM_SEG)
    slot = tl.load(seg_slot_ptr).to(tl.int64)
    if (end > 0) & (slot >= 0):
        row_ok = rows < end
        offs_r = tl.arange(0, BLOCK_R)
        y_ptrs = y_ptr + tok[:, None] * stride_yt + cols[None, :]
        y_mask = row_ok[:, None] & col_ok[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)        # issued before the rank is known
        h_ptrs = hp_ptr + sl * stride_hi + rows[:, None] * stride_ht + offs_r[None, :]
        h_mask = row_ok[:, None] & (offs_r < max_rank)[None, :]
        h = tl.load(h_ptrs, mask=h_mask, other=0.0)
        for p in tl.static_range(1, SPLIT_K):
            h += tl.load(h_ptrs + p * stride_hp, mask=h_mask, other=0.0)
        rank = tl.minimum(tl.load(ranks_ptr + slot * n_slices + sl), max_rank)
        if rank > 0:
            r_ok = offs_r < rank
            scale = tl.load(scal_ptr + slot * n_slices + sl)
            bt = tl.load(b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + cols[None, :],
                         mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            h = tl.where(r_ok[None, :], h, 0.0)              # columns past the rank came from A's unused rows
            acc = mma(h, bt, False, IEEE)
            tl.store(y_ptrs, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def lora_apply_single(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      ranks: torch.Tensor, scalings: torch.Tensor, out_offsets: tuple[int, ...], meta: LoRAMeta,
                      *, split_k: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """y += LoRA(x) for a step of at most MAX_TOKENS tokens whose LoRA tokens share one adapter; in place.

    The semantics of ``lora_apply_decode``; the step must hold one segment
    (``meta.num_segments == 1``), or none, which the kernels see as an empty step,
    and its tile (``single_tile``) at most SINGLE_TILE elements.
    Inputs are checked by the caller (``sgmv.lora_apply``).
    """
    t, k, n_slices, max_rank, offs = _step_shape(x, lora_a, out_offsets)
    if meta.num_segments > 1:
        raise ValueError(f"the one-adapter kernels take one segment, the step has {meta.num_segments}")
    if not single_fits(t, max_rank):
        raise ValueError(f"{t} tokens at max rank {max_rank} exceed the one-adapter kernels' tile")
    if meta.no_lora or t == 0:
        return y
    block_m, block_r = single_tile(t, max_rank)
    block_k = block_k_of(k)
    if split_k is None:
        split_k = single_split(k, block_m, block_r, block_k)
    k_per_prog, split_k = _k_split(k, split_k, block_k)
    if block_n is None:
        # every column tile re-reads all the partials: past ~16 MB of such L2 reads, wider tiles pay
        partial_bytes = split_k * block_m * block_r * 4
        block_n = 64 if triton.cdiv(offs[-1], 64) * partial_bytes <= (16 << 20) else 128
    hp = torch.empty((split_k, n_slices, t, max_rank), dtype=torch.float32, device=x.device)
    num_seg = meta.seg_slot.numel()
    ieee = x.dtype == torch.float32
    _shrink_single_kernel[(split_k, n_slices)](
        x, lora_a, hp, meta.sorted_idx, meta.seg_indptr, meta.seg_slot, t, k, num_seg,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        hp.stride(0), hp.stride(1), hp.stride(2), max_rank,
        K_PER_PROG=k_per_prog, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, NATIVE=native_dot(x.dtype),
        IEEE=ieee, num_warps=4, num_stages=3)
    o, tile_starts, num_tiles = column_tiles(offs, block_n)
    _expand_single_kernel[(num_tiles,)](
        hp, lora_b, y, ranks, scalings, meta.sorted_idx, meta.seg_indptr, meta.seg_slot, t, num_seg,
        hp.stride(0), hp.stride(1), hp.stride(2), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        n_slices, max_rank, o[0], o[1], o[2], o[3], tile_starts[0], tile_starts[1], tile_starts[2],
        SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=ieee, num_warps=4)
    return y
