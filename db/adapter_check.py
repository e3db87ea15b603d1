"""Check a PEFT LoRA adapter directory before it is accepted, without torch.

The API side registers adapters too, so nothing here imports torch: the
safetensors header is parsed by hand (``db.safetensors_header``), every
tensor's byte range is checked against the file, and values are checked for
NaN/Inf through their exponent bits with numpy. The worker applies the same
rules (``check_config``, ``check_tensors``) when it loads an adapter
(``worker.lora.peft_format``), then checks the values again with torch.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from db.safetensors_header import (MAX_WEIGHT_ABS, AdapterValidationError, TensorInfo, check_values, parse_json,
                                   read_limited, read_safetensors_header)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_CONFIG_BYTES = 1024 * 1024        # a PEFT config is a few KB, even with per-module patterns
# projection -> which block of a Llama-family layer holds it (in the model's module order)
MODULE_GROUPS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                  r"(?:\.\w+)?\.weight$", re.ASCII)
# alpha_pattern / rank_pattern keys are regexes (as in PEFT) matched against module names; without
# repetition (* + ? {}) a pattern cannot backtrack catastrophically and hang the loader
_PATTERN_KEY = re.compile(r"^[A-Za-z0-9_.|()\[\]^$\\-]{1,256}$")


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
            raw = read_limited(path, MAX_CONFIG_BYTES, f"base model: {path}")
        except FileNotFoundError as e:
            raise AdapterValidationError(f"base model: no config.json in {model_dir}") from e
        return cls.from_config(parse_json(raw, f"base model: {path}"), name or str(Path(model_dir).resolve()))

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


@dataclass(frozen=True)
class LoraPair:
    """The two tensors of one adapted projection, by name in the safetensors file."""
    group: str               # self_attn | mlp
    a: str
    b: str
    rank: int


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "..."


def check_inside(root: Path, path: Path) -> None:
    """Refuse ``path`` if it is a symlink loop or leads (through symlinks) out of ``root``."""
    try:
        target = path.resolve(strict=True)
        real_root = root.resolve(strict=True)
    except FileNotFoundError:
        return                   # missing or dangling: the caller says what is missing
    except (OSError, RuntimeError) as e:       # a symlink loop (RuntimeError up to Python 3.12)
        raise AdapterValidationError(f"{path.relative_to(root)} cannot be resolved ({e}): a symlink loop?") from e
    if target != real_root and real_root not in target.parents:
        raise AdapterValidationError(f"{path.relative_to(root)} is a symlink to {os.readlink(path)}, outside "
                                     "the adapter directory; copy the file in instead"
                                     if path.is_symlink() else
                                     f"{path.relative_to(root)} leads outside the adapter directory")


def check_source_dir(root: Path) -> None:
    """The directory itself: a real directory, no pickles, no symlink leading out of it (or looping)."""
    if not root.is_dir():
        raise AdapterValidationError(f"{root} is not a directory (an adapter is a directory holding "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    pickles = []
    for p in root.iterdir():         # only the top level: nothing below it is read or copied
        if p.is_symlink():
            check_inside(root, p)
        if p.name.lower().endswith(PICKLE_SUFFIXES) and not p.is_dir():
            pickles.append(p.name)
    if pickles:
        raise AdapterValidationError(
            f"{', '.join(sorted(pickles))}: pickle file(s) are refused (unpickling can run arbitrary code); "
            f"save the weights as {WEIGHTS_FILE} (safetensors) and remove the pickle files")
    if not (root / CONFIG_FILE).is_file():
        raise AdapterValidationError(f"{CONFIG_FILE} is missing in {root}")
    if not (root / WEIGHTS_FILE).is_file():
        raise AdapterValidationError(f"{WEIGHTS_FILE} is missing in {root}")


def read_config(path: Path) -> dict:
    """Parse ``adapter_config.json`` (at most ``MAX_CONFIG_BYTES``) and check it (``check_config``)."""
    return check_config(parse_json(read_limited(path, MAX_CONFIG_BYTES, CONFIG_FILE), CONFIG_FILE))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config(conf) -> dict:
    """Refuse a config our LoRA runtime cannot serve, or whose fields have the wrong types."""
    if not isinstance(conf, dict):
        raise AdapterValidationError(f"{CONFIG_FILE} must hold a JSON object, got {type(conf).__name__}")
    if conf.get("peft_type", "LORA") != "LORA":
        raise AdapterValidationError(f"{CONFIG_FILE}: peft_type {_short(conf.get('peft_type'))} is not supported "
                                     "(only LORA)")
    for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out"),
                       ("modules_to_save", "modules_to_save")):
        if conf.get(flag):
            raise AdapterValidationError(f"{CONFIG_FILE}: {what} is not supported")
    if conf.get("bias", "none") != "none":
        raise AdapterValidationError(f"{CONFIG_FILE}: bias={_short(conf['bias'])} is not supported (only 'none')")
    r = conf.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterValidationError(f"{CONFIG_FILE}: r must be a positive integer, got {_short(r)}")
    alpha = conf.get("lora_alpha", 8)
    if not _number(alpha) or abs(alpha) > MAX_WEIGHT_ABS:
        raise AdapterValidationError(f"{CONFIG_FILE}: lora_alpha must be a finite number of magnitude at most "
                                     f"{MAX_WEIGHT_ABS:g}, got {_short(alpha)}")
    if conf.get("use_rslora") is not None and not isinstance(conf["use_rslora"], bool):
        raise AdapterValidationError(f"{CONFIG_FILE}: use_rslora must be true or false, got "
                                     f"{_short(conf['use_rslora'])}")
    name = conf.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        raise AdapterValidationError(f"{CONFIG_FILE}: base_model_name_or_path must be a string, got {_short(name)}")
    targets = conf.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if not isinstance(t, str) or t not in MODULE_GROUPS]
        if unknown:
            raise AdapterValidationError(f"{CONFIG_FILE}: target module(s) {', '.join(map(_short, unknown[:5]))} not "
                                         f"supported (supported: {', '.join(MODULE_GROUPS)})")
    elif targets is not None and not isinstance(targets, str):
        raise AdapterValidationError(f"{CONFIG_FILE}: target_modules must be a list of names or a string, got "
                                     f"{_short(targets)}")
    _check_patterns(conf, "rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                    "a positive integer")
    _check_patterns(conf, "alpha_pattern", lambda v: _number(v) and abs(v) <= MAX_WEIGHT_ABS,
                    f"a finite number of magnitude at most {MAX_WEIGHT_ABS:g}")
    return conf


def _check_patterns(conf: dict, field_name: str, valid, what: str) -> None:
    patterns = conf.get(field_name)
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise AdapterValidationError(f"{CONFIG_FILE}: {field_name} must be an object {{module pattern: value}}, "
                                     f"got {_short(patterns)}")
    for key, value in patterns.items():
        if not _PATTERN_KEY.match(key):
            raise AdapterValidationError(
                f"{CONFIG_FILE}: {field_name} key {_short(key)} is not supported: a module name or a pattern of at "
                "most 256 characters without repetition (* + ? {})")
        try:
            re.compile(key)
        except re.error as e:
            raise AdapterValidationError(f"{CONFIG_FILE}: {field_name} key {_short(key)} is not a valid pattern: "
                                         f"{e}") from e
        if not valid(value):
            raise AdapterValidationError(f"{CONFIG_FILE}: {field_name}[{_short(key)}] must be {what}, got "
                                         f"{_short(value)}")


def pattern_value(patterns: dict | None, module_path: str, default):
    """The value of the first of ``patterns`` (PEFT's alpha_pattern / rank_pattern) matching a module."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module_path):
            return value
    return default


def module_path(layer: int, group: str, module: str) -> str:
    """The module's name in the base model, as PEFT's patterns see it."""
    return f"model.layers.{layer}.{group}.{module}"


def check_tensors(tensors: dict[str, TensorInfo], conf: dict, base: BaseModelShape | None,
                  max_rank: int) -> dict[tuple[int, str], LoraPair]:
    """Every tensor a LoRA A/B weight of a known projection and layer, paired, of the base model's
    shapes, of the config's rank and within ``max_rank``; returns (layer, module) -> its pair."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    groups: dict[tuple[int, str], str] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterValidationError(f"{WEIGHTS_FILE}: tensor {_short(key)} is not a LoRA A/B weight of a "
                                         "known layer (embedding LoRA, modules_to_save and biases are not supported)")
        layer, group, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in MODULE_GROUPS or MODULE_GROUPS[module] != group:
            raise AdapterValidationError(f"{WEIGHTS_FILE}: target module {group}.{module} is not supported "
                                         f"(supported: {', '.join(MODULE_GROUPS)})")
        if base is not None and layer >= base.num_layers:
            raise AdapterValidationError(f"{WEIGHTS_FILE}: layer {layer} does not exist (base model has "
                                         f"{base.num_layers} layers)")
        slot = found.setdefault((layer, module), {})
        if ab in slot:
            raise AdapterValidationError(f"{WEIGHTS_FILE}: layers.{layer}.{module} has two lora_{ab} tensors "
                                         f"({_short(slot[ab])} and {_short(key)})")
        slot[ab], groups[(layer, module)] = key, group
    if not found:
        raise AdapterValidationError(f"{WEIGHTS_FILE} holds no LoRA weights")
    shapes = base.module_shapes if base else None
    pairs = {}
    for (layer, module), ab in sorted(found.items()):
        where = f"{WEIGHTS_FILE}: layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise AdapterValidationError(f"{where} has lora_{''.join(ab)} but not its pair")
        a, b = tensors[ab["A"]].shape, tensors[ab["B"]].shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterValidationError(f"{where}: lora_A {list(a)} and lora_B {list(b)} are not a rank-r pair "
                                         "(expected A [r, in] and B [out, r])")
        if shapes is not None and (a[1], b[0]) != shapes[module]:
            fan_in, fan_out = shapes[module]
            raise AdapterValidationError(f"{where}: lora_A {list(a)} / lora_B {list(b)} do not match the base model "
                                         f"{base.name} (expected A [r, {fan_in}] and B [{fan_out}, r])")
        rank = a[0]
        if rank < 1:
            raise AdapterValidationError(f"{where}: rank 0 (lora_A and lora_B are empty)")
        if rank > max_rank:
            raise AdapterValidationError(f"{where}: rank {rank} is over the server's limit {max_rank} "
                                         "(max_lora_rank)")
        declared = pattern_value(conf.get("rank_pattern"), module_path(layer, groups[(layer, module)], module),
                                 conf.get("r", 8))
        if rank != declared:
            raise AdapterValidationError(f"{where}: the tensors have rank {rank} but {CONFIG_FILE} says "
                                         f"r={declared} (the scaling alpha/r would be wrong)")
        pairs[(layer, module)] = LoraPair(groups[(layer, module)], ab["A"], ab["B"], rank)
    return pairs


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
    pairs = check_tensors(tensors, conf, base, max_rank)
    check_values(weights, tensors, data_start)
    targets = sorted({m for _, m in pairs}, key=list(MODULE_GROUPS).index)
    return AdapterManifest(rank=max(p.rank for p in pairs.values()), alpha=float(conf.get("lora_alpha", 8)),
                           target_modules=targets, sha256=sha256_file(weights), bytes=weights.stat().st_size,
                           base_model_name=conf.get("base_model_name_or_path"), config=conf)
