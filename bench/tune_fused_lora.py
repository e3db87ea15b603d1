"""Tuning the one-adapter fused LoRA kernels (kernels/fused_lora.py) on the GPU: each variant against the
plain kernel it replaces, and the base GEMMs with extra rows under them (LoRA A in the GEMM's tail).
Batch 32, Llama-3-8B shapes, rank 16, bf16; each timing is one launch inside a graph of 20 (L2 flushed
before each replay by do_bench; the 2026-11-24 results were taken without that flush).

    python bench/tune_fused_lora.py        (results of 2026-11-24: bench/results/2026-11-24-h100-fused-lora-variants.txt)
"""
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
import torch.nn.functional as F
from kernels import fused, fused_lora as fl
from bench.kernels import graphed, median_us
from kernels.lora_meta import LoRAMeta

dev, dt, T, R, H, I = "cuda", torch.bfloat16, 32, 16, 4096, 14336
torch.manual_seed(0)


def fam(n_in, widths, slots=4):
    n = len(widths)
    return fl.LoRAWeights((torch.randn(slots, n, R, n_in, device=dev) * 0.02).to(dt),
                          (torch.randn(slots, R, sum(widths), device=dev) * 0.02).to(dt),
                          torch.full((slots, n), R, dtype=torch.int32, device=dev),
                          torch.ones(slots, n, device=dev))


def timeit(fn, reps=20):
    """us per call of fn, replayed ``reps`` times inside one CUDA graph (launch gaps included)."""
    return median_us(graphed(lambda: [fn() for _ in range(reps)])) / reps


meta = LoRAMeta.allocate(64, 8, dev).fill([1] * T)
f_o, f_gu, f_d, f_qkv = fam(H, [H]), fam(H, [I, I]), fam(I, [H]), fam(H, [4096, 1024, 1024])
x = torch.randn(T, H, device=dev).to(dt)
res = torch.randn(T, H, device=dev).to(dt)
w = torch.ones(H, device=dev, dtype=dt)
parts = torch.randn(112, T, 16, device=dev)
h1 = torch.randn(1, T, 16, device=dev).to(dt)
print(f"add_rms_norm                  {timeit(lambda: fused.add_rms_norm(x, res, w, 1e-5)):6.2f} us")
for nw in (4, 8, 16, 32):
    for rc in (2, 4, 8, 16):
        a = timeit(lambda: fl.norm_lora(x, res, w, 1e-5, meta, parts, f_d, rank_chunk=rc, num_warps=nw))
        b = timeit(lambda: fl.norm_lora(x, res, w, 1e-5, meta, h1, f_o, rank_chunk=rc, num_warps=nw))
        print(f"norm_lora warps {nw:2d} rc {rc:2d}: expand(parts) {a:6.2f} us | expand(tail) {b:6.2f} us", flush=True)
gu = torch.randn(T, 2 * I, device=dev).to(dt)
hg = torch.randn(2, T, 16, device=dev)
print(f"silu_mul                      {timeit(lambda: fused.silu_mul(gu)):6.2f} us")
for bn in (32, 64, 128, 256):
    for nw in (2, 4, 8):
        print(f"silu_mul_lora bn {bn:3d} warps {nw}: {timeit(lambda: fl.silu_mul_lora(gu, meta, hg, f_gu, f_d, block_n=bn, num_warps=nw)):6.2f} us", flush=True)
qkv = torch.randn(T, 6144, device=dev).to(dt)
hq = torch.randn(3, T, 16, device=dev).to(dt)
cos = torch.randn(1024, 128, device=dev).to(dt)
pos = torch.arange(T, device=dev)
print(f"rotary                        {timeit(lambda: fused.rotary_(qkv[:, :4096].view(T, 32, 128), qkv[:, 4096:5120].view(T, 8, 128), cos, cos, pos)):6.2f} us")
print(f"rotary_lora                   {timeit(lambda: fl.rotary_lora_(qkv, hq, f_qkv, cos, cos, pos, meta, 32, 8)):6.2f} us")
for name, n, k, extras in (("gate_up", 2 * I, H, (0, 64, 128, 192, 256)), ("down", H, I, (0, 64, 128, 256)),
                           ("qkv", 6144, H, (0, 64)), ("o", H, H, (0, 64))):
    xx = torch.randn(T, k, device=dev).to(dt)
    out = []
    for e in extras:
        W = torch.randn(n + e, k, device=dev).to(dt)
        out.append(f"+{e}: {timeit(lambda: F.linear(xx, W)):6.2f}")
        del W
    print(f"GEMM {name:8s} " + "  ".join(out), flush=True)
