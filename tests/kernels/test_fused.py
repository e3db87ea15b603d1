"""Fused RMSNorm(+residual), rotary and SiLU-mul (Triton) against their torch references."""
import pytest
import torch

from kernels.fused import add_rms_norm, rotary_, silu_mul
from kernels.fused_torch import add_rms_norm_ref, rms_norm_ref, rotary_ref, silu_mul_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
SHAPES = [(1, 64), (7, 96), (13, 200)] if DEV == "cpu" else [(1, 4096), (33, 4096), (256, 5120)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n", SHAPES)
def test_add_rms_norm(seed, rel_err, dtype, rows, n):
    x = torch.randn(rows, n, device=DEV).to(dtype)
    r = torch.randn(rows, n, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(n, device=DEV)).to(dtype)
    out, res = add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = add_rms_norm_ref(x, r, w, 1e-6)
    assert rel_err(res, ref_res) <= TOL[dtype] and rel_err(out, ref_out) <= TOL[dtype]
    out, same = add_rms_norm(x, None, w, 1e-6)
    assert same is x and rel_err(out, rms_norm_ref(x, w, 1e-6)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, hq, hk, d", [(5, 4, 2, 16), (9, 6, 1, 34)] if DEV == "cpu" else [(256, 32, 8, 128)])
def test_rotary(seed, rel_err, dtype, t, hq, hk, d):
    max_pos = 64
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    freqs = torch.outer(torch.arange(max_pos, device=DEV).float(), inv)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    pos = torch.randint(0, max_pos, (t,), device=DEV)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV).to(dtype)     # q and k are strided views, as in the model
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    ref_q, ref_k = rotary_ref(q, cos[pos], sin[pos]), rotary_ref(k, cos[pos], sin[pos])
    rotary_(q, k, cos, sin, pos)
    assert rel_err(q, ref_q) <= TOL[dtype] * 2 and rel_err(k, ref_k) <= TOL[dtype] * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, i", [(3, 40), (11, 1500)] if DEV == "cpu" else [(1, 14336), (256, 14336)])
def test_silu_mul(seed, rel_err, dtype, t, i):
    gu = torch.randn(t, 2 * i, device=DEV).to(dtype)
    assert rel_err(silu_mul(gu), silu_mul_ref(gu)) <= TOL[dtype]


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(torch.randn(2, 8), None, torch.randn(9), 1e-6)
    with pytest.raises(ValueError, match="gate_up"):
        silu_mul(torch.randn(2, 7))
