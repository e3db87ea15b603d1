"""Bad input gets a clear error and the engine keeps serving everyone else."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_engine_vs_hf import make_engine
from worker.engine import SamplingParams
from worker.errors import AdapterError, InvalidRequestError, PromptTooLongError, UnknownAdapterError

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture
def busy_engine(tiny):
    """An engine with requests in flight, to show that errors do not disturb them."""
    engine = make_engine(tiny, max_model_len=256)
    expected = engine.generate(["the quick", "SELECT"], ["ad0", None], GREEDY)
    for k, (p, a) in enumerate([("the quick", "ad0"), ("SELECT", None)]):
        engine.add_request(f"ok{k}", p, a, GREEDY)
    engine.step()
    return engine, {f"ok{k}": e.token_ids for k, e in enumerate(expected)}


def finish(engine) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    return got


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("bad, error, words", [
    (dict(prompt="hi", adapter="nope"), UnknownAdapterError, "unknown adapter 'nope'"),
    (dict(prompt=[1] * 300), PromptTooLongError, "300 tokens"),
    (dict(prompt=[]), InvalidRequestError, "empty"),
    (dict(prompt=[1, 99999]), InvalidRequestError, "out of range"),
    (dict(prompt=None), InvalidRequestError, "string or a list"),
])
def test_bad_requests_are_refused_and_others_continue(busy_engine, bad, error, words):
    engine, expected = busy_engine
    with pytest.raises(error, match=words):
        engine.add_request("bad", bad["prompt"], bad.get("adapter"), GREEDY)
    first_steps = {k: v[:1] for k, v in expected.items()}   # one token came out of the fixture's first step
    got = finish(engine)
    assert {k: first_steps[k] + got.get(k, []) for k in expected} == expected
    assert "bad" not in got


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(max_tokens=1.5), "max_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(seed=-1), "seed"), (dict(stop=[""]), "stop"), (dict(logprobs=21), "logprobs"),
    (dict(stop_token_ids=[-4]), "stop_token_ids"),
])
def test_bad_sampling_values(kwargs, words):
    with pytest.raises(InvalidRequestError, match=words):
        SamplingParams(**kwargs)


def test_generate_validates_everything_before_queueing(tiny):
    engine = make_engine(tiny)
    with pytest.raises(UnknownAdapterError):
        engine.generate(["a", "b"], ["ad0", "missing"], GREEDY)
    assert not engine.has_unfinished() and not engine.seqs
    with pytest.raises(InvalidRequestError, match="already in flight"):
        engine.add_request("x", "a", None, GREEDY)
        engine.add_request("x", "b", None, GREEDY)


def test_pickle_adapter_is_refused_without_unpickling(busy_engine, tiny, tmp_path):
    engine, expected = busy_engine
    bad = copy_adapter(tiny[1]["ad0"], tmp_path / "pickled")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    (bad / "adapter_model.safetensors").unlink()
    # a pickle that would run code if it were ever loaded
    (bad / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/olora-pwned'\ntR.")
    with pytest.raises(AdapterError, match="pickled"):
        engine.add_adapter("pickled", bad)
    assert "pickled" not in engine.adapters
    del tensors
    assert len(finish(engine)) == 2


def test_adapter_with_wrong_shapes_is_refused(busy_engine, tiny, tmp_path):
    engine, _ = busy_engine
    bad = copy_adapter(tiny[1]["ad1"], tmp_path / "wrong_hidden")
    path = bad / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.randn(tensors[key].shape[0], tensors[key].shape[1] + 8)
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match="do not match the base model"):
        engine.add_adapter("wrong", bad)
    assert "wrong" not in engine.adapters
    assert len(finish(engine)) == 2


@pytest.mark.parametrize("mutate, words", [
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 5), "not a readable safetensors"),
    (lambda d: _edit_config(d, use_dora=True), "DoRA"),
    (lambda d: _edit_tensors(d, lambda t: {k.replace("v_proj", "w_proj"): v for k, v in t.items()}), "w_proj"),
    (lambda d: _edit_tensors(d, lambda t: {k: v * math.nan for k, v in t.items()}), "NaN"),
    (lambda d: _edit_tensors(d, lambda t: {k: v for k, v in t.items() if "lora_B" not in k}), "not its pair"),
])
def test_broken_adapters_are_refused(tiny, tmp_path, mutate, words):
    engine = make_engine(tiny)
    bad = copy_adapter(tiny[1]["ad1"], tmp_path / "broken")
    mutate(bad)
    with pytest.raises(AdapterError, match=words):
        engine.add_adapter("broken", bad)
    assert "broken" not in engine.adapters


def test_rank_over_the_limit_is_refused(tiny):
    model_dir, adapters = tiny
    from worker.engine import Engine
    engine = Engine(model_dir, max_lora_rank=16)
    with pytest.raises(AdapterError, match="rank 32 is over the server's limit 16"):
        engine.add_adapter("ad3", adapters["ad3"])


def _edit_config(d, **changes):
    conf = json.loads((d / "adapter_config.json").read_text())
    conf.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(conf))


def _edit_tensors(d, fn):
    path = d / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in fn(load_file(str(path))).items()}, str(path))
