"""Batch runs: the DB row, the files of a run, and the steps that move it from created to done.

A run lives in ``$OPENLORA_HOME/batches/<id>/`` (shared by the API, the CLI and the
Celery batch workers, like the adapter store)::

    chunks/00012.jsonl           the rows of chunk 12, sorted by adapter (written once, at creation)
    parts/00012-64-3.jsonl       chunk 12's output lines: 64 rows of which 3 failed (atomic rename)
    output.jsonl                 every part's lines merged back into input order (or the CLI's -o)

The part files are the truth: a chunk with a part is done and never runs again, and the
counts in the DB row are recomputed from the part names, so a retried or resumed chunk
cannot count twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable
from itertools import groupby
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import select

from db.base import utcnow
from db.jobs import BatchRun, BatchRunStatus, JobMode
from db.session import openlora_home, session_scope
from producer.batch_rows import MODES, Row

DEFAULT_CHUNK_SIZE = 64
BATCH_QUEUE = "openlora.batch"      # the Celery queue of batch-run tasks (worker.batch_tasks)
FINAL = (BatchRunStatus.COMPLETED.value, BatchRunStatus.FAILED.value, BatchRunStatus.CANCELLED.value)
_PART_RE = re.compile(r"^(\d{5,})-(\d+)-(\d+)\.jsonl$")


class BatchNotFoundError(KeyError):
    pass


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class BatchRuns:
    def __init__(self, db_engine=None, home: str | Path | None = None):
        self.db = db_engine
        self.root = Path(home or openlora_home()) / "batches"

    # -- creating ------------------------------------------------------------------------------
    def create(self, rows: Iterable[Row], *, mode: str, tenant: str, input_uri: str, output_uri: str | None = None,
               chunk_size: int = DEFAULT_CHUNK_SIZE, token_logprobs: bool = False,
               input_sha256: str | None = None) -> BatchRun:
        """Write the run's chunks (rows sorted by adapter, so a GPU batch reuses cached adapters)
        and its DB row; the run is pending until dispatched."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(chunk_size, int) or not 1 <= chunk_size <= 10_000:
            raise ValueError(f"chunk_size must be an integer in [1, 10000], got {chunk_size!r}")
        run = BatchRun(tenant=tenant, mode=JobMode.SCORE.value if mode == "loglik" else JobMode.GENERATE.value,
                       input_uri=input_uri, input_sha256=input_sha256,
                       options={"mode": mode, "chunk_size": chunk_size, "token_logprobs": token_logprobs})
        d = self.dir(run.id)
        (d / "chunks").mkdir(parents=True)
        (d / "parts").mkdir()
        run.output_uri = output_uri or str(d / "output.jsonl")
        ordered = sorted(rows, key=lambda r: (r.route, r.index))
        chunks = 0
        # a chunk holds one adapter where it can: split at adapter changes, then at chunk_size
        for _, same in groupby(ordered, key=lambda r: r.route):
            same = list(same)
            for start in range(0, len(same), chunk_size):
                _write_lines(d / "chunks" / f"{chunks:05d}.jsonl", [r.to_json() for r in same[start:start + chunk_size]])
                chunks += 1
        run.total_rows, run.num_chunks = len(ordered), chunks
        with session_scope(self.db) as s:
            s.add(run)
        return run

    # -- reading ----------------------------------------------------------------------------------
    def dir(self, run_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", run_id or ""):
            raise BatchNotFoundError(run_id)
        return self.root / run_id

    def get(self, run_id: str, tenant: str | None = None) -> BatchRun:
        """The run; another tenant's run does not exist for ``tenant``."""
        with session_scope(self.db) as s:
            run = s.get(BatchRun, run_id)
        if run is None or (tenant is not None and run.tenant != tenant):
            raise BatchNotFoundError(run_id)
        return run

    def list(self, tenant: str, limit: int = 100) -> list[BatchRun]:
        with session_scope(self.db) as s:
            q = select(BatchRun).where(BatchRun.tenant == tenant).order_by(BatchRun.created_at.desc()).limit(limit)
            return list(s.exec(q))

    def find_unfinished(self, input_sha256: str, output_uri: str, options: dict, tenant: str) -> BatchRun | None:
        """The latest unfinished run of the same input, output and options: what a rerun resumes."""
        with session_scope(self.db) as s:
            q = (select(BatchRun).where(BatchRun.input_sha256 == input_sha256, BatchRun.output_uri == output_uri,
                                        BatchRun.tenant == tenant, BatchRun.status.not_in(FINAL))
                 .order_by(BatchRun.created_at.desc()))
            return next((r for r in s.exec(q) if r.options == options), None)

    def chunk_rows(self, run_id: str, chunk: int) -> list[Row]:
        with open(self.dir(run_id) / "chunks" / f"{chunk:05d}.jsonl") as f:
            return [Row.from_json(line) for line in f if line.strip()]

    def parts(self, run_id: str) -> dict[int, tuple[int, int, Path]]:
        """chunk -> (rows, failed rows, part file) for every chunk already written."""
        out = {}
        for p in (self.dir(run_id) / "parts").iterdir():
            m = _PART_RE.match(p.name)
            if m:
                out[int(m[1])] = (int(m[2]), int(m[3]), p)
        return out

    def pending_chunks(self, run: BatchRun) -> list[int]:
        done = self.parts(run.id)
        return [c for c in range(run.num_chunks) if c not in done]

    # -- progress -------------------------------------------------------------------------------
    def write_part(self, run_id: str, chunk: int, lines: list[dict]) -> tuple[int, int]:
        """Write a chunk's output (atomically) and bring the run's counts up to date from the parts."""
        failed = sum("error" in line for line in lines)
        d = self.dir(run_id) / "parts"
        final = d / f"{chunk:05d}-{len(lines)}-{failed}.jsonl"
        if chunk not in self.parts(run_id):
            _write_lines(final, [json.dumps(line, separators=(",", ":")) for line in lines])
        self.refresh_counts(run_id)
        return len(lines), failed

    def refresh_counts(self, run_id: str) -> None:
        parts = self.parts(run_id).values()
        done, failed = sum(p[0] for p in parts), sum(p[1] for p in parts)
        with session_scope(self.db) as s:
            s.execute(sa.update(BatchRun).where(BatchRun.id == run_id)
                      .values(done_rows=done, failed_rows=failed, updated_at=utcnow()))

    def set_status(self, run_id: str, status: str, error: str | None = None, only_from: tuple = ()) -> bool:
        """Move the run to ``status`` (if it is in one of ``only_from``, when given); False if it was not."""
        values = {"status": status, "updated_at": utcnow(), "error": error}
        if status in FINAL:
            values["finished_at"] = utcnow()
        with session_scope(self.db) as s:
            q = sa.update(BatchRun).where(BatchRun.id == run_id)
            if only_from:
                q = q.where(BatchRun.status.in_(only_from))
            return s.execute(q.values(**values)).rowcount == 1

    def cancel(self, run_id: str) -> bool:
        """Stop a run: its chunk tasks see it within a couple of seconds and cancel their jobs."""
        return self.set_status(run_id, BatchRunStatus.CANCELLED.value, "cancelled",
                               only_from=(BatchRunStatus.PENDING.value, BatchRunStatus.RUNNING.value))

    def finish(self, run_id: str) -> BatchRun:
        """Merge the parts into the output, in input order, once every chunk has one."""
        run = self.get(run_id)
        parts = self.parts(run_id)
        missing = [c for c in range(run.num_chunks) if c not in parts]
        if missing:
            raise RuntimeError(f"run {run_id} still misses {len(missing)} chunks (first: {missing[0]})")
        lines: list[tuple[int, str]] = []
        for _, _, path in parts.values():
            with open(path) as f:
                lines.extend((json.loads(line)["index"], line.rstrip("\n")) for line in f if line.strip())
        lines.sort(key=lambda x: x[0])
        if [i for i, _ in lines] != list(range(run.total_rows)):
            raise RuntimeError(f"run {run_id}: the parts do not hold each of the {run.total_rows} rows exactly once")
        _write_lines(Path(run.output_uri), [line for _, line in lines])
        self.refresh_counts(run_id)
        self.set_status(run_id, BatchRunStatus.COMPLETED.value, only_from=(BatchRunStatus.PENDING.value,
                                                                            BatchRunStatus.RUNNING.value))
        return self.get(run_id)


def run_json(run: BatchRun) -> dict:
    """What ``GET /v1/batches/{id}`` and ``openlora score --status`` show."""
    opts = run.options or {}
    return {"id": run.id, "object": "batch", "status": run.status, "mode": opts.get("mode"),
            "total_rows": run.total_rows, "done_rows": run.done_rows, "failed_rows": run.failed_rows,
            "chunks": run.num_chunks, "chunk_size": opts.get("chunk_size"), "error": run.error,
            "created_at": run.created_at.timestamp() if run.created_at else None,
            "finished_at": run.finished_at.timestamp() if run.finished_at else None}


def _write_lines(path: Path, lines: list[str]) -> None:
    """Write a whole file or nothing: a crash mid-write leaves no partial file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    with open(tmp, "w") as f:
        for line in lines:
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
