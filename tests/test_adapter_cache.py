"""The tiered adapter cache in the engine: background loads, failures, churn through a few slots, pinning."""
from __future__ import annotations

import random
import shutil
import threading
import time

import pytest
import torch

from tests.test_engine_vs_hf import make_engine
from worker.engine import Engine, SamplingParams

P = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def slow_loads(engine: Engine, names: set[str], seconds: float) -> tuple[threading.Event, threading.Event]:
    """Make loading ``names`` take ``seconds`` more (a slow store); returns events set when such a load
    starts and when it has returned."""
    started, done = threading.Event(), threading.Event()
    load = engine.adapters._load

    def slow(name, path):
        if name not in names:
            return load(name, path)
        started.set()
        time.sleep(seconds)
        try:
            return load(name, path)
        finally:
            done.set()
    engine.adapters._load = slow
    return started, done


def test_steps_continue_while_a_slow_store_delays_one_load(tiny):
    model_dir, adapters = tiny
    engine = make_engine(tiny)
    expected = engine.generate([[5, 6, 7]], "ad2", P)[0].token_ids
    engine.register_adapter("slow", adapters["ad2"])
    started, done = slow_loads(engine, {"slow"}, seconds=2.0)
    engine.add_request("waits", [5, 6, 7], "slow", P)
    for k in range(6):
        engine.add_request(f"other{k}", [9, 10 + k], ["ad0", None][k % 2],
                           SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    got, tokens_during_load = {}, 0
    while engine.has_unfinished():
        outs = engine.step()
        in_flight = started.is_set() and not done.is_set()
        for o in outs:
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            tokens_during_load += in_flight and o.request_id != "waits" and len(o.new_token_ids)
    assert tokens_during_load >= 6 * 3        # every other request decoded while the load was in flight
    assert got["waits"] == expected
    assert all(len(got[f"other{k}"]) == 40 for k in range(6))


def test_a_lazily_registered_broken_adapter_fails_only_its_requests(tiny, tmp_path):
    engine = make_engine(tiny)
    broken = tmp_path / "broken"
    shutil.copytree(tiny[1]["ad0"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    engine.register_adapter("broken", broken)             # accepted: nothing is read yet
    for k in range(2):
        engine.add_request(f"bad{k}", [1, 2, 3], "broken", P)
    engine.add_request("good", [1, 2, 3], "ad1", P)
    outs = {}
    deadline = time.time() + 30
    while engine.has_unfinished() and time.time() < deadline:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    for k in range(2):
        final = outs[f"bad{k}"][-1]
        assert final.finished and final.finish_reason == "error" and "safetensors" in final.error
    assert outs["good"][-1].finish_reason == "length"
    assert not engine.seqs


def test_churn_of_200_adapters_through_8_slots(tiny):
    model_dir, adapters = tiny
    files = list(adapters.values())
    sizes = [make_engine(tiny).adapters.wait(f"ad{k}").nbytes() for k in range(len(files))]
    budget = 3 * max(sizes)                               # the host tier holds about three adapters
    engine = make_engine(tiny, max_loras=8, max_num_seqs=16, host_cache_bytes=budget)
    truth = {f"ad{k}": engine.generate([[3, 1, 4, 1, 5]], f"ad{k}", P)[0].token_ids for k in range(len(files))}
    for i in range(200):
        engine.register_adapter(f"churn{i}", files[i % len(files)])
    engine.pin_adapter("churn7")
    rng = random.Random(0)
    order = [f"churn{i}" for i in rng.sample(range(200), 200)] + ["churn7"] * 5
    pending = list(order)
    pinned_slot, got, owner = None, {}, {}
    while pending or engine.has_unfinished():
        for _ in range(3):                                # requests keep arriving
            if pending:
                name = pending.pop()
                owner[engine.add_request(None, [3, 1, 4, 1, 5], name, P)] = name
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        running = engine.scheduler.running
        assert len({s.adapter for s in running}) <= 8
        # LRU by bytes; only loads awaited by a request may stand over the budget, at most max_inflight
        assert engine.adapters.nbytes() <= budget + engine.adapters.max_inflight * max(sizes)
        for s in running:                                 # an adapter in use is never evicted or moved
            assert engine.slots.slot_of[s.adapter] == s.slot
        if "churn7" in engine.slots.slot_of:
            pinned_slot = pinned_slot if pinned_slot is not None else engine.slots.slot_of["churn7"]
            assert engine.slots.slot_of["churn7"] == pinned_slot   # pinned: never evicted once loaded
    assert len(got) == len(order)
    for rid, tokens in got.items():
        i = int(owner[rid].removeprefix("churn"))
        assert tokens == truth[f"ad{i % len(files)}"]
    assert engine.slots.loads >= 200 - 8
    assert engine.adapters.misses >= 200                  # every churned adapter came from disk at least once


def test_unknown_name_still_refused_at_once(tiny):
    engine = make_engine(tiny)
    with pytest.raises(KeyError):
        engine.add_request(None, [1, 2], "never-registered", P)


def test_packed_host_copy_keeps_values_and_makes_slot_copies_contiguous(tiny):
    from worker.lora.peft_format import pin_packed
    engine = make_engine(tiny)
    adapter = engine.adapters.wait("ad0")
    before = {k: (m.a.clone(), m.b.clone()) for k, m in adapter.modules.items()}
    pin_packed(adapter, pin=False)                    # the same packing as on CUDA, without page-locking
    storages = {m.a.untyped_storage().data_ptr() for m in adapter.modules.values()}
    assert len(storages) == 1                         # one buffer for the whole adapter
    for k, m in adapter.modules.items():
        assert m.a.is_contiguous() and m.b.T.is_contiguous()
        assert torch.equal(m.a, before[k][0]) and torch.equal(m.b, before[k][1])


def test_wait_loads_even_when_the_background_loads_are_all_taken(tiny):
    engine = make_engine(tiny)
    engine.adapters.max_inflight = 0                 # every background slot busy: get() starts nothing
    engine.register_adapter("late", tiny[1]["ad1"])
    assert engine.adapters.get("late") is None and engine.adapters.entry("late").loading is None
    assert engine.adapters.wait("late").rank == 4


def test_a_slot_holds_zeros_past_each_rank_after_a_larger_adapter(tiny):
    """The fused norm reads a slot's B and h past the rank (kernels/fused_lora.py ``norm_lora``), so a slot that
    took rank-32 ad3 and then rank-4 ad1 (q and v only) must hold zeros past ad1's ranks and in the modules it
    lacks, not ad3's weights."""
    engine = make_engine(tiny, max_loras=1)
    for name in ("ad3", "ad1"):
        engine.generate([[5, 9, 33]], [name], P)
    slots = engine.slots
    slot = slots.slot_of["ad1"]
    for fams in slots.layers:
        for f in fams.values():
            for i, r in enumerate(f.ranks_cpu[slot].tolist()):
                lo, hi = f.out_offsets[i], f.out_offsets[i + 1]
                assert not f.lora_a[slot, i, r:].any() and not f.lora_b[slot, r:, lo:hi].any()
                assert r in (0, 4) and (r == 0 or f.lora_b[slot, :r, lo:hi].any())
