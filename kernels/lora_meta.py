"""Per-step grouping of tokens by LoRA slot (SGMV metadata).

Built once per engine step and shared by every LoRA layer of that step. Tokens
keep their batch order; ``sorted_idx`` lists them grouped by slot so that a
kernel can walk one segment per adapter. Buffers are preallocated at
``max_tokens`` / ``max_slots`` so that the step can be captured in a CUDA graph:
``fill`` only writes into them.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

SEG_BLOCK = 16      # sorted positions a segment block holds (the SGMV segment-block kernels, sgmv_decode.py)
# steps with more adapters than this take the block-walking SGMV kernels instead (kernels/sgmv.py
# ``apply_path``); here, so that the decode graphs (worker/cuda_graphs.py) see it without importing Triton
SEG_BLOCKS_MAX_SEGMENTS = 128


def max_seg_blocks(max_tokens: int, max_slots: int) -> int:
    """Most segment blocks a step can have: every segment's last block may be partial, so at most
    cdiv(tokens, SEG_BLOCK) plus one per segment (a segment per token or per slot at most)."""
    return -(-max_tokens // SEG_BLOCK) + min(max_tokens, max_slots)


class StagedBuffer:
    """A device buffer with a pinned host twin, both allocated once.

    ``put(values)`` writes a host list into the twin and moves it with one
    non-blocking copy, so a step pays no page-locked allocation. The twin is
    rewritten only on the next ``put``: the engine waits first for an event
    recorded after the last step's copies (``Engine._launch``).
    The list goes into the twin through a ctypes array over its memory: a
    step puts about ten lists, and ``torch.tensor(list)`` cost 25-35 us each on
    the H100's host, more than the rest of the step's host work
    (bench/NOTES-kernels.md v6). Values must fit the dtype (ids, positions,
    block numbers, slots): ctypes does not check.
    """

    _CTYPES = {torch.int32: ctypes.c_int32, torch.int64: ctypes.c_int64}

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str, fill: int = 0):
        if dtype not in self._CTYPES:
            raise ValueError(f"a staged buffer holds int32 or int64, not {dtype}")
        device = torch.device(device)
        self.device = torch.full((size,), fill, dtype=dtype, device=device)
        self.host = torch.full((size,), fill, dtype=dtype, pin_memory=device.type == "cuda")
        self._twin = (self._CTYPES[dtype] * size).from_address(self.host.data_ptr())   # lives as long as host

    def put(self, values: list[int], tail: dict[int, list[int]] | None = None) -> torch.Tensor:
        """Write ``values`` at the start; ``tail`` maps further offsets (past ``values``) to lists
        written there too, moved in the same copy. Returns the device view of ``values``."""
        tail = tail or {}
        n = end = len(values)
        for at, more in tail.items():
            if at < n:
                raise ValueError(f"a tail at {at} overlaps the {n} values before it")
            end = max(end, at + len(more))
        if end > self.device.numel():
            raise ValueError(f"{end} values exceed the buffer's capacity {self.device.numel()}")
        self._twin[:n] = values
        for at, more in tail.items():
            self._twin[at: at + len(more)] = more
        self.device[:end].copy_(self.host[:end], non_blocking=True)
        return self.device[:n]


@dataclass
class LoRAMeta:
    token_slot: torch.Tensor    # [max_tokens] int32, slot of each token, -1 = no LoRA
    sorted_idx: torch.Tensor    # [max_tokens] int32, token indices grouped by slot, then those without LoRA
    seg_indptr: torch.Tensor    # [max_slots + 1] int32, segment i = sorted_idx[seg_indptr[i]:seg_indptr[i+1]]
    seg_slot: torch.Tensor      # [max_slots] int32, slot of segment i (-1 for unused segments)
    # each segment cut into blocks of SEG_BLOCK sorted positions, in order: block g is sorted positions
    # [blk_start[g], blk_end[g]) of slot blk_slot[g] (blk_end is the segment's end); after the LoRA
    # segments' blocks, those of the tokens without LoRA (slot -1: the fused kernels, which must write
    # every row, take them too); start == end past them
    blk_start: torch.Tensor     # [max_seg_blocks + cdiv(max_tokens, SEG_BLOCK)] int32
    blk_end: torch.Tensor       # same
    blk_slot: torch.Tensor      # same
    blk_count: torch.Tensor     # [2] int32, the step's LoRA blocks, and all its blocks
    num_tokens: int = 0         # tokens in this step (host side)
    slots: list[int] = field(default_factory=list)    # slot of each active segment (host side)
    staged: StagedBuffer | None = field(default=None, repr=False)
    _filled: list[int] | None = field(default=None, repr=False)   # token_slots of the last fill

    @classmethod
    def allocate(cls, max_tokens: int, max_slots: int, device: torch.device | str) -> "LoRAMeta":
        """The tensors are views of one staged buffer, laid out
        ``[seg_indptr | seg_slot | token_slot | sorted_idx | blk_count | blk_start | blk_end | blk_slot]``,
        so a step moves them with one copy."""
        nb = max_seg_blocks(max_tokens, max_slots) + -(-max_tokens // SEG_BLOCK)
        seg = 2 * max_slots + 1
        blk = seg + 2 * max_tokens + 2
        staged = StagedBuffer(blk + 3 * nb, torch.int32, device)
        d = staged.device
        meta = cls(token_slot=d[seg: seg + max_tokens], sorted_idx=d[seg + max_tokens: blk - 2],
                   seg_indptr=d[: max_slots + 1], seg_slot=d[max_slots + 1: seg], blk_start=d[blk: blk + nb],
                   blk_end=d[blk + nb: blk + 2 * nb], blk_slot=d[blk + 2 * nb:], blk_count=d[blk - 2: blk],
                   staged=staged)
        staged.put([0] * (max_slots + 1) + [-1] * (max_slots + max_tokens), tail={blk - 2: [0] * (2 + 3 * nb)})
        return meta

    @property
    def token_slots(self) -> list[int]:
        """The slot of each token of the last ``fill`` (host side)."""
        return self._filled or []

    @property
    def num_segments(self) -> int:
        return len(self.slots)

    @property
    def no_lora(self) -> bool:
        return self.num_segments == 0

    def fill(self, token_slots: list[int]) -> "LoRAMeta":
        """Group ``token_slots`` (one slot per token, -1 = none) into segments.

        Grouping happens on the host, where the slots are known anyway; one
        non-blocking copy moves the result to the device. A step with the same
        slots as the last fill (steady decoding: the same requests in the same
        rows) finds its grouping on the device already and moves nothing.
        """
        if token_slots == self._filled:
            return self
        n = len(token_slots)
        max_tokens, max_slots = self.token_slot.numel(), self.seg_slot.numel()
        if n > max_tokens:
            raise ValueError(f"{n} tokens exceed the LoRA metadata capacity {max_tokens}")
        by_slot: dict[int, list[int]] = {}
        none: list[int] = []                  # the tokens without LoRA, listed after the segments
        for t, s in enumerate(token_slots):
            if s >= 0:
                by_slot.setdefault(s, []).append(t)
            else:
                none.append(t)
        if len(by_slot) > max_slots:
            raise ValueError(f"{len(by_slot)} distinct adapters exceed {max_slots} LoRA slots")
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
            self._filled = list(token_slots)
            return self
        pad = max_slots - len(slots)
        nb = self.blk_start.numel()
        starts: list[int] = []
        ends: list[int] = []
        bslots: list[int] = []
        for lo, hi, s in zip(indptr, indptr[1:] + [n], slots + [-1]):     # the last: tokens without LoRA
            starts.extend(range(lo, hi, SEG_BLOCK))
            ends.extend([hi] * (len(starts) - len(ends)))
            bslots.extend([s] * (len(starts) - len(bslots)))
        lora_blocks = sum(s >= 0 for s in bslots)
        rest = [0] * (nb - len(starts))
        # token_slot's unused tail goes along as it stands in the host twin (no kernel reads past the step)
        blk = 2 * max_slots + 1 + 2 * max_tokens
        self.staged.put(indptr + [indptr[-1]] * pad + slots + [-1] * pad + token_slots,
                        tail={2 * max_slots + 1 + max_tokens: order + none,
                              blk: [lora_blocks, len(starts)] + starts + rest + ends + rest + bslots + rest})
        self._filled = list(token_slots)
        return self
