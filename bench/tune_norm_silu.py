"""The fused-LoRA norm, SiLU-mul and rotary kernels (kernels/fused_lora.py) by launch parameters, against the
plain kernels, with one adapter and with 32 (one per token); the norm both from a GEMM's columns (o) and
from SiLU-mul's parts (down). Batch 32, Llama-3-8B shapes, rank 16, bf16. Each timing is one launch inside
a graph of 16 calls over 16 layers' own weights (so B comes from DRAM, as in a step), L2 flushed before
each replay.

    python bench/tune_norm_silu.py      (results: bench/results/2026-11-24-h100-norm-silu-variants*.txt;
                                         the variants these files name but this script no longer runs
                                         were removed after losing there: bench/NOTES-kernels.md v6; the
                                         GEMM padding probe those files end with is bench/tune_tail_gemm.py)
"""
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
from kernels import fused, fused_lora as fl
from bench.fused_lora_setup import H, I, LAYERS, T, dev, dt, fam, gemm_h, per_call, rotary_plain, steps

torch.manual_seed(0)


tail_pos, metas = steps()
f_o = [fam(H, [H]) for _ in range(LAYERS)]
f_d = [fam(I, [H]) for _ in range(LAYERS)]
f_gu = [fam(H, [I, I]) for _ in range(LAYERS)]
x = [torch.randn(T, H, device=dev).to(dt) for _ in range(LAYERS)]
res = torch.randn(T, H, device=dev).to(dt)
w = torch.ones(H, device=dev, dtype=dt)
gu = [torch.randn(T, 2 * I, device=dev).to(dt) for _ in range(LAYERS)]
print(f"add_rms_norm                  {per_call(lambda i: fused.add_rms_norm(x[i], res, w, 1e-5)):6.2f} us")
print(f"silu_mul                      {per_call(lambda i: fused.silu_mul(gu[i])):6.2f} us")
cos = torch.randn(1024, 128, device=dev).to(dt)
pos = torch.arange(T, device=dev)
f_qkv = [fam(H, [4096, 1024, 1024]) for _ in range(LAYERS)]
qkv = [torch.randn(T, 6144, device=dev).to(dt) for _ in range(LAYERS)]
print(f"rotary                        {per_call(lambda i: rotary_plain(qkv[i], cos, cos, pos)):6.2f} us")
NORMS = [(8, 8), (8, 16), (4, 16), (16, 16)]                # (warps, rank chunk)

for label, (meta, k) in metas.items():
    print(f"\n== {label}", flush=True)
    h_o, h_gu, h_qkv = gemm_h(H, 1, k), gemm_h(2 * I, 2, k), gemm_h(6144, 3, k)
    rp = fl.row_positions(meta, tail_pos)
    for nw, rc in NORMS:
        us = per_call(lambda i: fl.norm_lora(x[i], res, w, 1e-5, meta, h_o, f_o[i], tail_pos, rp, num_warps=nw,
                                             rank_chunk=rc))
        print(f"norm_lora(o) warps {nw:2d} rc {rc:2d}: {us:6.2f} us", flush=True)
    for bn, snw in ((64, 2), (64, 4), (128, 4)):
        act, parts = fl.silu_mul_lora(gu[0], meta, h_gu, f_gu[0], f_d[0], tail_pos, block_n=bn, num_warps=snw)
        silu = per_call(lambda i: fl.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], f_d[i], tail_pos, block_n=bn,
                                                   num_warps=snw))
        print(f"silu bn {bn:3d} warps {snw} ({parts.shape[0]:3d} parts): {silu:6.2f} us", flush=True)
        for nw, rc in NORMS:
            norm = per_call(lambda i: fl.norm_lora(x[i], res, w, 1e-5, meta, parts, f_d[i], tail_pos, num_warps=nw,
                                                   rank_chunk=rc))
            print(f"    norm_lora(down) warps {nw:2d} rc {rc:2d}: {norm:6.2f} us", flush=True)
    for nw in (4, 8):
        us = per_call(lambda i: fl.rotary_lora_(qkv[i], h_qkv, f_qkv[i], cos, cos, pos, meta, 32, 8, tail_pos,
                                                num_warps=nw))
        print(f"rotary_lora warps {nw}: {us:6.2f} us", flush=True)
