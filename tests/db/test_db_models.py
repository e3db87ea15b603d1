"""CRUD, constraints, JSON and timestamps of every table, on both backends."""

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, StatementError
from sqlmodel import select

from db.adapters import Adapter, AdapterOwnershipError, register_adapter, validate_adapter_id
from db.base import utcnow
from db.jobs import BatchRun, BatchRunStatus, Job, JobStatus
from db.session import session_scope

SHA = "ab" * 32


def make_adapter(adapter_id: str = "acme/sql-v2", **overrides: Any) -> Adapter:
    fields: dict[str, Any] = dict(
        id=adapter_id, name="SQL v2", base_model="meta-llama/Llama-3.1-8B", rank=16,
        alpha=32.0, target_modules=["q_proj", "v_proj"], storage_uri="s3://bucket/acme/sql-v2",
        sha256=SHA, bytes=12_345_678_901, tenant="acme", group="g7",
    )
    fields.update(overrides)
    return Adapter(**fields)


def assert_utc(value: datetime | None) -> None:
    assert value is not None and value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)


# --- adapters -------------------------------------------------------------------------


def test_adapter_crud(db_engine: Engine) -> None:
    with session_scope(db_engine) as s:
        s.add(make_adapter())
    with session_scope(db_engine) as s:
        a = s.get(Adapter, "acme/sql-v2")
        assert a is not None
        assert (a.version, a.rank, a.alpha, a.bytes, a.visibility, a.group) == (
            1, 16, 32.0, 12_345_678_901, "private", "g7",
        )
        assert a.target_modules == ["q_proj", "v_proj"]
        assert_utc(a.created_at)
        first_update = a.updated_at
        a.visibility = "public"
    with session_scope(db_engine) as s:
        a = s.get(Adapter, "acme/sql-v2")
        assert a is not None and a.visibility == "public"
        assert_utc(a.updated_at)
        assert a.updated_at >= first_update
        assert list(s.exec(select(Adapter.id).where(Adapter.group == "g7"))) == ["acme/sql-v2"]
        s.delete(a)
    with session_scope(db_engine) as s:
        assert s.get(Adapter, "acme/sql-v2") is None


def test_adapter_id_is_unique(db_engine: Engine) -> None:
    with session_scope(db_engine) as s:
        s.add(make_adapter())
    with pytest.raises(IntegrityError), session_scope(db_engine) as s:
        s.add(make_adapter(name="again"))


@pytest.mark.parametrize("good", ["acme/sql-v2", "sql_v2.1", "a", "x" * 64 + "/" + "y" * 64])
def test_adapter_id_accepts_slugs(good: str) -> None:
    assert validate_adapter_id(good) == good


@pytest.mark.parametrize("bad", ["", "Acme/sql", "a/b/c", "../etc", "a b", "/abc", "abc/", "-x", "x" * 65])
def test_adapter_id_rejects_non_slugs(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid adapter id"):
        make_adapter(bad)


def test_adapter_rejects_bad_visibility_and_sha() -> None:
    with pytest.raises(ValueError, match="visibility"):
        make_adapter(visibility="secret")
    with pytest.raises(ValueError, match="sha256"):
        make_adapter(sha256="xyz")


def test_register_adapter_bumps_version(db_engine: Engine) -> None:
    with session_scope(db_engine) as s:
        assert register_adapter(s, make_adapter()).version == 1
    with session_scope(db_engine) as s:
        a = register_adapter(s, make_adapter(rank=8, target_modules=["o_proj"]))
        assert (a.version, a.rank, a.target_modules) == (2, 8, ["o_proj"])
        assert a.updated_at >= a.created_at


def test_register_adapter_refuses_another_tenants_id(db_engine: Engine) -> None:
    with session_scope(db_engine) as s:
        register_adapter(s, make_adapter())
    with pytest.raises(AdapterOwnershipError), session_scope(db_engine) as s:
        register_adapter(s, make_adapter(tenant="globex"))
    with pytest.raises(AdapterOwnershipError), session_scope(db_engine) as s:
        register_adapter(s, make_adapter(tenant=None))
    with session_scope(db_engine) as s:  # system adapters (tenant NULL) re-register too
        register_adapter(s, make_adapter("base/chat", tenant=None, visibility="public"))
        assert register_adapter(s, make_adapter("base/chat", tenant=None)).version == 2


def test_concurrent_registers_get_distinct_versions(db_engine: Engine) -> None:
    def register(_: int) -> None:
        with session_scope(db_engine) as s:
            register_adapter(s, make_adapter())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(register, range(12)))
    with session_scope(db_engine) as s:
        a = s.get(Adapter, "acme/sql-v2")
        assert a is not None and a.version == 12


# --- jobs and batch runs --------------------------------------------------------------


def test_job_crud_and_json(db_engine: Engine) -> None:
    ensemble = [{"id": "acme/a", "weight": 0.25}, {"id": "acme/b", "weight": 0.75, "x": None}]
    with session_scope(db_engine) as s:
        s.add(Job(id="job-1", tenant="acme", adapter="acme/sql-v2", priority=5))
        s.add(Job(id="job-2", tenant="acme", adapters=ensemble, mode="score"))
    with session_scope(db_engine) as s:
        job = s.get(Job, "job-1")
        assert job is not None
        assert (job.status, job.mode, job.priority, job.adapters) == ("queued", "generate", 5, None)
        assert job.status == JobStatus.QUEUED
        assert_utc(job.created_at)
        job.status = JobStatus.RUNNING
        job.started_at = utcnow()
    with session_scope(db_engine) as s:
        job = s.get(Job, "job-1")
        assert job is not None and job.status == "running"
        assert_utc(job.started_at)
        job.status, job.finished_at = "completed", utcnow()
        job.prompt_tokens, job.generated_tokens = 12, 34
        ensemble_job = s.get(Job, "job-2")
        assert ensemble_job is not None and ensemble_job.adapters == ensemble
    with session_scope(db_engine) as s:
        job = s.get(Job, "job-1")
        assert job is not None and (job.status, job.generated_tokens) == ("completed", 34)
        assert job.finished_at is not None and job.started_at is not None
        assert job.finished_at >= job.started_at
        s.delete(job)
    with session_scope(db_engine) as s:
        assert s.get(Job, "job-1") is None


def test_job_gets_uuid_id_and_rejects_bad_status() -> None:
    job = Job(tenant="acme")
    assert len(job.id) == 32
    with pytest.raises(ValueError, match="status must be one of"):
        Job(tenant="acme", status="done")
    with pytest.raises(ValueError, match="mode must be one of"):
        Job(tenant="acme", mode="train")


def test_batch_run_crud_and_job_link(db_engine: Engine) -> None:
    with session_scope(db_engine) as s:
        run = BatchRun(tenant="acme", input_uri="s3://in.jsonl", total_rows=2)
        s.add(run)
        s.flush()
        run_id = run.id
        s.add(Job(id="row-0", tenant="acme", mode="score", batch_run_id=run_id))
    with session_scope(db_engine) as s:
        run = s.get(BatchRun, run_id)
        assert run is not None and run.status == BatchRunStatus.PENDING
        assert_utc(run.created_at)
        run.status, run.done_rows, run.failed_rows = "completed", 1, 1
        run.output_uri, run.finished_at = "s3://out.jsonl", utcnow()
        jobs = list(s.exec(select(Job).where(Job.batch_run_id == run_id)))
        assert [j.id for j in jobs] == ["row-0"]
    with session_scope(db_engine) as s:
        run = s.get(BatchRun, run_id)
        assert run is not None and (run.done_rows, run.failed_rows) == (1, 1)
        assert_utc(run.finished_at)
        s.delete(run)
    with session_scope(db_engine) as s:  # ON DELETE SET NULL keeps the job's history
        job = s.get(Job, "row-0")
        assert job is not None and job.batch_run_id is None


def test_job_batch_run_must_exist(db_engine: Engine) -> None:
    with pytest.raises(IntegrityError), session_scope(db_engine) as s:
        s.add(Job(tenant="acme", batch_run_id="no-such-run"))


# --- timestamps -----------------------------------------------------------------------


def test_timestamps_come_back_utc_whatever_zone_went_in(db_engine: Engine) -> None:
    tokyo = timezone(timedelta(hours=9))
    started = datetime(2025, 3, 1, 18, 30, tzinfo=tokyo)
    with session_scope(db_engine) as s:
        s.add(Job(id="tz", tenant="acme", started_at=started))
    with session_scope(db_engine) as s:
        job = s.get(Job, "tz")
        assert job is not None
        assert job.started_at == datetime(2025, 3, 1, 9, 30, tzinfo=timezone.utc)
        assert_utc(job.started_at)


def test_naive_timestamps_are_refused(db_engine: Engine) -> None:
    with pytest.raises(StatementError, match="naive datetime"), session_scope(db_engine) as s:
        s.add(Job(tenant="acme", started_at=datetime(2025, 3, 1, 9, 30)))
