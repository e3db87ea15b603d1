"""Plain-torch reference for grouped (SGMV) LoRA: the semantics every backend follows.

One LoRA "family" is the LoRA of one fused projection of one layer (qkv, gate_up,
o or down). Its weights for all GPU slots are stacked:

    lora_a:   [num_slots, n_slices, max_rank, in_features]   A of slice i, rows 0..rank-1 used
    lora_b:   [num_slots, max_rank, out_features]            B^T of all slices side by side
    ranks:    [num_slots, n_slices] int32                    0 = slot empty or slice not targeted
    scalings: [num_slots, n_slices] float32                  alpha / r (or alpha / sqrt(r) for rsLoRA)
    out_offsets: n_slices + 1 column offsets of the slices in out_features

Semantics, for every token t with slot s = token_slot[t] >= 0 and slice i, r = ranks[s, i]:

    h[i, t, :r] = x[t] @ lora_a[s, i, :r].T                                        (shrink, fp32)
    y[t, o_i:o_{i+1}] += scalings[s, i] * h[i, t, :r] @ lora_b[s, :r, o_i:o_{i+1}]   (expand)

Tokens with no slot are left untouched; ranks above r are never read.
"""
from __future__ import annotations

import torch

from kernels.lora_meta import LoRAMeta


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, ranks_cpu: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
    """h[i, t, :r] = x[t] @ A[slot(t), i, :r].T, fp32; returns h [n_slices, T, max_rank]."""
    n_slices, max_rank = lora_a.shape[1], lora_a.shape[2]
    h = torch.zeros((n_slices, x.shape[0], max_rank), dtype=torch.float32, device=x.device)
    for idx, slot in _segments(meta):
        xs = x[idx].float()
        for i in range(n_slices):
            r = int(ranks_cpu[slot, i])
            if r:
                h[i, idx, :r] = xs @ lora_a[slot, i, :r].float().T
    return h


def lora_expand_ref(h: torch.Tensor, lora_b: torch.Tensor, ranks_cpu: torch.Tensor, scalings_cpu: torch.Tensor,
                    out_offsets: tuple[int, ...], meta: LoRAMeta, y: torch.Tensor) -> torch.Tensor:
    """y[t, o_i:o_i+1] += scaling[slot, i] * h[i, t, :r] @ B[slot, :r, o_i:o_i+1], in place; returns y."""
    for idx, slot in _segments(meta):
        for i in range(len(out_offsets) - 1):
            r = int(ranks_cpu[slot, i])
            if not r:
                continue
            lo, hi = out_offsets[i], out_offsets[i + 1]
            delta = (h[i, idx, :r] @ lora_b[slot, :r, lo:hi].float()) * float(scalings_cpu[slot, i])
            y[idx, lo:hi] = (y[idx, lo:hi].float() + delta).to(y.dtype)
    return y


def _segments(meta: LoRAMeta):
    if meta.no_lora:
        return
    indptr = meta.seg_indptr[: meta.num_segments + 1].tolist()
    slots = meta.seg_slot[: meta.num_segments].tolist()
    sorted_idx = meta.sorted_idx[: meta.num_tokens].long()
    for k, slot in enumerate(slots):
        yield sorted_idx[indptr[k]: indptr[k + 1]], slot
