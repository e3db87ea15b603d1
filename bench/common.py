"""What every benchmark records: the device, versions, commit and the measured copy bandwidth."""
from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from pathlib import Path

import torch


def copy_bandwidth_TBps(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del src, dst
    return 2 * nbytes / times[len(times) // 2] / 1e12


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_result(bench: str, rows: list[dict], out_dir: str | Path, **extra) -> Path:
    import triton
    device = torch.cuda.get_device_name()
    record = {"bench": bench, "device": device, "torch": torch.__version__, "triton": triton.__version__,
              "commit": commit(), **extra, "rows": rows}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")
    path = Path(out_dir) / f"{dt.date.today().isoformat()}-{slug}-{bench}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
