"""2,000 mixed-adapter rows scored through a real Redis, a real fleet worker and real Celery batch
workers, with the scoring Celery worker SIGKILLed halfway and the run resumed; values equal the
engine's own scoring and transformers + PEFT; online jobs keep their time to first token."""
from __future__ import annotations

import json
import math
import random
import statistics
import threading
import time

import pytest
import redis

from db.session import make_engine
from producer import keys
from producer.batches import BatchRuns
from tests.batch.conftest import openlora
from tests.fleet.conftest import wait_until
from tests.hf_reference import HFReference

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing in old green trees".split()
ENSEMBLE = [{"id": "ad0", "weight": 0.6}, {"id": "ad1", "weight": 0.4}]
N_ROWS = 2000


def make_rows(n: int, seed: int = 0) -> tuple[list[dict], dict[int, str]]:
    """n rows over 4 adapters, the base model and an ensemble; some rows bad on purpose -> {index: error}."""
    rng = random.Random(seed)
    rows, bad = [], {}
    for i in range(n):
        row = {"id": f"r{i}", "prompt": " ".join(rng.choices(WORDS, k=rng.randrange(2, 10))),
               "completion": " " + " ".join(rng.choices(WORDS, k=rng.randrange(1, 6)))}
        kind = rng.randrange(6)
        if kind < 4:
            row["adapter"] = f"ad{kind}"
        elif kind == 5:
            row["adapters"] = ENSEMBLE
        if i % 197 == 3:
            del row["prompt"]
            bad[i] = "missing field 'prompt'"
        elif i % 197 == 50:
            row["adapter"] = "no-such-adapter"
            row.pop("adapters", None)
            bad[i] = "unknown adapter 'no-such-adapter'"
        elif i % 197 == 100:
            row["completion"] = " fox" * 2000
            bad[i] = "prompt is"
        elif i % 197 == 150:
            row["params"] = {"logprobs": 99}
            bad[i] = "params.logprobs"
        rows.append(row)
    return rows, bad


def write_jsonl(path, rows: list[dict], broken_lines: int = 0) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for _ in range(broken_lines):
            f.write('{"prompt": "unterminated\n')


def read_output(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def fleet(start_worker):
    # 16 in flight, of which at most 8 batch jobs; short batch prefill steps (on 2 shared CPU cores the
    # engine thread, the runtime's event loop and the Celery workers compete: keep batch steps small)
    return start_worker("scorer", max_num_seqs=16,
                        extra=["--batch-share", "0.5", "--engine-options", '{"low_priority_tokens": 64}']).wait_ready()


def ttft_ms(client, n: int, prompt: str = "the quick brown fox") -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        h = client.submit(prompt=prompt, adapter="ad1", params={"max_tokens": 4, "temperature": 0})
        next(iter(h.stream(timeout=30)))
        out.append((time.perf_counter() - t0) * 1000)
        h.wait(30)
    return out


def test_scoring_run_survives_a_killed_batch_worker_and_matches_the_engine(
        fleet, client, rds, batch_env, start_batch_worker, reference, tiny, tmp_path):
    rows, bad = make_rows(N_ROWS)
    inp, out = tmp_path / "rows.jsonl", tmp_path / "scores.jsonl"
    write_jsonl(inp, rows, broken_lines=2)
    n_total = N_ROWS + 2
    bad.update({N_ROWS: "not valid JSON", N_ROWS + 1: "not valid JSON"})
    ttft_ms(client, 5)                                  # warm up the online path
    idle = ttft_ms(client, 30)

    first = start_batch_worker("batch1")
    started = openlora(batch_env, "score", str(inp), "-o", str(out), "--chunk-size", "50", "--no-wait")
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.split()[1].rstrip(":")
    runs = BatchRuns(make_engine(batch_env["DATABASE_URL"]), batch_env["OPENLORA_HOME"])
    assert runs.get(run_id).num_chunks >= N_ROWS // 50

    # online jobs while the run scores
    during: list[float] = []
    probe = threading.Thread(target=lambda: (time.sleep(0.5), during.extend(ttft_ms(client, 30))))
    probe.start()
    assert wait_until(lambda: runs.get(run_id).done_rows >= n_total // 2, timeout=240, every=0.05), \
        first.output()[-3000:]
    first.kill()                                        # SIGKILL halfway: its chunk tasks die mid-wait
    probe.join(60)
    killed_at = runs.get(run_id).done_rows
    assert killed_at < n_total, "the run finished before the kill: make it longer"

    start_batch_worker("batch2")
    resumed = openlora(batch_env, "score", str(inp), "-o", str(out), "--chunk-size", "50")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming run {run_id}" in resumed.stdout
    assert "rows/s" in resumed.stderr and "ETA" in resumed.stderr      # the progress bar
    assert "completed" in resumed.stdout

    # complete, in input order, each row once, carrying the input's id
    lines = read_output(out)
    assert [ln["index"] for ln in lines] == list(range(n_total))
    assert [ln["id"] for ln in lines[:N_ROWS]] == [r["id"] for r in rows]
    run = runs.get(run_id)
    assert run.status == "completed" and run.done_rows == n_total and run.failed_rows == len(bad)
    for i, message in bad.items():
        assert message in lines[i].get("error", ""), (i, lines[i])
    # the fleet ran each job once: re-submitted rows found their jobs queued or done
    jobs = n_total - sum(1 for m in bad.values() if m in ("missing field 'prompt'", "not valid JSON")
                         or m.startswith("params."))
    assert wait_until(lambda: int(client.workers()[0]["completed"]) >= jobs, timeout=10)
    assert int(client.workers()[0]["completed"]) == jobs + 65      # + the online probes

    # values equal the engine's own scoring
    engine = reference.engine
    ens = engine.ensemble([(a["id"], a["weight"]) for a in ENSEMBLE], "linear")
    good = [i for i in range(N_ROWS) if i not in bad]
    for adapter in ["ad0", "ad1", "ad2", "ad3", None, ens]:
        idx = [i for i in good if (rows[i].get("adapter") or (ens if "adapters" in rows[i] else None)) == adapter]
        want = engine.score([rows[i]["prompt"] for i in idx], [rows[i]["completion"] for i in idx], adapter)
        for i, w in zip(idx, want):
            got = lines[i]
            assert got["tokens"] == w.tokens and got["greedy"] == w.greedy, (i, got)
            assert abs(got["logprob_sum"] - w.logprob_sum) < 1e-4 and abs(got["logprob_mean"] - w.logprob_mean) < 1e-4
    # ... and transformers + PEFT on a sample
    model_dir, adapters = tiny
    ref = HFReference(model_dir, adapters)
    tok = engine.tokenizer
    sample = [i for i in good if "adapters" not in rows[i]][:: len(good) // 24][:24]
    for i in sample:
        p = tok.encode(rows[i]["prompt"])
        c = tok.encode(rows[i]["completion"], add_special_tokens=False)
        lp = ref.logprobs(p + c, rows[i].get("adapter"))
        want = math.fsum(float(lp[len(p) + j - 1, c[j]]) for j in range(len(c)))
        assert abs(lines[i]["logprob_sum"] - want) < 1e-4, (i, lines[i], want)

    # online time to first token while scoring stays within 2x of idle
    assert len(during) == 30
    p50_idle, p50_busy = statistics.median(idle), statistics.median(during)
    print(f"TTFT p50 idle {p50_idle:.1f} ms, during scoring {p50_busy:.1f} ms")
    assert p50_busy <= 2 * p50_idle, (idle, during)


def test_a_fleet_worker_killed_mid_run_loses_no_row(fleet, start_worker, client, rds, batch_env, start_batch_worker,
                                                   reference, tmp_path):
    """SIGKILL one of two fleet workers while a run scores: the other reclaims its jobs, and the output
    is complete, in order, each row once, with the engine's values."""
    rows, bad = make_rows(600, seed=3)
    inp, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, rows)
    doomed = start_worker("scorer-b", max_num_seqs=16, extra=["--batch-share", "1.0"]).wait_ready()
    start_batch_worker("batch5", concurrency=4)
    started = openlora(batch_env, "score", str(inp), "-o", str(out), "--chunk-size", "25", "--no-wait")
    run_id = started.stdout.split()[1].rstrip(":")
    runs = BatchRuns(make_engine(batch_env["DATABASE_URL"]), batch_env["OPENLORA_HOME"])
    lanes = [keys.jobs(keys.lane(sh, -1)) for sh in keys.ShardRouter().all_shards()]

    def held() -> int:                                  # entries scorer-b took and has not acknowledged
        return sum(c["pending"] for lane in lanes if rds.exists(lane)
                   for c in rds.xpending(lane, "default")["consumers"] if c["name"] == b"scorer-b")
    assert wait_until(lambda: runs.get(run_id).done_rows > 0 and held() > 0, timeout=120, every=0.01)
    doomed.kill()                                       # mid-run, holding jobs
    assert wait_until(lambda: runs.get(run_id).status == "completed", timeout=180), runs.get(run_id)
    lines = read_output(out)
    assert [ln["index"] for ln in lines] == list(range(600)) and [ln["id"] for ln in lines] == [r["id"] for r in rows]
    reruns = [client.result(f"batch:{run_id}:{i}") for i in range(600) if i not in bad]
    assert any(r.attempts == 2 for r in reruns if r is not None)      # the kill did catch jobs in flight
    engine = reference.engine
    for i in [i for i in range(600) if i not in bad and "adapters" not in rows[i]][::10]:
        (want,) = engine.score([rows[i]["prompt"]], [rows[i]["completion"]], rows[i].get("adapter"))
        assert abs(lines[i]["logprob_sum"] - want.logprob_sum) < 1e-4, (i, lines[i])


def test_cancel_stops_a_run_and_a_rerun_reports_nothing_to_resume(fleet, batch_env, start_batch_worker, tmp_path):
    rows, _ = make_rows(600, seed=1)
    inp, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, rows)
    start_batch_worker("batch3", concurrency=2)
    started = openlora(batch_env, "score", str(inp), "-o", str(out), "--chunk-size", "20", "--no-wait")
    run_id = started.stdout.split()[1].rstrip(":")
    runs = BatchRuns(make_engine(batch_env["DATABASE_URL"]), batch_env["OPENLORA_HOME"])
    assert wait_until(lambda: runs.get(run_id).done_rows > 0, timeout=60)
    cancelled = openlora(batch_env, "score", "--cancel", run_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    time.sleep(3)                                       # chunk tasks notice within ~2 s
    done = runs.get(run_id).done_rows
    time.sleep(2)
    assert runs.get(run_id).status == "cancelled" and runs.get(run_id).done_rows == done < 600
    assert not out.exists()
    again = openlora(batch_env, "score", "--resume", run_id)
    assert again.returncode == 2 and "cancelled" in again.stderr
    status = openlora(batch_env, "score", "--list")
    assert run_id in status.stdout and "cancelled" in status.stdout
    r = redis.Redis.from_url(batch_env["REDIS_URL"])
    assert wait_until(lambda: all(r.xlen(keys.jobs(keys.lane(s, -1))) == 0 for s in keys.ShardRouter().all_shards()),
                      timeout=20)                       # the cancelled jobs left the queues


@pytest.fixture(scope="module")
def batch_api(batch_env, redis_url, tiny, fleet):
    """The HTTP API with a run database, in this process (run files where the batch workers see them)."""
    import os
    from producer.api import ApiSettings, create_app
    from tests.api.conftest import Served
    old_home = os.environ.get("OPENLORA_HOME")
    os.environ["OPENLORA_HOME"] = batch_env["OPENLORA_HOME"]
    model_dir, adapters = tiny
    settings = ApiSettings(redis_url=redis_url, api_keys={"key-alice": "alice", "key-bob": "bob"},
                           model_dir=str(model_dir), adapter_dirs=str(next(iter(adapters.values())).parent),
                           database_url=batch_env["DATABASE_URL"], block_ms=100)
    served = Served(create_app(settings))
    yield served
    served.stop()
    if old_home is None:
        os.environ.pop("OPENLORA_HOME", None)
    else:
        os.environ["OPENLORA_HOME"] = old_home


def test_batches_over_http_are_per_tenant_and_match_the_engine(batch_api, start_batch_worker, reference):
    import httpx
    start_batch_worker("batch4", concurrency=2)
    alice, bob = ({"Authorization": f"Bearer key-{who}"} for who in ("alice", "bob"))
    rows, bad = make_rows(150, seed=2)
    rows[7] = {"id": "hidden", "prompt": "x", "completion": " y", "adapter": "someone-elses"}
    with httpx.Client(base_url=batch_api.url, timeout=30) as http:
        r = http.post("/v1/batches", json={"input": rows, "mode": "loglik", "chunk_size": 16}, headers=alice)
        assert r.status_code == 201, r.text
        run = r.json()
        assert run["status"] in ("pending", "running") and run["total_rows"] == 150 and run["chunks"] >= 150 // 16
        assert wait_until(lambda: http.get(f"/v1/batches/{run['id']}", headers=alice).json()["status"] == "completed",
                          timeout=120)
        done = http.get(f"/v1/batches/{run['id']}", headers=alice).json()
        assert done["done_rows"] == 150 and done["failed_rows"] == len(bad) + 1
        out = http.get(done["output_url"], headers=alice)
        assert out.status_code == 200 and out.headers["content-type"].startswith("application/jsonl")
        lines = [json.loads(x) for x in out.text.splitlines()]
        assert [x["index"] for x in lines] == list(range(150)) and lines[7]["id"] == "hidden"
        assert "does not exist" in lines[7]["error"]
        engine = reference.engine
        ens = engine.ensemble([(a["id"], a["weight"]) for a in ENSEMBLE], "linear")
        for i in [i for i in range(150) if i not in bad and i != 7][:40]:
            adapter = rows[i].get("adapter") or (ens if "adapters" in rows[i] else None)
            (want,) = engine.score([rows[i]["prompt"]], [rows[i]["completion"]], adapter)
            assert abs(lines[i]["logprob_sum"] - want.logprob_sum) < 1e-4
        # another tenant's run does not exist for bob, on every route
        for method, path in [("GET", f"/v1/batches/{run['id']}"), ("GET", f"/v1/batches/{run['id']}/output"),
                             ("POST", f"/v1/batches/{run['id']}/cancel")]:
            assert http.request(method, path, headers=bob).status_code == 404
        assert run["id"] not in http.get("/v1/batches", headers=bob).text
        assert run["id"] in http.get("/v1/batches", headers=alice).text
        assert http.get("/v1/batches", headers={"Authorization": "Bearer nope"}).status_code == 401
        # JSONL bodies, generate mode; a cancelled run has no output
        body = "\n".join(json.dumps({"prompt": "the quick", "adapter": "ad2", "params": {"max_tokens": 4,
                                                                                         "temperature": 0}})
                         for _ in range(3)) + "\nnot json\n"
        r = http.post("/v1/batches?mode=generate&chunk_size=2", content=body,
                      headers={**alice, "Content-Type": "application/jsonl"})
        assert r.status_code == 201, r.text
        gen = r.json()["id"]
        assert wait_until(lambda: http.get(f"/v1/batches/{gen}", headers=alice).json()["status"] == "completed",
                          timeout=60)
        lines = [json.loads(x) for x in http.get(f"/v1/batches/{gen}/output", headers=alice).text.splitlines()]
        want = reference("the quick", "ad2", max_tokens=4, temperature=0.0).text
        assert [x.get("text") for x in lines[:3]] == [want] * 3 and "not valid JSON" in lines[3]["error"]
        # bad requests are refused whole, with nothing created
        for bad_body in [{"input": []}, {"input": rows[:2], "mode": "nope"}, {"input": rows[:2], "chunk_size": 0},
                         {"rows": rows[:2]}, [1, 2]]:
            assert http.post("/v1/batches", json=bad_body, headers=alice).status_code == 400, bad_body
        r = http.post("/v1/batches", json={"input": rows[:40], "chunk_size": 1}, headers=bob)
        assert r.status_code == 201
        c = http.post(f"/v1/batches/{r.json()['id']}/cancel", headers=bob).json()
        assert c["status"] in ("cancelled", "completed")
        if c["status"] == "cancelled":
            assert http.get(f"/v1/batches/{r.json()['id']}/output", headers=bob).status_code == 409
