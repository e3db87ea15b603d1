"""What the API reads about the fleet from Redis: queue depths, live workers, adapters, job owners."""
from __future__ import annotations

import json
from pathlib import Path

import redis.asyncio as aredis

from producer import keys
from producer.cursor import text
from producer.protocol import Job

_ADAPTER_FIELDS = ("adapters", "host_adapters")


class FleetView:
    def __init__(self, redis: aredis.Redis, router: keys.ShardRouter, fleet: str):
        self.redis, self.router, self.fleet = redis, router, fleet

    async def queue_lengths(self) -> dict[str, int]:
        shards = self.router.all_lanes()
        async with self.redis.pipeline(transaction=False) as p:
            for s in shards:
                p.xlen(keys.jobs(s))
            return dict(zip(shards, await p.execute()))

    async def workers(self) -> list[dict]:
        """Heartbeat hashes of the live workers (a member whose hash expired is dead)."""
        ids = sorted(text(w) for w in await self.redis.smembers(keys.workers(self.fleet)))
        async with self.redis.pipeline(transaction=False) as p:
            for w in ids:
                p.hgetall(keys.worker(self.fleet, w))
            hashes = await p.execute()
        return [{text(k): text(v) for k, v in h.items()} for h in hashes if h]

    async def worker_adapters(self) -> set[str]:
        found: set[str] = set()
        for w in await self.workers():
            for f in _ADAPTER_FIELDS:
                try:
                    found.update(a for a in json.loads(w.get(f) or "[]") if isinstance(a, str))
                except ValueError:
                    pass
        return found

    async def owner(self, job_id: str) -> tuple[bool, str | None]:
        """(known, tenant) of a submitted job, from its idempotency guard record."""
        rec = await self.redis.get(keys.submitted(job_id))
        if rec is None:
            return False, None
        try:
            return True, Job.parse(json.loads(rec)["job"]).tenant
        except (ValueError, KeyError):
            return True, None


def adapter_dir_names(spec: str) -> set[str]:
    """Adapter ids in an adapter-dirs spec, read the way the worker reads it (JSON map,
    ``name=path,...``, or a root whose subfolders holding ``adapter_config.json`` are adapters)."""
    spec = (spec or "").strip()
    if not spec:
        return set()
    if spec.startswith("{"):
        return set(json.loads(spec))
    if "=" in spec:
        return {p.partition("=")[0].strip() for p in spec.split(",") if p.strip()}
    root = Path(spec)
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir() if (p / "adapter_config.json").is_file()}
