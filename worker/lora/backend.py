"""LoRA compute backends: one interface (``apply``), a torch reference and the Triton SGMV kernels."""
from __future__ import annotations

import torch

from kernels.lora_meta import LoRAMeta
from kernels.lora_torch import lora_expand_ref, lora_shrink_ref


class TorchLoRABackend:
    """Plain torch, one small GEMM per (adapter, slice): the reference, and the CPU path."""
    name = "torch"

    def apply(self, x: torch.Tensor, y: torch.Tensor, fam, meta: LoRAMeta) -> None:
        h = lora_shrink_ref(x, fam.lora_a, fam.ranks_cpu, meta)
        lora_expand_ref(h, fam.lora_b, fam.ranks_cpu, fam.scalings_cpu, fam.out_offsets, meta, y)


class TritonLoRABackend:
    """The Triton SGMV shrink/expand kernels (GPU)."""
    name = "triton"

    def __init__(self):
        from kernels import sgmv
        self._sgmv = sgmv

    def apply(self, x: torch.Tensor, y: torch.Tensor, fam, meta: LoRAMeta) -> None:
        self._sgmv.lora_apply(x, y, fam.lora_a, fam.lora_b, fam.ranks, fam.scalings, fam.out_offsets, meta)


def make_lora_backend(kind: str):
    if kind == "torch":
        return TorchLoRABackend()
    if kind == "triton":
        return TritonLoRABackend()
    raise ValueError(f"unknown LoRA backend {kind!r} (torch, triton)")
