"""Per-step grouping of tokens by LoRA slot (SGMV metadata).

Built once per engine step and shared by every LoRA layer of that step. Tokens
keep their batch order; ``sorted_idx`` lists them grouped by slot so that a
kernel can walk one segment per adapter. Buffers are preallocated at
``max_tokens`` / ``max_slots`` so that the step can be captured in a CUDA graph:
``fill`` only writes into them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRAMeta:
    token_slot: torch.Tensor    # [max_tokens] int32, slot of each token, -1 = no LoRA
    sorted_idx: torch.Tensor    # [max_tokens] int32, token indices grouped by slot (LoRA tokens first)
    seg_indptr: torch.Tensor    # [max_slots + 1] int32, segment i = sorted_idx[seg_indptr[i]:seg_indptr[i+1]]
    seg_slot: torch.Tensor      # [max_slots] int32, slot of segment i (-1 for unused segments)
    num_tokens: int = 0         # tokens in this step (host side)
    num_segments: int = 0       # active segments (host side)
    max_seg_len: int = 0        # longest segment (host side; sizes a launch grid)

    @classmethod
    def allocate(cls, max_tokens: int, max_slots: int, device: torch.device | str) -> "LoRAMeta":
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            token_slot=torch.full((max_tokens,), -1, **i32),
            sorted_idx=torch.zeros((max_tokens,), **i32),
            seg_indptr=torch.zeros((max_slots + 1,), **i32),
            seg_slot=torch.full((max_slots,), -1, **i32),
        )

    @property
    def no_lora(self) -> bool:
        return self.num_segments == 0

    def fill(self, token_slots: list[int]) -> "LoRAMeta":
        """Group ``token_slots`` (one slot per token, -1 = none) into segments.

        Grouping happens on the host, where the slots are known anyway; one
        non-blocking copy per buffer moves the result to the device.
        """
        n = len(token_slots)
        if n > self.token_slot.numel():
            raise ValueError(f"{n} tokens exceed the LoRA metadata capacity {self.token_slot.numel()}")
        by_slot: dict[int, list[int]] = {}
        for t, s in enumerate(token_slots):
            if s >= 0:
                by_slot.setdefault(s, []).append(t)
        if len(by_slot) > self.seg_slot.numel():
            raise ValueError(f"{len(by_slot)} distinct adapters exceed {self.seg_slot.numel()} LoRA slots")
        order: list[int] = []
        indptr = [0]
        slots: list[int] = []
        for s in sorted(by_slot):
            order.extend(by_slot[s])
            indptr.append(len(order))
            slots.append(s)
        self.num_tokens = n
        self.num_segments = len(slots)
        self.max_seg_len = max((len(v) for v in by_slot.values()), default=0)
        if self.num_segments == 0:
            # A captured graph that still holds LoRA launches must see an empty step.
            self.seg_indptr[-1:].zero_()
            return self
        pad = self.seg_slot.numel() - len(slots)
        _copy(self.token_slot, token_slots)
        _copy(self.sorted_idx, order)
        _copy(self.seg_indptr, indptr + [indptr[-1]] * pad)
        _copy(self.seg_slot, slots + [-1] * pad)
        return self


def _copy(dst: torch.Tensor, values: list[int]) -> None:
    src = torch.tensor(values, dtype=dst.dtype)
    if dst.device.type == "cuda":
        src = src.pin_memory()
    dst[: len(values)].copy_(src, non_blocking=True)
