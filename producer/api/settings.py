"""The API's and the relay's one config object: flags, else environment variables, else defaults."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from producer.api.auth import key_digest
from producer.client import DEFAULT_QUEUE_LIMIT, DEFAULT_REDIS_URL

# tenants name store folders and Redis hash tags (the same rule as db.store.TENANT_RE)
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_MAX_ADAPTER_BYTES = 1 << 30
DEFAULT_MAX_BATCH_BYTES = 256 << 20    # a batch dataset posted inline
DEFAULT_MAX_REQUEST_BYTES = 4 << 20    # a JSON request: a 128k-token prompt is ~0.5 MB of text, ~1 MB of ids
DEFAULT_MAX_LORA_RANK = 64


class SettingsError(ValueError):
    """The API's configuration is unusable; the message says which setting and why."""


@dataclass
class ApiSettings:
    redis_url: str = DEFAULT_REDIS_URL
    fleet: str = "default"                      # whose heartbeats count as live workers
    # key (or its "sha256:<hex>") -> tenant; empty = open, single tenant. Only digests are kept.
    api_keys: dict[str, str] = field(default_factory=dict)
    model_dir: str | None = None                # base model: its name, tokenizer (chat template, lengths)
    model_name: str | None = None               # the base model's id in /v1/models (default: model dir name)
    adapter_dirs: str = ""                      # as the worker's --adapter-dirs: JSON, name=path,... or a root
    adapters: list[str] = field(default_factory=list)        # more adapter ids the API should accept
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    request_timeout_s: float = 600.0            # a non-streaming request waits this long for its result
    block_ms: int = 1000
    database_url: str | None = None             # the adapter registry (/v1/adapters); None: no registry
    store_root: str | None = None               # registered adapters' files (default $OPENLORA_HOME/store)
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES   # largest adapter upload
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    rate_limit: float = 0.0                     # requests/s per tenant, shared by all API processes; 0 = off
    rate_burst: int | None = None               # requests at once (default: the rate, at least 1)
    tenant_max_queued: int = 0                  # queued + running jobs per tenant; 0 = off
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES   # largest request body (uploads excepted): 413 past it
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES       # largest POST /v1/batches body (a dataset)

    def __post_init__(self) -> None:
        self.api_keys = {key_digest(k): t for k, t in self.api_keys.items()}   # no plaintext kept
        bad = sorted({t for t in self.api_keys.values() if not TENANT_RE.match(t)})
        if bad:
            raise SettingsError(f"tenant name(s) {bad} must be 1-128 chars of [A-Za-z0-9._-] starting with a "
                                "letter or digit")
        if self.queue_limit < 1:
            raise SettingsError(f"queue_limit must be >= 1, got {self.queue_limit}")
        if not (self.rate_limit >= 0 and math.isfinite(self.rate_limit)):
            raise SettingsError(f"rate_limit (OPENLORA_RATE_LIMIT) must be >= 0 requests/s, got {self.rate_limit}")
        if self.rate_burst is None:
            self.rate_burst = max(1, math.ceil(self.rate_limit))
        if self.rate_burst < 1:
            raise SettingsError(f"rate_burst (OPENLORA_RATE_BURST) must be >= 1, got {self.rate_burst}")
        if self.tenant_max_queued < 0:
            raise SettingsError(f"tenant_max_queued (OPENLORA_TENANT_MAX_QUEUED) must be >= 0, "
                                f"got {self.tenant_max_queued}")
        if self.max_adapter_bytes < 1 or self.max_lora_rank < 1:
            raise SettingsError("max_adapter_bytes and max_lora_rank must be >= 1")
        if self.max_batch_bytes < 1024:
            raise SettingsError(f"max_batch_bytes (OPENLORA_MAX_BATCH_BYTES) must be >= 1024, got {self.max_batch_bytes}")
        if self.max_request_bytes < 1024:
            raise SettingsError(f"max_request_bytes (OPENLORA_MAX_REQUEST_BYTES) must be >= 1024, "
                                f"got {self.max_request_bytes}")
        if self.request_timeout_s <= 0:
            raise SettingsError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.model_dir is not None and not Path(self.model_dir).is_dir():
            raise SettingsError(f"model_dir {self.model_dir!r} is not a directory")

    def __repr__(self) -> str:
        """No secrets: keys as a count, URL passwords masked (settings end up in logs and tracebacks)."""
        shown = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "api_keys":
                shown.append(f"api_keys=<{len(v)} key digests, {len(set(v.values()))} tenants>")
                continue
            if f.name.endswith("_url") and isinstance(v, str):
                v = mask_url(v)
            shown.append(f"{f.name}={v!r}")
        return f"ApiSettings({', '.join(shown)})"

    @property
    def base_model(self) -> str:
        if self.model_name:
            return self.model_name
        return Path(self.model_dir).name if self.model_dir else "base"

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> ApiSettings:
        e = (os.environ if env is None else env).get
        kw = dict(redis_url=e("REDIS_URL", DEFAULT_REDIS_URL), fleet=e("OPENLORA_FLEET", "default"),
                  api_keys=parse_api_keys(e("OPENLORA_API_KEYS", "")), model_dir=e("OPENLORA_MODEL_DIR") or None,
                  model_name=e("OPENLORA_MODEL_NAME") or None, adapter_dirs=e("OPENLORA_ADAPTER_DIRS", ""),
                  adapters=[a for a in e("OPENLORA_ADAPTERS", "").split(",") if a],
                  queue_limit=int(e("OPENLORA_QUEUE_LIMIT", DEFAULT_QUEUE_LIMIT)),
                  request_timeout_s=float(e("OPENLORA_REQUEST_TIMEOUT", 600)),
                  database_url=e("DATABASE_URL") or None, store_root=e("OPENLORA_STORE") or None,
                  max_adapter_bytes=int(e("OPENLORA_MAX_ADAPTER_BYTES", DEFAULT_MAX_ADAPTER_BYTES)),
                  max_lora_rank=int(e("OPENLORA_MAX_LORA_RANK", DEFAULT_MAX_LORA_RANK)),
                  rate_limit=float(e("OPENLORA_RATE_LIMIT", 0)),
                  rate_burst=int(e("OPENLORA_RATE_BURST")) if e("OPENLORA_RATE_BURST") else None,
                  tenant_max_queued=int(e("OPENLORA_TENANT_MAX_QUEUED", 0)),
                  max_request_bytes=int(e("OPENLORA_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES)),
                  max_batch_bytes=int(e("OPENLORA_MAX_BATCH_BYTES", DEFAULT_MAX_BATCH_BYTES)))
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


def mask_url(url: str) -> str:
    """``scheme://user:***@host/...``: the URL without its password."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "<unparsable url>"
    return urlunsplit(parts._replace(netloc=netloc))


def parse_api_keys(spec: str) -> dict[str, str]:
    """``{"key": "tenant", ...}`` as JSON, or the path of a file holding that JSON; empty = no keys."""
    spec = (spec or "").strip()
    if not spec:
        return {}
    if not spec.startswith("{"):
        try:
            spec = Path(spec).read_text()
        except OSError as e:
            raise SettingsError(f"OPENLORA_API_KEYS: cannot read key file {spec!r}: {e}") from e
    try:
        keys = json.loads(spec)
    except ValueError as e:
        raise SettingsError(f"OPENLORA_API_KEYS is not valid JSON: {e}") from e
    if not isinstance(keys, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                             for k, v in keys.items()):
        raise SettingsError('OPENLORA_API_KEYS must be a JSON object {"api key": "tenant", ...} of non-empty strings')
    return keys
