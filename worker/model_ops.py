"""The model's non-GEMM ops behind one interface: plain-torch references (CPU) or Triton kernels (GPU).

write_kv / attention over the paged cache, RMSNorm with the residual add fused
in, rotary embedding, SiLU-mul. Both backends compute the same function
(kernels/*_torch.py hold the semantics).
"""
from __future__ import annotations

import torch

from kernels.attention_torch import paged_attention_ref, write_kv_ref
from kernels.fused_torch import add_rms_norm_ref, rms_norm_ref, rotary_ref, silu_mul_ref


class TorchOps:
    name = "torch"

    @staticmethod
    def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)

    @staticmethod
    def attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale: float,
                  max_q_len: int) -> torch.Tensor:
        return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale)

    @staticmethod
    def add_rms_norm(x, residual, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm_ref(x, weight, eps), x
        return add_rms_norm_ref(x, residual, weight, eps)

    @staticmethod
    def rotary(q, k, cos, sin, positions) -> tuple[torch.Tensor, torch.Tensor]:
        c, s = cos[positions], sin[positions]
        return rotary_ref(q, c, s), rotary_ref(k, c, s)

    @staticmethod
    def silu_mul(gate_up) -> torch.Tensor:
        return silu_mul_ref(gate_up)


class TritonOps:
    name = "triton"

    def __init__(self):
        from kernels import fused, paged_attention
        self._attn = paged_attention
        self._fused = fused

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        self._attn.write_kv(k, v, k_cache, v_cache, slot_mapping)

    def attention(self, q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale: float,
                  max_q_len: int) -> torch.Tensor:
        return self._attn.paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale,
                                          max_seqlen_q=max_q_len)

    def add_rms_norm(self, x, residual, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fused.add_rms_norm(x, residual, weight, eps)

    def rotary(self, q, k, cos, sin, positions) -> tuple[torch.Tensor, torch.Tensor]:
        self._fused.rotary_(q, k, cos, sin, positions)      # in place: q and k are views of the qkv output
        return q, k

    def silu_mul(self, gate_up) -> torch.Tensor:
        return self._fused.silu_mul(gate_up)


def make_ops(kind: str):
    if kind == "torch":
        return TorchOps()
    if kind == "triton":
        return TritonOps()
    raise ValueError(f"unknown ops backend {kind!r} (torch, triton)")
