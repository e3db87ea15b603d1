"""Hostile HTTP input against the API process: schemathesis fuzzing of every route (no 5xx, errors in
OpenAI's shape), then hand-written requests no schema describes (oversized, badly encoded, deeply
nested, wrongly typed bodies). The API runs as its own process (``python -m worker.cli api``) next
to a real redis-server and a real worker on the tiny model; refused requests must enqueue nothing.
"""
from __future__ import annotations

import json
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from producer import keys
from producer.protocol import JOB_ID_RE
from tests.chaos.harness import ServiceProc
from tests.fleet.conftest import rds, redis_url, start_worker  # noqa: F401  (fixtures)

JSON_ROUTES = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatRequest", "/v1/jobs": "Job"}
MAX_REQUEST_BYTES = 1 << 20
SERVED = ["ad0", "ad1"]


@pytest.fixture(scope="module")
def fleet_worker(start_worker):
    return start_worker("fuzz-w", preload=SERVED, max_num_seqs=8).wait_ready()


@pytest.fixture(scope="module")
def api(redis_url, tiny, fleet_worker, tmp_path_factory):
    model_dir, adapters = tiny
    d = tmp_path_factory.mktemp("api")
    env = {"DATABASE_URL": f"sqlite:///{d / 'registry.db'}", "OPENLORA_STORE": str(d / "store"),
           "OPENLORA_HOME": str(d / "home"),
           "OPENLORA_REQUEST_TIMEOUT": "30", "OPENLORA_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
           "OPENLORA_MAX_BATCH_BYTES": str(8 * MAX_REQUEST_BYTES)}
    s = ServiceProc("api", redis_url, model_dir, next(iter(adapters.values())).parent, d, env=env).wait_ready()
    yield s
    s.stop()


def submitted(rds) -> int:
    """Jobs ever accepted (each leaves a ``submitted`` marker): a refusal must not move it."""
    return sum(1 for _ in rds.scan_iter(match=f"{keys.PREFIX}:{{job:*}}:submitted", count=1000))


def assert_error_shape(response) -> None:
    if 400 <= response.status_code < 500:
        ctype = response.headers.get("content-type") or ""
        ctype = ctype[0] if isinstance(ctype, list) else ctype        # schemathesis keeps lists of values
        assert ctype.startswith("application/json"), response.headers
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"], err


# --- schemathesis ------------------------------------------------------------------------------------

def _with_bodies(schema: dict) -> dict:
    """The routes read their bodies themselves, so FastAPI's schema has none: add the JSON bodies
    they validate (the pydantic models), so that the fuzzer sends them."""
    from producer.api.openai_schema import ChatRequest, CompletionRequest
    from producer.protocol import Job
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in zip(JSON_ROUTES, (CompletionRequest, ChatRequest, Job)):
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(s.pop("$defs", {}))
        components[model.__name__] = s
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/"
                                                                                   f"{model.__name__}"}}}}
    # names the fleet serves, so that valid requests reach the worker (random names are 404s)
    served = {"type": "string", "enum": [*SERVED, "model"]}
    for name in ("CompletionRequest", "ChatRequest"):
        components[name]["properties"]["model"] = served
    components["Job"]["properties"]["adapter"] = {"anyOf": [served, {"type": "null"}]}
    components["Job"]["properties"]["id"] = {"type": "string", "pattern": JOB_ID_RE.pattern}
    text = {"type": "string", "minLength": 1}
    components["Job"]["properties"]["prompt"] = text              # (or input_ids: one of the two)
    components["Job"]["required"] = ["prompt"]
    components["CompletionRequest"]["properties"]["prompt"] = {"anyOf": [text, {
        "type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]}
    components["AdapterWeight"]["properties"]["id"] = served
    return schema


@pytest.fixture(scope="module")
def api_schema(tiny, tmp_path_factory):
    from producer.api import ApiSettings, create_app
    model_dir, _ = tiny
    app = create_app(ApiSettings(model_dir=str(model_dir)))      # only for its OpenAPI document
    return schemathesis.openapi.from_dict(_with_bodies(app.openapi()))


schema = schemathesis.pytest.from_fixture("api_schema")


def _small(case) -> None:
    """Generation length is not what is tested: keep valid jobs short so hundreds run in seconds."""
    if not isinstance(case.body, dict):
        return
    params = case.body.setdefault("params", {}) if case.path == "/v1/jobs" else case.body
    if not isinstance(params, dict):
        return
    names = ("max_tokens", "max_completion_tokens") if case.path == "/v1/chat/completions" else ("max_tokens",)
    for name in names:
        value = params.get(name)
        if value is None or (type(value) is int and value > 4):      # absent: the default (16, 256) is long
            params[name] = 4


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_no_5xx(case, api, rds):
    _small(case)
    before = submitted(rds)
    response = case.call(base_url=api.url, timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
    assert_error_shape(response)
    if response.status_code >= 400 and case.method == "POST":
        assert submitted(rds) == before, f"refused with {response.status_code} but enqueued: {case.body!r}"
    assert api.proc.poll() is None, api.output()[-3000:]


# --- hand-written hostile requests -------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
BASE = {"/v1/completions": '{"model": "ad0", "prompt": %s, "max_tokens": 2}',
        "/v1/chat/completions": '{"model": "ad0", "messages": [{"role": "user", "content": %s}], "max_tokens": 2}',
        "/v1/jobs": '{"adapter": "ad0", "prompt": %s, "params": {"max_tokens": 2}}'}
MODEL = {"/v1/completions": '{"model": %s, "prompt": "x"}',
         "/v1/chat/completions": '{"model": %s, "messages": [{"role": "user", "content": "x"}]}',
         "/v1/jobs": '{"adapter": %s, "prompt": "x"}'}
JSON = "application/json"


def hostile_requests():
    """(name, path, body bytes, content type, expected status)."""
    for path in JSON_ROUTES:
        p, m = BASE[path], MODEL[path]
        yield from [
            ("nested 100k deep", path, DEEP.encode(), JSON, 400),
            ("nested 100k deep in the prompt", path, (p % DEEP).encode(), JSON, 400),
            ("invalid UTF-8 in a string", path, (p % '"caf\xe9"').encode("latin-1"), JSON, 400),
            ("invalid UTF-8 outside strings", path, b"\xff\xfe" + (p % '"x"').encode(), JSON, 400),
            ("lone surrogate in the prompt", path, (p % '"\\ud800"').encode(), JSON, 400),
            ("lone surrogate in the model", path, (m % '"\\udfff"').encode(), JSON, 400),
            ("lone surrogate as a key", path, b'{"\\ud800": 1}', JSON, 400),
            ("NaN literal", path, (p % "NaN").encode(), JSON, 400),
            ("Infinity literal", path, (p % '"x"').replace('2}', 'Infinity}').encode(), JSON, 400),
            ("integer of 5000 digits", path, (p % '"x"').replace('2}', "9" * 5000 + "}").encode(), JSON, 400),
            ("integer of 300 digits", path, (p % '"x"').replace('2}', "9" * 300 + "}").encode(), JSON, 400),
            ("null bytes in the model", path, (m % '"ad0\\u0000"').encode(), JSON, 404),
            ("text/plain", path, (p % '"x"').encode(), "text/plain", 415),
            ("form-encoded", path, b"model=ad0&prompt=x", "application/x-www-form-urlencoded", 415),
            ("multipart", path, b"--b\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b", 415),
            ("UTF-16 JSON", path, (p % '"x"').encode("utf-16"), JSON, 400),
            ("empty body", path, b"", JSON, 400),
            ("a JSON string", path, b'"hello"', JSON, 400),
            ("trailing garbage", path, (p % '"x"').encode() + b" }{", JSON, 400),
            ("prompt of 900k characters", path, (p % json.dumps("the quick fox " * 65_000)).encode(), JSON, 400),
        ]


CASES = list(hostile_requests()) + [
    ("nested 100k deep", "/v1/batches", ('{"input": ' + DEEP + "}").encode(), JSON, 400),
    ("lone surrogate", "/v1/batches", b'{"input": [{"prompt": "\\ud800"}]}', JSON, 400),
    ("JSON to the upload route", "/v1/adapters", b'{"id": "x"}', JSON, 415),
    ("token id past the vocabulary", "/v1/completions", b'{"model": "ad0", "prompt": [1, 999999]}', JSON, 400),
    ("token id past the vocabulary", "/v1/jobs", b'{"input_ids": [1, 999999]}', JSON, 400),
    ("input_ids longer than the context", "/v1/jobs", json.dumps({"input_ids": [1] * 5000}).encode(), JSON, 400),
]


@pytest.mark.parametrize("name,path,body,ctype,status", CASES, ids=[f"{c[1]} {c[0]}" for c in CASES])
def test_hostile_request_is_refused_with_a_4xx(api, rds, name, path, body, ctype, status):
    before = submitted(rds)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        r = http.post(path, content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text[:500]
    assert_error_shape(r)
    if name.startswith("prompt of"):        # refused by its length, without tokenizing megabytes
        assert "characters, more than this model's context" in r.json()["error"]["message"]
    assert submitted(rds) == before, f"{name}: refused but enqueued"
    assert api.proc.poll() is None


def test_oversized_bodies_are_refused_before_they_are_read(api, rds):
    """20 MB with a Content-Length is a 413 at once; 200 MB streamed without one (chunked) is cut off
    at the limit: the API's memory does not grow with the body."""
    before, peak = submitted(rds), api.peak_rss_mb()
    big = b'{"model": "ad0", "prompt": "' + b"a" * (20 << 20) + b'"}'

    def chunks():
        yield b'{"model": "ad0", "prompt": "'
        for _ in range(200):
            yield b"a" * (1 << 20)
        yield b'"}'

    answered = 0
    for path in JSON_ROUTES:
        for body in (big, chunks()):
            with httpx.Client(base_url=api.url, timeout=60) as http:
                try:
                    r = http.post(path, content=body, headers={"Content-Type": JSON})
                except httpx.WriteError:        # the server answered and closed while we were sending
                    continue
            assert r.status_code == 413, r.text[:300]
            assert r.json()["error"]["code"] == "request_too_large"
            answered += 1
    assert answered >= len(JSON_ROUTES), "most refusals should reach the client as a 413"
    with httpx.Client(base_url=api.url, timeout=60) as http:    # a dataset has its own, larger cap
        r = http.post("/v1/batches", content=b"x" * (8 * MAX_REQUEST_BYTES + 1), headers={"Content-Type": JSON})
        assert r.status_code == 413 and "OPENLORA_MAX_BATCH_BYTES" in r.json()["error"]["message"]
        r = http.post("/v1/batches", content=b'{"input": [], "pad": "' + b"a" * (2 * MAX_REQUEST_BYTES) + b'"}',
                      headers={"Content-Type": JSON})
        assert r.status_code == 400, r.text[:300]          # over the request cap, under the dataset cap: read
    assert api.peak_rss_mb() - peak < 100, f"peak RSS grew from {peak} to {api.peak_rss_mb()} MB"
    assert submitted(rds) == before
    with httpx.Client(base_url=api.url, timeout=30) as http:   # a body just under the limit is read
        r = http.post("/v1/jobs", content=b'{"prompt": "x", "pad": "' + b"a" * (MAX_REQUEST_BYTES - 100) + b'"}',
                      headers={"Content-Type": JSON})
    assert r.status_code == 400 and r.json()["error"]["param"] == "pad"


def test_api_still_serves_after_the_hostile_requests(api, rds):
    with httpx.Client(base_url=api.url, timeout=60) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        r = http.post("/v1/completions", json={"model": "ad0", "prompt": "the quick brown fox", "max_tokens": 3,
                                               "temperature": 0, "ignore_eos": True})    # exactly 3, not by chance
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        r = http.post("/v1/jobs", json={"adapter": "ad1", "prompt": "a\u0000b", "params": {"max_tokens": 2}})
        assert r.status_code == 201      # a null byte is text like any other: accepted, and served
        job = r.json()["id"]
        for _ in range(300):
            state = http.get(f"/v1/jobs/{job}").json()
            if state["status"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        assert state["status"] == "done", state
    assert api.proc.poll() is None
    assert "Traceback" not in api.output(), api.output()[-3000:]


UPLOADED = ["safetensors-that-is-a-pickle", "header-nested-100k-deep", "config-nested-100k-deep",
            "alpha-pattern-catastrophic-regex", "float8-weights", "nan-in-lora-a", "duplicated-key-in-header",
            "config-r-lies", "config-of-1-5-mb", "overlapping-offsets"]


@pytest.mark.parametrize("case", UPLOADED)
def test_hostile_adapter_uploads_are_a_400_and_store_nothing(api, tiny, tmp_path, case):
    """The registry's validation behind ``POST /v1/adapters``: each hostile file is a 400 naming what
    is wrong (before: nested JSON was a 500, a catastrophic pattern was accepted)."""
    from tests.chaos.hostile_adapters import CASES as ADAPTERS, MARKER, build
    model_dir, adapters = tiny
    src, outside = build(case, adapters["ad1"], tmp_path / "case", model_dir)
    files = {"adapter_config": ("c.json", (src / "adapter_config.json").read_bytes()),
             "adapter_model": ("m.safetensors", (src / "adapter_model.safetensors").read_bytes())}
    with httpx.Client(base_url=api.url, timeout=60) as http:
        r = http.post("/v1/adapters", data={"id": f"up-{case}"}, files=files)
        assert r.status_code == 400, r.text[:500]
        assert r.json()["error"]["code"] == "invalid_adapter" and ADAPTERS[case].error in r.json()["error"]["message"]
        assert all(a["id"] != f"up-{case}" for a in http.get("/v1/adapters").json()["data"])
    assert not (outside / MARKER).exists()
    assert api.proc.poll() is None


def test_a_jsonl_batch_line_nested_100k_deep_is_an_unparsable_row():
    """JSONL batch input (``POST /v1/batches`` with application/jsonl, ``openlora score``): a deep line
    was a RecursionError out of the reader (a 500); it is one bad row, the others still parse."""
    from producer.batch_rows import Unparsable, jsonl_records
    out = list(jsonl_records([b'{"prompt": "a"}', DEEP.encode(), b'{"prompt": "b"}']))
    assert out[0] == {"prompt": "a"} and out[2] == {"prompt": "b"}
    assert isinstance(out[1], Unparsable) and out[1].error == "line 2: not valid JSON: nested too deeply"
