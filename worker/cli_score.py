"""``openlora score``: score (or generate for) a dataset through the fleet, with a progress bar.

    openlora score rows.jsonl -o scores.jsonl              # loglik; reruns resume an unfinished run
    openlora score rows.parquet -o out.jsonl --mode generate
    openlora score --resume RUN | --status RUN | --cancel RUN | --list

The run's chunks go to the Celery batch workers (``-Q openlora.batch``); this command
only creates the run, dispatches it and follows it. Interrupting it leaves the run
going; ``--status`` or ``openlora score --resume`` picks it up again.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from producer.batches import DEFAULT_CHUNK_SIZE, FINAL, BatchNotFoundError


def add_subcommands(sub) -> None:
    p = sub.add_parser("score", help="score or generate over a JSONL/Parquet dataset through the fleet (resumable)")
    p.add_argument("input", nargs="?", type=Path, help="JSONL or Parquet rows: prompt, [completion], adapter(s), id")
    p.add_argument("-o", "--output", type=Path, help="output JSONL (input order, one line a row)")
    p.add_argument("--mode", choices=["loglik", "generate"], default="loglik")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="rows per Celery task")
    p.add_argument("--token-logprobs", action="store_true", help="loglik: also write each token's logprob")
    p.add_argument("--tenant", default="default", help="tenant the jobs and the run belong to")
    p.add_argument("--new", action="store_true", help="start a new run even if an unfinished one matches")
    p.add_argument("--no-wait", action="store_true", help="dispatch and return (follow later with --status)")
    p.add_argument("--database-url", default=None, help="default: $DATABASE_URL or SQLite in $OPENLORA_HOME")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--resume", metavar="RUN", help="dispatch the chunks of RUN that have no output yet")
    act.add_argument("--status", metavar="RUN", help="show RUN (and follow it while it runs)")
    act.add_argument("--cancel", metavar="RUN")
    act.add_argument("--list", action="store_true", help="the tenant's runs")
    p.set_defaults(run=cmd_score)


def cmd_score(args) -> int:
    from db.session import init_db
    from producer.batches import BatchRuns
    runs = BatchRuns(init_db(args.database_url))
    try:
        if args.list:
            return _list(runs, args.tenant)
        if args.cancel:
            ok = runs.cancel(args.cancel)
            print(f"run {args.cancel}: {'cancelled' if ok else 'already ' + runs.get(args.cancel).status}")
            return 0
        if args.status:
            return _follow(runs, args.status, wait=not args.no_wait)
        if args.resume:
            return _dispatch(runs, args.resume, args.no_wait, resumed=True)
        return _start(runs, args)
    except BatchNotFoundError as e:
        print(f"error: no batch run {e.args[0]!r}", file=sys.stderr)
        return 2


def _start(runs, args) -> int:
    from producer.batch_rows import BatchInputError, read_rows
    from producer.batches import file_sha256
    if args.input is None or args.output is None:
        print("error: give INPUT and -o OUTPUT (or --resume/--status/--cancel/--list)", file=sys.stderr)
        return 2
    output = str(args.output.resolve())
    options = {"mode": args.mode, "chunk_size": args.chunk_size, "token_logprobs": args.token_logprobs}
    try:
        sha = file_sha256(args.input)
    except OSError as e:
        print(f"error: cannot read {args.input}: {e.strerror}", file=sys.stderr)
        return 2
    previous = None if args.new else runs.find_unfinished(sha, output, options, args.tenant)
    if previous is not None:
        print(f"resuming run {previous.id}: {previous.done_rows:,}/{previous.total_rows:,} rows already written")
        return _dispatch(runs, previous.id, args.no_wait, resumed=True)
    try:
        rows = list(read_rows(args.input, args.mode, args.token_logprobs))
    except BatchInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {args.input} holds no rows", file=sys.stderr)
        return 2
    run = runs.create(rows, mode=args.mode, tenant=args.tenant, input_uri=str(args.input.resolve()),
                      output_uri=output, chunk_size=args.chunk_size, token_logprobs=args.token_logprobs,
                      input_sha256=sha)
    bad = sum(r.error is not None for r in rows)
    print(f"run {run.id}: {run.total_rows:,} rows in {run.num_chunks} chunks"
          + (f" ({bad} rows invalid: reported in the output)" if bad else ""))
    return _dispatch(runs, run.id, args.no_wait)


def _dispatch(runs, run_id: str, no_wait: bool, resumed: bool = False) -> int:
    from worker.batch_tasks import dispatch
    try:
        sent = dispatch(run_id, runs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if resumed:
        print(f"run {run_id}: {sent} chunks sent")
    return 0 if no_wait else _follow(runs, run_id)


def _follow(runs, run_id: str, wait: bool = True, interval: float = 0.5) -> int:
    run = runs.get(run_id)
    bar = ProgressBar(run.total_rows, start_done=run.done_rows)
    while wait and run.status not in FINAL:
        bar.update(run.done_rows, run.failed_rows)
        time.sleep(interval)
        run = runs.get(run_id)
    bar.close(run.done_rows, run.failed_rows)
    _summary(run, bar)
    return 0 if run.status in ("completed", "running", "pending") else 1


class ProgressBar:
    """``[#######.....]  1,024/2,000 rows  51%  212 rows/s  ETA 0:04  3 failed`` on stderr; on a
    terminal it redraws in place, elsewhere it prints a line every few seconds."""

    def __init__(self, total: int, start_done: int = 0, stream=None, width: int = 30):
        self.total, self.start_done, self.width = total, start_done, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = self.last_print = time.monotonic()

    def rate(self, done: int) -> float:
        dt = time.monotonic() - self.t0
        return (done - self.start_done) / dt if dt > 0 else 0.0

    def line(self, done: int, failed: int) -> str:
        frac = done / self.total if self.total else 1.0
        fill = int(frac * self.width)
        rate = self.rate(done)
        eta = _clock((self.total - done) / rate) if rate > 0 else "?"
        return (f"[{'#' * fill}{'.' * (self.width - fill)}] {done:,}/{self.total:,} rows {frac:4.0%}  "
                f"{rate:,.1f} rows/s  ETA {eta}" + (f"  {failed:,} failed" if failed else ""))

    def update(self, done: int, failed: int) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self.line(done, failed))
        elif now - self.last_print >= 2.0:
            self.stream.write(self.line(done, failed) + "\n")
        else:
            return
        self.last_print = now
        self.stream.flush()

    def close(self, done: int, failed: int) -> None:
        self.stream.write(("\r" if self.tty else "") + self.line(done, failed) + "\n")
        self.stream.flush()


def _summary(run, bar: ProgressBar) -> None:
    took = time.monotonic() - bar.t0
    rows = [("run", run.id), ("status", run.status), ("mode", (run.options or {}).get("mode", "")),
            ("rows", f"{run.done_rows:,} of {run.total_rows:,} written, {run.failed_rows:,} with an error"),
            ("output", run.output_uri or "")]
    if run.done_rows > bar.start_done:
        rows.append(("this session", f"{run.done_rows - bar.start_done:,} rows in {took:.1f} s "
                                     f"({bar.rate(run.done_rows):,.1f} rows/s)"))
    if run.error:
        rows.append(("error", run.error))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _list(runs, tenant: str) -> int:
    found = runs.list(tenant)
    if not found:
        print(f"no batch runs for tenant {tenant!r}")
        return 0
    header = ("RUN", "STATUS", "MODE", "ROWS", "DONE", "FAILED", "CREATED")
    table = [(r.id, r.status, (r.options or {}).get("mode", ""), f"{r.total_rows:,}", f"{r.done_rows:,}",
              f"{r.failed_rows:,}", r.created_at.strftime("%Y-%m-%d %H:%M")) for r in found]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for line in (header, *table):
        print("  ".join(f"{x:<{w}}" for x, w in zip(line, widths)).rstrip())
    return 0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"
