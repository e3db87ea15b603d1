"""Errors the client side raises; each names what went wrong and what to do about it."""
from __future__ import annotations


class ProducerError(Exception):
    """Base class of the errors raised by ``producer``."""


class JobValidationError(ProducerError, ValueError):
    """A job is malformed; ``field`` names the offending field (dotted path, e.g. ``params.top_p``)."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}" if field else message)


class QueueFullError(ProducerError):
    """The shard's queue is over its length limit: back off and retry (HTTP 429)."""

    def __init__(self, shard: str, length: int, limit: int):
        self.shard, self.length, self.limit = shard, length, limit
        super().__init__(f"queue of shard {shard!r} is full ({length} jobs >= limit {limit}); retry later")


class JobNotFoundError(ProducerError, KeyError):
    """No result, replay stream or queue entry is known for this job id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class JobTimeoutError(ProducerError, TimeoutError):
    """``wait`` or ``stream`` ran past its timeout before the job finished."""
