"""The norms of the fused LoRA step (``kernels/fused_lora.py``): o's expand in the post norm, down's in the
next input norm, each + residual and RMSNorm.

    norm_lora           s = x + expand + residual, out = w * rmsnorm(s): one program a row, which reads its
                        adapter's whole B (h from a GEMM's columns or from SiLU-mul's per-tile parts)
    norm_lora_unscaled  s as above, out = w * s, and the sums of squares of each row in column parts
                        (``RmsParts``): the 1/rms waits for the kernel after the next GEMM, since
                        W (w * s / rms) = (W (w * s)) / rms row by row, and so does A's (the GEMM's extra columns)

The unscaled norm needs no whole row in one program, so a program takes a tile of rows and columns: a row's
B is read in pieces by many programs, not 128 KB through one SM (at 32 tokens the row norm's programs ran
~4,000 cycles past the plain norm's, B's bytes at ~33 B a cycle; bench/NOTES-kernels.md v13). Its output is
w * s rounded to the model dtype, where transformers rounds s / rms and then w times that: the same size of
error in a different order. In float16, w * s (the residual stream, unnormalised) and its GEMM's outputs may
leave the range that s / rms keeps to, so the engine takes this norm for bfloat16 and float32 only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fused import check_norm_args, rms_norm_loaded_row
from kernels.fused_lora import (RmsParts, _block_r, _check_family, _check_h, _check_meta, _expand_rows, _expand_tile,
                                _load_h, _position, _row_slots)
from kernels.lora_meta import LoRAMeta
from kernels.mma import native_dot

NORM = (8, 16)          # norm_lora: warps, rank rows of B a tile ([16, hidden]; tuned on the H100)
NORM_UNSCALED = (32, 64, 4)     # norm_lora_unscaled: rows, columns a program, warps


@triton.jit
def _norm_lora_kernel(x_ptr, r_ptr, w_ptr, out_ptr, s_ptr, slot_ptr, pos_ptr, h_ptr, b_ptr, rank_ptr, scal_ptr,
                      n, n_parts, n_pos, stride_x, stride_r, stride_o, stride_s, stride_hp, stride_ht, stride_hpos,
                      stride_bs, stride_br, eps, HAS_RES: tl.constexpr, HAS_POS: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCK_R: tl.constexpr, P_P2: tl.constexpr, RC: tl.constexpr):
    """One row, its own adapter: s = x + expand + residual, out = w * rmsnorm(s)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cm = cols < n
    # the loads that wait on nothing go first, to overlap the chain slot -> position, rank -> h, B (issued
    # after the LoRA loads, the row with h in 224 parts took 10.1 us against 5.6; bench/NOTES-kernels.md)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
    res = x
    if HAS_RES:
        res = tl.load(r_ptr + row * stride_r + cols, mask=cm, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + row)
    use = slot >= 0
    slot = tl.maximum(slot, 0).to(tl.int64)
    h_row = h_ptr + row * stride_ht
    if HAS_POS:                                  # a position outside h (a staging bug) reads nothing
        pos, use = _position(pos_ptr, slot, use, n_pos, False)
        h_row += pos * stride_hpos
    # h summed over its parts once ([P_P2, BLOCK_R] in one load), then B in [RC, hidden] tiles
    rank = tl.where(use, tl.load(rank_ptr + slot), 0)
    p = tl.arange(0, P_P2)
    rr = tl.arange(0, BLOCK_R)
    hv = tl.sum(tl.load(h_row + p[:, None] * stride_hp + rr[None, :],
                        mask=(p < n_parts)[:, None] & (rr < rank)[None, :], other=0.0).to(tl.float32), axis=0)
    hv = tl.reshape(hv * tl.load(scal_ptr + slot), (BLOCK_R // RC, RC))
    delta = tl.zeros((BLOCK,), dtype=tl.float32)
    for rc in tl.static_range(0, BLOCK_R, RC):
        r = rc + tl.arange(0, RC)
        hc = tl.sum(tl.where((tl.arange(0, BLOCK_R // RC) == rc // RC)[:, None], hv, 0.0), axis=0)
        b = tl.load(b_ptr + slot * stride_bs + r[:, None] * stride_br + cols[None, :],
                    mask=(r < rank)[:, None] & cm[None, :], other=0.0).to(tl.float32)
        delta += tl.sum(hc[:, None] * b, axis=0)
    x = (x + delta).to(out_ptr.dtype.element_ty).to(tl.float32)
    rms_norm_loaded_row(x, res, w, row, cols, cm, out_ptr, s_ptr, stride_o, stride_s, n, eps, HAS_RES, True)


@triton.jit
def _norm_lora_unscaled_kernel(x_ptr, r_ptr, w_ptr, out_ptr, s_ptr, ssq_ptr, slot_ptr, seg_slot_ptr, pos_ptr, h_ptr,
                               b_ptr, rank_ptr, scal_ptr, T, n, n_pos, n_sq, stride_x, stride_r, stride_o, stride_s,
                               stride_ht, stride_hpos, stride_bs, stride_br, HAS_RES: tl.constexpr,
                               HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BN: tl.constexpr, BLOCK_R: tl.constexpr,
                               ONE: tl.constexpr, LOOP: tl.constexpr, NATIVE: tl.constexpr, IEEE: tl.constexpr):
    """A tile of rows (program_id 1) and columns (program_id 0): s = x + expand + residual, out = w * s,
    ssq[row, program_id 0] = sum of s^2 over the tile's columns. ONE: the step has one adapter (segment 0's),
    whose B tile loads once and multiplies on tensor cores; else each row gathers its own B rank by rank."""
    c = tl.program_id(0)
    cols = c * BN + tl.arange(0, BN)
    col_ok = cols < n
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    m = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    res = x
    if HAS_RES:
        res = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    zero = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    if ONE:
        slot = tl.load(seg_slot_ptr)
        s0 = tl.maximum(slot, 0)
        tslot = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
        use = (tslot == slot) & (tslot >= 0)
        p = 0
        if HAS_POS:
            p, use = _position(pos_ptr, s0, use, n_pos, False)
        rank = tl.where(slot >= 0, tl.load(rank_ptr + s0), 0)
        h = _load_h(h_ptr + p * stride_hpos, stride_ht, rows, use, rank, BLOCK_M, BLOCK_R)
        delta = _expand_tile(zero, h, slot, rank, tl.load(scal_ptr + s0), b_ptr, stride_bs, stride_br, cols, col_ok,
                             BLOCK_R, NATIVE, IEEE)
    else:
        s0, use = _row_slots(slot_ptr, rows, row_ok)
        h_rows = h_ptr + rows * stride_ht
        if HAS_POS:
            p, use = _position(pos_ptr, s0, use, n_pos, True)
            h_rows += p * stride_hpos
        delta = _expand_rows(zero, h_rows, tl.load(rank_ptr + s0, mask=use, other=0),
                             tl.load(scal_ptr + s0, mask=use, other=0.0), b_ptr + s0 * stride_bs, stride_br, cols,
                             col_ok, LOOP)
    dt = out_ptr.dtype.element_ty
    x = (x + delta).to(dt).to(tl.float32)
    if HAS_RES:
        x = (x + res).to(dt).to(tl.float32)
    tl.store(s_ptr + rows[:, None] * stride_s + cols[None, :], x.to(dt), mask=m)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], (w[None, :] * x).to(dt), mask=m)
    tl.store(ssq_ptr + rows * tl.num_programs(0) + c, tl.sum(x * x, axis=1), mask=row_ok)


# ----------------------------------------------------------------------------- host side

def norm_lora(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, meta: LoRAMeta,
              h: torch.Tensor, fam, tail_pos: torch.Tensor | None = None, num_warps: int = NORM[0],
              rank_chunk: int = NORM[1]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, s): s = x + expand + residual, out = w * rmsnorm(s); one program a row.

    The expand: x[t] += scaling * sum_p h[p, t, pos(t), 0] @ B[slot(t)], ``fam`` a one-slice
    family, rounded to x's dtype before the residual is added (a norm without LoRA is
    ``kernels.fused.add_rms_norm``).
    """
    check_norm_args(x, residual, weight)
    t, n = x.shape
    _check_meta(meta, t)
    _check_family("expand", fam, None, n, 1)
    _check_h("expand", h, None, t, fam, tail_pos)
    out, s = torch.empty_like(x), torch.empty_like(x)
    if t:
        _norm_lora_kernel[(t,)](
            x, residual if residual is not None else x, weight, out, s, meta.token_slot,
            tail_pos if h.stride(2) else meta.token_slot, h, fam.lora_b, fam.ranks, fam.scalings, n, h.shape[0],
            h.shape[2],
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), s.stride(0),
            *h.stride()[:3], *fam.lora_b.stride()[:2], eps, HAS_RES=residual is not None, HAS_POS=h.stride(2) != 0,
            BLOCK=triton.next_power_of_2(n), BLOCK_R=max(rank_chunk, _block_r(fam)),
            P_P2=triton.next_power_of_2(h.shape[0]), RC=rank_chunk, num_warps=num_warps)
    return out, s


def norm_lora_unscaled(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       meta: LoRAMeta, h: torch.Tensor, fam, tail_pos: torch.Tensor | None = None,
                       block_m: int | None = None, block_n: int = NORM_UNSCALED[1],
                       num_warps: int = NORM_UNSCALED[2]) -> tuple[torch.Tensor, torch.Tensor, RmsParts]:
    """(out, s, rms): s = x + expand + residual as in ``norm_lora``, out = w * s (rounded), and rms the sums of
    s^2 over each block_n columns: ``norm_lora``'s out is (out / rms(s)) up to rounding, and the consumer of
    the next GEMM's output applies that 1/rms (``rotary_lora_`` and ``silu_mul_lora`` take ``rms``).

    h [1, T, positions, 1, R]: a GEMM's extra columns (one part: SiLU-mul's parts would be summed again by
    every column tile; ``norm_lora`` takes those). A step whose h has one position holds one adapter, so its
    programs multiply one B tile on tensor cores; more positions gather each row's own B.
    """
    check_norm_args(x, residual, weight)
    t, n = x.shape
    _check_meta(meta, t)
    _check_family("expand", fam, None, n, 1)
    _check_h("expand", h, 1, t, fam, tail_pos)
    block_m = block_m or min(NORM_UNSCALED[0], max(16, triton.next_power_of_2(t)))
    parts = triton.cdiv(n, block_n)
    out, s = torch.empty_like(x), torch.empty_like(x)
    ssq = torch.empty((t, parts), dtype=torch.float32, device=x.device)
    if t:
        _norm_lora_unscaled_kernel[(parts, triton.cdiv(t, block_m))](
            x, residual if residual is not None else x, weight, out, s, ssq, meta.token_slot, meta.seg_slot,
            tail_pos if h.stride(2) else meta.token_slot, h, fam.lora_b, fam.ranks, fam.scalings, t, n, h.shape[2],
            parts, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), s.stride(0),
            h.stride(1), h.stride(2), *fam.lora_b.stride()[:2], HAS_RES=residual is not None,
            HAS_POS=h.stride(2) != 0, BLOCK_M=block_m, BN=block_n, BLOCK_R=max(16, _block_r(fam)),
            ONE=h.shape[2] == 1, LOOP=_block_r(fam) > 16,
            NATIVE=native_dot(x.dtype) and h.dtype == fam.lora_b.dtype, IEEE=not native_dot(x.dtype),
            num_warps=num_warps)
    return out, s, RmsParts(ssq, n, eps)
