"""The whole engine on the Triton path (SGMV, paged attention, fused ops), run by the interpreter on CPU,
still equals transformers + PEFT. Small on purpose: the interpreter is slow."""
from __future__ import annotations

import pytest
import torch

from tests.hf_reference import HFReference
from worker.engine import Engine, SamplingParams


# separate SGMV kernels; then one adapter beside a base request, so that every step takes the fused path
# (LoRA inside the norm, rotary and SiLU-mul kernels; ad0 targets all 7 projections)
@pytest.mark.parametrize("fused_lora_tokens, names", [(0, ["ad0", None, "ad3"]), (64, ["ad0", None, "ad0"])])
def test_triton_path_matches_peft(tiny, fused_lora_tokens, names):
    model_dir, adapters = tiny
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(model_dir, device=device, lora_backend="triton", attention_backend="triton", cuda_graphs=False,
                    max_num_batched_tokens=12, fused_lora_tokens=fused_lora_tokens,
                    num_blocks=64)  # chunked prefill too
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    prompts = [[5, 9, 33, 70, 12, 8, 100, 4, 19], [100, 3, 4], [7, 8, 9, 10, 11]]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=1, ignore_eos=True)
    outs = engine.generate(prompts, names, params)
    ref = HFReference(model_dir, adapters)
    for p, a, out in zip(prompts, names, outs):
        tokens, lps = ref.greedy(p, a, 4)
        assert out.token_ids == tokens
        assert max(abs(x.logprob - y) for x, y in zip(out.logprobs, lps)) < 1e-4


def test_fused_path_follows_the_step_adapter(tiny):
    """One-adapter steps, one adapter after another: each time the A rows under the base weights must be
    the step's adapter's (a stale copy would still produce text, just the previous adapter's)."""
    model_dir, adapters = tiny
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(model_dir, device=device, lora_backend="triton", attention_backend="triton", cuda_graphs=False,
                    max_num_batched_tokens=16, fused_lora_tokens=64, num_blocks=64)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    ref = HFReference(model_dir, adapters)
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=1, ignore_eos=True)
    prompt = [5, 9, 33, 70, 12]
    for name in ("ad0", "ad3", "ad0"):
        out = engine.generate([prompt], [name], params)[0]
        tokens, lps = ref.greedy(prompt, name, 3)
        assert out.token_ids == tokens
        assert max(abs(x.logprob - y) for x, y in zip(out.logprobs, lps)) < 1e-4
