"""Celery orchestration of batch runs: one task a chunk, grouped under a chord that writes the output.

    celery -A worker.celery_app worker -Q openlora.batch --pool threads --concurrency 8   # no GPU needed

A chunk task submits its rows as low-priority jobs into the adapter-group shards (job ids
fixed by run and row: a re-run of the task finds them queued or done), waits for their
results, and writes the chunk's part file. Chunks that already have a part are skipped,
so ``dispatch`` after any crash resumes the run where it stopped. Settings come from the
environment: ``REDIS_URL`` (jobs), ``DATABASE_URL`` (runs), ``OPENLORA_HOME`` (run files).
"""
from __future__ import annotations

import logging
import os
import threading
import time

from celery import chord, group

from db.jobs import BatchRunStatus
from db.session import get_engine
from producer.batch_rows import job_for, output_row
from producer.batches import FINAL, BatchRuns
from producer.client import Client
from producer.errors import JobNotFoundError, JobTimeoutError, JobValidationError, QueueFullError
from worker.celery_app import BATCH_QUEUE, app

log = logging.getLogger("openlora.batch")
CANCELLED = BatchRunStatus.CANCELLED.value
_local = threading.local()


def _runs() -> BatchRuns:
    if getattr(_local, "runs", None) is None:
        _local.runs = BatchRuns(get_engine())
    return _local.runs


def _client() -> Client:
    if getattr(_local, "client", None) is None:      # one connection per pool thread
        _local.client = Client(os.environ.get("REDIS_URL"))
    return _local.client


@app.task(name="openlora.score_chunk", queue=BATCH_QUEUE, acks_late=True, reject_on_worker_lost=True)
def score_chunk(run_id: str, chunk: int) -> dict:
    runs, client = _runs(), _client()
    run = runs.get(run_id)
    if run.status in FINAL:
        return {"chunk": chunk, "skipped": run.status}
    if chunk in runs.parts(run_id):
        return {"chunk": chunk, "skipped": "done"}
    runs.set_status(run_id, BatchRunStatus.RUNNING.value, only_from=(BatchRunStatus.PENDING.value,))
    rows, mode = runs.chunk_rows(run_id, chunk), run.options["mode"]
    job_ids: dict[int, str] = {}
    for row in rows:
        if row.job is None:
            continue
        job = job_for(row, run_id, run.tenant)
        try:
            _submit(client, job, lambda: runs.get(run_id).status == CANCELLED)
        except JobValidationError as e:      # validated when the run was made: only a changed schema gets here
            row.job, row.error = None, str(e)
            continue
        except _Cancelled:
            return _cancel(client, job_ids.values(), chunk)
        job_ids[row.index] = job["id"]
    results = {}
    for index, job_id in job_ids.items():
        res = _wait(client, job_id, lambda: runs.get(run_id).status == CANCELLED)
        if res is _CANCELLED:
            return _cancel(client, job_ids.values(), chunk)
        results[index] = res
    n, failed = runs.write_part(run_id, chunk, [output_row(row, mode, results.get(row.index)) for row in rows])
    log.info("run %s chunk %d: %d rows, %d failed", run_id, chunk, n, failed)
    return {"chunk": chunk, "rows": n, "failed": failed}


@app.task(name="openlora.finish_run", queue=BATCH_QUEUE)
def finish_run(_chunk_results, run_id: str) -> dict:
    """The chord's callback: merge the parts into the output once every chunk has one."""
    runs = _runs()
    run = runs.get(run_id)
    if run.status in FINAL:
        return {"run": run_id, "status": run.status}
    pending = runs.pending_chunks(run)
    if pending:      # a chunk was cancelled or its task lost: a resume dispatches the rest
        return {"run": run_id, "status": run.status, "pending_chunks": len(pending)}
    try:
        run = runs.finish(run_id)
    except (OSError, RuntimeError) as e:
        log.exception("run %s: writing the output failed", run_id)
        runs.set_status(run_id, BatchRunStatus.FAILED.value, f"writing the output failed: {e}")
        raise
    return {"run": run_id, "status": run.status, "rows": run.done_rows, "failed": run.failed_rows}


@app.task(name="openlora.dispatch_run", queue=BATCH_QUEUE, ignore_result=True)
def dispatch_run(run_id: str) -> int:
    """``dispatch`` run by a batch worker: what a long-lived producer (the API) sends, so that it
    never waits on, nor subscribes to, the chord's results."""
    return dispatch(run_id)


def dispatch(run_id: str, runs: BatchRuns | None = None, celery_app=None) -> int:
    """Send the chunks of ``run_id`` that have no output yet, under a chord that finishes the run.
    Running it again (a resume) sends only what is still missing. Returns the chunks sent.
    ``celery_app``: the app whose broker gets them (default: this module's, from ``REDIS_URL``)."""
    runs, celery_app = runs or _runs(), celery_app or app
    run = runs.get(run_id)
    if run.status in FINAL:
        raise ValueError(f"run {run_id} is {run.status}; nothing to resume")
    pending = runs.pending_chunks(run)
    finish = celery_app.signature("openlora.finish_run", args=(run_id,), queue=BATCH_QUEUE)
    if pending:
        chunks = [celery_app.signature("openlora.score_chunk", args=(run_id, c), queue=BATCH_QUEUE, immutable=True)
                  for c in pending]
        chord(group(chunks, app=celery_app), finish, app=celery_app).apply_async()
    else:
        celery_app.signature("openlora.finish_run", args=([], run_id), queue=BATCH_QUEUE).apply_async()
    return len(pending)


# -- helpers ---------------------------------------------------------------------------------
class _Cancelled(Exception):
    pass


_CANCELLED = object()


def _submit(client: Client, job: dict, cancelled) -> None:
    """Submit, waiting while the shard is full (scoring must not crowd the queue out)."""
    delay = 0.05
    while True:
        try:
            client.submit(job)
            return
        except QueueFullError:
            if cancelled():
                raise _Cancelled() from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _wait(client: Client, job_id: str, cancelled):
    while True:
        try:
            return client.wait(job_id, timeout=2.0)
        except JobTimeoutError:
            if cancelled():
                return _CANCELLED
        except JobNotFoundError:
            return None          # its result expired: the row is reported as having none


def _cancel(client: Client, job_ids, chunk: int) -> dict:
    for job_id in job_ids:
        client.cancel(job_id)
    return {"chunk": chunk, "skipped": CANCELLED}
