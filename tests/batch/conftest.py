"""Batch-run fixtures: a real redis-server, a real fleet worker, real Celery batch workers, a SQLite run DB."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleet.conftest import REPO, client, rds, redis_url, reference, start_worker  # noqa: F401


@pytest.fixture(scope="module")
def batch_env(redis_url, tmp_path_factory) -> dict:
    """Environment shared by the CLI, the Celery batch workers and the test: Redis, DB, run files."""
    home = tmp_path_factory.mktemp("olora-home")
    return {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{home / 'runs.db'}",
            "OPENLORA_HOME": str(home), "OPENLORA_CELERY_RUNTIME": "0", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


class CeleryBatchWorker:
    """``celery -A worker.celery_app worker -Q openlora.batch --pool threads`` in a subprocess."""

    def __init__(self, env: dict, log_path: Path, name: str, concurrency: int = 4):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "openlora.batch",
             "--pool", "threads", "--concurrency", str(concurrency), "-n", name, "--without-gossip",
             "--without-mingle", "--without-heartbeat", "-l", "info"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def start_batch_worker(batch_env, tmp_path_factory):
    if shutil.which("celery") is None:
        pytest.skip("the celery command is not installed")
    logs = tmp_path_factory.mktemp("celery-logs")
    procs: list[CeleryBatchWorker] = []

    def start(name: str, concurrency: int = 4) -> CeleryBatchWorker:
        w = CeleryBatchWorker(batch_env, logs / f"{name}.log", f"{name}@test", concurrency)
        procs.append(w)
        return w

    yield start
    for w in procs:
        w.stop()


def openlora(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``openlora`` CLI as a user would, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
