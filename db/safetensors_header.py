"""A safetensors file's header, parsed and checked by hand, without torch.

The format: an 8-byte little-endian header length, a JSON object (tensor name ->
``{dtype, shape, data_offsets}``, plus an optional ``__metadata__`` of strings),
then the data section. The rules are those of the safetensors reader itself,
so a file accepted here loads in the worker: offsets tile the data section
exactly (no overlap, no gap, no trailing bytes), each tensor's byte count
matches its shape, no name appears twice. Values are checked through their
bits with numpy (bf16 has no numpy float type).
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path


class AdapterValidationError(ValueError):
    """An adapter was refused; the message names the file and what is wrong with it."""


MAX_HEADER_BYTES = 16 * 1024 * 1024
# weights are served in float16 / bfloat16: anything past float16's largest finite value is corrupt
MAX_WEIGHT_ABS = 65504.0
# safetensors dtype -> (bytes per element, mask of the exponent bits: all set = NaN or Inf)
FLOAT_DTYPES = {"F16": (2, 0x7C00), "BF16": (2, 0x7F80), "F32": (4, 0x7F800000), "F64": (8, 0x7FF0000000000000)}
ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
              "I64": 8, "U64": 8, **{k: v[0] for k, v in FLOAT_DTYPES.items()}}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int              # byte offsets inside the data section
    end: int


def _no_duplicates(pairs: list[tuple]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise AdapterValidationError(f"key {_short(key)} appears twice")
        seen[key] = value
    return seen


def parse_json(raw: bytes, what: str, unique_keys: bool = False):
    """``raw`` as JSON; every way it can fail (bad UTF-8, syntax, nesting, huge numbers) is an
    AdapterValidationError naming ``what``."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates if unique_keys else None)
    except RecursionError as e:
        raise AdapterValidationError(f"{what} is nested too deeply to be valid") from e
    except AdapterValidationError as e:
        raise AdapterValidationError(f"{what}: {e}") from e
    except ValueError as e:       # JSONDecodeError, UnicodeDecodeError, integers over Python's digit limit
        raise AdapterValidationError(f"{what} is not valid JSON: {e}") from e


def open_regular(path: Path):
    """``path`` opened for reading, refused unless it is a regular file (a FIFO or a device would
    block or never end; O_NONBLOCK keeps the open itself from waiting on a FIFO)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterValidationError(f"{path.name} is not a regular file")
    return os.fdopen(fd, "rb")


def read_limited(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (checked on the open file, not the name)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise AdapterValidationError(f"{what} is {size} bytes, over the {limit}-byte limit")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise AdapterValidationError(f"{what} is over the {limit}-byte limit")
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(info) -> TensorInfo | None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        return None
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not (isinstance(dtype, str) and dtype in ITEM_SIZES and isinstance(shape, list)
            and all(_is_int(d) and d >= 0 for d in shape) and isinstance(offsets, list) and len(offsets) == 2
            and all(_is_int(o) and o >= 0 for o in offsets)):
        return None
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """Tensor table of a safetensors file and the offset of its data section; refuses corrupt files."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise AdapterValidationError(f"{path.name} is truncated: {size} bytes, not a readable safetensors "
                                         "file (not even a header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise AdapterValidationError(f"{path.name}: header of {n} bytes is over the {MAX_HEADER_BYTES}-byte "
                                         "limit (corrupt or hostile file)")
        if 8 + n > size:
            raise AdapterValidationError(f"{path.name} is truncated: header says {n} bytes, file has {size - 8}")
        raw = f.read(n)
    header = parse_json(raw, f"{path.name}: header", unique_keys=True)
    if not isinstance(header, dict):
        raise AdapterValidationError(f"{path.name}: header must be a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise AdapterValidationError(f"{path.name}: __metadata__ must map strings to strings")
    data_len = size - 8 - n
    tensors = {}
    for name, info in header.items():
        t, what = _entry(info), f"{path.name}: tensor {_short(name)}"
        if t is None:
            raise AdapterValidationError(f"{what} has a malformed header entry {_short(info)} "
                                         f"(known dtypes: {', '.join(ITEM_SIZES)})")
        if not t.begin <= t.end <= data_len:
            raise AdapterValidationError(f"{path.name} is truncated or corrupt: tensor {_short(name)} lies at "
                                         f"bytes [{t.begin}, {t.end}) of a {data_len}-byte data section")
        need = math.prod(t.shape) * ITEM_SIZES[t.dtype]
        if t.end - t.begin != need:
            raise AdapterValidationError(f"{what} {t.dtype}{_short(list(t.shape))} needs {need} bytes, header "
                                         f"gives {t.end - t.begin}")
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterValidationError(f"{what} has dtype {t.dtype}; LoRA weights must be floating point "
                                         f"({', '.join(FLOAT_DTYPES)})")
        tensors[name] = t
    _check_tiling(path, tensors, data_len)
    return tensors, 8 + n


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """Tensors must cover the data section end to end, in some order, each byte once."""
    at = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != at:
            what = "overlaps the tensor before it" if t.begin < at else f"leaves bytes [{at}, {t.begin}) unused"
            raise AdapterValidationError(f"{path.name} is corrupt: tensor {_short(name)} at bytes "
                                         f"[{t.begin}, {t.end}) {what}")
        at = t.end
    if at != data_len:
        raise AdapterValidationError(f"{path.name} is corrupt: {data_len - at} bytes after the last tensor "
                                     "belong to no tensor")


def check_values(path: Path, tensors: dict[str, TensorInfo], data_start: int) -> None:
    """Every weight finite and within float16's range (the dtype a GPU worker serves in)."""
    import numpy as np  # only here: the exponent-bit test needs no float type

    ints = {2: np.uint16, 4: np.uint32, 8: np.uint64}
    floats = {"F32": np.float32, "F64": np.float64}
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    for name, t in tensors.items():
        size, mask = FLOAT_DTYPES[t.dtype]
        words = data[data_start + t.begin:data_start + t.end].view(ints[size])
        if np.any((words & ints[size](mask)) == ints[size](mask)):
            raise AdapterValidationError(f"{path.name}: tensor {_short(name)} contains NaN or Inf")
        if t.dtype in floats:
            too_big = words.size and float(np.abs(words.view(floats[t.dtype])).max()) > MAX_WEIGHT_ABS
        else:   # bf16: exponent field 143 and up is 2**16 and up; f16 cannot exceed the limit
            too_big = t.dtype == "BF16" and bool(np.any(((words >> 7) & 0xFF) >= 143))
        if too_big:
            raise AdapterValidationError(f"{path.name}: tensor {_short(name)} has values beyond "
                                         f"+-{MAX_WEIGHT_ABS:g} (float16's range): the weights are corrupt")
