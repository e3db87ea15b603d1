"""Per-step grouping of tokens by LoRA slot (SGMV metadata).

Built once per engine step and shared by every LoRA layer of that step. Tokens
keep their batch order; ``sorted_idx`` lists them grouped by slot so that a
kernel can walk one segment per adapter. Buffers are preallocated at
``max_tokens`` / ``max_slots`` so that the step can be captured in a CUDA graph:
``fill`` only writes into them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class StagedBuffer:
    """A device buffer with a pinned host twin, both allocated once.

    ``put(values)`` writes a host list into the twin and moves it with one
    non-blocking copy, so a step pays no page-locked allocation. The twin is
    rewritten only on the next ``put``, after the step's own synchronisation.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str, fill: int = 0):
        device = torch.device(device)
        self.device = torch.full((size,), fill, dtype=dtype, device=device)
        self.host = torch.full((size,), fill, dtype=dtype, pin_memory=device.type == "cuda")

    def put(self, values: list[int]) -> torch.Tensor:
        n = len(values)
        if n > self.device.numel():
            raise ValueError(f"{n} values exceed the buffer's capacity {self.device.numel()}")
        self.host[:n] = torch.tensor(values, dtype=self.host.dtype)
        view = self.device[:n]
        view.copy_(self.host[:n], non_blocking=True)
        return view


@dataclass
class LoRAMeta:
    token_slot: torch.Tensor    # [max_tokens] int32, slot of each token, -1 = no LoRA
    sorted_idx: torch.Tensor    # [max_tokens] int32, token indices grouped by slot (LoRA tokens first)
    seg_indptr: torch.Tensor    # [max_slots + 1] int32, segment i = sorted_idx[seg_indptr[i]:seg_indptr[i+1]]
    seg_slot: torch.Tensor      # [max_slots] int32, slot of segment i (-1 for unused segments)
    num_tokens: int = 0         # tokens in this step (host side)
    slots: list[int] = field(default_factory=list)    # slot of each active segment (host side)
    staged: dict[str, StagedBuffer] = field(default_factory=dict, repr=False)

    @classmethod
    def allocate(cls, max_tokens: int, max_slots: int, device: torch.device | str) -> "LoRAMeta":
        staged = {"token_slot": StagedBuffer(max_tokens, torch.int32, device, fill=-1),
                  "sorted_idx": StagedBuffer(max_tokens, torch.int32, device),
                  "seg_indptr": StagedBuffer(max_slots + 1, torch.int32, device),
                  "seg_slot": StagedBuffer(max_slots, torch.int32, device, fill=-1)}
        return cls(**{name: buf.device for name, buf in staged.items()}, staged=staged)

    @property
    def num_segments(self) -> int:
        return len(self.slots)

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
        self.slots = slots
        if self.num_segments == 0:
            # A captured graph that still holds LoRA launches must see an empty step.
            self.seg_indptr[-1:].zero_()
            return self
        pad = self.seg_slot.numel() - len(slots)
        self._put("token_slot", token_slots)
        self._put("sorted_idx", order)
        self._put("seg_indptr", indptr + [indptr[-1]] * pad)
        self._put("seg_slot", slots + [-1] * pad)
        return self

    def _put(self, name: str, values: list[int]) -> None:
        if name in self.staged:
            self.staged[name].put(values)
        else:                                   # a meta built by hand (tests): plain copy
            getattr(self, name)[: len(values)].copy_(torch.tensor(values, dtype=torch.int32))
