"""LoRA folded into the small fused ops of a decode step: 3 LoRA launches a layer instead of 8.

A decode step applies LoRA 4 times a layer (qkv, o, gate_up, down). With
separate shrink and expand kernels that is 8 launches a layer, 256 a step, and
at batch 32 their fixed latency, not their bytes, is what LoRA costs
(bench/NOTES-kernels.md). Here each shrink and expand rides in a kernel that
sits next to its projection anyway:

    input norm = expand_add (expand of the previous down, + residual, row sums of squares)
                 + norm_shrink (w * rmsnorm, shrink of qkv)
    rotary       expand of q, k, v, then rotary on q and k, in place
    shrink_cols  shrink of o (the attention output has no other kernel to join)
    post norm  = expand_add (expand of o) + norm_shrink (shrink of gate_up)
    SiLU-mul     expand of gate/up, silu(g) * u, shrink of down

so LoRA adds expand_add (the norm is split in two: its row statistic needs the
whole expanded row) twice and shrink_cols once a layer. Every kernel takes all
tokens of the step in one tile (at most ``MAX_TOKENS``) and a tile of columns,
and walks the step's adapters (segments): one adapter's weight tile is loaded
once and multiplied with that adapter's rows, so each adapter's A and B are
read once a step whatever the mix, as in SGMV.

Shrinks add their column tile's share into ``h[n_slices, T, max_rank]``
(float32, atomics), which must start at zero: the engine zeroes one buffer for
all layers at the start of a step. Semantics (``kernels/fused_lora_torch.py``)
are those of the unfused path: the expanded projection output is rounded to the
model dtype before the op that follows, as if ``lora_apply`` had updated it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fused import check_norm_args
from kernels.lora_meta import LoRAMeta
from kernels.mma import mma, native_dot

MAX_TOKENS = 64
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class LoRAWeights:
    """One family's stacked slots (layout of ``kernels/lora_torch.py``); the engine passes its
    ``LoRAFamily``, which has the same four tensors."""
    lora_a: torch.Tensor          # [slots, n_slices, max_rank, in]
    lora_b: torch.Tensor          # [slots, max_rank, out_total]
    ranks: torch.Tensor           # [slots, n_slices] int32
    scalings: torch.Tensor        # [slots, n_slices] float32


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _tile(T, n, BLOCK_M: tl.constexpr, BN: tl.constexpr):
    """All the step's rows and this program's column tile, with their masks."""
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < T
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_ok = cols < n
    return rows, row_ok, cols, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _pick(vec, j, N: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, N) == j, vec, 0), axis=0)


@triton.jit
def _segments(seg_slot_ptr, seg_cap, SEG_P2: tl.constexpr):
    """The step's slots (-1 past the last) and how many there are."""
    s = tl.arange(0, SEG_P2)
    slots = tl.load(seg_slot_ptr + s, mask=s < seg_cap, other=-1)
    return slots, tl.sum((slots >= 0).to(tl.int32), axis=0)


@triton.jit
def _per_segment(ptr, slots, n_slices, sl):
    """ranks[slot, sl] (or scalings) for every segment; 0 for unused ones."""
    return tl.load(ptr + tl.maximum(slots, 0) * n_slices + sl, mask=slots >= 0, other=0)


@triton.jit
def _load_h(h_ptr, stride_ht, rows, row_ok, max_rank, BLOCK_R: tl.constexpr):
    r = tl.arange(0, BLOCK_R)
    return tl.load(h_ptr + rows[:, None] * stride_ht + r[None, :], mask=row_ok[:, None] & (r < max_rank)[None, :],
                   other=0.0)


@triton.jit
def _expand_one(acc, h, tslot, slots, j, rank_v, scal_v, b_ptr, stride_bs, stride_br, cols, col_ok,
                BLOCK_R: tl.constexpr, SEG_P2: tl.constexpr, IEEE: tl.constexpr):
    r = tl.arange(0, BLOCK_R)
    slot = _pick(slots, j, SEG_P2)
    rank = _pick(rank_v, j, SEG_P2)
    hj = tl.where((tslot == slot)[:, None] & (r < rank)[None, :], h, 0.0) * _pick(scal_v, j, SEG_P2)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + r[:, None] * stride_br + cols[None, :],
                mask=(r < rank)[:, None] & col_ok[None, :], other=0.0)
    return acc + mma(hj, b.to(tl.float32), False, IEEE)


@triton.jit
def _expand_tile(acc, h, tslot, slots, nseg, rank_v, scal_v, b_ptr, stride_bs, stride_br, cols, col_ok,
                 BLOCK_R: tl.constexpr, SEG_P2: tl.constexpr, IEEE: tl.constexpr, SINGLE: tl.constexpr):
    """acc[t, cols] += scaling * h[t, :r] @ B[slot(t), :r, cols], one weight tile per adapter of the step.

    SINGLE: the step has one adapter, so no loop: straight-line code lets the
    weight load issue with the kernel's other loads instead of after them.
    """
    if SINGLE:
        acc = _expand_one(acc, h, tslot, slots, 0, rank_v, scal_v, b_ptr, stride_bs, stride_br, cols, col_ok,
                          BLOCK_R, SEG_P2, IEEE)
    else:
        for j in range(0, nseg):
            acc = _expand_one(acc, h, tslot, slots, j, rank_v, scal_v, b_ptr, stride_bs, stride_br, cols, col_ok,
                              BLOCK_R, SEG_P2, IEEE)
    return acc


@triton.jit
def _shrink_one(acc, x, tslot, slots, j, rank_v, a_ptr, stride_as, stride_ar, cols, col_ok,
                BLOCK_R: tl.constexpr, SEG_P2: tl.constexpr, NATIVE: tl.constexpr, IEEE: tl.constexpr):
    r = tl.arange(0, BLOCK_R)
    slot = _pick(slots, j, SEG_P2)
    rank = _pick(rank_v, j, SEG_P2)
    a = tl.load(a_ptr + slot.to(tl.int64) * stride_as + r[:, None] * stride_ar + cols[None, :],
                mask=(r < rank)[:, None] & col_ok[None, :], other=0.0)
    xj = tl.where((tslot == slot)[:, None], x, 0.0).to(x.dtype)
    return acc + mma(xj, tl.trans(a), NATIVE, IEEE)


@triton.jit
def _shrink_tile(x, tslot, slots, nseg, rank_v, a_ptr, stride_as, stride_ar, cols, col_ok,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, SEG_P2: tl.constexpr,
                 NATIVE: tl.constexpr, IEEE: tl.constexpr, SINGLE: tl.constexpr):
    """x[t, cols] @ A[slot(t), :r, cols].T for every row (float32 [BLOCK_M, BLOCK_R]); A offset to the slice."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if SINGLE:
        acc = _shrink_one(acc, x, tslot, slots, 0, rank_v, a_ptr, stride_as, stride_ar, cols, col_ok,
                          BLOCK_R, SEG_P2, NATIVE, IEEE)
    else:
        for j in range(0, nseg):
            acc = _shrink_one(acc, x, tslot, slots, j, rank_v, a_ptr, stride_as, stride_ar, cols, col_ok,
                              BLOCK_R, SEG_P2, NATIVE, IEEE)
    return acc


@triton.jit
def _add_h(h_ptr, stride_ht, rows, row_ok, max_rank, acc, BLOCK_R: tl.constexpr):
    r = tl.arange(0, BLOCK_R)
    tl.atomic_add(h_ptr + rows[:, None] * stride_ht + r[None, :], acc, mask=row_ok[:, None] & (r < max_rank)[None, :])


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _expand_add_kernel(x_ptr, r_ptr, s_ptr, sq_ptr, slot_ptr, seg_slot_ptr, h_ptr, b_ptr, ranks_ptr, scal_ptr,
                       T, n, stride_x, stride_r, stride_s, stride_ht, stride_bs, stride_br, seg_cap, max_rank,
                       HAS_RES: tl.constexpr, EXPAND: tl.constexpr, BLOCK_M: tl.constexpr, BN: tl.constexpr,
                       BLOCK_R: tl.constexpr, SEG_P2: tl.constexpr, IEEE: tl.constexpr, SINGLE: tl.constexpr):
    rows, row_ok, cols, col_ok, m = _tile(T, n, BLOCK_M, BN)
    dt = s_ptr.dtype.element_ty
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if EXPAND:
        tslot = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
        slots, nseg = _segments(seg_slot_ptr, seg_cap, SEG_P2)
        h = _load_h(h_ptr, stride_ht, rows, row_ok, max_rank, BLOCK_R)
        delta = _expand_tile(tl.zeros((BLOCK_M, BN), dtype=tl.float32), h, tslot, slots, nseg,
                             _per_segment(ranks_ptr, slots, 1, 0), _per_segment(scal_ptr, slots, 1, 0),
                             b_ptr, stride_bs, stride_br, cols, col_ok, BLOCK_R, SEG_P2, IEEE, SINGLE)
        x = (x + delta).to(dt).to(tl.float32)
    if HAS_RES:
        x = (x + tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=m, other=0.0).to(tl.float32))
        x = x.to(dt).to(tl.float32)
    if HAS_RES or EXPAND:
        tl.store(s_ptr + rows[:, None] * stride_s + cols[None, :], x.to(dt), mask=m)
    tl.store(sq_ptr + tl.program_id(0) * BLOCK_M + rows, tl.sum(x * x, axis=1), mask=row_ok)


@triton.jit
def _norm_shrink_kernel(s_ptr, w_ptr, out_ptr, sq_ptr, slot_ptr, seg_slot_ptr, a_ptr, ranks_ptr, h_ptr,
                        T, n, n_chunks, stride_s, stride_o, stride_as, stride_ai, stride_ar, stride_hs, stride_ht,
                        seg_cap, max_rank, eps,
                        SHRINK: tl.constexpr, N_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BN: tl.constexpr,
                        BLOCK_R: tl.constexpr, CH_P2: tl.constexpr, SEG_P2: tl.constexpr,
                        NATIVE: tl.constexpr, IEEE: tl.constexpr, SINGLE: tl.constexpr):
    rows, row_ok, cols, col_ok, m = _tile(T, n, BLOCK_M, BN)
    dt = out_ptr.dtype.element_ty
    c = tl.arange(0, CH_P2)
    sq = tl.load(sq_ptr + c[:, None] * BLOCK_M + rows[None, :], mask=(c < n_chunks)[:, None] & row_ok[None, :],
                 other=0.0)
    rstd = tl.rsqrt(tl.sum(sq, axis=0) / n + eps)
    s = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = (w[None, :] * (s * rstd[:, None]).to(dt).to(tl.float32)).to(dt)
    if SHRINK:
        tslot = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
        slots, nseg = _segments(seg_slot_ptr, seg_cap, SEG_P2)
        for sl in tl.static_range(N_SLICES):
            acc = _shrink_tile(y, tslot, slots, nseg, _per_segment(ranks_ptr, slots, N_SLICES, sl),
                               a_ptr + sl * stride_ai, stride_as, stride_ar, cols, col_ok,
                               BLOCK_M, BLOCK_R, SEG_P2, NATIVE, IEEE, SINGLE)
            _add_h(h_ptr + sl * stride_hs, stride_ht, rows, row_ok, max_rank, acc, BLOCK_R)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y, mask=m)     # after the weight loads


@triton.jit
def _rotary_lora_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, seg_slot_ptr, h_ptr, b_ptr, ranks_ptr,
                        scal_ptr, T, stride_t, stride_c, stride_hs, stride_ht, stride_bs, stride_br, seg_cap, max_rank,
                        HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, SEG_P2: tl.constexpr, IEEE: tl.constexpr,
                        SINGLE: tl.constexpr):
    hh = tl.program_id(0)                                   # q heads, then k heads, then v heads
    sl = (hh >= HQ).to(tl.int32) + (hh >= HQ + HK).to(tl.int32)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < T
    d = tl.arange(0, HALF_P2)
    dm = d < HALF
    col = hh * (2 * HALF) + d
    m = row_ok[:, None] & dm[None, :]
    dt = qkv_ptr.dtype.element_ty
    p1 = qkv_ptr + rows[:, None] * stride_t + col[None, :]
    x1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=m, other=0.0).to(tl.float32)
    tslot = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
    slots, nseg = _segments(seg_slot_ptr, seg_cap, SEG_P2)
    rank_v = _per_segment(ranks_ptr, slots, 3, sl)
    scal_v = _per_segment(scal_ptr, slots, 3, sl)
    h = _load_h(h_ptr + sl * stride_hs, stride_ht, rows, row_ok, max_rank, BLOCK_R)
    zero = tl.zeros((BLOCK_M, HALF_P2), dtype=tl.float32)
    x1 = (x1 + _expand_tile(zero, h, tslot, slots, nseg, rank_v, scal_v, b_ptr, stride_bs, stride_br, col, dm,
                            BLOCK_R, SEG_P2, IEEE, SINGLE)).to(dt).to(tl.float32)
    x2 = (x2 + _expand_tile(zero, h, tslot, slots, nseg, rank_v, scal_v, b_ptr, stride_bs, stride_br, col + HALF,
                            dm, BLOCK_R, SEG_P2, IEEE, SINGLE)).to(dt).to(tl.float32)
    if hh < HQ + HK:
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
        cos = tl.load(cos_ptr + pos[:, None] * stride_c + d[None, :], mask=m, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos[:, None] * stride_c + d[None, :], mask=m, other=0.0).to(tl.float32)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    tl.store(p1, x1.to(dt), mask=m)
    tl.store(p1 + HALF, x2.to(dt), mask=m)


@triton.jit
def _silu_mul_lora_kernel(gu_ptr, out_ptr, slot_ptr, seg_slot_ptr, hg_ptr, bg_ptr, rank_g_ptr, scal_g_ptr,
                          a_ptr, rank_d_ptr, hd_ptr, T, n, stride_g, stride_o, stride_hgs, stride_hgt, stride_bgs,
                          stride_bgr, stride_as, stride_ar, stride_hdt, seg_cap, max_rank,
                          EXPAND: tl.constexpr, SHRINK: tl.constexpr, BLOCK_M: tl.constexpr, BN: tl.constexpr,
                          BLOCK_R: tl.constexpr, SEG_P2: tl.constexpr, NATIVE: tl.constexpr, IEEE: tl.constexpr,
                          SINGLE: tl.constexpr):
    rows, row_ok, cols, col_ok, m = _tile(T, n, BLOCK_M, BN)
    dt = out_ptr.dtype.element_ty
    g = tl.load(gu_ptr + rows[:, None] * stride_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + rows[:, None] * stride_g + n + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tslot = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
    slots, nseg = _segments(seg_slot_ptr, seg_cap, SEG_P2)
    if EXPAND:
        zero = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        g = g + _expand_tile(zero, _load_h(hg_ptr, stride_hgt, rows, row_ok, max_rank, BLOCK_R), tslot, slots, nseg,
                             _per_segment(rank_g_ptr, slots, 2, 0), _per_segment(scal_g_ptr, slots, 2, 0),
                             bg_ptr, stride_bgs, stride_bgr, cols, col_ok, BLOCK_R, SEG_P2, IEEE, SINGLE)
        u = u + _expand_tile(zero, _load_h(hg_ptr + stride_hgs, stride_hgt, rows, row_ok, max_rank, BLOCK_R), tslot,
                             slots, nseg, _per_segment(rank_g_ptr, slots, 2, 1), _per_segment(scal_g_ptr, slots, 2, 1),
                             bg_ptr, stride_bgs, stride_bgr, n + cols, col_ok, BLOCK_R, SEG_P2, IEEE, SINGLE)
        g = g.to(dt).to(tl.float32)
        u = u.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g)) * u).to(dt)
    if SHRINK:
        acc = _shrink_tile(act, tslot, slots, nseg, _per_segment(rank_d_ptr, slots, 1, 0), a_ptr, stride_as,
                           stride_ar, cols, col_ok, BLOCK_M, BLOCK_R, SEG_P2, NATIVE, IEEE, SINGLE)
        _add_h(hd_ptr, stride_hdt, rows, row_ok, max_rank, acc, BLOCK_R)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], act, mask=m)     # after the weight loads


@triton.jit
def _shrink_cols_kernel(x_ptr, a_ptr, ranks_ptr, slot_ptr, seg_slot_ptr, h_ptr, T, n, stride_x, stride_as, stride_ai,
                        stride_ar, stride_hs, stride_ht, seg_cap, max_rank, N_SLICES: tl.constexpr,
                        BLOCK_M: tl.constexpr, BN: tl.constexpr, BLOCK_R: tl.constexpr, SEG_P2: tl.constexpr,
                        NATIVE: tl.constexpr, IEEE: tl.constexpr, SINGLE: tl.constexpr):
    rows, row_ok, cols, col_ok, m = _tile(T, n, BLOCK_M, BN)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    tslot = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
    slots, nseg = _segments(seg_slot_ptr, seg_cap, SEG_P2)
    for sl in tl.static_range(N_SLICES):
        acc = _shrink_tile(x, tslot, slots, nseg, _per_segment(ranks_ptr, slots, N_SLICES, sl), a_ptr + sl * stride_ai,
                           stride_as, stride_ar, cols, col_ok, BLOCK_M, BLOCK_R, SEG_P2, NATIVE, IEEE, SINGLE)
        _add_h(h_ptr + sl * stride_hs, stride_ht, rows, row_ok, max_rank, acc, BLOCK_R)


# ----------------------------------------------------------------------------- host side

def _consts(x: torch.Tensor, meta: LoRAMeta, max_rank: int) -> dict:
    t = x.shape[0]
    if t > MAX_TOKENS:
        raise ValueError(f"fused LoRA takes at most {MAX_TOKENS} tokens a step, got {t}")
    return dict(BLOCK_M=max(16, triton.next_power_of_2(t)), BLOCK_R=max(16, triton.next_power_of_2(max_rank)),
                SEG_P2=max(2, triton.next_power_of_2(meta.seg_slot.numel())), IEEE=not native_dot(x.dtype),
                SINGLE=meta.num_segments == 1)


def _block_n(t: int) -> int:
    return 128 if t <= 32 else 64


def _check_family(name: str, fam, n_in: int | None, n_out: int | None, slices: int) -> None:
    a, b = fam.lora_a, fam.lora_b
    if a.dim() != 4 or not a.is_contiguous() or a.shape[1] != slices or (n_in is not None and a.shape[3] != n_in):
        raise ValueError(f"{name}: lora_a must be contiguous [slots, {slices}, max_rank, {n_in}], got {tuple(a.shape)}")
    if b.dim() != 3 or not b.is_contiguous() or b.shape[:2] != (a.shape[0], a.shape[2]) \
            or (n_out is not None and b.shape[2] != n_out):
        raise ValueError(f"{name}: lora_b must be contiguous [{a.shape[0]}, {a.shape[2]}, {n_out}], "
                         f"got {tuple(b.shape)}")
    for what, v, dtype in (("ranks", fam.ranks, torch.int32), ("scalings", fam.scalings, torch.float32)):
        if v.shape != (a.shape[0], slices) or v.dtype != dtype or not v.is_contiguous():
            raise ValueError(f"{name}: {what} must be contiguous {dtype} [{a.shape[0]}, {slices}], got "
                             f"{v.dtype} {tuple(v.shape)}")


def _check_h(name: str, h: torch.Tensor, slices: int, t: int, fam) -> None:
    want = (slices, t, fam.lora_a.shape[2])
    if h.dtype != torch.float32 or tuple(h.shape) != want or h.stride(2) != 1:
        raise ValueError(f"{name}: h must be float32 {list(want)} with unit last stride, got {h.dtype} {tuple(h.shape)}")


def _check_meta(meta: LoRAMeta, t: int) -> None:
    if meta.token_slot.numel() < t or meta.token_slot.dtype != torch.int32:
        raise ValueError(f"the LoRA metadata holds {meta.token_slot.numel()} tokens, the step {t}")


def norm_lora(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, meta: LoRAMeta, *,
              expand: tuple[torch.Tensor, object] | None = None,
              shrink: tuple[torch.Tensor, object] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, s): s = expand(x) + residual, out = w * rmsnorm(s), and h_shrink += out @ A.T.

    ``expand`` = (h [1, T, R], one-slice family): x[t] += scaling * h[t] @ B[slot(t)]
    first, rounded to x's dtype. ``shrink`` = (h_out [n_slices, T, R] zeroed, family).
    Without residual and expand, s is x itself.
    """
    check_norm_args(x, residual, weight)
    t, n = x.shape
    _check_meta(meta, t)
    he, fe = expand if expand is not None else (None, None)
    hs, fs = shrink if shrink is not None else (None, None)
    if fe is not None:
        _check_family("expand", fe, None, n, 1)
        _check_h("expand", he, 1, t, fe)
    if fs is not None:
        _check_family("shrink", fs, n, None, fs.lora_a.shape[1])
        _check_h("shrink", hs, fs.lora_a.shape[1], t, fs)
    max_rank = (fe or fs).lora_a.shape[2] if (fe or fs) is not None else 16
    k = _consts(x, meta, max_rank)
    bn = _block_n(t)
    chunks = triton.cdiv(n, bn)
    out = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None or fe is not None else x
    sq = torch.empty((chunks, k["BLOCK_M"]), dtype=torch.float32, device=x.device)
    if not t:
        return out, s
    seg_cap = meta.seg_slot.numel()
    _expand_add_kernel[(chunks,)](
        x, residual if residual is not None else x, s, sq, meta.token_slot, meta.seg_slot,
        he if fe is not None else sq, fe.lora_b if fe is not None else x,
        fe.ranks if fe is not None else meta.token_slot, fe.scalings if fe is not None else sq,
        t, n, x.stride(0), residual.stride(0) if residual is not None else 0, s.stride(0),
        he.stride(1) if fe is not None else 0, *(fe.lora_b.stride()[:2] if fe is not None else (0, 0)), seg_cap,
        max_rank, HAS_RES=residual is not None, EXPAND=fe is not None, BN=bn, num_warps=4, **k)
    _norm_shrink_kernel[(chunks,)](
        s, weight, out, sq, meta.token_slot, meta.seg_slot, fs.lora_a if fs is not None else x,
        fs.ranks if fs is not None else meta.token_slot, hs if fs is not None else sq,
        t, n, chunks, s.stride(0), out.stride(0), *(fs.lora_a.stride()[:3] if fs is not None else (0, 0, 0)),
        *(hs.stride()[:2] if fs is not None else (0, 0)), seg_cap, max_rank, eps,
        SHRINK=fs is not None, N_SLICES=fs.lora_a.shape[1] if fs is not None else 1, BN=bn,
        CH_P2=triton.next_power_of_2(chunks), NATIVE=native_dot(x.dtype), num_warps=4, num_stages=3, **k)
    return out, s


def rotary_lora_(qkv: torch.Tensor, h: torch.Tensor, fam, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, meta: LoRAMeta, num_heads: int, num_kv_heads: int) -> None:
    """In place on qkv [T, (HQ + 2 HK) * D]: q, k, v += LoRA expand (rounded), then rotary on q and k."""
    if qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.dtype not in _DTYPES:
        raise ValueError(f"qkv must be 2-D with unit column stride, got {tuple(qkv.shape)}")
    t, width = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    if width % heads or (width // heads) % 2:
        raise ValueError(f"qkv width {width} is not {heads} heads of an even head_dim")
    dim = width // heads
    _check_family("qkv", fam, None, width, 3)
    _check_h("qkv", h, 3, t, fam)
    _check_meta(meta, t)
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != dim or cos.stride(1) != 1:
        raise ValueError(f"cos/sin must be [max_pos, {dim}], got {tuple(cos.shape)}")
    if positions.shape != (t,):
        raise ValueError(f"positions must be [{t}], got {tuple(positions.shape)}")
    k = _consts(qkv, meta, fam.lora_a.shape[2])
    if t:
        _rotary_lora_kernel[(heads,)](
            qkv, cos, sin, positions, meta.token_slot, meta.seg_slot, h, fam.lora_b, fam.ranks, fam.scalings,
            t, qkv.stride(0), cos.stride(0), h.stride(0), h.stride(1), *fam.lora_b.stride()[:2],
            meta.seg_slot.numel(), fam.lora_a.shape[2], HQ=num_heads, HK=num_kv_heads, HALF=dim // 2,
            HALF_P2=max(16, triton.next_power_of_2(dim // 2)), num_warps=4, num_stages=3, **k)


def silu_mul_lora(gate_up: torch.Tensor, meta: LoRAMeta, *, expand: tuple[torch.Tensor, object] | None = None,
                  shrink: tuple[torch.Tensor, object] | None = None) -> torch.Tensor:
    """act = silu(g) * u after gate_up += expand (rounded); h_down += act @ A_down.T."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1 or gate_up.dtype not in _DTYPES:
        raise ValueError(f"gate_up must be [T, 2I] with unit column stride, got {tuple(gate_up.shape)}")
    t, n2 = gate_up.shape
    n = n2 // 2
    _check_meta(meta, t)
    hg, fg = expand if expand is not None else (None, None)
    hd, fd = shrink if shrink is not None else (None, None)
    if fg is not None:
        _check_family("gate_up", fg, None, n2, 2)
        _check_h("gate_up", hg, 2, t, fg)
    if fd is not None:
        _check_family("down", fd, n, None, 1)
        _check_h("down", hd, 1, t, fd)
    max_rank = (fg or fd).lora_a.shape[2] if (fg or fd) is not None else 16
    k = _consts(gate_up, meta, max_rank)
    bn = _block_n(t)
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t:
        _silu_mul_lora_kernel[(triton.cdiv(n, bn),)](
            gate_up, out, meta.token_slot, meta.seg_slot, hg if fg is not None else out,
            fg.lora_b if fg is not None else out, fg.ranks if fg is not None else meta.token_slot,
            fg.scalings if fg is not None else out, fd.lora_a if fd is not None else out,
            fd.ranks if fd is not None else meta.token_slot, hd if fd is not None else out,
            t, n, gate_up.stride(0), out.stride(0), *(hg.stride()[:2] if fg is not None else (0, 0)),
            *(fg.lora_b.stride()[:2] if fg is not None else (0, 0)),
            fd.lora_a.stride(0) if fd is not None else 0, fd.lora_a.stride(2) if fd is not None else 0,
            hd.stride(1) if fd is not None else 0, meta.seg_slot.numel(), max_rank,
            EXPAND=fg is not None, SHRINK=fd is not None, BN=bn, NATIVE=native_dot(gate_up.dtype), num_warps=4,
            num_stages=3, **k)
    return out


def shrink_cols(x: torch.Tensor, h: torch.Tensor, fam, meta: LoRAMeta) -> None:
    """h[i, t] += x[t] @ A[slot(t), i, :r].T, one program per column tile of x (h zeroed by the caller)."""
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be 2-D with unit column stride, got {tuple(x.shape)}")
    t, n = x.shape
    slices = fam.lora_a.shape[1]
    _check_family("shrink", fam, n, None, slices)
    _check_h("shrink", h, slices, t, fam)
    _check_meta(meta, t)
    k = _consts(x, meta, fam.lora_a.shape[2])
    bn = _block_n(t)
    if t:
        _shrink_cols_kernel[(triton.cdiv(n, bn),)](
            x, fam.lora_a, fam.ranks, meta.token_slot, meta.seg_slot, h, t, n, x.stride(0),
            *fam.lora_a.stride()[:3], h.stride(0), h.stride(1), meta.seg_slot.numel(), fam.lora_a.shape[2],
            N_SLICES=slices, BN=bn, NATIVE=native_dot(x.dtype), num_warps=4, num_stages=3, **k)
