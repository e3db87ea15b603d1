"""After sampling: append the token, detokenize, check every stop condition, build the outputs."""
from __future__ import annotations

from worker.detokenizer import detokenize_step
from worker.outputs import CompletionOutput, RequestOutput, TokenLogprob
from worker.sequence import Sequence


def process_sampled(seq: Sequence, token: int, lp: TokenLogprob | None, tokenizer, max_model_len: int) -> RequestOutput:
    seq.output_ids.append(token)
    if lp is not None:
        seq.logprobs.append(lp)
    before = len(seq.text)
    detokenize_step(tokenizer, seq)
    p = seq.params
    if token in seq.stop_ids:
        seq.finish_reason = "stop"
    elif p.stop and _cut_at_stop(seq, before):
        seq.finish_reason = "stop"
    elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"
    finished = seq.finish_reason is not None
    # while running, hold back what could still turn out to be the start of a stop string
    hold = 0 if finished or not p.stop else max(len(s) for s in p.stop) - 1
    end = max(seq.emitted, len(seq.text) - hold)
    delta, seq.emitted = seq.text[seq.emitted:end], end
    out = RequestOutput(seq.request_id, [token], delta, [lp] if lp is not None else [], finished=finished,
                        finish_reason=seq.finish_reason)
    if finished:
        out.prompt_tokens, out.completion_tokens = len(seq.prompt_ids), len(seq.output_ids)
    return out


def _cut_at_stop(seq: Sequence, before: int) -> bool:
    """Truncate ``seq.text`` before the first stop string that the new text completes."""
    longest = max(len(s) for s in seq.params.stop)
    start = max(0, before - longest + 1)
    hits = [i for i in (seq.text.find(s, start) for s in seq.params.stop) if i >= 0]
    if not hits:
        return False
    seq.text = seq.text[: min(hits)]
    seq.emitted = min(seq.emitted, len(seq.text))
    return True


def finish_output(seq: Sequence, tokenizer) -> CompletionOutput:
    text = seq.text
    if seq.params.echo and tokenizer is not None:
        text = tokenizer.decode(seq.prompt_ids, skip_special_tokens=True) + text
    return CompletionOutput(
        request_id=seq.request_id, prompt_token_ids=seq.prompt_ids, token_ids=list(seq.output_ids), text=text,
        finish_reason=seq.finish_reason, logprobs=seq.logprobs if seq.params.logprobs is not None else None,
        prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
        error=seq.error, adapter=seq.adapter)
