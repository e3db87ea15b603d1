"""Page-locked host memory allocated once, at start-up, and handed out in chunks.

Page-locking memory (cudaHostAlloc) takes the CUDA driver's lock: an adapter
load that pins 80 MB while decode steps run stalls their launches. The arena
pins its memory before serving starts; a load takes a chunk, and the chunk
returns when its ``Chunk`` handle is freed. Whoever uses the tensors keeps the
handle: the adapter that owns them, which a slot copy in flight holds too.
"""
from __future__ import annotations

import threading

import torch

ALIGN = 256


class PinnedArena:
    def __init__(self, nbytes: int, pin: bool = True):
        self.nbytes = nbytes
        self._buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self._free: list[tuple[int, int]] = [(0, nbytes)]     # (offset, size), sorted by offset
        self._lock = threading.Lock()

    def take(self, nbytes: int, dtype: torch.dtype) -> "Chunk | None":
        """A chunk of ``nbytes`` bytes (``chunk.tensor``: 1-D ``dtype``), or None when the arena is full."""
        size = -(-nbytes // ALIGN) * ALIGN
        with self._lock:
            for i, (off, free) in enumerate(self._free):
                if free >= size:
                    self._free[i:i + 1] = [(off + size, free - size)] if free > size else []
                    break
            else:
                return None
        return Chunk(self, off, size, self._buf[off: off + nbytes].view(dtype))

    def free_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._free)

    def _give_back(self, off: int, size: int) -> None:
        with self._lock:
            self._free.append((off, size))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for o, s in self._free:
                if merged and merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + s)
                else:
                    merged.append((o, s))
            self._free = merged


class Chunk:
    """A piece of the arena; it goes back when this object is freed (keep it as long as its tensor is used)."""

    def __init__(self, arena: PinnedArena, off: int, size: int, tensor: torch.Tensor):
        self._arena, self._off, self._size = arena, off, size
        self.tensor = tensor

    def __del__(self):
        self._arena._give_back(self._off, self._size)
