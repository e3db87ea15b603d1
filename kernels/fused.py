"""Triton versions of the small fused ops in ``fused_torch.py``: one launch where torch needs several.

Statistics and arithmetic in fp32, one rounding on store (the interpreter on CPU
computes bf16 wrongly, so inputs are upcast on load everywhere).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def rms_norm_loaded_row(x, res, w, row, cols, mask, out_ptr, res_out_ptr, stride_o, stride_ro, n, eps,
                        HAS_RES: tl.constexpr, STORE_S: tl.constexpr):
    """One row, its values loaded (float32; x and res hold model-dtype values): s = x + res (HAS_RES),
    out = w * rmsnorm(s), each step rounded to the model dtype; s is stored (the residual stream) when
    STORE_S. Shared by the plain norm and the LoRA norm (kernels/fused_lora.py), which loads early."""
    dt = out_ptr.dtype.element_ty
    if HAS_RES:
        x = (x + res).to(dt).to(tl.float32)
    if STORE_S:
        tl.store(res_out_ptr + row * stride_ro + cols, x.to(dt), mask=mask)
    y = (x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(dt), mask=mask)


@triton.jit
def add_rms_norm_row(x, row, cols, mask, r_ptr, w_ptr, out_ptr, res_out_ptr, stride_r, stride_o, stride_ro, n, eps,
                     HAS_RES: tl.constexpr, STORE_S: tl.constexpr):
    """One row x (float32, the model-dtype value): ``rms_norm_loaded_row`` with the residual and w loaded here."""
    res = x
    if HAS_RES:
        res = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rms_norm_loaded_row(x, res, w, row, cols, mask, out_ptr, res_out_ptr, stride_o, stride_ro, n, eps, HAS_RES,
                        STORE_S)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro, n,
                         eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    add_rms_norm_row(x, row, cols, mask, r_ptr, w_ptr, out_ptr, res_out_ptr, stride_r, stride_o, stride_ro, n, eps,
                     HAS_RES, HAS_RES)


def _check_rows(name: str, t: torch.Tensor, rows: int, n: int, dtype: torch.dtype) -> None:
    if t.dim() != 2 or t.shape != (rows, n) or t.stride(1) != 1 or t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} [{rows}, {n}] with unit column stride, "
                         f"got {t.dtype} {tuple(t.shape)} strides {t.stride()}")


def check_norm_args(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    """x, residual [T, n] with unit column stride and one float dtype; weight [n] contiguous, same dtype."""
    if x.dtype not in _DTYPES or x.dim() != 2:
        raise ValueError(f"x must be 2-D, one of {_DTYPES}, got {x.dtype} {tuple(x.shape)}")
    rows, n = x.shape
    _check_rows("x", x, rows, n, x.dtype)
    if residual is not None:
        _check_rows("residual", residual, rows, n, x.dtype)
    if weight.shape != (n,) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous {x.dtype} [{n}], got {weight.dtype} {tuple(weight.shape)}")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (or x); returns (w * rmsnorm(s), s).  x, residual [T, n]; weight [n]."""
    check_norm_args(x, residual, weight)
    rows, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if rows:
        _add_rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, res_out, x.stride(0),
            residual.stride(0) if residual is not None else 0, out.stride(0), res_out.stride(0), n, eps,
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8)
    return out, res_out


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_c, HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, H_P2: tl.constexpr,
                   HALF_P2: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF_P2)
    dm = d < HALF
    cos = tl.load(cos_ptr + pos * stride_c + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_c + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, d, dm, cos, sin, HQ, HALF, H_P2)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, d, dm, cos, sin, HK, HALF, H_P2)


@triton.jit
def _rotate_heads(base_ptr, stride_h, d, dm, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  H_P2: tl.constexpr):
    """One token's heads in place: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), halves of each head."""
    h = tl.arange(0, H_P2)[:, None]
    m = (h < NUM_HEADS) & dm[None, :]
    p1 = base_ptr + h * stride_h + d[None, :]
    x1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=m, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(base_ptr.dtype.element_ty), mask=m)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(base_ptr.dtype.element_ty), mask=m)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            positions: torch.Tensor) -> None:
    """In place: q[t], k[t] = rotary(., cos[positions[t]], sin[positions[t]]).  q [T, HQ, D], k [T, HK, D];
    cos/sin [max_pos, D] (halves repeated, as in the reference)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q [T, HQ, D] and k [T, HK, D] must agree, got {tuple(q.shape)} and {tuple(k.shape)}")
    t, hq, dim = q.shape
    hk = k.shape[1]
    if dim % 2 or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("head_dim must be even with unit stride")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != dim or cos.stride(1) != 1:
        raise ValueError(f"cos/sin must be [max_pos, {dim}], got {tuple(cos.shape)}")
    if positions.shape != (t,):
        raise ValueError(f"positions must be [{t}], got {tuple(positions.shape)}")
    if t:
        _rotary_kernel[(t,)](q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                             cos.stride(0), HQ=hq, HK=hk, HALF=dim // 2, H_P2=triton.next_power_of_2(max(hq, hk)),
                             HALF_P2=triton.next_power_of_2(dim // 2), num_warps=4)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_g, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + n + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> silu(gate_up[:, :I]) * gate_up[:, I:]  [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1 or gate_up.dtype not in _DTYPES:
        raise ValueError(f"gate_up must be [T, 2I] with unit column stride, got {tuple(gate_up.shape)}")
    t, n2 = gate_up.shape
    n = n2 // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    if t:
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n,
                                                     BLOCK=block, num_warps=4)
    return out
