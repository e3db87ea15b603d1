"""Registering adapters: every broken adapter is refused with a specific message and leaves nothing behind."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from db.adapters import Adapter, AdapterOwnershipError
from db.adapter_check import BaseModelShape, inspect_adapter, read_safetensors_header
from db.store import AdapterValidationError, LocalStore, register, unregister
from worker.lora.peft_format import load_peft_adapter
from worker.model.config import ModelConfig
from worker.tiny import make_adapter

WEIGHTS = "adapter_model.safetensors"


def store_files(store: LocalStore) -> list[Path]:
    return sorted(p for p in store.root.rglob("*") if not p.is_dir()) if store.root.exists() else []


def rows(engine: Engine) -> list[Adapter]:
    with Session(engine) as s:
        return list(s.exec(select(Adapter)).all())


# --- each way an adapter can be broken: (how to break the copy of ad1, a phrase the error must contain) -------

def add_pickle(src: Path, tmp: Path) -> None:
    (src / "adapter_model.bin").write_bytes(b"\x80\x04\x95 not really a pickle")


def drop_config(src: Path, tmp: Path) -> None:
    (src / "adapter_config.json").unlink()


def wrong_hidden_size(src: Path, tmp: Path) -> None:
    other = tmp / "other-model"
    other.mkdir()
    cfg = json.loads((Path(json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"])
                      / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96, "head_dim": 24}))
    make_adapter(other, src, rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=5)


def rank_over_limit(src: Path, tmp: Path) -> None:
    model = json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"]
    make_adapter(model, src, rank=80, alpha=80, targets=["q_proj", "v_proj"], seed=5)


def unknown_target(src: Path, tmp: Path) -> None:
    t = load_file(src / WEIGHTS)
    t = {k.replace("self_attn.q_proj", "self_attn.qk_proj"): v for k, v in t.items()}
    save_file(t, str(src / WEIGHTS))


def unknown_target_in_config(src: Path, tmp: Path) -> None:
    conf = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**conf, "target_modules": ["q_proj", "lm_head"]}))


def truncate(src: Path, tmp: Path) -> None:
    data = (src / WEIGHTS).read_bytes()
    (src / WEIGHTS).write_bytes(data[:-100])


def huge_header(src: Path, tmp: Path) -> None:
    (src / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")


def symlink_outside(src: Path, tmp: Path) -> None:
    outside = tmp / "elsewhere.safetensors"
    os.replace(src / WEIGHTS, outside)
    os.symlink(outside, src / WEIGHTS)


def int_dtype(src: Path, tmp: Path) -> None:
    t = load_file(src / WEIGHTS)
    save_file({k: (v * 100).to(torch.int64) for k, v in t.items()}, str(src / WEIGHTS))


def nan_weight(src: Path, tmp: Path) -> None:
    t = load_file(src / WEIGHTS)
    key = sorted(t)[0]
    t[key] = t[key].to(torch.bfloat16)
    t[key][0, 0] = float("nan")
    save_file(t, str(src / WEIGHTS))


BROKEN = {
    "pickle": (add_pickle, "adapter_model.bin: pickle file(s) are refused"),
    "missing-config": (drop_config, "adapter_config.json is missing"),
    "wrong-hidden-size": (wrong_hidden_size, "do not match the base model"),
    "rank-over-limit": (rank_over_limit, "rank 80 is over the server's limit 64"),
    "unknown-target": (unknown_target, "target module self_attn.qk_proj is not supported"),
    "unknown-target-in-config": (unknown_target_in_config, "'lm_head' not supported"),
    "truncated": (truncate, "is truncated"),
    "huge-header": (huge_header, "header of 1099511627776 bytes is over the 16777216-byte limit"),
    "symlink-outside": (symlink_outside, "is a symlink to"),
    "int-dtype": (int_dtype, "has dtype I64; LoRA weights must be floating point"),
    "nan": (nan_weight, "contains NaN or Inf"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_adapter_is_refused_and_leaves_nothing(case, db_engine, store, good_adapter, tiny, tmp_path):
    model_dir, _ = tiny
    breaker, message = BROKEN[case]
    breaker(good_adapter, tmp_path)
    with Session(db_engine) as s, pytest.raises(AdapterValidationError) as err:
        register(s, store, good_adapter, "acme/broken", tenant="acme", base_model=model_dir)
    assert message in str(err.value)
    assert rows(db_engine) == []
    assert store_files(store) == []


def test_good_adapter_registers_and_reregistering_bumps_the_version(db_engine, store, tiny):
    model_dir, adapters = tiny
    weights = adapters["ad0"] / WEIGHTS
    with Session(db_engine) as s:
        row = register(s, store, adapters["ad0"].as_uri(), "acme/chat", tenant="acme", base_model=model_dir)
    assert (row.version, row.rank, row.alpha, row.tenant) == (1, 8, 16.0, "acme")
    assert row.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert row.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert row.bytes == weights.stat().st_size
    assert row.visibility == "private" and row.group.startswith("g")
    v1 = store.open(row.storage_uri)
    assert v1 == store.root / "acme" / "acme~chat" / "v1"
    assert sorted(p.name for p in v1.iterdir()) == ["adapter_config.json", WEIGHTS]
    # what the store holds loads in the worker
    loaded = load_peft_adapter("acme/chat", v1, ModelConfig.from_dir(model_dir), max_rank=64)
    assert loaded.rank == 8 and len(loaded.modules) == 14

    with Session(db_engine) as s:        # a new version, with other weights, under the same id
        row2 = register(s, store, adapters["ad2"], "acme/chat", tenant="acme", base_model=model_dir, public=True)
    assert (row2.version, row2.rank, row2.visibility) == (2, 16, "public")
    assert [r.version for r in rows(db_engine)] == [2]
    v2 = store.open(row2.storage_uri)
    assert v2.name == "v2" and v1.is_dir()           # the old version stays for workers still serving it

    with Session(db_engine) as s:
        unregister(s, store, "acme/chat", tenant="acme")
    assert rows(db_engine) == []
    assert store_files(store) == [] and not (store.root / "acme").exists()


def test_failure_after_the_copy_leaves_nothing(db_engine, store, tiny, monkeypatch):
    model_dir, adapters = tiny
    with Session(db_engine) as s:
        register(s, store, adapters["ad1"], "shared", tenant="acme", base_model=model_dir)
    before = store_files(store)
    # another tenant may not take the id: refused after staging, nothing of it kept
    with Session(db_engine) as s, pytest.raises(AdapterOwnershipError):
        register(s, store, adapters["ad2"], "shared", tenant="globex", base_model=model_dir)
    assert store_files(store) == before
    # the commit itself fails after the version directory appeared: the files go too
    with Session(db_engine) as s:
        def boom():
            raise RuntimeError("database went away")
        monkeypatch.setattr(s, "commit", boom)
        with pytest.raises(RuntimeError, match="went away"):
            register(s, store, adapters["ad2"], "shared", tenant="acme", base_model=model_dir)
    assert store_files(store) == before
    assert [(r.version, r.rank) for r in rows(db_engine)] == [(1, 4)]


def test_unregister_checks_the_tenant(db_engine, store, tiny):
    model_dir, adapters = tiny
    with Session(db_engine) as s:
        register(s, store, adapters["ad1"], "mine", tenant="acme", base_model=model_dir)
        with pytest.raises(LookupError, match="not registered for tenant 'globex'"):
            unregister(s, store, "mine", tenant="globex")
        with pytest.raises(LookupError, match="not registered"):
            unregister(s, store, "nobody")
    assert len(rows(db_engine)) == 1 and store_files(store)


def test_validation_needs_no_torch_and_reads_the_header(tiny):
    import subprocess
    import sys
    model_dir, adapters = tiny
    code = ("import sys; from db.store import inspect_adapter, BaseModelShape; "
            f"m = inspect_adapter({str(adapters['ad3'])!r}, BaseModelShape.from_dir({str(model_dir)!r}), 64); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(m.rank, m.alpha, m.target_modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2]).stdout
    assert out.split()[0:2] == ["32", "32.0"]
    tensors, start = read_safetensors_header(adapters["ad3"] / WEIGHTS)
    assert start > 8 and all(t.dtype == "F32" for t in tensors.values())
    m = inspect_adapter(adapters["ad3"], None, 64)     # no base model: shapes checked for consistency only
    assert m.target_modules == ["k_proj", "up_proj"]
    with pytest.raises(AdapterValidationError, match="no config.json"):
        BaseModelShape.from_dir(adapters["ad3"])


def test_bad_ids_tenants_and_sources_are_refused(db_engine, store, tiny):
    model_dir, adapters = tiny
    with Session(db_engine) as s:
        for kwargs, message in [(dict(adapter_id="Bad Id"), "invalid adapter id"),
                                (dict(adapter_id="ok", tenant="../etc"), "invalid tenant"),
                                (dict(adapter_id="ok", src="s3://bucket/x"), "only local paths and file:// URIs"),
                                (dict(adapter_id="ok", src=str(model_dir / "nope")), "is not a directory")]:
            args = {"src": adapters["ad1"], "tenant": None, **kwargs}
            with pytest.raises(AdapterValidationError, match=message):
                register(s, store, args.pop("src"), args.pop("adapter_id"), base_model=model_dir, **args)
    assert rows(db_engine) == [] and store_files(store) == []
