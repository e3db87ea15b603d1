"""Grouped LoRA (SGMV) in Triton: shrink (x @ A^T) and expand (y += s * h @ B).

Semantics and weight layout: ``kernels/lora_torch.py``. Both kernels walk the
tokens in ``meta.sorted_idx`` order, cut into blocks of ``BLOCK_M`` positions; a
block holds the tail of one segment, whole segments, and the head of another.
A program takes one block and loops over the segments inside it, loading that
segment's A (or B) tile once for all of the segment's tokens in the block and
masking the block's rows to the segment. So each adapter's weights are read
about once per step whatever the mix, and ``y`` is read and written once.

The grid depends on static shapes only (tokens in ``x``, slot capacity of
``meta``, weight shapes), never on per-step data: programs past the last LoRA
token exit at once, so a decode step can be captured in a CUDA graph. Ranks and
scalings are read on the device; a slice of rank 0 costs one scalar load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.lora_meta import SEG_BLOCKS_MAX_SEGMENTS, LoRAMeta
from kernels.mma import mma, native_dot
from kernels.sgmv_tiles import MAX_SLICES, _column_tile, column_tiles
from kernels.sgmv_decode import MAX_TOKENS as MAX_DECODE_TOKENS
from kernels.sgmv_decode import block_k_of, lora_apply_blocks, lora_apply_decode, lora_apply_single, single_fits

# Steps from MAX_DECODE_TOKENS up to this many tokens, with up to SEG_BLOCKS_MAX_SEGMENTS adapters, take the
# segment-block kernels of sgmv_decode (a program per 16-token block of a segment); the others (prefill, a
# segment per token) the block-walking kernels here. On the H100 (bench/NOTES-kernels.md v10) they took the
# engine's batch-256 Skewed step (47 adapters) from 52.7% over base to 38.9% and left Uniform (16) where it was
# (19.8%, 20.9%); with one token per adapter they lose (gate_up at 256 tokens: 190 against 151 us).
SEG_BLOCKS_MAX_TOKENS = 512

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _block_segments(indptr_ptr, p0, BLOCK_M: tl.constexpr, NUM_SEG: tl.constexpr, SEG_P2: tl.constexpr):
    """Sorted positions [p0, p_end) of this block and the segments [seg_lo, seg_hi) that meet it."""
    total = tl.load(indptr_ptr + NUM_SEG)                     # LoRA tokens this step (indptr is padded)
    p_end = tl.minimum(p0 + BLOCK_M, total)
    offs = tl.arange(0, SEG_P2)
    valid = offs < NUM_SEG
    ends = tl.load(indptr_ptr + 1 + offs, mask=valid, other=2147483647)
    starts = tl.load(indptr_ptr + offs, mask=valid, other=2147483647)
    seg_lo = tl.sum((ends <= p0).to(tl.int32), axis=0)
    seg_hi = tl.sum((starts < p_end).to(tl.int32), axis=0)
    return p_end, seg_lo, seg_hi


@triton.jit
def _segment_table(seg_slot_ptr, indptr_ptr, ranks_ptr, seg_lo, seg_hi, sl, n_slices, max_rank,
                   BLOCK_M: tl.constexpr):
    """Slot, rank of slice ``sl``, start and end of the (at most BLOCK_M) segments meeting a block, as vectors.

    Loaded up front so that the loop over segments issues only the weight loads,
    independent from one iteration to the next (no chain of scalar loads).
    """
    seg = seg_lo + tl.arange(0, BLOCK_M)
    ok = seg < seg_hi
    slot = tl.load(seg_slot_ptr + seg, mask=ok, other=0)
    rank = tl.minimum(tl.load(ranks_ptr + slot * n_slices + sl, mask=ok, other=0), max_rank)
    start = tl.load(indptr_ptr + seg, mask=ok, other=0)
    end = tl.load(indptr_ptr + seg + 1, mask=ok, other=0)
    return slot, rank, start, end


@triton.jit
def _pick(vec, j, BLOCK_M: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, BLOCK_M) == j, vec, 0), axis=0)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, ranks_ptr, sorted_ptr, indptr_ptr, seg_slot_ptr,
                   K, stride_xt, stride_as, stride_ai, stride_ar, stride_hi, stride_ht, n_slices, max_rank,
                   NUM_SEG: tl.constexpr, SEG_P2: tl.constexpr, N_RB: tl.constexpr, K_STEPS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   ATOMIC: tl.constexpr, NATIVE: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    sl = tl.program_id(1) // N_RB            # slice
    rb = tl.program_id(1) % N_RB             # block of rank rows
    k_lo = tl.program_id(2) * (K_STEPS * BLOCK_K)
    p0 = pid_m * BLOCK_M
    p_end, seg_lo, seg_hi = _block_segments(indptr_ptr, p0, BLOCK_M, NUM_SEG, SEG_P2)
    if p0 < p_end:
        rows = p0 + tl.arange(0, BLOCK_M)
        row_ok = rows < p_end
        tok = tl.load(sorted_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        slot_v, rank_v, start_v, end_v = _segment_table(seg_slot_ptr, indptr_ptr, ranks_ptr, seg_lo, seg_hi, sl,
                                                        n_slices, max_rank, BLOCK_M)
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        # one flat loop over (segment, k step): a rank-0 slice or rank block past the rank loads nothing
        for it in range(0, (seg_hi - seg_lo) * K_STEPS):
            j = it // K_STEPS
            kk = k_lo + (it % K_STEPS) * BLOCK_K + offs_k
            slot = _pick(slot_v, j, BLOCK_M).to(tl.int64)
            rank = _pick(rank_v, j, BLOCK_M)
            # rows of this segment; none when this rank block lies past the segment's rank
            lo = tl.where(rank > rb * BLOCK_R, _pick(start_v, j, BLOCK_M), p_end)
            in_seg = row_ok & (rows >= lo) & (rows < _pick(end_v, j, BLOCK_M))
            k_ok = kk < K
            xt = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :],
                         mask=in_seg[:, None] & k_ok[None, :], other=0.0)
            at = tl.load(a_ptr + slot * stride_as + sl * stride_ai + offs_r[:, None] * stride_ar + kk[None, :],
                         mask=(offs_r[:, None] < rank) & k_ok[None, :], other=0.0)
            acc += mma(xt, tl.trans(at), NATIVE, IEEE)
        h_ptrs = h_ptr + sl * stride_hi + tok[:, None] * stride_ht + offs_r[None, :]
        h_mask = row_ok[:, None] & (offs_r[None, :] < max_rank)
        if ATOMIC:
            tl.atomic_add(h_ptrs, acc, mask=h_mask)
        else:
            tl.store(h_ptrs, acc, mask=h_mask)


@triton.jit
def _expand_kernel(h_ptr, b_ptr, y_ptr, ranks_ptr, scal_ptr, sorted_ptr, indptr_ptr, seg_slot_ptr,
                   stride_hi, stride_ht, stride_bs, stride_br, stride_yt, n_slices, max_rank,
                   O1, O2, O3, O4, T1, T2, T3,
                   NUM_SEG: tl.constexpr, SEG_P2: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    sl, cols, col_ok = _column_tile(pid_n, O1, O2, O3, O4, T1, T2, T3, BLOCK_N)
    p0 = pid_m * BLOCK_M
    p_end, seg_lo, seg_hi = _block_segments(indptr_ptr, p0, BLOCK_M, NUM_SEG, SEG_P2)
    if p0 < p_end:
        rows = p0 + tl.arange(0, BLOCK_M)
        row_ok = rows < p_end
        tok = tl.load(sorted_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        slot_v, rank_v, start_v, end_v = _segment_table(seg_slot_ptr, indptr_ptr, ranks_ptr, seg_lo, seg_hi, sl,
                                                        n_slices, max_rank, BLOCK_M)
        scal_v = tl.load(scal_ptr + slot_v * n_slices + sl, mask=rank_v > 0, other=0.0)
        offs_r = tl.arange(0, BLOCK_R)                  # BLOCK_R covers max_rank: rows past a rank load nothing
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in range(0, seg_hi - seg_lo):
            slot = _pick(slot_v, j, BLOCK_M).to(tl.int64)
            rank = _pick(rank_v, j, BLOCK_M)
            in_seg = row_ok & (rows >= _pick(start_v, j, BLOCK_M)) & (rows < _pick(end_v, j, BLOCK_M))
            r_ok = offs_r < rank
            ht = tl.load(h_ptr + sl * stride_hi + tok[:, None] * stride_ht + offs_r[None, :],
                         mask=in_seg[:, None] & r_ok[None, :], other=0.0)
            bt = tl.load(b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + cols[None, :],
                         mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            ht = ht * _pick(scal_v, j, BLOCK_M)
            acc += mma(ht, bt, False, IEEE)                 # both fp32 already
        if tl.max(rank_v, axis=0) > 0:
            y_ptrs = y_ptr + tok[:, None] * stride_yt + cols[None, :]
            y_mask = row_ok[:, None] & col_ok[None, :]
            y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _block_m(num_tokens: int) -> int:
    return 16 if num_tokens <= 64 else 32


def _check_meta(meta: LoRAMeta, num_tokens: int, device: torch.device) -> None:
    if meta.num_tokens > num_tokens:
        raise ValueError(f"meta holds {meta.num_tokens} tokens but the activations have only {num_tokens} rows")
    if meta.sorted_idx.device != device:
        raise ValueError(f"meta buffers are on {meta.sorted_idx.device}, activations on {device}")


def _check_slot_tensors(ranks: torch.Tensor, num_slots: int, n_slices: int, device: torch.device,
                        scalings: torch.Tensor | None = None) -> None:
    if ranks.dtype != torch.int32 or tuple(ranks.shape) != (num_slots, n_slices) or not ranks.is_contiguous():
        raise ValueError(f"ranks must be contiguous int32 [{num_slots}, {n_slices}], got {ranks.dtype} {tuple(ranks.shape)}")
    if ranks.device != device:
        raise ValueError(f"ranks must be on {device}, got {ranks.device}")
    if scalings is not None:
        if (scalings.dtype != torch.float32 or tuple(scalings.shape) != (num_slots, n_slices)
                or not scalings.is_contiguous() or scalings.device != device):
            raise ValueError(f"scalings must be contiguous float32 [{num_slots}, {n_slices}] on {device}, "
                             f"got {scalings.dtype} {tuple(scalings.shape)} on {scalings.device}")


def _check_shrink_args(x: torch.Tensor, lora_a: torch.Tensor, ranks: torch.Tensor,
                       meta: LoRAMeta) -> tuple[int, int, int, int]:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, in] with unit stride along in, got shape {tuple(x.shape)} strides {x.stride()}")
    if lora_a.dim() != 4 or not lora_a.is_contiguous():
        raise ValueError(f"lora_a must be contiguous [num_slots, n_slices, max_rank, in], got {tuple(lora_a.shape)}")
    num_slots, n_slices, max_rank, k = lora_a.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features, lora_a expects {k}")
    if x.dtype not in _DTYPES or lora_a.dtype != x.dtype:
        raise ValueError(f"x and lora_a must share a dtype among {_DTYPES}, got {x.dtype} and {lora_a.dtype}")
    if lora_a.device != x.device:
        raise ValueError(f"lora_a is on {lora_a.device}, x on {x.device}")
    if n_slices > MAX_SLICES:
        raise ValueError(f"at most {MAX_SLICES} slices per launch, got {n_slices}")
    _check_slot_tensors(ranks, num_slots, n_slices, x.device)
    _check_meta(meta, x.shape[0], x.device)
    return num_slots, n_slices, max_rank, k


def _check_expand_out(lora_b: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor,
                      out_offsets: tuple[int, ...], meta: LoRAMeta, y: torch.Tensor, t: int) -> tuple[int, ...]:
    if lora_b.dim() != 3 or not lora_b.is_contiguous():
        raise ValueError(f"lora_b must be contiguous [num_slots, max_rank, out_total], got {tuple(lora_b.shape)}")
    num_slots, max_rank, out_total = lora_b.shape
    offs = tuple(int(o) for o in out_offsets)
    n_slices = len(offs) - 1
    if n_slices < 1 or n_slices > MAX_SLICES or offs[0] != 0 or offs[-1] != out_total \
            or any(b <= a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"out_offsets must rise from 0 to {out_total} over 1..{MAX_SLICES} slices, got {offs}")
    if y.dim() != 2 or tuple(y.shape) != (t, out_total) or y.stride(1) != 1:
        raise ValueError(f"y must be [{t}, {out_total}] with unit column stride, got {tuple(y.shape)} {y.stride()}")
    if y.dtype not in _DTYPES or lora_b.dtype != y.dtype:
        raise ValueError(f"y and lora_b must share a dtype among {_DTYPES}, got {y.dtype} and {lora_b.dtype}")
    if lora_b.device != y.device:
        raise ValueError(f"lora_b and y must share a device, got {lora_b.device} and {y.device}")
    _check_slot_tensors(ranks, num_slots, n_slices, y.device, scalings)
    _check_meta(meta, t, y.device)
    return offs


def apply_path(num_tokens: int, num_segments: int, max_rank: int) -> str:
    """Which kernels ``lora_apply`` launches for a step: "segments" (several adapters, segment-major),
    "single" (one adapter, when its tile fits), "seg_blocks" (a program per 16-token block of a segment:
    steps past the decode kernels' size) or "blocks" (the block-walking kernels here: prefill)."""
    if num_tokens > SEG_BLOCKS_MAX_TOKENS:
        return "blocks"
    if num_tokens > MAX_DECODE_TOKENS:
        return "seg_blocks" if num_segments <= SEG_BLOCKS_MAX_SEGMENTS else "blocks"
    if num_segments > 1:
        return "segments"
    return "single" if single_fits(num_tokens, max_rank) else "blocks"


def lora_apply(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor,
               scalings: torch.Tensor, out_offsets: tuple[int, ...], meta: LoRAMeta) -> torch.Tensor:
    """y[t, o_i:o_{i+1}] += scalings[s, i] * (x[t] @ lora_a[s, i, :r].T) @ lora_b[s, :r, o_i:o_{i+1}], in place.

    Shrink then expand. Steps of at most ``sgmv_decode.MAX_TOKENS`` tokens take
    the decode kernels of ``sgmv_decode``: the segment-major ones with several
    adapters, the one-adapter ones with one where their tile fits (neither zeroes
    a buffer nor uses atomics); steps up to ``SEG_BLOCKS_MAX_TOKENS`` the segment-block
    ones there, up to ``SEG_BLOCKS_MAX_SEGMENTS`` adapters; the others the block-walking
    kernels here (bench/NOTES-kernels.md).
    The choice depends on the host-side ``meta.num_segments``: a captured graph
    holds one path, so the engine captures one graph per choice (worker/cuda_graphs.py).
    """
    t = x.shape[0]
    num_slots, n_slices, max_rank, _ = _check_shrink_args(x, lora_a, ranks, meta)
    path = apply_path(t, meta.num_segments, max_rank)
    if path == "blocks":
        h = lora_shrink(x, lora_a, ranks, meta)
        return lora_expand(h, lora_b, ranks, scalings, out_offsets, meta, y)
    offs = _check_expand_out(lora_b, ranks, scalings, out_offsets, meta, y, t)
    if lora_b.shape[:2] != (num_slots, max_rank) or len(offs) - 1 != n_slices:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} / {len(offs) - 1} slices disagree")
    if path == "seg_blocks":
        return lora_apply_blocks(x, y, lora_a, lora_b, ranks, scalings, offs, meta)
    if path == "single":
        return lora_apply_single(x, y, lora_a, lora_b, ranks, scalings, offs, meta)
    return lora_apply_decode(x, y, lora_a, lora_b, ranks, scalings, offs, meta)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, ranks: torch.Tensor, meta: LoRAMeta,
                out: torch.Tensor | None = None, *, split_k: int | None = None, num_stages: int = 3) -> torch.Tensor:
    """h[i, t, :r] = x[t] @ lora_a[slot(t), i, :r].T  (fp32; r = ranks[slot(t), i]); returns h [n_slices, T, max_rank].

    h is zeroed first, so entries past a token's rank and rows of tokens without
    LoRA read 0. With no LoRA token in the step nothing is launched and h is
    returned as is (``out``, or uninitialised memory).
    """
    num_slots, n_slices, max_rank, k = _check_shrink_args(x, lora_a, ranks, meta)
    t = x.shape[0]
    if out is None:
        out = torch.empty((n_slices, t, max_rank), dtype=torch.float32, device=x.device)
    elif out.dtype != torch.float32 or tuple(out.shape) != (n_slices, t, max_rank) or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 [{n_slices}, {t}, {max_rank}], got {out.dtype} {tuple(out.shape)}")
    if meta.no_lora or t == 0:
        return out
    out.zero_()
    block_m = _block_m(t)
    block_r = min(max(16, triton.next_power_of_2(max_rank)), 64)
    block_k = block_k_of(k)
    if split_k is None:                                # one k step per program: a flat, pipelined segment loop
        split_k = triton.cdiv(k, block_k)
    k_steps = triton.cdiv(triton.cdiv(k, split_k), block_k)
    split_k = triton.cdiv(k, k_steps * block_k)
    n_rb = triton.cdiv(max_rank, block_r)
    num_seg = meta.seg_slot.numel()
    grid = (triton.cdiv(t, block_m), n_slices * n_rb, split_k)
    native = native_dot(x.dtype)
    _shrink_kernel[grid](
        x, lora_a, out, ranks, meta.sorted_idx, meta.seg_indptr, meta.seg_slot,
        k, x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), out.stride(0), out.stride(1), n_slices, max_rank,
        NUM_SEG=num_seg, SEG_P2=triton.next_power_of_2(num_seg + 1), N_RB=n_rb, K_STEPS=k_steps,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, ATOMIC=split_k > 1, NATIVE=native,
        IEEE=x.dtype == torch.float32, num_warps=4, num_stages=num_stages)
    return out


def lora_expand(h: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor,
                out_offsets: tuple[int, ...], meta: LoRAMeta, y: torch.Tensor, *, block_n: int = 128,
                num_stages: int = 3) -> torch.Tensor:
    """y[t, o_i:o_{i+1}] += scalings[s, i] * h[i, t, :r] @ lora_b[s, :r, o_i:o_{i+1}]  (s = slot(t), r = ranks[s, i]).

    In place on y (fp32 accumulation, one rounding to y's dtype); returns y.
    Tokens without LoRA and slices of rank 0 are left untouched; h past the
    rank is never read. With no LoRA token in the step nothing is launched.
    """
    num_slots, max_rank, out_total = lora_b.shape
    if h.dim() != 3 or h.dtype != torch.float32 or not h.is_contiguous() or h.shape[0] != len(out_offsets) - 1 \
            or h.shape[2] != max_rank:
        raise ValueError(f"h must be contiguous float32 [{len(out_offsets) - 1}, T, {max_rank}], "
                         f"got {h.dtype} {tuple(h.shape)}")
    if h.device != y.device:
        raise ValueError(f"h is on {h.device}, y on {y.device}")
    t = h.shape[1]
    offs = _check_expand_out(lora_b, ranks, scalings, out_offsets, meta, y, t)
    n_slices = len(offs) - 1
    if meta.no_lora or t == 0:
        return y
    block_m = _block_m(t)
    block_r = max(16, triton.next_power_of_2(max_rank))
    o, tile_starts, num_tiles = column_tiles(offs, block_n)
    num_seg = meta.seg_slot.numel()
    grid = (triton.cdiv(t, block_m), num_tiles)
    _expand_kernel[grid](
        h, lora_b, y, ranks, scalings, meta.sorted_idx, meta.seg_indptr, meta.seg_slot,
        h.stride(0), h.stride(1), lora_b.stride(0), lora_b.stride(1), y.stride(0), n_slices, max_rank,
        o[0], o[1], o[2], o[3], tile_starts[0], tile_starts[1], tile_starts[2],
        NUM_SEG=num_seg, SEG_P2=triton.next_power_of_2(num_seg + 1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=y.dtype == torch.float32, num_warps=4,
        num_stages=num_stages)
    return y
