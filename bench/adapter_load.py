"""Adapter loads on the GPU: cold load (store -> host -> GPU slot) of rank-16 all-projection Llama-3-8B
adapters (~84 MB each, PEFT files on local disk), and decode step time while loads run.

    python bench/adapter_load.py [--adapters 6] [--out bench/results]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # `python bench/X.py` puts bench/ first on the path, where queue.py would shadow the standard
    # library's queue module for every import below: put the repository root there instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import statistics
import subprocess
import tempfile
import time

import torch
from safetensors.torch import save_file


from bench.common import copy_bandwidth_TBps, table, write_result  # noqa: E402
from bench.engine import LLAMA3_8B, MODULES, RANK  # noqa: E402
from worker.engine import Engine, SamplingParams  # noqa: E402
from worker.lora.peft_format import pin_packed  # noqa: E402


def write_adapter(cfg, out: Path, seed: int) -> int:
    """A random rank-16 PEFT adapter on all 7 projections, bf16; returns its weight bytes."""
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": list(MODULES), "bias": "none"}))
    g = torch.Generator(device="cuda").manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for m in MODULES:
            fan_in, fan_out = cfg.module_shapes()[m]
            group = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{group}.{m}"
            tensors[key + ".lora_A.weight"] = torch.randn(RANK, fan_in, device="cuda", generator=g).bfloat16().cpu()
            tensors[key + ".lora_B.weight"] = (torch.randn(fan_out, RANK, device="cuda", generator=g) * 0.01
                                               ).bfloat16().cpu()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return sum(t.numel() * 2 for t in tensors.values())


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def decode_steps(engine: Engine, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=6)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    copy = copy_bandwidth_TBps()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "config.json").write_text(json.dumps(LLAMA3_8B))
        engine = Engine(root, random_init=True, device="cuda", dtype=torch.bfloat16, max_loras=16, max_lora_rank=RANK,
                        max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=1024, num_blocks=64 * 64 + 64)
        cfg = engine.model_config
        paths = []
        for i in range(2 * args.adapters):
            nbytes = write_adapter(cfg, root / f"a{i}", seed=i)
            paths.append(root / f"a{i}")
        print(f"wrote {len(paths)} adapters of {nbytes / 1e6:.1f} MB", flush=True)

        # 1. cold load, phase by phase: disk -> validated host copy (pinned), host -> GPU slot
        cold = drop_page_cache()
        for i in range(args.adapters):
            t0 = time.perf_counter()
            adapter = pin_packed(engine._load_adapter(f"a{i}", str(paths[i])), arena=engine.adapters.arena)
            t1 = time.perf_counter()
            engine.add_lora(adapter)
            assert engine.slots.start_load(adapter)
            engine.slots._pending[adapter.name][0].synchronize()
            t2 = time.perf_counter()
            rows.append({"system": "openlora", "phase": "cold load", "adapter": i, "MB": round(nbytes / 1e6, 1),
                         "disk_to_host_ms": round((t1 - t0) * 1e3, 1), "host_to_gpu_ms": round((t2 - t1) * 1e3, 2),
                         "total_ms": round((t2 - t0) * 1e3, 1), "page_cache_dropped": cold,
                         "h2d_GBps": round(nbytes / (t2 - t1) / 1e9, 1)})
            print(rows[-1], flush=True)

        # 2. decode step time with no loads, then while adapters load in the background
        params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        for k in range(32):
            engine.add_request(f"r{k}", [(7 * k + j) % 1000 for j in range(128)], f"a{k % args.adapters}", params)
        while engine.scheduler.waiting or any(s.num_tokens - s.num_computed > 1 for s in engine.scheduler.running):
            engine.step()
        idle = decode_steps(engine, 60)
        drop_page_cache()
        for i in range(args.adapters, 2 * args.adapters):
            engine.register_adapter(f"a{i}", paths[i])
            engine.add_request(f"new{i}", [1, 2, 3, 4], f"a{i}", SamplingParams(max_tokens=4, temperature=0.0,
                                                                                ignore_eos=True))
        during, t0 = [], time.perf_counter()
        while any(s.request_id.startswith("new") for s in engine.scheduler.waiting):
            during += decode_steps(engine, 1)
        load_window = time.perf_counter() - t0
        for label, times in (("no loads", idle), ("while loading", during)):
            rows.append({"system": "openlora", "phase": f"decode batch 32, {label}", "steps": len(times),
                         "step_ms_p50": round(statistics.median(times), 2),
                         "step_ms_max": round(max(times), 2)})
        rows[-1]["loads"] = args.adapters
        rows[-1]["load_window_s"] = round(load_window, 2)
        print(table(rows[-2:], ["phase", "steps", "step_ms_p50", "step_ms_max", "loads", "load_window_s"]))
    path = write_result("adapter-load", rows, args.out, copy_TBps=round(copy, 3), model="llama-3-8b-shaped",
                        rank=RANK, modules=list(MODULES))
    print(table([r for r in rows if r["phase"] == "cold load"],
                ["adapter", "MB", "disk_to_host_ms", "host_to_gpu_ms", "total_ms", "h2d_GBps", "page_cache_dropped"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
