"""The whole engine on the Triton path (SGMV, paged attention, fused ops), run by the interpreter on CPU,
still equals transformers + PEFT. Small on purpose: the interpreter is slow."""
from __future__ import annotations

import pytest
import torch

from tests.hf_reference import HFReference
from worker.engine import Engine, SamplingParams


def triton_engine(tiny, **options) -> Engine:
    """The engine on the Triton kernels, without graphs, with the tiny adapters added."""
    model_dir, adapters = tiny
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(model_dir, device=device, lora_backend="triton", attention_backend="triton", cuda_graphs=False,
                    **{"num_blocks": 64, **options})
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def generate_and_check(engine, ref, prompts, names, new_tokens):
    """Greedy tokens equal transformers + PEFT's, log-probs within 1e-4."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, logprobs=1, ignore_eos=True)
    outs = engine.generate(prompts, names, params)
    for prompt, name, out in zip(prompts, names, outs):
        tokens, lps = ref.greedy(prompt, name, new_tokens)
        assert out.token_ids == tokens, names
        assert max(abs(x.logprob - y) for x, y in zip(out.logprobs, lps)) < 1e-4, names


# separate SGMV kernels; then every step on the fused path (LoRA inside the GEMMs and the norm, rotary and
# SiLU-mul kernels; ad0 targets all 7 projections): one adapter beside a base request, then three adapters
# (down's shrink in its GEMM, and, forced, in SiLU-mul)
@pytest.mark.parametrize("fused_lora_tokens, names, down_gemm", [
    (0, ["ad0", None, "ad3"], True), (64, ["ad0", None, "ad0"], True), (64, ["ad0", "ad1", None, "ad3"], True),
    (64, ["ad0", "ad1", None, "ad3"], False)])
def test_triton_path_matches_peft(tiny, monkeypatch, fused_lora_tokens, names, down_gemm):
    if not down_gemm:
        monkeypatch.setattr("worker.model.llama.DOWN_GEMM_MAX_POSITIONS", 0)
    engine = triton_engine(tiny, max_num_batched_tokens=12, fused_lora_tokens=fused_lora_tokens)  # chunked prefill too
    assert engine.model.down_in_gemm(12, 4) == down_gemm
    prompts = [[5, 9, 33, 70, 12, 8, 100, 4, 19], [100, 3, 4], [7, 8, 9, 10, 11], [2, 60, 61]][: len(names)]
    generate_and_check(engine, HFReference(*tiny), prompts, names, 4)


def test_fused_path_restages_the_step_adapters(tiny):
    """Fused steps one after another, with one adapter, then several: each time the A rows under the base
    weights must be the step's adapters', at positions inside the rows its GEMMs read (a stale or misplaced
    copy would still produce text, just another adapter's): ad0 replaces ad3 at position 0, ad3 joins it at
    position 1, then swaps rows with it (the same adapters at the same positions: only the rows' positions that
    the norm reads move), then runs alone, where it must move back below the one-position bucket."""
    engine = triton_engine(tiny, max_num_batched_tokens=16, fused_lora_tokens=64)
    ref = HFReference(*tiny)
    prompt = [5, 9, 33, 70, 12]
    for names in (["ad3"], ["ad0"], ["ad0", "ad3"], ["ad3", "ad0"], ["ad3"], ["ad2", "ad1", "ad0"]):
        generate_and_check(engine, ref, [prompt] * len(names), names, 2)


def test_fused_path_restages_a_reloaded_slot(tiny):
    """With one LoRA slot, each adapter evicts the last one into the same slot: the step's slots, bucket and
    positions repeat, so only the slot's new contents (its generation) tell the staging to copy again."""
    engine = triton_engine(tiny, max_num_batched_tokens=16, fused_lora_tokens=64, max_loras=1)
    ref = HFReference(*tiny)
    for name in ("ad0", "ad3", "ad0"):
        generate_and_check(engine, ref, [[5, 9, 33, 70, 12]], [name], 2)


def test_steps_past_64_tokens(tiny):
    """Prefill steps of more than 64 tokens ride in the step's kernels: one adapter in blocks of rows, two in
    the step's segment blocks; with fused LoRA up to 64 tokens only, two take the SGMV segment-block kernels."""
    from kernels.sgmv import apply_path
    ref = HFReference(*tiny)
    gen = torch.Generator().manual_seed(0)
    long, a, b = (torch.randint(3, 100, (n,), generator=gen).tolist() for n in (90, 45, 40))
    engine = triton_engine(tiny, max_num_batched_tokens=160, fused_lora_tokens=256)
    assert engine.model.fuses(90, 1) and engine.model.fuses(85, 2)
    for prompts, names in (([long], ["ad0"]), ([a, b], ["ad0", "ad3"])):
        generate_and_check(engine, ref, prompts, names, 2)
    engine = triton_engine(tiny, max_num_batched_tokens=160, fused_lora_tokens=64)
    assert not engine.model.fuses(85, 2) and apply_path(85, 2, engine.config.max_lora_rank) == "seg_blocks"
    generate_and_check(engine, ref, [a, b], ["ad0", "ad3"], 2)


def test_down_shrinks_where_it_measured_cheaper(tiny):
    """Down's shrink: in its GEMM past 32 tokens and up to 8 tail positions, else in SiLU-mul (the GEMM reads
    its extra rows padded to 128 up to MANY_TOKENS tokens, to 256 past; both inside the tails)."""
    model = triton_engine(tiny, max_num_batched_tokens=256, fused_lora_tokens=256, max_loras=64).model
    assert [model.down_in_gemm(32, k) for k in (1, 2, 6, 8, 12, 32)] == [True, True, True, True, False, False]
    assert all(model.down_in_gemm(t, k) for t in (33, 64, 256) for k in (1, 16, 64))
    down = model.tails["down"]
    assert down.block == 64                     # one slice of the engine's max rank
    assert [down.rows(k, 128) for k in (1, 2, 3, 5)] == [128, 128, 256, 384]
    assert [down.rows(k) for k in (1, 2, 3, 5)] == [256, 256, 256, 512] and down.rows(64, 128) <= down.extra
    with pytest.raises(ValueError, match="does not divide"):
        down.rows(5, 96)


def test_tail_buckets_step_between_powers_of_two(tiny):
    """A fused step's GEMMs read the A rows of its adapters rounded up to the next tail bucket (powers of two
    and the steps between them), never more positions than the step has tokens or the tails hold."""
    from worker.model.llama import TAIL_BUCKETS
    model = triton_engine(tiny, max_num_batched_tokens=256, fused_lora_tokens=256, max_loras=64).model
    assert model.tail_positions == 64
    assert [model.tail_bucket(k, 256) for k in (1, 3, 5, 7, 10, 13, 47, 64)] == [1, 4, 6, 8, 12, 16, 48, 64]
    assert model.tail_bucket(5, 5) == 5 and model.tail_bucket(30, 20) == 20
    assert model.tail_buckets(256) == list(TAIL_BUCKETS) and model.tail_buckets(10) == [1, 2, 4, 6, 8, 10]
    small = triton_engine(tiny, max_num_batched_tokens=64, fused_lora_tokens=64, max_loras=5).model
    assert small.tail_positions == 5 and small.tail_buckets(64) == [1, 2, 4, 5]
