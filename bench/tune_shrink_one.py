"""gate/up in a one-adapter step, two ways: the gate_up GEMM with the adapter's A rows under it (h in its
extra columns) and SiLU-mul, against the GEMM at the base shape, ``shrink_one`` (by its number of parts)
and SiLU-mul summing the parts. Batch 32, Llama-3-8B shapes, rank 16, bf16; each timing is one layer
inside a graph of 16 layers' own weights, L2 flushed before each replay, timed twice.

    python bench/tune_shrink_one.py     (results: bench/results/2026-11-24-h100-shrink-one.txt)
"""
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
import torch.nn.functional as F
from kernels import fused, fused_lora as fl
from kernels.fused_lora_torch import shrink_ref
from bench.kernels import graphed, median_us
from bench.fused_lora_setup import H, I, T, dev, dt, fam, steps

LAYERS = 16
torch.manual_seed(0)


def per_layer(fn):
    replay = graphed(lambda: [fn(i) for i in range(LAYERS)])
    return [median_us(replay) / LAYERS for _ in range(2)]


def main():
    tail_pos, metas = steps()
    meta, _ = metas["one"]
    slot = int(meta.seg_slot[0])
    f_gu = [fam(H, [I, I]) for _ in range(LAYERS)]
    f_d = [fam(I, [H]) for _ in range(LAYERS)]
    tails = fl.LoRATails(2, 16, 1, pad=128)
    w = [tails.add(torch.randn(2 * I, H, device=dev).to(dt) * 0.02) for _ in range(LAYERS)]
    for i in range(LAYERS):
        tails.a_rows(i, int(tail_pos[slot])).copy_(f_gu[i].lora_a[slot])
    x = torch.randn(T, H, device=dev).to(dt)

    # the two give the same h (bf16 GEMM columns against float32 parts)
    _, h_cols = tails.split(F.linear(x, tails.weight(0, 1)[0]))
    ref = shrink_ref(x, f_gu[0], [slot] * T)
    got = fl.shrink_one(x, f_gu[0], meta).sum(0)[:, 0].transpose(0, 1)
    err = ((got - ref).norm() / ref.norm()).item()
    err_cols = ((h_cols[0, :, 0].transpose(0, 1).float() - ref).norm() / ref.norm()).item()
    print(f"shrink_one vs torch: rel err {err:.2e} (GEMM columns: {err_cols:.2e})")
    assert err < 1e-2

    def rows(i):
        gu, h = tails.split(F.linear(x, tails.weight(i, 1)[0]))
        return fl.silu_mul_lora(gu, meta, h, f_gu[i], f_d[i], tail_pos)

    print(f"GEMM + rows, SiLU-mul:                {per_layer(rows)}", flush=True)
    print(f"GEMM alone (base shape):              {per_layer(lambda i: F.linear(x, w[i]))}", flush=True)
    print(f"GEMM + rows alone:                    {per_layer(lambda i: F.linear(x, tails.weight(i, 1)[0]))}")
    print(f"plain SiLU-mul:                        {per_layer(lambda i: fused.silu_mul(F.linear(x, w[i])))}")
    for parts in (1, 2, 4, 8, 16):
        def split(i):
            h = fl.shrink_one(x, f_gu[i], meta, parts=parts)
            return fl.silu_mul_lora(F.linear(x, w[i]), meta, h, f_gu[i], f_d[i], tail_pos)
        alone = per_layer(lambda i: fl.shrink_one(x, f_gu[i], meta, parts=parts))
        print(f"GEMM, shrink_one {parts:2d} parts, SiLU-mul: {per_layer(split)}  (shrink alone {alone})", flush=True)


if __name__ == "__main__":
    main()
