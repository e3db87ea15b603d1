"""SGMV shrink/expand (Triton) against the plain-torch reference.

On CPU the kernels run under TRITON_INTERPRET (see conftest.py): shapes stay small.
"""
import pytest
import torch

from kernels.lora_meta import LoRAMeta
from kernels.lora_torch import lora_expand_ref, lora_shrink_ref
from kernels.sgmv import lora_expand, lora_shrink

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_case(num_tokens, in_features, widths, ranks_by_slot, max_rank, dtype, p_none=0.2, slots_used=None,
              meta_slots=None, device=DEV):
    """Random weights, ranks (0 = empty/untargeted), and a token->slot mix with no-LoRA tokens interleaved."""
    num_slots = len(ranks_by_slot)
    n_slices = len(widths)
    out_offsets = tuple([0] + torch.tensor(widths).cumsum(0).tolist())
    x = torch.randn(num_tokens, in_features, dtype=dtype, device=device)
    a = (torch.randn(num_slots, n_slices, max_rank, in_features, device=device) / in_features ** 0.5).to(dtype)
    b = (torch.randn(num_slots, max_rank, out_offsets[-1], device=device) / max_rank ** 0.5).to(dtype)
    ranks = torch.tensor(ranks_by_slot, dtype=torch.int32).reshape(num_slots, n_slices)
    scal = (torch.rand(num_slots, n_slices) + 0.5).float()
    slots_used = list(range(num_slots)) if slots_used is None else slots_used
    pick = torch.randint(0, len(slots_used), (num_tokens,)).tolist()
    none = (torch.rand(num_tokens) < p_none).tolist()
    token_slots = [-1 if nn else slots_used[p] for p, nn in zip(pick, none)]
    if all(s < 0 for s in token_slots):     # keep one LoRA token: the no-LoRA step has its own test
        token_slots[0] = slots_used[pick[0]]
    meta = LoRAMeta.allocate(num_tokens + 3, meta_slots or num_slots + 2, device).fill(token_slots)
    return x, a, b, ranks, scal, out_offsets, meta, token_slots


def check(case, dtype, rel_err, split_k=None):
    x, a, b, ranks, scal, out_offsets, meta, token_slots = case
    dev = x.device
    h_ref = lora_shrink_ref(x, a, ranks, meta)
    h = torch.full_like(h_ref, float("nan"))
    lora_shrink(x, a, ranks.to(dev), meta, out=h, split_k=split_k)
    assert rel_err(h, h_ref) < (1e-5 if dtype != torch.bfloat16 else 1e-3), "shrink"

    # Expand must not read h past a token's rank, nor rows of tokens without LoRA: poison them.
    h_in = h_ref.clone()
    r_max = h_in.shape[2]
    for t, s in enumerate(token_slots):
        for i in range(h_in.shape[0]):
            r = 0 if s < 0 else int(ranks[s, i])
            h_in[i, t, r:r_max] = float("nan")
    y0 = torch.randn(x.shape[0], out_offsets[-1], dtype=dtype, device=dev)
    y_ref = lora_expand_ref(h_ref, b, ranks, scal, out_offsets, meta, y0.clone())
    y = lora_expand(h_in, b, ranks.to(dev), scal.to(dev), out_offsets, meta, y0.clone())
    no_lora = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(y[no_lora], y0[no_lora]), "tokens without LoRA were modified"
    delta_ref = y_ref.double() - y0.double()
    assert rel_err(y.double() - y0.double(), delta_ref) < TOL[dtype] * 4 or rel_err(y, y_ref) < TOL[dtype] / 4, "expand"
    assert rel_err(y, y_ref) < TOL[dtype], "expand"


CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_qkv_mixed_ranks_and_empty_slices(dtype, seed, rel_err):
    # slot 0: q,k,v rank 8; slot 1: rank 40 (two rank blocks in expand), v untargeted; slot 2: empty;
    # slot 3: only k, rank 16. Slice widths are not multiples of any block size.
    ranks = [[8, 8, 8], [40, 40, 0], [0, 0, 0], [0, 16, 0]]
    case = make_case(37, 72, [40, 24, 19], ranks, max_rank=40, dtype=dtype)
    check(case, dtype, rel_err)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_many_segments_cross_blocks_split_k(dtype, seed, rel_err):
    # 70 tokens -> BLOCK_M 32: segments straddle blocks; split over K (atomics) with a K tail.
    ranks = [[r] for r in (8, 16, 24, 8, 0, 12, 16, 8, 32, 4)]
    case = make_case(70, 300, [50], ranks, max_rank=32, dtype=dtype, p_none=0.3)
    check(case, dtype, rel_err, split_k=3)


def test_single_token_and_single_adapter(seed, rel_err):
    case = make_case(1, 64, [33, 31], [[16, 16]], max_rank=16, dtype=torch.float32, p_none=0.0)
    check(case, torch.float32, rel_err)
    case = make_case(20, 64, [48], [[0], [16]], max_rank=16, dtype=torch.float32, p_none=0.0, slots_used=[1])
    check(case, torch.float32, rel_err)


def test_no_lora_returns_without_launch(seed):
    x, a, b, ranks, scal, offs, meta, _ = make_case(5, 32, [16], [[8]], max_rank=8, dtype=torch.float32)
    ranks, scal = ranks.to(DEV), scal.to(DEV)
    meta.fill([-1] * 5)
    assert meta.no_lora and int(meta.seg_indptr[-1]) == 0
    y = torch.randn(5, 16, device=DEV)
    y0 = y.clone()
    h = lora_shrink(x, a, ranks, meta)
    assert lora_expand(h, b, ranks, scal, offs, meta, y) is y and torch.equal(y, y0)


def test_bad_inputs_raise_value_error(seed):
    x, a, b, ranks, scal, offs, meta, _ = make_case(4, 32, [16, 16], [[8, 8]], max_rank=8, dtype=torch.float32)
    ranks, scal = ranks.to(DEV), scal.to(DEV)
    with pytest.raises(ValueError, match="features"):
        lora_shrink(x[:, :31], a, ranks, meta)
    with pytest.raises(ValueError, match="dtype"):
        lora_shrink(x.half(), a, ranks, meta)
    with pytest.raises(ValueError, match="ranks"):
        lora_shrink(x, a, ranks.long(), meta)
    h = lora_shrink(x, a, ranks, meta)
    y = torch.zeros(4, 32, device=DEV)
    with pytest.raises(ValueError, match="out_offsets"):
        lora_expand(h, b, ranks, scal, (0, 20, 30), meta, y)
    with pytest.raises(ValueError, match="scalings"):
        lora_expand(h, b, ranks, scal.double(), offs, meta, y)
    with pytest.raises(ValueError, match="y must be"):
        lora_expand(h, b, ranks, scal, offs, meta, y[:3])


# ---- GPU, real shapes (Llama-3-8B), bf16 --------------------------------------------------------------------

LLAMA = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
         "down": (14336, [4096])}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", list(LLAMA))
@pytest.mark.parametrize("num_tokens,distinct", [(1, 1), (32, 8), (256, 128), (256, 1)])
def test_llama_shapes_bf16(family, num_tokens, distinct, seed, rel_err):
    in_f, widths = LLAMA[family]
    n = len(widths)
    rank_choices = [8, 16, 64, 128]
    ranks = [[rank_choices[(s + i) % 4] if (s + i) % 7 else 0 for i in range(n)] for s in range(distinct)]
    case = make_case(num_tokens, in_f, widths, ranks, max_rank=128, dtype=torch.bfloat16,
                     p_none=0.1, meta_slots=128)
    check(case, torch.bfloat16, rel_err)


def test_meta_refill_skips_only_a_repeat(seed):
    """A fill with the last fill's slots moves nothing (steady decoding); any other fill, an empty step
    included, rewrites the device grouping, and a later repeat of an earlier step gets it back."""
    steps = [[0, 2, -1, 0], [1, 1, 1, 1], [0, 2, -1, 0], [-1, -1, -1, -1], [0, 2, -1, 0], [2, 0, 0], [2, 0, 0]]
    meta = LoRAMeta.allocate(8, 4, DEV)
    for slots in steps:
        meta.fill(slots)
        fresh = LoRAMeta.allocate(8, 4, DEV).fill(slots)
        n, m = len(slots), sum(x >= 0 for x in slots)     # sorted_idx lists the m LoRA tokens
        assert meta.slots == fresh.slots and meta.num_tokens == n, slots
        if fresh.no_lora:
            assert int(meta.seg_indptr[-1]) == 0, slots
            continue
        for got, want in ((meta.seg_indptr, fresh.seg_indptr), (meta.seg_slot, fresh.seg_slot),
                          (meta.token_slot[:n], fresh.token_slot[:n]), (meta.sorted_idx[:m], fresh.sorted_idx[:m]),
                          (meta.blk_start, fresh.blk_start), (meta.blk_end, fresh.blk_end),
                          (meta.blk_slot, fresh.blk_slot)):
            assert torch.equal(got, want), slots
    before = meta.token_slot.clone()
    meta.token_slot[0] = 99                  # not something a step does: shows that the repeat moved nothing
    meta.fill([2, 0, 0])
    assert int(meta.token_slot[0]) == 99 and torch.equal(meta.token_slot[1:], before[1:])


def test_meta_segment_blocks():
    """Each segment cut into blocks of SEG_BLOCK sorted positions, the last partial, then the blocks of the
    tokens without LoRA (slot -1); past the step's blocks, empty ones (start == end), also after a fill with
    more blocks."""
    from kernels.lora_meta import SEG_BLOCK, max_seg_blocks
    meta = LoRAMeta.allocate(40, 4, DEV)
    assert meta.blk_start.numel() == max_seg_blocks(40, 4) + 3 == 3 + 4 + 3
    meta.fill([3] * 20 + [1] * 17 + [-1, 0, 3])
    lens = {1: 17, 0: 1, 3: 21}                  # segments in slot order: 0, 1, 3
    want = []
    at = 0
    for slot in sorted(lens):
        for b0 in range(0, lens[slot], SEG_BLOCK):
            want.append((at + b0, at + lens[slot], slot))
        at += lens[slot]
    got = list(zip(meta.blk_start.tolist(), meta.blk_end.tolist(), meta.blk_slot.tolist()))
    assert got[: len(want) + 1] == want + [(39, 40, -1)] and all(s >= e for s, e, _ in got[len(want) + 1:])
    assert meta.blk_count.tolist() == [len(want), len(want) + 1] and int(meta.sorted_idx[39]) == 37
    meta.fill([2, 2])
    got = list(zip(meta.blk_start.tolist(), meta.blk_end.tolist(), meta.blk_slot.tolist()))
    assert got[0] == (0, 2, 2) and all(s >= e for s, e, _ in got[1:]) and meta.blk_count.tolist() == [1, 1]
    meta.fill([-1] * 18 + [0])                   # more tokens without LoRA than a block holds
    assert meta.blk_count.tolist() == [1, 3] and meta.blk_slot[:3].tolist() == [0, -1, -1]
    assert meta.blk_start[:3].tolist() == [0, 1, 17] and meta.blk_end[:3].tolist() == [1, 19, 19]
    assert meta.sorted_idx[:19].tolist() == [18] + list(range(18))
