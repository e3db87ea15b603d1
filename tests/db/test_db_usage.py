"""The usage ledger: atomic upserts, including under concurrent writers."""

from concurrent.futures import ThreadPoolExecutor
from datetime import date

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from db.base import utcnow
from db.session import session_scope
from db.usage import UsageDaily, record_usage

DAY = date(2025, 1, 2)


def _rows(engine: Engine) -> list[UsageDaily]:
    with session_scope(engine) as s:
        return list(s.exec(select(UsageDaily).order_by(UsageDaily.tenant, UsageDaily.adapter_id)))


def test_record_usage_inserts_then_adds(db_engine: Engine) -> None:
    with session_scope(db_engine) as s:
        record_usage(s, "acme", "acme/sql-v2", 10, 5, day=DAY)
        record_usage(s, "acme", "acme/sql-v2", 1, 2, day=DAY)
        record_usage(s, "acme", "acme/other", 7, 7, day=DAY)
    rows = _rows(db_engine)
    assert [(r.adapter_id, r.prompt_tokens, r.generated_tokens, r.requests) for r in rows] == [
        ("acme/other", 7, 7, 1),
        ("acme/sql-v2", 11, 7, 2),
    ]


def test_base_model_usage_is_one_row_per_day_and_tenant(db_engine: Engine) -> None:
    # adapter_id NULL: a plain unique constraint would let these rows multiply.
    with session_scope(db_engine) as s:
        for _ in range(3):
            record_usage(s, "acme", None, 4, 1, day=DAY)
        record_usage(s, "acme", None, 4, 1, day=date(2025, 1, 3))
        record_usage(s, "globex", None, 1, 1, day=DAY)
    rows = sorted((r.tenant, r.day, r.prompt_tokens, r.requests) for r in _rows(db_engine))
    assert rows == [("acme", DAY, 12, 3), ("acme", date(2025, 1, 3), 4, 1), ("globex", DAY, 1, 1)]


def test_record_usage_defaults_to_today_utc(db_engine: Engine) -> None:
    with session_scope(db_engine) as s:
        record_usage(s, "acme", None, 1, 1)
    (row,) = _rows(db_engine)
    assert row.day == utcnow().date()


@pytest.mark.parametrize("bad", [{"prompt_tokens": -1}, {"generated_tokens": 1.5}, {"tenant": ""}])
def test_record_usage_rejects_bad_input(db_engine: Engine, bad: dict) -> None:
    args = {"tenant": "acme", "adapter_id": None, "prompt_tokens": 1, "generated_tokens": 1, **bad}
    with pytest.raises(ValueError), session_scope(db_engine) as s:
        record_usage(s, **args)


def test_concurrent_record_usage_adds_up_exactly(db_engine: Engine) -> None:
    threads, calls = 8, 25
    adapters = ["acme/sql-v2", None]

    def worker(i: int) -> None:
        for n in range(calls):
            with session_scope(db_engine) as s:
                record_usage(s, "acme", adapters[(i + n) % 2], 3, 2, day=DAY)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))

    rows = _rows(db_engine)
    assert len(rows) == 2
    per_adapter = threads * calls // 2
    for row in rows:
        assert (row.prompt_tokens, row.generated_tokens, row.requests) == (
            3 * per_adapter, 2 * per_adapter, per_adapter,
        )
