"""Where a decode step's time goes: GPU time of the captured graph vs the whole engine step, and the
eager kernel breakdown. Random Llama-3-8B-shaped weights, bf16.

    python bench/profile_decode.py [--batches 32 256] [--distinct 32]    (--distinct 1: Identical)
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # `python bench/X.py` puts bench/ first on the path, where queue.py would shadow the standard
    # library's queue module for every import below: put the repository root there instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import random
import tempfile
import time

import torch


from bench.engine import LLAMA3_8B, random_adapters  # noqa: E402
from worker.engine import Engine, SamplingParams  # noqa: E402


def into_decode(engine: Engine, batch: int, adapters: list[str | None], rng: random.Random) -> None:
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    for a in adapters:
        engine.add_request(None, [rng.randrange(1000) for _ in range(128)], a, params)
    while engine.scheduler.waiting or any(s.num_tokens - s.num_computed > 1 for s in engine.scheduler.running):
        engine.step()


def clear(engine: Engine) -> None:
    for rid in list(engine.seqs):
        engine.abort(rid)
    engine.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--distinct", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(LLAMA3_8B))
        engine = Engine(d, random_init=True, device="cuda", dtype=torch.bfloat16, max_loras=max(2, args.distinct),
                        max_lora_rank=16, max_num_seqs=max(args.batches), max_num_batched_tokens=8192,
                        max_model_len=1024, num_blocks=max(args.batches) * 64 + 64)
        names = random_adapters(engine, args.distinct)
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for batch in args.batches:
            for label, adapters in (("base", [None] * batch),
                                    (f"{args.distinct}-distinct", [names[i % args.distinct] for i in range(batch)])):
                into_decode(engine, batch, adapters, rng)
                walls = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    engine.step()
                    walls.append(time.perf_counter() - t0)
                n = engine.graphs.bucket(batch)
                k = min(args.distinct, batch)
                mode = "none" if label == "base" else ("fused", engine.model.tail_bucket(k, n)) \
                    if n <= engine.model.fused_lora_tokens else "single" if k == 1 else "multi"
                graph, _ = engine.graphs.graphs[(n, mode)]
                gpu = []
                for _ in range(args.steps):
                    ev0.record()
                    graph.replay()
                    ev1.record()
                    ev1.synchronize()
                    gpu.append(ev0.elapsed_time(ev1))
                # host time to schedule and build a step's inputs (repeating it changes nothing:
                # the same decode tokens need the same blocks)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    engine._build_inputs(engine.scheduler.schedule())
                build_ms = (time.perf_counter() - t0) / args.steps * 1e3
                walls.sort()
                gpu.sort()
                print(f"batch {batch:4d} {label:12s} step wall p50 {walls[len(walls)//2]*1e3:7.2f} ms | "
                      f"graph replay p50 {gpu[len(gpu)//2]:7.2f} ms | schedule+build {build_ms:6.2f} ms", flush=True)
                clear(engine)
        # eager breakdown, one decode step at the first batch size with distinct adapters
        batch = args.batches[0]
        into_decode(engine, batch, [names[i % args.distinct] for i in range(batch)], rng)
        graphs, engine.graphs = engine.graphs, None
        engine.step()
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        engine.graphs = graphs


if __name__ == "__main__":
    main()
