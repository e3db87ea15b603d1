"""The fault-injection suite and the relay load test in one command.

    python -m tests.chaos.run            # short form (CI size): 60 jobs a scenario, 200 relay clients
    python -m tests.chaos.run --full     # 1,000 jobs a scenario over 50 adapters, 1,000 relay clients

Starts its own fleet on loopback (redis-server with AOF, workers, API, relay), runs every scenario,
prints a table and writes ``bench/results/<date>-cpu-chaos.json`` and ``.md``. Exits 1 when a job
was lost or a client saw a duplicate or missing chunk.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from tests.chaos.harness import Fleet
from tests.chaos.relay_load import relay_load
from tests.chaos.scenarios import BY_NAME, SCENARIOS, run_scenario

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["scenario", "submitted", "completed", "failed", "lost", "dup_chunks", "missing_chunks", "hung_clients",
           "rerun", "reconnects", "client_errors", "chunk_latency_ms_p50", "chunk_latency_ms_p99", "ttfc_ms_p50", "ttfc_ms_p99", "wall_s"]
RELAY_COLUMNS = ["scenario", "clients_peak_open", "completed", "lost", "dup_chunks", "missing_chunks",
                 "chunk_latency_ms_p50", "chunk_latency_ms_p99", "ttfc_ms_p50", "ttfc_ms_p99", "relay_rss_mb_idle",
                 "relay_rss_mb_peak", "relay_rss_mb_after", "connect_all_s", "wall_s"]


def failures(row: dict) -> list[str]:
    """What a row shows that must never happen."""
    bad = [f"{k}={row[k]}" for k in ("lost", "dup_chunks", "missing_chunks", "hung_clients", "result_mismatch")
           if row.get(k)]
    if row.get("submitted", 0) < row.get("jobs", 0):
        bad.append(f"only {row['submitted']} of {row['jobs']} jobs could be submitted")
    return bad


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def describe(rows: list[dict]) -> str:
    """The failure reasons and fault notes under the table."""
    out = []
    for r in rows:
        bits = [f"{k}: {v}" for k, v in (r.get("failed_reasons") or {}).items()]
        if r.get("note"):
            bits.append(r["note"])
        if bits:
            out.append(f"- {r['scenario']}: " + "; ".join(bits))
    return "\n".join(out)


def commit() -> str:
    """HEAD, with ``-dirty`` when the working tree differs from it (what ran is not that commit)."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "producer", "worker", "tests/chaos"],
                               cwd=REPO).returncode != 0
    except OSError:
        return "unknown"
    return head + ("-dirty" if dirty else "")


def write_results(rows: list[dict], relay_rows: list[dict], form: str, config: dict, out_dir: Path) -> Path:
    import torch
    device = f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    record = {"bench": "chaos", "device": device, "torch": torch.__version__, "commit": commit(), "form": form,
              "config": config, "rows": rows + relay_rows}
    stem = out_dir / f"{dt.date.today().isoformat()}-cpu-chaos{'' if form == 'full' else '-short'}"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    md = [f"# chaos ({form}, {dt.date.today().isoformat()}, {device}, commit {record['commit']})", "",
          f"Config: {json.dumps(config)}", "", markdown(rows, COLUMNS), "", describe(rows)]
    if relay_rows:
        md += ["", "## relay load", "", markdown(relay_rows, RELAY_COLUMNS)]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    return stem.with_suffix(".json")


async def main_async(args) -> int:
    names = args.scenarios.split(",") if args.scenarios else [s.name for s in SCENARIOS]
    root = Path(tempfile.mkdtemp(prefix="openlora-chaos-"))
    fleet = Fleet(root, num_adapters=args.adapters, workers=args.workers, heartbeat_ttl=args.ttl)
    print(f"starting the fleet under {root} ...", flush=True)
    t0 = time.monotonic()
    await asyncio.to_thread(fleet.start)
    print(f"fleet up in {time.monotonic() - t0:.1f} s", flush=True)
    rows, relay_rows = [], []
    try:
        for name in names:
            row, _ = await run_scenario(fleet, BY_NAME[name], args.jobs, submit_span_s=args.span,
                                        timeout_s=args.timeout)
            rows.append(row)
            print(table([row], COLUMNS) + ("\n  " + describe([row]) if describe([row]) else ""), flush=True)
        if args.relay_clients:
            relay_rows.append(await relay_load(fleet, args.relay_clients, timeout_s=args.timeout))
            print(table(relay_rows, RELAY_COLUMNS), flush=True)
        tracebacks = fleet.tracebacks()
    finally:
        await asyncio.to_thread(fleet.stop)
    print("\n" + table(rows, COLUMNS))
    print(describe(rows))
    if relay_rows:
        print("\n" + table(relay_rows, RELAY_COLUMNS))
    print(f"tracebacks in process logs: {tracebacks}  (logs: {fleet.logs})")
    config = {"jobs_per_scenario": args.jobs, "adapters": args.adapters, "workers": args.workers,
              "heartbeat_ttl_s": args.ttl, "relay_clients": args.relay_clients, "scenarios": names}
    if not args.no_write:
        path = write_results(rows, relay_rows, "full" if args.full else "short", config, Path(args.out))
        print(f"wrote {path} and {path.with_suffix('.md')}")
    bad = {r["scenario"]: failures(r) for r in rows + relay_rows if failures(r)}
    for scenario, what in bad.items():
        print(f"FAILED {scenario}: {', '.join(what)}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="1,000 jobs a scenario, 1,000 relay clients")
    p.add_argument("--jobs", type=int, default=None, help="jobs per scenario (short 60, full 1000)")
    p.add_argument("--adapters", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ttl", type=float, default=2.0, help="worker heartbeat TTL (s)")
    p.add_argument("--relay-clients", type=int, default=None, help="short 200, full 1000; 0 skips")
    p.add_argument("--scenarios", default="", help=f"comma-separated, of {', '.join(BY_NAME)}")
    p.add_argument("--span", type=float, default=None, help="seconds over which a scenario submits its jobs")
    p.add_argument("--timeout", type=float, default=None, help="seconds a scenario may take")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.jobs = args.jobs or (1000 if args.full else 60)
    args.relay_clients = (1000 if args.full else 200) if args.relay_clients is None else args.relay_clients
    args.span = args.span if args.span is not None else (10.0 if args.full else 2.0)
    args.timeout = args.timeout or (600.0 if args.full else 120.0)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
