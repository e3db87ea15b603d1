"""Bad requests get a clear OpenAI-style 4xx, nothing reaches Redis, and the fleet serves the next one."""
from __future__ import annotations

import httpx
import pytest

from producer import keys
from tests.api.conftest import Served

ALICE = {"Authorization": "Bearer key-alice"}
OK = {"model": "ad0", "prompt": "hello", "max_tokens": 3, "temperature": 0}


def _queued(rds) -> tuple[int, int]:
    """(entries in every shard stream, submitted job ids): both must not move on a refusal."""
    streams = sum(rds.xlen(k) for k in rds.scan_iter(match=f"{keys.PREFIX}:{{*}}:jobs"))
    return streams, sum(1 for _ in rds.scan_iter(match=f"{keys.PREFIX}:{{job:*}}:submitted"))


CASES = [
    ("malformed json", "/v1/completions", ALICE, b'{"model": "ad0", "prompt": ', 400, None),
    ("not an object", "/v1/completions", ALICE, b"[1, 2]", 400, None),
    ("missing prompt", "/v1/completions", ALICE, {"model": "ad0"}, 400, "prompt"),
    ("negative max_tokens", "/v1/completions", ALICE, {**OK, "max_tokens": -1}, 400, "max_tokens"),
    ("temperature too high", "/v1/completions", ALICE, {**OK, "temperature": 7}, 400, "temperature"),
    ("top_p zero", "/v1/completions", ALICE, {**OK, "top_p": 0}, 400, "top_p"),
    ("n=2", "/v1/completions", ALICE, {**OK, "n": 2}, 400, "n"),
    ("logprobs 99", "/v1/completions", ALICE, {**OK, "logprobs": 99}, 400, "logprobs"),
    ("unknown field", "/v1/completions", ALICE, {**OK, "temprature": 0}, 400, "temprature"),
    ("unknown adapter", "/v1/completions", ALICE, {**OK, "model": "no-such-adapter"}, 404, "model"),
    ("unknown adapter chat", "/v1/chat/completions", ALICE,
     {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("bad role", "/v1/chat/completions", ALICE,
     {"model": "ad0", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("over-long prompt", "/v1/completions", ALICE, {**OK, "prompt": "the quick brown fox " * 600}, 400, "prompt"),
    ("over-long chat", "/v1/chat/completions", ALICE,
     {"model": "ad0", "messages": [{"role": "user", "content": "seven wizards " * 900}]}, 400, "prompt"),
    ("no api key", "/v1/completions", {}, OK, 401, None),
    ("wrong api key", "/v1/completions", {"Authorization": "Bearer key-mallory"}, OK, 401, None),
    ("native bad params", "/v1/jobs", ALICE, {"prompt": "x", "params": {"top_p": 2.0}}, 400, "params.top_p"),
    ("native unknown adapter", "/v1/jobs", ALICE, {"prompt": "x", "adapter": "ghost"}, 404, "adapter"),
    ("native bad id", "/v1/jobs", ALICE, {"id": "a{b}", "prompt": "x"}, 400, "id"),
    ("native priority above online", "/v1/jobs", ALICE, {"prompt": "x", "priority": 5}, 400, "priority"),
]


@pytest.mark.parametrize("name,path,headers,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_refused_with_a_clear_4xx_and_nothing_enqueued(api, fleet_worker, rds, name, path, headers, body, status,
                                                       param):
    before = _queued(rds)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        if isinstance(body, bytes):
            r = http.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
        else:
            r = http.post(path, json=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    assert _queued(rds) == before, f"{name}: something was enqueued"


def test_another_tenants_job_is_not_found(api, fleet_worker, rds):
    with httpx.Client(base_url=api.url, timeout=30) as http:
        r = http.post("/v1/jobs", headers=ALICE, json={"id": "alice-secret", "adapter": "ad0", "prompt": "x",
                                                       "params": {"max_tokens": 2}})
        assert r.status_code == 201
        bob = {"Authorization": "Bearer key-bob"}
        for method in ("GET", "DELETE"):
            r = http.request(method, "/v1/jobs/alice-secret", headers=bob)
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
        assert http.get("/v1/jobs/never-submitted", headers=ALICE).status_code == 404
        before = _queued(rds)[1]      # (alice's job may leave the stream meanwhile: compare submitted ids)
        r = http.post("/v1/jobs", headers=bob, json={"id": "alice-secret", "prompt": "take over"})
        assert r.status_code == 409 and _queued(rds)[1] == before
        assert http.get("/v1/jobs/alice-secret", headers=ALICE).status_code == 200


def test_fleet_still_serves_after_the_refusals(api, fleet_worker):
    with httpx.Client(base_url=api.url, timeout=60) as http:
        r = http.post("/v1/completions", headers=ALICE, json=OK)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_worker_error_comes_back_as_4xx_when_the_api_cannot_know(redis_url, fleet_worker, tiny):
    """Without adapter config the API lets the workers decide; their refusal is a 404, streamed or not."""
    from producer.api import ApiSettings, create_app
    s = Served(create_app(ApiSettings(redis_url=redis_url, block_ms=100, request_timeout_s=30)))
    try:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            for stream in (False, True):
                r = http.post("/v1/completions", json={**OK, "model": "not-on-any-worker", "stream": stream})
                assert r.status_code == 404 and "unknown adapter" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_queue_full_is_429(redis_url):
    """A Redis database no worker reads: the first job stays queued, the second is refused."""
    from producer.api import ApiSettings, create_app
    url = redis_url.rsplit("/", 1)[0] + "/3"
    s = Served(create_app(ApiSettings(redis_url=url, queue_limit=1)))
    try:
        with httpx.Client(base_url=s.url, timeout=10) as http:
            job = {"adapter": "ad0", "prompt": "x"}
            assert http.post("/v1/jobs", json=job).status_code == 201
            r = http.post("/v1/jobs", json=job)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        s.stop()
