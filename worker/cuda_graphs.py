"""Decode steps replayed from captured CUDA graphs, one per bucketed batch size.

A decode step launches a few hundred small kernels; replaying them as one
graph removes the launch gaps. Each bucket is captured once per LoRA mode: no
LoRA (no SGMV kernels), one adapter, several adapters (the SGMV wrapper picks
different kernels for the last two, and a graph holds only what it captured).
A batch is padded up to its bucket: padded rows read and write only the KV
cache's scratch block and carry no adapter, and their logits are dropped.
"""
from __future__ import annotations

import torch

from worker.kv_cache import KVCache
from worker.step_inputs import StepBuffers, StepInputs

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model, kv: KVCache, buffers: StepBuffers, max_batch: int, with_lora: bool = True):
        self.model, self.kv, self.buffers = model, kv, buffers
        self.buckets = [b for b in BUCKETS if b <= max_batch]
        if not self.buckets or self.buckets[-1] < max_batch:
            self.buckets.append(max_batch)
        self.max_batch = self.buckets[-1]
        self.modes = ("none", "single", "multi") if with_lora else ("none",)
        self.graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def capture(self, progress=None) -> None:
        pool = None
        for n in reversed(self.buckets):            # largest first, so smaller graphs fit in its pool
            for mode in self.modes:
                if mode == "multi" and (n == 1 or self.buffers.lora.seg_slot.numel() < 2):
                    continue                        # one token, or one LoRA slot, cannot hold two adapters
                slots = {"none": [-1] * n, "single": [0] * n, "multi": [i % 2 for i in range(n)]}[mode]
                inputs = self._pad([0] * n, [0] * n, [[] for _ in range(n)], [1] * n, slots, n)
                for _ in range(2):                  # compile and warm up outside the capture
                    self._run(inputs)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._run(inputs)
                pool = graph.pool()
                self.graphs[(n, mode)] = (graph, logits)
            if progress:
                progress(len(self.graphs), len(self.buckets) * len(self.modes), f"batch {n}")
        torch.cuda.synchronize()

    def run(self, ids: list[int], positions: list[int], slot_mapping: list[int], block_tables: list[list[int]],
            context_lens: list[int], token_slots: list[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] of one decode step (one new token per sequence)."""
        b = len(ids)
        n = self.bucket(b)
        pad = n - b
        inputs = self._pad(ids + [0] * pad, positions + [0] * pad, block_tables + [[]] * pad,
                           context_lens + [1] * pad, token_slots + [-1] * pad, n,
                           slot_mapping + [KVCache.SCRATCH_BLOCK * self.kv.block_size] * pad)
        segments = inputs.lora.num_segments
        self.model.stage_lora(inputs)
        graph, logits = self.graphs[(n, "none" if segments == 0 else "single" if segments == 1 else "multi")]
        graph.replay()
        self.replays += 1
        return logits[:b]

    def _pad(self, ids, positions, tables, ctx, token_slots, n, slot_mapping=None) -> StepInputs:
        scratch = KVCache.SCRATCH_BLOCK
        tables = [t or [scratch] for t in tables]
        if slot_mapping is None:
            slot_mapping = [scratch * self.kv.block_size] * n
        return self.buffers.fill(ids, positions, slot_mapping, tables, ctx, [1] * n, list(range(n)), token_slots)

    def _run(self, inputs: StepInputs) -> torch.Tensor:
        return self.model.logits(self.model.forward(inputs, self.kv.layers))
