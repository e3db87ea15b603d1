"""What the fused-LoRA tuning scripts (bench/tune_fused_lora.py, bench/tune_norm_silu.py) share: batch-32
Llama-3-8B shapes at rank 16 in bf16 on the GPU, random stacked adapter slots, GEMM outputs with h in
their extra columns, and the two steps they compare (one adapter; 32, one per token)."""
import random

import torch

from bench.engine import workload
from bench.kernels import graphed, median_us
from kernels import fused, fused_lora as fl
from kernels.lora_meta import LoRAMeta
from worker.model.llama import DOWN_GEMM_MAX_POSITIONS, DOWN_SHRINK_IN_SILU_TOKENS, TAIL_BUCKETS

dev, dt, T, R, H, I = "cuda", torch.bfloat16, 32, 16, 4096, 14336
SLOTS = 33
LAYERS = 16       # layers' own weights a timing cycles through, so that B streams from DRAM as in a step


def fam(n_in, widths, slots=SLOTS):
    """``slots`` random adapters of rank R on one family (``widths``: its slices' output widths)."""
    n = len(widths)
    return fl.LoRAWeights((torch.randn(slots, n, R, n_in, device=dev) * 0.02).to(dt),
                          (torch.randn(slots, R, sum(widths), device=dev) * 0.02).to(dt),
                          torch.full((slots, n), R, dtype=torch.int32, device=dev),
                          torch.ones(slots, n, device=dev))


def workload_slots(name, t, slots=SLOTS, seed=0):
    """Slots 1.. of the engine bench's workload ``name`` (bench/engine.py) over t tokens, drawn with ``seed``,
    its adapters numbered in order of first use and capped at ``slots - 1`` (slot s sits at position s - 1)."""
    ids = {}
    return [min(ids.setdefault(a, len(ids) + 1), slots - 1) for a in workload(name, t, random.Random(seed))]


def step_shape(name, t, slots=SLOTS):
    """(slots drawn, adapters, tail bucket, whether SiLU-mul shrinks down) of the engine bench's workload ``name``
    as a t-token fused step has them (``LlamaModel.tail_bucket`` with tails for every adapter, and
    ``LlamaModel.down_in_gemm``)."""
    drawn = workload_slots(name, t, slots)
    n = len(set(drawn))
    k = min(next(b for b in TAIL_BUCKETS if b >= n), t)
    return drawn, n, k, not (t > DOWN_SHRINK_IN_SILU_TOKENS or k <= DOWN_GEMM_MAX_POSITIONS)


def workload_step(name, t, slots=SLOTS):
    """``step_shape`` of workload ``name``, announced in a header line: (slots drawn, tail bucket, whether SiLU-mul
    shrinks down, h of the gate_up GEMM, h of the qkv GEMM)."""
    drawn, n, k, shrink = step_shape(name, t, slots)
    print(f"\n== {name}: {n} adapters, bucket {k}, down's shrink in {'SiLU-mul' if shrink else 'its GEMM'}")
    return drawn, k, shrink, gemm_h(2 * I, 2, k, t), gemm_h(6144, 3, k, t)


def layer_activations(t):
    """A t-token step's gate_up and qkv GEMM outputs, one per layer, and its positions."""
    return ([torch.randn(t, 2 * I, device=dev).to(dt) for _ in range(LAYERS)],
            [torch.randn(t, 6144, device=dev).to(dt) for _ in range(LAYERS)], torch.arange(t, device=dev))


def rotary_plain(qkv, cos, sin, pos):
    """The plain rotary on a Llama-3-8B qkv output [t, 6144] (32 q heads, 8 k heads of 128)."""
    t = qkv.shape[0]
    fused.rotary_(qkv[:, :4096].view(t, 32, 128), qkv[:, 4096:5120].view(t, 8, 128), cos, sin, pos)


def small_inputs():
    """One batch-32 layer's inputs of the small kernels: (x, res, w) of the norm, gate_up of SiLU-mul and
    (qkv, cos, positions) of rotary."""
    return (torch.randn(T, H, device=dev).to(dt), torch.randn(T, H, device=dev).to(dt),
            torch.ones(H, device=dev, dtype=dt), torch.randn(T, 2 * I, device=dev).to(dt),
            torch.randn(T, 6144, device=dev).to(dt), torch.randn(1024, 128, device=dev).to(dt),
            torch.arange(T, device=dev))


def gemm_h(width, n_slices, k, t=T):
    """A GEMM output [t, width + extra] for k positions and its h view."""
    tails = fl.LoRATails(n_slices, R, k)
    tails.out = width
    return tails.split(torch.randn(t, width + tails.rows(k), device=dev).to(dt), k)[1]


def per_call(fn):
    """us per call of fn(layer), over LAYERS layers replayed in one CUDA graph (launch gaps included)."""
    return median_us(graphed(lambda: [fn(i) for i in range(LAYERS)])) / LAYERS


def steps():
    """(tail_pos with slot s at position s - 1, {label: (LoRA metadata, adapters)}) for one adapter and 32."""
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1
    return tail_pos, {"one": (LoRAMeta.allocate(64, SLOTS, dev).fill([1] * T), 1),
                      "32 distinct": (LoRAMeta.allocate(64, SLOTS, dev).fill(list(range(1, T + 1))), 32)}
