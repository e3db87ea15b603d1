"""Reading a job's replay stream: chunks in seq order, each exactly once, whoever wrote them."""
from __future__ import annotations

from producer.protocol import Chunk, JobResult


def text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def field(fields: dict, name: str):
    v = fields.get(name)
    return fields.get(name.encode()) if v is None else v


class ChunkCursor:
    """Turns replay-stream entries into the chunks a client has not seen yet.

    ``next_seq`` is the number of tokens delivered so far; a chunk starting before it
    is a duplicate (a re-run, or a resumed client) and is dropped.
    """

    def __init__(self, from_seq: int = 0):
        self.next_seq = from_seq
        self.last_id = "0-0"
        self.done = False

    def feed(self, entries) -> list[Chunk]:
        out = []
        for eid, fields in entries:
            self.last_id = text(eid)
            if self.done:
                break
            c = Chunk.from_json(field(fields, "data"))
            if c.seq < self.next_seq:
                if not c.final:
                    continue
                c = Chunk(self.next_seq, "", [], finish_reason=c.finish_reason, error=c.error)
            out.append(c)
            self.next_seq = max(self.next_seq, c.end)
            self.done = c.final
        return out

    def from_result(self, res: JobResult) -> Chunk:
        """The closing chunk when the replay stream is gone (expired) but the result is there."""
        self.done = True
        if self.next_seq == 0:
            return Chunk(0, res.text, list(res.token_ids), res.logprobs, res.finish_reason or res.status, res.error)
        return Chunk(self.next_seq, "", [], finish_reason=res.finish_reason or res.status, error=res.error)


def is_final(fields: dict) -> bool:
    return field(fields, "final") is not None
