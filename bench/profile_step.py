"""Per-kernel GPU time of one captured decode step, by LoRA path: where LoRA's overhead goes.

Random Llama-3-8B-shaped weights (bf16), rank-16 adapters on all 7 projections loaded straight
into the GPU slots, decode graphs captured for one batch size, contexts of ``--context`` tokens
(block tables point at arbitrary blocks: the values do not change the cost). For each path
(fused LoRA on/off) and workload (base, identical, distinct by default; uniform and skewed on request) it replays the graph, reports
the run time (host fill and staging + replay), the host part and the replay alone, and per kernel
name over one step the profiler's kernel time and the GPU's idle time before those kernels.

    python bench/profile_step.py [--batch 32] [--context 192] [--workloads base uniform ...] [--out DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import cProfile
import json
import pstats
import random
import tempfile
import time
from collections import defaultdict

import torch

from bench.common import write_result
from bench.engine import LLAMA3_8B, RANK, random_adapters, workload
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


def split_ms(graphs: DecodeGraphs, args_, reps: int = 30) -> tuple[float, float]:
    """(host ms of ``run`` before its replay, GPU ms of the replay alone): medians. The host part is the
    inputs' fill and the LoRA staging; in ``replay_ms`` the GPU waits for it."""
    host, gpu = [], []
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph, _ = graphs.prepare(*args_)
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        ev0.record()
        graph.replay()
        ev1.record()
        ev1.synchronize()
        gpu.append(ev0.elapsed_time(ev1))
    return sorted(host)[reps // 2], sorted(gpu)[reps // 2]


def host_profile(graphs: DecodeGraphs, args_, reps: int = 100, top: int = 8) -> list[str]:
    """The functions ``prepare`` spends its own time in (cProfile, us a step), most first."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        graphs.prepare(*args_)
        torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [f"{v[2] / reps * 1e6:7.1f} us own {v[3] / reps * 1e6:7.1f} us with callees {v[1] / reps:5.1f} calls  "
            f"{Path(k[0]).name}:{k[1]}({k[2]})" for k, v in rows]


def kernel_breakdown(graphs: DecodeGraphs, args_, steps: int = 3) -> tuple[dict[str, float], dict[str, float]]:
    """(kernel time, idle time before the kernel) per kernel name, us a step. The idle time is measured from
    the previous kernel's end inside a step; a step's first kernel gets none."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graphs.run(*args_)
            torch.cuda.synchronize()
    us: dict[str, float] = defaultdict(float)
    gaps: dict[str, float] = defaultdict(float)
    spans = sorted((ev.time_range.start, ev.time_range.end, ev.name[:70]) for ev in prof.events()
                   if ev.device_type.name == "CUDA")
    for i, (start, end, name) in enumerate(spans):
        us[name] += (end - start) / steps
        if i and start - spans[i - 1][1] < 200:          # a larger gap lies between steps
            gaps[name] += max(0.0, start - spans[i - 1][1]) / steps
    order = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1]))  # noqa: E731
    return order(us), order(gaps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--paths", nargs="+", type=int, default=[64, 0], help="fused_lora_tokens values to compare")
    ap.add_argument("--workloads", nargs="+", default=["base", "identical", "distinct"],
                    help="base and any of bench/engine.py's workloads (identical, uniform, skewed, distinct)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--untuned-gemms", action="store_true", help="the GEMMs on F.linear's own algorithms")
    args = ap.parse_args()
    b, ctx = args.batch, args.context
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(LLAMA3_8B))
        engine = Engine(d, random_init=True, device="cuda", dtype=torch.bfloat16, max_loras=b, max_lora_rank=RANK,
                        max_num_seqs=b, max_num_batched_tokens=4096, max_model_len=1024,
                        num_blocks=b * (-(-ctx // 16) + 1) + 64, cuda_graphs=False,
                        tuned_gemms=not args.untuned_gemms)
        names = random_adapters(engine, b)
        for n in names:
            assert engine.slots.start_load(engine.adapters.entry(n).adapter)
        torch.cuda.synchronize()
        slot = [engine.slots.acquire(n) for n in names]
        bs = engine.config.block_size
        per = -(-ctx // bs)
        tables = [[1 + i * per + j for j in range(per)] for i in range(b)]
        mapping = [t[-1] * bs + (ctx - 1) % bs for t in tables]
        rng = random.Random(0)
        workloads = {w: [-1] * b if w == "base" else [slot[i] for i in workload(w, b, rng)] for w in args.workloads}
        rows = []
        gemm_timings: dict[str, list[float]] = {}   # "MxNxK": us a call, F.linear then each candidate (tuning)
        for path in args.paths:
            engine.model.fused_lora_tokens = path
            graphs = DecodeGraphs(engine.model, engine.kv, engine.buffers, b)
            graphs.buckets = [b]
            graphs.capture()
            gemm = engine.model.gemm
            for shape, times in (gemm.timings.items() if gemm else []):
                pick = min(range(len(times)), key=lambda i: times[i][1])
                print(f"GEMM [{shape.m}, {shape.k}] x [{shape.n}, {shape.k}]: F.linear {times[0][1]:.2f} us, picked "
                      f"#{pick} {times[pick][1]:.2f}; candidates " + " ".join(f"{t:.1f}" for _, t in times[1:]),
                      flush=True)
                gemm_timings[f"{shape.m}x{shape.n}x{shape.k}"] = [round(t, 2) for _, t in times]
            for w, token_slots in workloads.items():
                run_args = ([1] * b, [ctx - 1] * b, mapping, tables, [ctx] * b, token_slots)
                ms = replay_ms(graphs, run_args)
                host_ms, graph_ms = split_ms(graphs, run_args)
                kernels, gaps = kernel_breakdown(graphs, run_args)
                host_top = host_profile(graphs, run_args)
                rows.append({"fused_lora_tokens": path, "workload": w, "batch": b, "context": ctx,
                             "replay_ms": round(ms, 3), "host_ms": round(host_ms, 3), "graph_ms": round(graph_ms, 3),
                             "kernels_us": {k: round(v, 1) for k, v in kernels.items()},
                             "idle_before_us": {k: round(v, 1) for k, v in gaps.items()}, "host_profile": host_top})
                lines = [f"\n== fused_lora_tokens={path} {w}: run {ms:.3f} ms (host before replay {host_ms:.3f}, "
                         f"replay alone {graph_ms:.3f}), kernel sum {sum(kernels.values()) / 1e3:.3f} ms, idle "
                         f"between kernels {sum(gaps.values()) / 1e3:.3f} ms"]
                lines += [f"  {v:9.1f} us  idle before {gaps.get(k, 0.0):7.1f} us  {k}"
                          for k, v in list(kernels.items())[:18]]
                lines += ["  host, prepare (cProfile):"] + [f"    {line}" for line in host_top]
                print("\n".join(lines), flush=True)
            del graphs
            torch.cuda.empty_cache()
        if args.out:
            print("wrote", write_result("profile-step", rows, args.out, model="llama-3-8b-shaped (random)",
                                        dtype="bfloat16", rank=RANK, tuned_gemms=not args.untuned_gemms,
                                        gemm_timings=gemm_timings))


if __name__ == "__main__":
    main()
