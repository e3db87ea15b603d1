"""SiLU-mul and rotary with LoRA (kernels/fused_lora.py) for steps of several adapters, by adapter count
and launch parameters: one program per (column tile or head, segment) against per-row gathers, and
against another version of the module (``--against``, e.g. a copy of an older kernels/fused_lora.py: bench/NOTES-kernels.md v9 ran it
against the per-row kernels of commit c3d93c9). Batch 32, Llama-3-8B shapes, rank 16, bf16; one launch
inside a graph of 16 calls over 16 layers' own weights (so B comes from DRAM, as in a step), as
bench/tune_norm_silu.py. Every output is checked against the plain-torch references.

    python bench/tune_segments.py [--against MODULE]   (results: bench/results/2026-11-24-h100-segments*.txt)
"""
import argparse
import importlib
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
import triton
from kernels import fused, fused_lora as fl
from kernels.fused_lora_torch import rotary_lora_ref, silu_mul_lora_ref
from kernels.lora_meta import LoRAMeta
from bench.kernels import rel_err
from bench.fused_lora_setup import H, I, LAYERS, SLOTS, T, dev, dt, fam, gemm_h, per_call, rotary_plain

ADAPTERS = (1, 2, 4, 6, 8, 10, 16, 32)
SILU = [("segments", 64, 2), ("segments", 32, 2), ("segments", 64, 4), ("rows", 64, 4)]   # columns a program, warps
ROTARY = [("segments", 8), ("segments", 4), ("rows", 8)]                                   # warps
GRID = {"segments": 64, "rows": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="module with the same silu_mul_lora / rotary_lora_ to time beside")
    against = ap.parse_args().against
    other = importlib.import_module(against) if against else None
    torch.manual_seed(0)
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1      # slot s at position s - 1
    tail_list = tail_pos.tolist()
    f_d = [fam(I, [H]) for _ in range(LAYERS)]
    f_gu = [fam(H, [I, I]) for _ in range(LAYERS)]
    f_qkv = [fam(H, [4096, 1024, 1024]) for _ in range(LAYERS)]
    gu = [torch.randn(T, 2 * I, device=dev).to(dt) for _ in range(LAYERS)]
    qkv = [torch.randn(T, 6144, device=dev).to(dt) for _ in range(LAYERS)]
    qkv0 = qkv[0].clone()
    freqs = torch.outer(torch.arange(1024, device=dev).float(),
                        1.0 / 500000 ** (torch.arange(0, 128, 2, device=dev).float() / 128)).repeat(1, 2)
    cos, sin = freqs.cos().to(dt), freqs.sin().to(dt)
    pos = torch.arange(T, device=dev)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    print(f"silu_mul (no LoRA) {per_call(lambda i: fused.silu_mul(gu[i])):6.2f} us")
    print(f"rotary (no LoRA)   {per_call(lambda i: rotary_plain(qkv[i], cos, sin, pos)):6.2f} us")
    for k in ADAPTERS:
        bucket = triton.next_power_of_2(k)
        mix = [1 + t % k for t in range(T)]
        meta = LoRAMeta.allocate(64, SLOTS, dev).fill(mix)
        h_gu, h_qkv = gemm_h(2 * I, 2, bucket), gemm_h(6144, 3, bucket)
        ref_act, ref_hd = silu_mul_lora_ref(gu[0].clone(), mix, expand=(h_gu, f_gu[0]), shrink=f_d[0],
                                            tail_pos=tail_list)
        ref_qkv = rotary_lora_ref(qkv0.clone(), h_qkv, f_qkv[0], cos, sin, pos, mix, 32, 8, tail_list)

        def silu_ok(mod, **kw):
            act, parts = mod.silu_mul_lora(gu[0], meta, h_gu, f_gu[0], f_d[0], tail_pos, **kw)
            return max(rel_err(act, ref_act), rel_err(parts.sum(0)[None, :, 0, 0, :16], ref_hd)) < 3e-2

        def rotary_ok(mod, **kw):
            q = qkv0.clone()
            mod.rotary_lora_(q, h_qkv, f_qkv[0], cos, sin, pos, meta, 32, 8, tail_pos, **kw)
            return rel_err(q, ref_qkv) < 3e-2

        cells = []
        if other is not None:
            us = per_call(lambda i: other.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], f_d[i], tail_pos))
            cells.append(f"against: {us:6.2f}" + ("" if silu_ok(other) else " (DIFFERS)"))
        for grid, bn, nw in SILU:
            kw = dict(block_n=bn, num_warps=nw, segments_max=GRID[grid])
            us = per_call(lambda i, kw=kw: fl.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], f_d[i], tail_pos, **kw))
            cells.append(f"{grid} {bn}/{nw}: {us:6.2f}" + ("" if silu_ok(fl, **kw) else " (DIFFERS)"))
        print(f"silu   {k:2d} adapters (bucket {bucket:2d}): " + "  ".join(cells), flush=True)
        cells = []
        if other is not None:
            us = per_call(lambda i: other.rotary_lora_(qkv[i], h_qkv, f_qkv[i], cos, sin, pos, meta, 32, 8, tail_pos))
            cells.append(f"against: {us:6.2f}" + ("" if rotary_ok(other) else " (DIFFERS)"))
        for grid, nw in ROTARY:
            kw = dict(num_warps=nw, segments_max=GRID[grid])
            us = per_call(lambda i, kw=kw: fl.rotary_lora_(qkv[i], h_qkv, f_qkv[i], cos, sin, pos, meta, 32, 8,
                                                           tail_pos, **kw))
            cells.append(f"{grid} {nw} warps: {us:6.2f}" + ("" if rotary_ok(fl, **kw) else " (DIFFERS)"))
        print(f"rotary {k:2d} adapters (bucket {bucket:2d}): " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
