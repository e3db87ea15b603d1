"""The fused-LoRA small kernels (norm, SiLU-mul, rotary) and their plain versions at batch 32, one call each
per workload, for Nsight Compute: why a call costs 2-4x its bytes (bench/NOTES-kernels.md v9, v13).

Llama-3-8B shapes, rank 16, bf16. Workloads: one adapter (tail bucket 1, down's shrink in its GEMM, as
``LlamaModel.down_in_gemm`` has it) and the engine bench's batch-32 Skewed draw (10 adapters, bucket 12,
down's shrink in SiLU-mul). Without --ncu it prints each call's time: 16 launches in one graph replay, L2
flushed before it (the same weights each launch, so past the first B comes from L2, unlike a step's layers).

    ncu --set detailed -k 'regex:^_(add_rms|silu|rotary|norm)' python bench/probe_ncu.py --ncu > ncu.txt
    python bench/probe_ncu.py                          (results: bench/results/2026-11-24-h100-ncu-small-kernels.txt)
"""
import argparse
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
from kernels import fused, fused_lora as fl
from kernels.lora_meta import LoRAMeta
from bench.fused_lora_setup import H, I, T, SLOTS, dev, fam, gemm_h, small_inputs, workload_slots
from worker.model.llama import TAIL_BUCKETS

LAYERS = 16


def draws() -> dict[str, list[int]]:
    """Slots (1-based: slot s sits at tail position s - 1) of the two workloads."""
    return {"one adapter": [1] * T, "skewed (engine draw)": workload_slots("skewed", T, seed=1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", action="store_true", help="one call of each kernel after a warm-up, no timing")
    args = ap.parse_args()
    torch.manual_seed(0)
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1
    f_o, f_d, f_gu = fam(H, [H]), fam(I, [H]), fam(H, [I, I])
    f_qkv = fam(H, [4096, 1024, 1024])
    x, res, w, gu, qkv, cos, pos = small_inputs()

    calls = {"add_rms_norm": lambda: fused.add_rms_norm(x, res, w, 1e-5),
             "silu_mul": lambda: fused.silu_mul(gu),
             "rotary": lambda: fused.rotary_(qkv[:, :4096].view(T, 32, 128), qkv[:, 4096:5120].view(T, 8, 128),
                                             cos, cos, pos)}
    for label, slots in draws().items():
        meta = LoRAMeta.allocate(64, SLOTS, dev).fill(slots)
        k = next(b for b in TAIL_BUCKETS if b >= meta.num_segments)
        h_o, h_gu, h_qkv, h_d = gemm_h(H, 1, k), gemm_h(2 * I, 2, k), gemm_h(6144, 3, k), gemm_h(H, 1, k)
        shrink = k > 8                                       # LlamaModel.down_in_gemm at 32 tokens
        rp = fl.row_positions(meta, tail_pos)
        print(f"== {label}: {meta.num_segments} adapters, tail bucket {k}, down's shrink in "
              f"{'SiLU-mul' if shrink else 'its GEMM'}", flush=True)
        _, parts = fl.silu_mul_lora(gu, meta, h_gu, f_gu, f_d if shrink else None, tail_pos)
        calls |= {
            f"{label}: norm_lora (o)": lambda m=meta, h=h_o, p=rp: fl.norm_lora(x, res, w, 1e-5, m, h, f_o, tail_pos, p),
            f"{label}: silu_mul_lora": lambda m=meta, h=h_gu, s=shrink: fl.silu_mul_lora(
                gu, m, h, f_gu, f_d if s else None, tail_pos),
            f"{label}: norm_lora (down)": lambda m=meta, h=(parts if shrink else h_d), p=rp: fl.norm_lora(
                x, res, w, 1e-5, m, h, f_d, tail_pos, p),
            f"{label}: rotary_lora": lambda m=meta, h=h_qkv: fl.rotary_lora_(qkv, h, f_qkv, cos, cos, pos, m, 32, 8,
                                                                           tail_pos)}
    for fn in calls.values():                                # compile and warm up
        fn()
    torch.cuda.synchronize()
    if args.ncu:
        for name, fn in calls.items():
            torch.cuda.nvtx.range_push(name)
            fn()
            torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print("launch order:", *calls, sep="\n  ")
        return
    from bench.kernels import graphed, median_us
    for name, fn in calls.items():
        us = median_us(graphed(lambda: [fn() for _ in range(LAYERS)])) / LAYERS
        print(f"{name:45s} {us:7.2f} us a call", flush=True)


if __name__ == "__main__":
    main()
