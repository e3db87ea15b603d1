"""``openlora demo`` end to end in a subprocess: Redis, a worker, the API and the relay come up,
every adapter's tokens stream through the relay and match the stored results, all stops cleanly."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_openlora_demo_runs_the_fleet_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("OPENLORA_API_KEYS", None)
    r = subprocess.run([sys.executable, "-m", "worker.cli", "demo", "--dir", str(tmp_path / "tiny"),
                        "--adapters", "3", "--max-tokens", "12"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "redis-server     redis://127.0.0.1:" in out and "worker           'demo'" in out
    header = next(line for line in out.splitlines() if line.startswith(" row  |"))
    assert [c.strip() for c in header.split("|")[1:]] == ["base", "ad0", "ad1", "ad2"]
    assert "48 tokens for 4 jobs" in out
    finals = [line for line in out.splitlines() if line.rstrip().endswith("[ok]")]
    assert len(finals) == 4 and "MISMATCH" not in out
    assert "POST /v1/completions model='ad0'" in out and "(12 tokens, finish_reason=length)" in out
    # the worker's usage ledger in SQLite: 4 streamed jobs and the API request, every token counted once
    ledger = [line.split() for line in out.split("usage ledger (SQLite)")[1].splitlines() if line.strip()[:2] == "20"]
    assert {row[2]: (int(row[3]), int(row[5])) for row in ledger} == {
        "base": (1, 12), "ad0": (2, 24), "ad1": (1, 12), "ad2": (1, 12)}
    assert out.rstrip().splitlines()[-1].startswith("all services stopped")
    assert "Traceback" not in r.stderr


def test_openlora_demo_offline_still_runs_in_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "worker.cli", "demo", "--offline", "--dir", str(tmp_path / "tiny"),
                        "--adapters", "2", "--max-tokens", "4"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "12 tokens for 3 requests" in r.stdout
