"""Abort, fairness between adapters, and resources coming back."""
from __future__ import annotations

from tests.test_engine_vs_hf import make_engine
from worker.engine import SamplingParams

P = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def test_abort_mid_decode_frees_everything_and_spares_the_others(tiny):
    engine = make_engine(tiny, max_loras=2)
    expected = engine.generate([[5, 6, 7], [8, 9]], ["ad0", "ad1"], P)
    free_blocks = engine.kv.allocator.num_free
    engine.add_request("keep", [5, 6, 7], "ad0", P)
    engine.add_request("drop", [8, 9], "ad1", P)
    got = {"keep": [], "drop": []}
    for _ in range(3):
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    # (async scheduling: the 4th step is on its way, with a row for "drop")
    assert engine._in_flight is not None
    assert engine.abort("drop") and not engine.abort("drop")
    assert not engine.slots.in_use("ad1")
    engine.remove_adapter("ad1")                        # nothing running uses it, though the step in flight does
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    final = [o for o in outs if o.request_id == "drop"]
    assert len(final) == 1 and final[0].finished and final[0].finish_reason == "abort" and not final[0].new_token_ids
    got["keep"] += [t for o in outs if o.request_id == "keep" for t in o.new_token_ids]
    assert got["keep"] == expected[0].token_ids
    assert got["drop"] == expected[1].token_ids[:3]
    assert engine.kv.allocator.num_free == free_blocks and not engine.seqs
    engine.add_adapter("ad1", tiny[1]["ad1"])
    assert engine.generate([[8, 9]], "ad1", P)[0].token_ids == expected[1].token_ids


def test_busy_adapter_cannot_starve_another(tiny):
    """One slot; requests for ad0 keep arriving; the ad1 request still gets in within a bounded wait."""
    engine = make_engine(tiny, max_loras=1, starvation_steps=4)
    engine.add_request("first", [1, 2, 3], "ad0", P)
    engine.step()
    engine.add_request("starving", [4, 5, 6], "ad1", P)
    started_at = None
    for step in range(200):
        engine.add_request(f"busy{step}", [1, 2, 3], "ad0", SamplingParams(max_tokens=12, temperature=0.0,
                                                                              ignore_eos=True))
        for o in engine.step():
            if o.request_id == "starving" and started_at is None:
                started_at = step
        if started_at is not None:
            break
        assert len({s.adapter for s in engine.scheduler.running}) <= 1
    assert started_at is not None and started_at < 30


def test_removing_and_replacing_adapters(tiny):
    engine = make_engine(tiny)
    before = engine.generate([[3, 4, 5]], "ad2", P)[0].token_ids
    engine.add_adapter("ad2", tiny[1]["ad3"])          # a new version under the same name
    after = engine.generate([[3, 4, 5]], "ad2", P)[0].token_ids
    assert after == engine.generate([[3, 4, 5]], "ad3", P)[0].token_ids != before
    engine.remove_adapter("ad2")
    assert "ad2" not in engine.adapters and "ad2" not in engine.slots.slot_of


def test_ensemble_is_merged_once_and_follows_new_versions(tiny):
    engine = make_engine(tiny, max_lora_rank=64)
    members = [("ad0", 0.7), ("ad1", 0.3)]
    name = engine.ensemble(members, "linear")
    assert engine.ensemble(members, "linear") == name             # cached, not merged again
    assert engine.adapters.wait(name).rank == 8 + 4                  # linear = concatenated ranks
    out = engine.generate([[4, 5, 6]], name, P)[0].token_ids
    assert out != engine.generate([[4, 5, 6]], "ad0", P)[0].token_ids
    assert engine.ensemble(members, "ties", density=0.5) != name
    engine.add_adapter("ad1", tiny[1]["ad2"])                     # a new version of a member
    assert name not in engine.adapters                            # its stale merge is dropped
    assert engine.ensemble(members, "linear") != name
