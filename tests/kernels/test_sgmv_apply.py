"""lora_apply (shrink + expand in one call; the segment-major decode kernels for small steps) against the
torch reference."""
import pytest
import torch

from kernels.lora_torch import lora_expand_ref, lora_shrink_ref
from kernels.sgmv import lora_apply
from kernels.sgmv_decode import MAX_TOKENS, lora_apply_decode
from tests.kernels.test_sgmv import CUDA, DEV, LLAMA, TOL, make_case

CPU_DTYPES = [torch.float32, torch.float16]


def check_apply(case, dtype, rel_err, split_k=None):
    x, a, b, ranks, scal, out_offsets, meta, token_slots = case
    y0 = torch.randn(x.shape[0], out_offsets[-1], dtype=dtype, device=x.device)
    h_ref = lora_shrink_ref(x, a, ranks, meta)
    y_ref = lora_expand_ref(h_ref, b, ranks, scal, out_offsets, meta, y0.clone())
    y = y0.clone()
    if split_k is None:
        assert lora_apply(x, y, a, b, ranks.to(x.device), scal.to(x.device), out_offsets, meta) is y
    else:
        lora_apply_decode(x, y, a, b, ranks.to(x.device), scal.to(x.device), out_offsets, meta, split_k=split_k)
    no_lora = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(y[no_lora], y0[no_lora]), "tokens without LoRA were modified"
    assert rel_err(y.double() - y0.double(), y_ref.double() - y0.double()) < TOL[dtype] * 4, "delta"
    assert rel_err(y, y_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_decode_qkv_mixed_ranks_and_empty_slices(dtype, seed, rel_err):
    ranks = [[8, 8, 8], [40, 40, 0], [0, 0, 0], [0, 16, 0]]
    check_apply(make_case(37, 72, [40, 24, 19], ranks, max_rank=40, dtype=dtype), dtype, rel_err)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_decode_one_token_per_adapter_with_k_split(dtype, seed, rel_err):
    ranks = [[r, (r * 3) % 20] for r in (8, 16, 4, 8, 0, 12, 16, 8, 2, 4, 6, 1)]
    case = make_case(13, 300, [50, 30], ranks, max_rank=16, dtype=dtype, p_none=0.15,
                     slots_used=list(range(12)))
    check_apply(case, dtype, rel_err, split_k=3)


@pytest.mark.parametrize("num_tokens", [1, MAX_TOKENS, MAX_TOKENS + 5])   # the last takes the general kernels
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


def test_single_adapter_takes_the_block_walking_kernels(seed, rel_err):
    from kernels.sgmv import uses_decode_kernels
    case = make_case(20, 64, [48, 16], [[16, 8]], max_rank=16, dtype=torch.float32, p_none=0.2)
    assert case[6].num_segments == 1 and not uses_decode_kernels(20, 1) and uses_decode_kernels(20, 2)
    check_apply(case, torch.float32, rel_err)
