"""The API's and the relay's one config object: flags, else environment variables, else defaults."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from producer.client import DEFAULT_QUEUE_LIMIT, DEFAULT_REDIS_URL


class SettingsError(ValueError):
    """The API's configuration is unusable; the message says which setting and why."""


@dataclass
class ApiSettings:
    redis_url: str = DEFAULT_REDIS_URL
    fleet: str = "default"                      # whose heartbeats count as live workers
    api_keys: dict[str, str] = field(default_factory=dict)   # key -> tenant; empty = open, single tenant
    model_dir: str | None = None                # base model: its name, tokenizer (chat template, lengths)
    model_name: str | None = None               # the base model's id in /v1/models (default: model dir name)
    adapter_dirs: str = ""                      # as the worker's --adapter-dirs: JSON, name=path,... or a root
    adapters: list[str] = field(default_factory=list)        # more adapter ids the API should accept
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    request_timeout_s: float = 600.0            # a non-streaming request waits this long for its result
    block_ms: int = 1000

    def __post_init__(self) -> None:
        if self.queue_limit < 1:
            raise SettingsError(f"queue_limit must be >= 1, got {self.queue_limit}")
        if self.request_timeout_s <= 0:
            raise SettingsError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.model_dir is not None and not Path(self.model_dir).is_dir():
            raise SettingsError(f"model_dir {self.model_dir!r} is not a directory")

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
                  request_timeout_s=float(e("OPENLORA_REQUEST_TIMEOUT", 600)))
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


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
