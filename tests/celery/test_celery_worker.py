"""A real ``celery -A worker.celery_app worker`` (solo pool) runs the queue runtime and answers
control: stats; load_adapter -> its heartbeat lists the adapter and a job for it completes;
pin and unload; shutdown stops the runtime."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from producer import keys
from tests.fleet.conftest import REPO, wait_until

NODE = "olora-cel@test"


@pytest.fixture(scope="module")
def celery_worker(redis_url, tiny, tmp_path_factory):
    if shutil.which("celery") is None:
        pytest.skip("the celery command is not installed")
    model_dir, _ = tiny
    log_path = tmp_path_factory.mktemp("celery") / "celery.log"
    env = {**os.environ, "REDIS_URL": redis_url, "OPENLORA_MODEL_DIR": str(model_dir), "OPENLORA_WORKER_ID": "cel",
           "OPENLORA_HEARTBEAT_TTL": "2", "OPENLORA_TORCH_THREADS": "1", "OPENLORA_GRACE": "5",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("OPENLORA_ADAPTER_DIRS", None)        # adapters arrive by control only
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
                             "-n", NODE, "--without-gossip", "--without-mingle", "--without-heartbeat",
                             "-l", "info"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    import redis
    r = redis.Redis.from_url(redis_url)
    ok = wait_until(lambda: r.exists(keys.worker("default", "cel")) or proc.poll() is not None, timeout=90)
    if not ok or proc.poll() is not None:
        proc.kill()
        pytest.fail(f"celery worker did not start:\n{log_path.read_text()}")
    yield proc, log_path
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()
    r.close()


@pytest.fixture(scope="module")
def ctl(redis_url, celery_worker):
    from worker.celery_app import control, make_app
    app = make_app(redis_url)
    # the runtime's heartbeat can come before Celery's consumer listens for control: a broadcast sent
    # earlier reaches no one, so wait until the node answers a ping
    assert wait_until(lambda: app.control.ping(destination=[NODE], timeout=0.5), timeout=60, every=0.2), \
        celery_worker[1].read_text()[-3000:]

    def call(command, **kw):
        replies = control(command, celery_app=app, destination=[NODE], timeout=30, **kw)
        assert len(replies) == 1, replies
        return replies[0][NODE]
    return call


def test_stats_answer_from_the_runtime(celery_worker, ctl):
    s = ctl("stats")
    assert s["ok"] and s["worker"] == "cel" and s["host_adapters"] == [] and s["device"] == "cpu"


def test_load_adapter_shows_in_heartbeat_and_serves_jobs(celery_worker, ctl, tiny, rds, client, reference):
    _, adapters = tiny
    before = client.submit(adapter="ad2", prompt="hello", params={"max_tokens": 4, "temperature": 0})
    res = before.wait(30)
    assert res.status == "failed" and "unknown adapter" in res.error
    r = ctl("load_adapter", name="ad2", path=str(adapters["ad2"]))
    assert r["ok"] and r["adapter"] == "ad2", r

    def in_heartbeat():
        hb = rds.hgetall(keys.worker("default", "cel"))
        return "ad2" in json.loads(hb.get(b"host_adapters", b"[]"))
    assert wait_until(in_heartbeat, timeout=10)
    h = client.submit(adapter="ad2", prompt="SELECT name", params={"max_tokens": 8, "temperature": 0})
    res = h.wait(30)
    assert res.status == "done" and res.worker == "cel"
    assert res.token_ids == reference("SELECT name", "ad2", max_tokens=8, temperature=0.0).token_ids
    assert ctl("pin_adapter", name="ad2", pinned=True)["ok"]
    assert ctl("stats")["pinned"] == ["ad2"]
    assert ctl("pin_adapter", name="ad2", pinned=False)["ok"]
    bad = ctl("load_adapter", name="bad", path="/nonexistent")
    assert not bad["ok"] and bad["error"]
    assert ctl("unload_adapter", name="ad2")["ok"]
    assert wait_until(lambda: not in_heartbeat(), timeout=10)
    assert not ctl("unload_adapter", name="ad2")["ok"]


def test_shutdown_stops_the_runtime(celery_worker, rds):
    proc, log_path = celery_worker
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(40) == 0
    assert not rds.exists(keys.worker("default", "cel"))
    out = log_path.read_text()
    assert "OpenLoRA runtime stopped" in out and "Traceback" not in out
