"""LoRA folded into the norm, rotary and SiLU-mul kernels (kernels/fused_lora.py) against the unfused torch ops.

Weights past each slot's rank are NaN, and so are the h entries a consumer must
not read (past a rank, rows without LoRA): a kernel that reads them fails.
"""
import pytest
import torch

from kernels.fused_lora import LoRAWeights, norm_lora, rotary_lora_, shrink_cols, silu_mul_lora
from kernels.fused_lora_torch import norm_lora_ref, rotary_lora_ref, shrink_ref, silu_mul_lora_ref
from kernels.lora_meta import LoRAMeta

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# hidden, heads, kv heads, head_dim, intermediate, tokens; CPU shapes stay small for the interpreter
SHAPES = [(96, 2, 1, 32, 80, 5), (64, 2, 1, 16, 40, 19)] if not CUDA else \
    [(4096, 32, 8, 128, 14336, 32), (4096, 32, 8, 128, 14336, 64), (4096, 32, 8, 128, 14336, 7)]


def family(n_in, widths, ranks, max_rank, dtype):
    """Random stacked slots; entries past each slot's rank are NaN."""
    slots, n = len(ranks), len(widths)
    a = (torch.randn(slots, n, max_rank, n_in, device=DEV) / n_in ** 0.5)
    b = (torch.randn(slots, max_rank, sum(widths), device=DEV) / max_rank ** 0.5)
    r = torch.tensor(ranks, dtype=torch.int32).reshape(slots, n)
    offs = [0] + torch.tensor(widths).cumsum(0).tolist()
    for s in range(slots):
        for i in range(n):
            a[s, i, r[s, i]:] = float("nan")
            b[s, r[s, i]:, offs[i]:offs[i + 1]] = float("nan")
    return LoRAWeights(a.to(dtype), b.to(dtype), r.to(DEV), (torch.rand(slots, n, device=DEV) + 0.5).float())


def poisoned(h, fam, slots):
    """h as a consumer gets it, NaN wherever it must not read."""
    h = h.clone()
    for t, s in enumerate(slots):
        for i in range(h.shape[0]):
            h[i, t, (int(fam.ranks[s, i]) if s >= 0 else 0):] = float("nan")
    return h


def ranks_for(slots, n_slices, max_rank):
    """Mixed ranks per slot: full, small, one slice untargeted, empty."""
    pattern = [max_rank, max(1, max_rank // 4), 0, 5 % max_rank or 1]
    return [[pattern[(s + i) % 4] if s % 5 != 4 else 0 for i in range(n_slices)] for s in range(slots)]


def token_mix(t, slots):
    mix = torch.randint(0, slots, (t,)).tolist()
    mix[0] = -1                                   # rows without LoRA among the others
    mix = [-1 if i % 7 == 3 else s for i, s in enumerate(mix)]
    meta = LoRAMeta.allocate(t + 2, slots + 2, DEV).fill(mix)     # capacity above the step: a graph's buffers
    return mix, meta


def zeros_h(fam, t):
    return torch.zeros((fam.lora_a.shape[1], t, fam.lora_a.shape[2]), device=DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
@pytest.mark.parametrize("max_rank", [16, 64] if CUDA else [8])
@pytest.mark.parametrize("slots", [1, 6])                 # one adapter: the straight-line path, no segment loop
def test_norm_lora_expand_and_shrink(seed, rel_err, dtype, hidden, hq, hk, d, inter, t, max_rank, slots):
    mix, meta = token_mix(t, slots)
    f_o = family(hidden, [hidden], ranks_for(slots, 1, max_rank), max_rank, dtype)
    f_qkv = family(hidden, [hq * d, hk * d, hk * d], ranks_for(slots, 3, max_rank), max_rank, dtype)
    x = torch.randn(t, hidden, device=DEV).to(dtype)
    res = torch.randn(t, hidden, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    h_o = shrink_ref(torch.randn(t, hidden, device=DEV).to(dtype), f_o, mix)
    h = zeros_h(f_qkv, t)
    out, s = norm_lora(x, res, w, 1e-6, meta, expand=(poisoned(h_o, f_o, mix), f_o), shrink=(h, f_qkv))
    ref_out, ref_s, ref_h = norm_lora_ref(x, res, w, 1e-6, mix, expand=(h_o, f_o), shrink=f_qkv)
    assert rel_err(s, ref_s) <= TOL[dtype] and rel_err(out, ref_out) <= TOL[dtype]
    assert rel_err(h, ref_h) <= TOL[dtype]
    none = [i for i, sl in enumerate(mix) if sl < 0]
    assert torch.equal(s[none], x[none] + res[none]), "rows without LoRA must be the plain residual add"
    assert not h[:, none].any(), "rows without LoRA get no h"


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_lora_each_part_alone(seed, rel_err, dtype):
    hidden, t, slots = (96, 4, 3) if not CUDA else (4096, 8, 3)
    mix, meta = token_mix(t, slots)
    f_d = family(hidden, [hidden], ranks_for(slots, 1, 8), 8, dtype)
    f_gu = family(hidden, [40, 40], ranks_for(slots, 2, 8), 8, dtype)
    x = torch.randn(t, hidden, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    # the first layer's input norm: no residual, no expand, a shrink
    h = zeros_h(f_gu, t)
    out, s = norm_lora(x, None, w, 1e-6, meta, shrink=(h, f_gu))
    ref_out, _, ref_h = norm_lora_ref(x, None, w, 1e-6, mix, shrink=f_gu)
    assert s is x and rel_err(out, ref_out) <= TOL[dtype] and rel_err(h, ref_h) <= TOL[dtype]
    # the final norm: expand of the last down, no shrink
    h = shrink_ref(torch.randn(t, hidden, device=DEV).to(dtype), f_d, mix)
    res = torch.randn(t, hidden, device=DEV).to(dtype)
    out, s = norm_lora(x, res, w, 1e-6, meta, expand=(poisoned(h, f_d, mix), f_d))
    ref_out, ref_s, _ = norm_lora_ref(x, res, w, 1e-6, mix, expand=(h, f_d))
    assert rel_err(s, ref_s) <= TOL[dtype] and rel_err(out, ref_out) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
@pytest.mark.parametrize("slots", [1, 5])
def test_rotary_lora(seed, rel_err, dtype, hidden, hq, hk, d, inter, t, slots):
    max_rank = 16 if CUDA else 8
    mix, meta = token_mix(t, slots)
    f = family(hidden, [hq * d, hk * d, hk * d], ranks_for(slots, 3, max_rank), max_rank, dtype)
    h = shrink_ref(torch.randn(t, hidden, device=DEV).to(dtype), f, mix)
    max_pos = 64
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    emb = torch.outer(torch.arange(max_pos, device=DEV).float(), inv).repeat(1, 2)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    pos = torch.randint(0, max_pos, (t,), device=DEV)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV).to(dtype)
    ref = rotary_lora_ref(qkv, h, f, cos, sin, pos, mix, hq, hk)
    rotary_lora_(qkv, poisoned(h, f, mix), f, cos, sin, pos, meta, hq, hk)
    assert rel_err(qkv, ref) <= TOL[dtype] * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
@pytest.mark.parametrize("slots", [1, 4])
def test_silu_mul_lora(seed, rel_err, dtype, hidden, hq, hk, d, inter, t, slots):
    max_rank = 16 if CUDA else 8
    mix, meta = token_mix(t, slots)
    f_gu = family(hidden, [inter, inter], ranks_for(slots, 2, max_rank), max_rank, dtype)
    f_d = family(inter, [hidden], ranks_for(slots, 1, max_rank), max_rank, dtype)
    h = shrink_ref(torch.randn(t, hidden, device=DEV).to(dtype), f_gu, mix)
    gu = torch.randn(t, 2 * inter, device=DEV).to(dtype)
    hd = zeros_h(f_d, t)
    act = silu_mul_lora(gu, meta, expand=(poisoned(h, f_gu, mix), f_gu), shrink=(hd, f_d))
    ref_act, ref_h = silu_mul_lora_ref(gu, mix, expand=(h, f_gu), shrink=f_d)
    assert rel_err(act, ref_act) <= TOL[dtype] * 2
    assert rel_err(hd, ref_h) <= TOL[dtype] * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_cols(seed, rel_err, dtype):
    t, n, slots = (6, 72, 4) if not CUDA else (32, 4096, 32)
    mix, meta = token_mix(t, slots)
    f = family(n, [n], ranks_for(slots, 1, 16), 16, dtype)
    x = torch.randn(t, n, device=DEV).to(dtype)
    h = zeros_h(f, t)
    shrink_cols(x, h, f, meta)
    assert rel_err(h, shrink_ref(x, f, mix)) <= TOL[dtype]


def test_bad_inputs(seed):
    f = family(16, [16], [[4]], 4, torch.float32)
    _, meta = token_mix(3, 1)
    x = torch.randn(3, 16, device=DEV)
    w = torch.ones(16, device=DEV)
    with pytest.raises(ValueError, match="at most"):
        norm_lora(torch.randn(65, 16, device=DEV), None, w, 1e-6, LoRAMeta.allocate(70, 2, DEV).fill([0] * 65))
    with pytest.raises(ValueError, match="h must be"):
        norm_lora(x, None, w, 1e-6, meta, expand=(torch.zeros(1, 2, 4, device=DEV), f))
    with pytest.raises(ValueError, match="lora_a"):
        shrink_cols(torch.randn(3, 15, device=DEV), torch.zeros(1, 3, 4, device=DEV), f, meta)
    with pytest.raises(ValueError, match="heads"):
        rotary_lora_(torch.randn(3, 30, device=DEV), torch.zeros(3, 3, 4, device=DEV), f,
                     torch.ones(4, 2, device=DEV), torch.ones(4, 2, device=DEV), torch.zeros(3, device=DEV), meta, 2, 2)
