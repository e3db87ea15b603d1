"""Per-step GPU metadata: one typed object, filled once per step into preallocated buffers.

Everything a forward pass needs besides the weights and the KV cache: token ids,
positions, where each new K/V row goes (slot mapping), block tables, lengths,
the LoRA grouping and which rows need logits. Buffers are sized at start-up so
a decode step can be captured in a CUDA graph; ``fill`` copies host lists into
them (through pinned staging twins allocated once) and returns views of the
used prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.lora_meta import LoRAMeta, StagedBuffer


@dataclass
class StepInputs:
    input_ids: torch.Tensor      # [T] int64
    positions: torch.Tensor      # [T] int64
    slot_mapping: torch.Tensor   # [T] int64: block * block_size + row for each new token
    block_tables: torch.Tensor   # [B, max_blocks] int32
    context_lens: torch.Tensor   # [B] int32: tokens in the cache after this step, per sequence
    cu_seqlens_q: torch.Tensor   # [B + 1] int32: new tokens of sequence b are rows cu[b]:cu[b+1]
    logits_idx: torch.Tensor     # [N] int64: rows whose logits are computed
    lora: LoRAMeta
    max_q_len: int               # host copy: 1 means a pure decode step


class StepBuffers:
    """Preallocated device buffers that ``StepInputs`` views into."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, max_loras: int,
                 device: torch.device):
        self.width = max_blocks_per_seq
        self.input_ids = StagedBuffer(max_tokens, torch.int64, device)
        self.positions = StagedBuffer(max_tokens, torch.int64, device)
        self.slot_mapping = StagedBuffer(max_tokens, torch.int64, device)
        self.logits_idx = StagedBuffer(max_tokens, torch.int64, device)
        self.block_tables = StagedBuffer(max_seqs * max_blocks_per_seq, torch.int32, device)
        self.context_lens = StagedBuffer(max_seqs, torch.int32, device)
        self.cu_seqlens_q = StagedBuffer(max_seqs + 1, torch.int32, device)
        self.lora = LoRAMeta.allocate(max_tokens, max_loras, device)
        # a step scheduled ahead: which row of the step in flight sampled each of its input tokens
        self.ahead_rows = StagedBuffer(max_seqs, torch.int64, device)

    def feed_tokens(self, tokens: torch.Tensor, rows: list[int]) -> None:
        """Input token i of the step being staged := ``tokens[rows[i]]``, on the device (``tokens``: a step
        in flight's samples, not yet on the host)."""
        ids = self.input_ids.device[: len(rows)]
        if rows == list(range(tokens.shape[0])):
            ids.copy_(tokens)
        else:
            torch.index_select(tokens, 0, self.ahead_rows.put(rows), out=ids)

    def fill(self, input_ids: list[int], positions: list[int], slot_mapping: list[int],
             block_tables: list[list[int]], context_lens: list[int], q_lens: list[int],
             logits_idx: list[int], token_slots: list[int]) -> StepInputs:
        b, w = len(context_lens), self.width
        # always the full width: kernels specialise on the table's width, so a fixed one compiles once
        flat: list[int] = []
        for bt in block_tables:
            flat.extend(bt)
            flat.extend([0] * (w - len(bt)))
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        return StepInputs(
            input_ids=self.input_ids.put(input_ids),
            positions=self.positions.put(positions),
            slot_mapping=self.slot_mapping.put(slot_mapping),
            block_tables=self.block_tables.put(flat).view(b, w),
            context_lens=self.context_lens.put(context_lens),
            cu_seqlens_q=self.cu_seqlens_q.put(cu),
            logits_idx=self.logits_idx.put(logits_idx),
            lora=self.lora.fill(token_slots),
            max_q_len=max(q_lens),
        )
