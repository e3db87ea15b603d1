"""What the runtime tracks for one job it holds: its delivery, what clients have already seen,
and what this run has produced; and the translation from wire job to engine request."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from producer.protocol import CANCELLED, DONE, EXPIRED, FAILED, Chunk, Job, JobResult
from worker.outputs import RequestOutput, TokenLogprob
from worker.sampling_params import SamplingParams
from worker.scoring import loglik

# why a job stopped early -> (finish_reason, status)
STOPS = {"cancelled": ("cancelled", CANCELLED), "deadline": ("deadline", EXPIRED), "error": ("error", FAILED)}


@dataclass
class Delivery:
    """One stream entry handed to this worker."""
    shard: str
    entry_id: str
    raw: str | None                 # the job JSON (None: the entry was deleted)
    deliveries: int = 1


def sampling_params(job: Job) -> SamplingParams:
    """Wire params -> engine params (raises InvalidRequestError). Scoring scores the prompt only."""
    p = job.params
    kw = dict(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
              stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
              logprobs=p.logprobs, echo=p.echo)
    if job.mode == "score":     # the first scored position is set once the prompt is tokenized
        kw.update(max_tokens=1, temperature=0.0, logprobs=None, prompt_logprobs=p.logprobs or 0, stop=[],
                  ignore_eos=True, echo=False)
    return SamplingParams(**kw)


def logprob_json(lp: TokenLogprob | None) -> dict | None:
    if lp is None:
        return None
    return {"token_id": lp.token_id, "logprob": lp.logprob, "top": {str(k): v for k, v in lp.top.items()}}


@dataclass
class RunningJob:
    job: Job
    delivery: Delivery
    state: str = "starting"         # starting -> running -> finishing
    stop_reason: str | None = None  # cancelled | deadline, once asked
    abandoned: bool = False         # shutdown past grace: no result, no ack; left for reclaim
    prior: dict[int, Chunk] = field(default_factory=dict)   # chunks clients already have (earlier runs)
    next_seq: int = 0               # tokens already in the replay stream
    generated: int = 0              # tokens this run has produced
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list | None = None
    score: dict | None = None        # mode=score: the log-likelihood summary
    prompt_tokens: int = 0
    echo: str | None = None
    timer: object = None

    @property
    def id(self) -> str:
        return self.job.id

    def set_prior(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            self.prior[c.seq] = c
            self.next_seq = max(self.next_seq, c.end)

    def on_output(self, out: RequestOutput) -> Chunk | None:
        """Fold one engine output in; returns the chunk to publish (None: clients already have it)."""
        lps = [logprob_json(lp) for lp in out.logprobs] if self.job.params.logprobs is not None else None
        finish = out.finish_reason
        if finish == "abort":
            finish = self.stop_reason or "cancelled"
        mine = Chunk(self.generated, out.text_delta, list(out.new_token_ids), lps or None,
                     finish if out.finished else None, out.error)
        self.generated += len(out.new_token_ids)
        seen = self.prior.get(mine.seq) if mine.seq < self.next_seq else None
        kept = seen if seen is not None and seen.token_ids else mine
        self.texts.append(kept.text)
        self.token_ids.extend(kept.token_ids)
        self.logprobs.extend(kept.logprobs or [])
        if self.job.mode == "score" and not mine.final:
            return None             # scoring streams nothing but its end
        if mine.seq < self.next_seq and not mine.final:
            return None
        return mine

    def result(self, finish_reason: str, worker: str, error: str | None = None) -> JobResult:
        status = STOPS.get(finish_reason, (finish_reason, DONE))[1]
        text = "".join(self.texts)
        if self.echo:
            text = self.echo + text
        score = self.job.mode == "score"
        return JobResult(
            id=self.id, status=status, text="" if score else text, token_ids=[] if score else self.token_ids,
            finish_reason=finish_reason, error=error, adapter=self.job.adapter,
            logprobs=self.logprobs if self.job.params.logprobs is not None and not score else None,
            prompt_logprobs=self.prompt_logprobs, score=self.score, prompt_tokens=self.prompt_tokens,
            completion_tokens=0 if score else len(self.token_ids), attempts=self.delivery.deliveries, worker=worker,
            submitted_at=self.job.submitted_at, finished_at=time.time())

    def on_prompt_logprobs(self, lps: list, start: int) -> None:
        """mode=score: keep the summary, and the per-position records when the job asked for logprobs."""
        per_token = self.job.params.logprobs is not None
        self.score = loglik(lps, start, per_token).to_dict()
        if per_token:
            self.prompt_logprobs = [logprob_json(lp) for lp in lps]

    def closing_chunk(self, finish_reason: str, error: str | None = None) -> Chunk:
        """The final chunk for a job that ends without a final engine output (refused, expired...)."""
        return Chunk(max(self.generated, self.next_seq), "", [], finish_reason=finish_reason, error=error)


def failed_result(job_id: str, reason: str, error: str, delivery: Delivery, worker: str,
                  job: Job | None = None) -> JobResult:
    status = STOPS.get(reason, (reason, FAILED))[1]
    return JobResult(id=job_id, status=status, finish_reason=reason, error=error,
                     adapter=job.adapter if job else None, attempts=delivery.deliveries, worker=worker,
                     submitted_at=job.submitted_at if job else None, finished_at=time.time())
