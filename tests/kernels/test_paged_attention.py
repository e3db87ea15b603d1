"""Paged attention and write_kv (Triton) against the plain-torch reference.

On CPU the kernels run under TRITON_INTERPRET (see conftest.py): shapes stay small.
Every cache position that no sequence owns holds NaN, so a read past a context fails.
"""
import pytest
import torch

from kernels.attention_torch import paged_attention_ref, write_kv_ref
from kernels.paged_attention import paged_attention, write_kv

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_batch(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, page, dtype, spare_blocks=3, device=DEV):
    """Random q, NaN-poisoned caches with each sequence's positions written through write_kv_ref."""
    batch = len(q_lens)
    need = [-(-c // page) for c in ctx_lens]
    max_blocks = max(need) + 1                      # wider than needed: tails of block tables are junk
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks).tolist()
    block_tables = torch.randint(0, num_blocks, (batch, max_blocks), dtype=torch.int32)
    k_cache = torch.full((num_blocks, page, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    at = 0
    for b, n in enumerate(need):
        block_tables[b, :n] = torch.tensor(perm[at: at + n], dtype=torch.int32)
        at += n
        slots = torch.tensor([int(block_tables[b, p // page]) * page + p % page for p in range(ctx_lens[b])],
                             dtype=torch.int64, device=device)
        k = torch.randn(ctx_lens[b], num_kv_heads, head_dim, device=device)
        v = torch.randn(ctx_lens[b], num_kv_heads, head_dim, device=device)
        write_kv_ref(k, v, k_cache, v_cache, slots)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(int(cu[-1]), num_heads, head_dim, device=device).to(dtype)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, block_tables.to(device), ctx, cu


def check(args, dtype, rel_err, **kw):
    q, k_cache, v_cache, bt, ctx, cu = args
    scale = q.shape[-1] ** -0.5
    ref = paged_attention_ref(q, k_cache, v_cache, bt, ctx, cu, scale)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k_cache, v_cache, bt, ctx, cu, scale, out=out, **kw)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.2e}"


CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_decode_split_partitions(dtype, seed, rel_err):
    ctx = torch.randint(1, 300, (5,)).tolist()
    args = make_batch([1] * 5, ctx, 8, 2, 32, 16, dtype)
    check(args, dtype, rel_err, max_seqlen_q=1, partition_size=64)      # several partitions, merge pass
    check(args, dtype, rel_err, max_seqlen_q=1, partition_size=4096)    # one partition, direct write


def test_decode_odd_group_head_dim_page(seed, rel_err):
    # group of 3 heads (padded to 4 rows), head_dim 40 (padded to 64), page 8, a sequence with no new token.
    args = make_batch([1, 0, 1, 1], [1, 9, 130, 77], 6, 2, 40, 8, torch.float32)
    check(args, torch.float32, rel_err, max_seqlen_q=1, partition_size=64)
    check(args, torch.float32, rel_err)                                  # max_seqlen_q found on the device


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_prefill_with_prefix_and_mixed_decode(dtype, seed, rel_err):
    # new tokens against a paged prefix; an empty sequence; decode rows in the same batch (chunked prefill).
    q_lens = [5, 0, 37, 1, 19]
    prefix = [0, 20, 45, 90, 3]
    ctx = [p + n for p, n in zip(prefix, q_lens)]
    args = make_batch(q_lens, ctx, 8, 2, 32, 16, dtype)
    check(args, dtype, rel_err, max_seqlen_q=max(q_lens))


def test_prefill_mha_odd_sizes(seed, rel_err):
    args = make_batch([70, 3], [70, 50], 2, 2, 24, 16, torch.float32)
    check(args, torch.float32, rel_err, max_seqlen_q=70)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_write_kv_skips_padding(dtype, seed, rel_err):
    t, kvh, d, page, nb = 11, 3, 24, 4, 6
    qkv = torch.randn(t, (4 + 2 * kvh) * d, device=DEV)            # k and v as strided views of a fused output
    k = qkv[:, 4 * d: (4 + kvh) * d].view(t, kvh, d)
    v = qkv[:, (4 + kvh) * d:].view(t, kvh, d)
    slots = torch.randperm(nb * page)[:t].to(DEV)
    slots[[2, 7]] = -1
    kc = torch.randn(nb, page, kvh, d, device=DEV).to(dtype)
    vc = torch.randn_like(kc)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    keep = slots >= 0
    write_kv_ref(k[keep], v[keep], kc_ref, vc_ref, slots[keep])
    write_kv(k, v, kc, vc, slots.to(torch.int32))
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_bad_inputs_raise_value_error(seed):
    q, kc, vc, bt, ctx, cu = make_batch([1, 1], [5, 9], 4, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(q[:, :3], kc, vc, bt, ctx, cu, 0.25)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention(q, kc, vc, bt.long(), ctx, cu, 0.25)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_attention(q, kc, vc, bt, ctx, cu[:2], 0.25)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(q.half(), kc, vc, bt, ctx, cu, 0.25)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(q[:, :2], q[:, :2], kc, vc, torch.zeros(2, dtype=torch.float32))


# ---- GPU, real shapes (Llama-3-8B: 32 heads, 8 KV heads, head_dim 128), bf16 --------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch,max_ctx", [(1, 8192), (8, 4096), (64, 2048), (256, 600)])
def test_llama_decode_bf16(batch, max_ctx, seed, rel_err):
    ctx = torch.randint(1, max_ctx + 1, (batch,)).tolist()
    args = make_batch([1] * batch, ctx, 32, 8, 128, 16, torch.bfloat16)
    check(args, torch.bfloat16, rel_err, max_seqlen_q=1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_llama_prefill_bf16(seed, rel_err):
    q_lens = [512, 300, 1, 77]
    prefix = [0, 1024, 2000, 5]
    args = make_batch(q_lens, [p + n for p, n in zip(prefix, q_lens)], 32, 8, 128, 16, torch.bfloat16)
    check(args, torch.bfloat16, rel_err, max_seqlen_q=512)
