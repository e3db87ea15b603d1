"""Turn logits into tokens: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Sampling uses the exponential-race form (argmax of p / E, E ~ Exp(1)), which
draws from p exactly and lets each seeded request use its own generator, so a
seed gives the same tokens whatever else shares the batch. Logprobs are those
of the model's own distribution (before temperature and truncation), as in
the OpenAI API.
"""
from __future__ import annotations

import torch

from worker.outputs import TokenLogprob
from worker.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [N, vocab] float32 -> (token per row, logprob record per row or None)."""
    return sample_async(logits, params, generators).result()


class Sampled:
    """A step's sampling, queued on the device: ``tokens`` [N] (int64, on the logits' device) can feed the
    next step before the host has seen them; ``result()`` reads everything back. On CUDA the copy to the host
    is queued right behind the sampling, so that reading it waits for this step only, not for a step
    launched after it."""

    def __init__(self, tokens: torch.Tensor, want: list[int | None], packed: torch.Tensor | None, top_n: int):
        self.tokens, self._want, self._top_n = tokens, want, top_n
        out = tokens if packed is None else packed
        self._ready = None
        if out.is_cuda:
            out = out.to("cpu", non_blocking=True)          # into pinned memory
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._host, self._packed = out, packed is not None

    def result(self) -> tuple[list[int], list[TokenLogprob | None]]:
        if self._ready is not None:
            self._ready.synchronize()
        n, want, top_n = self.tokens.shape[0], self._want, self._top_n
        if not self._packed:
            return self._host.tolist(), [None] * n          # the step's one device->host copy
        host = self._host.tolist()
        out_tokens, out_lp = [], []
        for i in range(n):
            row = host[i]
            tok = int(row[0])
            out_tokens.append(tok)
            if want[i] is None:
                out_lp.append(None)
                continue
            top = {int(row[2 + top_n + j]): row[2 + j] for j in range(want[i])}
            out_lp.append(TokenLogprob(token_id=tok, logprob=row[1], top=top))
        return out_tokens, out_lp


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a device tensor, without waiting for the device's queue (``torch.tensor(values,
    device=cuda)`` synchronises with it): through pinned memory and a non-blocking copy on CUDA."""
    if device.type != "cuda":
        return torch.tensor(values, device=device, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def sample_async(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> Sampled:
    """``sample`` without waiting for the device: greedy and logprob requests queue device work only (the
    others copy their temperatures and truncations to the device first)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = to_device(rows, logits.device)
        x = logits[idx] / to_device([params[i].temperature for i in rows], logits.device)[:, None]
        x = _top_k(x, [params[i].top_k for i in rows])
        x = _top_p(x, [params[i].top_p for i in rows])
        probs = torch.softmax(x, dim=-1)
        race = torch.empty_like(probs)
        for j, i in enumerate(rows):
            race[j].exponential_(generator=generators[i])
        tokens[idx] = (probs / race).argmax(dim=-1)
    want = [p.logprobs for p in params]
    if all(w is None for w in want):
        return Sampled(tokens, want, None, 0)
    top_n = max(w for w in want if w is not None)
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])
    # one device->host copy for everything the host needs
    parts = [tokens[:, None].float(), chosen]
    if top_n:
        top_v, top_i = logprobs.topk(top_n, dim=-1)
        parts += [top_v, top_i.float()]
    return Sampled(tokens, want, torch.cat(parts, dim=1), top_n)


def _top_k(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    if not any(ks):
        return x
    vocab = x.shape[-1]
    k = to_device([k if 0 < k < vocab else vocab for k in ks], x.device)
    kth = x.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    return x.masked_fill(x < kth, float("-inf"))


def _top_p(x: torch.Tensor, ps: list[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in ps):
        return x
    p = to_device(ps, x.device, torch.float32)[:, None]
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(dim=-1)
    # drop a token when the tokens before it already reach p; the most likely token always stays
    drop = (probs.cumsum(dim=-1) - probs) >= p
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def prompt_logprobs(logits: torch.Tensor, targets: list[int], top_n: int) -> list[TokenLogprob]:
    """logits [n, vocab] predicting ``targets`` [n] -> one record per target."""
    lp = torch.log_softmax(logits, dim=-1)
    t = torch.tensor(targets, device=logits.device)
    # the targets' logprobs and whether each is the argmax, in one device-to-host copy
    chosen, greedy = torch.stack((lp.gather(1, t[:, None]).squeeze(1), (lp.argmax(dim=-1) == t).to(lp.dtype))).tolist()
    if top_n:
        top_v, top_i = lp.topk(top_n, dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
    out = []
    for j, tok in enumerate(targets):
        top = {top_i[j][m]: top_v[j][m] for m in range(top_n)} if top_n else {}
        out.append(TokenLogprob(token_id=tok, logprob=chosen[j], top=top, greedy=greedy[j] == 1.0))
    return out
