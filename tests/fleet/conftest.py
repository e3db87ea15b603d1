"""Fleet fixtures: a real redis-server on a free port, real worker processes on the tiny model."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from producer import Client, ShardRouter, keys

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_TTL = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A fresh redis-server per test module (no persistence), killed at teardown."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    else:
        proc.kill()
        raise RuntimeError("redis-server did not start")
    yield url
    r.close()
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def rds(redis_url):
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


class WorkerProc:
    """``python -m worker.runtime`` in a subprocess; its log goes to a file."""

    def __init__(self, redis_url: str, model_dir, adapters_root, worker_id: str, log_dir: Path, *,
                 preload=(), shard_map=None, max_num_seqs=8, extra=()):
        self.id, self.redis_url = worker_id, redis_url
        self.log_path = log_dir / f"{worker_id}.log"
        args = [sys.executable, "-m", "worker.runtime", "--model-dir", str(model_dir), "--redis-url", redis_url,
                "--adapter-dirs", str(adapters_root), "--worker-id", worker_id, "--heartbeat-ttl", str(HEARTBEAT_TTL),
                "--max-num-seqs", str(max_num_seqs), "--torch-threads", "1", "--grace", "20", *extra]
        if preload:
            args += ["--preload", ",".join(preload)]
        if shard_map:
            import json
            args += ["--shard-map", json.dumps(shard_map)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90) -> WorkerProc:
        r = redis.Redis.from_url(self.redis_url)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.id} exited with {self.proc.returncode}:\n{self.output()}")
            if r.exists(keys.worker("default", self.id)):
                r.close()
                return self
            time.sleep(0.05)
        raise TimeoutError(f"worker {self.id} did not start:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def start_worker(redis_url, tiny, tmp_path_factory):
    """start_worker(worker_id, **options) -> WorkerProc (not yet ready); all stopped at teardown."""
    model_dir, adapters = tiny
    root = Path(next(iter(adapters.values()))).parent
    log_dir = tmp_path_factory.mktemp("worker-logs")
    procs = []

    def start(worker_id: str, **kw) -> WorkerProc:
        w = WorkerProc(redis_url, model_dir, root, worker_id, log_dir, **kw)
        procs.append(w)
        return w

    yield start
    for w in procs:
        w.stop()


@pytest.fixture(scope="module")
def client(redis_url):
    c = Client(redis_url, router=ShardRouter(), block_ms=200)
    yield c
    c.close()


@pytest.fixture(scope="session")
def reference(tiny):
    """reference(prompt, adapter, **params) -> CompletionOutput of the engine in this process."""
    import torch
    from worker.engine import Engine, SamplingParams
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model_dir, adapters = tiny
    engine = Engine(model_dir, max_loras=4)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    torch.set_num_threads(threads)

    def generate(prompt, adapter=None, **params):
        torch.set_num_threads(1)
        try:
            return engine.generate([prompt], [adapter], SamplingParams(**params))[0]
        finally:
            torch.set_num_threads(threads)

    generate.engine = engine            # for ensembles and scoring
    return generate


def collect(client, job_id: str, timeout: float = 60) -> list:
    return list(client.stream(job_id, timeout=timeout))


def assert_stream_consistent(chunks, result) -> None:
    """Each chunk once, in order, no gap; the stream adds up to the result."""
    seq = 0
    for c in chunks:
        assert c.seq == seq, f"chunk seq {c.seq}, expected {seq}: {[x.seq for x in chunks]}"
        seq = c.end
    assert chunks[-1].final and all(not c.final for c in chunks[:-1])
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert "".join(c.text for c in chunks) == result.text


def wait_until(cond, timeout: float = 10, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    return cond()
