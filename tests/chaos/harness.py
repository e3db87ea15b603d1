"""The real fleet, as processes on loopback, for fault injection: a redis-server with AOF on, queue
workers (``python -m worker.runtime``), the HTTP API and the websocket relay (``python -m worker.cli``).

Every process can be killed, stopped and restarted by the scenarios; nothing is mocked.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from tests.fleet.conftest import REPO, WorkerProc, _free_port


class RedisServer:
    """``redis-server`` with ``appendonly yes`` in its own directory; ``restart`` keeps port and data."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            raise RuntimeError("redis-server is not installed")
        self.dir, self.port = Path(data_dir), port or _free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self, timeout: float = 30) -> RedisServer:
        log = open(self.dir / "redis.log", "a")
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--maxclients", "10000"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        r = redis.Redis.from_url(self.url, socket_timeout=1)
        end = time.monotonic() + timeout
        try:
            while True:
                try:
                    if r.ping():
                        return self
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"redis-server did not start:\n{(self.dir / 'redis.log').read_text()[-2000:]}")
                time.sleep(0.02)
        finally:
            r.close()

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (what reached the AOF survives, nothing more)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, down_s: float = 0.5) -> float:
        """Crash and start again on the same port from the AOF; returns the seconds it was down."""
        t0 = time.monotonic()
        self.kill()
        time.sleep(down_s)
        self.start()
        self.restarts += 1
        return time.monotonic() - t0

    def stop(self) -> None:
        self.kill()


class ServiceProc:
    """``python -m worker.cli api|relay`` on a free port; ``rss_mb`` reads its memory from /proc."""

    def __init__(self, command: str, redis_url: str, model_dir: Path, adapters_root: Path, log_dir: Path,
                 env: dict | None = None):
        self.command, self.port = command, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{command}.log"
        self.log = open(self.log_path, "w")
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "OPENLORA_ADAPTER_DIRS": str(adapters_root),
                    "OMP_NUM_THREADS": "1", **(env or {})}
        full_env.pop("OPENLORA_API_KEYS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", command, "--host", "127.0.0.1", "--port", str(self.port),
             "--redis-url", redis_url, "--model-dir", str(model_dir), "--log-level", "warning"],
            cwd=REPO, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")

    def wait_ready(self, timeout: float = 60) -> ServiceProc:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return self
            except OSError as e:       # refused while starting; an HTTP error means it is up
                if getattr(e, "code", None):
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"{self.command} did not start:\n{self.output()[-3000:]}")

    def _status(self, field: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def rss_mb(self) -> float:
        return self._status("VmRSS")

    def peak_rss_mb(self) -> float:
        return self._status("VmHWM")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Fleet:
    """One Redis, ``workers`` queue workers, the API and the relay, on the tiny model with
    ``num_adapters`` adapters (``ad0``...). ``root`` holds the model, Redis' AOF and every log."""

    def __init__(self, root: Path, *, num_adapters: int = 50, workers: int = 2, heartbeat_ttl: float = 2.0,
                 max_num_seqs: int = 32, max_loras: int = 8):
        self.root = Path(root)
        self.num_adapters, self.n_workers, self.ttl = num_adapters, workers, heartbeat_ttl
        self.max_num_seqs, self.max_loras = max_num_seqs, max_loras
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.workers: dict[str, WorkerProc] = {}
        self.retired: list[WorkerProc] = []
        self._next_worker = 0
        self.redis: RedisServer | None = None
        self.api = self.relay = None

    @property
    def adapters(self) -> list[str]:
        return [f"ad{k}" for k in range(self.num_adapters)]

    def start(self) -> Fleet:
        from worker.tiny import make_tiny_setup
        self.model_dir, paths = make_tiny_setup(self.root / "tiny", num_adapters=self.num_adapters)
        self.adapters_root = Path(next(iter(paths.values()))).parent
        self.redis = RedisServer(self.root / "redis").start()
        for _ in range(self.n_workers):
            self.start_worker()
        self.api = ServiceProc("api", self.redis.url, self.model_dir, self.adapters_root, self.logs)
        self.relay = ServiceProc("relay", self.redis.url, self.model_dir, self.adapters_root, self.logs)
        for w in self.workers.values():
            w.wait_ready()
        self.api.wait_ready()
        self.relay.wait_ready()
        return self

    def start_worker(self, wait: bool = False) -> WorkerProc:
        wid = f"w{self._next_worker}"
        self._next_worker += 1
        w = WorkerProc(self.redis.url, self.model_dir, self.adapters_root, wid, self.logs,
                       max_num_seqs=self.max_num_seqs,
                       extra=["--heartbeat-ttl", str(self.ttl), "--max-loras", str(self.max_loras),
                              "--grace", "5"])
        self.workers[wid] = w
        return w.wait_ready() if wait else w

    def retire(self, w: WorkerProc) -> None:
        """A worker that was killed: out of the live set, its log kept."""
        self.workers.pop(w.id, None)
        self.retired.append(w)

    def live_workers(self) -> list[WorkerProc]:
        return [w for w in self.workers.values() if w.proc.poll() is None]

    def tracebacks(self) -> dict[str, int]:
        """Process -> number of Python tracebacks in its log (a crash or an unhandled error)."""
        out = {}
        for name, text in [(w.id, w.output()) for w in [*self.workers.values(), *self.retired]] + \
                          [("api", self.api.output()), ("relay", self.relay.output())]:
            out[name] = text.count("Traceback (most recent call last)")
        return out

    def stop(self) -> None:
        for svc in (self.api, self.relay):
            if svc is not None:
                svc.stop()
        for w in [*self.workers.values(), *self.retired]:
            try:
                w.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            w.stop()
        if self.redis is not None:
            self.redis.stop()
