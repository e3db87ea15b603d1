"""Job-queue overhead on the CPU: what Redis, the client and the worker runtime cost per job,
measured with an engine that does no compute.

    python bench/queue.py [--jobs 2000] [--tokens 4] [--latency-jobs 300] [--redis-url URL] [--out bench/results]

Starts a redis-server on a free port (unless --redis-url) and one worker process
(`WorkerRuntime` around `InstantEngine`, which emits one token per request per
step at once). Rows:
- `throughput`: submit N jobs, then wait for every result (sync client, one thread);
  also the same with the async client keeping 64 jobs in flight;
- `latency`: one job at a time on an idle worker: submit() call, submit -> first
  chunk (Client.stream), submit -> result (Client.wait).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # `python bench/X.py` puts bench/ first on the path, where queue.py would shadow the standard
    # library's queue module for every import below: put the repository root there instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from types import SimpleNamespace


from producer import AsyncClient, Client  # noqa: E402
from worker.errors import UnknownAdapterError  # noqa: E402
from worker.outputs import RequestOutput  # noqa: E402


class InstantEngine:
    """The engine's add_request / step / abort interface, with no model: each step emits one
    token for every running request. A benchmark harness, so the numbers are the queue's own."""

    def __init__(self):
        self.adapters: dict = {}
        self.slots = SimpleNamespace(slot_of={})
        self.active: dict[str, list[int]] = {}
        self._aborted: list[RequestOutput] = []

    def add_request(self, request_id, prompt, adapter=None, params=None) -> str:
        if adapter is not None and adapter not in self.adapters:
            raise UnknownAdapterError(f"unknown adapter {adapter!r}")
        self.active[request_id] = [params.max_tokens, 0]
        return request_id

    def abort(self, request_id) -> bool:
        if self.active.pop(request_id, None) is None:
            return False
        self._aborted.append(RequestOutput(request_id, [], "", [], finished=True, finish_reason="abort"))
        return True

    def has_unfinished(self) -> bool:
        return bool(self.active)

    def step(self) -> list[RequestOutput]:
        outs, self._aborted = self._aborted, []
        for rid, st in list(self.active.items()):
            st[1] += 1
            done = st[1] >= st[0]
            outs.append(RequestOutput(rid, [7], "x", [], finished=done, finish_reason="length" if done else None))
            if done:
                del self.active[rid]
        return outs


def serve_worker(redis_url: str) -> int:
    from worker.runtime import RuntimeConfig, run_worker
    cfg = RuntimeConfig(model_dir="-", redis_url=redis_url, worker_id="bench", max_num_seqs=64, heartbeat_ttl_s=10)
    return run_worker(cfg, engine=InstantEngine())


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench_throughput(url: str, n: int, tokens: int) -> dict:
    c = Client(url)
    params = {"max_tokens": tokens, "temperature": 0}
    t0 = time.perf_counter()
    handles = [c.submit(prompt="hi", params=params) for _ in range(n)]
    t_sub = time.perf_counter() - t0
    results = [h.wait(60) for h in handles]
    dt_ = time.perf_counter() - t0
    assert all(r.ok and r.completion_tokens == tokens for r in results)
    c.close()
    return {"system": "openlora", "workload": "throughput-sync", "jobs": n, "tokens_per_job": tokens,
            "jobs_per_s": n / dt_, "tok_per_s": n * tokens / dt_, "submit_per_s": n / t_sub}


def bench_throughput_async(url: str, n: int, tokens: int, inflight: int = 64) -> dict:
    async def main():
        c = AsyncClient(url)
        sem = asyncio.Semaphore(inflight)

        async def one():
            async with sem:
                h = await c.submit(prompt="hi", params={"max_tokens": tokens, "temperature": 0})
                return await h.wait(60)
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one() for _ in range(n)])
        took = time.perf_counter() - t0
        await c.aclose()
        assert all(r.ok for r in results)
        return took
    took = asyncio.run(main())
    return {"system": "openlora", "workload": f"throughput-async-{inflight}", "jobs": n, "tokens_per_job": tokens,
            "jobs_per_s": n / took, "tok_per_s": n * tokens / took}


def bench_latency(url: str, n: int, tokens: int) -> dict:
    c = Client(url, block_ms=1000)
    submit_ms, first_ms, result_ms = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        h = c.submit(prompt="hi", params={"max_tokens": tokens, "temperature": 0})
        t1 = time.perf_counter()
        it = h.stream(timeout=30)
        next(it)
        t2 = time.perf_counter()
        for _ in it:
            pass
        h.wait(30)
        t3 = time.perf_counter()
        submit_ms.append((t1 - t0) * 1e3)
        first_ms.append((t2 - t0) * 1e3)
        result_ms.append((t3 - t0) * 1e3)
    c.close()
    return {"system": "openlora", "workload": "latency-idle", "jobs": n, "tokens_per_job": tokens,
            "submit_ms_p50": pct(submit_ms, 0.5), "submit_ms_p99": pct(submit_ms, 0.99),
            "first_chunk_ms_p50": pct(first_ms, 0.5), "first_chunk_ms_p99": pct(first_ms, 0.99),
            "result_ms_p50": pct(result_ms, 0.5), "result_ms_p99": pct(result_ms, 0.99)}


def start_redis() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    c = Client(url)
    for _ in range(200):
        try:
            c.redis.ping()
            return proc, url
        except Exception:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--latency-jobs", type=int, default=300)
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--serve-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_worker:
        return serve_worker(args.serve_worker)

    redis_proc, url = (None, args.redis_url) if args.redis_url else start_redis()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    worker = subprocess.Popen([sys.executable, __file__, "--serve-worker", url], env=env)
    c = Client(url)
    while not c.workers():
        if worker.poll() is not None:
            raise RuntimeError("the bench worker exited")
        time.sleep(0.05)
    try:
        bench_latency(url, 20, args.tokens)                                  # warm up
        rows = [bench_latency(url, args.latency_jobs, args.tokens),
                bench_throughput(url, args.jobs, args.tokens),
                bench_throughput_async(url, args.jobs, args.tokens)]
        redis_version = c.redis.info("server")["redis_version"]
    finally:
        worker.terminate()
        worker.wait(30)
        if redis_proc is not None:
            redis_proc.kill()
    cols_t = ["workload", "jobs", "tokens_per_job", "jobs_per_s", "tok_per_s", "submit_per_s"]
    cols_l = ["workload", "jobs", "submit_ms_p50", "submit_ms_p99", "first_chunk_ms_p50", "first_chunk_ms_p99",
              "result_ms_p50", "result_ms_p99"]
    from bench.common import commit, table
    device = f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"
    print(f"queue bench on {device}, redis {redis_version}, one worker (InstantEngine), client in one process\n")
    print(table([r for r in rows if "jobs_per_s" in r], cols_t))
    print()
    print(table([r for r in rows if "first_chunk_ms_p50" in r], cols_l))
    if not args.no_write:
        import torch
        record = {"bench": "queue", "device": device, "torch": torch.__version__, "triton": None,
                  "redis": redis_version, "commit": commit(), "rows": rows}
        path = Path(args.out) / f"{dt.date.today().isoformat()}-cpu-queue.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
