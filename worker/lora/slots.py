"""GPU slots: the adapters resident on the device, stacked per layer for the SGMV kernels.

``max_loras`` slots each hold one adapter. Per layer and fused projection
("family": qkv, o, gate_up, down) the slots' weights are stacked in the layout
of ``kernels/lora_torch.py``. Slots are reference-counted by the running
sequences: an adapter in use is never evicted; among the idle ones the least
recently used goes first, and pinned adapters never.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from kernels.lora_meta import LoRAMeta
from worker.errors import AdapterError
from worker.lora.peft_format import MODULE_SLICES, LoRAAdapter
from worker.model.config import ModelConfig

FAMILIES = ("qkv", "o", "gate_up", "down")


@dataclass
class LoRAFamily:
    """Stacked LoRA weights of one fused projection of one layer, for every slot."""
    lora_a: torch.Tensor          # [slots, n_slices, max_rank, in]
    lora_b: torch.Tensor          # [slots, max_rank, out_total]
    ranks: torch.Tensor           # [slots, n_slices] int32 (device)
    scalings: torch.Tensor        # [slots, n_slices] float32 (device)
    ranks_cpu: torch.Tensor
    scalings_cpu: torch.Tensor
    out_offsets: tuple[int, ...]


def family_shapes(cfg: ModelConfig) -> dict[str, tuple[int, tuple[int, ...]]]:
    """family -> (in_features, slice offsets in out_features)."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    return {"qkv": (h, (0, q, q + kv, q + 2 * kv)), "o": (q, (0, h)), "gate_up": (h, (0, i, 2 * i)), "down": (i, (0, h))}


class AdapterSlots:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, device: torch.device, dtype: torch.dtype,
                 backend):
        if num_slots < 1:
            raise ValueError(f"max_loras must be >= 1, got {num_slots}")
        self.num_slots, self.max_rank = num_slots, max_rank
        self.backend = backend
        shapes = family_shapes(cfg)
        # ranks and scalings of every (layer, family) live in one flat buffer each, so loading an
        # adapter updates them with one host->device copy; each family gets a contiguous view
        per_layer = sum(num_slots * (len(offs) - 1) for _, offs in shapes.values())
        self._ranks = torch.zeros(cfg.num_layers * per_layer, dtype=torch.int32, device=device)
        self._scalings = torch.zeros(cfg.num_layers * per_layer, dtype=torch.float32, device=device)
        pin = torch.device(device).type == "cuda"
        self._ranks_cpu = torch.zeros(cfg.num_layers * per_layer, dtype=torch.int32, pin_memory=pin)
        self._scalings_cpu = torch.zeros(cfg.num_layers * per_layer, dtype=torch.float32, pin_memory=pin)
        self.layers: list[dict[str, LoRAFamily]] = []
        at = 0
        for _ in range(cfg.num_layers):
            fams = {}
            for fam, (fan_in, offs) in shapes.items():
                n = len(offs) - 1
                span = slice(at, at + num_slots * n)
                at += num_slots * n
                fams[fam] = LoRAFamily(
                    lora_a=torch.zeros(num_slots, n, max_rank, fan_in, device=device, dtype=dtype),
                    lora_b=torch.zeros(num_slots, max_rank, offs[-1], device=device, dtype=dtype),
                    ranks=self._ranks[span].view(num_slots, n),
                    scalings=self._scalings[span].view(num_slots, n),
                    ranks_cpu=self._ranks_cpu[span].view(num_slots, n),
                    scalings_cpu=self._scalings_cpu[span].view(num_slots, n),
                    out_offsets=offs)
            self.layers.append(fams)
        self._copy_stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None
        self._pending: dict[str, tuple] = {}                 # adapter -> (copy-done event, its sources)
        self.slot_of: OrderedDict[str, int] = OrderedDict()   # resident adapter -> slot, in LRU order
        self.refs: dict[str, int] = {}
        self.pinned: set[str] = set()
        self.loads = 0                       # adapters copied into a slot
        self.generation = [0] * num_slots    # bumped whenever a slot's contents change (copies of it go stale)
        self.acquires = 0                    # requests that took a slot (a load or a hit)

    # -- residency -------------------------------------------------------------------------
    # An adapter enters a slot in two steps: ``start_load`` copies it in (on CUDA on a side
    # stream, so running steps do not wait for it) and ``ready`` says when the copy is done;
    # then each running sequence takes a reference with ``acquire`` and drops it with ``release``.

    def can_start_load(self) -> bool:
        return len(self.slot_of) < self.num_slots or self._victim() is not None

    def start_load(self, adapter: LoRAAdapter) -> bool:
        """Begin copying ``adapter`` into a slot (evicting an idle one); False if every slot is taken."""
        name = adapter.name
        if name in self.slot_of:
            return True
        used = set(self.slot_of.values())
        free = [s for s in range(self.num_slots) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = self._victim()
            if victim is None:
                return False
            slot = self.slot_of.pop(victim)
        self._write(slot, adapter)
        self.slot_of[name] = slot
        self.loads += 1
        return True

    def ready(self, name: str) -> bool:
        """Resident, with its copy finished."""
        if name not in self.slot_of:
            return False
        pending = self._pending.get(name)
        if pending is not None:
            if not pending[0].query():
                return False
            del self._pending[name]
        return True

    def acquire(self, name: str) -> int:
        """Take a reference on a ready adapter; returns its slot."""
        if not self.ready(name):
            raise AdapterError(f"adapter {name!r} is not ready in a LoRA slot")
        self.slot_of.move_to_end(name)
        self.refs[name] = self.refs.get(name, 0) + 1
        self.acquires += 1
        return self.slot_of[name]

    def release(self, name: str) -> None:
        n = self.refs.get(name, 0) - 1
        if n > 0:
            self.refs[name] = n
        else:
            self.refs.pop(name, None)

    def evict(self, name: str) -> None:
        """Drop a resident adapter (e.g. a new version replaced it); refuses while it is in use."""
        if self.refs.get(name):
            raise AdapterError(f"adapter {name!r} is in use by running requests")
        if name in self._pending:
            self._pending.pop(name)[0].synchronize()
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self._clear(slot)

    def in_use(self, name: str) -> bool:
        return bool(self.refs.get(name))

    def _victim(self) -> str | None:
        for name in self.slot_of:               # least recently used first
            if not self.refs.get(name) and name not in self.pinned and name not in self._pending:
                return name
        return None

    def _clear(self, slot: int) -> None:
        self.generation[slot] += 1
        for fams in self.layers:
            for f in fams.values():
                f.ranks_cpu[slot] = 0
                f.scalings_cpu[slot] = 0.0
        self._sync_ranks()

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy ``adapter`` into ``slot``, zeros past each module's rank (and for modules it lacks): the fused
        norm reads B's first rows and h unmasked by the rank (``kernels.fused_lora.norm_lora``)."""
        self.generation[slot] += 1
        dst, src, zero = [], [], []
        for fams in self.layers:
            for f in fams.values():
                f.ranks_cpu[slot] = 0
                f.scalings_cpu[slot] = 0.0
                zero += [f.lora_a[slot], f.lora_b[slot]]
        for (layer, module), m in adapter.modules.items():
            fam_name, i = MODULE_SLICES[module]
            f = self.layers[layer][fam_name]
            r = m.rank
            lo, hi = f.out_offsets[i], f.out_offsets[i + 1]
            dst += [f.lora_a[slot, i, :r], f.lora_b[slot, :r, lo:hi]]
            src += [m.a, m.b.T]
            f.ranks_cpu[slot, i] = r
            f.scalings_cpu[slot, i] = m.scaling
        if self._copy_stream is None:
            torch._foreach_zero_(zero)
            for d, s_ in zip(dst, src):
                d.copy_(s_)
            self._sync_ranks()
            return
        # the step that last used this slot has finished (loads start from ``Scheduler.schedule``, which
        # the engine runs only with no step in flight: steps launched ahead admit nothing), so the copy
        # may start at once; steps that follow use the slot only after `ready`
        with torch.cuda.stream(self._copy_stream):
            torch._foreach_zero_(zero)
            for d, s_ in zip(dst, src):
                d.copy_(s_, non_blocking=True)
            self._sync_ranks()
            done = torch.cuda.Event()
            done.record()
        self._pending[adapter.name] = (done, adapter)      # keeps the host memory alive until copied

    def _sync_ranks(self) -> None:
        self._ranks.copy_(self._ranks_cpu, non_blocking=True)
        self._scalings.copy_(self._scalings_cpu, non_blocking=True)

    # -- compute ---------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, y: torch.Tensor, layer: int, family: str, meta: LoRAMeta) -> None:
        """y += LoRA(x) for every token with a slot, through the configured backend."""
        self.backend.apply(x, y, self.layers[layer][family], meta)
