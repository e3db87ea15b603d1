"""The fused-LoRA rotary and SiLU-mul kernels (kernels/fused_lora.py) past MANY_TOKENS tokens, by grid and
launch parameters, against the plain kernels: one adapter (a program per 64 rows, or the step's segment
blocks), and several adapters (segment blocks); the expands in float32 (TF32) or the model dtype; SiLU-mul
with and without down's shrink (its tile width sets how many parts the input norm sums, so that norm is timed
after each SiLU-mul variant), and the alternative: down's GEMM with the A rows under it, and the norm
expanding from its columns. Llama-3-8B shapes, rank 16,
bf16; each timing is one launch inside a graph of 16 calls over 16 layers' own weights (B from DRAM), L2
flushed before each replay.

    python bench/tune_fused_blocks.py [--tokens 256] [--workloads identical uniform skewed]
                                      (results: bench/results/2026-11-24-h100-fused-blocks.txt)
"""
import argparse
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
from kernels import fused, fused_lora as fl
from kernels.lora_meta import LoRAMeta
from bench.fused_lora_setup import (H, I, LAYERS, R, dev, dt, fam as setup_fam, layer_activations, per_call,
                                    rotary_plain, workload_slots)

SLOTS = 65                                               # 64 tail positions


def fam(n_in, widths):
    return setup_fam(n_in, widths, SLOTS)


def token_slots(name, t):
    """Slots 1.. of the bench's workload ``name`` (bench/engine.py) over t tokens, its adapters numbered in
    order of first use and capped at the 64 tail positions (Skewed at 256 tokens has 50)."""
    return workload_slots(name, t, SLOTS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[256])
    ap.add_argument("--workloads", nargs="+", default=["identical", "uniform", "skewed"])
    args = ap.parse_args()
    torch.manual_seed(0)
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1        # slot s at position s - 1
    f_d = [fam(I, [H]) for _ in range(LAYERS)]
    f_gu = [fam(H, [I, I]) for _ in range(LAYERS)]
    f_qkv = [fam(H, [4096, 1024, 1024]) for _ in range(LAYERS)]
    cos = torch.randn(4096, 128, device=dev).to(dt)
    w = torch.ones(H, device=dev, dtype=dt)
    for t in args.tokens:
        x = [torch.randn(t, H, device=dev).to(dt) for _ in range(LAYERS)]
        res = torch.randn(t, H, device=dev).to(dt)
        gu, qkv, pos = layer_activations(t)
        print(f"\n#### {t} tokens")
        print(f"add_rms_norm {per_call(lambda i: fused.add_rms_norm(x[i], res, w, 1e-5)):6.2f} us")
        print(f"silu_mul     {per_call(lambda i: fused.silu_mul(gu[i])):6.2f} us")
        print(f"rotary       {per_call(lambda i: rotary_plain(qkv[i], cos, cos, pos)):6.2f} us")
        wd = [torch.randn(H, I, device=dev).to(dt) for _ in range(LAYERS)]
        for k in (0, 1, 16, 64):          # down's GEMM with the A rows of k adapters under it (padded to 64)
            tails = fl.LoRATails(1, R, max(k, 1))
            for wi in wd:
                tails.add(wi)
            ext = [tails.weight(i, k)[0] if k else wd[i] for i in range(LAYERS)]
            act = torch.randn(t, I, device=dev).to(dt)
            print(f"down GEMM + {ext[0].shape[0] - H:4d} rows: {per_call(lambda i: torch.nn.functional.linear(act, ext[i])):6.2f} us")
            del tails, ext
        del wd
        for name in args.workloads:
            slots = token_slots(name, t)
            meta = LoRAMeta.allocate(t, SLOTS, dev).fill(slots)
            k = min(1 << (meta.num_segments - 1).bit_length(), 64)
            h_gu = torch.randn(t, k, 2, R, device=dev).to(dt)[None]
            h_qkv = torch.randn(t, k, 3, R, device=dev).to(dt)[None]
            print(f"\n== {name}: {meta.num_segments} adapters, {k} tail positions", flush=True)
            grids = (["segments", "blocks"] if k == 1 else ["blocks"]) if t > fl.MANY_TOKENS else [None]
            h_d = torch.randn(t, k, 1, R, device=dev).to(dt)[None]      # down's h from its GEMM's columns
            rp = fl.row_positions(meta, tail_pos)
            print(f"norm_lora(down from its GEMM): {per_call(lambda i: fl.norm_lora(x[i], res, w, 1e-5, meta, h_d, f_d[i], tail_pos, rp)):6.2f} us")
            for native in (False, True):
                fl.NATIVE_EXPAND = native
                for grid in grids:
                    for nw in (4, 8):
                        us = per_call(lambda i: fl.rotary_lora_(qkv[i], h_qkv, f_qkv[i], cos, cos, pos, meta, 32, 8,
                                                                tail_pos, num_warps=nw, grid=grid))
                        print(f"rotary_lora {grid} native {native} warps {nw}: {us:6.2f} us", flush=True)
                    for bn, snw in ((64, 2), (64, 4), (128, 4)):
                        kw = dict(block_n=bn, num_warps=snw, grid=grid)
                        act, parts = fl.silu_mul_lora(gu[0], meta, h_gu, f_gu[0], f_d[0], tail_pos, **kw)
                        silu = per_call(lambda i: fl.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], f_d[i], tail_pos, **kw))
                        norm = per_call(lambda i: fl.norm_lora(x[i], res, w, 1e-5, meta, parts, f_d[i], tail_pos))
                        bare = per_call(lambda i: fl.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], None, tail_pos, **kw))
                        print(f"silu {grid} native {native} bn {bn:3d} warps {snw} ({parts.shape[0]:3d} parts): "
                              f"{silu:6.2f} us, norm(down) {norm:6.2f} us, sum {silu + norm:6.2f}; without down's "
                              f"shrink {bare:6.2f} us", flush=True)
            fl.NATIVE_EXPAND = True


if __name__ == "__main__":
    main()
