"""Read and validate a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

Everything is checked against the base model before an adapter is accepted,
with the registry's rules (``db.adapter_check``): a config that parses,
safetensors weights (pickles are refused, never unpickled), known target
modules, shapes that match, ranks within the limit and equal to the config's,
finite values. Errors name the file and what is wrong.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import safetensors.torch
from safetensors import SafetensorError

from db.adapter_check import (CONFIG_FILE, MAX_WEIGHT_ABS, PICKLE_SUFFIXES, WEIGHTS_FILE, AdapterValidationError,
                              BaseModelShape, check_inside, check_tensors, module_path, pattern_value, read_config,
                              read_limited, read_safetensors_header)
from worker.errors import AdapterError
from worker.model.config import ModelConfig

# projection name -> (fused family in our model, slice within that family)
MODULE_SLICES = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0),
}


@dataclass
class LoRAModule:
    a: torch.Tensor        # [r, in]
    b: torch.Tensor        # [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAAdapter:
    name: str
    path: str
    modules: dict[tuple[int, str], LoRAModule] = field(default_factory=dict)   # (layer, module name) -> weights
    base_model: str | None = None
    keep: object = None                   # owner of the memory the tensors view (a pinned-arena chunk)

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def target_modules(self) -> list[str]:
        return sorted({name for _, name in self.modules}, key=list(MODULE_SLICES).index)

    def nbytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in self.modules.values())


def pin_packed(adapter: LoRAAdapter, pin: bool = True, arena=None) -> LoRAAdapter:
    """Move ``adapter``'s weights into one page-locked buffer, B stored transposed, in place.

    One pinned allocation instead of one per tensor (each page-locks memory under
    the driver's lock, which stalls the GPU work of other threads), and every GPU
    slot copy reads a contiguous source (``b.T`` is contiguous), so it runs as one
    DMA at full bandwidth. With a ``PinnedArena``, the buffer comes from memory
    pinned at start-up (falling back to a fresh pinned buffer when it is full).
    """
    mods = list(adapter.modules.values())
    if not mods:
        return adapter
    total = sum(m.a.numel() + m.b.numel() for m in mods)
    dtype = mods[0].a.dtype
    chunk = arena.take(total * dtype.itemsize, dtype) if arena is not None else None
    buf = chunk.tensor if chunk is not None else torch.empty(total, dtype=dtype, pin_memory=pin)
    adapter.keep = chunk                  # the arena's chunk lives as long as the adapter
    at = 0
    for m in mods:
        a = buf[at: at + m.a.numel()].view(m.a.shape)
        at += m.a.numel()
        bt = buf[at: at + m.b.numel()].view(m.b.shape[1], m.b.shape[0])
        at += m.b.numel()
        a.copy_(m.a)
        bt.copy_(m.b.T)
        m.a, m.b = a, bt.T
    return adapter


def load_peft_adapter(name: str, path: str | Path, cfg: ModelConfig, max_rank: int,
                      dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Load and validate the adapter at ``path`` for the base model ``cfg``; raises AdapterError.

    The files pass the registry's rules first (``db.adapter_check``: no symlink out of the
    directory, the config, the safetensors header, tensor names, shapes and ranks), so nothing
    is read in full before its size is known; then the values are checked with torch.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"adapter {name!r}: {root} is not a directory")
    config, weights = root / CONFIG_FILE, root / WEIGHTS_FILE
    for p in (config, weights):
        _checked(name, check_inside, root, p)
    if not config.is_file():
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is missing in {root}")
    conf = _checked(name, read_config, config)
    if not weights.is_file():
        pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterError(f"adapter {name!r}: weights are pickled ({', '.join(pickles)}); pickles can run code "
                               f"and are refused: convert the adapter to {WEIGHTS_FILE}")
        raise AdapterError(f"adapter {name!r}: no {WEIGHTS_FILE} in {root}")
    info, data_start = _checked(name, read_safetensors_header, weights)
    base = BaseModelShape(name="the base model", num_layers=cfg.num_layers, module_shapes=cfg.module_shapes())
    pairs = _checked(name, check_tensors, info, conf, base, max_rank)
    size = data_start + sum(t.end - t.begin for t in info.values())
    tensors = _read_safetensors(name, weights, size)
    if set(tensors) != set(info):
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} changed while it was being loaded; try again")
    adapter = LoRAAdapter(name=name, path=str(root), base_model=conf.get("base_model_name_or_path"))
    for (layer, module), pair in sorted(pairs.items()):
        where = f"adapter {name!r}: layers.{layer}.{module}"
        a, b = tensors[pair.a], tensors[pair.b]
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{where}: weights contain NaN or Inf")
        if max(a.abs().max().item(), b.abs().max().item()) > MAX_WEIGHT_ABS:
            raise AdapterError(f"{where}: weights beyond +-{MAX_WEIGHT_ABS:g} (float16's range): they are corrupt")
        alpha = pattern_value(conf.get("alpha_pattern"), module_path(layer, pair.group, module),
                              conf.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(pair.rank) if conf.get("use_rslora") else alpha / pair.rank
        adapter.modules[(layer, module)] = LoRAModule(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(),
                                                      scaling=float(scaling))
    return adapter


def _checked(name: str, check, *args):
    """``check(*args)``, its AdapterValidationError (the registry's) raised as the worker's AdapterError."""
    try:
        return check(*args)
    except AdapterValidationError as e:
        raise AdapterError(f"adapter {name!r}: {e}") from e


def _read_safetensors(name: str, path: Path, size: int) -> dict[str, torch.Tensor]:
    try:
        # a plain read releases the GIL while the disk works (safetensors' own reader holds it, which
        # stalled the decode thread for the whole read); parsing from memory is then a memcpy
        return safetensors.torch.load(read_limited(path, size, path.name))
    except AdapterValidationError as e:
        raise AdapterError(f"adapter {name!r}: {path.name} changed while it was being loaded ({e})") from e
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"adapter {name!r}: {path.name} is not a readable safetensors file: {e}") from e
