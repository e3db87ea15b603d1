"""Sampling: seeds reproduce, top-k/top-p truncate, stop strings and stop ids cut exactly."""
from __future__ import annotations

import torch

from tests.test_engine_vs_hf import make_engine
from worker.engine import SamplingParams
from worker.sampler import sample


def test_seeded_sampling_is_reproducible_across_batches(tiny):
    engine = make_engine(tiny)
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate(["the quick brown fox"], "ad0", p)[0].token_ids
    crowd = engine.generate(["the quick brown fox", "SELECT", "def main"], ["ad0", None, "ad1"],
                            [p, SamplingParams(max_tokens=7, temperature=1.0), SamplingParams(max_tokens=30)])
    assert crowd[0].token_ids == alone
    other = engine.generate(["the quick brown fox"], "ad0",
                            SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=99,
                                           ignore_eos=True))[0]
    assert other.token_ids != alone


def test_unseeded_sampling_varies(tiny):
    engine = make_engine(tiny)
    p = SamplingParams(max_tokens=20, temperature=1.5, ignore_eos=True)
    runs = {tuple(engine.generate(["the"], None, p)[0].token_ids) for _ in range(3)}
    assert len(runs) > 1


def test_top_k_1_and_tiny_top_p_are_greedy(tiny):
    engine = make_engine(tiny)
    greedy = engine.generate(["SELECT name"], "ad2", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    k1 = engine.generate(["SELECT name"], "ad2", SamplingParams(max_tokens=12, temperature=2.0, top_k=1, ignore_eos=True))
    p0 = engine.generate(["SELECT name"], "ad2", SamplingParams(max_tokens=12, temperature=2.0, top_p=1e-6, ignore_eos=True))
    assert greedy[0].token_ids == k1[0].token_ids == p0[0].token_ids


def test_sampler_draws_from_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 1e-9]])).repeat(4000, 1)
    params = [SamplingParams(temperature=1.0)] * 4000
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    tokens, _ = sample(logits, params, gens)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.03)
    tokens, _ = sample(logits[:4000], [SamplingParams(temperature=1.0, top_k=2)] * 4000, gens)
    assert set(tokens) <= {0, 1}
    tokens, _ = sample(logits, [SamplingParams(temperature=1.0, top_p=0.75)] * 4000, gens)
    assert set(tokens) <= {0, 1}


def test_stop_string_cuts_exactly(tiny):
    engine = make_engine(tiny)
    base = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    full = engine.generate(["the quick brown fox"], "ad1", base)[0]
    assert len(full.text) > 8
    stop = full.text[5:8]                                  # a string the model is known to produce, mid-output
    cut = engine.generate(["the quick brown fox"], "ad1",
                          SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop, "\x00never"]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_streamed_text_never_shows_part_of_a_stop_string(tiny):
    engine = make_engine(tiny)
    full = engine.generate(["def main"], None, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    stop = full.text[6:10]
    rid = engine.add_request("s1", "def main", None,
                             SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop]))
    streamed = ""
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            streamed += out.text_delta
            if not out.finished:
                assert stop[:1] not in out.text_delta or stop not in streamed
    assert streamed == full.text[: full.text.find(stop)]


def test_stop_token_ids_and_eos(tiny):
    engine = make_engine(tiny)
    full = engine.generate([[10, 11, 12]], "ad3", SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True))[0]
    target = full.token_ids[4]
    first = full.token_ids.index(target)
    out = engine.generate([[10, 11, 12]], "ad3",
                          SamplingParams(max_tokens=15, temperature=0.0, stop_token_ids=[target], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: first + 1]
    # max_tokens ends with "length"
    assert full.finish_reason == "length" and len(full.token_ids) == 15


def test_echo_prepends_the_prompt(tiny):
    engine = make_engine(tiny)
    out = engine.generate(["SELECT name"], None, SamplingParams(max_tokens=4, temperature=0.0, echo=True,
                                                                ignore_eos=True))[0]
    assert out.text.startswith("SELECT name")
