"""End-to-end decode throughput on random Llama-3-8B-shaped weights (nothing downloaded).

    python bench/engine.py [--batches 32 256] [--workloads identical ...] [--new-tokens 128] [--rounds 5]
                           [--hf 32:distinct ...] [--fused-lora-tokens N] [--out bench/results] [--smoke]
                           [--trace steps.json]

128-token prompts, 128 new tokens (greedy, EOS ignored), rank-16 adapters on all
7 projections. Workloads follow Punica's definitions: Identical (one adapter),
Uniform (ceil(sqrt(batch)) adapters, requests spread evenly), Skewed (Zipf
alpha=1.5 over `batch` adapters), Distinct (one adapter per request).
Systems, in one run: our engine with LoRA, our engine base-only, transformers +
PEFT (`generate(adapter_names=...)`, fewer new tokens: it is slow), and the
roofline (weights + KV + adapter bytes a decode step must read, over the copy
bandwidth measured in the same run).
Each batch runs `--rounds` rounds of every workload, each round between two base-only runs, and a workload's
LoRA overhead is the median over rounds of its ratio to the mean of its round's two base steps: the base step
drifts ~5% between runs (clocks, host), so a single base measurement taken first would skew every overhead.
The GPU overhead is the same ratio of the decode graphs' replay times (CUDA events around each replay): the
host's half of a step (scheduling, staging, sampling: ~3 ms of a 13 ms batch-256 step) switches between two
speeds for seconds at a time on the lent machine, the GPU's half does not (bench/NOTES-kernels.md v19).
``--trace`` writes every decode step's (wall-clock start, ms, host prepare ms, GPU replay ms).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # `python bench/X.py` puts bench/ first on the path, where queue.py would shadow the standard
    # library's queue module for every import below: put the repository root there instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import gc
import json
import math
import random
import statistics
import tempfile
import time

import torch


from bench.common import copy_bandwidth_TBps, table, write_result  # noqa: E402
from worker.engine import Engine, SamplingParams  # noqa: E402
from worker.lora.peft_format import LoRAAdapter, LoRAModule  # noqa: E402

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}
TINY = {**LLAMA3_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "bos_token_id": 1, "eos_token_id": 2}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16


def workload(name: str, batch: int, rng: random.Random) -> list[int]:
    if name == "identical":
        return [0] * batch
    if name == "distinct":
        return list(range(batch))
    if name == "uniform":
        n = math.ceil(math.sqrt(batch))
        return [i % n for i in range(batch)]
    if name == "skewed":
        weights = [1 / (k + 1) ** 1.5 for k in range(batch)]
        return rng.choices(range(batch), weights=weights, k=batch)
    raise ValueError(name)


def random_adapters(engine: Engine, count: int, unique: int = 8) -> list[str]:
    """``count`` adapters; their tensors repeat every ``unique`` (values do not change the cost: each slot is its own copy)."""
    cfg, dev, dtype = engine.model_config, engine.device, engine.config.dtype
    shapes = cfg.module_shapes()
    pool = []
    for u in range(unique):
        g = torch.Generator(device=dev).manual_seed(u)
        mods = {}
        for layer in range(cfg.num_layers):
            for m in MODULES:
                fan_in, fan_out = shapes[m]
                a = (torch.randn(RANK, fan_in, device=dev, generator=g) / fan_in ** 0.5).to(dtype)
                b = (torch.randn(fan_out, RANK, device=dev, generator=g) * 0.01).to(dtype)
                mods[(layer, m)] = LoRAModule(a=a, b=b, scaling=2.0)
        pool.append(mods)
    names = [f"a{i}" for i in range(count)]
    for i, name in enumerate(names):
        engine.add_lora(LoRAAdapter(name=name, path="(random)", modules=pool[i % unique]))
    return names


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_replays(engine: Engine) -> list:
    """From now on, every decode-graph step of ``engine`` appends (host ms of its ``prepare``, CUDA events around
    its replay) to the list returned: a step's time split into the host's half and the GPU's."""
    graphs, log = engine.graphs, []

    def run(*args, before_replay=None):
        t0 = time.perf_counter()
        graph, logits = graphs.prepare(*args)
        if before_replay is not None:
            before_replay()
        host_ms = (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        graphs.replays += 1
        log.append((host_ms, start, end))
        return logits

    graphs.run = run
    return log


def run_engine(engine: Engine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int,
               trace: dict | None = None, replays: list | None = None) -> dict:
    """One batch to completion: throughput, the median decode step, time to first token. ``trace``, if given,
    gets every decode step's (wall-clock start, ms) and, with ``replays`` (``time_replays``), its host
    ``prepare`` ms and the GPU ms of its graph replay: for lining steps up with a GPU clock log."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    sync(engine.device)
    t0 = time.perf_counter()
    ids = [engine.add_request(None, p, a, params) for p, a in zip(prompts, adapters)]
    first: dict[str, float] = {}
    decode_steps: list[float] = []
    steps: list[list] = []
    generated = 0
    while engine.has_unfinished():
        s0 = time.perf_counter()
        # (a sequence whose next step is in flight, async_scheduling, has all its tokens computed)
        pure_decode = all(s.num_tokens - s.num_computed <= 1 for s in engine.scheduler.running) and \
            not engine.scheduler.waiting
        outs = engine.step()                      # ends in a host read of one step's sampled tokens
        dt = time.perf_counter() - s0
        split = []
        if replays:                               # the replay this step launched (it may still be running)
            split = list(replays.pop())
            replays.clear()
        if pure_decode and len(engine.scheduler.running) + sum(o.finished for o in outs) == len(ids):
            decode_steps.append(dt)
            steps.append([round(time.time() - dt, 4), round(dt * 1e3, 3), *split])
        for o in outs:
            generated += len(o.new_token_ids)
            if o.request_id not in first and o.new_token_ids:
                first[o.request_id] = time.perf_counter() - t0
    total = time.perf_counter() - t0
    sync(engine.device)
    gpu_steps: list[float] = []
    for entry in steps:
        if len(entry) > 2:                        # (host ms of prepare, replay's start and end events)
            entry[2:] = [round(entry[2], 3), round(entry[3].elapsed_time(entry[4]), 3)]
            gpu_steps.append(entry[3])
    if trace is not None:
        trace["steps"] = [tuple(e) for e in steps]
    decode_steps.sort()
    ttft = sorted(first.values())
    step = decode_steps[len(decode_steps) // 2]
    return {"tok_per_s": generated / total, "decode_tok_per_s": len(ids) / step, "step_ms_p50": step * 1e3,
            "ttft_ms_p50": ttft[len(ttft) // 2] * 1e3, "ttft_ms_p99": ttft[int(len(ttft) * 0.99)] * 1e3,
            "total_s": total, "generated": generated,
            **({"gpu_step_ms_p50": statistics.median(gpu_steps)} if gpu_steps else {})}


def median_run(runs: list[dict], batch: int) -> dict:
    """Per-key median of ``run_engine`` results over rounds, with the per-round steps kept alongside."""
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "generated"}
    med["decode_tok_per_s"] = batch / (med["step_ms_p50"] / 1e3)  # consistent with the reported step
    return {**med, "generated": runs[0]["generated"],             # the same every round: EOS is ignored
            "step_ms_rounds": [round(r["step_ms_p50"], 3) for r in runs]}


def bench_batch(engine: Engine, names: list[str], prompts: list[list[int]], assigns: dict[str, list[int]],
                rounds: int, new_tokens: int, copy_Bps: float, trace: list[dict] | None = None) -> list[dict]:
    """Rows for one batch: base, then per workload our engine and its roofline; medians over ``rounds`` (base:
    over its rounds + 1 runs). ``trace`` gets every run's decode steps (``run_engine``)."""
    batch = len(prompts)
    replays = time_replays(engine) if engine.graphs is not None else None

    def run(workload: str, r: int, adapters: list[str | None]) -> dict:
        entry = {"batch": batch, "workload": workload, "round": r}
        out = run_engine(engine, prompts, adapters, new_tokens, entry if trace is not None else None, replays)
        if trace is not None:
            trace.append(entry)
        return out

    ctx = len(prompts[0]) + new_tokens / 2
    base_runs: list[dict] = []
    lora_runs: dict[str, list[dict]] = {w: [] for w in assigns}
    overheads: dict[str, list[float]] = {w: [] for w in assigns}
    gpu_overheads: dict[str, list[float]] = {w: [] for w in assigns}
    base_runs.append(run("base", 0, [None] * batch))
    for r in range(rounds):
        shown = [{"workload": "base", **base_runs[-1]}]
        for w, assign in assigns.items():
            lora_runs[w].append(run(w, r + 1, [names[i] for i in assign]))
            shown.append({"workload": w, "distinct": len(set(assign)), **lora_runs[w][-1]})
        base_runs.append(run("base", r + 1, [None] * batch))
        shown.append({"workload": "base", **base_runs[-1]})
        base_step = (base_runs[-2]["step_ms_p50"] + base_runs[-1]["step_ms_p50"]) / 2   # the round's brackets
        for row in shown[1:-1]:
            overheads[row["workload"]].append(100 * (row["step_ms_p50"] / base_step - 1))
            row["lora_overhead_pct"] = overheads[row["workload"]][-1]
            if replays is not None:
                base_gpu = (base_runs[-2]["gpu_step_ms_p50"] + base_runs[-1]["gpu_step_ms_p50"]) / 2
                gpu_overheads[row["workload"]].append(100 * (row["gpu_step_ms_p50"] / base_gpu - 1))
                row["gpu_overhead_pct"] = gpu_overheads[row["workload"]][-1]
        print(f"batch {batch}, round {r + 1}/{rounds}", flush=True)
        print(table(shown, ["workload", "distinct", "decode_tok_per_s", "step_ms_p50", "gpu_step_ms_p50",
                            "ttft_ms_p50", "lora_overhead_pct", "gpu_overhead_pct"]), flush=True)
    rows = [{"system": "openlora-base", "workload": "base", "batch": batch, **median_run(base_runs, batch)}]
    for w, assign in assigns.items():
        floor = roofline(engine, batch, len(set(assign)), ctx, copy_Bps)
        rows.append({"system": "openlora", "workload": w, "batch": batch, "distinct": len(set(assign)),
                     **median_run(lora_runs[w], batch), "lora_overhead_pct": statistics.median(overheads[w]),
                     "lora_overhead_pct_rounds": [round(o, 3) for o in overheads[w]],
                     **({"gpu_overhead_pct": statistics.median(gpu_overheads[w]),
                         "gpu_overhead_pct_rounds": [round(o, 3) for o in gpu_overheads[w]]}
                        if replays is not None else {}),
                     "byte_floor_overhead_pct": floor["lora_byte_overhead_pct"]})
        rows.append({"system": "roofline", "workload": w, "batch": batch, "distinct": len(set(assign)), **floor})
    return rows


def roofline(engine: Engine, batch: int, distinct: int, ctx: float, copy_Bps: float) -> dict:
    cfg = engine.model_config
    weight_bytes = engine.model.w.nbytes()
    kv_bytes = batch * ctx * KV_BYTES_PER_TOKEN(cfg)
    lora_bytes = distinct * adapter_bytes(cfg)
    step = (weight_bytes + kv_bytes + lora_bytes) / copy_Bps
    base_step = (weight_bytes + kv_bytes) / copy_Bps
    return {"decode_tok_per_s": batch / step, "step_ms_p50": step * 1e3, "base_step_ms": base_step * 1e3,
            "lora_byte_overhead_pct": 100 * lora_bytes / (weight_bytes + kv_bytes)}


def KV_BYTES_PER_TOKEN(cfg) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2


def adapter_bytes(cfg) -> int:
    return sum(RANK * (i + o) * 2 for i, o in cfg.module_shapes().values()) * cfg.num_layers


def bench_hf(shape: dict, device: str, dtype, batch: int, names: list[str], assign: list[int], prompts,
             new_tokens: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"})
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    lcfg = LoraConfig(r=RANK, lora_alpha=32, target_modules=list(MODULES))
    used = sorted(set(assign))
    model = get_peft_model(model, lcfg, adapter_name=names[used[0]])
    for i in used[1:]:
        model.add_adapter(names[i], lcfg)
    model.to(dtype).eval()
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  adapter_names=[names[i] for i in assign], pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2,
                                   "adapter_names": kwargs["adapter_names"][:2]})
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        sync(device)
    total = time.perf_counter() - t0
    generated = (out.shape[1] - ids.shape[1]) * batch
    del model
    free_memory(device)
    return {"tok_per_s": generated / total, "decode_tok_per_s": generated / total, "total_s": total,
            "generated": generated}


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--workloads", nargs="+", default=["identical", "uniform", "skewed", "distinct"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hf-new-tokens", type=int, default=16)
    ap.add_argument("--hf", nargs="*", default=["32:distinct", "32:identical"], help="batch:workload pairs for HF+PEFT")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--fused-lora-tokens", type=int, default=None,
                    help="steps up to this many tokens fold LoRA into the fused ops (0: separate SGMV kernels)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of every workload per batch, each between base-only runs; results are medians "
                         "(default 5, smoke 1)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks that the bench runs")
    ap.add_argument("--trace", default=None, help="write every run's decode steps (wall-clock start, ms) to this "
                    "JSON file, to line them up with a clock log (nvidia-smi --query-gpu=timestamp,clocks.sm,...)")
    ap.add_argument("--untuned-gemms", action="store_true",
                    help="the GEMMs on F.linear's own algorithms (EngineConfig.tuned_gemms=False), for an A/B")
    ap.add_argument("--sync-scheduling", action="store_true",
                    help="each step waits for its tokens before the next is launched (EngineConfig."
                         "async_scheduling=False), for an A/B")
    args = ap.parse_args()
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 5
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.smoke:
        args.batches, args.new_tokens, args.hf_new_tokens, args.prompt_len = [4], 4, 2, 8
        args.hf = ["4:distinct"]
    shape, device, dtype = (TINY, "cpu", torch.float32) if args.smoke else (LLAMA3_8B, "cuda", torch.bfloat16)
    rng = random.Random(0)
    copy = 1.0 if args.smoke else copy_bandwidth_TBps()
    print(f"copy bandwidth {copy:.2f} TB/s", flush=True)
    max_batch = max(args.batches)
    max_len = args.prompt_len + args.new_tokens + 16
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(shape))
        t0 = time.perf_counter()
        engine = Engine(d, random_init=True, device=device, dtype=dtype, max_loras=max_batch,
                        max_lora_rank=RANK, max_num_seqs=max_batch, max_num_batched_tokens=8192,
                        max_model_len=max_len, num_blocks=max_batch * (-(-max_len // 16)) + 64,
                        tuned_gemms=not args.untuned_gemms, async_scheduling=not args.sync_scheduling,
                        **({} if args.fused_lora_tokens is None else {"fused_lora_tokens": args.fused_lora_tokens}))
        fused_lora_tokens = engine.model.fused_lora_tokens
        print(f"engine up in {time.perf_counter() - t0:.1f} s (weights {engine.model.w.nbytes() / 1e9:.2f} GB, "
              f"{engine.kv.allocator.num_blocks} KV blocks, graphs: {engine.graphs and engine.graphs.buckets})",
              flush=True)
        names = random_adapters(engine, max_batch)
        rows = []
        trace: list[dict] | None = [] if args.trace else None
        vocab = engine.model_config.vocab_size
        warm = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(4)]
        run_engine(engine, warm, [names[0], None, names[1], names[2]], 4)
        for batch in args.batches:
            prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
            # drawn once, in the same rng order as before rounds existed, so every round runs the same requests
            assigns = {w: workload(w, batch, rng) for w in args.workloads}
            rows += bench_batch(engine, names, prompts, assigns, args.rounds, args.new_tokens, copy * 1e12, trace)
            if trace is not None:                   # after each batch: a run cut short keeps what it measured
                Path(args.trace).write_text(json.dumps(trace))
        del engine
        free_memory(device)
    for spec in args.hf:
        batch, w = spec.split(":")
        batch = int(batch)
        assign = workload(w, batch, rng)
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
        res = bench_hf(shape, device, dtype, batch, [f"a{i}" for i in range(batch)], assign, prompts,
                       args.hf_new_tokens)
        rows.append({"system": "hf-peft", "workload": w, "batch": batch, "distinct": len(set(assign)),
                     "new_tokens": args.hf_new_tokens, **res})
        print(f"hf-peft {w} batch {batch}: {res['tok_per_s']:.1f} tok/s", flush=True)
    if args.smoke:
        print(table(rows, ["system", "workload", "batch", "decode_tok_per_s", "tok_per_s"]))
        return
    path = write_result("engine", rows, args.out, copy_TBps=round(copy, 3), model="llama-3-8b-shaped (random)",
                        dtype="bfloat16", prompt_len=args.prompt_len, new_tokens=args.new_tokens, rank=RANK,
                        fused_lora_tokens=fused_lora_tokens, rounds=args.rounds, tuned_gemms=not args.untuned_gemms,
                        async_scheduling=not args.sync_scheduling)
    print(table(rows, ["system", "workload", "batch", "distinct", "decode_tok_per_s", "tok_per_s", "step_ms_p50",
                       "gpu_step_ms_p50", "ttft_ms_p50", "lora_overhead_pct", "gpu_overhead_pct",
                       "byte_floor_overhead_pct"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
