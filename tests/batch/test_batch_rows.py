"""Batch rows and the run store without a fleet: validation per row, Parquet, planning, parts, merge."""
from __future__ import annotations

import json

import pytest

from db.session import init_db
from producer.batch_rows import BatchInputError, read_rows
from producer.batches import BatchRuns
from producer.protocol import JobResult
from producer.batch_rows import output_row
from worker.cli_score import ProgressBar

ROWS = [
    {"id": "a", "prompt": "hello", "completion": " world", "adapter": "x1"},
    {"prompt": "no id here", "adapter": "x0"},
    {"id": "b", "completion": " orphan"},
    {"id": "c", "prompt": "p", "adapters": [{"id": "x0", "weight": 0.5}, {"id": "x1", "weight": 0.5}]},
    {"id": "d", "prompt": "p", "params": {"temperature": -1}},
    {"id": "e", "prompt": "p", "extra": 1},
    {"id": {"nested": 1}, "prompt": "p"},
    {"id": "f", "prompt": "p", "adapters": [{"id": "x0"}], "merge": "ties"},
    {"id": "g", "prompt": [5, 6, 7], "completion": [8, 9]},
    {"id": "h", "prompt": [5, 6, 7], "completion": " text"},
]


def test_each_bad_row_gets_its_own_error_and_good_rows_become_jobs(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n[1, 2]\n{broken\n")
    rows = list(read_rows(path, "loglik", token_logprobs=True))
    assert [r.index for r in rows] == list(range(12)) and [r.id for r in rows[:2]] == ["a", 1]
    errors = {r.index: r.error for r in rows if r.error}
    assert errors.keys() == {2, 4, 5, 6, 7, 9, 10, 11}
    assert errors[2] == "missing field 'prompt'" and "temperature" in errors[4] and "unknown fields ['extra']" in errors[5]
    assert "id must be" in errors[6] and "merge_params" in errors[7]
    assert rows[8].job == {"input_ids": [5, 6, 7], "completion_ids": [8, 9], "mode": "score", "params": {"logprobs": 0}}
    assert "takes a completion of token ids" in errors[9]
    assert "must be a JSON object, got list" in errors[10] and errors[11].startswith("line 13: not valid JSON")
    assert rows[0].job == {"prompt": "hello", "completion": " world", "adapter": "x1", "mode": "score",
                           "params": {"logprobs": 0}}
    assert rows[3].route == "x0+x1" and rows[1].route == "x0"
    gen = list(read_rows(path, "generate"))
    assert "'completion' is scored in mode loglik" in gen[0].error and gen[1].job["mode"] == "generate"
    with pytest.raises(BatchInputError, match="does not exist"):
        list(read_rows(tmp_path / "nope.jsonl", "loglik"))
    with pytest.raises(BatchInputError, match="mode must be"):
        list(read_rows(path, "perplexity"))


def test_parquet_input_reads_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [{"id": "p0", "prompt": "a", "completion": " b", "adapter": "x1"}, {"id": "p1", "prompt": "c"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    got = list(read_rows(tmp_path / "rows.parquet", "loglik"))
    assert [(r.id, r.error, r.job.get("adapter")) for r in got] == [("p0", None, "x1"), ("p1", None, None)]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(BatchInputError, match="cannot read"):
        list(read_rows(tmp_path / "bad.parquet", "loglik"))


def test_chunks_are_sorted_by_adapter_and_parts_merge_back_in_input_order(tmp_path):
    runs = BatchRuns(init_db(f"sqlite:///{tmp_path / 'runs.db'}"), tmp_path / "home")
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "prompt": "p", "adapter": f"x{i % 3}"}) for i in range(10)))
    rows = list(read_rows(path, "loglik"))
    run = runs.create(rows, mode="loglik", tenant="t", input_uri=str(path), chunk_size=3,
                      output_uri=str(tmp_path / "out.jsonl"))
    chunks = [runs.chunk_rows(run.id, c) for c in range(run.num_chunks)]
    # one adapter per chunk: x0 has 4 rows (3 + 1), x1 and x2 3 each
    assert [[r.index for r in c] for c in chunks] == [[0, 3, 6], [9], [1, 4, 7], [2, 5, 8]]
    ok = JobResult(id="j", status="done", score={"logprob_sum": -1.5, "logprob_mean": -0.5, "tokens": 3,
                                                 "greedy": False})
    bad = JobResult(id="j", status="failed", error="unknown adapter 'x2'")
    for c in reversed(range(run.num_chunks)):           # any order, and twice: counted once
        lines = [output_row(r, "loglik", bad if r.job["adapter"] == "x2" else ok) for r in chunks[c]]
        runs.write_part(run.id, c, lines)
        runs.write_part(run.id, c, lines)
        if c == 2:
            assert runs.pending_chunks(runs.get(run.id)) == [0, 1]
            with pytest.raises(RuntimeError, match="misses 2 chunks"):
                runs.finish(run.id)
    done = runs.finish(run.id)
    assert done.status == "completed" and (done.done_rows, done.failed_rows) == (10, 3)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == list(range(10)) and out[0]["logprob_sum"] == -1.5
    assert out[2] == {"id": 2, "index": 2, "adapter": "x2", "error": "unknown adapter 'x2'"}
    assert not runs.cancel(run.id)                       # finished runs stay finished
    assert [r.id for r in runs.list("t")] == [run.id] and runs.list("other") == []


def test_progress_bar_line():
    import io
    bar = ProgressBar(2000, stream=io.StringIO())
    bar.t0 -= 10
    line = bar.line(1000, 3)
    assert "1,000/2,000 rows" in line and "50%" in line and "100.0 rows/s" in line and "ETA 0:10" in line
    assert "3 failed" in line and line.startswith("[" + "#" * 15 + "." * 15 + "]")
