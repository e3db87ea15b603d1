"""Kernel benchmark: SGMV LoRA and paged attention at Llama-3-8B shapes, against measured bandwidth.

    python bench/kernels.py            # on a CUDA machine; writes bench/results/ (or $OUT) JSON

Times are medians of triton's do_bench, which flushes L2 before every call (a
LoRA layer's weights are cold in a real step: the base weights of the other
layers pass through L2 in between). The Triton ops are captured in a CUDA graph
and the graph is replayed, as the engine's decode step does. Floors: the fewest
bytes the op must move, over the measured device-to-device copy bandwidth.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # `python bench/X.py` puts bench/ first on the path, where queue.py would shadow the standard
    # library's queue module for every import below: put the repository root there instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import datetime
import json
import os
import subprocess


import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels.lora_meta import LoRAMeta  # noqa: E402
from kernels.lora_torch import lora_expand_ref, lora_shrink_ref  # noqa: E402
from kernels.paged_attention import paged_attention  # noqa: E402
from kernels.attention_torch import paged_attention_ref  # noqa: E402
from kernels.sgmv import lora_apply, lora_expand, lora_shrink  # noqa: E402
from kernels.sgmv_decode import MAX_TOKENS as MAX_DECODE_TOKENS  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
FAMILIES = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
            "down": (14336, [4096])}
# vLLM Triton lora_shrink + lora_expand on this H100, bf16, rank 16, us: (tokens, distinct) -> family -> us
VLLM = {(32, 1): {"qkv": 24.0, "gate_up": 33.3, "down": 15.2}, (32, 8): {"qkv": 48.2, "gate_up": 87.8, "down": 18.6},
        (32, 32): {"qkv": 133.0, "gate_up": 272.6, "down": 33.9},
        (256, 1): {"qkv": 49.0, "gate_up": 98.4, "down": 51.3}, (256, 8): {"qkv": 61.9, "gate_up": 129.8, "down": 55.0},
        (256, 32): {"qkv": 126.0, "gate_up": 307.8, "down": 66.0}}
SLOT_CAPACITY = 128


def median_us(fn) -> float:
    return do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3


def graphed(fn):
    """Capture fn in a CUDA graph (checks that it is capturable); return a replay function."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def kernel_names(fn, width: int = 48) -> str:
    """The CUDA kernels and memsets of one call of fn (after a warm-up call), names cut to ``width``."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    return ", ".join(sorted(n[:width] for n in names if "Memcpy" not in n))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (TB/s)."""
    n = 1 << 30
    a = torch.randn(n // 4, device=DEV)
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=20, rep=200, return_mode="median") * 1e-3
    return 2 * n / t / 1e12


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


# ---- SGMV ---------------------------------------------------------------------------------------------------

def sgmv_weights(family, rank):
    in_f, widths = FAMILIES[family]
    n = len(widths)
    a = (torch.randn(SLOT_CAPACITY, n, rank, in_f, device=DEV) * in_f ** -0.5).to(BF16)
    b = (torch.randn(SLOT_CAPACITY, rank, sum(widths), device=DEV) * rank ** -0.5).to(BF16)
    return a, b


def sgmv_case(family, rank, a, b, tokens, distinct, copy_tbps, time_ref):
    in_f, widths = FAMILIES[family]
    n = len(widths)
    offs = tuple([0] + torch.tensor(widths).cumsum(0).tolist())
    ranks = torch.full((SLOT_CAPACITY, n), rank, dtype=torch.int32, device=DEV)
    scal = torch.full((SLOT_CAPACITY, n), 2.0, device=DEV)
    slots = torch.randperm(SLOT_CAPACITY)[:distinct].tolist()
    token_slots = [slots[t * distinct // tokens] for t in range(tokens)]      # spread evenly
    meta = LoRAMeta.allocate(256, SLOT_CAPACITY, DEV).fill(token_slots)
    x = torch.randn(tokens, in_f, device=DEV).to(BF16)
    y = torch.randn(tokens, offs[-1], device=DEV).to(BF16)
    h = torch.empty(n, tokens, rank, device=DEV)
    # correctness against the reference, once
    y_ref = lora_expand_ref(lora_shrink_ref(x, a, ranks.cpu(), meta), b, ranks.cpu(), scal.cpu(), offs, meta, y.clone())
    y_out = lora_apply(x, y.clone(), a, b, ranks, scal, offs, meta)
    err = rel_err(y_out - y, y_ref - y)
    weight_bytes = distinct * rank * (n * in_f + offs[-1]) * 2
    act_bytes = tokens * in_f * 2 + 2 * tokens * offs[-1] * 2 + 2 * n * tokens * rank * 4
    floor_us = (weight_bytes + act_bytes) / (copy_tbps * 1e12) * 1e6
    # "openlora" is what the engine calls (lora_apply: the segment-major kernels up to MAX_DECODE_TOKENS);
    # "openlora-blockwalk" the block-walking shrink + expand, where the two differ
    runs = {"openlora": lambda: lora_apply(x, y, a, b, ranks, scal, offs, meta)}
    if tokens <= MAX_DECODE_TOKENS:
        runs["openlora-blockwalk"] = lambda: lora_expand(lora_shrink(x, a, ranks, meta, out=h), b, ranks, scal,
                                                         offs, meta, y)
    rows = []
    for name, fn in runs.items():
        us = median_us(graphed(fn))
        rows.append(dict(system=name, op="sgmv", family=family,
                         tokens=tokens, distinct=distinct, rank=rank, us=round(us, 2),
                         GBps=round((weight_bytes + act_bytes) / us / 1e3, 1), floor_us=round(floor_us, 2),
                         x_floor=round(us / floor_us, 2), rel_err=float(f"{err:.2e}"),
                         vllm_us=VLLM.get((tokens, distinct), {}).get(family) if rank == 16 else None))
    if time_ref:
        ref_us = median_us(lambda: lora_expand_ref(lora_shrink_ref(x, a, ranks.cpu(), meta), b, ranks.cpu(),
                                                   scal.cpu(), offs, meta, y))
        rows.append(dict(system="torch-ref", op="sgmv", family=family, tokens=tokens, distinct=distinct, rank=rank,
                         us=round(ref_us, 1)))
    return rows


def bench_sgmv(copy_tbps):
    rows = []
    for family in FAMILIES:
        for rank in (8, 16, 64):
            a, b = sgmv_weights(family, rank)
            for tokens in (1, 8, 32, 128, 256):
                for distinct in (1, 8, 32, 128):
                    if distinct > tokens:
                        continue
                    time_ref = rank == 16 and tokens in (1, 32, 256)
                    case = sgmv_case(family, rank, a, b, tokens, distinct, copy_tbps, time_ref)
                    rows += case
                    print(case[0], flush=True)
            del a, b
    return rows


# ---- attention ----------------------------------------------------------------------------------------------

H, KVH, D, PAGE = 32, 8, 128, 16


def bench_decode(copy_tbps):
    rows = []
    mem_free = torch.cuda.mem_get_info()[0]
    max_tokens = min(256 * 8192, int(mem_free * 0.6) // (2 * KVH * D * 2))
    num_blocks = max_tokens // PAGE
    k_cache = torch.randn(num_blocks, PAGE, KVH, D, device=DEV).to(BF16)
    v_cache = torch.randn_like(k_cache)
    for ctx in (512, 1024, 2048, 4096, 8192):
        for batch in (1, 8, 32, 128, 256):
            if batch * ctx > max_tokens:
                continue
            nb = ctx // PAGE
            bt = torch.randperm(num_blocks, device=DEV)[: batch * nb].view(batch, nb).to(torch.int32)
            ctx_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            cu = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
            q = torch.randn(batch, H, D, device=DEV).to(BF16)
            out = torch.empty_like(q)
            err = None
            if batch <= 8:
                ref = paged_attention_ref(q, k_cache, v_cache, bt, ctx_lens, cu, D ** -0.5)
                err = rel_err(paged_attention(q, k_cache, v_cache, bt, ctx_lens, cu, D ** -0.5, max_seqlen_q=1), ref)
            kv_bytes = batch * ctx * KVH * D * 2 * 2
            variants = [("default", None)]
            if ctx == 4096 and batch == 8:
                variants += [("part256", 256)]
            for name, part in variants:
                run = graphed(lambda: paged_attention(q, k_cache, v_cache, bt, ctx_lens, cu, D ** -0.5,
                                                      max_seqlen_q=1, out=out, partition_size=part))
                us = median_us(run)
                rows.append(dict(system="openlora" if name == "default" else f"openlora-{name}", op="decode_attn",
                                 ctx=ctx, batch=batch, us=round(us, 2), GBps=round(kv_bytes / us / 1e3, 1),
                                 pct_copy_bw=round(100 * kv_bytes / us / 1e6 / copy_tbps, 1),
                                 rel_err=None if err is None else float(f"{err:.2e}")))
            print(rows[-len(variants)], flush=True)
    del k_cache, v_cache
    return rows


PREFILL_VARIANTS = {"default": dict(rows=64, block_n=64, num_warps=4, num_stages=2),
                    "r128n128w8s3": dict(rows=128, block_n=128, num_warps=8, num_stages=3)}


def bench_prefill():
    from kernels import paged_attention as pa_mod
    rows = []
    for prefix, variant in [(p, v) for p in (0, 1024) for v in PREFILL_VARIANTS]:
        pa_mod.PREFILL_CONFIG.update(PREFILL_VARIANTS[variant])
        batch, n = 8, 512
        ctx = prefix + n
        nb = triton.cdiv(ctx, PAGE)
        k_cache = torch.randn(batch * nb + 8, PAGE, KVH, D, device=DEV).to(BF16)
        v_cache = torch.randn_like(k_cache)
        bt = torch.randperm(batch * nb + 8, device=DEV)[: batch * nb].view(batch, nb).to(torch.int32)
        ctx_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        cu = torch.arange(0, batch * n + 1, n, dtype=torch.int32, device=DEV)
        q = torch.randn(batch * n, H, D, device=DEV).to(BF16)
        ref = paged_attention_ref(q, k_cache, v_cache, bt, ctx_lens, cu, D ** -0.5)
        err = rel_err(paged_attention(q, k_cache, v_cache, bt, ctx_lens, cu, D ** -0.5, max_seqlen_q=n), ref)
        us = median_us(lambda: paged_attention(q, k_cache, v_cache, bt, ctx_lens, cu, D ** -0.5, max_seqlen_q=n))
        flops = 4 * batch * H * D * sum(prefix + j + 1 for j in range(n))
        rows.append(dict(system="openlora" if variant == "default" else f"openlora-{variant}", op="prefill_attn",
                         batch=batch, new_tokens=n, prefix=prefix,
                         us=round(us, 1), TFLOPs=round(flops / us / 1e6, 1), rel_err=float(f"{err:.2e}")))
        # contiguous flash attention (SDPA) over the same lengths, for scale: no paging, no prefix reuse
        qs = torch.randn(batch, H, n, D, device=DEV, dtype=BF16)
        ks = torch.randn(batch, H, ctx, D, device=DEV, dtype=BF16)
        vs = torch.randn_like(ks)
        if prefix == 0 and variant == "default":
            sdpa = median_us(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
            rows.append(dict(system="torch-sdpa", op="prefill_attn", batch=batch, new_tokens=n, prefix=prefix,
                             us=round(sdpa, 1), TFLOPs=round(flops / sdpa / 1e6, 1)))
        print(rows[-1], flush=True)
    pa_mod.PREFILL_CONFIG.update(PREFILL_VARIANTS["default"])
    return rows


def main():
    only = sys.argv[1:] or ["sgmv", "decode", "prefill"]
    unknown = sorted(set(only) - {"sgmv", "decode", "prefill"})
    if unknown:     # (a stray "--out DIR" once ran nothing and wrote a file with the copy bandwidth alone)
        sys.exit(f"bench/kernels.py takes sections sgmv, decode, prefill (default: all), not {' '.join(unknown)}; "
                 "the results go to $OUT or bench/results/")
    torch.backends.cuda.matmul.allow_tf32 = False
    dev_name = torch.cuda.get_device_name()
    copy_tbps = copy_bandwidth()
    print(f"{dev_name}: copy {copy_tbps:.2f} TB/s (read + write)", flush=True)
    rows = [dict(system="roofline", op="copy", TBps=round(copy_tbps, 3))]
    if "decode" in only:
        rows += bench_decode(copy_tbps)
    if "prefill" in only:
        rows += bench_prefill()
    if "sgmv" in only:
        rows += bench_sgmv(copy_tbps)
    commit = os.environ.get("COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                        text=True).stdout.strip() or "unknown"
    result = dict(bench="kernels", device=dev_name, torch=torch.__version__, triton=triton.__version__,
                  commit=commit, copy_TBps=round(copy_tbps, 3), rows=rows)
    dev_tag = dev_name.replace("NVIDIA ", "").split()[0].lower()
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    path = os.path.join(out_dir, f"{datetime.date.today():%Y-%m-%d}-{dev_tag}-kernels.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print_tables(rows, copy_tbps)
    print(f"wrote {path}")


def print_tables(rows, copy_tbps):
    print(f"\nSGMV shrink+expand, bf16, us (x over byte floor at {copy_tbps:.2f} TB/s) [vLLM us]")
    sg = [r for r in rows if r.get("op") == "sgmv" and r["system"] == "openlora"]
    for rank in (8, 16, 64):
        for fam in FAMILIES:
            cells = [f"T{r['tokens']}/d{r['distinct']}:{r['us']:.1f}({r['x_floor']:.1f}x)"
                     + (f"[{r['vllm_us']}]" if r.get("vllm_us") else "")
                     for r in sg if r["rank"] == rank and r["family"] == fam]
            print(f"r{rank:<3}{fam:8s} " + " ".join(cells))
    print("\nDecode attention, bf16, us / % of copy bandwidth")
    dec = [r for r in rows if r.get("op") == "decode_attn" and r["system"] == "openlora"]
    for ctx in sorted({r["ctx"] for r in dec}):
        print(f"ctx {ctx:5d}: " + "  ".join(f"B{r['batch']}:{r['us']:.1f}us/{r['pct_copy_bw']:.0f}%"
                                           for r in dec if r["ctx"] == ctx))
    var = [r for r in rows if r.get("op") in ("decode_attn", "sgmv") and r["system"] not in ("openlora", "torch-ref")]
    print("\nVariants: " + "; ".join(f"{r['system']} {r.get('family', '')}{r.get('ctx', '')} "
                                     f"T{r.get('tokens', r.get('batch'))} d{r.get('distinct', '')}: {r['us']}"
                                     for r in var))
    for r in rows:
        if r.get("op") == "prefill_attn":
            print(f"prefill {r['system']} prefix {r['prefix']}: {r['us']} us, {r['TFLOPs']} TFLOP/s")


if __name__ == "__main__":
    main()
