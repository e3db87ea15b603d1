"""The wire protocol and key names, without Redis."""
from __future__ import annotations

import json

import pytest

from producer import Job, JobValidationError, ShardRouter, keys
from producer.protocol import Chunk, JobResult


@pytest.mark.parametrize("data, field", [
    ({"adapter": "a"}, "prompt"),
    ({"prompt": "x", "input_ids": [1]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "params": {"top_p": 0}}, "params.top_p"),
    ({"prompt": "x", "params": {"max_tokens": 0}}, "params.max_tokens"),
    ({"prompt": "x", "params": {"max_tokens": True}}, "params.max_tokens"),
    ({"prompt": "x", "params": {"temperature": "hot"}}, "params.temperature"),
    ({"prompt": "x", "params": {"logprobs": 21}}, "params.logprobs"),
    ({"prompt": "x", "params": {"stop": [""]}}, "params.stop"),
    ({"prompt": "x", "params": {"bogus": 1}}, "params.bogus"),
    ({"input_ids": [1, -2]}, "input_ids"),
    ({"prompt": "x", "id": "has{brace}"}, "id"),
    ({"prompt": "x", "mode": "train"}, "mode"),
    ({"prompt": "x", "adapter": "a", "adapters": [{"id": "b"}]}, "adapters"),
    ({"prompt": "x", "adapters": [{"id": "b"}, {"id": "b"}]}, "adapters"),
    ({"prompt": "x", "adapters": [{"id": "b"}], "merge": "magic"}, "merge"),
    ({"prompt": "x", "merge": "linear"}, "merge"),
])
def test_bad_jobs_name_the_field(data, field):
    with pytest.raises(JobValidationError) as e:
        Job.parse(data)
    assert e.value.field == field, str(e.value)
    assert str(e.value).startswith(field + ":")


def test_bad_json_is_refused():
    with pytest.raises(JobValidationError):
        Job.parse("{not json")
    with pytest.raises(JobValidationError):
        Job.parse(["a list"])


def test_job_round_trip_and_pinned_seed():
    job = Job.parse({"prompt": "hi", "adapter": "a", "params": {"temperature": 0.7, "stop": "\n"}, "tenant": "t",
                     "deadline": 2e9, "priority": 3})
    assert job.params.stop == ["\n"] and len(job.id) == 32
    pinned = job.pinned()
    assert pinned.params.seed is not None and pinned.submitted_at is not None
    assert Job.parse(pinned.to_json()) == pinned
    greedy = Job.parse({"prompt": "hi", "params": {"temperature": 0}}).pinned()
    assert greedy.params.seed is None                          # greedy needs no seed
    ens = Job.parse({"prompt": "hi", "adapters": [{"id": "b", "weight": 0.5}, {"id": "a"}]})
    assert ens.merge == "linear" and ens.route_key == "a+b" and ens.is_ensemble


def test_router_is_stable_and_overridable():
    r = ShardRouter(8)
    assert r.shard_of(None) == keys.BASE_SHARD
    assert r.shard_of("support-bot") == ShardRouter(8).shard_of("support-bot")
    shards = {r.shard_of(f"ad{i}") for i in range(200)}
    assert shards == {f"g{i}" for i in range(8)}
    r2 = ShardRouter(8, {"vip": "hot"})
    assert r2.shard_of("vip") == "hot" and "hot" in r2.all_shards()
    with pytest.raises(ValueError):
        ShardRouter(8, {"x": "{bad}"})


def test_keys_share_a_slot():
    def tag(k):
        return k[k.index("{") + 1:k.index("}")]
    assert tag(keys.jobs("g7")) == tag(keys.dead_letter("g7")) == tag(keys.enqueued("g7", "j1")) == "g7"
    assert keys.jobs("g7") == "olora:{g7}:jobs"
    job_keys = [keys.result("j1"), keys.replay("j1"), keys.cancel_flag("j1"), keys.submitted("j1"), keys.tokens("j1")]
    assert {tag(k) for k in job_keys} == {"job:j1"}


def test_chunk_and_result_wire():
    c = Chunk(3, "ab", [5, 6], finish_reason="stop")
    assert Chunk.from_json(c.to_json()) == c and c.end == 5 and c.final
    assert "logprobs" not in json.loads(c.to_json())
    res = JobResult("j", "done", "ab", [5, 6], "stop")
    assert JobResult.from_hash({k.encode(): v.encode() for k, v in res.to_hash().items()}) == res
    assert JobResult.from_hash({}) is None
