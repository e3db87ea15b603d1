"""Where a batch-scoring step goes on the GPU: cProfile of the host side, then one adapter vs 64.

    python bench/profile_score.py          # prints the profile and rows/s; writes nothing
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import cProfile
import json
import pstats
import random
import tempfile

import torch

from bench.engine import LLAMA3_8B, random_adapters  # noqa: E402
from bench.score import make_rows, run  # noqa: E402
from worker.engine import Engine  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(LLAMA3_8B))
        engine = Engine(d, random_init=True, device="cuda", dtype=torch.bfloat16, max_loras=32, max_lora_rank=16,
                        max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=512)
        names = random_adapters(engine, 64)
        rows = make_rows(1200, 64, engine.model_config.vocab_size, random.Random(0))
        engine.scheduler.low_priority_tokens = 256
        run(engine, names, rows[:200], 48, [], [])                                  # warm-up
        prof = cProfile.Profile()
        prof.runcall(run, engine, names, rows[200:700], 48, [], [])
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        one = [(i, p, c, 0) for i, p, c, _ in rows[700:1200]]
        print("one adapter", run(engine, names, one, 48, [], [])["rows_per_s"], "rows/s")
        print("64 adapters", run(engine, names, rows[700:1200], 48, [], [])["rows_per_s"], "rows/s")
        engine.scheduler.low_priority_tokens = 2048
        print("one adapter, 2048 a step", run(engine, names, one, 48, [], [])["rows_per_s"], "rows/s")


if __name__ == "__main__":
    main()
