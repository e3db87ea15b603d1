"""Security under hostile tenants, against the real API and relay (uvicorn), a real redis-server,
a real database (SQLite; PostgreSQL in one test), a real worker and a real websocket client.

- Isolation: bob attacks alice's jobs and private adapters on every route (completions, chat,
  models, jobs submit/get/cancel, adapters list/show/register/delete, the websocket relay), with
  and without streaming; every answer is "not found" (or 401/403/409) and nothing reaches the queue.
- Adapter uploads cannot leave the store (ids with ``..``, absolute paths, client file names,
  a symlink planted in the store) and go through ``db.adapter_check`` (a pickle never runs).
- Per-tenant rate limit shared by two API instances through Redis (429 + Retry-After, the relay
  too) and per-tenant queue share (429 at the limit, freed when jobs finish or are cancelled).
- API keys: only digests kept; no plaintext in settings' repr, in the service, or in the logs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from producer import keys
from tests.api.conftest import Served
from tests.db.conftest import postgres_url  # noqa: F401  (fixture)
from tests.fleet.conftest import rds, redis_url, reference, start_worker, wait_until  # noqa: F401

KEYS = {"key-alice": "alice", "key-bob": "bob"}
ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
PROMPT = "the quick brown fox"


def make_settings(redis_url, tiny, tmp: Path, **kw):
    from producer.api import ApiSettings
    model_dir, adapters = tiny
    base = dict(redis_url=redis_url, api_keys=dict(KEYS), model_dir=str(model_dir), model_name="tiny-base",
                adapter_dirs=str(next(iter(adapters.values())).parent), block_ms=100, request_timeout_s=60,
                database_url=f"sqlite:///{tmp / 'openlora.db'}", store_root=str(tmp / "store"),
                max_adapter_bytes=256 * 1024)
    return ApiSettings(**{**base, **kw})


def upload(http, headers, adapter_id, src: Path | None = None, *, public=False, files=None, data=None):
    """POST /v1/adapters as multipart: ``src``'s two files unless ``files`` is given."""
    if files is None:
        files = {"adapter_config": ("adapter_config.json", (src / "adapter_config.json").read_bytes()),
                 "adapter_model": ("adapter_model.safetensors", (src / "adapter_model.safetensors").read_bytes())}
    form = {"id": adapter_id, "public": "true" if public else "false", **(data or {})}
    return http.post("/v1/adapters", headers=headers, data=form, files=files)


def queued(rds) -> tuple[int, int]:
    """(entries in every job stream, submitted job ids): neither may move when a request is refused."""
    streams = sum(rds.xlen(k) for k in rds.scan_iter(match=f"{keys.PREFIX}:{{*}}:jobs"))
    return streams, sum(1 for _ in rds.scan_iter(match=f"{keys.PREFIX}:{{job:*}}:submitted"))


def tree(path: Path) -> list[str]:
    """Every path below ``path`` (the SQLite files aside: their WAL comes and goes)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if ".db" not in p.name) if path.exists() else []


# -- the world: alice and bob, each with adapters, a worker that serves them ----------------------
@pytest.fixture(scope="module")
def world(redis_url, tiny, tmp_path_factory, start_worker):
    from producer.api import create_app
    from producer.relay import create_relay_app
    tmp = tmp_path_factory.mktemp("security")
    victim = tmp / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("must survive")
    settings = make_settings(redis_url, tiny, tmp)
    api, relay = Served(create_app(settings)), Served(create_relay_app(settings))
    _, adapters = tiny
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for who, aid, src, public in ((ALICE, "alice-private", "ad1", False), (ALICE, "alice-public", "ad2", True),
                                      (BOB, "bob-private", "ad3", False)):
            r = upload(http, who, aid, adapters[src], public=public)
            assert r.status_code == 201, r.text
    store = Path(settings.store_root)
    # the worker finds the uploaded adapters through the registry, in the store the API wrote
    worker = start_worker("sec-w", max_num_seqs=8, extra=["--database-url", settings.database_url,
                                                          "--adapter-store", str(store)]).wait_ready()
    yield {"api": api, "relay": relay, "settings": settings, "tmp": tmp, "victim": victim, "store": store,
           "worker": worker, "adapters": adapters}
    api.stop()
    relay.stop()


@pytest.fixture(scope="module")
def http(world):
    with httpx.Client(base_url=world["api"].url, timeout=60) as c:
        yield c


def ws_url(world, job_id, **query):
    qs = urllib.parse.urlencode(query)
    return world["relay"].ws + f"/v1/jobs/{job_id}/stream" + (f"?{qs}" if qs else "")


def ws_refusal(url, headers=None) -> tuple[dict, int]:
    with connect(url, additional_headers=headers or {}) as ws:
        msg = json.loads(ws.recv(timeout=10))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    return msg, closed.value.rcvd.code


# -- adapters: a tenant's private adapter does not exist for another tenant --------------------------
CHAT = [{"role": "user", "content": "hello"}]
ADAPTER_ATTACKS = [   # (what, method, path, body) — bob names alice's private adapter
    ("completion", "POST", "/v1/completions", {"model": "alice-private", "prompt": PROMPT, "max_tokens": 4}),
    ("completion stream", "POST", "/v1/completions",
     {"model": "alice-private", "prompt": PROMPT, "max_tokens": 4, "stream": True}),
    ("chat", "POST", "/v1/chat/completions", {"model": "alice-private", "messages": CHAT, "max_tokens": 4}),
    ("chat stream", "POST", "/v1/chat/completions",
     {"model": "alice-private", "messages": CHAT, "max_tokens": 4, "stream": True}),
    ("job", "POST", "/v1/jobs", {"adapter": "alice-private", "prompt": PROMPT}),
    ("score job", "POST", "/v1/jobs", {"adapter": "alice-private", "prompt": PROMPT, "mode": "score"}),
    ("ensemble job", "POST", "/v1/jobs",
     {"adapters": [{"id": "ad0", "weight": 0.5}, {"id": "alice-private", "weight": 0.5}], "prompt": PROMPT}),
    ("show adapter", "GET", "/v1/adapters/alice-private", None),
    ("delete adapter", "DELETE", "/v1/adapters/alice-private", None),
]


@pytest.mark.parametrize("what,method,path,body", ADAPTER_ATTACKS, ids=[a[0] for a in ADAPTER_ATTACKS])
def test_another_tenants_private_adapter_is_not_found(world, http, rds, what, method, path, body):
    before = queued(rds)
    r = http.request(method, path, headers=BOB, json=body)
    assert r.status_code == 404, (what, r.status_code, r.text)
    assert r.json()["error"]["type"] == "not_found_error"
    assert queued(rds) == before, f"{what}: something was enqueued"
    # ... while it is there for alice
    assert http.get("/v1/adapters/alice-private", headers=ALICE).status_code == 200


def test_model_and_adapter_lists_show_own_public_and_system_adapters_only(world, http):
    def ids(path, who):
        r = http.get(path, headers=who)
        assert r.status_code == 200
        return {m["id"] for m in r.json()["data"]}
    assert ids("/v1/models", BOB) >= {"tiny-base", "ad0", "ad3", "alice-public", "bob-private"}
    assert "alice-private" not in ids("/v1/models", BOB)
    assert ids("/v1/models", ALICE) >= {"alice-private", "alice-public"}
    assert "bob-private" not in ids("/v1/models", ALICE)
    assert ids("/v1/adapters", BOB) == {"alice-public", "bob-private"}
    assert ids("/v1/adapters", ALICE) == {"alice-private", "alice-public"}
    listing = http.get("/v1/adapters", headers=BOB).text
    assert str(world["store"]) not in listing and "alice\"" not in listing     # no store paths, no owner names


def test_own_private_and_others_public_adapters_run(world, http, reference):
    """The positive side: alice runs her private adapter (a copy of ad1), bob runs alice's public one."""
    r = http.post("/v1/completions", headers=ALICE,
                  json={"model": "alice-private", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference(PROMPT, "ad1", max_tokens=8, temperature=0.0).text
    r = http.post("/v1/completions", headers=BOB,
                  json={"model": "alice-public", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference(PROMPT, "ad2", max_tokens=8, temperature=0.0).text


def test_private_adapter_held_by_a_worker_stays_hidden(world, http, rds):
    """Once a worker holds alice's adapter its heartbeat lists it; bob still must not see it."""
    assert http.post("/v1/completions", headers=ALICE,
                     json={"model": "alice-private", "prompt": "x", "max_tokens": 1}).status_code == 200
    hb = keys.worker("default", world["worker"].id)
    assert wait_until(lambda: b"alice-private" in (rds.hget(hb, "adapters") or b"") +
                      (rds.hget(hb, "host_adapters") or b""), timeout=15)
    models = {m["id"] for m in http.get("/v1/models", headers=BOB).json()["data"]}
    assert "alice-private" not in models
    assert http.post("/v1/completions", headers=BOB,
                     json={"model": "alice-private", "prompt": "x", "max_tokens": 1}).status_code == 404


def test_others_adapters_cannot_be_deleted_or_overwritten(world, http):
    before = http.get("/v1/adapters/alice-public", headers=ALICE).json()
    r = http.delete("/v1/adapters/alice-public", headers=BOB)              # visible to bob, not his
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_owner"
    src = world["adapters"]["ad0"]
    for aid in ("alice-private", "alice-public"):                          # take over by re-registering
        r = upload(http, BOB, aid, src, public=True)
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_id_taken", r.text
        assert "alice" not in r.json()["error"]["message"].replace(aid, "")
    for aid in ("ad0", "tiny-base"):                                        # shadow a system adapter / the base
        r = upload(http, BOB, aid, src, public=True)
        assert r.status_code == 409, r.text
    after = http.get("/v1/adapters/alice-public", headers=ALICE).json()
    assert after["version"] == before["version"] and after["sha256"] == before["sha256"]
    assert http.get("/v1/adapters/alice-private", headers=ALICE).json()["version"] == 1


def test_owner_reregisters_and_deletes(world, http):
    src = world["adapters"]["ad0"]
    assert upload(http, BOB, "bob-temp", src).status_code == 201
    r = upload(http, BOB, "bob-temp", src)
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["owned_by"] == "bob"
    assert http.delete("/v1/adapters/bob-temp", headers=BOB).json()["deleted"] is True
    assert not (world["store"] / "bob" / "bob-temp").exists()
    assert http.get("/v1/adapters/bob-temp", headers=BOB).status_code == 404
    assert http.post("/v1/jobs", headers=BOB, json={"adapter": "bob-temp", "prompt": "x"}).status_code == 404


# -- jobs: another tenant's job does not exist for you -------------------------------------------
@pytest.fixture(scope="module")
def alice_job(world, http):
    r = http.post("/v1/jobs", headers=ALICE, json={"id": "alice-secret-job", "adapter": "alice-private",
                                                   "prompt": "alice's confidential prompt",
                                                   "params": {"max_tokens": 6, "temperature": 0}})
    assert r.status_code == 201, r.text
    assert wait_until(lambda: http.get("/v1/jobs/alice-secret-job", headers=ALICE).json()["status"] == "done",
                      timeout=30)
    return "alice-secret-job"


JOB_ATTACKS = [("get", "GET", None), ("cancel", "DELETE", None),
               ("resubmit the id", "POST", {"id": "alice-secret-job", "prompt": "give me the result"})]


@pytest.mark.parametrize("what,method,body", JOB_ATTACKS, ids=[a[0] for a in JOB_ATTACKS])
def test_another_tenants_job_is_not_found(world, http, rds, alice_job, what, method, body):
    before = queued(rds)
    path = "/v1/jobs" if method == "POST" else f"/v1/jobs/{alice_job}"
    r = http.request(method, path, headers=BOB, json=body)
    assert r.status_code == (409 if method == "POST" else 404), r.text
    assert "confidential" not in r.text and "result" not in r.json()
    assert queued(rds) == before
    assert not rds.exists(keys.cancel_flag(alice_job))
    mine = http.get(f"/v1/jobs/{alice_job}", headers=ALICE).json()
    assert mine["status"] == "done" and mine["result"]["status"] == "done"


@pytest.mark.parametrize("how", ["header", "query"])
def test_relay_refuses_another_tenants_job(world, alice_job, how):
    url = ws_url(world, alice_job, **({"api_key": "key-bob"} if how == "query" else {}))
    msg, code = ws_refusal(url, BOB if how == "header" else None)
    assert code == 4404 and msg["type"] == "error" and "token_ids" not in msg
    with connect(ws_url(world, alice_job), additional_headers=ALICE) as ws:    # alice gets her result
        while (m := json.loads(ws.recv(timeout=10)))["type"] != "result":
            pass
    assert m["status"] == "done"


def test_tenant_field_in_the_body_is_ignored(world, http):
    r = http.post("/v1/jobs", headers=ALICE, json={"id": "spoofed-tenant", "tenant": "bob", "prompt": "x",
                                                   "params": {"max_tokens": 1}})
    assert r.status_code == 201
    assert http.get("/v1/jobs/spoofed-tenant", headers=BOB).status_code == 404
    assert http.get("/v1/jobs/spoofed-tenant", headers=ALICE).status_code == 200


UNAUTHENTICATED = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                   ("POST", "/v1/jobs"), ("GET", "/v1/jobs/alice-secret-job"), ("DELETE", "/v1/jobs/alice-secret-job"),
                   ("GET", "/v1/adapters"), ("POST", "/v1/adapters"), ("GET", "/v1/adapters/alice-public"),
                   ("DELETE", "/v1/adapters/alice-public")]


@pytest.mark.parametrize("method,path", UNAUTHENTICATED, ids=[f"{m} {p}" for m, p in UNAUTHENTICATED])
def test_every_route_needs_a_valid_key(world, http, alice_job, method, path):
    digest = "sha256:" + hashlib.sha256(b"key-alice").hexdigest()     # a leaked digest is not a key
    for headers in ({}, {"Authorization": "Bearer key-mallory"}, {"Authorization": f"Bearer {digest}"}):
        r = http.request(method, path, headers=headers, json={"model": "ad0", "prompt": "x"})
        assert r.status_code == 401, (headers, r.status_code, r.text)
        assert "key-mallory" not in r.text and digest not in r.text
    for query in ({"api_key": "key-mallory"}, {"api_key": digest}):
        assert ws_refusal(ws_url(world, alice_job, **query))[1] == 4401


def test_health_and_metrics_tell_nothing_about_tenants(world, http, alice_job):
    for path in ("/healthz", "/metrics"):
        r = http.get(path)
        assert r.status_code == 200
        for secret in ("alice", "bob", alice_job, "confidential"):
            assert secret not in r.text, (path, secret)


# -- adapter uploads cannot leave the store ------------------------------------------------------------
ESCAPING_IDS = ["../victim", "../../victim/x", "/etc/passwd", "..", ".", "a/../../victim", "a/b/c", ".hidden",
                "-flag", "UPPER", "a\\..\\victim", "a//b", "/a", "a/", "%2e%2e/victim", "x" * 200, "a\x00b",
                "victim~x", "ad0 ", "a/..", "\u2025/victim"]


@pytest.mark.parametrize("adapter_id", ESCAPING_IDS, ids=[repr(i)[:24] for i in ESCAPING_IDS])
def test_upload_with_an_escaping_id_is_refused(world, http, adapter_id):
    before = tree(world["tmp"])
    r = upload(http, ALICE, adapter_id, world["adapters"]["ad0"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "id", r.text
    assert tree(world["tmp"]) == before
    assert (world["victim"] / "precious.txt").read_text() == "must survive"


def test_client_file_names_are_never_used(world, http):
    src = world["adapters"]["ad0"]
    files = {"adapter_config": ("../../victim/evil.json", (src / "adapter_config.json").read_bytes()),
             "adapter_model": ("/tmp/../../victim/evil.safetensors", (src / "adapter_model.safetensors").read_bytes())}
    r = upload(http, ALICE, "alice-fnames", files=files)
    assert r.status_code == 201, r.text
    assert tree(world["victim"]) == ["precious.txt"]
    assert tree(world["store"] / "alice" / "alice-fnames") == ["v1", "v1/adapter_config.json",
                                                               "v1/adapter_model.safetensors"]
    assert http.delete("/v1/adapters/alice-fnames", headers=ALICE).status_code == 200


@pytest.mark.parametrize("encoded", ["..%2Fvictim", "%2e%2e%2f%2e%2e%2fvictim", "alice%2F..%2F..%2Fvictim",
                                     "%2Fetc%2Fpasswd", "..%5Cvictim"])
def test_show_and_delete_with_an_escaping_id_touch_nothing(world, http, encoded):
    before = tree(world["tmp"])
    for method in ("GET", "DELETE"):
        r = http.request(method, f"/v1/adapters/{encoded}", headers=ALICE)
        assert r.status_code == 404, (method, encoded, r.text)
    assert tree(world["tmp"]) == before


def test_a_symlink_planted_in_the_store_is_not_followed(world, http):
    planted = world["store"] / "alice" / "planted"
    planted.symlink_to(world["victim"], target_is_directory=True)
    try:
        r = upload(http, ALICE, "planted", world["adapters"]["ad0"])
        assert r.status_code == 500 and r.json()["error"]["code"] == "store_error", r.text
        assert str(world["victim"]) not in r.text
        assert tree(world["victim"]) == ["precious.txt"]
        assert http.get("/v1/adapters/planted", headers=ALICE).status_code == 404    # no row left behind
    finally:
        planted.unlink()


class _Boom:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_uploads_are_validated_and_never_executed(world, http):
    src, marker = world["adapters"]["ad0"], world["tmp"] / "pwned"
    payload = pickle.dumps({"weights": _Boom(marker)})
    config = (src / "adapter_config.json").read_bytes()
    cases = {   # name -> (files, status, code)
        "pickle as weights": ({"adapter_config": ("c", config), "adapter_model": ("m", payload)}, 400,
                              "invalid_adapter"),
        "pickle extra file": ({"adapter_config": ("c", config), "adapter_model": ("m", payload),
                               "adapter_model.bin": ("adapter_model.bin", payload)}, 400, None),
        "config not json": ({"adapter_config": ("c", b"{nope"), "adapter_model": ("m", b"x" * 16)}, 400,
                            "invalid_adapter"),
        "weights missing": ({"adapter_config": ("c", config)}, 400, "invalid_value"),
        "too large": ({"adapter_config": ("c", config), "adapter_model": ("m", b"\0" * (400 * 1024))}, 413,
                      "upload_too_large"),
    }
    for name, (files, status, code) in cases.items():
        r = upload(http, ALICE, "alice-hostile", files=files)
        assert r.status_code == status, (name, r.text)
        if code:
            assert r.json()["error"]["code"] == code, (name, r.text)
    r = http.post("/v1/adapters", headers=ALICE, json={"id": "alice-hostile", "path": str(src)})   # no server paths
    assert r.status_code == 415
    assert not marker.exists(), "a pickle in an upload was executed"
    assert http.get("/v1/adapters/alice-hostile", headers=ALICE).status_code == 404
    assert not (world["store"] / "alice" / "alice-hostile").exists()
    assert tree(world["store"] / ".tmp") == []                        # nothing staged is left behind


# -- per-tenant rate limit, shared by every API process through Redis --------------------------------
@pytest.fixture(scope="module")
def limited(world, redis_url, tiny):
    """Two API instances (own Redis connections, no shared memory) and a relay: 0.5 request/s, burst 3
    (a token every 2 s: the refusals below do not depend on the machine's speed)."""
    from producer.api import create_app
    from producer.relay import create_relay_app
    url = redis_url.rsplit("/", 1)[0] + "/5"           # a database no worker reads: nothing runs
    s = make_settings(url, tiny, world["tmp"], rate_limit=0.5, rate_burst=3)
    servers = [Served(create_app(s)), Served(create_app(s)), Served(create_relay_app(s))]
    yield servers
    for x in servers:
        x.stop()


def test_rate_limit_is_shared_by_api_processes_and_the_relay(limited):
    a, b, relay = limited
    with httpx.Client(timeout=10) as http:
        codes = [http.get(s.url + "/v1/models", headers=ALICE).status_code for s in (a, b, a)]
        assert codes == [200, 200, 200]
        r = http.get(b.url + "/v1/models", headers=ALICE)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        retry_after = int(r.headers["Retry-After"])
        assert 1 <= retry_after <= 2
        assert http.post(a.url + "/v1/jobs", headers=ALICE, json={"prompt": "x"}).status_code == 429
        assert http.get(a.url + "/v1/models", headers=BOB).status_code == 200      # bob has his own bucket
        assert http.get(a.url + "/healthz").status_code == 200                       # not limited
        assert http.get(a.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        msg, code = ws_refusal(relay.ws + "/v1/jobs/whatever/stream", ALICE)
        assert code == 4429 and msg["error"]["code"] == "rate_limit_exceeded"
        time.sleep(retry_after + 0.1)                                                 # as the header says
        assert http.get(b.url + "/v1/models", headers=ALICE).status_code == 200


# -- per-tenant queue share --------------------------------------------------------------------------
def test_queue_share_counts_queued_jobs_and_frees_on_cancel(world, redis_url, tiny, rds):
    """A Redis database no worker reads: jobs stay queued, so the count is exact."""
    from producer.api import create_app
    url = redis_url.rsplit("/", 1)[0] + "/6"
    s = Served(create_app(make_settings(url, tiny, world["tmp"], tenant_max_queued=2)))
    try:
        with httpx.Client(base_url=s.url, timeout=10) as http:
            def submit(who, job_id):
                return http.post("/v1/jobs", headers=who, json={"id": job_id, "adapter": "ad0", "prompt": "x"})
            assert [submit(ALICE, f"q{i}").status_code for i in range(2)] == [201, 201]
            r = submit(ALICE, "q2")
            assert r.status_code == 429 and r.json()["error"]["code"] == "tenant_queue_full", r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert submit(ALICE, "q0").status_code == 200          # a resubmit adds nothing: not refused
            assert submit(BOB, "b0").status_code == 201            # bob's share is his own
            assert http.delete("/v1/jobs/q0", headers=ALICE).status_code == 200
            assert submit(ALICE, "q2").status_code == 201          # the cancelled job left the count
            assert submit(ALICE, "q3").status_code == 429
            # an API process that died between reserving and enqueueing leaves a member behind:
            # it is pruned after the grace period, not counted for ever
            import redis as redis_lib
            r6 = redis_lib.Redis.from_url(url)
            key = keys.tenant_inflight("bob")
            r6.zadd(key, {"ghost-from-a-dead-api": time.time() - 3600})
            assert submit(BOB, "b1").status_code == 201            # 2 real + 1 ghost would be 3 > 2
            assert r6.zscore(key, "ghost-from-a-dead-api") is None
            r6.close()
    finally:
        s.stop()


def test_queue_share_frees_when_the_worker_finishes(world, redis_url, tiny):
    """With the real worker: alice's two long jobs fill her share; when they finish she may submit again."""
    from producer.api import create_app
    s = Served(create_app(make_settings(redis_url, tiny, world["tmp"], tenant_max_queued=2)))
    long = {"max_tokens": 900, "temperature": 0, "ignore_eos": True}
    try:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            ids = [http.post("/v1/jobs", headers=ALICE, json={"adapter": "ad0", "prompt": "x", "params": long})
                   for _ in range(2)]
            assert [r.status_code for r in ids] == [201, 201]
            r = http.post("/v1/jobs", headers=ALICE, json={"adapter": "ad0", "prompt": "x"})
            assert r.status_code == 429, r.text
            t0 = time.monotonic()
            assert wait_until(lambda: all(http.get(f"/v1/jobs/{j.json()['id']}", headers=ALICE).json()["status"]
                                          == "done" for j in ids), timeout=60, every=0.2)
            print(f"two {long['max_tokens']}-token jobs finished {time.monotonic() - t0:.1f} s after the refusal")
            r = http.post("/v1/jobs", headers=ALICE, json={"adapter": "ad0", "prompt": "x",
                                                           "params": {"max_tokens": 1}})
            assert r.status_code == 201, r.text
    finally:
        s.stop()


# -- API keys: only digests, nowhere in plaintext ---------------------------------------------------------
def test_settings_keep_no_plaintext_secrets(tmp_path, redis_url):
    from producer.api import ApiSettings
    from producer.api.service import JobService
    s = ApiSettings(api_keys={"key-alice": "alice", "sha256:" + "ab" * 32: "bob"},
                    redis_url="redis://:redispass@127.0.0.1:6379/0",
                    database_url="postgresql://u:dbpass@127.0.0.1:1/x")
    for text in (repr(s), str(s)):                    # what ends up in logs and tracebacks
        for secret in ("key-alice", "redispass", "dbpass"):
            assert secret not in text, (secret, text)
    assert "key-alice" not in repr(vars(s))            # URLs keep their passwords (to connect); keys do not
    assert all(k.startswith("sha256:") for k in s.api_keys)
    service = JobService(ApiSettings(api_keys={"key-alice": "alice"}, redis_url=redis_url))
    assert "key-alice" not in repr(vars(service)) + repr(vars(service.keys)) + repr(vars(service.settings))
    assert service.keys.tenant("key-alice") == "alice"
    # a key file may hold digests only: the plaintext key then never sits on the server
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"sha256:" + hashlib.sha256(b"key-carol").hexdigest(): "carol"}))
    s2 = ApiSettings.from_env({"OPENLORA_API_KEYS": str(key_file), "REDIS_URL": redis_url})
    assert JobService(s2).keys.tenant("key-carol") == "carol"


@pytest.mark.parametrize("tenant", ["../alice", "a}b", "a:b", "", "a b", "x" * 129, "/abs"])
def test_tenant_names_that_would_break_paths_or_keys_are_refused(tenant):
    """Tenants name store folders and Redis hash tags: a bad one stops the API from starting."""
    from producer.api import ApiSettings, SettingsError
    with pytest.raises(SettingsError):
        ApiSettings(api_keys={"some-key": tenant})


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def test_keys_never_reach_the_logs(world, redis_url, tiny, alice_job):
    """uvicorn logs each request's path with its query at INFO (its default level): ?api_key= must
    come out redacted, on the relay's websocket and on the API."""
    from producer.api import create_app
    from producer.relay import create_relay_app
    s = make_settings(redis_url, tiny, world["tmp"])
    api, relay = Served(create_app(s), log_level="info"), Served(create_relay_app(s), log_level="info")
    cap = _Capture()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "openlora")]
    for lg in loggers:
        lg.addHandler(cap)
    try:
        with connect(relay.ws + f"/v1/jobs/{alice_job}/stream?api_key=key-alice") as ws:
            while json.loads(ws.recv(timeout=10))["type"] != "result":
                pass
        ws_refusal(relay.ws + f"/v1/jobs/{alice_job}/stream?api_key=key-bob")
        with httpx.Client(timeout=10) as http:
            http.get(api.url + "/v1/models?api_key=key-alice", headers=ALICE)
            http.get(api.url + "/v1/models", headers={"Authorization": "Bearer key-mallory"})
        time.sleep(0.2)
    finally:
        for lg in loggers:
            lg.removeHandler(cap)
        api.stop()
        relay.stop()
    text = "\n".join(cap.lines)
    assert "WebSocket" in text and "/v1/models" in text, text        # the lines that would leak were logged
    for secret in ("key-alice", "key-bob", "key-mallory"):
        assert secret not in text, text


# -- the same isolation on PostgreSQL ------------------------------------------------------------------------
def test_private_adapters_on_postgresql(world, redis_url, tiny, postgres_url, rds):  # noqa: F811
    from producer.api import create_app
    tmp = world["tmp"] / "pg"
    tmp.mkdir()
    url = redis_url.rsplit("/", 1)[0] + "/7"
    s = Served(create_app(make_settings(url, tiny, tmp, database_url=postgres_url)))
    try:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            assert upload(http, ALICE, "pg-secret", world["adapters"]["ad1"]).status_code == 201
            assert http.get("/v1/adapters/pg-secret", headers=BOB).status_code == 404
            assert http.post("/v1/jobs", headers=BOB, json={"adapter": "pg-secret", "prompt": "x"}).status_code == 404
            assert http.post("/v1/completions", headers=BOB,
                             json={"model": "pg-secret", "prompt": "x"}).status_code == 404
            assert "pg-secret" not in {m["id"] for m in http.get("/v1/models", headers=BOB).json()["data"]}
            assert http.delete("/v1/adapters/pg-secret", headers=BOB).status_code == 404
            assert upload(http, BOB, "pg-secret", world["adapters"]["ad0"]).status_code == 409
            assert http.post("/v1/jobs", headers=ALICE, json={"adapter": "pg-secret", "prompt": "x"}).status_code == 201
            assert http.delete("/v1/adapters/pg-secret", headers=ALICE).status_code == 200
            assert upload(http, BOB, "pg-secret", world["adapters"]["ad0"]).status_code == 201   # the id is free again
    finally:
        s.stop()


def test_a_batch_cannot_score_with_another_tenants_private_adapter(world, http, monkeypatch):
    """Rows naming alice's private adapter (alone or in an ensemble) fail alone in bob's run; his own
    adapter's row is planned as a job; the run itself does not exist for alice."""
    from db.session import make_engine
    from producer.batches import BatchRuns
    home = world["tmp"] / "batch-home"
    monkeypatch.setenv("OPENLORA_HOME", str(home))     # where the API writes run files (read lazily)
    rows = [{"id": "mine", "prompt": "x", "completion": " y", "adapter": "bob-private"},
            {"id": "theirs", "prompt": "x", "completion": " y", "adapter": "alice-private"},
            {"id": "ensemble", "prompt": "x", "completion": " y",
             "adapters": [{"id": "bob-private", "weight": 0.5}, {"id": "alice-private", "weight": 0.5}]}]
    r = http.post("/v1/batches", headers=BOB, json={"input": rows})
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    runs = BatchRuns(make_engine(world["settings"].database_url), home)
    planned = {row.id: row for c in range(runs.get(run_id).num_chunks) for row in runs.chunk_rows(run_id, c)}
    assert planned["mine"].job is not None and planned["mine"].error is None
    for rid in ("theirs", "ensemble"):
        assert planned[rid].job is None and "'alice-private' does not exist" in planned[rid].error
    assert http.get(f"/v1/batches/{run_id}", headers=ALICE).status_code == 404
    assert http.post(f"/v1/batches/{run_id}/cancel", headers=ALICE).status_code == 404
    assert http.post(f"/v1/batches/{run_id}/cancel", headers=BOB).json()["status"] == "cancelled"
