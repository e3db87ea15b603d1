"""LoRA folded into the norm, rotary and SiLU-mul kernels (kernels/fused_lora.py) against the unfused torch ops.

Weights past each slot's rank and partial sums past it are NaN: a kernel that
reads them fails. Outputs start as NaN too (torch.empty is not enough to tell).
"""
import pytest
import torch

from kernels.fused_lora import LoRAWeights, norm_lora, rotary_lora_, shrink_rows, silu_mul_lora
from kernels.fused_lora_torch import norm_lora_ref, rotary_lora_ref, shrink_ref, silu_mul_lora_ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# hidden, heads, kv heads, head_dim, intermediate, tokens; CPU shapes stay small for the interpreter
SHAPES = [(96, 4, 2, 16, 80, 5)] if not CUDA else [(4096, 32, 8, 128, 14336, 32), (4096, 32, 8, 128, 14336, 64)]


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


def partials(h, fam, slots, parts=3):
    """h split into ``parts`` partial sums, NaN wherever the consumer must not read."""
    hp = torch.randn((parts,) + tuple(h.shape), device=DEV) * 0.1
    hp[-1] = h - hp[:-1].sum(0)
    for t, s in enumerate(slots):
        for i in range(h.shape[0]):
            r = int(fam.ranks[s, i]) if s >= 0 else 0
            hp[:, i, t, r:] = float("nan")
    return hp


def valid_h(hp, fam, slots):
    """The partials summed, with the entries a kernel never writes set to 0 (as the reference has them)."""
    h = hp.sum(0)
    for t, s in enumerate(slots):
        for i in range(h.shape[0]):
            h[i, t, (int(fam.ranks[s, i]) if s >= 0 else 0):] = 0
    return h


def ranks_for(slots, n_slices, max_rank):
    """Mixed ranks per slot: full, small, one slice untargeted, empty."""
    pattern = [max_rank, max(1, max_rank // 4), 0, 5 % max_rank or 1]
    return [[pattern[(s + i) % 4] if s % 5 != 4 else 0 for i in range(n_slices)] for s in range(slots)]


def token_slots(t, slots):
    mix = torch.randint(0, slots, (t,)).tolist()
    mix[0] = -1                                   # a row without LoRA, and one with each adapter
    return [-1 if i % 7 == 3 else s for i, s in enumerate(mix)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
@pytest.mark.parametrize("max_rank", [16, 64] if CUDA else [8])
def test_norm_lora_expand_and_shrink(seed, rel_err, dtype, hidden, hq, hk, d, inter, t, max_rank):
    slots = 6
    mix = token_slots(t, slots)
    ts = torch.tensor(mix + [-1, -1], dtype=torch.int32, device=DEV)       # longer than t: a graph's buffer
    f_o = family(hidden, [hidden], ranks_for(slots, 1, max_rank), max_rank, dtype)
    f_qkv = family(hidden, [hq * d, hk * d, hk * d], ranks_for(slots, 3, max_rank), max_rank, dtype)
    x = torch.randn(t, hidden, device=DEV).to(dtype)
    res = torch.randn(t, hidden, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    h_o = shrink_ref(torch.randn(t, hidden, device=DEV).to(dtype), f_o, mix)
    out, s, hp = norm_lora(x, res, w, 1e-6, ts, expand=(partials(h_o, f_o, mix), f_o), shrink=f_qkv)
    ref_out, ref_s, ref_h = norm_lora_ref(x, res, w, 1e-6, mix, expand=(h_o, f_o), shrink=f_qkv)
    assert rel_err(s, ref_s) <= TOL[dtype] and rel_err(out, ref_out) <= TOL[dtype]
    assert rel_err(valid_h(hp, f_qkv, mix), ref_h) <= TOL[dtype]
    none = [i for i, sl in enumerate(mix) if sl < 0]
    assert torch.equal(s[none], (x[none] + res[none])), "rows without LoRA must be the plain residual add"


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_lora_each_part_alone(seed, rel_err, dtype):
    hidden, t, slots = (96, 4, 3) if not CUDA else (4096, 8, 3)
    mix = token_slots(t, slots)
    ts = torch.tensor(mix, dtype=torch.int32, device=DEV)
    f_d = family(hidden, [hidden], ranks_for(slots, 1, 8), 8, dtype)
    f_gu = family(hidden, [40, 40], ranks_for(slots, 2, 8), 8, dtype)
    x = torch.randn(t, hidden, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    # the first layer's input norm: no residual, no expand, a shrink
    out, s, hp = norm_lora(x, None, w, 1e-6, ts, shrink=f_gu)
    ref_out, _, ref_h = norm_lora_ref(x, None, w, 1e-6, mix, shrink=f_gu)
    assert s is x and rel_err(out, ref_out) <= TOL[dtype] and rel_err(valid_h(hp, f_gu, mix), ref_h) <= TOL[dtype]
    # the final norm: expand of the last down, no shrink
    h = shrink_ref(torch.randn(t, hidden, device=DEV).to(dtype), f_d, mix)
    res = torch.randn(t, hidden, device=DEV).to(dtype)
    out, s, hp = norm_lora(x, res, w, 1e-6, ts, expand=(partials(h, f_d, mix, parts=1), f_d))
    ref_out, ref_s, _ = norm_lora_ref(x, res, w, 1e-6, mix, expand=(h, f_d))
    assert hp is None and rel_err(s, ref_s) <= TOL[dtype] and rel_err(out, ref_out) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
def test_rotary_lora(seed, rel_err, dtype, hidden, hq, hk, d, inter, t):
    slots, max_rank = 5, 16 if CUDA else 8
    mix = token_slots(t, slots)
    ts = torch.tensor(mix, dtype=torch.int32, device=DEV)
    f = family(hidden, [hq * d, hk * d, hk * d], ranks_for(slots, 3, max_rank), max_rank, dtype)
    h = shrink_ref(torch.randn(t, hidden, device=DEV).to(dtype), f, mix)
    max_pos = 64
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    emb = torch.outer(torch.arange(max_pos, device=DEV).float(), inv).repeat(1, 2)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    pos = torch.randint(0, max_pos, (t,), device=DEV)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV).to(dtype)
    ref = rotary_lora_ref(qkv, h, f, cos, sin, pos, mix, hq, hk)
    rotary_lora_(qkv, partials(h, f, mix), f, cos, sin, pos, ts, hq, hk)
    assert rel_err(qkv, ref) <= TOL[dtype] * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
def test_silu_mul_lora(seed, rel_err, dtype, hidden, hq, hk, d, inter, t):
    slots, max_rank = 4, 16 if CUDA else 8
    mix = token_slots(t, slots)
    ts = torch.tensor(mix, dtype=torch.int32, device=DEV)
    f_gu = family(hidden, [inter, inter], ranks_for(slots, 2, max_rank), max_rank, dtype)
    f_d = family(inter, [hidden], ranks_for(slots, 1, max_rank), max_rank, dtype)
    h = shrink_ref(torch.randn(t, hidden, device=DEV).to(dtype), f_gu, mix)
    gu = torch.randn(t, 2 * inter, device=DEV).to(dtype)
    act, hp = silu_mul_lora(gu, ts, expand=(partials(h, f_gu, mix), f_gu), shrink=f_d)
    ref_act, ref_h = silu_mul_lora_ref(gu, mix, expand=(h, f_gu), shrink=f_d)
    assert rel_err(act, ref_act) <= TOL[dtype] * 2
    assert rel_err(valid_h(hp, f_d, mix), ref_h) <= TOL[dtype] * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_rows(seed, rel_err, dtype):
    t, n, slots = (6, 72, 4) if not CUDA else (32, 4096, 32)
    mix = token_slots(t, slots)
    f = family(n, [n], ranks_for(slots, 1, 16), 16, dtype)
    x = torch.randn(t, n, device=DEV).to(dtype)
    hp = shrink_rows(x, f, torch.tensor(mix, dtype=torch.int32, device=DEV))
    assert rel_err(valid_h(hp, f, mix), shrink_ref(x, f, mix)) <= TOL[dtype]


def test_bad_inputs(seed):
    f = family(16, [16], [[4]], 4, torch.float32)
    ts = torch.zeros(3, dtype=torch.int32, device=DEV)
    x = torch.randn(3, 16, device=DEV)
    w = torch.ones(16, device=DEV)
    with pytest.raises(ValueError, match="token_slot"):
        norm_lora(x, None, w, 1e-6, ts.long(), shrink=f)
    with pytest.raises(ValueError, match="partials"):
        norm_lora(x, None, w, 1e-6, ts, expand=(torch.zeros(1, 1, 2, 4, device=DEV), f))
    with pytest.raises(ValueError, match="lora_a"):
        shrink_rows(torch.randn(3, 15, device=DEV), f, ts)
    with pytest.raises(ValueError, match="heads"):
        rotary_lora_(torch.randn(3, 30, device=DEV), torch.zeros(1, 3, 3, 4, device=DEV), f,
                     torch.ones(4, 2, device=DEV), torch.ones(4, 2, device=DEV), torch.zeros(3, device=DEV), ts, 2, 2)
