"""Attention backends behind one interface: the torch reference (CPU) and the Triton kernels (GPU)."""
from __future__ import annotations

import torch

from kernels.attention_torch import paged_attention_ref, write_kv_ref


class TorchAttention:
    name = "torch"

    @staticmethod
    def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)

    @staticmethod
    def attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale: float,
                  max_q_len: int) -> torch.Tensor:
        return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale)


class TritonAttention:
    name = "triton"

    def __init__(self):
        from kernels import paged_attention
        self._k = paged_attention

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        self._k.write_kv(k, v, k_cache, v_cache, slot_mapping)

    def attention(self, q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale: float,
                  max_q_len: int) -> torch.Tensor:
        return self._k.paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale,
                                       max_seqlen_q=max_q_len)


def make_attention(kind: str):
    if kind == "torch":
        return TorchAttention()
    if kind == "triton":
        return TritonAttention()
    raise ValueError(f"unknown attention backend {kind!r} (torch, triton)")
