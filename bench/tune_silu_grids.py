"""SiLU-mul and rotary with LoRA (kernels/fused_lora.py) at few tokens, by grid, for the engine bench's
workloads at their tail bucket: "segments" (a program per tail position, all rows), "rows" (each row gathers its
own adapter), "blocks" as the kernels launch it (two programs per 16 tokens, each looping over the step's
segment blocks) and "blocks, wide" (a program per segment block the bucket can have, so no program loops);
each with the step's rows as the workload draws them and sorted by adapter (what a batch ordered by adapter
would give the per-row gathers); and SiLU-mul's "dense" expand (kernels/fused_lora_dense.py: B staged per tail
position, one product a tile), over 1-4 rows of 32 columns to 128, 2 to 8 warps. Llama-3-8B shapes, rank 16, bf16; one launch inside a graph of 16 calls over
16 layers' own weights, L2 flushed before each replay.

    python bench/tune_silu_grids.py [--tokens 32] [--workloads identical uniform skewed distinct]
                                    (results: bench/results/2026-11-24-h100-silu-grids.txt)
"""
import argparse
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
import triton
from kernels import fused, fused_lora as fl
from kernels.fused_lora_dense import ExpandTails, silu_mul_lora_dense
from kernels.lora_meta import SEG_BLOCK, LoRAMeta
from bench.fused_lora_setup import (H, I, LAYERS, R, dev, dt, fam as setup_fam, layer_activations, per_call,
                                    rotary_plain, workload_step)

SLOTS = 65
_grid = fl._grid


def wide_grid(meta, h, t, kernel, grid):
    """``fl._grid``, but "blocks" gets a program per segment block the step's bucket can have."""
    if grid != "blocks":
        return _grid(meta, h, t, kernel, grid)
    return grid, h.shape[2] + triton.cdiv(t, SEG_BLOCK), SEG_BLOCK


def fam(n_in, widths):
    return setup_fam(n_in, widths, SLOTS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32])
    ap.add_argument("--workloads", nargs="+", default=["identical", "uniform", "skewed", "distinct"])
    args = ap.parse_args()
    torch.manual_seed(0)
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1
    f_d = [fam(I, [H]) for _ in range(LAYERS)]
    f_gu = [fam(H, [I, I]) for _ in range(LAYERS)]
    f_qkv = [fam(H, [4096, 1024, 1024]) for _ in range(LAYERS)]
    cos = torch.randn(4096, 128, device=dev).to(dt)
    b_tails = ExpandTails(LAYERS, 32, R, 2 * I, dt, dev)
    for b in b_tails.b:
        b.normal_(0, 0.02)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for t in args.tokens:
        gu, qkv, pos = layer_activations(t)
        print(f"\n#### {t} tokens")
        print(f"silu_mul (plain): {per_call(lambda i: fused.silu_mul(gu[i])):6.2f} us")
        print(f"rotary (plain):   {per_call(lambda i: rotary_plain(qkv[i], cos, cos, pos)):6.2f} us")
        for name in args.workloads:
            drawn, k, shrink, h_gu, h_qkv = workload_step(name, t, SLOTS)
            for order, slots in (("drawn", drawn), ("sorted", sorted(drawn))):
                meta = LoRAMeta.allocate(t, SLOTS, dev).fill(slots)
                for grid, wide in (("segments", False), ("rows", False), ("blocks", False), ("blocks", True)):
                    fl._grid = wide_grid if wide else _grid
                    label = f"{grid}{', wide' if wide else ''}"
                    try:
                        silu = per_call(lambda i: fl.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], f_d[i] if shrink else None,
                                                                   tail_pos, grid=grid))
                        rot = per_call(lambda i: fl.rotary_lora_(qkv[i], h_qkv, f_qkv[i], cos, cos, pos, meta, 32, 8,
                                                                 tail_pos, grid=grid))
                    finally:
                        fl._grid = _grid
                    print(f"{order:6s} {label:13s} silu_mul_lora {silu:6.2f} us   rotary_lora {rot:6.2f} us", flush=True)
                for bn, nw in ((64, 4), (32, 4), (64, 2), (64, 8), (128, 4), (128, 8)) if order == "drawn" else ():
                    dense = per_call(lambda i: silu_mul_lora_dense(gu[i], meta, h_gu, f_gu[i], f_d[i] if shrink else None,
                                                                   tail_pos, b_tails.b[i], block_n=bn, num_warps=nw))
                    print(f"{order:6s} dense {bn:3d} cols, {nw} warps  silu_mul_lora {dense:6.2f} us", flush=True)


if __name__ == "__main__":
    main()
