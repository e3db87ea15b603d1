"""The worker process's one config object: flags, else environment variables, else defaults."""
from __future__ import annotations

import argparse
import json
import os
import socket
from dataclasses import dataclass, field

from producer.keys import DEFAULT_NUM_SHARDS, ShardRouter
from worker.errors import OpenLoRAError
from worker.runtime.adapter_dirs import AdapterDirectory, RegistryLookup


@dataclass
class RuntimeConfig:
    model_dir: str
    redis_url: str = "redis://localhost:6379/0"
    database_url: str | None = None                      # the usage ledger goes there; None: not recorded
    fleet: str = "default"                      # Redis consumer group: workers of one fleet share jobs
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    device: str = "cpu"
    dtype: str | None = None                    # default: float32 on CPU, bfloat16 on GPU
    max_num_seqs: int = 32                      # in-flight jobs (engine batch) and pull capacity
    batch_share: float = 0.75                   # of that, at most this share for low-priority (batch) jobs
    max_loras: int = 4
    engine_options: dict = field(default_factory=dict)   # more EngineConfig fields
    adapters: AdapterDirectory = field(default_factory=AdapterDirectory)
    preload: list[str] = field(default_factory=list)     # adapters loaded at start
    num_shards: int = DEFAULT_NUM_SHARDS
    shard_map: dict[str, str] = field(default_factory=dict)
    heartbeat_ttl_s: float = 10.0               # a worker silent this long is dead; its jobs are reclaimed
    max_attempts: int = 3                       # deliveries before a job goes to the dead-letter stream
    steal_after_s: float = 0.5                  # steal from other shards only jobs waiting this long
    poll_ms: int = 100                          # blocking-read timeout when idle
    grace_s: float = 30.0                       # on SIGTERM: time to finish in-flight jobs
    result_ttl_s: int = 24 * 3600
    replay_ttl_s: int = 3600
    replay_maxlen: int = 10_000                 # chunks kept per job for replay
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_loras", "num_shards", "max_attempts", "poll_ms", "result_ttl_s",
                     "replay_ttl_s", "replay_maxlen"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise OpenLoRAError(f"{name} must be a positive integer, got {v!r}")
        for name in ("heartbeat_ttl_s", "steal_after_s", "grace_s"):
            if getattr(self, name) < 0:
                raise OpenLoRAError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 < self.batch_share <= 1.0:
            raise OpenLoRAError(f"batch_share must be in (0, 1], got {self.batch_share!r}")
        if self.heartbeat_ttl_s < 1:
            raise OpenLoRAError(f"heartbeat_ttl_s must be >= 1 second, got {self.heartbeat_ttl_s}")
        if ":" in self.fleet or "{" in self.worker_id or "}" in self.worker_id:
            raise OpenLoRAError("fleet must not contain ':' and worker_id no braces")
        self.router()    # validates the shard map

    def router(self) -> ShardRouter:
        try:
            return ShardRouter(self.num_shards, self.shard_map)
        except ValueError as e:
            raise OpenLoRAError(str(e)) from e

    @property
    def reclaim_idle_ms(self) -> int:
        """Entries idle this long belong to a dead worker: live ones touch theirs every TTL/3."""
        return int(self.heartbeat_ttl_s * 1000)

    @classmethod
    def from_args(cls, argv: list[str] | None = None, env: dict | None = None) -> RuntimeConfig:
        env = os.environ if env is None else env
        p = argparse.ArgumentParser(prog="python -m worker.runtime", description="Run one OpenLoRA queue worker.")
        e = env.get
        p.add_argument("--model-dir", default=e("OPENLORA_MODEL_DIR"), required=not e("OPENLORA_MODEL_DIR"))
        p.add_argument("--redis-url", default=e("REDIS_URL", cls.redis_url))
        p.add_argument("--database-url", default=e("DATABASE_URL"),
                       help="record token usage there, and find registered adapters (files in $OPENLORA_STORE)")
        p.add_argument("--fleet", default=e("OPENLORA_FLEET", cls.fleet))
        p.add_argument("--worker-id", default=e("OPENLORA_WORKER_ID"))
        p.add_argument("--device", default=e("OPENLORA_DEVICE", cls.device))
        p.add_argument("--dtype", default=e("OPENLORA_DTYPE"))
        p.add_argument("--max-num-seqs", type=int, default=int(e("OPENLORA_MAX_NUM_SEQS", cls.max_num_seqs)))
        p.add_argument("--batch-share", type=float, default=float(e("OPENLORA_BATCH_SHARE", cls.batch_share)),
                       help="share of --max-num-seqs that low-priority (batch scoring) jobs may hold")
        p.add_argument("--max-loras", type=int, default=int(e("OPENLORA_MAX_LORAS", cls.max_loras)))
        p.add_argument("--engine-options", default=e("OPENLORA_ENGINE_OPTIONS", "{}"), help="JSON of EngineConfig fields")
        p.add_argument("--adapter-dirs", default=e("OPENLORA_ADAPTER_DIRS", ""),
                       help="JSON {name: path}, name=path,..., or a root folder whose subfolders are adapters")
        p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
        p.add_argument("--adapter-store", default=e("OPENLORA_STORE") or None,
                       help="the registry's store root (default $OPENLORA_HOME/store); used with --database-url")
        p.add_argument("--preload", default=e("OPENLORA_PRELOAD", ""), help="comma-separated adapter ids")
        p.add_argument("--shards", type=int, default=int(e("OPENLORA_SHARDS", DEFAULT_NUM_SHARDS)))
        p.add_argument("--shard-map", default=e("OPENLORA_SHARD_MAP", "{}"), help="JSON {adapter: shard}")
        p.add_argument("--heartbeat-ttl", type=float, default=float(e("OPENLORA_HEARTBEAT_TTL", cls.heartbeat_ttl_s)))
        p.add_argument("--max-attempts", type=int, default=int(e("OPENLORA_MAX_ATTEMPTS", cls.max_attempts)))
        p.add_argument("--steal-after", type=float, default=float(e("OPENLORA_STEAL_AFTER", cls.steal_after_s)))
        p.add_argument("--grace", type=float, default=float(e("OPENLORA_GRACE", cls.grace_s)))
        p.add_argument("--torch-threads", type=int, default=int(e("OPENLORA_TORCH_THREADS", 0)) or None)
        a = p.parse_args(argv)
        try:
            adapters = AdapterDirectory.parse(a.adapter_dirs).merged(AdapterDirectory.parse(",".join(a.adapter)))
            options, shard_map = json.loads(a.engine_options), json.loads(a.shard_map)
        except (ValueError, TypeError) as err:
            raise OpenLoRAError(f"bad worker configuration: {err}") from err
        if a.database_url:           # adapters registered through the API or the CLI, from their store
            adapters.registry = RegistryLookup(a.database_url, a.adapter_store)
        extra = {"worker_id": a.worker_id} if a.worker_id else {}
        return cls(model_dir=a.model_dir, redis_url=a.redis_url, database_url=a.database_url, fleet=a.fleet, device=a.device, dtype=a.dtype,
                   max_num_seqs=a.max_num_seqs, batch_share=a.batch_share, max_loras=a.max_loras, engine_options=options, adapters=adapters,
                   preload=[x for x in a.preload.split(",") if x], num_shards=a.shards, shard_map=shard_map,
                   heartbeat_ttl_s=a.heartbeat_ttl, max_attempts=a.max_attempts, steal_after_s=a.steal_after,
                   grace_s=a.grace, torch_threads=a.torch_threads, **extra)
