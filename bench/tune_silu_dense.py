"""SiLU-mul with LoRA at few tokens by how gate/up's expand and down's shrink multiply, for the engine bench's
workloads at their tail bucket: the per-row kernel (kernels/fused_lora.py, "rows", down's shrink per row, or
without it as a lower bound, or as dense products against down's A rows staged per position, ``--chunks``
positions a product over 1-3 pipeline stages) and, with ``--dense-tiles``, the dense expand
(kernels/fused_lora_dense.py: B staged per position) with all positions in one product or ``--chunks`` a
product, over 32 to 128 columns, 4 or 8 warps, 2-4 stages, down's shrink per row or dense. Each workload's line
gives the bytes a call must move over 3.0 TB/s. Llama-3-8B shapes, rank 16, bf16; one launch inside a graph of
16 calls over 16 layers' own weights.

    python bench/tune_silu_dense.py --dense-tiles       (results: bench/results/2026-11-24-h100-silu-dense-chunks.txt,
                                                         taken before the rows kernel's dense shrink existed)
    python bench/tune_silu_dense.py --workloads skewed distinct
                                    (results: bench/results/2026-11-24-h100-silu-rows-dense-shrink.txt)
"""
import argparse
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
import triton
from kernels import fused, fused_lora as fl
from kernels.fused_lora_dense import ExpandTails, plan, silu_mul_lora_dense
from kernels.lora_meta import LoRAMeta
from bench.fused_lora_setup import H, I, LAYERS, R, dev, dt, fam as setup_fam, gemm_h, per_call, workload_slots
from worker.model.llama import TAIL_BUCKETS, DOWN_GEMM_MAX_POSITIONS, DOWN_SHRINK_IN_SILU_TOKENS

SLOTS = 65
POSITIONS = 32
TILES = ((64, 4, 2), (64, 4, 3), (64, 8, 3), (32, 4, 3), (128, 4, 3), (128, 8, 2), (64, 4, 4))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32])
    ap.add_argument("--workloads", nargs="+", default=["identical", "uniform", "skewed", "distinct"])
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dense-tiles", action="store_true", help="time the chunked dense kernel over TILES too")
    args = ap.parse_args()
    torch.manual_seed(0)
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1
    f_d = [setup_fam(I, [H], SLOTS) for _ in range(LAYERS)]
    f_gu = [setup_fam(H, [I, I], SLOTS) for _ in range(LAYERS)]
    b_tails = ExpandTails(LAYERS, POSITIONS, R, 2 * I, dt, dev)
    a_tails = [(torch.randn(POSITIONS * R, I, device=dev) * 0.02).to(dt) for _ in range(LAYERS)]
    for b in b_tails.b:
        b.normal_(0, 0.02)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for t in args.tokens:
        gu = [torch.randn(t, 2 * I, device=dev).to(dt) for _ in range(LAYERS)]
        print(f"\n#### {t} tokens")
        print(f"silu_mul (plain): {per_call(lambda i: fused.silu_mul(gu[i])):6.2f} us")
        for name in args.workloads:
            drawn = workload_slots(name, t, SLOTS)
            n = len(set(drawn))
            k = min(next(b for b in TAIL_BUCKETS if b >= n), t)
            shrink = not (t > DOWN_SHRINK_IN_SILU_TOKENS or k <= DOWN_GEMM_MAX_POSITIONS)
            moved = (k * R * 2 * I + (k * R * I if shrink else 0) + t * 3 * I) * 2
            print(f"\n== {name}: {n} adapters, bucket {k}, down's shrink in {'SiLU-mul' if shrink else 'its GEMM'}; "
                  f"{moved / 1e6:.1f} MB, {moved / 3.0e6:.2f} us at 3.0 TB/s; default plan {plan(k, R)}")
            h_gu = gemm_h(2 * I, 2, k, t)
            meta = LoRAMeta.allocate(t, SLOTS, dev).fill(drawn)
            down = f_d if shrink else [None] * LAYERS
            rows = per_call(lambda i: fl.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], down[i], tail_pos, grid="rows"))
            print(f"rows (per-row gathers)                       {rows:6.2f} us", flush=True)
            print(f"dense, default plan                          "
                  f"{per_call(lambda i: silu_mul_lora_dense(gu[i], meta, h_gu, f_gu[i], down[i], tail_pos, b_tails.b[i], a_tails[i] if shrink else None)):6.2f} us", flush=True)
            if shrink:
                none = per_call(lambda i: fl.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], None, tail_pos, grid="rows"))
                print(f"rows, no shrink (a lower bound)              {none:6.2f} us", flush=True)
                for chunk in args.chunks:
                    for nw, st in ((4, 1), (4, 2), (4, 3), (8, 2)):
                        us = per_call(lambda i: fl.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], f_d[i], tail_pos,
                                                                 grid="rows", a_tail=a_tails[i], chunk=chunk,
                                                                 num_warps=nw, num_stages=st))
                        print(f"rows, shrink dense: chunk {chunk} x {R}, 64 cols, {nw} warps, {st} stages  {us:6.2f} us",
                              flush=True)
            if not args.dense_tiles:
                continue
            for chunk in [c for c in args.chunks if c < k]:
                for bn, nw, st in TILES:
                    for a_tail in ((None, a_tails) if shrink else (None,)):
                        try:
                            us = per_call(lambda i: silu_mul_lora_dense(
                                gu[i], meta, h_gu, f_gu[i], down[i], tail_pos, b_tails.b[i],
                                None if a_tail is None else a_tail[i], chunk=chunk, block_n=bn, num_warps=nw,
                                num_stages=st))
                        except Exception as e:                  # (out of shared memory: say so, go on)
                            print(f"chunk {chunk} x {R}, {bn:3d} cols, {nw} warps, {st} stages: {type(e).__name__}")
                            continue
                        label = "" if not shrink else ", shrink per row" if a_tail is None else ", shrink dense"
                        print(f"chunk {chunk} x {R}, {bn:3d} cols, {nw} warps, {st} stages{label:17s} {us:6.2f} us",
                              flush=True)


if __name__ == "__main__":
    main()
