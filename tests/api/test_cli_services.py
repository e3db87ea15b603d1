"""The CLI wiring: ``openlora worker``, ``openlora api``, ``openlora relay`` as processes, and
``openlora submit --stream`` printing the tokens of a job they serve."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.fleet.conftest import REPO, _free_port


def _spawn(args, env, log):
    return subprocess.Popen([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def services(redis_url, tiny, tmp_path_factory):
    model_dir, adapters = tiny
    root = str(next(iter(adapters.values())).parent)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "REDIS_URL": redis_url,
           "OPENLORA_MODEL_DIR": str(model_dir), "OPENLORA_ADAPTER_DIRS": root}
    env.pop("OPENLORA_API_KEYS", None)
    logs = tmp_path_factory.mktemp("cli-logs")
    api_port, relay_port = _free_port(), _free_port()
    procs = [_spawn(["worker", "--worker-id", "cli-w", "--torch-threads", "1", "--heartbeat-ttl", "2"], env,
                    open(logs / "worker.log", "w")),
             _spawn(["api", "--port", str(api_port)], env, open(logs / "api.log", "w")),
             _spawn(["relay", "--port", str(relay_port)], env, open(logs / "relay.log", "w"))]
    api, relay = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{relay_port}"
    end = time.monotonic() + 60
    while True:
        try:
            if httpx.get(api + "/healthz").json()["workers"] == 1 and httpx.get(relay + "/healthz").is_success:
                break
        except (httpx.HTTPError, KeyError):
            pass
        if time.monotonic() > end or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("services did not start: " + " | ".join(f.read_text()[-2000:] for f in logs.iterdir()))
        time.sleep(0.1)
    yield env, api, relay
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def test_submit_streams_tokens_from_the_worker(services, reference):
    env, api, _ = services
    r = subprocess.run([sys.executable, "-m", "worker.cli", "submit", "--adapter", "ad1", "--stream",
                        "--max-tokens", "10", "the quick brown fox"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ref = reference("the quick brown fox", "ad1", max_tokens=10, temperature=0.0)
    assert r.stdout == ref.text + "\n"
    assert "[done: " in r.stderr and "10 tokens, worker cli-w" in r.stderr
    models = httpx.get(api + "/v1/models").json()["data"]
    assert {"ad0", "ad1"} <= {m["id"] for m in models}


def test_submit_reports_a_refused_job(services):
    env, _, _ = services
    r = subprocess.run([sys.executable, "-m", "worker.cli", "submit", "--max-tokens", "0", "x"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "params.max_tokens" in r.stderr
