"""Our chunks and results in OpenAI's response shapes (completions, chat, SSE chunks)."""
from __future__ import annotations

import json
import time

from producer.api.tokens import BaseModelInfo
from producer.protocol import Chunk, JobResult

# our finish reasons that OpenAI also has; the others (cancelled, deadline, error) pass through as they are
_FINISH = {"stop": "stop", "length": "length"}


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else _FINISH.get(reason, reason)


def completion_logprobs(lps: list[dict] | None, info: BaseModelInfo, offset: int = 0) -> dict | None:
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        piece = info.piece(lp["token_id"])
        tokens.append(piece)
        token_lps.append(lp["logprob"])
        tops.append({info.piece(int(t)): v for t, v in lp.get("top", {}).items()})
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(lps: list[dict] | None, info: BaseModelInfo) -> dict | None:
    if lps is None:
        return None
    content = []
    for lp in lps:
        piece = info.piece(lp["token_id"])
        top = [{"token": info.piece(int(t)), "logprob": v, "bytes": list(info.piece(int(t)).encode())}
               for t, v in lp.get("top", {}).items()]
        content.append({"token": piece, "logprob": lp["logprob"], "bytes": list(piece.encode()), "top_logprobs": top})
    return {"content": content}


def usage(res: JobResult | None, prompt_tokens: int = 0, completion_tokens: int = 0) -> dict:
    p = res.prompt_tokens if res is not None else prompt_tokens
    c = res.completion_tokens if res is not None else completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion(res: JobResult, model: str, info: BaseModelInfo, echo_len: int) -> dict:
    return {"id": res.id, "object": "text_completion", "created": int(res.submitted_at or time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "text": res.text, "finish_reason": finish_reason(res.finish_reason),
                         "logprobs": completion_logprobs(res.logprobs, info, echo_len)}],
            "usage": usage(res)}


def chat_completion(res: JobResult, model: str, info: BaseModelInfo) -> dict:
    return {"id": res.id, "object": "chat.completion", "created": int(res.submitted_at or time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                         "finish_reason": finish_reason(res.finish_reason),
                         "logprobs": chat_logprobs(res.logprobs, info)}],
            "usage": usage(res)}


class StreamFormatter:
    """Turns chunks into the SSE ``data:`` lines of one OpenAI stream."""

    def __init__(self, job_id: str, model: str, chat: bool, info: BaseModelInfo, include_usage: bool):
        self.job_id, self.model, self.chat, self.info = job_id, model, chat, info
        self.include_usage = include_usage
        self.created = int(time.time())
        self.offset = 0
        self.completion_tokens = 0

    def _event(self, choice: dict | None, **extra) -> str:
        body = {"id": self.job_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": None,
                "choices": [choice] if choice is not None else [], **extra}
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def start(self, echo: str | None) -> list[str]:
        """Lines sent before the first token: the chat role, or the echoed prompt."""
        if self.chat:
            return [self._event({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})]
        if echo:
            self.offset = len(echo)
            return [self._event({"index": 0, "text": echo, "logprobs": None, "finish_reason": None})]
        return []

    def chunk(self, c: Chunk, want_logprobs: bool) -> list[str]:
        out = []
        self.completion_tokens += len(c.token_ids)
        if c.error and c.final:
            out.append(f"data: {json.dumps({'error': {'message': c.error, 'type': 'server_error', 'param': None, 'code': c.finish_reason}})}\n\n")
        if c.token_ids or c.text or c.final:
            fr = finish_reason(c.finish_reason)
            lps = c.logprobs if want_logprobs else None
            if self.chat:
                delta = {"content": c.text} if (c.text or not c.final) else {}
                out.append(self._event({"index": 0, "delta": delta, "finish_reason": fr,
                                        "logprobs": chat_logprobs(lps, self.info) if lps else None}))
            else:
                out.append(self._event({"index": 0, "text": c.text, "finish_reason": fr,
                                        "logprobs": completion_logprobs(lps, self.info, self.offset) if lps else None}))
                self.offset += len(c.text)
        return out

    def end(self, res: JobResult | None, prompt_tokens: int) -> list[str]:
        out = []
        if self.include_usage:
            out.append(self._event(None, usage=usage(res, prompt_tokens, self.completion_tokens)))
        out.append("data: [DONE]\n\n")
        return out
