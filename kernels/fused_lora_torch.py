"""Plain-torch references for ``fused_lora.py``: the unfused ops, one after another (the SGMV
references of ``lora_torch.py`` for the LoRA parts, with tokens given as a list of slots).

    shrink_ref(x, fam, slots)[i, t, :r]  = x[t] @ A[slot(t), i, :r].T                     (float32)
    token_h(h, slots, tail_pos)[i, t]     = sum_p h[p, t, tail_pos[slot(t)], i]: the h each token reads
    expand_ref(y, h, fam, offs, slots)    = y[t, slice i] + scaling * h[i, t, :r] @ B[slot(t), :r, slice i],
                                            rounded to y's dtype (rows without a slot unchanged)
    norm_lora_ref       = add_rms_norm(expand(x, h summed over its parts), residual)
    rotary_lora_ref     = expand of q/k/v, then rotary on q and k
    silu_mul_lora_ref   = expand of gate/up, then silu_mul, then shrink of the product
"""
from __future__ import annotations

import torch

from kernels.fused_torch import add_rms_norm_ref, rms_norm_ref, rotary_ref, silu_mul_ref
from kernels.lora_meta import LoRAMeta
from kernels.lora_torch import lora_expand_ref, lora_shrink_ref


def _meta(token_slot: list[int], device) -> LoRAMeta:
    slots = len({s for s in token_slot if s >= 0})
    return LoRAMeta.allocate(max(1, len(token_slot)), max(1, slots), device).fill(token_slot)


def token_h(h: torch.Tensor, token_slot: list[int], tail_pos: list[int] | None) -> torch.Tensor:
    """h [parts, T, positions, n_slices, R] as the fused kernels take it -> [n_slices, T, R] float32, each
    token's own position, summed over parts (rows without a slot: 0)."""
    out = torch.zeros((h.shape[3], h.shape[1], h.shape[4]), dtype=torch.float32, device=h.device)
    for t, slot in enumerate(token_slot):
        if slot >= 0:
            out[:, t] = h[:, t, tail_pos[slot] if h.stride(2) else 0].float().sum(0)
    return out


def shrink_ref(x: torch.Tensor, fam, token_slot: list[int]) -> torch.Tensor:
    return lora_shrink_ref(x, fam.lora_a, fam.ranks, _meta(token_slot, x.device))


def expand_ref(y: torch.Tensor, h: torch.Tensor, fam, out_offsets: tuple[int, ...],
               token_slot: list[int]) -> torch.Tensor:
    h = h[:, :, : fam.lora_a.shape[2]].float()
    return lora_expand_ref(h, fam.lora_b, fam.ranks, fam.scalings, out_offsets, _meta(token_slot, y.device),
                           y.clone())


def norm_lora_ref(x, residual, weight, eps, token_slot, h, fam, tail_pos=None):
    """(out, s); h [parts, T, positions, 1, R], ``fam`` a one-slice family."""
    x = expand_ref(x, token_h(h, token_slot, tail_pos), fam, (0, x.shape[1]), token_slot)
    if residual is None:
        out, s = rms_norm_ref(x, weight, eps), x
    else:
        out, s = add_rms_norm_ref(x, residual, weight, eps)
    return out, s


def rotary_lora_ref(qkv, h, fam, cos, sin, positions, token_slot, num_heads, num_kv_heads, tail_pos):
    t, width = qkv.shape
    h = token_h(h, token_slot, tail_pos)
    dim = width // (num_heads + 2 * num_kv_heads)
    q, kv = num_heads * dim, num_kv_heads * dim
    qkv = expand_ref(qkv, h, fam, (0, q, q + kv, q + 2 * kv), token_slot)
    c, s = cos[positions], sin[positions]
    rq = rotary_ref(qkv[:, :q].view(t, num_heads, dim), c, s).reshape(t, q)
    rk = rotary_ref(qkv[:, q:q + kv].view(t, num_kv_heads, dim), c, s).reshape(t, kv)
    return torch.cat((rq, rk, qkv[:, q + kv:]), dim=1)


def silu_mul_lora_ref(gate_up, token_slot, expand=None, shrink=None, tail_pos=None):
    """``expand``: (h [1, T, positions, 2, R], gate/up family); returns (act, h_down [1, T, R])."""
    n = gate_up.shape[1] // 2
    if expand is not None:
        gate_up = expand_ref(gate_up, token_h(expand[0], token_slot, tail_pos), expand[1], (0, n, 2 * n), token_slot)
    act = silu_mul_ref(gate_up)
    return act, shrink_ref(act, shrink, token_slot) if shrink is not None else None
