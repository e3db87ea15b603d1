"""Log-likelihood scoring: how likely a completion is after its prompt, from prompt logprobs.

A scored request is one sequence ``prompt_ids + completion_ids`` whose prompt logprobs are
computed from the first completion position on (``SamplingParams.prompt_logprobs_from``);
without a completion the whole prompt after its first token is scored (perplexity).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from worker.errors import InvalidRequestError
from worker.outputs import TokenLogprob
from worker.sampling_params import SamplingParams


@dataclass
class LoglikScore:
    logprob_sum: float          # sum of log p(token | everything before it) over the scored tokens
    logprob_mean: float
    tokens: int                 # scored tokens
    greedy: bool                # every scored token is the most likely one at its position
    token_logprobs: list[float] | None = field(default=None)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.token_logprobs is None:
            del d["token_logprobs"]
        return d


def encode_pair(tokenizer, prompt: str | list[int], completion: str | list[int] | None) -> tuple[list[int], int]:
    """(token ids of prompt + completion, index of the first completion token).

    Text is tokenized in two parts (special tokens on the prompt only), the way
    evaluation harnesses do, so the completion's tokens do not depend on the prompt's
    last characters. Without a completion the index is 1.
    """
    def ids(x, special: bool) -> list[int]:
        if isinstance(x, str):
            if tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids instead of text")
            return tokenizer.encode(x, add_special_tokens=special)
        return list(x)
    p = ids(prompt, True)
    if not p:
        raise InvalidRequestError("prompt is empty")
    if completion is None:
        return p, 1
    c = ids(completion, False)
    if not c:
        raise InvalidRequestError("completion is empty: nothing to score")
    return p + c, len(p)


def score_params(start: int, top_n: int | None = None) -> SamplingParams:
    """The engine request that scores positions ``start..``: greedy, one throwaway token."""
    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_n or 0, prompt_logprobs_from=start,
                          ignore_eos=True)


def loglik(prompt_logprobs: list[TokenLogprob | dict | None], start: int, per_token: bool = False) -> LoglikScore:
    """Sum, mean and greedy flag over positions ``start..`` of a scored sequence's prompt logprobs."""
    scored = [lp for lp in prompt_logprobs[start:] if lp is not None]
    if len(scored) != len(prompt_logprobs) - start:
        raise ValueError("some positions after start were not scored")
    values = [lp["logprob"] if isinstance(lp, dict) else lp.logprob for lp in scored]
    greedy = [lp.get("greedy") if isinstance(lp, dict) else lp.greedy for lp in scored]
    total = math.fsum(values)
    return LoglikScore(logprob_sum=total, logprob_mean=total / len(values) if values else float("nan"),
                       tokens=len(values), greedy=all(bool(g) for g in greedy),
                       token_logprobs=values if per_token else None)
