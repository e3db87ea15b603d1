"""The real ``openai`` client against the API on uvicorn, a real worker behind it: completions,
chat, streaming with adapter = model, logprobs and echo, /v1/models, /healthz, /metrics."""
from __future__ import annotations

import math

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import KEYS

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def oai(api, fleet_worker):
    c = openai.OpenAI(base_url=api.url + "/v1", api_key="key-alice", max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.mark.parametrize("adapter", ["ad0", "ad2"])
def test_completion_equals_engine_greedy_output(oai, reference, adapter):
    r = oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=12, temperature=0)
    ref = reference(PROMPT, adapter, max_tokens=12, temperature=0.0)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens > 0
    assert r.model == adapter and r.id.startswith("cmpl-")


def test_base_model_by_name(oai, reference):
    r = oai.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text == reference(PROMPT, None, max_tokens=8, temperature=0.0).text


def test_streaming_completion_adds_up_to_the_greedy_output(oai, reference):
    stream = oai.completions.create(model="ad1", prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    events = list(stream)
    texts = [e.choices[0].text for e in events if e.choices]
    assert len(texts) > 2, "tokens must arrive as several chunks"
    ref = reference(PROMPT, "ad1", max_tokens=16, temperature=0.0)
    assert "".join(texts) == ref.text
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == ref.finish_reason
    assert events[-1].usage.completion_tokens == len(ref.token_ids)


def test_chat_plain_template_and_streaming(oai, reference):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    rendered = "system: be brief\nuser: hello there\nassistant:"     # the tiny tokenizer has no chat template
    ref = reference(rendered, "ad3", max_tokens=10, temperature=0.0)
    r = oai.chat.completions.create(model="ad3", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    parts = [e.choices[0].delta.content or "" for e in
             oai.chat.completions.create(model="ad3", messages=msgs, max_tokens=10, temperature=0, stream=True)]
    assert "".join(parts) == ref.text


def test_logprobs_and_echo(oai, reference):
    r = oai.completions.create(model="ad0", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, echo=True)
    ref = reference(PROMPT, "ad0", max_tokens=6, temperature=0.0, logprobs=3)
    c = r.choices[0]
    assert c.text.startswith(PROMPT) and c.text.endswith(ref.text)
    lp = c.logprobs
    assert len(lp.tokens) == len(ref.token_ids) == len(lp.token_logprobs) == len(lp.top_logprobs)
    for got, want in zip(lp.token_logprobs, ref.logprobs):
        assert math.isclose(got, want.logprob, abs_tol=1e-4)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)    # keyed by token text: two ids may print alike
    assert lp.text_offset[0] == len(PROMPT)
    chat = oai.chat.completions.create(model="ad0", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_models_lists_base_and_adapters(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids[0] == "tiny-base" and {"ad0", "ad1", "ad2", "ad3"} <= set(ids)


def test_native_jobs_idempotent_get_and_cancel(api, fleet_worker):
    h = {"Authorization": "Bearer key-bob"}
    job = {"id": "native-1", "adapter": "ad1", "prompt": "hello", "params": {"max_tokens": 5, "temperature": 0}}
    with httpx.Client(base_url=api.url, headers=h, timeout=30) as http:
        first = http.post("/v1/jobs", json=job)
        again = http.post("/v1/jobs", json=job)
        assert first.status_code == 201 and again.status_code == 200 and not again.json()["created"]
        for _ in range(300):
            state = http.get("/v1/jobs/native-1").json()
            if state["status"] == "done":
                break
        assert state["result"]["completion_tokens"] == 5
        assert http.delete("/v1/jobs/native-1").json() == {"id": "native-1", "cancelled": False}


def test_healthz_and_metrics(api, oai):
    with httpx.Client(base_url=api.url, timeout=10) as http:
        health = http.get("/healthz").json()
        assert health == {"status": "ok", "redis": "ok", "workers": 1}
        text = http.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    depth = {s.labels["shard"]: s.value for s in fams["openlora_queue_depth"].samples}
    assert set(depth) >= {"base", "g0"} and all(v >= 0 for v in depth.values())
    assert fams["openlora_workers_alive"].samples[0].value == 1
    cache = {s.labels["counter"]: s.value for s in fams["openlora_adapter_cache"].samples}
    assert set(cache) == {"admissions", "gpu_loads", "host_hits", "host_misses", "host_loads"}
    assert cache["admissions"] >= 1 and cache["gpu_loads"] >= 1
    submitted = sum(s.value for s in fams["openlora_jobs_submitted"].samples if s.name.endswith("_total"))
    assert submitted >= 5
    assert any(s.name == "openlora_ttft_seconds_count" and s.value >= 1 for s in fams["openlora_ttft_seconds"].samples)
    assert sum(s.value for s in fams["openlora_tokens_generated"].samples if s.name.endswith("_total")) > 0
    assert KEYS  # the fixture's keys are the ones used above
