"""The step's GEMMs, with and without the fused-LoRA path's extra rows, by cuBLASLt algorithm: does one of
the heuristic's ranked candidates keep the base shape's speed where its first pick does not?

For each shape: F.linear (what the step calls) and each of ``LtGemm``'s candidates, us a call, timed as
a CUDA graph of one call per layer over 16 layers' own weights (so every weight streams from DRAM), with
the kernel each ran. Llama-3-8B shapes, bf16; rows under a weight as the engine pads them
(``worker.model.llama.TAIL_PAD``; rank 16: qkv 48 rows a position, o 16, gate_up 32, down 16).

    python bench/tune_lt_gemm.py [--tokens 32] [--kernels]     (results: bench/results/2026-11-24-h100-lt-gemm*.txt)
    python bench/tune_lt_gemm.py --tokens 256 --positions 1
                           (results: bench/results/2026-11-25-h100-lt-gemm-one-256.txt, run as --one: the same shapes)
    python bench/tune_lt_gemm.py --tokens 32 --positions 1 6
                           (results: bench/results/2026-11-25-h100-lt-gemm-pads-32.txt)
"""
import argparse
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
from bench.kernels import kernel_names
from kernels.cublaslt import LtGemm, _graph_nodes, _Plan, shape_of

dev, dt, H, I, LAYERS = "cuda", torch.bfloat16, 4096, 14336, 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 64, 256])
    ap.add_argument("--kernels", action="store_true", help="every candidate's kernels and graph nodes")
    ap.add_argument("--positions", type=int, nargs="+", default=None,
                    help="instead of the fixed table: the rows of this many tail positions (rank 16: qkv 48 a "
                    "position, o 16, gate_up 32, down 16), padded to 64, 128 and 256, and the bare shape")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; us a call; "
          "F.linear, then the best candidate and its rank in the heuristic's list, then all candidates")
    # (name, tokens, rows, input width, extra rows)
    shapes = [("gate_up", 32, 2 * I, H, (0, 128, 256, 384, 512, 1024)), ("qkv", 32, 6144, H, (0, 64, 192, 576, 768)),
              ("o", 32, H, H, (0, 64, 192, 512)), ("down", 32, H, I, (0, 128, 256)),
              ("gate_up", 64, 2 * I, H, (0, 128, 512)),
              ("gate_up", 256, 2 * I, H, (0, 1536, 2048)), ("qkv", 256, 6144, H, (0, 2304, 3072)),
              ("o", 256, H, H, (0, 768, 1024)), ("down", 256, H, I, (0, 768, 1024))]
    if args.positions:
        shapes = [(name, t, n, k, sorted({0} | {-(-p * rows // pad) * pad for p in args.positions
                                                 for pad in (64, 128, 256)}))
                  for t in args.tokens for name, n, k, rows in
                  (("qkv", 6144, H, 48), ("o", H, H, 16), ("gate_up", 2 * I, H, 32), ("down", H, I, 16))]
    gemm = LtGemm(dev, candidates=16, tune_layers=LAYERS, reps=20)
    for name, t, n, k, extras in [s for s in shapes if s[1] in args.tokens]:
        x = torch.randn(t, k, device=dev).to(dt)
        for e in extras:
            ws = [torch.randn(n + e, k, device=dev).to(dt) / k ** 0.5 for _ in range(LAYERS)]
            times = gemm.tune(x, ws)
            out = torch.empty(t, n + e, device=dev, dtype=dt)
            shape = shape_of(x, ws[0])
            plan: _Plan = gemm.plans[shape]
            base = times[0][1]
            i_best = min(range(len(times)), key=lambda i: times[i][1])
            best_algo, best = times[i_best]
            k_base = kernel_names(lambda: torch.nn.functional.linear(x, ws[0]), 44)
            k_best = k_base if best_algo is None else \
                kernel_names(lambda: gemm.run(x, ws[0], out, plan, best_algo), 44)
            k_first = kernel_names(lambda: gemm.run(x, ws[0], out, plan, times[1][0]), 44) if len(times) > 1 else "-"
            gbs = (n + e) * k * 2 / (best * 1e-6) / 1e9
            first = times[1][1] if len(times) > 1 else float("nan")
            print(f"{name:7s} T{t:<3d} +{e:4d}  F.linear {base:7.2f}  best {best:7.2f} (#{i_best})  "
                  f"{gbs:5.0f} GB/s  gain {base - best:6.2f}  | {k_base} | first: {first:7.2f} "
                  f"{k_first} | best: {k_best}", flush=True)
            print("    all: " + " ".join(f"{us:.1f}" for _, us in times), flush=True)
            if args.kernels:
                for i, (algo, us) in enumerate(times[1:], 1):
                    run = lambda a=algo: gemm.run(x, ws[0], out, plan, a)  # noqa: E731
                    print(f"    #{i} {us:7.2f} nodes {_graph_nodes(run)} {kernel_names(run, 44)}", flush=True)
            del ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
