"""Batch-scoring throughput and the online latency beside it, on random Llama-3-8B-shaped weights.

    python bench/score.py [--rows 10000] [--adapters 64] [--caps 256 512 2048] [--out bench/results]

A realistic loglik file: 10k rows, prompts of 64-192 tokens, completions of 8-64,
each row on one of 64 rank-16 all-projection adapters. Rows are fed to the engine as
the fleet feeds a worker: sorted by adapter into chunks (the batch planner's order),
as low-priority requests, at most ``batch_share`` of the batch in flight. For each
cap on batch prefill tokens a step (``low_priority_tokens``) it reports rows/s and
scored tokens/s, and the time to first token of online requests (128-token prompts,
arriving at random moments every ~150 ms) while the run goes, against the same
requests on an idle engine. The Redis/Celery path around it is measured on the CPU
by tests/batch (a worker's runtime adds ~2 ms a job, overlapped with the GPU).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import random
import statistics
import tempfile
import time

import torch

from bench.common import copy_bandwidth_TBps, table, write_result  # noqa: E402
from bench.engine import LLAMA3_8B, TINY, random_adapters, sync  # noqa: E402
from worker.engine import Engine, SamplingParams  # noqa: E402
from worker.scoring import loglik, score_params  # noqa: E402


def make_rows(n: int, n_adapters: int, vocab: int, rng: random.Random, plen=(64, 192), clen=(8, 64)):
    rows = []
    for i in range(n):
        p = [rng.randrange(3, vocab) for _ in range(rng.randint(*plen))]
        c = [rng.randrange(3, vocab) for _ in range(rng.randint(*clen))]
        rows.append((i, p, c, rng.randrange(n_adapters)))
    return sorted(rows, key=lambda r: (r[3], r[0]))          # the planner's order: by adapter


def run(engine: Engine, names: list[str], rows, inflight: int, probes: list[float], probe_prompt: list[int]) -> dict:
    """Score ``rows`` (none: an idle engine) while online requests arrive at ``probes`` (s from start)."""
    online = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    pending, live = list(rows), set()
    arrivals, first = {}, {}
    probes = list(probes)
    sync(engine.device)
    t0 = time.perf_counter()
    while pending or live or probes or engine.has_unfinished():
        now = time.perf_counter() - t0
        while probes and probes[0] <= now:                   # arrived during the last step
            rid = f"online{len(arrivals)}"
            arrivals[rid] = probes.pop(0)
            engine.add_request(rid, probe_prompt, names[len(arrivals) % len(names)], online)
        while pending and len(live) < inflight:
            i, p, c, a = pending.pop(0)
            live.add(f"row{i}")
            engine.add_request(f"row{i}", p + c, names[a], score_params(len(p)), priority=-1)
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(probes[0] - now, 0.01)) if probes else 0)
            continue
        for out in engine.step():
            t = time.perf_counter() - t0
            if out.request_id.startswith("online") and out.request_id not in first and out.new_token_ids:
                first[out.request_id] = t
            if out.finished:
                live.discard(out.request_id)
    total = time.perf_counter() - t0
    ttft = sorted((first[r] - arrivals[r]) * 1e3 for r in arrivals if r in first)
    res = {"total_s": total, "online_requests": len(ttft),
           "ttft_ms_p50": statistics.median(ttft) if ttft else None,
           "ttft_ms_p99": ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))] if ttft else None}
    if rows:
        n_tok = sum(len(p) + len(c) for _, p, c, _ in rows)
        res.update(rows=len(rows), rows_per_s=len(rows) / total, tokens_per_s=n_tok / total,
                   scored_tokens_per_s=sum(len(c) for _, _, c, _ in rows) / total)
    return res


def check_scores(engine: Engine, names: list[str], rows) -> float:
    """Scores of rows in a busy batch equal the same rows scored one at a time (bf16: to 0.05 nats/row)."""
    sample = rows[:: max(1, len(rows) // 16)][:16]
    together = engine.generate([p + c for _, p, c, _ in sample], [names[a] for *_, a in sample],
                               [score_params(len(p)) for _, p, _, _ in sample])
    worst = 0.0
    for (_, p, c, a), out in zip(sample, together):
        (alone,) = engine.generate([p + c], [names[a]], [score_params(len(p))])
        s1, s2 = loglik(out.prompt_logprobs, len(p)), loglik(alone.prompt_logprobs, len(p))
        if s1.tokens != len(c) or not s1.logprob_sum <= 0:
            raise AssertionError(f"bad score {s1}")
        worst = max(worst, abs(s1.logprob_sum - s2.logprob_sum) / max(1, len(c)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--caps", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    ap.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens (tokens a step)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--batch-share", type=float, default=0.75)
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--probe-every", type=float, default=0.15, help="mean seconds between online requests")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks that the bench runs")
    args = ap.parse_args()
    shape, device, dtype = (TINY, "cpu", torch.float32) if args.smoke else (LLAMA3_8B, "cuda", torch.bfloat16)
    if args.smoke:
        args.rows, args.adapters, args.caps, args.max_loras, args.probe_every, args.budget = 60, 6, [64], 4, 0.02, 256
        torch.set_num_threads(1)        # tiny ops: threads only contend
    rng = random.Random(0)
    copy = 1.0 if args.smoke else copy_bandwidth_TBps()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(shape))
        engine = Engine(d, random_init=True, device=device, dtype=dtype, max_loras=args.max_loras, max_lora_rank=16,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.budget, max_model_len=512)
        names = random_adapters(engine, args.adapters)
        vocab = engine.model_config.vocab_size
        rows = make_rows(args.rows, args.adapters, vocab, rng, *(((8, 24), (2, 8)) if args.smoke else ()))
        probe_prompt = [rng.randrange(3, vocab) for _ in range(16 if args.smoke else 128)]
        worst = check_scores(engine, names, rows)
        print(f"batch vs alone: worst |delta loglik| per token {worst:.4f} nats", flush=True)
        inflight = max(1, int(args.max_num_seqs * args.batch_share))
        results = []
        n_probes = 12 if args.smoke else 60
        probes = sorted(rng.uniform(0.5, 0.5 + n_probes * args.probe_every) for _ in range(n_probes))
        run(engine, names, rows[:inflight * 2], inflight, [], probe_prompt)               # warm-up
        idle = run(engine, names, [], inflight, probes, probe_prompt)
        results.append({"system": "openlora", "workload": "online-idle", **idle})
        for cap in args.caps:
            engine.scheduler.low_priority_tokens = cap
            res = run(engine, names, rows, inflight, probes, probe_prompt)
            res["ttft_vs_idle"] = res["ttft_ms_p50"] / idle["ttft_ms_p50"] if res["ttft_ms_p50"] else None
            results.append({"system": "openlora", "workload": f"loglik-{args.rows}x{args.adapters}",
                            "low_priority_tokens": cap, "inflight": inflight, **res})
            print(table(results[-1:], ["workload", "low_priority_tokens", "rows_per_s", "tokens_per_s",
                                       "ttft_ms_p50", "ttft_ms_p99", "ttft_vs_idle"]), flush=True)
    cols = ["workload", "low_priority_tokens", "rows", "rows_per_s", "tokens_per_s", "scored_tokens_per_s",
            "ttft_ms_p50", "ttft_ms_p99", "ttft_vs_idle", "total_s"]
    print(table(results, cols))
    if not args.smoke:
        path = write_result("score", results, args.out, copy_TBps=round(copy, 3), model="llama-3-8b-shaped (random)",
                            dtype="bfloat16", rank=16, adapters=args.adapters, max_num_seqs=args.max_num_seqs,
                            batch_share=args.batch_share, max_loras=args.max_loras, max_num_batched_tokens=args.budget,
                            batch_vs_alone_max_dnats_per_token=worst)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
