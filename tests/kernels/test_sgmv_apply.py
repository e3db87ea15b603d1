"""lora_apply (shrink + expand in one call; the segment-major decode kernels for small steps) against the
torch reference."""
from functools import partial

import pytest
import torch

from kernels.lora_torch import lora_expand_ref, lora_shrink_ref
from kernels.lora_meta import SEG_BLOCKS_MAX_SEGMENTS
from kernels.sgmv import SEG_BLOCKS_MAX_TOKENS, lora_apply
from kernels.sgmv_decode import MAX_TOKENS, lora_apply_blocks, lora_apply_decode, lora_apply_single
from tests.kernels.test_sgmv import CUDA, DEV, LLAMA, TOL, make_case

CPU_DTYPES = [torch.float32, torch.float16]


def check_apply(case, dtype, rel_err, run=None):
    """``run(x, y, a, b, ranks, scalings, offsets, meta)`` (default ``lora_apply``, which must return y) against
    the reference: rows without LoRA untouched, the delta and y close."""
    x, a, b, ranks, scal, out_offsets, meta, token_slots = case
    y0 = torch.randn(x.shape[0], out_offsets[-1], dtype=dtype, device=x.device)
    h_ref = lora_shrink_ref(x, a, ranks, meta)
    y_ref = lora_expand_ref(h_ref, b, ranks, scal, out_offsets, meta, y0.clone())
    y = y0.clone()
    if run is None:
        assert lora_apply(x, y, a, b, ranks.to(x.device), scal.to(x.device), out_offsets, meta) is y
    else:
        run(x, y, a, b, ranks.to(x.device), scal.to(x.device), out_offsets, meta)
    no_lora = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(y[no_lora], y0[no_lora]), "tokens without LoRA were modified"
    assert rel_err(y.double() - y0.double(), y_ref.double() - y0.double()) < TOL[dtype] * 4, "delta"
    assert rel_err(y, y_ref) < TOL[dtype]


def check_emptied_step(case, run):
    """A captured graph replays the launches whatever the step: after a fill without LoRA tokens (only
    seg_indptr's last entry rewritten, to 0) ``run`` must leave y alone."""
    x, a, b, ranks, scal, offs, meta, _ = case
    meta.fill([-1] * x.shape[0])
    slots = meta.slots
    meta.slots = [0]                          # as the graph does: the launches happen, the device data says empty
    try:
        y = torch.randn(x.shape[0], offs[-1], device=DEV)
        y0 = y.clone()
        run(x, y, a, b, ranks.to(DEV), scal.to(DEV), offs, meta)
    finally:
        meta.slots = slots
    assert torch.equal(y, y0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_decode_qkv_mixed_ranks_and_empty_slices(dtype, seed, rel_err):
    ranks = [[8, 8, 8], [40, 40, 0], [0, 0, 0], [0, 16, 0]]
    check_apply(make_case(37, 72, [40, 24, 19], ranks, max_rank=40, dtype=dtype), dtype, rel_err)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_decode_one_token_per_adapter_with_k_split(dtype, seed, rel_err):
    ranks = [[r, (r * 3) % 20] for r in (8, 16, 4, 8, 0, 12, 16, 8, 2, 4, 6, 1)]
    case = make_case(13, 300, [50, 30], ranks, max_rank=16, dtype=dtype, p_none=0.15,
                     slots_used=list(range(12)))
    check_apply(case, dtype, rel_err, run=partial(lora_apply_decode, split_k=3))


# the last two take the segment-block kernels and the block-walking ones
@pytest.mark.parametrize("num_tokens", [1, MAX_TOKENS, MAX_TOKENS + 5, SEG_BLOCKS_MAX_TOKENS + 3])
def test_apply_dispatch_by_size(num_tokens, seed, rel_err):
    case = make_case(num_tokens, 48, [32], [[8], [16], [4]], max_rank=16, dtype=torch.float32, p_none=0.2)
    check_apply(case, torch.float32, rel_err)


def test_decode_with_more_slots_than_tokens(seed, rel_err):
    # segment capacity 40, 6 tokens: programs for segments past the last exit at once
    case = make_case(6, 40, [24], [[8]] * 10, max_rank=8, dtype=torch.float32, p_none=0.0, meta_slots=40)
    check_apply(case, torch.float32, rel_err)


def test_apply_no_lora_leaves_y(seed):
    x, a, b, ranks, scal, offs, meta, _ = make_case(5, 32, [16], [[8]], max_rank=8, dtype=torch.float32)
    meta.fill([-1] * 5)
    y = torch.randn(5, 16, device=DEV)
    y0 = y.clone()
    lora_apply(x, y, a, b, ranks.to(DEV), scal.to(DEV), offs, meta)
    assert torch.equal(y, y0)


def test_apply_bad_inputs(seed):
    x, a, b, ranks, scal, offs, meta, _ = make_case(4, 32, [16, 16], [[8, 8]], max_rank=8, dtype=torch.float32)
    ranks, scal = ranks.to(DEV), scal.to(DEV)
    y = torch.zeros(4, 32, device=DEV)
    with pytest.raises(ValueError, match="features"):
        lora_apply(x[:, :31], y, a, b, ranks, scal, offs, meta)
    with pytest.raises(ValueError, match="y must be"):
        lora_apply(x, y[:, :30], a, b, ranks, scal, offs, meta)
    with pytest.raises(ValueError, match="out_offsets"):
        lora_apply(x, y, a, b, ranks, scal, (0, 20, 30), meta)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", list(LLAMA))
@pytest.mark.parametrize("num_tokens,distinct", [(1, 1), (32, 32), (64, 8), (48, 1)])
def test_decode_llama_shapes_bf16(family, num_tokens, distinct, seed, rel_err):
    in_f, widths = LLAMA[family]
    n = len(widths)
    rank_choices = [8, 16, 64, 128]
    ranks = [[rank_choices[(s + i) % 4] if (s + i) % 7 else 0 for i in range(n)] for s in range(distinct)]
    case = make_case(num_tokens, in_f, widths, ranks, max_rank=128, dtype=torch.bfloat16, p_none=0.1,
                     meta_slots=128)
    check_apply(case, torch.bfloat16, rel_err)


def test_apply_path_by_size_adapters_and_tile():
    from kernels.sgmv import apply_path
    assert apply_path(20, 1, 16) == "single" and apply_path(20, 2, 16) == "segments"
    assert apply_path(MAX_TOKENS, 1, 32) == "single" and apply_path(MAX_TOKENS + 1, 1, 16) == "seg_blocks"
    assert apply_path(MAX_TOKENS, 1, 64) == "blocks" and apply_path(32, 1, 64) == "single"   # the tile's size
    assert apply_path(MAX_TOKENS + 1, 5, 16) == "seg_blocks" and apply_path(MAX_TOKENS, 5, 128) == "segments"
    assert apply_path(SEG_BLOCKS_MAX_TOKENS, 5, 16) == "seg_blocks"
    assert apply_path(SEG_BLOCKS_MAX_TOKENS + 1, 1, 16) == "blocks"
    assert apply_path(256, SEG_BLOCKS_MAX_SEGMENTS, 16) == "seg_blocks"
    assert apply_path(256, SEG_BLOCKS_MAX_SEGMENTS + 1, 16) == "blocks"


def poison_past_rank(case):
    """NaN in A's and B's rows past each slot's rank: a kernel that lets them into y fails."""
    _, a, b, ranks, *_ = case
    for s in range(a.shape[0]):
        for i in range(a.shape[1]):
            a[s, i, int(ranks[s, i]):] = float("nan")
        b[s, int(ranks[s].max()):] = float("nan")
    return case


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_tokens,split_k", [(1, None), (23, 3), (MAX_TOKENS, 1)])
def test_single_adapter_kernels(dtype, num_tokens, split_k, seed, rel_err):
    # one adapter among four slots, slices of odd widths and mixed ranks (v untargeted), rank below
    # max_rank with NaN past it, tokens without LoRA interleaved, K not a multiple of any block
    ranks = [[8, 8, 8], [12, 5, 0], [16, 16, 16], [4, 4, 4]]
    slot = int(torch.randint(0, 4, ()))
    case = poison_past_rank(make_case(num_tokens, 300, [40, 24, 19], ranks, max_rank=16, dtype=dtype,
                                      p_none=0.3, slots_used=[slot] if slot != 2 else [1]))
    assert case[6].num_segments == 1
    check_apply(case, dtype, rel_err, run=None if split_k is None else partial(lora_apply_single, split_k=split_k))


def test_single_adapter_kernels_skip_an_emptied_step(seed):
    check_emptied_step(make_case(9, 40, [16, 8], [[8, 8]], max_rank=8, dtype=torch.float32, p_none=0.0),
                       lora_apply_single)


def test_single_adapter_kernels_refuse_several_segments(seed):
    x, a, b, ranks, scal, offs, meta, _ = make_case(8, 32, [16], [[8], [8]], max_rank=8, dtype=torch.float32,
                                                    p_none=0.0, slots_used=[0, 1])
    meta.fill([0, 1] * 4)
    with pytest.raises(ValueError, match="one segment"):
        lora_apply_single(x, torch.zeros(8, 16, device=DEV), a, b, ranks.to(DEV), scal.to(DEV), offs, meta)
    x, a, b, ranks, scal, offs, meta, _ = make_case(MAX_TOKENS, 32, [16], [[8]], max_rank=64, dtype=torch.float32)
    with pytest.raises(ValueError, match="tile"):
        lora_apply_single(x, torch.zeros(MAX_TOKENS, 16, device=DEV), a, b, ranks.to(DEV), scal.to(DEV), offs, meta)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", list(LLAMA))
@pytest.mark.parametrize("num_tokens,max_rank", [(1, 16), (32, 16), (MAX_TOKENS, 16), (8, 64), (32, 64)])
def test_single_adapter_llama_shapes_bf16(family, num_tokens, max_rank, seed, rel_err):
    from kernels.sgmv import apply_path
    in_f, widths = LLAMA[family]
    ranks = [[max_rank // 4 * (1 + (s + i) % 4) for i in range(len(widths))] for s in range(3)]
    case = poison_past_rank(make_case(num_tokens, in_f, widths, ranks, max_rank=max_rank, dtype=torch.bfloat16,
                                      p_none=0.1, slots_used=[1], meta_slots=128))
    assert apply_path(num_tokens, case[6].num_segments, max_rank) == "single"
    check_apply(case, torch.bfloat16, rel_err)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_tokens,split_k", [(5, 1), (40, 3), (MAX_TOKENS + 27, None)])
def test_segment_blocks_skewed_mixed_ranks(dtype, num_tokens, split_k, seed, rel_err):
    # one adapter takes most tokens (a segment over several blocks, the last partial), the others few; slices
    # of odd widths with ranks from 0 to max_rank, NaN past each rank, rows without LoRA interleaved
    ranks = [[8, 8, 8], [12, 5, 0], [0, 0, 0], [4, 16, 1], [16, 2, 9], [3, 3, 3]]
    case = poison_past_rank(make_case(num_tokens, 300, [40, 24, 19], ranks, max_rank=16, dtype=dtype, p_none=0.2,
                                      slots_used=[4] * 8 + [0, 1, 2, 3, 5]))
    check_apply(case, dtype, rel_err, run=partial(lora_apply_blocks, split_k=split_k, block_n=16))


def test_segment_blocks_one_token_per_adapter(seed, rel_err):
    # every segment a single partial block, more segments than blocks of 16 tokens
    ranks = [[r, (r * 3) % 20] for r in (8, 16, 4, 8, 0, 12, 16, 8, 2, 4, 6, 1)]
    case = make_case(12, 200, [50, 30], ranks, max_rank=16, dtype=torch.float32, p_none=0.0, meta_slots=40)
    case[6].fill(list(range(12)))
    case = case[:7] + (list(range(12)),)
    check_apply(case, torch.float32, rel_err, run=partial(lora_apply_blocks, split_k=2))


def test_segment_blocks_skip_an_emptied_step(seed):
    """The entries of seg_indptr before its last still describe the last step's segments, and the block
    list is the last step's: both must be clamped to the emptied step."""
    check_emptied_step(make_case(30, 40, [16, 8], [[8, 8], [4, 4]], max_rank=8, dtype=torch.float32, p_none=0.0),
                       lora_apply_blocks)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", list(LLAMA))
@pytest.mark.parametrize("num_tokens,workload_", [(256, "identical"), (256, "uniform"), (256, "skewed"),
                                                  (128, "distinct"), (200, "skewed"), (512, "uniform")])
def test_segment_blocks_llama_shapes_bf16(family, num_tokens, workload_, seed, rel_err):
    import random

    from bench.engine import workload
    from kernels.sgmv import apply_path
    in_f, widths = LLAMA[family]
    token_slots = workload(workload_, num_tokens, random.Random(int(torch.randint(0, 1 << 30, ()))))
    slots = max(token_slots) + 1
    ranks = [[[8, 16, 64][(s + i) % 3] if (s + i) % 7 else 0 for i in range(len(widths))] for s in range(slots)]
    case = poison_past_rank(make_case(num_tokens, in_f, widths, ranks, max_rank=64, dtype=torch.bfloat16,
                                      p_none=0.0, meta_slots=slots + 2))
    case[6].fill(token_slots)
    case = case[:7] + (token_slots,)
    assert apply_path(num_tokens, case[6].num_segments, 64) == "seg_blocks"
    check_apply(case, torch.bfloat16, rel_err)
