"""Plain-torch reference for attention over a paged KV cache.

Cache layout, per layer:   k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A sequence's position p lives in block block_table[p // block_size], row p % block_size.

One function covers prefill and decode. Sequence b contributes q_len_b new query
tokens (rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q); its context, including those
new tokens whose K/V are already written to the cache, is context_lens[b] long.
Query j of sequence b sits at position context_lens[b] - q_len_b + j and attends
causally to positions 0..that position. Heads share KV in groups (GQA):
query head h reads KV head h // (num_heads // num_kv_heads).

    out[t, h] = softmax(scale * q[t, h] . K[b, :pos+1, h_kv]) @ V[b, :pos+1, h_kv]
"""
from __future__ import annotations

import torch


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k_cache.flat[slot_mapping[t]] = k[t] (same for v); slot = block * block_size + row."""
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """q [T, H, D], block_tables [B, max_blocks] int32, context_lens [B], cu_seqlens_q [B+1] -> out [T, H, D]."""
    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for b in range(len(lens)):
        q_lo, q_hi, ctx = cu[b], cu[b + 1], lens[b]
        if q_hi == q_lo:
            continue
        nblk = (ctx + block_size - 1) // block_size
        blocks = block_tables[b, :nblk].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, k_cache.shape[3])[:ctx].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, v_cache.shape[3])[:ctx].float()
        k = k.repeat_interleave(group, dim=1)                       # [ctx, H, D]
        v = v.repeat_interleave(group, dim=1)
        qb = q[q_lo:q_hi].float()                                   # [n, H, D]
        scores = torch.einsum("nhd,khd->hnk", qb, k) * scale        # [H, n, ctx]
        n = q_hi - q_lo
        pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]  # absolute position of each query
        mask = torch.arange(ctx, device=q.device)[None, :] > pos    # [n, ctx]
        scores.masked_fill_(mask, float("-inf"))
        out[q_lo:q_hi] = torch.einsum("hnk,khd->nhd", scores.softmax(-1), v).to(q.dtype)
    return out
