"""The base GEMMs with the staged adapters' A rows under them (the fused-LoRA path's extra rows), by how
cuBLAS is called: which call keeps the base shape's speed. Batch 32, Llama-3-8B shapes, bf16; each
timing is one call inside a graph of 16 calls over 16 layers' own weights (so every weight streams from
DRAM), L2 flushed before each replay, each variant timed twice. The kernel cuBLAS picked is printed
beside it (torch.profiler, one replay).

Variants: ``mm`` (F.linear, as the step calls it), ``bias`` (F.linear with a zero bias: cublasLt's
gemm-and-bias path, a different heuristic), ``lt`` (torch's preferred BLAS library set to cublaslt for
the capture), ``split`` (the base rows at the base shape and the extra rows as a second GEMM).

    python bench/tune_tail_gemm.py      (results: bench/results/2026-11-24-h100-tail-gemm.txt)
"""
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
import torch.nn.functional as F
from bench.kernels import graphed, kernel_names, median_us

dev, dt, T, H, I, LAYERS = "cuda", torch.bfloat16, 32, 4096, 14336, 16
torch.manual_seed(0)


def variants(x, ws, n):
    zero = torch.zeros(ws[0].shape[0], device=dev, dtype=dt)

    def lt():
        old = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return [F.linear(x, w) for w in ws]
        finally:
            torch.backends.cuda.preferred_blas_library(old)

    return {"mm": lambda: [F.linear(x, w) for w in ws],
            "bias": lambda: [F.linear(x, w, zero) for w in ws],
            "lt": lt,
            "split": lambda: [(F.linear(x, w[:n]), F.linear(x, w[n:])) for w in ws]}


def main():
    # (name, rows, input width, extra rows): one rank-16 adapter at the pads tried (qkv 3 slices, o 1, gate_up 2),
    # and 32 adapters; down, whose shrink runs in SiLU-mul instead, for comparison
    shapes = (("gate_up", 2 * I, H, (0, 64, 128, 192, 256, 1024)), ("qkv", 6144, H, (0, 64, 128, 1536)),
              ("o", H, H, (0, 64, 128, 512)), ("down", H, I, (0, 64, 512)))
    for name, n, k_in, extras in shapes:
        x = torch.randn(T, k_in, device=dev).to(dt)
        for e in extras:
            ws = [torch.randn(n + e, k_in, device=dev).to(dt) for _ in range(LAYERS)]
            ref = F.linear(x, ws[0])
            for label, fn in variants(x, ws, n).items():
                if e == 0 and label == "split":
                    continue
                got = fn()[0]
                got = torch.cat(got, dim=1) if isinstance(got, tuple) else got
                err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                assert err < 1e-2, (name, e, label, err)
                replay = graphed(fn)
                t1, t2 = (median_us(replay) / LAYERS for _ in range(2))
                gbs = (n + e) * k_in * 2 / (min(t1, t2) * 1e-6) / 1e9
                print(f"{name:8s} +{e:5d} {label:6s} {t1:7.2f} {t2:7.2f} us  {gbs:6.0f} GB/s  {kernel_names(replay)}",
                      flush=True)
            del ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
