"""Paged KV cache: fixed-size blocks, a free-list allocator, per-layer K/V tensors."""
from __future__ import annotations

from collections import deque

import torch

from worker.model.config import ModelConfig


class BlockAllocator:
    """Hands out block ids ``first..first+num_blocks-1`` from a free list; freed blocks go back to be reused."""

    def __init__(self, num_blocks: int, first: int = 0):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(first, first + num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class KVCache:
    """K and V for every layer: [num_blocks + 1, block_size, num_kv_heads, head_dim] each.

    Block 0 is never handed out: padded rows of a captured decode step write
    their K/V there, so padding can never touch a real sequence's cache.
    """
    SCRATCH_BLOCK = 0

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        shape = (num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.block_size = block_size
        self.layers = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                       for _ in range(cfg.num_layers)]
        self.allocator = BlockAllocator(num_blocks, first=1)

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
