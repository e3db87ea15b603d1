"""Per-step GPU metadata: one typed object, filled once per step into preallocated buffers.

Everything a forward pass needs besides the weights and the KV cache: token ids,
positions, where each new K/V row goes (slot mapping), block tables, lengths,
the LoRA grouping and which rows need logits. Buffers are sized at start-up so
a decode step can later be captured in a CUDA graph; ``fill`` copies host lists
into them and returns views of the used prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.lora_meta import LoRAMeta


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
        self.device = device
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_tokens, **i64)
        self.positions = torch.zeros(max_tokens, **i64)
        self.slot_mapping = torch.zeros(max_tokens, **i64)
        self.logits_idx = torch.zeros(max_tokens, **i64)
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, **i32)
        self.context_lens = torch.zeros(max_seqs, **i32)
        self.cu_seqlens_q = torch.zeros(max_seqs + 1, **i32)
        self.lora = LoRAMeta.allocate(max_tokens, max_loras, device)

    def fill(self, input_ids: list[int], positions: list[int], slot_mapping: list[int],
             block_tables: list[list[int]], context_lens: list[int], q_lens: list[int],
             logits_idx: list[int], token_slots: list[int]) -> StepInputs:
        t, b = len(input_ids), len(context_lens)
        width = max(len(bt) for bt in block_tables)
        table = torch.zeros(b, width, dtype=torch.int32)
        for i, bt in enumerate(block_tables):
            table[i, : len(bt)] = torch.tensor(bt, dtype=torch.int32)
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        return StepInputs(
            input_ids=_put(self.input_ids, input_ids),
            positions=_put(self.positions, positions),
            slot_mapping=_put(self.slot_mapping, slot_mapping),
            block_tables=_put2d(self.block_tables, table),
            context_lens=_put(self.context_lens, context_lens),
            cu_seqlens_q=_put(self.cu_seqlens_q, cu),
            logits_idx=_put(self.logits_idx, logits_idx),
            lora=self.lora.fill(token_slots),
            max_q_len=max(q_lens),
        )


def _put(buf: torch.Tensor, values: list[int]) -> torch.Tensor:
    n = len(values)
    src = torch.tensor(values, dtype=buf.dtype)
    if buf.device.type == "cuda":
        src = src.pin_memory()
    buf[:n].copy_(src, non_blocking=True)
    return buf[:n]


def _put2d(buf: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    b, w = table.shape
    if buf.device.type == "cuda":
        table = table.pin_memory()
    view = buf[:b, :w]
    view.copy_(table, non_blocking=True)
    return view
