"""Engine start-up on random Llama-3-8B-shaped weights (bf16): seconds until the decode graphs are captured,
and how many GEMM shapes were timed against taken from the tuning cache (``EngineConfig.gemm_tuning_cache``).
Run it twice on one cache file to see a cold and a warm start.

    python bench/startup.py [--batch 32] [--cache PATH | --cache ""]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])   # bench/queue.py must not shadow queue

import argparse
import json
import tempfile
import time

from bench.engine import LLAMA3_8B, RANK
from worker.engine import Engine, EngineConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32, help="largest decode batch (graphs are captured up to it)")
    ap.add_argument("--cache", default=EngineConfig.gemm_tuning_cache, help='tuning cache file; "" = none')
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(LLAMA3_8B))
        t0 = time.perf_counter()
        engine = Engine(d, random_init=True, device="cuda", dtype="bfloat16", max_loras=args.batch,
                        max_lora_rank=RANK, max_num_seqs=args.batch, max_num_batched_tokens=8192, max_model_len=512,
                        gemm_tuning_cache=args.cache)
        up = time.perf_counter() - t0
    gemm = engine.model.gemm
    print(f"engine up in {up:.1f} s at max batch {args.batch}: GEMM shapes timed {len(gemm.timings)}, "
          f"from the cache {len(gemm.cached)} (cache: {args.cache or 'none'})")


if __name__ == "__main__":
    main()
