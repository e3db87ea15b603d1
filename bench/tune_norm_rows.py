"""The one-adapter LoRA norm with several rows a program (``fused_lora.norm_lora(rows=...)``) against the row
kernel and the plain norm, past MANY_TOKENS tokens (batch-256 decode steps), Llama-3-8B shapes, rank 16, bf16,
h from a GEMM's extra columns. Each timing is one launch inside a graph of 16 calls over 16 layers' own weights,
L2 flushed before each replay (``bench/fused_lora_setup.per_call``); each variant is checked against the row kernel.

    python bench/tune_norm_rows.py [--tokens 128 256]     (results: bench/results/2026-11-25-h100-norm-rows.txt)
"""
import argparse
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
from kernels import fused, fused_lora as fl
from kernels.lora_meta import LoRAMeta
from bench.fused_lora_setup import H, LAYERS, SLOTS, dev, dt, fam, gemm_h, per_call

VARIANTS = [(2, 4, 8), (2, 8, 8), (2, 8, 4), (2, 8, 16), (2, 16, 8), (2, 4, 16), (4, 8, 8), (4, 8, 4), (4, 16, 8)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 256])
    args = ap.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1
    f_o = [fam(H, [H]) for _ in range(LAYERS)]
    w = torch.ones(H, device=dev, dtype=dt)
    for t in args.tokens:
        meta = LoRAMeta.allocate(fl.MAX_TOKENS, SLOTS, dev).fill([1] * t)
        x = [torch.randn(t, H, device=dev).to(dt) for _ in range(LAYERS)]
        res = torch.randn(t, H, device=dev).to(dt)
        h = gemm_h(H, 1, 1, t)
        print(f"\n#### {t} tokens, one adapter", flush=True)
        print(f"add_rms_norm (plain):          {per_call(lambda i: fused.add_rms_norm(x[i], res, w, 1e-5)):6.2f} us")
        ref = fl.norm_lora(x[0], res, w, 1e-5, meta, h, f_o[0], tail_pos)
        print(f"norm_lora row kernel {fl.NORM}:  "
              f"{per_call(lambda i: fl.norm_lora(x[i], res, w, 1e-5, meta, h, f_o[i], tail_pos)):6.2f} us", flush=True)
        for rows, nw, rc in VARIANTS:
            got = fl.norm_lora(x[0], res, w, 1e-5, meta, h, f_o[0], tail_pos, num_warps=nw, rank_chunk=rc, rows=rows)
            err = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))
            us = per_call(lambda i: fl.norm_lora(x[i], res, w, 1e-5, meta, h, f_o[i], tail_pos, num_warps=nw,
                                                 rank_chunk=rc, rows=rows))
            print(f"rows {rows} warps {nw:2d} rc {rc:2d}:       {us:6.2f} us   max |diff| vs row kernel {err:.3g}",
                  flush=True)


if __name__ == "__main__":
    main()
