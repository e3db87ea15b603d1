"""Every Redis key and channel name, in one place.

Shard keys carry the shard as hash tag (``olora:{g7}:jobs``) and per-job keys
the job's (``olora:{job:<id>}:result``), so a Redis Cluster keeps each
multi-key operation of one shard, or of one job, inside one slot.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

PREFIX = "olora"
BASE_SHARD = "base"                    # jobs on the base model (no adapter)
DEFAULT_NUM_SHARDS = 8
CANCEL_CHANNEL = f"{PREFIX}:cancel"    # job ids, published on cancel; the flag key is the durable copy
_SHARD_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# -- per shard -------------------------------------------------------------------------------
LOW_LANE = ".low"                      # suffix of a shard's lane for jobs below priority 0 (batch scoring)


def lane(shard: str, priority: int) -> str:
    """The stream name a job of ``priority`` enters in ``shard``: its own stream, or (below 0) the
    shard's low-priority lane, which workers read only with capacity to spare."""
    return shard + LOW_LANE if priority < 0 else shard


def jobs(shard: str) -> str:
    """Stream of queued jobs (field ``job`` = the job JSON)."""
    return f"{PREFIX}:{{{shard}}}:jobs"


def dead_letter(shard: str) -> str:
    """Stream of jobs that failed ``max_attempts`` deliveries, with the reason."""
    return f"{PREFIX}:{{{shard}}}:dead"


def enqueued(shard: str, job_id: str) -> str:
    """Second idempotency guard, inside the shard's slot: the stream entry id of the job."""
    return f"{PREFIX}:{{{shard}}}:enqueued:{job_id}"


# -- per job ---------------------------------------------------------------------------------
def result(job_id: str) -> str:
    """Hash with the final ``JobResult`` (fields ``status``, ``data``)."""
    return f"{PREFIX}:{{job:{job_id}}}:result"


def replay(job_id: str) -> str:
    """Capped, expiring stream of the job's chunks (fields ``seq``, ``end``, ``data``)."""
    return f"{PREFIX}:{{job:{job_id}}}:out"


def submitted(job_id: str) -> str:
    """First idempotency guard: ``{"shard", "job"}`` of the first submit of this id."""
    return f"{PREFIX}:{{job:{job_id}}}:submitted"


def cancel_flag(job_id: str) -> str:
    return f"{PREFIX}:{{job:{job_id}}}:cancel"


def tokens(job_id: str) -> str:
    """Pub/sub channel carrying each chunk live (the replay stream is the gap-free copy)."""
    return f"{PREFIX}:tokens:{{job:{job_id}}}"


# -- per tenant (the API's limits) -------------------------------------------------------------
def tenant_inflight(tenant: str) -> str:
    """Sorted set of the tenant's queued or running job ids (score: when admitted), for its queue share."""
    return f"{PREFIX}:{{tenant:{tenant}}}:inflight"


def tenant_rate(tenant: str) -> str:
    """Hash ``{tokens, ts}``: the tenant's request token bucket, shared by every API process."""
    return f"{PREFIX}:{{tenant:{tenant}}}:rate"


# -- per worker ------------------------------------------------------------------------------
def worker(fleet: str, worker_id: str) -> str:
    """Heartbeat hash with a TTL: which adapters a worker holds, its load; gone when it dies."""
    return f"{PREFIX}:worker:{fleet}:{worker_id}"


def workers(fleet: str) -> str:
    """Set of worker ids that have ever beaten (members whose heartbeat expired are stale)."""
    return f"{PREFIX}:workers:{fleet}"


class ShardRouter:
    """Adapter id -> shard: an override map (from the registry, later), else a stable hash into
    ``num_shards`` groups ``g0..g{n-1}``; the base model has its own shard."""

    def __init__(self, num_shards: int = DEFAULT_NUM_SHARDS, overrides: dict[str, str] | None = None):
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
        self.num_shards = num_shards
        self.overrides = dict(overrides or {})
        for adapter, shard in self.overrides.items():
            if not _SHARD_RE.match(shard):
                raise ValueError(f"shard name {shard!r} (for adapter {adapter!r}) must match {_SHARD_RE.pattern}")

    @classmethod
    def from_env(cls) -> ShardRouter:
        raw = os.environ.get("OPENLORA_SHARD_MAP")
        return cls(int(os.environ.get("OPENLORA_SHARDS", DEFAULT_NUM_SHARDS)), json.loads(raw) if raw else None)

    def shard_of(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_SHARD
        if adapter in self.overrides:
            return self.overrides[adapter]
        h = int.from_bytes(hashlib.blake2b(adapter.encode(), digest_size=8).digest(), "big")
        return f"g{h % self.num_shards}"

    def all_lanes(self) -> list[str]:
        """Every stream workers read: each shard and its low-priority lane."""
        shards = self.all_shards()
        return shards + [s + LOW_LANE for s in shards]

    def all_shards(self) -> list[str]:
        hashed = [f"g{i}" for i in range(self.num_shards)]
        extra = sorted(set(self.overrides.values()) - set(hashed) - {BASE_SHARD})
        return [BASE_SHARD, *hashed, *extra]
