"""Log-likelihood scoring in the engine equals transformers + PEFT; priorities order admission."""
from __future__ import annotations

import math
import random

import pytest
from transformers import AutoTokenizer

from tests.conftest import make_engine
from tests.hf_reference import HFReference
from worker.engine import SamplingParams
from worker.errors import InvalidRequestError
from worker.scoring import encode_pair, loglik

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing in old green trees".split()


def sentences(seed: int, n: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choices(WORDS, k=rng.randrange(2, 12))), " " + " ".join(rng.choices(WORDS, k=rng.randrange(1, 8))))
            for _ in range(n)]


def hf_loglik(ref: HFReference, tok, prompt: str, completion: str | None, adapter: str | None):
    """Reference: tokenize the two parts, one forward, sum log p over the completion's positions."""
    p = tok.encode(prompt)
    c = tok.encode(completion, add_special_tokens=False) if completion is not None else []
    ids = p + c
    start = len(p) if completion is not None else 1
    lp = ref.logprobs(ids, adapter)
    vals = [float(lp[j - 1, ids[j]]) for j in range(start, len(ids))]
    greedy = all(int(lp[j - 1].argmax()) == ids[j] for j in range(start, len(ids)))
    return math.fsum(vals), len(vals), greedy


def test_loglik_matches_peft_under_chunked_prefill(tiny, ref):
    model_dir, _ = tiny
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    pairs = sentences(seed=3, n=12)
    adapters = ["ad0", "ad1", None, "ad2", "ad3", "ad1"] * 2
    engine = make_engine(tiny, max_num_batched_tokens=16)     # long rows span several steps
    scores = engine.score([p for p, _ in pairs], [c for _, c in pairs], adapters, per_token=True)
    for (p, c), a, s in zip(pairs, adapters, scores):
        total, n, greedy = hf_loglik(ref, tok, p, c, a)
        assert s.tokens == n == len(tok.encode(c, add_special_tokens=False))
        assert abs(s.logprob_sum - total) < 1e-4
        assert abs(s.logprob_mean - total / n) < 1e-4
        assert s.greedy == greedy and len(s.token_logprobs) == n
        assert abs(math.fsum(s.token_logprobs) - s.logprob_sum) < 1e-9
    # the adapters matter: the same rows under the base model score differently
    base = engine.score([p for p, _ in pairs], [c for _, c in pairs], None)
    assert sum(abs(b.logprob_sum - s.logprob_sum) > 1e-3 for b, s, a in zip(base, scores, adapters) if a) >= 8


def test_whole_prompt_perplexity_and_greedy_flag(tiny, ref):
    model_dir, _ = tiny
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    engine = make_engine(tiny)
    prompt = "the quick brown fox jumps over a lazy dog"
    (s,) = engine.score([prompt], None, "ad2")
    total, n, _ = hf_loglik(ref, tok, prompt, None, "ad2")
    assert s.tokens == n == len(tok.encode(prompt)) - 1 and abs(s.logprob_sum - total) < 1e-4
    # a completion made of the model's own greedy tokens is greedy by construction
    ids = tok.encode(prompt)
    out = engine.generate([ids], "ad2", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    (g,) = engine.score([ids], [out.token_ids], "ad2")
    assert g.greedy and g.tokens == 5
    (ng,) = engine.score([ids], [[(t + 1) % 300 + 3 for t in out.token_ids]], "ad2")
    assert not ng.greedy


def test_scoring_rejects_what_it_cannot_score(tiny):
    engine = make_engine(tiny, max_model_len=64)
    with pytest.raises(InvalidRequestError, match="completion is empty"):
        engine.score(["hello"], [""])
    with pytest.raises(InvalidRequestError, match="prompt is"):
        engine.score(["word " * 100], [" more"])
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.encode_pair([1, 2, 3], [10**9])


def test_loglik_needs_every_position_scored():
    with pytest.raises(ValueError, match="not scored"):
        loglik([None, None, None], 1)
    ids, start = encode_pair(None, [5, 6], [7, 8, 9])
    assert ids == [5, 6, 7, 8, 9] and start == 2


def test_online_prefill_steps_run_alone_and_batch_prefill_is_capped(tiny):
    engine = make_engine(tiny, max_num_seqs=3, max_num_batched_tokens=64, low_priority_tokens=8)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"batch{i}", [7] * 30, None, params, priority=-1)
    computed = lambda: {rid: s.num_computed for rid, s in engine.seqs.items()}  # noqa: E731
    engine.step()                                   # batch0 starts its prefill: 8 tokens of 30
    assert computed() == {"batch0": 8, "batch1": 0, "batch2": 0}
    engine.add_request("online", [9] * 5, None, params)
    engine.step()
    # the online request jumped the queue and prefilled alone: no batch tokens in its step
    assert computed() == {"batch0": 8, "batch1": 0, "batch2": 0, "online": 5}
    engine.step()
    # while it decodes, batch prefill goes on within its share: 8 tokens a step
    assert computed() == {"batch0": 16, "batch1": 0, "batch2": 0, "online": 6}
    assert [s.request_id for s in engine.scheduler.waiting] == ["batch1", "batch2"]
