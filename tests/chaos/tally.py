"""Counting what a scenario did to the jobs and to what clients saw, one results row per scenario."""
from __future__ import annotations

from collections import Counter

from tests.chaos.load import LoadRun, replay_entries, results


def check_chunks(chunks, start: int, tokens: list[int] | None) -> tuple[int, int]:
    """(duplicate, missing) chunks in what one client received, in order from token ``start``:
    a chunk starting before the tokens already received is a duplicate; one starting after them
    leaves a gap; no final chunk, or tokens that differ from the result's, count as missing."""
    expect, dups, missing, got = start, 0, 0, []
    for seq, end, ids, _ in chunks:
        if seq < expect:
            dups += 1
            continue
        if seq > expect:
            missing += 1
        got.extend(ids)
        expect = end
    if not chunks or chunks[-1][3] is None:
        missing += 1
    if tokens is not None and missing == 0 and got != list(tokens[start:]):
        missing += 1
    return dups, missing


def check_published(spans: list[tuple[int, int]]) -> tuple[int, int]:
    """(duplicate, gap) in a sequence of (seq, end) as published (pub/sub) or stored (replay stream)."""
    expect, dups, gaps = 0, 0, 0
    for seq, end in spans:
        if seq < expect:
            dups += 1
            continue
        if seq > expect:
            gaps += 1
        expect = end
    return dups, gaps


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def score(run: LoadRun, scenario: str, wall_s: float, *, pubsub_lossy: bool = False, note: str = "") -> dict:
    ids = [p.id for p in run.plans]
    res = results(run.redis_url, ids)
    replay = replay_entries(run.redis_url, ids)
    submitted = [p for p in run.plans if run.seen[p.id].submitted]
    reasons: Counter = Counter()
    completed = lost = dups = missing = errors = reconnects = cuts = hung = reruns = 0
    replay_dup = replay_gap = pub_dup = pub_gap = mismatch = 0
    latency, ttfc = [], []
    for p in submitted:
        s, r = run.seen[p.id], res[p.id]
        hung += s.hung
        errors += len(s.errors)
        reconnects += s.reconnects
        cuts += s.cuts
        if r is None:
            lost += 1
            continue
        reruns += r.get("attempts", 1) > 1
        if r["status"] == "done":
            completed += 1
        else:
            reasons[_reason(r)] += 1
        if p.follow != "none":
            d, m = check_chunks(s.chunks, 0, r["token_ids"])
            dups, missing = dups + d, missing + m
            if s.chunks and s.chunks[-1][3] is not None and s.chunks[-1][3] != r.get("finish_reason"):
                mismatch += 1              # the stream ended one way, the result says another
        d, g = check_published([(seq, end) for seq, end, _ in replay[p.id]])
        replay_dup, replay_gap = replay_dup + d, replay_gap + g
        d, g = check_published(run.published[p.id])
        pub_dup, pub_gap = pub_dup + d, pub_gap + g
        if not pub_gap and replay[p.id] and len(run.published[p.id]) < len(replay[p.id]):
            pub_gap += 1                   # the tail never arrived on pub/sub
        at = {}
        for seq, _, t in replay[p.id]:
            at.setdefault(seq, t)
        latency += [(t - at[seq]) * 1000 for seq, t in s.recv if seq in at]
        if s.recv:
            ttfc.append((s.recv[0][1] - s.t_submit) * 1000)
    return {
        "system": "openlora", "scenario": scenario, "jobs": len(run.plans), "submitted": len(submitted),
        "completed": completed, "failed": sum(reasons.values()), "lost": lost,
        "dup_chunks": dups + replay_dup + pub_dup,
        "missing_chunks": missing + replay_gap + (0 if pubsub_lossy else pub_gap),
        "result_mismatch": mismatch, "rerun": reruns, "pubsub_missed": pub_gap if pubsub_lossy else 0, "hung_clients": hung,
        "client_errors": errors,
        "reconnects": reconnects, "cuts": cuts,
        "chunk_latency_ms_p50": _r(percentile(latency, 50)), "chunk_latency_ms_p99": _r(percentile(latency, 99)),
        "ttfc_ms_p50": _r(percentile(ttfc, 50)), "ttfc_ms_p99": _r(percentile(ttfc, 99)),
        "wall_s": round(wall_s, 1), "failed_reasons": dict(sorted(reasons.items())), "note": note,
    }


def _reason(r: dict) -> str:
    reason = r.get("finish_reason") or r["status"]
    if reason == "error":
        err = (r.get("error") or "").split(":")[0].split(";")[0]
        return f"error: {err[:48]}" if err else "error"
    return reason


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
