"""A corpus of hostile or broken PEFT adapters, made on the fly from a copy of a good one.

Each case is one small function that breaks the adapter directory ``d`` (a copy
of the tiny model's ``ad1``: rank 4, alpha 8, q_proj + v_proj, float32, two
layers); ``outside`` is a scratch folder beside it, outside the adapter. The
decorator names the case and the phrase each validator's error must contain:
``error`` for the registry (``db.store.register``), ``loader`` for the worker
(``load_peft_adapter``) when it says it differently.

    build(name, good, work, model_dir) -> (adapter dir, outside dir)

Pickles carry a ``__reduce__`` that creates ``outside/UNPICKLED``: if the file
exists afterwards, something unpickled the adapter.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from worker.tiny import make_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MARKER = "UNPICKLED"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
LIMIT = "-byte limit"


@dataclass(frozen=True)
class Hostile:
    name: str
    make: Callable[[Path, Path, Path], None]        # (adapter dir, outside dir, base model dir)
    error: str                                      # phrase of the registry's error
    loader: str                                     # phrase of the worker's AdapterError


CASES: dict[str, Hostile] = {}


def hostile(error: str, loader: str | None = None):
    def add(fn):
        name = fn.__name__.replace("_", "-")
        CASES[name] = Hostile(name, fn, error, loader or error)
        return fn
    return add


def build(name: str, good: Path, work: Path, model_dir: Path) -> tuple[Path, Path]:
    d, outside = work / "adapter", work / "outside"
    shutil.copytree(good, d)
    outside.mkdir()
    CASES[name].make(d, outside, model_dir)
    return d, outside


# --- helpers --------------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates ``path``: the proof that something ran code from the adapter."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def payload(outside: Path) -> bytes:
    return pickle.dumps({Q_A: Payload(outside / MARKER)})


def config(d: Path) -> dict:
    return json.loads((d / CONFIG).read_text())


def set_config(d: Path, **changes) -> None:
    (d / CONFIG).write_text(json.dumps({**config(d), **changes}))


def tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / WEIGHTS))


def save(d: Path, t: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in t.items()}, str(d / WEIGHTS))


def split(d: Path) -> tuple[dict, bytes]:
    """(header, data section) of the adapter's safetensors file."""
    raw = (d / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(d: Path, header: dict | bytes, data: bytes) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(h)) + h + data)


def edit_header(d: Path, fn) -> None:
    header, data = split(d)
    fn(header)
    write_raw(d, header, data)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- pickles --------------------------------------------------------------------------------------

@hostile("adapter_model.bin: pickle file(s) are refused", loader="weights are pickled (adapter_model.bin)")
def pickle_bin_with_code(d, outside, model):
    (d / WEIGHTS).unlink()
    (d / "adapter_model.bin").write_bytes(payload(outside))


@hostile("adapter_model.bin: pickle file(s) are refused", loader="weights are pickled (adapter_model.bin)")
def torch_save_bin(d, outside, model):
    torch.save(tensors(d), d / "adapter_model.bin")      # what old PEFT versions wrote
    (d / WEIGHTS).unlink()


@hostile("adapter_model.pt: pickle file(s) are refused", loader="weights are pickled (adapter_model.pt)")
def pickle_pt(d, outside, model):
    (d / WEIGHTS).unlink()
    (d / "adapter_model.pt").write_bytes(payload(outside))


@hostile(LIMIT)
def safetensors_that_is_a_pickle(d, outside, model):
    (d / WEIGHTS).write_bytes(payload(outside))


@hostile(LIMIT)
def safetensors_that_is_a_torch_zip(d, outside, model):
    t = tensors(d)
    torch.save(t, d / WEIGHTS)


# --- symlinks and special files -------------------------------------------------------------------

@hostile("adapter_model.safetensors is a symlink to /etc/passwd, outside the adapter directory")
def weights_symlink_to_etc_passwd(d, outside, model):
    (d / WEIGHTS).unlink()
    (d / WEIGHTS).symlink_to("/etc/passwd")


@hostile("adapter_config.json is a symlink to /etc/passwd, outside the adapter directory")
def config_symlink_to_etc_passwd(d, outside, model):
    (d / CONFIG).unlink()
    (d / CONFIG).symlink_to("/etc/passwd")


@hostile("adapter_config.json is a symlink to")
def config_symlink_to_a_good_config_outside(d, outside, model):
    os.replace(d / CONFIG, outside / CONFIG)
    (d / CONFIG).symlink_to(outside / CONFIG)


@hostile("adapter_model.safetensors is a symlink to")
def weights_symlink_to_good_weights_outside(d, outside, model):
    os.replace(d / WEIGHTS, outside / WEIGHTS)
    (d / WEIGHTS).symlink_to(outside / WEIGHTS)


@hostile("adapter_model.safetensors is a symlink to /dev/zero")
def weights_symlink_to_dev_zero(d, outside, model):
    (d / WEIGHTS).unlink()
    (d / WEIGHTS).symlink_to("/dev/zero")


@hostile("a symlink loop")
def weights_symlink_loop(d, outside, model):
    (d / WEIGHTS).unlink()
    (d / WEIGHTS).symlink_to(d / WEIGHTS)


@hostile("adapter_model.safetensors is missing", loader="no adapter_model.safetensors")
def weights_dangling_symlink(d, outside, model):
    (d / WEIGHTS).unlink()
    (d / WEIGHTS).symlink_to(d / "gone.safetensors")


@hostile("is not a directory")
def whole_dir_symlink_to_etc_passwd(d, outside, model):
    shutil.rmtree(d)
    d.symlink_to("/etc/passwd")


@hostile("adapter_config.json is missing")
def whole_dir_symlink_to_filesystem_root(d, outside, model):
    shutil.rmtree(d)
    d.symlink_to("/")


@hostile("adapter_model.safetensors is missing", loader="no adapter_model.safetensors")
def weights_is_a_fifo(d, outside, model):
    (d / WEIGHTS).unlink()
    os.mkfifo(d / WEIGHTS)


@hostile("adapter_config.json is missing")
def config_is_a_fifo(d, outside, model):
    (d / CONFIG).unlink()
    os.mkfifo(d / CONFIG)


@hostile("adapter_model.safetensors is missing", loader="no adapter_model.safetensors")
def weights_is_a_directory(d, outside, model):
    (d / WEIGHTS).unlink()
    (d / WEIGHTS).mkdir()


# --- the safetensors container --------------------------------------------------------------------

@hostile("header of 1099511627776 bytes is over the 16777216-byte limit")
def header_length_2_pow_40(d, outside, model):
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")


@hostile("is truncated: header says 4096 bytes")
def header_longer_than_file(d, outside, model):
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 4096) + b'{"a": 1}')


@hostile("is truncated or corrupt")
def truncated_data(d, outside, model):
    raw = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(raw[:-100])


@hostile("is truncated: 0 bytes")
def empty_weights_file(d, outside, model):
    (d / WEIGHTS).write_bytes(b"")


@hostile("holds no LoRA weights")
def no_tensors(d, outside, model):
    write_raw(d, {"__metadata__": {"format": "pt"}}, b"")


@hostile("overlaps the tensor before it")
def overlapping_offsets(d, outside, model):
    def fn(h):
        first = min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        other = next(k for k in h if k not in (first, "__metadata__") and h[k]["shape"] == h[first]["shape"])
        h[other]["data_offsets"] = list(h[first]["data_offsets"])
    edit_header(d, fn)


@hostile("lies at bytes")
def offsets_out_of_range(d, outside, model):
    edit_header(d, lambda h: h[Q_A].update(data_offsets=[h[Q_A]["data_offsets"][0] + 10 ** 9,
                                                           h[Q_A]["data_offsets"][1] + 10 ** 9]))


@hostile("belong to no tensor")
def trailing_bytes_after_the_tensors(d, outside, model):
    with open(d / WEIGHTS, "ab") as f:
        f.write(b"\x00" * 64)


@hostile("appears twice")
def duplicated_key_in_header(d, outside, model):
    header, data = split(d)
    entry = json.dumps(header[Q_A])
    raw = json.dumps(header).encode()
    write_raw(d, raw[:-1] + f', "{Q_A}": {entry}}}'.encode(), data)


@hostile("header is not valid JSON")
def non_utf8_tensor_name(d, outside, model):
    header, data = split(d)
    raw = json.dumps(header).encode().replace(b"q_proj.lora_A", b"q_pr\xff\xfej.lora_A")
    write_raw(d, raw, data)


@hostile("is not a LoRA A/B weight")
def lone_surrogate_tensor_name(d, outside, model):
    header, data = split(d)
    raw = json.dumps(header).encode().replace(b"q_proj.lora_A", b"q_pr\\udc80j.lora_A")
    write_raw(d, raw, data)


@hostile("header is nested too deeply")
def header_nested_100k_deep(d, outside, model):
    write_raw(d, ('{"a": ' + nested(100_000) + "}").encode(), b"")


@hostile("header must be a JSON object")
def header_is_a_list(d, outside, model):
    write_raw(d, b"[1, 2, 3]", b"")


@hostile("__metadata__ must map strings to strings")
def metadata_with_a_number(d, outside, model):
    edit_header(d, lambda h: h.update(__metadata__={"format": 1}))


@hostile("has a malformed header entry")
def boolean_offsets(d, outside, model):
    header, data = split(d)
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    end = header[first]["data_offsets"][1]
    raw = json.dumps(header).encode().replace(f'"data_offsets": [0, {end}]'.encode(),
                                              f'"data_offsets": [false, {end}]'.encode())
    write_raw(d, raw, data)


@hostile("has a malformed header entry")
def unknown_dtype(d, outside, model):
    edit_header(d, lambda h: h[Q_A].update(dtype="F128"))


@hostile("header is not valid JSON")
def integer_of_5000_digits_in_header(d, outside, model):
    header, data = split(d)
    raw = json.dumps(header).encode().replace(b'"shape": [4, 64]', b'"shape": [4, ' + b"6" * 5000 + b"]", 1)
    write_raw(d, raw, data)


@hostile("needs 1024 bytes, header gives 512")
def shape_lies_about_size(d, outside, model):
    edit_header(d, lambda h: h[Q_A].update(data_offsets=[h[Q_A]["data_offsets"][0],
                                                           h[Q_A]["data_offsets"][0] + 512]))


# --- dtypes and values ----------------------------------------------------------------------------

@hostile("has dtype I8; LoRA weights must be floating point")
def int8_weights(d, outside, model):
    save(d, {k: (v * 100).to(torch.int8) for k, v in tensors(d).items()})


@hostile("has dtype BOOL; LoRA weights must be floating point")
def bool_weights(d, outside, model):
    save(d, {k: v > 0 for k, v in tensors(d).items()})


@hostile("has dtype F8_E4M3; LoRA weights must be floating point")
def float8_weights(d, outside, model):
    save(d, {k: v.to(torch.float8_e4m3fn) for k, v in tensors(d).items()})


@hostile("beyond +-65504")
def float64_beyond_half_range(d, outside, model):
    t = {k: v.double() for k, v in tensors(d).items()}
    t[Q_A][0, 0] = 1e6
    save(d, t)


@hostile("beyond +-65504")
def float32_beyond_half_range(d, outside, model):
    t = tensors(d)
    t[Q_B][1, 1] = -1e30
    save(d, t)


@hostile("beyond +-65504")
def bfloat16_beyond_half_range(d, outside, model):
    t = {k: v.bfloat16() for k, v in tensors(d).items()}
    t[Q_A][0, 0] = 3e38
    save(d, t)


@hostile("contains NaN or Inf", loader="contain NaN or Inf")
def nan_in_lora_a(d, outside, model):
    t = tensors(d)
    t[Q_A][2, 3] = float("nan")
    save(d, t)


@hostile("contains NaN or Inf", loader="contain NaN or Inf")
def inf_in_float16_lora_b(d, outside, model):
    t = {k: v.half() for k, v in tensors(d).items()}
    t[Q_B][0, 0] = float("-inf")
    save(d, t)


# --- shapes and ranks -----------------------------------------------------------------------------

@hostile("are not a rank-r pair")
def lora_a_transposed(d, outside, model):
    t = tensors(d)
    t[Q_A] = t[Q_A].T
    save(d, t)


@hostile("are not a rank-r pair")
def lora_a_one_dimensional(d, outside, model):
    t = tensors(d)
    t[Q_A] = t[Q_A].flatten()
    save(d, t)


@hostile("are not a rank-r pair")
def lora_b_three_dimensional(d, outside, model):
    t = tensors(d)
    t[Q_B] = t[Q_B][None]
    save(d, t)


@hostile("are not a rank-r pair")
def lora_b_rank_differs_from_lora_a(d, outside, model):
    t = tensors(d)
    t[Q_B] = t[Q_B][:, :3]
    save(d, t)


@hostile("rank 0")
def rank_zero_tensors(d, outside, model):
    t = tensors(d)
    t[Q_A], t[Q_B] = t[Q_A][:0], t[Q_B][:, :0]
    save(d, t)


@hostile("the tensors have rank 4 but adapter_config.json says r=8")
def config_r_lies(d, outside, model):
    set_config(d, r=8)


@hostile("the tensors have rank 4 but adapter_config.json says r=2")
def rank_pattern_lies(d, outside, model):
    set_config(d, rank_pattern={"q_proj": 2})


@hostile("rank 65 is over the server's limit 64")
def rank_above_max(d, outside, model):
    make_adapter(model, d, rank=65, alpha=65, targets=["q_proj"], seed=3)


@hostile("do not match the base model")
def hidden_size_of_another_model(d, outside, model):
    other = outside / "other-model"
    other.mkdir()
    cfg = json.loads((model / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96, "head_dim": 24}))
    make_adapter(other, d, rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=5)


@hostile("layer 2 does not exist")
def more_layers_than_the_model(d, outside, model):
    other = outside / "deeper-model"
    other.mkdir()
    cfg = json.loads((model / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    make_adapter(other, d, rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=5)


@hostile("does not exist")
def layer_index_10_pow_30(d, outside, model):
    t = tensors(d)
    save(d, {k.replace("layers.1.", f"layers.{10 ** 30}."): v for k, v in t.items()})


@hostile("is not a LoRA A/B weight")
def unicode_digit_layer_index(d, outside, model):
    t = tensors(d)
    save(d, {k.replace("layers.1.", "layers.\u0661."): v for k, v in t.items()})


@hostile("target module self_attn.qk_proj is not supported")
def unknown_target_module_tensor(d, outside, model):
    save(d, {k.replace("q_proj", "qk_proj"): v for k, v in tensors(d).items()})


@hostile("target module mlp.q_proj is not supported")
def module_under_the_wrong_block(d, outside, model):
    save(d, {k.replace("self_attn.q_proj", "mlp.q_proj"): v for k, v in tensors(d).items()})


@hostile("is not a LoRA A/B weight")
def extra_unknown_tensor(d, outside, model):
    t = tensors(d)
    t["base_model.model.lm_head.weight"] = torch.zeros(8, 64)
    save(d, t)


@hostile("has lora_A but not its pair")
def lora_b_missing(d, outside, model):
    t = tensors(d)
    del t[Q_B]
    save(d, t)


@hostile("has two lora_A tensors")
def same_weight_under_two_names(d, outside, model):
    t = tensors(d)
    t["model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros_like(t[Q_A])
    save(d, t)


# --- adapter_config.json --------------------------------------------------------------------------

@hostile("adapter_config.json is missing")
def missing_config(d, outside, model):
    (d / CONFIG).unlink()


@hostile("adapter_config.json is not valid JSON")
def config_not_json(d, outside, model):
    (d / CONFIG).write_text("r = 8\nlora_alpha = 16\n")


@hostile("adapter_config.json is not valid JSON")
def config_not_utf8(d, outside, model):
    (d / CONFIG).write_bytes(b'{"r": 4, "lora_alpha": 8, "base_model_name_or_path": "\xff\xfe"}')


@hostile("adapter_config.json must hold a JSON object")
def config_is_a_list(d, outside, model):
    (d / CONFIG).write_text("[4, 8]")


@hostile("adapter_config.json is nested too deeply")
def config_nested_100k_deep(d, outside, model):
    (d / CONFIG).write_text('{"r": 4, "lora_alpha": 8, "notes": ' + nested(100_000) + "}")


@hostile("over the 1048576-byte limit")
def config_of_1_5_mb(d, outside, model):
    conf = config(d)
    filler = "x" * (1536 * 1024 - len(json.dumps(conf)) - 16)
    (d / CONFIG).write_text(json.dumps({**conf, "notes": filler}))


@hostile("adapter_config.json is not valid JSON")
def integer_of_5000_digits_in_config(d, outside, model):
    (d / CONFIG).write_text('{"r": 4, "lora_alpha": ' + "9" * 5000 + "}")


@hostile("r must be a positive integer")
def r_is_a_string(d, outside, model):
    set_config(d, r="4")


@hostile("lora_alpha must be a finite number")
def alpha_is_a_string(d, outside, model):
    set_config(d, lora_alpha="16")


@hostile("lora_alpha must be a finite number")
def alpha_is_nan(d, outside, model):
    (d / CONFIG).write_text(json.dumps({**config(d), "lora_alpha": float("nan")}))   # the NaN literal


@hostile("lora_alpha must be a finite number")
def alpha_is_1e300(d, outside, model):
    set_config(d, lora_alpha=1e300)


@hostile("use_rslora must be true or false")
def use_rslora_is_a_string(d, outside, model):
    set_config(d, use_rslora="no")


@hostile("alpha_pattern must be an object")
def alpha_pattern_is_a_list(d, outside, model):
    set_config(d, alpha_pattern=["q_proj", 16])


@hostile("alpha_pattern['q_proj'] must be a finite number")
def alpha_pattern_value_is_a_string(d, outside, model):
    set_config(d, alpha_pattern={"q_proj": "16"})


@hostile("is not a valid pattern")
def alpha_pattern_bad_regex(d, outside, model):
    set_config(d, alpha_pattern={"q_proj(": 16})


@hostile("without repetition")
def alpha_pattern_catastrophic_regex(d, outside, model):
    set_config(d, alpha_pattern={"(.*)*x": 16})      # backtracks for hours on every module name


@hostile("base_model_name_or_path must be a string")
def base_model_name_is_an_object(d, outside, model):
    set_config(d, base_model_name_or_path={"$gt": ""})


@hostile("target module(s) {'x': 1} not supported")
def target_modules_holds_an_object(d, outside, model):
    set_config(d, target_modules=["q_proj", {"x": 1}])


@hostile("target module(s) 'embed_tokens' not supported")
def target_modules_unsupported(d, outside, model):
    set_config(d, target_modules=["q_proj", "embed_tokens"])


@hostile("peft_type 'PREFIX_TUNING' is not supported")
def not_a_lora(d, outside, model):
    set_config(d, peft_type="PREFIX_TUNING")


@hostile("bias='all' is not supported")
def lora_with_bias(d, outside, model):
    set_config(d, bias="all")
