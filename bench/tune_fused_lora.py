"""Tuning the fused LoRA kernels (kernels/fused_lora.py) on the GPU: each variant against the plain kernel
it replaces, with one adapter (the straight-line kernels) and with 32 (one per token: the per-row ones).
The base GEMMs with the A rows of 1 and 32 adapters under them, which the results files also hold, are
probed by bench/tune_tail_gemm.py. Batch 32, Llama-3-8B shapes, rank 16,
bf16; each timing is one launch inside a graph of 20 (L2 flushed before each replay by do_bench; the
first 2026-11-24 results were taken without that flush).

    python bench/tune_fused_lora.py      (results: bench/results/2026-11-2[45]-h100-fused-lora-variants*.txt)
"""
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
from kernels import fused, fused_lora as fl
from bench.kernels import graphed, median_us
from bench.fused_lora_setup import H, I, T, dev, fam, gemm_h, small_inputs, steps

torch.manual_seed(0)


def timeit(fn, reps=20):
    """us per call of fn, replayed ``reps`` times inside one CUDA graph (launch gaps included)."""
    return median_us(graphed(lambda: [fn() for _ in range(reps)])) / reps


tail_pos, metas = steps()
f_o, f_gu, f_d, f_qkv = fam(H, [H]), fam(H, [I, I]), fam(I, [H]), fam(H, [4096, 1024, 1024])
x, res, w, gu, qkv, cos, pos = small_inputs()
parts = torch.randn(224, T, 16, device=dev)
parts = parts.as_strided((224, T, 1, 1, 16), (T * 16, 16, 0, 16, 1))
print(f"add_rms_norm                  {timeit(lambda: fused.add_rms_norm(x, res, w, 1e-5)):6.2f} us")
print(f"silu_mul                      {timeit(lambda: fused.silu_mul(gu)):6.2f} us")
print(f"rotary                        {timeit(lambda: fused.rotary_(qkv[:, :4096].view(T, 32, 128), qkv[:, 4096:5120].view(T, 8, 128), cos, cos, pos)):6.2f} us")
for label, (meta, k) in metas.items():
    print(f"\n== {label}", flush=True)
    h_o, h_gu, h_qkv = gemm_h(H, 1, k), gemm_h(2 * I, 2, k), gemm_h(6144, 3, k)
    rp = fl.row_positions(meta, tail_pos)
    for nw in (4, 8, 16):
        for rc in (4, 8, 16):
            a = timeit(lambda: fl.norm_lora(x, res, w, 1e-5, meta, parts, f_d, tail_pos, rank_chunk=rc, num_warps=nw))
            b = timeit(lambda: fl.norm_lora(x, res, w, 1e-5, meta, h_o, f_o, tail_pos, rp, rank_chunk=rc,
                                            num_warps=nw))
            print(f"norm_lora warps {nw:2d} rc {rc:2d}: expand(parts) {a:6.2f} us | expand(tail) {b:6.2f} us", flush=True)
    for bn in (16, 32, 64, 128):
        for nw in (1, 2, 4, 8):
            us = timeit(lambda: fl.silu_mul_lora(gu, meta, h_gu, f_gu, f_d, tail_pos, block_n=bn, num_warps=nw))
            print(f"silu_mul_lora bn {bn:3d} warps {nw}: {us:6.2f} us", flush=True)
    for nw in (2, 4, 8):
        us = timeit(lambda: fl.rotary_lora_(qkv, h_qkv, f_qkv, cos, cos, pos, meta, 32, 8, tail_pos, num_warps=nw))
        print(f"rotary_lora warps {nw}: {us:6.2f} us", flush=True)
