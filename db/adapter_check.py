"""Check a PEFT LoRA adapter directory before it is accepted, without torch.

The API side registers adapters too, so nothing here imports torch: the
safetensors header is parsed by hand (8-byte little-endian length, then JSON),
every tensor's byte range is checked against the file, and values are checked
for NaN/Inf through their exponent bits with numpy. The worker checks the
same files again with torch when it loads them (``worker.lora.peft_format``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_HEADER_BYTES = 16 * 1024 * 1024
# safetensors dtype -> (bytes per element, mask of the exponent bits: all set = NaN or Inf)
FLOAT_DTYPES = {"F16": (2, 0x7C00), "BF16": (2, 0x7F80), "F32": (4, 0x7F800000), "F64": (8, 0x7FF0000000000000)}
ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
              "I64": 8, "U64": 8, **{k: v[0] for k, v in FLOAT_DTYPES.items()}}
# projection -> which block of a Llama-family layer holds it (in the model's module order)
MODULE_GROUPS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                  r"(?:\.\w+)?\.weight$")


class AdapterValidationError(ValueError):
    """An adapter was refused; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class BaseModelShape:
    """What an adapter must fit: the base model's layer count and each projection's (in, out)."""
    name: str
    num_layers: int
    module_shapes: dict[str, tuple[int, int]]

    @classmethod
    def from_dir(cls, model_dir: str | Path, name: str | None = None) -> "BaseModelShape":
        """Read ``config.json`` of a Hugging Face Llama/Mistral/Qwen2 model directory."""
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise AdapterValidationError(f"base model: no config.json in {model_dir}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterValidationError(f"base model: {path} is not valid JSON: {e}") from e
        return cls.from_config(raw, name or str(Path(model_dir).resolve()))

    @classmethod
    def from_config(cls, raw: dict, name: str) -> "BaseModelShape":
        try:
            h, inter, heads = raw["hidden_size"], raw["intermediate_size"], raw["num_attention_heads"]
            kv_heads = raw.get("num_key_value_heads") or heads
            head_dim = raw.get("head_dim") or h // heads
            layers = raw["num_hidden_layers"]
        except (KeyError, TypeError, ZeroDivisionError) as e:
            raise AdapterValidationError(f"base model {name}: config.json lacks a field the shapes need: {e}") from e
        q, kv = heads * head_dim, kv_heads * head_dim
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                  "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        return cls(name=name, num_layers=int(layers), module_shapes=shapes)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int              # byte offsets inside the data section
    end: int


@dataclass
class AdapterManifest:
    """What validation learnt about an adapter: the fields of its registry row."""
    rank: int
    alpha: float
    target_modules: list[str]
    sha256: str
    bytes: int                       # size of adapter_model.safetensors
    base_model_name: str | None      # base_model_name_or_path from the adapter's config
    config: dict = field(repr=False, default_factory=dict)


def check_source_dir(root: Path) -> None:
    """The directory itself: a real directory, no pickles, no symlink leading out of it."""
    if not root.is_dir():
        raise AdapterValidationError(f"{root} is not a directory (an adapter is a directory holding "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    real_root = root.resolve()
    pickles = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for entry in dirnames + filenames:
            p = Path(dirpath) / entry
            if p.is_symlink():
                target = p.resolve()
                if target != real_root and real_root not in target.parents:
                    raise AdapterValidationError(f"{p.relative_to(root)} is a symlink to {os.readlink(p)}, outside "
                                                 "the adapter directory; copy the file in instead")
            if entry.lower().endswith(PICKLE_SUFFIXES) and not (Path(dirpath) / entry).is_dir():
                pickles.append(str(p.relative_to(root)))
    if pickles:
        raise AdapterValidationError(
            f"{', '.join(sorted(pickles))}: pickle file(s) are refused (unpickling can run arbitrary code); "
            f"save the weights as {WEIGHTS_FILE} (safetensors) and remove the pickle files")
    if not (root / CONFIG_FILE).is_file():
        raise AdapterValidationError(f"{CONFIG_FILE} is missing in {root}")
    if not (root / WEIGHTS_FILE).is_file():
        raise AdapterValidationError(f"{WEIGHTS_FILE} is missing in {root}")


def read_config(path: Path) -> dict:
    """Parse ``adapter_config.json`` and refuse what our LoRA runtime cannot serve."""
    try:
        conf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterValidationError(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(conf, dict):
        raise AdapterValidationError(f"{CONFIG_FILE} must hold a JSON object, got {type(conf).__name__}")
    if conf.get("peft_type", "LORA") != "LORA":
        raise AdapterValidationError(f"{CONFIG_FILE}: peft_type {conf.get('peft_type')!r} is not supported "
                                     "(only LORA)")
    for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out"),
                       ("modules_to_save", "modules_to_save")):
        if conf.get(flag):
            raise AdapterValidationError(f"{CONFIG_FILE}: {what} is not supported")
    if conf.get("bias", "none") != "none":
        raise AdapterValidationError(f"{CONFIG_FILE}: bias={conf['bias']!r} is not supported (only 'none')")
    r = conf.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterValidationError(f"{CONFIG_FILE}: r must be a positive integer, got {r!r}")
    alpha = conf.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterValidationError(f"{CONFIG_FILE}: lora_alpha must be a finite number, got {alpha!r}")
    targets = conf.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in MODULE_GROUPS]
        if unknown:
            raise AdapterValidationError(f"{CONFIG_FILE}: target module(s) {', '.join(map(repr, unknown))} not "
                                         f"supported (supported: {', '.join(MODULE_GROUPS)})")
    return conf


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """Tensor table of a safetensors file and the offset of its data section; refuses corrupt files."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterValidationError(f"{path.name} is truncated: {size} bytes, not even a header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise AdapterValidationError(f"{path.name}: header of {n} bytes is over the {MAX_HEADER_BYTES}-byte "
                                         "limit (corrupt or hostile file)")
        if 8 + n > size:
            raise AdapterValidationError(f"{path.name} is truncated: header says {n} bytes, file has {size - 8}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterValidationError(f"{path.name}: header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise AdapterValidationError(f"{path.name}: header must be a JSON object")
    data_len = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = (dtype in ITEM_SIZES and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise AdapterValidationError(f"{path.name}: tensor {name!r} has a malformed header entry {info!r}")
        if not 0 <= begin <= end <= data_len:
            raise AdapterValidationError(f"{path.name} is truncated or corrupt: tensor {name!r} lies at bytes "
                                         f"[{begin}, {end}) of a {data_len}-byte data section")
        if end - begin != math.prod(shape) * ITEM_SIZES[dtype]:
            raise AdapterValidationError(f"{path.name}: tensor {name!r} {dtype}{list(shape)} needs "
                                         f"{math.prod(shape) * ITEM_SIZES[dtype]} bytes, header gives {end - begin}")
        if dtype not in FLOAT_DTYPES:
            raise AdapterValidationError(f"{path.name}: tensor {name!r} has dtype {dtype}; LoRA weights must be "
                                         f"floating point ({', '.join(FLOAT_DTYPES)})")
        tensors[name] = TensorInfo(dtype, shape, begin, end)
    return tensors, 8 + n


def _check_finite(path: Path, tensors: dict[str, TensorInfo], data_start: int) -> None:
    import numpy as np  # only here: the exponent-bit test needs no float type (bf16 has none in numpy)

    ints = {2: np.uint16, 4: np.uint32, 8: np.uint64}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, t in tensors.items():
        size, mask = FLOAT_DTYPES[t.dtype]
        words = data[data_start + t.begin:data_start + t.end].view(ints[size])
        if np.any((words & ints[size](mask)) == ints[size](mask)):
            raise AdapterValidationError(f"{path.name}: tensor {name!r} contains NaN or Inf")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inspect_adapter(root: str | Path, base: BaseModelShape | None, max_rank: int) -> AdapterManifest:
    """Validate the adapter directory ``root`` against ``base`` (None: shapes only checked for consistency)."""
    root = Path(root)
    check_source_dir(root)
    conf = read_config(root / CONFIG_FILE)
    weights = root / WEIGHTS_FILE
    tensors, data_start = read_safetensors_header(weights)
    shapes = base.module_shapes if base else None
    pairs: dict[tuple[int, str], dict[str, TensorInfo]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterValidationError(f"{WEIGHTS_FILE}: tensor {key!r} is not a LoRA A/B weight of a known layer "
                                         "(embedding LoRA, modules_to_save and biases are not supported)")
        layer, group, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in MODULE_GROUPS or MODULE_GROUPS[module] != group:
            raise AdapterValidationError(f"{WEIGHTS_FILE}: target module {group}.{module} is not supported "
                                         f"(supported: {', '.join(MODULE_GROUPS)})")
        if base is not None and layer >= base.num_layers:
            raise AdapterValidationError(f"{WEIGHTS_FILE}: layer {layer} does not exist (base model has "
                                         f"{base.num_layers} layers)")
        pairs.setdefault((layer, module), {})[ab] = t
    if not pairs:
        raise AdapterValidationError(f"{WEIGHTS_FILE} holds no LoRA weights")
    ranks = set()
    for (layer, module), ab in sorted(pairs.items()):
        where = f"{WEIGHTS_FILE}: layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise AdapterValidationError(f"{where} has lora_{''.join(ab)} but not its pair")
        a, b = ab["A"].shape, ab["B"].shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterValidationError(f"{where}: lora_A {list(a)} and lora_B {list(b)} are not a rank-r pair "
                                         "(expected A [r, in] and B [out, r])")
        if shapes is not None and (a[1], b[0]) != shapes[module]:
            fan_in, fan_out = shapes[module]
            raise AdapterValidationError(f"{where}: lora_A {list(a)} / lora_B {list(b)} do not match the base model "
                                         f"{base.name} (expected A [r, {fan_in}] and B [{fan_out}, r])")
        if a[0] < 1 or a[0] > max_rank:
            raise AdapterValidationError(f"{where}: rank {a[0]} is over the server's limit {max_rank} "
                                         "(max_lora_rank)" if a[0] else f"{where}: rank 0")
        ranks.add(a[0])
    _check_finite(weights, tensors, data_start)
    targets = sorted({m for _, m in pairs}, key=list(MODULE_GROUPS).index)
    return AdapterManifest(rank=max(ranks), alpha=float(conf.get("lora_alpha", 8)), target_modules=targets,
                           sha256=sha256_file(weights), bytes=weights.stat().st_size,
                           base_model_name=conf.get("base_model_name_or_path"), config=conf)
