"""One adapter, few tokens: the one-adapter kernels (``sgmv_decode.lora_apply_single``) by K split and
column tile, against the block-walking pair (memset + shrink with atomics + expand) and the segment-major
pair that lora_apply used before. Llama-3-8B shapes, bf16, rank 16 (and rank 16 in a max-rank-64 stack),
L2 flushed before each replay, each call captured in a graph (as bench/kernels.py times it).

    python bench/tune_sgmv_single.py      (results: bench/results/2026-11-24-h100-sgmv-single.txt)
"""
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
from bench.kernels import FAMILIES, SLOT_CAPACITY, VLLM, graphed, median_us, rel_err
from kernels.lora_meta import LoRAMeta
from kernels.lora_torch import lora_expand_ref, lora_shrink_ref
from kernels.sgmv import lora_expand, lora_shrink
from kernels.sgmv_decode import lora_apply_decode, lora_apply_single, single_fits

dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)


def case(family, tokens, rank, max_rank):
    in_f, widths = FAMILIES[family]
    n = len(widths)
    offs = tuple([0] + torch.tensor(widths).cumsum(0).tolist())
    a = (torch.randn(SLOT_CAPACITY, n, max_rank, in_f, device=dev) * in_f ** -0.5).to(dt)
    b = (torch.randn(SLOT_CAPACITY, max_rank, offs[-1], device=dev) * rank ** -0.5).to(dt)
    ranks = torch.full((SLOT_CAPACITY, n), rank, dtype=torch.int32, device=dev)
    scal = torch.full((SLOT_CAPACITY, n), 2.0, device=dev)
    meta = LoRAMeta.allocate(256, SLOT_CAPACITY, dev).fill([37] * tokens)
    x = torch.randn(tokens, in_f, device=dev).to(dt)
    y = torch.randn(tokens, offs[-1], device=dev).to(dt)
    return x, y, a, b, ranks, scal, offs, meta


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    print(torch.cuda.get_device_name(), torch.__version__)
    print("us per shrink+expand (median, L2 flushed); rel err vs the torch reference in brackets when > 1e-2")
    for rank, max_rank in ((16, 16), (16, 64)):
        for family in FAMILIES:
            for tokens in (1, 8, 32, 64):
                x, y, a, b, ranks, scal, offs, meta = case(family, tokens, rank, max_rank)
                h = torch.empty(len(offs) - 1, tokens, max_rank, device=dev)
                y_ref = lora_expand_ref(lora_shrink_ref(x, a, ranks.cpu(), meta), b, ranks.cpu(), scal.cpu(),
                                        offs, meta, y.clone())
                runs = {"blockwalk": lambda y: lora_expand(lora_shrink(x, a, ranks, meta, out=h), b, ranks, scal,
                                                           offs, meta, y),
                        "segments": lambda y: lora_apply_decode(x, y, a, b, ranks, scal, offs, meta)}
                fits = single_fits(tokens, max_rank)     # past the tile lora_apply takes the block walk
                if fits:
                    runs["single"] = lambda y: lora_apply_single(x, y, a, b, ranks, scal, offs, meta)
                for bn in (64, 128) if fits else ():
                    runs[f"single n{bn}"] = (lambda y, bn=bn: lora_apply_single(x, y, a, b, ranks, scal, offs,
                                                                               meta, block_n=bn))
                for sk in (4, 8, 16, 32) if fits else ():
                    runs[f"single k{sk}"] = (lambda y, sk=sk: lora_apply_single(x, y, a, b, ranks, scal, offs,
                                                                               meta, split_k=sk))
                # every variant's result first (the timing loops below add into y many times over)
                errs = {name: rel_err(fn(y.clone()) - y, y_ref - y) for name, fn in runs.items()}
                cells = []
                for name, fn in runs.items():
                    us = median_us(graphed(lambda fn=fn: fn(y)))
                    cells.append((us, name, errs[name]))
                best = min(c for c in cells if c[1].startswith("single") or not fits)
                vllm = VLLM.get((tokens, 1), {}).get(family) if max_rank == 16 else None
                line = "  ".join(f"{n}:{us:.2f}" + (f"[{e:.0e}]" if e > 1e-2 else "") for us, n, e in cells)
                print(f"r{rank}/{max_rank} {family:8s} T{tokens:<3d} best {best[1]} {best[0]:.2f}"
                      + (f" vLLM {vllm}" if vllm else "") + f" | {line}", flush=True)
                del a, b


if __name__ == "__main__":
    main()
