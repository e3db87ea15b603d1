"""Read and validate a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

Everything is checked against the base model before an adapter is accepted:
a config that parses, safetensors weights (pickles are refused, never
unpickled), known target modules, shapes that match, ranks within the limit,
finite values. Errors name the file and what is wrong.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import safetensors.torch
from safetensors import SafetensorError

from worker.errors import AdapterError
from worker.model.config import ModelConfig

# projection name -> (fused family in our model, slice within that family)
MODULE_SLICES = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


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
    """Load and validate the adapter at ``path`` for the base model ``cfg``; raises AdapterError."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"adapter {name!r}: {root} is not a directory")
    conf = _read_config(name, root)
    weights = root / "adapter_model.safetensors"
    if not weights.is_file():
        pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterError(f"adapter {name!r}: weights are pickled ({', '.join(pickles)}); pickles can run code "
                               "and are refused: convert the adapter to adapter_model.safetensors")
        raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors in {root}")
    tensors = _read_safetensors(name, weights)
    adapter = LoRAAdapter(name=name, path=str(root), base_model=conf.get("base_model_name_or_path"))
    shapes = cfg.module_shapes()
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    groups: dict[tuple[int, str], str] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight of a known layer "
                               "(embedding LoRA, modules_to_save and biases are not supported)")
        layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
        groups[(layer, module)] = m.group(2)
        if module not in shapes:
            raise AdapterError(f"adapter {name!r}: target module {module!r} is not supported "
                               f"(supported: {', '.join(shapes)})")
        if layer >= cfg.num_layers:
            raise AdapterError(f"adapter {name!r}: layer {layer} does not exist (base model has {cfg.num_layers})")
        pairs.setdefault((layer, module), {})[ab] = t
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {weights.name} holds no LoRA weights")
    for (layer, module), ab in sorted(pairs.items()):
        where = f"adapter {name!r}: layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where} has lora_{''.join(ab)} but not its pair")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = shapes[module]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or b.shape[1] != r:
            raise AdapterError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match the base "
                               f"model (expected A [r, {fan_in}] and B [{fan_out}, r])")
        if r < 1 or r > max_rank:
            raise AdapterError(f"{where}: rank {r} is over the server's limit {max_rank} (max_lora_rank)")
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise AdapterError(f"{where}: weights must be floating point, got {a.dtype} / {b.dtype}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{where}: weights contain NaN or Inf")
        alpha = _pattern(conf.get("alpha_pattern") or {}, f"model.layers.{layer}.{groups[(layer, module)]}.{module}",
                         conf.get("lora_alpha", r))
        scaling = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
        adapter.modules[(layer, module)] = LoRAModule(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(),
                                                      scaling=float(scaling))
    return adapter


def _read_config(name: str, root: Path) -> dict:
    path = root / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"adapter {name!r}: adapter_config.json is missing in {root}")
    try:
        conf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON: {e}") from e
    if not isinstance(conf, dict):
        raise AdapterError(f"adapter {name!r}: adapter_config.json must hold a JSON object")
    if conf.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {conf.get('peft_type')!r} is not supported (only LORA)")
    for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out"), ("modules_to_save", "modules_to_save")):
        if conf.get(flag):
            raise AdapterError(f"adapter {name!r}: {what} is not supported")
    if conf.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: bias={conf['bias']!r} is not supported (only 'none')")
    alpha = conf.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"adapter {name!r}: lora_alpha must be a number, got {alpha!r}")
    return conf


def _read_safetensors(name: str, path: Path) -> dict[str, torch.Tensor]:
    try:
        # a plain read releases the GIL while the disk works (safetensors' own reader holds it, which
        # stalled the decode thread for the whole read); parsing from memory is then a memcpy
        return safetensors.torch.load(path.read_bytes())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"adapter {name!r}: {path.name} is not a readable safetensors file: {e}") from e


def _pattern(patterns: dict, module_path: str, default: float) -> float:
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module_path):
            return value
    return default
