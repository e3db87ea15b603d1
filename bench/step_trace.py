"""Reads a `bench/engine.py --trace` file: where each run's decode step went (host prepare, GPU replay, the rest of
the host's step), how it moved within the run, and, given an nvidia-smi log of the same time, whether the SM clock
explains the moves.

    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
        --format=csv,nounits -lms 100 > smi.csv &
    python bench/engine.py --batches 256 --trace trace.json ...
    python bench/step_trace.py trace.json [--smi smi.csv] [--chunk 16]

Output (ms, medians): per run, step = prepare + gpu + rest, then the per-chunk medians of gpu and rest; the GPU
overhead of each workload over the base runs; each workload's overheads over its bracketing base runs, as
bench/engine.py reports them; with --smi, each run's SM clock and the correlation of base steps'
time (over the median base step at the same index: the context grows along a run) with the clock.
"""
from __future__ import annotations

import argparse
import bisect
import csv
import datetime
import json
import statistics as st


def smi_samples(path: str) -> list[tuple[float, int, float, str]]:
    """(unix time, SM MHz, W, throttle reasons) per sample; nvidia-smi writes local time."""
    out = []
    with open(path) as f:
        for row in list(csv.reader(f))[1:]:
            try:
                t = datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                out.append((t, int(row[1]), float(row[3]), row[5].strip()))
            except (ValueError, IndexError):
                continue                          # a header repeated, a cut last line
    return out


def bracketed_overheads(runs: list[dict], split: bool) -> None:
    """Each workload's overhead as ``bench/engine.py`` reports it: per round, its median step over the mean of the
    base runs before and after it, then the median over rounds; by whole step and, with a split, by GPU time.
    (A run cut short before writing its JSON leaves these in its trace.)"""
    def step_median(r: dict, i: int) -> float:
        v = sorted(s[i] for s in r["steps"] if len(s) > i)
        return v[len(v) // 2] if i == 1 else st.median(v)       # (engine.py: the sorted middle step, median GPU)

    for batch in sorted({r["batch"] for r in runs}):
        base = {r["round"]: r for r in runs if r["batch"] == batch and r["workload"] == "base"}
        rows: dict[tuple[str, str], list[float]] = {}
        for r in runs:
            if r["batch"] != batch or r["workload"] == "base" or {r["round"] - 1, r["round"]} - set(base):
                continue
            for i, what in ((1, "step"), (3, "gpu"))[: 2 if split else 1]:
                around = (step_median(base[r["round"] - 1], i) + step_median(base[r["round"]], i)) / 2
                rows.setdefault((r["workload"], what), []).append(100 * (step_median(r, i) / around - 1))
        for (w, what), v in rows.items():
            print(f"batch {batch} {w:9s} overhead by {what:4s} {st.median(v):6.2f}% (rounds "
                  f"{', '.join(f'{x:.2f}' for x in v)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--smi", default=None, help="nvidia-smi CSV log of the same time (see the module docstring)")
    ap.add_argument("--chunk", type=int, default=16, help="steps a chunk in the per-chunk medians")
    args = ap.parse_args()
    runs = json.load(open(args.trace))
    # (with async scheduling a run's last step launches no replay: it has no split)
    split = any(len(s) >= 4 for r in runs for s in r["steps"])
    smi = smi_samples(args.smi) if args.smi else []
    times = [s[0] for s in smi]

    def clocks(t0: float, t1: float) -> list[int]:
        return [s[1] for s in smi[bisect.bisect_left(times, t0):bisect.bisect_right(times, t1)]]

    gpu: dict[tuple[int, str], list[float]] = {}
    for r in runs:
        steps = r["steps"]
        total = [s[1] for s in steps]
        line = f"batch {r['batch']} {r['workload']:9s} round {r['round']}: step {st.median(total):6.2f}"
        if split:
            timed = [s for s in steps if len(s) >= 4]
            prep, g = [s[2] for s in timed], [s[3] for s in timed]
            rest = [s[1] - s[2] - s[3] for s in timed]
            gpu.setdefault((r["batch"], r["workload"]), []).append(st.median(g))
            line += f" = prepare {st.median(prep):5.2f} + gpu {st.median(g):6.2f} + rest {st.median(rest):5.2f}"
        if smi:
            c = clocks(steps[0][0], steps[-1][0] + steps[-1][1] / 1e3)
            if c:
                line += f" | SM clock mean {st.mean(c):.0f} MHz, {sum(x < 1900 for x in c) / len(c):.0%} under 1900"
        print(line)
        chunks = range(0, len(steps), args.chunk)
        print("    step  " + " ".join(f"{st.median(total[i:i + args.chunk]):6.2f}" for i in chunks))
        if split:
            print("    gpu   " + " ".join(f"{st.median(g[i:i + args.chunk]):6.2f}" for i in chunks if g[i:i + 1]))
            print("    rest  " + " ".join(f"{st.median(rest[i:i + args.chunk]):6.2f}" for i in chunks if rest[i:i + 1]))
    for (batch, w), g in gpu.items():
        base = gpu.get((batch, "base"))
        if base and w != "base":
            print(f"batch {batch} {w}: GPU overhead {100 * (st.median(g) / st.median(base) - 1):5.2f}% "
                  f"(replay {st.median(g):.3f} against base {st.median(base):.3f} ms; runs {', '.join(f'{x:.3f}' for x in g)})")
    bracketed_overheads(runs, split)
    if smi:
        for batch in sorted({r["batch"] for r in runs}):
            base = [r["steps"] for r in runs if r["batch"] == batch and r["workload"] == "base"]
            n = min(len(b) for b in base)
            expected = [st.median(b[i][1] for b in base) for i in range(n)]
            xs, ys = [], []
            for b in base:
                for i, s in enumerate(b[:n]):
                    c = clocks(s[0], s[0] + s[1] / 1e3)
                    if c:
                        xs.append(st.mean(c))
                        ys.append(s[1] / expected[i])
            if len(xs) > 2:
                try:
                    r = f"{st.correlation(xs, ys):.2f}"
                except st.StatisticsError:              # a clock that never moved
                    r = "undefined (constant)"
                print(f"batch {batch} base steps: correlation of SM clock with step / median step at that index "
                      f"{r} over {len(xs)} steps")


if __name__ == "__main__":
    main()
