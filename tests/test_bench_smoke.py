"""The end-to-end benchmark runs (tiny shapes on the CPU), so it cannot rot between GPU sessions."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_engine_bench_smoke():
    root = Path(__file__).parents[1]
    run = subprocess.run([sys.executable, "bench/engine.py", "--smoke"], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for system in ("openlora-base", "openlora", "roofline", "hf-peft"):
        assert system in run.stdout


def test_score_bench_smoke():
    root = Path(__file__).parents[1]
    run = subprocess.run([sys.executable, "bench/score.py", "--smoke"], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "online-idle" in run.stdout and "loglik-60x6" in run.stdout and "batch vs alone" in run.stdout
