"""Steps past the decode kernels' 64 tokens, several adapters: the segment-block kernels
(``sgmv_decode.lora_apply_blocks``, a program per 16-token block of a segment) against the block-walking pair
that lora_apply takes there (memset + shrink with atomics + expand, a program per 32 sorted tokens looping over
the segments inside), and, up to 64 tokens, against the segment-major decode kernels. Llama-3-8B shapes, bf16,
rank 16, the engine bench's workloads (bench/engine.py: identical, uniform, skewed, distinct), L2 flushed before
each replay, each call captured in a graph (as bench/kernels.py times it).

    python bench/tune_sgmv_blocks.py [--tokens 32 256 ...]
"""
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import argparse
import random

import torch

from bench.engine import workload
from bench.kernels import FAMILIES, graphed, median_us, rel_err
from kernels.lora_meta import LoRAMeta
from kernels.lora_torch import lora_expand_ref, lora_shrink_ref
from kernels.sgmv import lora_expand, lora_shrink
from kernels.sgmv_decode import MAX_TOKENS, lora_apply_blocks, lora_apply_decode

dev, dt = "cuda", torch.bfloat16
RANK = 16
META_SLOTS = 256        # LoRA slots the metadata holds, as in bench/engine.py (max_loras 256)


def case(family, slots):
    in_f, widths = FAMILIES[family]
    n, cap = len(widths), max(slots) + 1
    offs = tuple([0] + torch.tensor(widths).cumsum(0).tolist())
    a = (torch.randn(cap, n, RANK, in_f, device=dev) * in_f ** -0.5).to(dt)
    b = (torch.randn(cap, RANK, offs[-1], device=dev) * RANK ** -0.5).to(dt)
    ranks = torch.full((cap, n), RANK, dtype=torch.int32, device=dev)
    scal = torch.full((cap, n), 2.0, device=dev)
    meta = LoRAMeta.allocate(len(slots), max(cap, META_SLOTS), dev).fill(slots)   # grids follow the capacity
    x = torch.randn(len(slots), in_f, device=dev).to(dt)
    y = torch.randn(len(slots), offs[-1], device=dev).to(dt)
    return x, y, a, b, ranks, scal, offs, meta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", nargs="+", type=int, default=[32, 128, 256, 512])
    ap.add_argument("--workloads", nargs="+", default=["identical", "uniform", "skewed", "distinct"])
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    print("us per shrink+expand (median, L2 flushed); rel err vs the torch reference in brackets when > 1e-2")
    for tokens in args.tokens:
        for wl in args.workloads:
            slots = workload(wl, tokens, random.Random(0))
            for family in FAMILIES:
                x, y, a, b, ranks, scal, offs, meta = case(family, slots)
                h = torch.empty(len(offs) - 1, tokens, RANK, device=dev)
                y_ref = lora_expand_ref(lora_shrink_ref(x, a, ranks.cpu(), meta), b, ranks.cpu(), scal.cpu(),
                                        offs, meta, y.clone())
                runs = {"blockwalk": lambda y: lora_expand(lora_shrink(x, a, ranks, meta, out=h), b, ranks, scal,
                                                           offs, meta, y)}
                if tokens <= MAX_TOKENS:
                    runs["segments"] = lambda y: lora_apply_decode(x, y, a, b, ranks, scal, offs, meta)
                runs["segblocks"] = lambda y: lora_apply_blocks(x, y, a, b, ranks, scal, offs, meta)
                for sk in (4, 16):
                    runs[f"segblocks k{sk}"] = (lambda y, sk=sk: lora_apply_blocks(x, y, a, b, ranks, scal, offs,
                                                                                  meta, split_k=sk))
                for bn in (64, 256):
                    runs[f"segblocks n{bn}"] = (lambda y, bn=bn: lora_apply_blocks(x, y, a, b, ranks, scal, offs,
                                                                                  meta, block_n=bn))
                # every variant's result first (the timing loops below add into y many times over)
                errs = {name: rel_err(fn(y.clone()) - y, y_ref - y) for name, fn in runs.items()}
                cells = [(median_us(graphed(lambda fn=fn: fn(y))), name, errs[name]) for name, fn in runs.items()]
                best = min(cells)
                line = "  ".join(f"{n}:{us:.1f}" + (f"[{e:.0e}]" if e > 1e-2 else "") for us, n, e in cells)
                print(f"T{tokens:<4d} {wl:9s} ({meta.num_segments:3d} adapters) {family:8s} best {best[1]} "
                      f"{best[0]:.1f} | {line}", flush=True)
                del a, b


if __name__ == "__main__":
    main()
