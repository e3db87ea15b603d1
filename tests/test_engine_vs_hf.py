"""The engine's greedy tokens and logprobs equal transformers + PEFT, under every scheduling path."""
from __future__ import annotations

import random

import pytest

from tests.conftest import make_engine
from tests.hf_reference import HFReference
from worker.engine import SamplingParams
from worker.tiny import TinySpec, make_tiny_setup

N_NEW = 10
GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0.0, logprobs=1, ignore_eos=True)


def workload(seed: int, n: int = 8):
    """n prompts of varied lengths over 4 adapters (ranks 8/4/16/32, different targets) and the base model."""
    rng = random.Random(seed)
    names = ["ad0", "ad1", "ad2", "ad3", None]
    prompts = [[rng.randrange(3, 380) for _ in range(rng.randrange(3, 40))] for _ in range(n)]
    adapters = [names[i % len(names)] for i in range(n)]
    return prompts, adapters


def check_against_reference(ref, prompts, adapters, outs):
    for prompt, adapter, out in zip(prompts, adapters, outs):
        tokens, lps = ref.greedy(prompt, adapter, N_NEW)
        assert out.token_ids == tokens, f"adapter {adapter}: {out.token_ids} != {tokens}"
        ours = [lp.logprob for lp in out.logprobs]
        assert max(abs(a - b) for a, b in zip(ours, lps)) < 1e-4


def test_mixed_adapters_match_peft(tiny, ref):
    prompts, adapters = workload(seed=1)
    engine = make_engine(tiny)
    outs = engine.generate(prompts, adapters, GREEDY)
    check_against_reference(ref, prompts, adapters, outs)
    # the adapters matter: each adapter's output differs from the base model's on the same prompt
    base = engine.generate(prompts, None, GREEDY)
    assert sum(o.token_ids != b.token_ids for o, b, a in zip(outs, base, adapters) if a) >= 5


def test_forced_preemption_matches_peft(tiny, ref):
    prompts, adapters = workload(seed=2)
    engine = make_engine(tiny, block_size=4, num_blocks=24)   # 96 slots of KV for ~8 x 30 tokens
    outs = engine.generate(prompts, adapters, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    check_against_reference(ref, prompts, adapters, outs)
    assert engine.kv.allocator.num_free == 24                 # every block came back


def test_chunked_prefill_matches_peft(tiny, ref):
    prompts, adapters = workload(seed=3)
    prompts[0] = prompts[0] + list(range(10, 90))             # a long prompt, split into many chunks
    engine = make_engine(tiny, max_num_batched_tokens=7)
    steps_with_decode_and_prefill = 0
    ids = [engine.add_request(None, p, a, GREEDY) for p, a in zip(prompts, adapters)]
    outs = {i: [] for i in ids}
    lps = {i: [] for i in ids}
    while engine.has_unfinished():
        running = engine.scheduler.running
        if any(s.num_tokens - s.num_computed > 1 for s in running) and any(s.output_ids for s in running):
            steps_with_decode_and_prefill += 1
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
            lps[o.request_id] += o.logprobs
    assert steps_with_decode_and_prefill > 0                  # decodes ran while a prompt was still prefilling
    for i, p, a in zip(ids, prompts, adapters):
        tokens, ref_lps = ref.greedy(p, a, N_NEW)
        assert outs[i] == tokens
        assert max(abs(x.logprob - y) for x, y in zip(lps[i], ref_lps)) < 1e-4


def test_requests_arriving_mid_decode_match_peft(tiny, ref):
    prompts, adapters = workload(seed=4, n=9)
    engine = make_engine(tiny)
    ids, outs, lps = {}, {}, {}
    for k in range(3):
        ids[engine.add_request(None, prompts[k], adapters[k], GREEDY)] = k
    step = 0
    while engine.has_unfinished() or len(ids) < len(prompts):
        if step in (2, 5, 9) and len(ids) < len(prompts):     # join while others decode
            for k in range(len(ids), len(ids) + 2):
                ids[engine.add_request(None, prompts[k], adapters[k], GREEDY)] = k
        for o in engine.step():
            outs.setdefault(ids[o.request_id], []).extend(o.new_token_ids)
            lps.setdefault(ids[o.request_id], []).extend(lp.logprob for lp in o.logprobs)
        step += 1
    for k in range(len(prompts)):
        tokens, ref_lps = ref.greedy(prompts[k], adapters[k], N_NEW)
        assert outs[k] == tokens
        assert max(abs(a - b) for a, b in zip(lps[k], ref_lps)) < 1e-4


def test_lora_slots_bound_distinct_adapters_per_step(tiny, ref):
    prompts, adapters = workload(seed=5, n=10)
    engine = make_engine(tiny, max_loras=2)
    for p, a in zip(prompts, adapters):
        engine.add_request(None, p, a, GREEDY)
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert len({s.adapter for s in engine.scheduler.running if s.adapter}) <= 2
        assert engine.buffers.lora.num_segments <= 2
    assert engine.slots.loads > 2                             # adapters were swapped through the 2 slots
    assert len(outs) == len(prompts)


def test_prompt_logprobs_match_peft(tiny, ref):
    prompts, adapters = workload(seed=6, n=5)
    engine = make_engine(tiny, max_num_batched_tokens=16)    # chunked: scoring spans several steps
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
    outs = engine.generate(prompts, adapters, params)
    for p, a, out in zip(prompts, adapters, outs):
        lp = ref.logprobs(p, a)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        for j in range(1, len(p)):
            rec = out.prompt_logprobs[j]
            assert rec.token_id == p[j]
            assert abs(rec.logprob - float(lp[j - 1, p[j]])) < 1e-4
            assert set(rec.top) == set(lp[j - 1].topk(2).indices.tolist())


def test_qwen2_flavour_bias_and_tied_embeddings_match_peft(tiny_qwen):
    model_dir, adapters = tiny_qwen
    ref = HFReference(model_dir, adapters)
    engine = make_engine(tiny_qwen)
    prompts = [[5, 9, 33, 70], [100, 3, 4], [7] * 12]
    names = ["ad0", None, "ad1"]
    outs = engine.generate(prompts, names, GREEDY)
    check_against_reference(ref, prompts, names, outs)


@pytest.mark.parametrize("spec", [
    TinySpec(model_type="mistral"),
    TinySpec(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}),
], ids=["mistral", "llama3-rope"])
def test_model_flavours_match_peft(tmp_path, spec):
    model_dir, adapters = make_tiny_setup(tmp_path, num_adapters=2, spec=spec, seed=3)
    ref = HFReference(model_dir, adapters)
    engine = make_engine((model_dir, adapters))
    prompts = [list(range(5, 75)), [100, 3, 4], [7] * 12]   # 70 tokens: past llama3's original context of 64
    names = ["ad0", None, "ad1"]
    check_against_reference(ref, prompts, names, engine.generate(prompts, names, GREEDY))
