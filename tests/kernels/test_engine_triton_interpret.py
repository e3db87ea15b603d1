"""The whole engine on the Triton path (SGMV, paged attention, fused ops), run by the interpreter on CPU,
still equals transformers + PEFT. Small on purpose: the interpreter is slow."""
from __future__ import annotations

import pytest
import torch

from tests.hf_reference import HFReference
from worker.engine import Engine, SamplingParams


# separate SGMV kernels; then every step on the fused path (LoRA inside the GEMMs and the norm, rotary and
# SiLU-mul kernels; ad0 targets all 7 projections): one adapter beside a base request, then three adapters
@pytest.mark.parametrize("fused_lora_tokens, names", [(0, ["ad0", None, "ad3"]), (64, ["ad0", None, "ad0"]),
                                                      (64, ["ad0", "ad1", None, "ad3"])])
def test_triton_path_matches_peft(tiny, fused_lora_tokens, names):
    model_dir, adapters = tiny
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(model_dir, device=device, lora_backend="triton", attention_backend="triton", cuda_graphs=False,
                    max_num_batched_tokens=12, fused_lora_tokens=fused_lora_tokens,
                    num_blocks=64)  # chunked prefill too
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    prompts = [[5, 9, 33, 70, 12, 8, 100, 4, 19], [100, 3, 4], [7, 8, 9, 10, 11], [2, 60, 61]][: len(names)]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=1, ignore_eos=True)
    outs = engine.generate(prompts, names, params)
    ref = HFReference(model_dir, adapters)
    for p, a, out in zip(prompts, names, outs):
        tokens, lps = ref.greedy(p, a, 4)
        assert out.token_ids == tokens
        assert max(abs(x.logprob - y) for x, y in zip(out.logprobs, lps)) < 1e-4


def test_fused_path_restages_the_step_adapters(tiny):
    """Fused steps one after another, with one adapter, then several: each time the A rows under the base
    weights must be the step's adapters', at positions inside the rows its GEMMs read (a stale or misplaced
    copy would still produce text, just another adapter's): ad0 replaces ad3 at position 0, ad3 joins it at
    position 1, then runs alone, where it must move back below the one-position bucket."""
    model_dir, adapters = tiny
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(model_dir, device=device, lora_backend="triton", attention_backend="triton", cuda_graphs=False,
                    max_num_batched_tokens=16, fused_lora_tokens=64, num_blocks=64)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    ref = HFReference(model_dir, adapters)
    params = SamplingParams(max_tokens=2, temperature=0.0, logprobs=1, ignore_eos=True)
    prompt = [5, 9, 33, 70, 12]
    for names in (["ad3"], ["ad0"], ["ad0", "ad3"], ["ad3"], ["ad2", "ad1", "ad0"]):
        outs = engine.generate([prompt] * len(names), names, params)
        for name, out in zip(names, outs):
            tokens, lps = ref.greedy(prompt, name, 2)
            assert out.token_ids == tokens, names
            assert max(abs(x.logprob - y) for x, y in zip(out.logprobs, lps)) < 1e-4, names


def test_fused_path_restages_a_reloaded_slot(tiny):
    """With one LoRA slot, each adapter evicts the last one into the same slot: the step's slots, bucket and
    positions repeat, so only the slot's new contents (its generation) tell the staging to copy again."""
    model_dir, adapters = tiny
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(model_dir, device=device, lora_backend="triton", attention_backend="triton", cuda_graphs=False,
                    max_num_batched_tokens=16, fused_lora_tokens=64, num_blocks=64, max_loras=1)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    ref = HFReference(model_dir, adapters)
    params = SamplingParams(max_tokens=2, temperature=0.0, logprobs=1, ignore_eos=True)
    prompt = [5, 9, 33, 70, 12]
    for name in ("ad0", "ad3", "ad0"):
        out, = engine.generate([prompt], [name], params)
        tokens, lps = ref.greedy(prompt, name, 2)
        assert out.token_ids == tokens, name
        assert max(abs(x.logprob - y) for x, y in zip(out.logprobs, lps)) < 1e-4, name


def test_steps_past_64_tokens(tiny):
    """Prefill steps of more than 64 tokens: one adapter rides in the step's kernels, in blocks of rows; two
    take the SGMV segment-block kernels."""
    from kernels.sgmv import apply_path
    model_dir, adapters = tiny
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(model_dir, device=device, lora_backend="triton", attention_backend="triton", cuda_graphs=False,
                    max_num_batched_tokens=160, fused_lora_tokens=256, num_blocks=64)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    ref = HFReference(model_dir, adapters)
    params = SamplingParams(max_tokens=2, temperature=0.0, logprobs=1, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    long, a, b = (torch.randint(3, 100, (n,), generator=gen).tolist() for n in (90, 45, 40))
    assert engine.model.fuses(90, 1) and not engine.model.fuses(85, 2)
    assert apply_path(85, 2, engine.config.max_lora_rank) == "seg_blocks"
    for prompts, names in (([long], ["ad0"]), ([a, b], ["ad0", "ad3"])):
        outs = engine.generate(prompts, names, params)
        for prompt, name, out in zip(prompts, names, outs):
            tokens, lps = ref.greedy(prompt, name, 2)
            assert out.token_ids == tokens, names
            assert max(abs(x.logprob - y) for x, y in zip(out.logprobs, lps)) < 1e-4, names
