"""The pinned arena's chunk bookkeeping (page-locking itself needs CUDA: the GPU tests cover it)."""
from __future__ import annotations

import gc

import pytest
import torch

from worker.lora.pinned_arena import PinnedArena


@pytest.fixture
def arena():
    """The same allocator over ordinary memory (page-locking needs CUDA)."""
    return PinnedArena(4096, pin=False)


def test_chunks_come_back_when_their_handle_dies(arena):
    a = arena.take(1000, torch.float32)
    b = arena.take(1000, torch.bfloat16)
    assert a.tensor.numel() == 250 and b.tensor.numel() == 500 and a.tensor.dtype == torch.float32
    view = b.tensor[10:20]
    gc.collect()
    assert arena.free_bytes() == 4096 - 2 * 1024  # nothing returns while the handles live
    del b
    assert arena.free_bytes() == 4096 - 1024
    del a, view
    assert arena.free_bytes() == 4096            # both returned and merged
    assert arena.take(4096, torch.uint8) is not None


def test_a_packed_adapter_holds_its_chunk(tiny):
    from tests.test_engine_vs_hf import make_engine
    from worker.lora.peft_format import load_peft_adapter, pin_packed
    engine = make_engine(tiny)
    arena = PinnedArena(1 << 20, pin=False)
    adapter = load_peft_adapter("x", tiny[1]["ad0"], engine.model_config, 64)
    pin_packed(adapter, pin=False, arena=arena)
    used = arena.nbytes - arena.free_bytes()
    assert used >= adapter.nbytes()
    a0 = next(iter(adapter.modules.values())).a
    assert a0.data_ptr() >= arena._buf.data_ptr()    # the tensors live in the arena
    del adapter, a0
    gc.collect()
    assert arena.free_bytes() == arena.nbytes


def test_full_arena_says_so(arena):
    keep = arena.take(4000, torch.uint8)
    assert arena.take(200, torch.uint8) is None
    del keep
