"""The LoRA norm with its 1/rms deferred (kernels/fused_lora_norm.py ``norm_lora_unscaled``) by tile shape,
against the row norm it replaces (``norm_lora``) and the plain norm, and what rotary and SiLU-mul pay for
applying the 1/rms, per workload of the engine bench at its tail bucket. Llama-3-8B shapes, rank 16, bf16; each
timing is one launch inside a graph of 16 calls over 16 layers' own weights (B from DRAM), L2 flushed before
each replay. The last line of a workload sums what a step of 32 layers would gain: two norms (one where down's
shrink runs in SiLU-mul: that norm stays a row norm), one rotary, one SiLU-mul.

    python bench/tune_deferred_norm.py [--tokens 32 256] [--workloads identical uniform skewed distinct]
                                       (results: bench/results/2026-11-24-h100-deferred-norm.txt)
"""
import argparse
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
from kernels import fused, fused_lora as fl
from kernels import fused_lora_norm as fln
from kernels.lora_meta import LoRAMeta
from bench.fused_lora_setup import H, I, R, dev, dt, fam as setup_fam, workload_slots
from bench.kernels import graphed, median_us
from worker.model.llama import TAIL_BUCKETS, DOWN_GEMM_MAX_POSITIONS, DOWN_SHRINK_IN_SILU_TOKENS

LAYERS, SLOTS = 16, 65
TILES = [(16, 64, 4), (32, 64, 4), (32, 64, 8), (16, 128, 4), (32, 128, 4), (32, 128, 8), (64, 64, 4),
         (16, 32, 2), (32, 32, 4), (32, 256, 8)]        # (rows, columns, warps) of the unscaled norm


def per_call(fn):
    """us per call of fn(layer), over LAYERS layers replayed in one CUDA graph (launch gaps included)."""
    return median_us(graphed(lambda: [fn(i) for i in range(LAYERS)])) / LAYERS


def fam(n_in, widths):
    return setup_fam(n_in, widths, SLOTS)


def gemm_h(t, width, n_slices, k):
    """A GEMM output's h view [1, t, k, n_slices, R] for k tail positions."""
    tails = fl.LoRATails(n_slices, R, k)
    tails.out = width
    return tails.split(torch.randn(t, width + tails.rows(k), device=dev).to(dt), k)[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--workloads", nargs="+", default=["identical", "uniform", "skewed", "distinct"])
    args = ap.parse_args()
    torch.manual_seed(0)
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1        # slot s at position s - 1
    f_o = [fam(H, [H]) for _ in range(LAYERS)]
    f_d = [fam(I, [H]) for _ in range(LAYERS)]
    f_gu = [fam(H, [I, I]) for _ in range(LAYERS)]
    f_qkv = [fam(H, [4096, 1024, 1024]) for _ in range(LAYERS)]
    cos = torch.randn(4096, 128, device=dev).to(dt)
    w = torch.ones(H, device=dev, dtype=dt)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for t in args.tokens:
        x = [torch.randn(t, H, device=dev).to(dt) for _ in range(LAYERS)]
        res = torch.randn(t, H, device=dev).to(dt)
        gu = [torch.randn(t, 2 * I, device=dev).to(dt) for _ in range(LAYERS)]
        qkv = [torch.randn(t, 6144, device=dev).to(dt) for _ in range(LAYERS)]
        pos = torch.arange(t, device=dev)
        print(f"\n#### {t} tokens")
        print(f"add_rms_norm (plain): {per_call(lambda i: fused.add_rms_norm(x[i], res, w, 1e-5)):6.2f} us")
        for name in args.workloads:
            slots = workload_slots(name, t, SLOTS)
            n = len(set(slots))
            if n > 64:
                print(f"\n== {name}: {n} adapters, past the fused path")
                continue
            k = min(next(b for b in TAIL_BUCKETS if b >= n), t)
            meta = LoRAMeta.allocate(t, SLOTS, dev).fill(slots)
            shrink = not (t > DOWN_SHRINK_IN_SILU_TOKENS or k <= DOWN_GEMM_MAX_POSITIONS)
            print(f"\n== {name}: {n} adapters, bucket {k}, down's shrink in {'SiLU-mul' if shrink else 'its GEMM'}")
            h_o, h_gu, h_qkv = gemm_h(t, H, 1, k), gemm_h(t, 2 * I, 2, k), gemm_h(t, 6144, 3, k)
            row = per_call(lambda i: fln.norm_lora(x[i], res, w, 1e-5, meta, h_o, f_o[i], tail_pos))
            print(f"norm_lora (row):                 {row:6.2f} us")
            best = None
            for bm, bn, nw in TILES:
                us = per_call(lambda i: fln.norm_lora_unscaled(x[i], res, w, 1e-5, meta, h_o, f_o[i], tail_pos,
                                                               block_m=bm, block_n=bn, num_warps=nw))
                print(f"norm_lora_unscaled {bm:2d} x {bn:3d}, {nw} warps: {us:6.2f} us", flush=True)
                if best is None or us < best[0]:
                    best = (us, bn)
            rms = fl.RmsParts(torch.rand(t, H // best[1], device=dev) + 1.0, H, 1e-5)
            rot = [per_call(lambda i: fl.rotary_lora_(qkv[i], h_qkv, f_qkv[i], cos, cos, pos, meta, 32, 8,
                                                      tail_pos, rms=r)) for r in (None, rms)]
            silu = [per_call(lambda i: fl.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], f_d[i] if shrink else None,
                                                        tail_pos, rms=r)) for r in (None, rms)]
            print(f"rotary_lora:   {rot[0]:6.2f} us, with rms ({H // best[1]} parts) {rot[1]:6.2f} us")
            print(f"silu_mul_lora: {silu[0]:6.2f} us, with rms ({H // best[1]} parts) {silu[1]:6.2f} us")
            norms = 1 if shrink else 2
            step = 32 * (norms * (best[0] - row) + (rot[1] - rot[0] if not shrink else 0) + silu[1] - silu[0])
            print(f"a 32-layer step: {step:+7.1f} us ({norms} norms at {best[0]:.2f} against {row:.2f}, "
                  f"the consumers' rms)")


if __name__ == "__main__":
    main()
