"""Ensembles: our merges equal PEFT's add_weighted_adapter, and the engine serves a merged adapter like PEFT does."""
from __future__ import annotations

import pytest
import torch

from tests.hf_reference import HFReference
from worker.engine import Engine, SamplingParams
from worker.errors import AdapterError
from worker.lora.merge import ensemble_key, merge_adapters
from worker.lora.peft_format import load_peft_adapter
from worker.model.config import ModelConfig
from worker.tiny import make_adapter

N_NEW = 10
GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0.0, logprobs=1, ignore_eos=True)


def load(model_dir, adapters: dict, names) -> list:
    cfg = ModelConfig.from_dir(model_dir)
    return [load_peft_adapter(n, adapters[n], cfg, max_rank=64) for n in names]


def delta(module) -> torch.Tensor:
    return module.scaling * module.b.double() @ module.a.double()


def peft_deltas(model, name: str) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, module): delta weight} of adapter ``name`` inside a PeftModel."""
    out = {}
    for path, mod in model.named_modules():
        if hasattr(mod, "lora_A") and name in mod.lora_A:
            parts = path.split(".")
            i = parts.index("layers")
            out[(int(parts[i + 1]), parts[-1])] = mod.get_delta_weight(name).detach().double()
    return out


def test_linear_merge_serves_like_peft_cat(tiny):
    model_dir, adapters = tiny
    names, weights = ["ad0", "ad1", "ad3"], [0.6, -0.4, 0.8]     # ranks 8/4/32, ad3 rsLoRA, targets differ
    parts = load(model_dir, adapters, names)
    merged = merge_adapters(parts, weights, "linear", name="ens")
    # exact: every module's update is the weighted sum of the parts' updates (missing modules count as zero)
    assert merged.modules[(0, "q_proj")].rank == 8 + 4 and merged.modules[(0, "k_proj")].rank == 8 + 32
    for key, m in merged.modules.items():
        want = sum(w * delta(p.modules[key]) for p, w in zip(parts, weights) if key in p.modules)
        torch.testing.assert_close(delta(m), want, atol=1e-6, rtol=1e-6)

    engine = Engine(model_dir)
    engine.add_lora(merged)
    ref = HFReference(model_dir, {n: adapters[n] for n in names})
    ref.model.add_weighted_adapter(names, weights, "ens", combination_type="cat")
    prompts = [[5, 17, 42, 99, 7], [200, 3, 3, 150, 61, 77, 12, 300, 8]]
    outs = engine.generate(prompts, ["ens", "ens"], GREEDY)
    for prompt, out in zip(prompts, outs):
        tokens, lps = ref.greedy(prompt, "ens", N_NEW)
        assert out.token_ids == tokens
        assert max(abs(o.logprob - lp) for o, lp in zip(out.logprobs, lps)) < 1e-4
    # the ensemble is really different from its first member
    alone = engine.generate(prompts, None, GREEDY)
    assert any(o.token_ids != a.token_ids for o, a in zip(outs, alone))


@pytest.fixture(scope="module")
def equal_rank_adapters(tiny, tmp_path_factory):
    """Three rank-8 adapters (PEFT's ties/dare need equal ranks) with overlapping targets, one rsLoRA."""
    model_dir, _ = tiny
    root = tmp_path_factory.mktemp("equal_rank")
    specs = {"e0": (16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
             "e1": (8, ["q_proj", "v_proj", "gate_proj", "down_proj"], False),
             "e2": (8, ["q_proj", "up_proj"], True)}
    return {n: make_adapter(model_dir, root / n, 8, alpha, targets, rslora, seed=100 + i)
            for i, (n, (alpha, targets, rslora)) in enumerate(specs.items())}


@pytest.fixture(scope="module")
def peft_model(tiny, equal_rank_adapters):
    model_dir, _ = tiny
    return HFReference(model_dir, equal_rank_adapters).model


@pytest.mark.parametrize("strategy,method", [("ties", "total"), ("ties", "frequency"), ("dare_linear", "total"),
                                             ("dare_ties", "total"), ("dare_ties", "frequency")])
def test_task_arithmetic_merges_match_peft(strategy, method, tiny, equal_rank_adapters, peft_model, monkeypatch):
    model_dir, _ = tiny
    names, weights, density, seed = ["e0", "e1", "e2"], [0.7, -0.5, 1.2], 0.5, 1234
    ours = merge_adapters(load(model_dir, equal_rank_adapters, names), weights, strategy, density=density,
                          majority_sign_method=method, seed=seed)
    # PEFT draws DARE's masks from the global RNG, after it has initialised the new adapter's layers:
    # seed it when the merging starts, so both draw the same stream.
    from peft.tuners.lora.model import LoraModel
    original, started = LoraModel._generalized_task_arithmetic_weighted_adapter, []

    def seeded(self, *args, **kwargs):
        if not started:
            started.append(True)
            torch.manual_seed(seed)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(LoraModel, "_generalized_task_arithmetic_weighted_adapter", seeded)
    name = f"m-{strategy}-{method}"
    peft_model.add_weighted_adapter(names, weights, name, combination_type=strategy, density=density,
                                    majority_sign_method=method)
    theirs = peft_deltas(peft_model, name)
    assert set(theirs) == set(ours.modules)
    for key, d in theirs.items():
        torch.testing.assert_close(delta(ours.modules[key]), d, atol=1e-6, rtol=1e-5, msg=f"{strategy} {key}")


def test_merges_are_deterministic_under_a_seed(tiny):
    model_dir, adapters = tiny
    parts = load(model_dir, adapters, ["ad0", "ad1", "ad2"])      # unequal ranks: zero-padded to 16
    rng_before = torch.get_rng_state()

    def run(strategy, seed):
        m = merge_adapters(parts, [0.5, 0.3, 0.2], strategy, density=0.4, seed=seed)
        return {k: (v.a, v.b) for k, v in m.modules.items()}

    def same(x, y):
        return x.keys() == y.keys() and all(torch.equal(x[k][0], y[k][0]) and torch.equal(x[k][1], y[k][1])
                                            for k in x)
    for strategy in ("dare_linear", "dare_ties"):
        assert same(run(strategy, 7), run(strategy, 7))
        assert not same(run(strategy, 7), run(strategy, 8))
    assert same(run("ties", 7), run("ties", 8))                   # TIES has no randomness
    assert run("ties", 0)[(0, "o_proj")][0].shape[0] == 16             # ad0 rank 8 padded to ad2 rank 16
    assert torch.equal(torch.get_rng_state(), rng_before)         # the global RNG is left alone


def test_merge_refuses_bad_requests(tiny):
    model_dir, adapters = tiny
    parts = load(model_dir, adapters, ["ad0", "ad3"])
    for kwargs, message in [(dict(strategy="svd"), "unknown merge strategy"),
                            (dict(strategy="ties"), "needs a density"),
                            (dict(strategy="dare_linear", density=0.0), "needs a density"),
                            (dict(weights=[1.0]), "2 adapters but 1 weights"),
                            (dict(weights=[1.0, float("nan")]), "finite"),
                            (dict(max_rank=32), "rank 40, over the server's limit 32")]:
        args = {"weights": [0.5, 0.5], "strategy": "linear", **kwargs}
        with pytest.raises(AdapterError, match=message):
            merge_adapters(parts, **args)


def test_ensemble_key_is_stable_and_canonical():
    ids = [("acme/sql", 3), ("chat", 1)]
    key = ensemble_key(ids, [0.5, 0.5], "ties", {"density": 0.5, "majority_sign_method": "total", "seed": 1})
    assert len(key) == 64 and key == ensemble_key(
        [["acme/sql", "3"], ("chat", 1)], [0.5, 0.5], "ties", {"seed": 2, "majority_sign_method": "total",
                                                               "density": 0.5})   # seed: no effect on TIES
    assert ensemble_key(ids, [1, 2], "linear", {"density": 0.3}) == ensemble_key(ids, [1.0, 2.0], "linear")
    others = {ensemble_key([("acme/sql", 4), ("chat", 1)], [0.5, 0.5], "linear"),
              ensemble_key(list(reversed(ids)), [0.5, 0.5], "linear"),
              ensemble_key(ids, [0.5, 0.6], "linear"),
              ensemble_key(ids, [0.5, 0.5], "linear"),
              ensemble_key(ids, [0.5, 0.5], "dare_linear", {"density": 0.5, "seed": 1}),
              ensemble_key(ids, [0.5, 0.5], "dare_linear", {"density": 0.5, "seed": 2})}
    assert len(others) == 6 and key not in others
