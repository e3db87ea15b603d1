"""Per-kernel GPU time of one captured decode step, by LoRA path: where LoRA's overhead goes.

Random Llama-3-8B-shaped weights (bf16), rank-16 adapters on all 7 projections loaded straight
into the GPU slots, decode graphs captured for one batch size, contexts of ``--context`` tokens
(block tables point at arbitrary blocks: the values do not change the cost). For each path
(fused LoRA on/off) and workload (base, identical, distinct) it replays the graph, reports
the replay time, and sums the profiler's kernel records per kernel name over one step.

    python bench/profile_step.py [--batch 32] [--context 192] [--out DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import tempfile
from collections import defaultdict

import torch

from bench.common import write_result
from bench.engine import LLAMA3_8B, RANK, random_adapters
from worker.cuda_graphs import DecodeGraphs
from worker.engine import Engine


def replay_ms(graphs: DecodeGraphs, args_, reps: int = 30) -> float:
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        graphs.run(*args_)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        ev0.record()
        graphs.run(*args_)
        ev1.record()
        ev1.synchronize()
        times.append(ev0.elapsed_time(ev1))
    times.sort()
    return times[len(times) // 2]


def kernel_breakdown(graphs: DecodeGraphs, args_, steps: int = 3) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graphs.run(*args_)
        torch.cuda.synchronize()
    us: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            us[ev.name[:70]] += ev.device_time / steps
    return dict(sorted(us.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--paths", nargs="+", type=int, default=[64, 0], help="fused_lora_tokens values to compare")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    b, ctx = args.batch, args.context
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(LLAMA3_8B))
        engine = Engine(d, random_init=True, device="cuda", dtype=torch.bfloat16, max_loras=b, max_lora_rank=RANK,
                        max_num_seqs=b, max_num_batched_tokens=4096, max_model_len=1024,
                        num_blocks=b * (-(-ctx // 16) + 1) + 64, cuda_graphs=False)
        names = random_adapters(engine, b)
        for n in names:
            assert engine.slots.start_load(engine.adapters.entry(n).adapter)
        torch.cuda.synchronize()
        slot = [engine.slots.acquire(n) for n in names]
        bs = engine.config.block_size
        per = -(-ctx // bs)
        tables = [[1 + i * per + j for j in range(per)] for i in range(b)]
        mapping = [t[-1] * bs + (ctx - 1) % bs for t in tables]
        workloads = {"base": [-1] * b, "identical": [slot[0]] * b, "distinct": slot}
        rows = []
        for path in args.paths:
            engine.model.fused_lora_tokens = path
            graphs = DecodeGraphs(engine.model, engine.kv, engine.buffers, b)
            graphs.buckets = [b]
            graphs.capture()
            for w, token_slots in workloads.items():
                run_args = ([1] * b, [ctx - 1] * b, mapping, tables, [ctx] * b, token_slots)
                ms = replay_ms(graphs, run_args)
                kernels = kernel_breakdown(graphs, run_args)
                rows.append({"fused_lora_tokens": path, "workload": w, "batch": b, "context": ctx,
                             "replay_ms": round(ms, 3), "kernels_us": {k: round(v, 1) for k, v in kernels.items()}})
                lines = [f"\n== fused_lora_tokens={path} {w}: replay {ms:.3f} ms, kernel sum "
                         f"{sum(kernels.values()) / 1e3:.3f} ms"]
                lines += [f"  {v:9.1f} us  {k}" for k, v in list(kernels.items())[:18]]
                print("\n".join(lines), flush=True)
            del graphs
            torch.cuda.empty_cache()
        if args.out:
            print("wrote", write_result("profile-step", rows, args.out, model="llama-3-8b-shaped (random)",
                                        dtype="bfloat16", rank=RANK))


if __name__ == "__main__":
    main()
