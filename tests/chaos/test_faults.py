"""The fault-injection suite, short form (CI): every scenario of ``tests.chaos.scenarios`` on one
shared fleet of real processes — no job lost, no client sees a duplicate or missing chunk, no
client hangs. ``python -m tests.chaos.run --full`` runs the same at 1,000 jobs a scenario."""
from __future__ import annotations

import asyncio

import pytest

from tests.chaos.run import COLUMNS, describe, failures, table
from tests.chaos.scenarios import BY_NAME, SCENARIOS, run_scenario

JOBS = 48


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_scenario_loses_nothing(chaos_fleet, name):
    restarts = chaos_fleet.redis.restarts
    row, run = asyncio.run(run_scenario(chaos_fleet, BY_NAME[name], JOBS, submit_span_s=1.5, timeout_s=90))
    print("\n" + table([row], COLUMNS) + "\n" + describe([row]))
    assert failures(row) == [], row
    assert row["completed"] + row["failed"] == row["submitted"] == JOBS
    assert len(chaos_fleet.live_workers()) == chaos_fleet.n_workers, "a worker died (or a zombie never woke)"
    if name in ("worker_sigkill", "worker_sigstop"):           # the fault hit jobs mid-decode: they ran again
        assert row["note"].startswith(("SIGKILL", "SIGSTOP")) and row["rerun"] >= 1, row
    if name == "redis_restart":
        assert chaos_fleet.redis.restarts == restarts + 1
        assert row["client_errors"] == 0, [e for s in run.seen.values() for e in s.errors]
    if name == "ws_reconnect":
        planned = sum(p.cut_after is not None for p in run.plans)
        # every hang-up done reconnected; most planned ones happen (a short job may end before its cut)
        assert row["cuts"] >= planned // 2 and row["reconnects"] >= row["cuts"] >= 1, (planned, row)
    if name == "cancel":
        assert row["failed_reasons"].get("cancelled", 0) >= 1, row
    if name == "deadline":
        assert row["failed_reasons"].get("deadline", 0) >= 1, row
