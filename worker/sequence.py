"""One request as the engine tracks it: tokens, KV blocks, adapter slot, sampling state."""
from __future__ import annotations

import enum
import itertools

import torch

from worker.outputs import TokenLogprob
from worker.sampling_params import SamplingParams

_arrivals = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
                 generator: torch.Generator | None, eos_ids: tuple[int, ...], priority: int = 0):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.adapter = adapter
        self.generator = generator
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.arrival = next(_arrivals)
        self.priority = priority             # higher first; batch scoring runs below 0
        self.status = Status.WAITING
        self.slot = -1                       # LoRA slot while running (-1 = base model)
        self.block_table: list[int] = []
        self.num_computed = 0                # tokens whose K/V are in the cache
        self.skipped = 0                     # admissions passed over for want of a LoRA slot
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.logprobs: list[TokenLogprob] = []
        # positions before prompt_logprobs_from are not scored: None, like position 0
        unscored = min(params.prompt_logprobs_from, len(self.prompt_ids))
        self.prompt_logprobs: list[TokenLogprob | None] = [None] * unscored if params.prompt_logprobs is not None else []
        # incremental detokenization state
        self.text = ""
        self.emitted = 0                     # characters of `text` already streamed
        self.prefix_offset = 0
        self.read_offset = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[i] if i < p else self.output_ids[i - p]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
