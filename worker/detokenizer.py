"""Incremental detokenization: decode only a short window per new token.

Decoding the window ``ids[prefix_offset:]`` against ``ids[prefix_offset:read_offset]``
yields the new text without re-decoding the whole sequence, and holds back while
the tail is an incomplete UTF-8 character (decoded as U+FFFD).
"""
from __future__ import annotations

from worker.sequence import Sequence


def detokenize_step(tokenizer, seq: Sequence) -> str:
    """Append the text of ``seq``'s newest output tokens to ``seq.text``; returns what was added."""
    ids = seq.output_ids
    if tokenizer is None:
        return ""
    prefix = tokenizer.decode(ids[seq.prefix_offset: seq.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        delta = full[len(prefix):]
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        seq.text += delta
        return delta
    return ""
