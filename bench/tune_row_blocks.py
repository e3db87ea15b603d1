"""Rows a program takes in rotary's and SiLU-mul's LoRA kernels (kernels/fused_lora.py) at 32 tokens: the whole
step in one row block (32 rows, as the kernels launch it) against two blocks of 16, which doubles the programs
(SiLU-mul's per-row grid runs 224 programs on 132 SMs, rotary's 48), by grid, columns and warps. Llama-3-8B
shapes, rank 16, bf16, the engine bench's workloads at their tail bucket; one launch inside a graph of 16 calls
over 16 layers' own weights. The per-row grids (no tensor-core product) take blocks of 4 and 8 rows too; with
--dense, SiLU-mul's dense expand (kernels/fused_lora_dense.py) for steps of at most 8 positions.

    python bench/tune_row_blocks.py        (results: bench/results/2026-11-24-h100-row-blocks.txt)
    python bench/tune_row_blocks.py --block-m 32 16 8 4 --dense
                                           (results: bench/results/2026-11-24-h100-row-blocks-dense.txt)
"""
import argparse
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
import triton
from kernels import fused, fused_lora as fl
from kernels.fused_lora_dense import DENSE_POSITIONS, ExpandTails, silu_mul_lora_dense
from kernels.lora_meta import LoRAMeta
from bench.fused_lora_setup import (H, I, LAYERS, R, dev, dt, fam as setup_fam, layer_activations, per_call,
                                    rotary_plain, workload_step)

SLOTS = 65


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--workloads", nargs="+", default=["identical", "uniform", "skewed", "distinct"])
    ap.add_argument("--block-m", type=int, nargs="+", default=[32, 16])
    ap.add_argument("--rotary-grids", nargs="+", default=None, choices=["segments", "rows", "blocks"],
                    help="rotary on these grids instead of the one the engine picks (past 64 tokens, one adapter: "
                    "segments takes the rows straight, blocks gathers them through the sorted order)")
    ap.add_argument("--dense", action="store_true", help="SiLU-mul's dense expand for the workloads of <= 8 "
                    "positions instead of the per-row and segment grids")
    args = ap.parse_args()
    torch.manual_seed(0)
    t = args.tokens
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1
    f_d = [setup_fam(I, [H], SLOTS) for _ in range(LAYERS)]
    f_gu = [setup_fam(H, [I, I], SLOTS) for _ in range(LAYERS)]
    f_qkv = [setup_fam(H, [4096, 1024, 1024], SLOTS) for _ in range(LAYERS)]
    cos = torch.randn(4096, 128, device=dev).to(dt)
    gu, qkv, pos = layer_activations(t)
    b_tails = ExpandTails(LAYERS, DENSE_POSITIONS, R, 2 * I, dt, dev)
    for b in b_tails.b:
        b.normal_(0, 0.02)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}\n#### {t} tokens")
    print(f"silu_mul (plain): {per_call(lambda i: fused.silu_mul(gu[i])):6.2f} us")
    print(f"rotary (plain):   {per_call(lambda i: rotary_plain(qkv[i], cos, cos, pos)):6.2f} us")
    for name in args.workloads:
        drawn, k, shrink, h_gu, h_qkv = workload_step(name, t, SLOTS)
        meta = LoRAMeta.allocate(t, SLOTS, dev).fill(drawn)
        down = f_d if shrink else [None] * LAYERS
        silu_grid, _, _ = fl._grid(meta, h_gu, t, "silu", None)
        rot_default, _, _ = fl._grid(meta, h_qkv, t, "rotary", None)
        for bm in args.block_m:
            for rot_grid in args.rotary_grids or [rot_default]:
                if rot_grid == "blocks" and bm != args.block_m[0] or bm < 16 and rot_grid != "rows":
                    continue                                # (the blocks grid takes SEG_BLOCK rows whatever bm)
                for nw in (4, 8):
                    us = per_call(lambda i: fl.rotary_lora_(qkv[i], h_qkv, f_qkv[i], cos, cos, pos, meta, 32, 8,
                                                            tail_pos, num_warps=nw, grid=rot_grid,
                                                            block_m=None if rot_grid == "blocks" else bm))
                    print(f"rotary_lora   {rot_grid:8s} {bm if rot_grid != 'blocks' else fl.SEG_BLOCK} rows, "
                          f"{nw} warps            {us:6.2f} us", flush=True)
            if bm < 16 and silu_grid != "rows":
                continue
            dense = args.dense and k <= DENSE_POSITIONS          # (the engine's SiLU-mul for such steps)
            for bn, nw in () if dense or (bm < 16 and silu_grid != "rows") else \
                    ((64, 4), (32, 4), (64, 2), (64, 8), (128, 4), (32, 2)):
                us = per_call(lambda i: fl.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], down[i], tail_pos, block_n=bn,
                                                         num_warps=nw, block_m=bm))
                print(f"silu_mul_lora {silu_grid:8s} {bm} rows, {bn:3d} cols, {nw} warps  {us:6.2f} us", flush=True)
            if dense and bm >= 16:
                for bn, nw in ((64, 8), (128, 8), (64, 4), (32, 4), (128, 4)):
                    us = per_call(lambda i: silu_mul_lora_dense(gu[i], meta, h_gu, f_gu[i], down[i], tail_pos,
                                                                b_tails.b[i], block_n=bn, num_warps=nw, block_m=bm))
                    print(f"silu_mul_lora dense    {bm} rows, {bn:3d} cols, {nw} warps  {us:6.2f} us", flush=True)


if __name__ == "__main__":
    main()
