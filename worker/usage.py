"""The usage ledger on the worker: tokens per (day, tenant, adapter), written to the database in batches.

Counted from the results a worker writes (every finished run, whatever its
status: a cancelled job still used the tokens it produced), accumulated in
memory and flushed in one transaction through ``db.record_usage`` (an atomic
upsert, so several workers can flush into the same rows).
"""
from __future__ import annotations

import datetime as dt
import threading
from collections import defaultdict

import db


class UsageLedger:
    def __init__(self, database_url: str):
        self.engine = db.init_db(database_url)
        self._pending: dict[tuple[dt.date, str, str | None], list[int]] = defaultdict(lambda: [0, 0, 0])
        self._lock = threading.Lock()

    def add(self, tenant: str, adapter: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            row = self._pending[(dt.datetime.now(dt.timezone.utc).date(), tenant, adapter)]
            row[0] += prompt_tokens
            row[1] += completion_tokens
            row[2] += 1

    def flush(self) -> int:
        """Write what has accumulated; returns the number of ledger rows touched. On failure the counts stay
        pending for the next flush."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: [0, 0, 0])
        if not pending:
            return 0
        try:
            with db.session_scope(self.engine) as session:
                for (day, tenant, adapter), (p, c, n) in pending.items():
                    db.record_usage(session, tenant, adapter, p, c, day=day, requests=n)
        except Exception:
            with self._lock:
                for key, (p, c, n) in pending.items():
                    row = self._pending[key]
                    row[0] += p
                    row[1] += c
                    row[2] += n
            raise
        return len(pending)
