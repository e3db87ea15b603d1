"""Plain-torch references for the small fused ops (the semantics of transformers' Llama).

    rms_norm(x, w)             = w * (x / sqrt(mean(x^2) + eps)).to(dtype)        (statistics in fp32)
    add_rms_norm(x, r, w)      = (rms_norm(x + r, w), x + r)                      (the residual stream)
    rotary(x, cos, sin)        = x * cos + rotate_half(x) * sin                   (rotate_half: [-x2, x1])
    silu_mul(gu)               = silu(gu[:, :I]) * gu[:, I:]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D] (halves repeated)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
