"""Shared fixtures: a tiny random Llama with adapters, made once per test session (nothing downloaded)."""
from __future__ import annotations

import pytest
import torch

from worker.tiny import TinySpec, make_tiny_setup


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model_dir, {adapter name: path}) — 4 adapters of different ranks and target modules."""
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"), num_adapters=4)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """A Qwen2-flavoured tiny model (q/k/v bias, tied embeddings) with 2 adapters."""
    spec = TinySpec(model_type="qwen2", tie_word_embeddings=True, num_kv_heads=1)
    return make_tiny_setup(tmp_path_factory.mktemp("tiny_qwen"), num_adapters=2, spec=spec, seed=1)


@pytest.fixture(scope="session")
def ref(tiny):
    """transformers + PEFT on the tiny model and its adapters: the numerical reference."""
    from tests.hf_reference import HFReference
    model_dir, adapters = tiny
    return HFReference(model_dir, adapters)


def make_engine(tiny, **options):
    """Our engine on the tiny model with every adapter of ``tiny`` added."""
    from worker.engine import Engine
    model_dir, adapters = tiny
    engine = Engine(model_dir, **options)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine
