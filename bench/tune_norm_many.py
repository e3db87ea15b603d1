"""The fused-LoRA norm (kernels/fused_lora.py ``norm_lora``, one program a row) by warps, rank chunk and register
cap, against the plain add_rms_norm. At batch 32 the norm runs 32 programs, one an SM, so its register use (247 a
thread at 8 warps, bench/results/2026-11-24-h100-ncu-small-kernels.txt) never mattered; at 256 tokens it runs 256
programs, and one program an SM at a time means two waves. Llama-3-8B shapes, rank 16, bf16, h from the o GEMM's
extra columns (or, --parts, SiLU-mul's parts); one launch inside a graph of 16 calls over 16 layers' own weights,
L2 flushed before each replay.

    python bench/tune_norm_many.py [--tokens 128 256] [--workloads identical uniform] [--parts]
                                   (results: bench/results/2026-11-25-h100-norm-many*.txt)
"""
import argparse
import itertools
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
import triton
from kernels import fused, fused_lora as fl
from kernels.lora_meta import LoRAMeta
from bench.fused_lora_setup import H, I, LAYERS, R, dev, dt, fam, gemm_h, per_call, workload_slots
from worker.model.llama import TAIL_BUCKETS

SLOTS = 65


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[256])
    ap.add_argument("--workloads", nargs="+", default=["identical", "uniform"])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--rank-chunks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--maxnreg", type=int, nargs="+", default=[0, 128], help="0: no cap")
    ap.add_argument("--parts", action="store_true", help="h as SiLU-mul's float32 parts (224 column tiles, down's "
                    "shrink in SiLU-mul: steps of at most 32 tokens with more than 8 tail positions) instead of the "
                    "o GEMM's columns")
    ap.add_argument("--configs", nargs="+", default=None, metavar="WARPS:CHUNK:MAXNREG",
                    help="these (warps, rank chunk, register cap) only, instead of every combination of the above")
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs] if args.configs else \
        list(itertools.product(args.warps, args.rank_chunks, args.maxnreg))
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1
    f_o = [fam(I if args.parts else H, [H], SLOTS) for _ in range(LAYERS)]
    w = torch.ones(H, device=dev, dtype=dt)
    for t in args.tokens:
        x = [torch.randn(t, H, device=dev).to(dt) for _ in range(LAYERS)]
        res = torch.randn(t, H, device=dev).to(dt)
        plain = per_call(lambda i: fused.add_rms_norm(x[i], res, w, 1e-5))
        print(f"\n#### {t} tokens\nadd_rms_norm (plain): {plain:6.2f} us", flush=True)
        for name in args.workloads:
            drawn = workload_slots(name, t, SLOTS)
            meta = LoRAMeta.allocate(t, SLOTS, dev).fill(drawn)
            k = min(next(b for b in TAIL_BUCKETS if b >= meta.num_segments), t)
            if args.parts:
                p = torch.randn(I // 64, t, R, device=dev) * 0.01
                h = p.as_strided((p.shape[0], t, 1, 1, R), (p.stride(0), p.stride(1), 0, R, 1))
            else:
                h = gemm_h(H, 1, k, t)
            rp = fl.row_positions(meta, tail_pos)
            ref = fl.norm_lora(x[0], res, w, 1e-5, meta, h, f_o[0], tail_pos, rp, *fl.NORM, 0)
            print(f"== {name}: {meta.num_segments} adapters, bucket {k}; engine's (warps, rank chunk[, cap]): "
                  f"{fl.NORM} (h from columns {fl.NORM_COLUMNS}), past {fl.NORM_MANY_TOKENS} rows {fl.NORM_MANY}",
                  flush=True)
            for nw, rc, reg in configs:
                kw = dict(num_warps=nw, rank_chunk=rc, maxnreg=reg)
                try:
                    out = fl.norm_lora(x[0], res, w, 1e-5, meta, h, f_o[0], tail_pos, rp, **kw)
                    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref))
                    us = per_call(lambda i: fl.norm_lora(x[i], res, w, 1e-5, meta, h, f_o[i], tail_pos, rp, **kw))
                except Exception as e:                       # (a cap below what the kernel needs can fail)
                    print(f"warps {nw:2d} rc {rc:2d} maxnreg {reg or '-':>3}: failed: {str(e)[:120]}", flush=True)
                    continue
                print(f"warps {nw:2d} rc {rc:2d} maxnreg {reg or '-':>3}: {us:6.2f} us   max |diff| against NORM's "
                      f"{diff:.3g}", flush=True)


if __name__ == "__main__":
    main()
