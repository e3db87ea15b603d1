"""One adapter's LoRA folded into the norm, rotary and SiLU-mul kernels and the qkv/o GEMMs
(kernels/fused_lora.py) against the unfused torch ops.

Weights past each slot's rank are NaN, and so are the h entries a consumer must
not read (past a rank, rows without LoRA): a kernel that reads them fails.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.fused_lora import LoRATails, LoRAWeights, norm_lora, rotary_lora_, silu_mul_lora
from kernels.fused_lora_torch import norm_lora_ref, rotary_lora_ref, shrink_ref, silu_mul_lora_ref
from kernels.lora_meta import LoRAMeta

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
SLOTS = 4

# hidden, heads, kv heads, head_dim, intermediate, tokens; CPU shapes stay small for the interpreter
SHAPES = [(96, 2, 1, 32, 200, 5), (64, 2, 1, 16, 136, 19)] if not CUDA else \
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


def ranks_for(n_slices, max_rank):
    """Mixed ranks across slices: full, small, untargeted, odd."""
    pattern = [max_rank, max(1, max_rank // 4), 0, 5 % max_rank or 1]
    return [[pattern[(s + i) % 4] for i in range(n_slices)] for s in range(SLOTS)]


def poison(h, fam, slots):
    """h [parts, T, >= R] as a consumer gets it: NaN past the token's rank and on rows without LoRA."""
    h = h.clone()
    for t, s in enumerate(slots):
        for i in range(h.shape[0]):
            r = int(fam.ranks[s, i % fam.ranks.shape[1]]) if s >= 0 else 0
            h[i, t, r:] = float("nan")
    return h


def token_mix(t):
    """One adapter (not in slot 0, so the slot index matters) with rows without LoRA among its rows."""
    slot = int(torch.randint(1, SLOTS, (1,)))
    mix = [-1 if i == 0 or i % 7 == 3 else slot for i in range(t)]
    return mix, LoRAMeta.allocate(t + 2, SLOTS + 2, DEV).fill(mix)     # capacity above the step: a graph's buffers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
@pytest.mark.parametrize("max_rank", [16, 64] if CUDA else [8])
def test_norm_lora_expand_from_parts(seed, rel_err, dtype, hidden, hq, hk, d, inter, t, max_rank):
    """The input norm: expand of the previous down from SiLU-mul's float32 parts, residual, norm."""
    mix, meta = token_mix(t)
    f_d = family(inter, [hidden], ranks_for(1, max_rank), max_rank, dtype)
    x = torch.randn(t, hidden, device=DEV).to(dtype)
    res = torch.randn(t, hidden, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    parts = torch.stack([shrink_ref(torch.randn(t, inter, device=DEV).to(dtype), f_d, mix)[0] for _ in range(5)])
    out, s = norm_lora(x, res, w, 1e-6, meta, poison(parts, f_d, mix), f_d)
    ref_out, ref_s = norm_lora_ref(x, res, w, 1e-6, mix, parts, f_d)
    assert rel_err(s, ref_s) <= TOL[dtype] and rel_err(out, ref_out) <= TOL[dtype]
    none = [i for i, sl in enumerate(mix) if sl < 0]
    assert torch.equal(s[none], x[none] + res[none]), "rows without LoRA must be the plain residual add"


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_lora_expand_from_gemm_columns(seed, rel_err, dtype):
    hidden, t, r = (96, 4, 8) if not CUDA else (4096, 8, 16)
    mix, meta = token_mix(t)
    f_o = family(hidden, [hidden], ranks_for(1, r), r, dtype)
    x = torch.randn(t, hidden, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    # the post-attention norm: expand of o from the o GEMM's extra columns (model dtype, a strided view)
    y = torch.randn(t, hidden + 64, device=DEV).to(dtype)
    tail = y[:, hidden:hidden + r].as_strided((1, t, r), (r, y.stride(0), 1))
    ref_tail = tail.clone()
    y[:, hidden:hidden + r] = poison(tail.clone(), f_o, mix)[0]
    for res in (torch.randn(t, hidden, device=DEV).to(dtype), None):      # without a residual: s = x + expand
        out, s = norm_lora(x, res, w, 1e-6, meta, tail, f_o)
        ref_out, ref_s = norm_lora_ref(x, res, w, 1e-6, mix, ref_tail, f_o)
        assert rel_err(s, ref_s) <= TOL[dtype] and rel_err(out, ref_out) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
def test_rotary_lora_from_gemm_columns(seed, rel_err, dtype, hidden, hq, hk, d, inter, t):
    max_rank = 16 if CUDA else 8
    mix, meta = token_mix(t)
    f = family(hidden, [hq * d, hk * d, hk * d], ranks_for(3, max_rank), max_rank, dtype)
    tails = LoRATails(3, max_rank)
    tails.add(torch.randn(f.lora_b.shape[2], hidden, device=DEV).to(dtype))
    tails.a_rows(0).copy_(f.lora_a[mix[1]].nan_to_num(0.0))
    y = F.linear(torch.randn(t, hidden, device=DEV).to(dtype), tails.ext[0])
    qkv, h = tails.split(y)
    ref_h = h.clone()
    h.copy_(poison(h, f, mix))                    # writes through into y's extra columns
    max_pos = 64
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    emb = torch.outer(torch.arange(max_pos, device=DEV).float(), inv).repeat(1, 2)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    pos = torch.randint(0, max_pos, (t,), device=DEV)
    ref = rotary_lora_ref(qkv.clone(), ref_h, f, cos, sin, pos, mix, hq, hk)
    rotary_lora_(qkv, h, f, cos, sin, pos, meta, hq, hk)
    assert rel_err(qkv, ref) <= TOL[dtype] * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
def test_silu_mul_lora(seed, rel_err, dtype, hidden, hq, hk, d, inter, t):
    """gate/up's h from the gate_up GEMM's extra columns; down's shrink as per-tile parts."""
    max_rank = 16 if CUDA else 8
    mix, meta = token_mix(t)
    f_gu = family(hidden, [inter, inter], ranks_for(2, max_rank), max_rank, dtype)
    f_d = family(inter, [hidden], ranks_for(1, max_rank), max_rank, dtype)
    tails = LoRATails(2, max_rank)
    tails.add((torch.randn(2 * inter, hidden, device=DEV) / hidden ** 0.5).to(dtype))
    tails.a_rows(0).copy_(f_gu.lora_a[mix[1]].nan_to_num(0.0))
    gu, h = tails.split(F.linear(torch.randn(t, hidden, device=DEV).to(dtype), tails.ext[0]))
    ref_gu, ref_h = gu.clone(), h.clone()
    h.copy_(poison(h, f_gu, mix))
    act, parts = silu_mul_lora(gu, meta, h, f_gu, f_d)
    ref_act, ref_hd = silu_mul_lora_ref(ref_gu, mix, expand=(ref_h, f_gu), shrink=f_d)
    assert rel_err(act, ref_act) <= TOL[dtype] * 2
    assert parts.shape[0] > 1, "several column tiles, so the parts really are summed"
    assert rel_err(parts.sum(0)[None, :, :max_rank], ref_hd) <= TOL[dtype] * 2


def test_tails_hold_the_base_weight_and_one_adapter(seed, rel_err):
    n_out, n_in, t, r = 40, 24, 3, 8
    w = [torch.randn(n_out, n_in, device=DEV) for _ in range(2)]
    bias = [torch.randn(n_out, device=DEV), None]
    tails = LoRATails(3, r)
    base = [tails.add(wi, b) for wi, b in zip(w, bias)]
    a = torch.randn(3, r, n_in, device=DEV)
    tails.a_rows(1).copy_(a)
    x = torch.randn(t, n_in, device=DEV)
    y, h = tails.split(F.linear(x, tails.ext[1], tails.bias[1]))
    assert torch.equal(base[1], w[1]) and base[1].data_ptr() == tails.ext[1].data_ptr()
    assert (tails.ext[1].shape[0] - n_out) % LoRATails.PAD == 0
    assert rel_err(y, x @ w[1].T) <= 1e-6 and rel_err(h, torch.einsum("tk,irk->itr", x, a)) <= 1e-6
    y0, _ = tails.split(F.linear(x, tails.ext[0], tails.bias[0]))
    assert rel_err(y0, x @ w[0].T + bias[0]) <= 1e-6
    with pytest.raises(ValueError, match="every layer"):
        tails.add(torch.randn(n_out + 1, n_in, device=DEV))


def test_bad_inputs(seed):
    f = family(16, [16], [[4]] * SLOTS, 4, torch.float32)
    _, meta = token_mix(3)
    x = torch.randn(3, 16, device=DEV)
    w = torch.ones(16, device=DEV)
    with pytest.raises(ValueError, match="at most"):
        norm_lora(torch.randn(65, 16, device=DEV), None, w, 1e-6, LoRAMeta.allocate(70, 2, DEV).fill([0] * 65),
                  torch.zeros(1, 65, 4, device=DEV), f)
    with pytest.raises(ValueError, match="one adapter"):
        norm_lora(x, None, w, 1e-6, LoRAMeta.allocate(4, 4, DEV).fill([0, 1, 0]), torch.zeros(1, 3, 4, device=DEV), f)
    with pytest.raises(ValueError, match="h must be"):
        norm_lora(x, None, w, 1e-6, meta, torch.zeros(1, 2, 4, device=DEV), f)
    with pytest.raises(ValueError, match="lora_b"):
        norm_lora(torch.randn(3, 15, device=DEV), None, torch.ones(15, device=DEV), 1e-6, meta,
                  torch.zeros(1, 3, 4, device=DEV), f)
    with pytest.raises(ValueError, match="heads"):
        rotary_lora_(torch.randn(3, 30, device=DEV), torch.zeros(3, 3, 4, device=DEV), f,
                     torch.ones(4, 2, device=DEV), torch.ones(4, 2, device=DEV), torch.zeros(3, device=DEV), meta, 2, 2)
