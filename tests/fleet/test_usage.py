"""The usage ledger: rows per (day, tenant, adapter) add up to the tokens the fleet actually produced."""
from __future__ import annotations

from sqlmodel import Session, select

import db
from db.usage import UsageDaily


def test_usage_rows_add_up_to_the_tokens_produced(start_worker, client, tmp_path):
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    worker = start_worker("usage-w", preload=["ad0"], extra=["--database-url", url]).wait_ready()
    jobs = [("acme", "ad0", 5), ("acme", "ad0", 7), ("acme", None, 3), ("globex", "ad0", 4), ("globex", "ad1", 6),
            ("globex", "ad1", 9)]
    handles = [client.submit(prompt=f"tenant {t} asks {n}", adapter=a, tenant=t,
                             params={"max_tokens": n, "temperature": 0, "ignore_eos": True}) for t, a, n in jobs]
    results = [client.wait(h.id, timeout=60) for h in handles]
    assert all(r.status == "done" for r in results)
    worker.stop()                                            # a stopping worker flushes what is pending
    expected: dict[tuple, list[int]] = {}
    for (tenant, adapter, _), r in zip(jobs, results):
        row = expected.setdefault((tenant, adapter), [0, 0, 0])
        row[0] += r.prompt_tokens
        row[1] += len(r.token_ids)
        row[2] += 1
    engine = db.make_engine(url)
    with Session(engine) as s:
        rows = s.exec(select(UsageDaily)).all()
        got = {(u.tenant, u.adapter_id): [u.prompt_tokens, u.generated_tokens, u.requests] for u in rows}
    engine.dispose()
    assert got == expected
    assert sum(v[1] for v in got.values()) == sum(n for _, _, n in jobs)   # ignore_eos: exactly max_tokens each
