"""Where a fused step shrinks down: in SiLU-mul (float32 parts per column tile, summed by the next norm) or in
down's GEMM (the A rows of the step's adapters under it, padded to 64, 128 or 256 rows; the norm expands from
its columns), timed as a layer runs them: gate_up GEMM (with its tails) -> SiLU-mul -> down GEMM -> norm.

Llama-3-8B shapes, rank 16, bf16, the bench's workloads (bench/engine.py) at 8-256 tokens, their adapters'
tail bucket (worker/model/llama.py); 16 layers' own weights replayed in one CUDA graph, L2 flushed before each
replay; us a layer. Decides ``LlamaModel.down_in_gemm`` and ``DOWN_PAD_FEW_TOKENS``.

    python bench/tune_down_shrink.py [--tokens 8 16 32 64 256] [--workloads identical skewed@1 ...] [--out DIR]

A workload ``skewed@S`` draws Skewed with seed S (default 0; at 32 tokens seed 0 gives 13 adapters, tail
bucket 16, seed 1 the engine bench's 10, bucket 12).
                                     (results: bench/results/2026-11-24-h100-down-shrink.txt)
"""
import argparse
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
import torch.nn.functional as F
from kernels import fused_lora as fl
from kernels.lora_meta import LoRAMeta
from bench.fused_lora_setup import H, I, R, dev, dt, fam as setup_fam, workload_slots
from bench.kernels import graphed, median_us
from worker.model.llama import TAIL_BUCKETS, TAIL_PAD

LAYERS, SLOTS = 16, 65                                   # 64 tail positions


def per_layer(fn) -> float:
    return median_us(graphed(lambda: [fn(i) for i in range(LAYERS)])) / LAYERS


def fam(n_in, widths):
    return setup_fam(n_in, widths, SLOTS)


def tails(n_slices, n_out, n_in, k, pad):
    """LAYERS random base weights [n_out, n_in] with k adapters' A rows (random) under each."""
    t = fl.LoRATails(n_slices, R, k, pad)
    for _ in range(LAYERS):
        t.add(torch.randn(n_out, n_in, device=dev).to(dt) * 0.02)
    for e in t.ext:
        e[n_out:].normal_(0, 0.02)
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 16, 32, 64, 256])
    ap.add_argument("--workloads", nargs="+", default=["identical", "uniform", "skewed", "distinct"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    lines = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: us a layer, gate_up GEMM .. norm"]
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1        # slot s at position s - 1
    f_gu = [fam(H, [I, I]) for _ in range(LAYERS)]
    f_d = [fam(I, [H]) for _ in range(LAYERS)]
    w = torch.ones(H, device=dev, dtype=dt)
    for t in args.tokens:
        x = torch.randn(t, H, device=dev).to(dt)
        res = torch.randn(t, H, device=dev).to(dt)
        for name in args.workloads:
            kind, _, seed = name.partition("@")
            slots = workload_slots(kind, t, SLOTS, int(seed or 0))
            meta = LoRAMeta.allocate(t, SLOTS, dev).fill(slots)
            k = next(b for b in TAIL_BUCKETS if b >= meta.num_segments)
            rp = fl.row_positions(meta, tail_pos)
            t_gu = tails(2, 2 * I, H, k, TAIL_PAD["gate_up"])

            def in_silu(i):
                y, h = t_gu.split(F.linear(x, t_gu.weight(i, k)[0]), k)
                act, parts = fl.silu_mul_lora(y, meta, h, f_gu[i], f_d[i], tail_pos)
                fl.norm_lora(F.linear(act, t_d.ext[i][:H]), res, w, 1e-5, meta, parts, f_d[i], tail_pos)

            def in_gemm(i):
                y, h = t_gu.split(F.linear(x, t_gu.weight(i, k)[0]), k)
                act, _ = fl.silu_mul_lora(y, meta, h, f_gu[i], None, tail_pos)
                d, hd = t_d.split(F.linear(act, t_d.weight(i, k)[0]), k)
                fl.norm_lora(d, res, w, 1e-5, meta, hd, f_d[i], tail_pos, rp)
            row = []
            for pad in (64, 128, 256):
                t_d = tails(1, H, I, k, pad)
                if pad == 64 and t <= fl.MANY_TOKENS:      # (past MANY_TOKENS SiLU-mul's block grid: not timed)
                    row.append(f"silu-shrink {per_layer(in_silu):6.2f}")
                row.append(f"gemm-rows pad {pad} {per_layer(in_gemm):6.2f}")
                del t_d
            lines.append(f"{t:3d} tok {name:9s} ({meta.num_segments:2d} ad, k {k:2d}) us/layer: " + ", ".join(row))
            print(lines[-1], flush=True)
            del t_gu
            torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "down-shrink.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
