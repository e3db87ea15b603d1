"""Decode steps replayed from captured CUDA graphs, one per bucketed batch size.

A decode step launches a few hundred small kernels; replaying them as one
graph removes the launch gaps. Each bucket is captured once per LoRA mode (a
graph holds only what it captured): no LoRA; for steps on the fused-LoRA path
(LoRA inside the step's own kernels), once per number of tail positions its GEMMs
read (``LlamaModel.tail_buckets``); for the others (more tokens, or more adapters
than the tails hold), one adapter, several, and more than ``SEG_BLOCKS_MAX_SEGMENTS``
(the SGMV wrapper picks different kernels for each).
A batch is padded up to its bucket: padded rows read and write only the KV
cache's scratch block and carry no adapter, and their logits are dropped.
"""
from __future__ import annotations

import torch

from kernels.lora_meta import SEG_BLOCKS_MAX_SEGMENTS
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
        self.with_lora = with_lora
        self.graphs: dict[tuple[int, str | tuple[str, int]], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def modes(self, n: int) -> list[tuple[str | tuple[str, int], list[int]]]:
        """(mode, the token slots a capture uses) for bucket ``n``."""
        modes: list[tuple[str | tuple[str, int], list[int]]] = [("none", [-1] * n)]
        if not self.with_lora:
            return modes
        if n <= self.model.fused_lora_tokens:
            modes += [(("fused", k), [i % k for i in range(n)]) for k in self.model.tail_buckets(n)]
        else:
            modes.append(("single", [0] * n))
        # several adapters on SGMV: two, or one more than the tails hold (none where the batch or the
        # LoRA slots cannot have that many)
        k = self.model.tail_positions + 1 if self.model.fuses(n, 2) else 2
        if n >= k and self.buffers.lora.seg_slot.numel() >= k and k <= SEG_BLOCKS_MAX_SEGMENTS:
            modes.append(("multi", [i % k for i in range(n)]))
        many = SEG_BLOCKS_MAX_SEGMENTS + 1
        if n >= many and self.buffers.lora.seg_slot.numel() >= many:
            modes.append(("many", [i % many for i in range(n)]))
        return modes

    def mode(self, inputs: StepInputs) -> str | tuple[str, int]:
        k, n = inputs.lora.num_segments, inputs.input_ids.shape[0]
        if k == 0:
            return "none"
        if self.model.fused_path(inputs):
            return "fused", self.model.tail_bucket(k, n)
        if k == 1:
            return "single"
        return "multi" if k <= SEG_BLOCKS_MAX_SEGMENTS else "many"

    @torch.inference_mode()
    def capture(self, progress=None) -> None:
        pool = None
        total = sum(len(self.modes(n)) for n in self.buckets)
        for n in reversed(self.buckets):            # largest first, so smaller graphs fit in its pool
            for mode, slots in self.modes(n):
                inputs = self._pad([0] * n, [0] * n, [[] for _ in range(n)], [1] * n, slots, n)
                if self.mode(inputs) != mode:
                    raise RuntimeError(f"batch {n}: a capture for mode {mode} would replay as {self.mode(inputs)}")
                with self.model.tuning():           # compile, tune the GEMMs, warm up: outside the capture
                    for _ in range(2):
                        self._run(inputs)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._run(inputs)
                pool = graph.pool()
                self.graphs[(n, mode)] = (graph, logits)
            if progress:
                progress(len(self.graphs), total, f"batch {n}")
        torch.cuda.synchronize()

    def run(self, ids: list[int], positions: list[int], slot_mapping: list[int], block_tables: list[list[int]],
            context_lens: list[int], token_slots: list[int], before_replay=None) -> torch.Tensor:
        """Logits [len(ids), vocab] of one decode step (one new token per sequence). ``before_replay()``, if
        given, runs between staging the inputs and the replay (the engine writes token ids the device
        sampled into ``buffers.input_ids`` there)."""
        graph, logits = self.prepare(ids, positions, slot_mapping, block_tables, context_lens, token_slots)
        if before_replay is not None:
            before_replay()
        graph.replay()
        self.replays += 1
        return logits

    def prepare(self, ids: list[int], positions: list[int], slot_mapping: list[int], block_tables: list[list[int]],
                context_lens: list[int], token_slots: list[int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The host half of ``run``: fill the step's inputs and stage its adapters; returns the graph to
        replay and the view of its logits that the replay fills."""
        b = len(ids)
        n = self.bucket(b)
        pad = n - b
        inputs = self._pad(ids + [0] * pad, positions + [0] * pad, block_tables + [[]] * pad,
                           context_lens + [1] * pad, token_slots + [-1] * pad, n,
                           slot_mapping + [KVCache.SCRATCH_BLOCK * self.kv.block_size] * pad)
        self.model.stage_lora(inputs)
        graph, logits = self.graphs[(n, self.mode(inputs))]
        return graph, logits[:b]

    def _pad(self, ids, positions, tables, ctx, token_slots, n, slot_mapping=None) -> StepInputs:
        scratch = KVCache.SCRATCH_BLOCK
        tables = [t or [scratch] for t in tables]
        if slot_mapping is None:
            slot_mapping = [scratch * self.kv.block_size] * n
        return self.buffers.fill(ids, positions, slot_mapping, tables, ctx, [1] * n, list(range(n)), token_slots)

    def _run(self, inputs: StepInputs) -> torch.Tensor:
        return self.model.logits(self.model.forward(inputs, self.kv.layers))
