"""What the engine hands back: per-step increments for streaming and whole completions."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)   # the N most likely tokens at this position
    greedy: bool | None = None        # prompt logprobs: the token is the most likely one here


@dataclass
class RequestOutput:
    """What one step produced for one request (streaming)."""
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    logprobs: list[TokenLogprob]
    finished: bool = False
    finish_reason: str | None = None      # "stop" | "length" | "abort" | "error"
    error: str | None = None
    prompt_tokens: int = 0                # on the final output: the usage to bill
    completion_tokens: int = 0


@dataclass
class CompletionOutput:
    """A finished request."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    adapter: str | None = None
