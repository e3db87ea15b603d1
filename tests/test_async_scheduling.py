"""Async scheduling: the next decode step is launched before the host reads this one's tokens.

What it must keep: every request's tokens, text, logprobs and finish reason as without it; nothing leaked
when a sequence stops (EOS, stop string, length, abort) while a step holding its row is in flight; new
requests still admitted; preemption when KV blocks run out. (An abort in flight:
tests/test_engine_lifecycle.py, with the engine's default async scheduling.)
"""
from __future__ import annotations

import pytest

from tests.test_engine_vs_hf import make_engine
from worker.engine import SamplingParams

PROMPTS = [[5, 6, 7], [8, 9], "the quick brown fox", "SELECT name", [11, 12, 13, 14, 15], "def main"]
ADAPTERS = ["ad0", "ad1", None, "ad2", "ad3", "ad0"]


def _params(stop_string: str, stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop_string]),
        SamplingParams(max_tokens=20, temperature=0.9, top_k=40, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_token]),
        SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=2),
    ]


def _stops(tiny) -> tuple[str, int]:
    """A stop string and a stop token that the greedy outputs of prompts 2 and 4 reach midway."""
    engine = make_engine(tiny, async_scheduling=False)
    long = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    text = engine.generate(PROMPTS[2], ADAPTERS[2], long)[0].text
    tokens = engine.generate(PROMPTS[4], ADAPTERS[4], long)[0].token_ids
    assert len(text) > 8 and len(tokens) == 20
    return text[5:8], tokens[6]


def _summary(outs):
    return [(o.token_ids, o.text, o.finish_reason, [(lp.token_id, round(lp.logprob, 4), sorted(lp.top))
                                                      for lp in o.logprobs or []],
             [None if lp is None else round(lp.logprob, 4) for lp in o.prompt_logprobs or []]) for o in outs]


def test_async_steps_give_what_sync_steps_give(tiny):
    params = _params(*_stops(tiny))
    results = {}
    for on in (False, True):
        engine = make_engine(tiny, async_scheduling=on, max_loras=4)
        free = engine.kv.allocator.num_free
        results[on] = _summary(engine.generate(PROMPTS, ADAPTERS, params))
        assert (engine.ahead_steps > 10) == on
        # the step launched for the rows that stopped early is still drained by the next step
        while engine.has_unfinished():
            assert engine.step() == []
        assert engine.kv.allocator.num_free == free and not engine.seqs
        assert not any(engine.slots.in_use(a) for a in ADAPTERS if a)
    assert [r[2] for r in results[True]] == ["length", "length", "stop", "length", "stop", "length"]
    assert results[True] == results[False]


def test_streamed_steps_each_return_one_step(tiny):
    """Step by step: one token per request per step, the first step's token with its prefill."""
    engine = make_engine(tiny)
    p = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], "ad0", p)
    engine.add_request("b", [8, 9], None, p)
    per_step = []
    while engine.has_unfinished():
        per_step.append(sorted((o.request_id, len(o.new_token_ids)) for o in engine.step()))
    assert per_step == [[("a", 1), ("b", 1)]] * 5
    assert engine.ahead_steps == 4      # the last step ends both by length: nothing to launch after it


def test_a_request_stopping_early_does_not_stall_the_others(tiny):
    """A stop token ends one request while the next step, with its row, is in flight: every later step is
    still launched ahead, and the stopped row's token never shows."""
    _, stop_token = _stops(tiny)
    engine = make_engine(tiny)
    engine.add_request("long", [5, 6, 7], "ad0", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    engine.add_request("stops", PROMPTS[4], ADAPTERS[4],
                       SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_token]))
    calls, got = 0, {"long": [], "stops": []}
    while engine.has_unfinished():
        calls += 1
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    assert len(got["long"]) == 20 and got["stops"][-1] == stop_token and len(got["stops"]) < 20
    assert engine.ahead_steps == calls - 1          # all but the last, which ends "long" by length


def test_a_request_arriving_mid_flight_gets_in(tiny):
    p = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone = make_engine(tiny).generate(["SELECT name"], "ad3", p)[0].token_ids
    engine = make_engine(tiny)
    engine.add_request("long", [5, 6, 7], "ad0", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None
    engine.add_request("late", "SELECT name", "ad3", p)
    late, steps = [], 0
    while engine.has_unfinished():
        steps += 1
        late += [t for o in engine.step() if o.request_id == "late" for t in o.new_token_ids]
        if steps == 2:
            assert late, "the late request's first token came two steps after it arrived"
    assert late == alone


def test_a_full_batch_keeps_launching_ahead_while_requests_wait(tiny):
    """Saturated: max_num_seqs running and more waiting. Nothing could be admitted anyway, so steps still go
    ahead; each waiting request gets in once a running one finishes, and every output is as without it."""
    p = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 9, 4, 7, 5)]
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14], [15, 16, 17]]
    expected = [o.token_ids for o in make_engine(tiny, async_scheduling=False).generate(prompts, "ad2", p)]
    engine = make_engine(tiny, max_num_seqs=2)
    ids = [engine.add_request(None, q, "ad2", sp) for q, sp in zip(prompts, p)]
    got, ahead_while_waiting = {i: [] for i in ids}, 0
    while engine.has_unfinished():
        before, waiting = engine.ahead_steps, bool(engine.scheduler.waiting)
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
        ahead_while_waiting += waiting and engine.ahead_steps > before
        assert len(engine.scheduler.running) <= 2
    assert ahead_while_waiting >= 8
    assert [got[i] for i in ids] == expected


def test_kv_blocks_running_out_falls_back_to_preemption(tiny):
    """Too few KV blocks for everyone's full length: scheduling ahead declines, ``schedule`` preempts, and
    the outputs are those of unhurried runs."""
    p = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15]]
    expected = [make_engine(tiny).generate([q], "ad1", p)[0].token_ids for q in prompts]
    engine = make_engine(tiny, num_blocks=8, block_size=8)
    got = [o.token_ids for o in engine.generate(prompts, "ad1", p)]
    assert engine.scheduler.num_preemptions > 0 and engine.ahead_steps > 0
    assert got == expected


def test_async_scheduling_must_be_a_bool():
    from worker.config import EngineConfig
    from worker.errors import OpenLoRAError
    with pytest.raises(OpenLoRAError, match="async_scheduling must be true or false"):
        EngineConfig(async_scheduling="off")
