"""Where a batch-scoring step goes on the GPU (cProfile of the host side, one adapter vs 64)."""
import sys; sys.path[0] = "."
import cProfile, pstats, json, tempfile, random, time
from pathlib import Path
import torch
from bench.engine import LLAMA3_8B, random_adapters
from bench.score import make_rows, run
from worker.engine import Engine
from worker.scoring import score_params
d = tempfile.mkdtemp(); (Path(d)/"config.json").write_text(json.dumps(LLAMA3_8B))
e = Engine(d, random_init=True, device="cuda", dtype=torch.bfloat16, max_loras=32, max_lora_rank=16, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=512)
names = random_adapters(e, 64)
rng = random.Random(0)
rows = make_rows(1200, 64, e.model_config.vocab_size, rng)
e.scheduler.low_priority_tokens = 256
run(e, names, rows[:200], 48, [], [])
# time steps with the GPU synced: where does a step go?
cProfile.run("run(e, names, rows[200:700], 48, [], [])", "/tmp/p")
pstats.Stats("/tmp/p").sort_stats("tottime").print_stats(18)
# same rows, all on ONE adapter: is it adapter loads?
one = [(i, p, c, 0) for i, p, c, _ in rows[700:1200]]
t = time.perf_counter(); r = run(e, names, one, 48, [], []); print("one adapter", r["rows_per_s"], "rows/s")
t = time.perf_counter(); r = run(e, names, rows[700:1200], 48, [], []); print("64 adapters", r["rows_per_s"], "rows/s")
e.scheduler.low_priority_tokens = 2048
r = run(e, names, one, 48, [], []); print("one adapter cap 2048", r["rows_per_s"], "rows/s")
