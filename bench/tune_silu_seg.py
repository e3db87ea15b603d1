"""SiLU-mul with LoRA (kernels/fused_lora.py) for a step of several adapters: the loop over the step's
adapters (tensor-core tiles, each adapter's B and down's A read once a program) against per-row gathers,
by adapter count and launch parameters. Batch 32, Llama-3-8B shapes, rank 16, bf16; one launch inside a
graph of 16 calls over 16 layers' own weights, L2 flushed before each replay (as bench/tune_norm_silu.py).

    python bench/tune_silu_seg.py      (results: bench/results/2026-11-24-h100-silu-seg.txt)
"""
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
import triton
from kernels import fused, fused_lora as fl
from kernels.lora_meta import LoRAMeta
from bench.kernels import graphed, median_us
from bench.fused_lora_setup import H, I, SLOTS, T, dev, dt, fam, gemm_h

LAYERS = 16
torch.manual_seed(0)


def per_call(fn):
    return median_us(graphed(lambda: [fn(i) for i in range(LAYERS)])) / LAYERS


tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1      # slot s at position s - 1
f_d = [fam(I, [H]) for _ in range(LAYERS)]
f_gu = [fam(H, [I, I]) for _ in range(LAYERS)]
gu = [torch.randn(T, 2 * I, device=dev).to(dt) for _ in range(LAYERS)]
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
print(f"silu_mul (no LoRA)             {per_call(lambda i: fused.silu_mul(gu[i])):6.2f} us")
for k in (1, 2, 4, 6, 8, 10, 16, 32):
    bucket = triton.next_power_of_2(k)
    meta = LoRAMeta.allocate(64, SLOTS, dev).fill([1 + t % k for t in range(T)])
    h_gu = gemm_h(2 * I, 2, bucket)
    ref_act, ref_parts = fl.silu_mul_lora(gu[0], meta, h_gu, f_gu[0], f_d[0], tail_pos, seg_max=0)
    variants = [("one adapter 64/2", {})] if k == 1 else [("rows 64/4", dict(seg_max=0))]
    if k > 1:
        variants += [(f"loop {bn}/{nw}", dict(seg_max=64, block_n=bn, num_warps=nw))
                     for bn, nw in ((64, 2), (64, 4), (128, 4), (32, 2))]
    cells = []
    for name, kw in variants:
        act, parts = fl.silu_mul_lora(gu[0], meta, h_gu, f_gu[0], f_d[0], tail_pos, **kw)
        same = torch.allclose(act.float(), ref_act.float(), atol=2e-2, rtol=2e-2) and torch.allclose(
            parts.sum(0), ref_parts.sum(0), atol=5e-2, rtol=5e-2)
        us = per_call(lambda i, kw=kw: fl.silu_mul_lora(gu[i], meta, h_gu, f_gu[i], f_d[i], tail_pos, **kw))
        cells.append(f"{name}: {us:6.2f}" + ("" if same else " (DIFFERS)"))
    print(f"{k:2d} adapters (bucket {bucket:2d}): " + "  ".join(cells), flush=True)
