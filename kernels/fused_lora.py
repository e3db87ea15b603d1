"""LoRA folded into the small fused ops of a decode step: no LoRA launches of its own but one.

A decode step applies LoRA 4 times a layer (qkv, o, gate_up, down). With
separate shrink and expand kernels that is 8 launches a layer, 256 a step, and
at batch 32 their fixed latency, not their bytes, is what LoRA costs
(bench/NOTES-kernels.md). Each shrink and each expand here rides in a kernel
the step runs anyway, next to the projection's input or output:

    input norm   add_rms_norm + expand of the previous down + shrink of qkv
    rotary       expand of qkv (q, k before rotation; v too) + rotary, in place
    (o shrink)   the one extra launch: attention's output has no row-wise kernel to join
    post norm    add_rms_norm + expand of o + shrink of gate_up
    SiLU-mul     expand of gate_up + silu(g) * u + shrink of down

Every kernel works on one token row (or a chunk of one): the row's slot picks
its adapter, so adapters mix freely and a row without LoRA reads no LoRA bytes.
A shrink writes partial sums ``hp[P, n_slices, T, max_rank]`` (float32, one
per column chunk, no atomics and no zeroed buffer); the expand that consumes
them adds the P partials. Entries past a slot's rank are never written or read.

Semantics (``kernels/fused_lora_torch.py``) are those of the unfused path:
the expanded projection output is rounded to the model dtype before the op
that follows, exactly as if ``lora_apply`` had updated it in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
def _row_slot(slot_ptr, row):
    s = tl.load(slot_ptr + row)
    return tl.maximum(s, 0).to(tl.int64), s >= 0


@triton.jit
def _rank(ranks_ptr, slot, has, n_slices, sl):
    return tl.where(has, tl.load(ranks_ptr + slot * n_slices + sl), 0)


@triton.jit
def _h_sum(hp_ptr, stride_hp, stride_hs, stride_ht, sl, row, rank, P, P_P2: tl.constexpr, BLOCK_R: tl.constexpr):
    """h[sl, row, :] summed over the P partials; 0 past ``rank``."""
    p = tl.arange(0, P_P2)[:, None]
    r = tl.arange(0, BLOCK_R)[None, :]
    h = tl.load(hp_ptr + p * stride_hp + sl * stride_hs + row * stride_ht + r, mask=(p < P) & (r < rank), other=0.0)
    return tl.sum(h, axis=0)


@triton.jit
def _delta(b_ptr, stride_br, h, rank, cols, col_ok, BLOCK_R: tl.constexpr):
    """sum_r h[r] * B[r, cols] (B already offset to the row's slot), float32."""
    r = tl.arange(0, BLOCK_R)
    b = tl.load(b_ptr + r[:, None] * stride_br + cols[None, :], mask=(r < rank)[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    return tl.sum(h[:, None] * b, axis=0)


@triton.jit
def _shrink_rows(ranks_ptr, slot, has, n_slices, S_P2: tl.constexpr, BLOCK_R: tl.constexpr):
    """Flat (slice, rank row) index of a shrink tile and which of its rows the row's adapter has."""
    j = tl.arange(0, S_P2 * BLOCK_R)
    j_sl = j // BLOCK_R
    j_r = j % BLOCK_R
    rank = tl.load(ranks_ptr + slot * n_slices + j_sl, mask=j_sl < n_slices, other=0) * has.to(tl.int32)
    return j_sl, j_r, j_r < rank


@triton.jit
def _shrink_part(a_ptr, stride_ai, stride_ar, j_sl, j_r, j_ok, x, cols, col_ok):
    """sum_k A[j_sl, j_r, cols] * x[cols] for every (slice, rank row) j; A offset to the row's slot."""
    a = tl.load(a_ptr + j_sl[:, None] * stride_ai + j_r[:, None] * stride_ar + cols[None, :],
                mask=j_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return tl.sum(a * x[None, :], axis=1)


@triton.jit
def _store_h(hp_ptr, part, stride_hp, stride_hs, stride_ht, row, j_sl, j_r, j_ok, acc):
    tl.store(hp_ptr + part * stride_hp + j_sl * stride_hs + row * stride_ht + j_r, acc, mask=j_ok)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _norm_lora_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, slot_ptr,
                      he_ptr, be_ptr, rank_e_ptr, scal_e_ptr, a_ptr, rank_s_ptr, hs_ptr,
                      stride_x, stride_r, stride_o, stride_ro,
                      stride_hep, stride_hes, stride_het, stride_bes, stride_ber, P_E,
                      stride_as, stride_ai, stride_ar, stride_hsp, stride_hss, stride_hst, n_slices_s,
                      n, eps, KC,
                      HAS_RES: tl.constexpr, EXPAND: tl.constexpr, SHRINK: tl.constexpr,
                      BK: tl.constexpr, BLOCK_R: tl.constexpr, PE_P2: tl.constexpr, S_P2: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    slot, has = _row_slot(slot_ptr, row)
    offs = tl.arange(0, BK)
    lo = part * KC
    dt = out_ptr.dtype.element_ty
    if EXPAND:
        rank_e = _rank(rank_e_ptr, slot, has, 1, 0)
        h_e = _h_sum(he_ptr, stride_hep, stride_hes, stride_het, 0, row, rank_e, P_E, PE_P2, BLOCK_R)
        h_e = h_e * tl.load(scal_e_ptr + slot)
    # pass 1, the whole row (every part needs the full sum of squares): s = (x + delta) + residual
    sq = tl.zeros((BK,), dtype=tl.float32)
    for c0 in range(0, n, BK):
        cols = c0 + offs
        ok = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if EXPAND:
            x = (x + _delta(be_ptr + slot * stride_bes, stride_ber, h_e, rank_e, cols, ok, BLOCK_R)).to(dt)
            x = x.to(tl.float32)
        if HAS_RES:
            x = (x + tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)).to(dt)
            x = x.to(tl.float32)
        if HAS_RES or EXPAND:
            mine = ok & (cols >= lo) & (cols < lo + KC)
            tl.store(res_ptr + row * stride_ro + cols, x.to(dt), mask=mine)
        sq += x * x
    rstd = tl.rsqrt(tl.sum(sq, axis=0) / n + eps)
    tl.debug_barrier()                   # this program's residual chunk, stored above, is read back below
    if SHRINK:
        j_sl, j_r, j_ok = _shrink_rows(rank_s_ptr, slot, has, n_slices_s, S_P2, BLOCK_R)
        acc = tl.zeros((S_P2 * BLOCK_R,), dtype=tl.float32)
    # pass 2, this part's columns: out = w * rmsnorm(s), and its share of the next shrink
    for c0 in range(lo, lo + KC, BK):
        cols = c0 + offs
        ok = cols < n
        if HAS_RES or EXPAND:
            s = tl.load(res_ptr + row * stride_ro + cols, mask=ok, other=0.0).to(tl.float32)
        else:
            s = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        y = (w * (s * rstd).to(dt).to(tl.float32)).to(dt)
        tl.store(out_ptr + row * stride_o + cols, y, mask=ok)
        if SHRINK:
            acc += _shrink_part(a_ptr + slot * stride_as, stride_ai, stride_ar, j_sl, j_r, j_ok, y.to(tl.float32),
                                cols, ok)
    if SHRINK:
        _store_h(hs_ptr, part, stride_hsp, stride_hss, stride_hst, row, j_sl, j_r, j_ok, acc)


@triton.jit
def _rotary_lora_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, hp_ptr, b_ptr, ranks_ptr, scal_ptr,
                        stride_t, stride_c, stride_hp, stride_hs, stride_ht, stride_bs, stride_br, P,
                        HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
                        BLOCK_R: tl.constexpr, P_P2: tl.constexpr):
    t = tl.program_id(0)
    hh = tl.program_id(1)                                   # q heads, then k heads, then v heads
    sl = (hh >= HQ).to(tl.int32) + (hh >= HQ + HK).to(tl.int32)
    slot, has = _row_slot(slot_ptr, t)
    rank = _rank(ranks_ptr, slot, has, 3, sl)
    h = _h_sum(hp_ptr, stride_hp, stride_hs, stride_ht, sl, t, rank, P, P_P2, BLOCK_R)
    h = h * tl.load(scal_ptr + slot * 3 + sl)
    d = tl.arange(0, HALF_P2)
    dm = d < HALF
    col = hh * (2 * HALF) + d
    base = qkv_ptr + t * stride_t
    dt = qkv_ptr.dtype.element_ty
    b_row = b_ptr + slot * stride_bs
    x1 = tl.load(base + col, mask=dm, other=0.0).to(tl.float32)
    x2 = tl.load(base + col + HALF, mask=dm, other=0.0).to(tl.float32)
    x1 = (x1 + _delta(b_row, stride_br, h, rank, col, dm, BLOCK_R)).to(dt).to(tl.float32)
    x2 = (x2 + _delta(b_row, stride_br, h, rank, col + HALF, dm, BLOCK_R)).to(dt).to(tl.float32)
    if hh < HQ + HK:
        pos = tl.load(pos_ptr + t)
        cos = tl.load(cos_ptr + pos * stride_c + d, mask=dm, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_c + d, mask=dm, other=0.0).to(tl.float32)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    tl.store(base + col, x1.to(dt), mask=dm)
    tl.store(base + col + HALF, x2.to(dt), mask=dm)


@triton.jit
def _silu_mul_lora_kernel(gu_ptr, out_ptr, slot_ptr, hg_ptr, bg_ptr, rank_g_ptr, scal_g_ptr,
                          a_ptr, rank_d_ptr, hd_ptr,
                          stride_g, stride_o, stride_hgp, stride_hgs, stride_hgt, stride_bgs, stride_bgr, P_G,
                          stride_as, stride_ar, stride_hdp, stride_hdt, n, CPP,
                          EXPAND: tl.constexpr, SHRINK: tl.constexpr,
                          BK: tl.constexpr, BLOCK_R: tl.constexpr, PG_P2: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    slot, has = _row_slot(slot_ptr, row)
    offs = tl.arange(0, BK)
    dt = out_ptr.dtype.element_ty
    if EXPAND:
        rank_g = _rank(rank_g_ptr, slot, has, 2, 0)
        rank_u = _rank(rank_g_ptr, slot, has, 2, 1)
        h_g = _h_sum(hg_ptr, stride_hgp, stride_hgs, stride_hgt, 0, row, rank_g, P_G, PG_P2, BLOCK_R)
        h_u = _h_sum(hg_ptr, stride_hgp, stride_hgs, stride_hgt, 1, row, rank_u, P_G, PG_P2, BLOCK_R)
        h_g = h_g * tl.load(scal_g_ptr + slot * 2)
        h_u = h_u * tl.load(scal_g_ptr + slot * 2 + 1)
        b_row = bg_ptr + slot * stride_bgs
    if SHRINK:
        j_sl, j_r, j_ok = _shrink_rows(rank_d_ptr, slot, has, 1, 1, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    lo = part * CPP
    for c0 in range(lo, lo + CPP, BK):
        cols = c0 + offs
        ok = cols < n
        g = tl.load(gu_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_g + n + cols, mask=ok, other=0.0).to(tl.float32)
        if EXPAND:
            g = (g + _delta(b_row, stride_bgr, h_g, rank_g, cols, ok, BLOCK_R)).to(dt).to(tl.float32)
            u = (u + _delta(b_row, stride_bgr, h_u, rank_u, n + cols, ok, BLOCK_R)).to(dt).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g)) * u).to(dt)
        tl.store(out_ptr + row * stride_o + cols, act, mask=ok)
        if SHRINK:
            acc += _shrink_part(a_ptr + slot * stride_as, 0, stride_ar, j_sl, j_r, j_ok, act.to(tl.float32), cols, ok)
    if SHRINK:
        _store_h(hd_ptr, part, stride_hdp, 0, stride_hdt, row, j_sl, j_r, j_ok, acc)


@triton.jit
def _shrink_rows_kernel(x_ptr, a_ptr, ranks_ptr, slot_ptr, hp_ptr, stride_x, stride_as, stride_ai, stride_ar,
                        stride_hp, stride_hs, stride_ht, n, n_slices, KC,
                        BK: tl.constexpr, BLOCK_R: tl.constexpr, S_P2: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    slot, has = _row_slot(slot_ptr, row)
    j_sl, j_r, j_ok = _shrink_rows(ranks_ptr, slot, has, n_slices, S_P2, BLOCK_R)
    acc = tl.zeros((S_P2 * BLOCK_R,), dtype=tl.float32)
    offs = tl.arange(0, BK)
    for c0 in range(part * KC, part * KC + KC, BK):
        cols = c0 + offs
        ok = cols < tl.where(has, n, 0)                    # a row without LoRA reads nothing
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        acc += _shrink_part(a_ptr + slot * stride_as, stride_ai, stride_ar, j_sl, j_r, j_ok, x, cols, ok)
    _store_h(hp_ptr, part, stride_hp, stride_hs, stride_ht, row, j_sl, j_r, j_ok, acc)


# ----------------------------------------------------------------------------- host side

def _block_r(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))


def _chunk(n_slices: int, max_rank: int) -> int:
    """Columns a shrink step takes: about 16K float32 values of A a step, whatever the slices and rank."""
    return max(64, min(512, 16384 // (triton.next_power_of_2(n_slices) * _block_r(max_rank))))


def _parts(t: int, n: int, bk: int) -> tuple[int, int]:
    """Column chunks per row (each a multiple of ``bk``): enough programs to spread a small step over the GPU."""
    parts = max(1, min(triton.cdiv(n, bk), 128 // max(t, 1)))
    kc = triton.cdiv(triton.cdiv(n, parts), bk) * bk
    return triton.cdiv(n, kc), kc


def _check_family(name: str, fam: LoRAWeights, n_in: int | None, n_out: int | None, slices: int) -> None:
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


def _check_partials(name: str, hp: torch.Tensor, slices: int, t: int, max_rank: int) -> None:
    if hp.dim() != 4 or hp.dtype != torch.float32 or hp.shape[1:] != (slices, t, max_rank) or hp.stride(3) != 1:
        raise ValueError(f"{name}: partials must be float32 [P, {slices}, {t}, {max_rank}], got "
                         f"{hp.dtype} {tuple(hp.shape)}")


def _check_slots(token_slot: torch.Tensor, t: int) -> None:
    if token_slot.dtype != torch.int32 or token_slot.dim() != 1 or token_slot.numel() < t:
        raise ValueError(f"token_slot must be int32 with at least {t} entries, got {token_slot.dtype} "
                         f"{tuple(token_slot.shape)}")


def _check_rows(name: str, x: torch.Tensor, t: int, n: int, dtype: torch.dtype) -> None:
    if x.dim() != 2 or x.shape != (t, n) or x.stride(1) != 1 or x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} [{t}, {n}] with unit column stride, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()}")


def _empty_partials(parts: int, fam: LoRAWeights, t: int, device) -> torch.Tensor:
    return torch.empty((parts, fam.lora_a.shape[1], t, fam.lora_a.shape[2]), dtype=torch.float32, device=device)


def norm_lora(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
              token_slot: torch.Tensor, *, expand: tuple[torch.Tensor, LoRAWeights] | None = None,
              shrink: LoRAWeights | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, s, hp): s = expand(x) + residual, out = w * rmsnorm(s), hp = shrink(out) partials.

    ``expand`` = (partials of h, one-slice family): x[t] += scaling * h[t] @ B first
    (rounded to x's dtype). ``shrink``: the partial sums of out[t] @ A[slot(t)].T
    for every slice. Without residual and expand, s is x itself.
    """
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be one of {_DTYPES}, got {x.dtype}")
    t, n = x.shape
    _check_rows("x", x, t, n, x.dtype)
    if residual is not None:
        _check_rows("residual", residual, t, n, x.dtype)
    if weight.shape != (n,) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous {x.dtype} [{n}], got {weight.dtype} {tuple(weight.shape)}")
    _check_slots(token_slot, t)
    he, fe = expand if expand is not None else (None, None)
    max_rank = 16
    if fe is not None:
        _check_family("expand", fe, None, n, 1)
        _check_partials("expand", he, 1, t, fe.lora_a.shape[2])
        max_rank = fe.lora_a.shape[2]
    if shrink is not None:
        _check_family("shrink", shrink, n, None, shrink.lora_a.shape[1])
        if fe is not None and shrink.lora_a.shape[2] != fe.lora_a.shape[2]:
            raise ValueError("expand and shrink families must share max_rank")
        max_rank = shrink.lora_a.shape[2]
    s_p2 = triton.next_power_of_2(shrink.lora_a.shape[1]) if shrink is not None else 1
    bk = _chunk(s_p2, max_rank) if shrink is not None else 512
    parts, kc = _parts(t, n, bk) if shrink is not None else (1, triton.cdiv(n, bk) * bk)
    out = torch.empty_like(x)
    res = torch.empty_like(x) if residual is not None or fe is not None else x
    hs = _empty_partials(parts, shrink, t, x.device) if shrink is not None else None
    if t:
        dummy = x
        _norm_lora_kernel[(t, parts)](
            x, residual if residual is not None else x, weight, out, res, token_slot,
            he if fe is not None else dummy, fe.lora_b if fe is not None else dummy,
            fe.ranks if fe is not None else token_slot, fe.scalings if fe is not None else dummy,
            shrink.lora_a if shrink is not None else dummy, shrink.ranks if shrink is not None else token_slot,
            hs if hs is not None else dummy,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), res.stride(0),
            *(he.stride()[:3] if fe is not None else (0, 0, 0)), *(fe.lora_b.stride()[:2] if fe is not None else (0, 0)),
            he.shape[0] if fe is not None else 1,
            *(shrink.lora_a.stride()[:3] if shrink is not None else (0, 0, 0)),
            *(hs.stride()[:3] if hs is not None else (0, 0, 0)), shrink.lora_a.shape[1] if shrink is not None else 1,
            n, eps, kc,
            HAS_RES=residual is not None, EXPAND=fe is not None, SHRINK=shrink is not None,
            BK=bk, BLOCK_R=_block_r(max_rank), PE_P2=triton.next_power_of_2(he.shape[0]) if fe is not None else 1,
            S_P2=s_p2, num_warps=8 if n >= 2048 else 4)
    return out, res, hs


def rotary_lora_(qkv: torch.Tensor, hp: torch.Tensor, fam: LoRAWeights, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, token_slot: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """In place on qkv [T, (HQ + 2 HK) * D]: q, k, v += LoRA expand (rounded), then rotary on q and k."""
    if qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.dtype not in _DTYPES:
        raise ValueError(f"qkv must be 2-D with unit column stride, got {tuple(qkv.shape)}")
    t, width = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    if width % heads or (width // heads) % 2:
        raise ValueError(f"qkv width {width} is not {heads} heads of an even head_dim")
    dim = width // heads
    _check_family("qkv", fam, None, width, 3)
    _check_partials("qkv", hp, 3, t, fam.lora_a.shape[2])
    _check_slots(token_slot, t)
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != dim or cos.stride(1) != 1:
        raise ValueError(f"cos/sin must be [max_pos, {dim}], got {tuple(cos.shape)}")
    if positions.shape != (t,):
        raise ValueError(f"positions must be [{t}], got {tuple(positions.shape)}")
    if t:
        _rotary_lora_kernel[(t, heads)](
            qkv, cos, sin, positions, token_slot, hp, fam.lora_b, fam.ranks, fam.scalings,
            qkv.stride(0), cos.stride(0), *hp.stride()[:3], *fam.lora_b.stride()[:2], hp.shape[0],
            HQ=num_heads, HK=num_kv_heads, HALF=dim // 2, HALF_P2=triton.next_power_of_2(dim // 2),
            BLOCK_R=_block_r(fam.lora_a.shape[2]), P_P2=triton.next_power_of_2(hp.shape[0]), num_warps=1)


def silu_mul_lora(gate_up: torch.Tensor, token_slot: torch.Tensor, *,
                  expand: tuple[torch.Tensor, LoRAWeights] | None = None,
                  shrink: LoRAWeights | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act, hp): gate_up += expand (rounded), act = silu(g) * u, hp = partials of act @ A_down.T."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1 or gate_up.dtype not in _DTYPES:
        raise ValueError(f"gate_up must be [T, 2I] with unit column stride, got {tuple(gate_up.shape)}")
    t, n2 = gate_up.shape
    n = n2 // 2
    _check_slots(token_slot, t)
    hg, fg = expand if expand is not None else (None, None)
    max_rank = 16
    if fg is not None:
        _check_family("gate_up", fg, None, n2, 2)
        _check_partials("gate_up", hg, 2, t, fg.lora_a.shape[2])
        max_rank = fg.lora_a.shape[2]
    if shrink is not None:
        _check_family("down", shrink, n, None, 1)
        if fg is not None and shrink.lora_a.shape[2] != fg.lora_a.shape[2]:
            raise ValueError("expand and shrink families must share max_rank")
        max_rank = shrink.lora_a.shape[2]
    bk = _chunk(2, max_rank)
    parts, cpp = _parts(t, n, bk)
    parts = max(parts, triton.cdiv(n, 4 * bk))         # at most 4 chunk steps a program
    cpp = triton.cdiv(triton.cdiv(n, parts), bk) * bk
    parts = triton.cdiv(n, cpp)
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    hd = _empty_partials(parts, shrink, t, gate_up.device) if shrink is not None else None
    if t:
        dummy = gate_up
        _silu_mul_lora_kernel[(t, parts)](
            gate_up, out, token_slot, hg if fg is not None else dummy, fg.lora_b if fg is not None else dummy,
            fg.ranks if fg is not None else token_slot, fg.scalings if fg is not None else dummy,
            shrink.lora_a if shrink is not None else dummy, shrink.ranks if shrink is not None else token_slot,
            hd if hd is not None else dummy,
            gate_up.stride(0), out.stride(0), *(hg.stride()[:3] if fg is not None else (0, 0, 0)),
            *(fg.lora_b.stride()[:2] if fg is not None else (0, 0)), hg.shape[0] if fg is not None else 1,
            shrink.lora_a.stride(0) if shrink is not None else 0, shrink.lora_a.stride(2) if shrink is not None else 0,
            hd.stride(0) if hd is not None else 0, hd.stride(2) if hd is not None else 0, n, cpp,
            EXPAND=fg is not None, SHRINK=shrink is not None, BK=bk, BLOCK_R=_block_r(max_rank),
            PG_P2=triton.next_power_of_2(hg.shape[0]) if fg is not None else 1, num_warps=4)
    return out, hd


def shrink_rows(x: torch.Tensor, fam: LoRAWeights, token_slot: torch.Tensor) -> torch.Tensor:
    """Partials hp[P, n_slices, T, max_rank] of x[t] @ A[slot(t)].T (one program per row and column chunk)."""
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be 2-D with unit column stride, got {tuple(x.shape)}")
    t, n = x.shape
    _check_family("shrink", fam, n, None, fam.lora_a.shape[1])
    _check_slots(token_slot, t)
    s_p2 = triton.next_power_of_2(fam.lora_a.shape[1])
    bk = _chunk(s_p2, fam.lora_a.shape[2])
    parts, kc = _parts(t, n, bk)
    hp = _empty_partials(parts, fam, t, x.device)
    if t:
        _shrink_rows_kernel[(t, parts)](
            x, fam.lora_a, fam.ranks, token_slot, hp, x.stride(0), *fam.lora_a.stride()[:3], *hp.stride()[:3],
            n, fam.lora_a.shape[1], kc, BK=bk, BLOCK_R=_block_r(fam.lora_a.shape[2]), S_P2=s_p2, num_warps=4)
    return hp
