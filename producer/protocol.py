"""The wire protocol: what a job, a token chunk and a final result look like as JSON.

Jobs are validated here, at the edge, before they reach Redis; workers validate
again when they read them (a stream can be written by anyone). Never pickle.
"""
from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from producer.errors import JobValidationError

JOB_ID_RE = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")   # no braces: ids go inside Redis hash tags
MERGE_STRATEGIES = ("linear", "cat", "ties", "dare_linear", "dare_ties")   # cat = linear: ranks concatenated
MAX_LOGPROBS = 20
MAX_STOP = 16

# final states of a job, as ``JobResult.status``
DONE, FAILED, CANCELLED, EXPIRED = "done", "failed", "cancelled", "expired"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Params(_Strict):
    """Sampling parameters; ranges mirror ``worker.sampling_params.SamplingParams``."""
    max_tokens: int = Field(16, ge=1, le=1 << 20)
    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)   # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)                                                # 0 = off
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=1024)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v):
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _ids_non_negative(cls, v):
        if any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v


class AdapterWeight(_Strict):
    id: str = Field(min_length=1, max_length=256)
    weight: float = Field(1.0, allow_inf_nan=False)


class MergeParams(_Strict):
    """Parameters of the TIES / DARE merges (PEFT's names)."""
    density: float = Field(gt=0.0, le=1.0, allow_inf_nan=False)
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: int | None = Field(None, ge=0, lt=2**63)       # DARE's random pruning


class Job(_Strict):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    adapter: str | None = Field(None, min_length=1, max_length=256)   # None = the base model
    adapters: list[AdapterWeight] | None = Field(None, min_length=1, max_length=64)
    merge: str | None = None
    merge_params: MergeParams | None = None
    prompt: str | None = None
    input_ids: list[int] | None = Field(None, min_length=1)
    completion: str | None = None                    # mode=score: score this text after the prompt
    completion_ids: list[int] | None = Field(None, min_length=1)   # ... or these tokens after input_ids
    params: Params = Field(default_factory=Params)
    mode: Literal["generate", "score"] = "generate"
    priority: int = 0
    deadline: float | None = Field(None, gt=0, allow_inf_nan=False)   # unix seconds
    tenant: str | None = Field(None, max_length=256)
    submitted_at: float | None = None

    @field_validator("id")
    @classmethod
    def _id_charset(cls, v):
        if not JOB_ID_RE.match(v):
            raise ValueError("must be 1-128 characters of A-Z a-z 0-9 . _ : @ / -")
        return v

    @field_validator("input_ids", "completion_ids")
    @classmethod
    def _ids_non_negative(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if (self.prompt is None) == (self.input_ids is None):
            raise _FieldError("prompt", "give exactly one of prompt (text) or input_ids")
        if self.prompt is not None and not self.prompt:
            raise _FieldError("prompt", "is empty")
        if self.completion is not None or self.completion_ids is not None:
            if self.mode != "score":
                raise _FieldError("completion", "only applies to mode=score")
            if self.completion is not None and (self.prompt is None or self.completion_ids is not None):
                raise _FieldError("completion", "text completion goes with a text prompt (completion_ids with input_ids)")
            if self.completion_ids is not None and self.input_ids is None:
                raise _FieldError("completion_ids", "goes with input_ids (a text prompt takes completion)")
            if self.completion == "":
                raise _FieldError("completion", "is empty: nothing to score")
        if self.adapter is not None and self.adapters is not None:
            raise _FieldError("adapters", "give either adapter or adapters (an ensemble), not both")
        if self.adapters is not None:
            ids = [a.id for a in self.adapters]
            if len(set(ids)) != len(ids):
                raise _FieldError("adapters", f"duplicate adapter ids in {ids}")
            self.merge = self.merge or "linear"
            if self.merge not in MERGE_STRATEGIES:
                raise _FieldError("merge", f"must be one of {', '.join(MERGE_STRATEGIES)}, got {self.merge!r}")
            if self.merge not in ("linear", "cat") and self.merge_params is None:
                raise _FieldError("merge_params", f"merge {self.merge!r} needs merge_params with a density in (0, 1]")
        elif self.merge is not None or self.merge_params is not None:
            raise _FieldError("merge", "only applies to an ensemble (adapters)")
        return self

    # -- helpers -----------------------------------------------------------------------------
    @property
    def is_ensemble(self) -> bool:
        return self.adapters is not None

    @property
    def route_key(self) -> str | None:
        """What decides the shard: the adapter, or the ensemble's sorted ids; None = base model."""
        if self.adapters is not None:
            return "+".join(sorted(a.id for a in self.adapters))
        return self.adapter

    def pinned(self) -> Job:
        """A copy ready to enqueue: stamped, and with a seed when sampling is random, so a re-run
        after a crash reproduces the tokens clients have already seen."""
        upd: dict[str, Any] = {"submitted_at": self.submitted_at or time.time()}
        if self.params.temperature > 0 and self.params.seed is None:
            upd["params"] = self.params.model_copy(update={"seed": secrets.randbits(63)})
        return self.model_copy(update=upd)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def parse(cls, data: Job | dict | str | bytes) -> Job:
        """Validate a job from a dict or JSON; raises JobValidationError naming the bad field."""
        if isinstance(data, Job):
            return data
        try:
            if isinstance(data, (str, bytes)):
                return cls.model_validate_json(data)
            if not isinstance(data, dict):
                raise JobValidationError("", f"a job must be a JSON object, got {type(data).__name__}")
            return cls.model_validate(data)
        except ValidationError as e:
            raise _to_job_error(e) from e


class _FieldError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")


def _to_job_error(e: ValidationError) -> JobValidationError:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, _FieldError):
            loc, _, msg = str(inner).partition(": ")
    if err["type"] == "json_invalid":
        loc = loc or "job"
    extra = len(e.errors()) - 1
    return JobValidationError(loc, msg + (f" (and {extra} more errors)" if extra else ""))


@dataclass
class Chunk:
    """A piece of a job's output. ``seq`` = tokens generated before it, so chunks of a re-run line up."""
    seq: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None       # [{token_id, logprob, top: {id: logprob}}]
    finish_reason: str | None = None         # set on the last chunk only
    error: str | None = None

    @property
    def end(self) -> int:
        return self.seq + len(self.token_ids)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> Chunk:
        return cls(**json.loads(data))


@dataclass
class JobResult:
    """The final record of a job, kept in ``keys.result(job)`` for ``result_ttl``."""
    id: str
    status: str                              # done | failed | cancelled | expired
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None         # stop | length | cancelled | deadline | error
    error: str | None = None
    adapter: str | None = None
    logprobs: list[dict] | None = None
    prompt_logprobs: list[dict | None] | None = None   # mode=score, with params.logprobs
    score: dict | None = None                # mode=score: {logprob_sum, logprob_mean, tokens, greedy[, token_logprobs]}
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    worker: str | None = None
    submitted_at: float | None = None
    finished_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == DONE

    def to_hash(self) -> dict[str, str]:
        return {"status": self.status, "data": json.dumps(asdict(self), separators=(",", ":"))}

    @classmethod
    def from_hash(cls, h: dict) -> JobResult | None:
        data = h.get(b"data", h.get("data")) if h else None
        return cls(**json.loads(data)) if data else None
