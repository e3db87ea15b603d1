"""Attention over a paged KV cache in Triton: prefill and decode, causal, varlen, GQA.

Semantics and cache layout: ``kernels/attention_torch.py``. One program takes a
tile of query positions of one sequence for all query heads of one KV head
(rows = query x head of the group), so each K/V tile is loaded once per group.
It walks the sequence's pages with an online softmax.

Decode (every sequence has at most one new token, ``max_seqlen_q == 1``) splits
the context into partitions when there are too few (sequence, KV head) pairs to
fill the GPU: a first pass leaves one unnormalised partial per partition, a
second pass merges them (flash-decoding). The decode grid depends only on the
batch size, the block-table width and the head counts, so it can be captured in
a CUDA graph; programs past a sequence's context exit at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.mma import mma, native_dot

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
# Prefill tiles: query rows (positions x heads of a group) and keys per step.
PREFILL_CONFIG = dict(rows=64, block_n=64, num_warps=4, num_stages=2)


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, out_ptr, pm_ptr, pl_ptr, pacc_ptr,
                 bt_ptr, ctx_ptr, cu_ptr, qk_scale,
                 stride_qt, stride_qh, stride_ot, stride_oh,
                 stride_cb, stride_cr, stride_ch, stride_bt,
                 num_heads,
                 GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, D_P2: tl.constexpr, PAGE: tl.constexpr,
                 PART: tl.constexpr, NUM_PART: tl.constexpr, NATIVE: tl.constexpr, IEEE: tl.constexpr):
    BM: tl.constexpr = BLOCK_Q * GROUP_P2
    pid_q = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2) // NUM_PART
    part = tl.program_id(2) % NUM_PART
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    ctx = tl.load(ctx_ptr + b)
    # KV range of this program: its partition, cut at the causal bound of the tile's last query.
    kv_lo = part * PART
    q_tile_end = tl.minimum(q_len, (pid_q + 1) * BLOCK_Q)
    kv_hi = tl.minimum(ctx - q_len + q_tile_end, kv_lo + PART)
    if (pid_q * BLOCK_Q < q_len) & (kv_lo < kv_hi):
        m_offs = tl.arange(0, BM)
        qi = pid_q * BLOCK_Q + m_offs // GROUP_P2
        hg = m_offs % GROUP_P2
        row_ok = (qi < q_len) & (hg < GROUP)
        head = kvh * GROUP + hg
        pos = ctx - q_len + qi                                   # absolute position of each row's query
        d = tl.arange(0, D_P2)
        d_ok = d < HEAD_DIM
        t_row = (q_start + qi).to(tl.int64)
        q = tl.load(q_ptr + t_row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if not NATIVE:
            q = q.to(tl.float32)
        m_i = tl.full((BM,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, D_P2), dtype=tl.float32)
        n_offs = tl.arange(0, BLOCK_N)
        for n0 in range(kv_lo, kv_hi, BLOCK_N):
            n = n0 + n_offs
            n_ok = n < kv_hi
            page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + n // PAGE, mask=n_ok, other=0).to(tl.int64)
            off = page * stride_cb + (n % PAGE) * stride_cr + kvh * stride_ch
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = mma(q, tl.trans(k), NATIVE, IEEE)
            s = s * qk_scale
            s = tl.where(n_ok[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if NATIVE:
                p = p.to(v.dtype)                       # tensor cores take both in the cache's dtype
            pv = mma(p, v, NATIVE, IEEE)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        o_mask = row_ok[:, None] & d_ok[None, :]
        if NUM_PART == 1:
            o_ptrs = out_ptr + t_row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
            tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            row = (t_row * num_heads + head) * NUM_PART + part      # partials are [T, H, NUM_PART(, D)]
            tl.store(pm_ptr + row, m_i, mask=row_ok)
            tl.store(pl_ptr + row, l_i, mask=row_ok)
            tl.store(pacc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=o_mask)


@triton.jit
def _merge_kernel(out_ptr, pm_ptr, pl_ptr, pacc_ptr, ctx_ptr, cu_ptr, stride_ot, stride_oh, num_heads,
                  HEAD_DIM: tl.constexpr, D_P2: tl.constexpr, PART: tl.constexpr,
                  NUM_PART: tl.constexpr, P_P2: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    ctx = tl.load(ctx_ptr + b)
    p = tl.arange(0, P_P2)
    d = tl.arange(0, D_P2)
    d_ok = d < HEAD_DIM
    for qi in range(0, q_len):
        t = (q_start + qi).to(tl.int64)
        p_ok = (p < NUM_PART) & (p * PART < ctx - q_len + qi + 1)    # partitions that hold this query's keys
        row = (t * num_heads + h) * NUM_PART + p
        m = tl.load(pm_ptr + row, mask=p_ok, other=float("-inf"))
        l = tl.load(pl_ptr + row, mask=p_ok, other=0.0)
        acc = tl.load(pacc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.exp2(m - tl.max(m, axis=0))
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + t * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                    max_seqlen_q: int | None = None, out: torch.Tensor | None = None,
                    partition_size: int | None = None) -> torch.Tensor:
    """out[t, h] = softmax(scale * q[t, h] . K[b, :pos(t)+1, h // group]) @ V[b, :pos(t)+1, h // group].

    q [T, H, D]; caches [num_blocks, block_size, KVH, D]; block_tables [B, max_blocks] int32;
    context_lens [B] int32 (new tokens included, their K/V already written); cu_seqlens_q [B+1] int32.
    ``max_seqlen_q`` (host int) picks the path and sizes the prefill grid; pass it to avoid a device
    sync (1 = decode path, capturable). ``partition_size`` overrides the decode split (tokens).
    """
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be [T, H, D] with unit stride along D, got {tuple(q.shape)} {q.stride()}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() \
            or k_cache.stride(3) != 1:
        raise ValueError(f"k_cache and v_cache must be [num_blocks, block_size, KVH, D] of one shape and "
                         f"strides, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    t, num_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q has head_dim {head_dim}, the cache {k_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and the caches must share a dtype among {_DTYPES}, got {q.dtype}, {k_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be int32 [B, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    batch = block_tables.shape[0]
    for name, x, n in (("context_lens", context_lens, batch), ("cu_seqlens_q", cu_seqlens_q, batch + 1)):
        if x.dtype != torch.int32 or tuple(x.shape) != (n,) or not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous int32 [{n}], got {x.dtype} {tuple(x.shape)}")
    for x in (k_cache, v_cache, block_tables, context_lens, cu_seqlens_q):
        if x.device != q.device:
            raise ValueError(f"all inputs must be on {q.device}, got one on {x.device}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} with unit stride along D")
    if t == 0 or batch == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())   # device sync
    group = num_heads // num_kv_heads
    group_p2 = triton.next_power_of_2(group)
    d_p2 = max(16, triton.next_power_of_2(head_dim))
    native = native_dot(q.dtype)
    block_n = 64 if max_seqlen_q <= 1 else PREFILL_CONFIG["block_n"]
    num_warps, num_stages = 4, 2
    max_ctx = block_tables.shape[1] * page
    if max_seqlen_q <= 1:
        block_q = max(1, 16 // group_p2)
        if partition_size is None:
            # Enough (sequence, KV head, partition) programs for ~4 waves; at least 256 keys a partition.
            want = max(1, 4 * _num_sms(q.device) // (batch * num_kv_heads))
            partition_size = max(256, triton.next_power_of_2(triton.cdiv(max_ctx, want)))
        part = triton.cdiv(max(partition_size, block_n), block_n) * block_n
        num_part = triton.cdiv(max_ctx, part)
        q_tiles = 1
    else:
        block_q = max(1, PREFILL_CONFIG["rows"] // group_p2)
        num_warps, num_stages = PREFILL_CONFIG["num_warps"], PREFILL_CONFIG["num_stages"]
        part, num_part = triton.cdiv(max_ctx, block_n) * block_n, 1
        q_tiles = triton.cdiv(max_seqlen_q, block_q)
    if num_part > 1:
        pm = torch.empty((t, num_heads, num_part), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty((t, num_heads, num_part, head_dim), dtype=torch.float32, device=q.device)
    else:
        pm = pl = pacc = out
    grid = (q_tiles, batch, num_kv_heads * num_part)
    _attn_kernel[grid](
        q, k_cache, v_cache, out, pm, pl, pacc, block_tables, context_lens, cu_seqlens_q, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), num_heads,
        GROUP=group, GROUP_P2=group_p2, BLOCK_Q=block_q, BLOCK_N=block_n, HEAD_DIM=head_dim, D_P2=d_p2,
        PAGE=page, PART=part, NUM_PART=num_part, NATIVE=native, IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    if num_part > 1:
        _merge_kernel[(batch, num_heads)](
            out, pm, pl, pacc, context_lens, cu_seqlens_q, out.stride(0), out.stride(1), num_heads,
            HEAD_DIM=head_dim, D_P2=d_p2, PART=part, NUM_PART=num_part, P_P2=triton.next_power_of_2(num_part),
            num_warps=4)
    return out


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cr, stride_ch, num_kv_heads,
                     PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, H_P2: tl.constexpr, D_P2: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        hh = tl.arange(0, H_P2)
        d = tl.arange(0, D_P2)
        mask = (hh[:, None] < num_kv_heads) & (d[None, :] < HEAD_DIM)
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cr + hh[:, None] * stride_ch + d[None, :]
        k = tl.load(k_ptr + t * stride_kt + hh[:, None] * stride_kh + d[None, :], mask=mask)
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + t * stride_vt + hh[:, None] * stride_vh + d[None, :], mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache.flat[slot_mapping[t]] = k[t] (same for v) for every t with slot_mapping[t] >= 0.

    A Triton kernel rather than ``index_copy_`` because a CUDA-graph-padded decode
    batch marks its padding tokens with slot -1, which must write nothing; k and v
    may be strided views of a fused qkv output.
    """
    if k.dim() != 3 or k.shape != v.shape or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(f"k and v must be [T, KVH, D] of one shape with unit stride along D, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() \
            or k_cache.stride(3) != 1:
        raise ValueError(f"caches must be [num_blocks, block_size, KVH, D] of one shape, got {tuple(k_cache.shape)}")
    if tuple(k.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(f"k is [T, {k.shape[1]}, {k.shape[2]}], the cache holds [{k_cache.shape[2]}, {k_cache.shape[3]}]")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0] \
            or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if k.dtype not in _DTYPES or k_cache.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"unsupported dtypes {k.dtype} -> {k_cache.dtype}")
    if len({x.device for x in (k, v, k_cache, v_cache, slot_mapping)}) != 1:
        raise ValueError("k, v, the caches and slot_mapping must share a device")
    if k.shape[0] == 0:
        return
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), kvh,
        PAGE=k_cache.shape[1], HEAD_DIM=d, H_P2=triton.next_power_of_2(kvh), D_P2=triton.next_power_of_2(d),
        num_warps=4)

