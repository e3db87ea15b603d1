"""Hostile adapters (``hostile_adapters.CASES``): the registry and the worker refuse every one with a
specific error, leave nothing behind, never run code from a pickle, and a worker process serving a
directory of them keeps serving the good adapter beside them."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import Session

from db.adapter_check import AdapterValidationError
from db.store import LocalStore, register
from tests.chaos.hostile_adapters import CASES, MARKER, build, payload
from tests.db.conftest import db_engine, engine, postgres_url  # noqa: F401  (fixtures)
from tests.fleet.conftest import REPO, WorkerProc, client, reference, redis_url  # noqa: F401  (fixtures)
from tests.registry.test_store import rows, store_files
from worker.errors import AdapterError
from worker.lora.peft_format import load_peft_adapter
from worker.model.config import ModelConfig


@pytest.fixture
def work(tmp_path) -> Path:
    return tmp_path / "case"


def _good(tiny) -> Path:
    return tiny[1]["ad1"]


def test_the_corpus_is_large_and_each_case_is_hostile(tiny, tmp_path):
    """At least 30 cases; the pickle payload really runs code when unpickled (so the marker checks
    below can fail); the good adapter the cases start from is accepted by both validators."""
    assert len(CASES) >= 30
    marker = tmp_path / MARKER
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=payload(tmp_path), check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    assert marker.exists()
    model_dir, _ = tiny
    assert load_peft_adapter("good", _good(tiny), ModelConfig.from_dir(model_dir), max_rank=64).rank == 4
    from db.adapter_check import BaseModelShape, inspect_adapter
    assert inspect_adapter(_good(tiny), BaseModelShape.from_dir(model_dir), 64).rank == 4


@pytest.mark.parametrize("case", list(CASES))
def test_registry_refuses_and_keeps_nothing(case, db_engine, tiny, tmp_path, work):
    model_dir, _ = tiny
    src, outside = build(case, _good(tiny), work, model_dir)
    store = LocalStore(tmp_path / "store")
    with Session(db_engine) as s, pytest.raises(AdapterValidationError) as err:
        register(s, store, src, "acme/hostile", tenant="acme", base_model=model_dir)
    assert CASES[case].error in str(err.value), str(err.value)
    assert len(str(err.value)) < 600, "the message should say what is wrong, not echo the file"
    assert rows(db_engine) == []
    assert store_files(store) == []
    assert not (outside / MARKER).exists(), "a pickle was unpickled"


@pytest.mark.parametrize("case", list(CASES))
def test_worker_loader_refuses(case, tiny, work):
    model_dir, _ = tiny
    src, outside = build(case, _good(tiny), work, model_dir)
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(case, src, ModelConfig.from_dir(model_dir), max_rank=64)
    assert CASES[case].loader in str(err.value), str(err.value)
    assert str(err.value).startswith(f"adapter {case!r}: ")
    assert not (outside / MARKER).exists(), "a pickle was unpickled"


# a handful, most of which crashed the loader with another exception or hung it before the fixes
IN_WORKER = ["pickle-bin-with-code", "safetensors-that-is-a-pickle", "weights-symlink-to-etc-passwd",
             "config-nested-100k-deep", "alpha-pattern-catastrophic-regex", "float8-weights",
             "alpha-pattern-bad-regex", "config-r-lies", "nan-in-lora-a"]


def test_worker_process_refuses_hostile_adapters_and_keeps_serving(redis_url, client, reference, tiny,
                                                                    tmp_path):
    model_dir, adapters = tiny
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(_good(tiny), root / "ad1")
    outsides = []
    for case in IN_WORKER:
        src, outside = build(case, _good(tiny), tmp_path / case, model_dir)
        (root / case).symlink_to(src)          # the worker's directory names the adapter dirs
        outsides.append(outside)
    w = WorkerProc(redis_url, model_dir, root, "hostile-w", tmp_path, max_num_seqs=4).wait_ready()
    try:
        handles = {case: client.submit(prompt="the quick brown fox", adapter=case,
                                       params={"max_tokens": 4, "temperature": 0}) for case in IN_WORKER}
        for case, h in handles.items():
            res = h.wait(60)
            assert res.status == "failed" and res.finish_reason == "error", (case, res)
            assert CASES[case].loader in res.error, (case, res.error)
        ok = client.submit(prompt="the quick brown fox", adapter="ad1", params={"max_tokens": 8, "temperature": 0})
        res = ok.wait(60)
        want = reference("the quick brown fox", "ad1", max_tokens=8, temperature=0.0)
        assert res.status == "done" and res.token_ids == want.token_ids, res
        assert w.proc.poll() is None, w.output()
        assert "Traceback" not in w.output(), w.output()
    finally:
        w.stop()
    assert not any((o / MARKER).exists() for o in outsides), "a pickle was unpickled"


def test_an_unexpected_loader_error_fails_the_job_instead_of_leaving_it_running():
    """Before: only AdapterError became a refusal; any other exception escaped the job's task, and
    the job stayed 'running' on a live worker forever (its heartbeat kept it from reclaim)."""
    import asyncio

    from producer.protocol import Job
    from worker.runtime.adapter_dirs import AdapterDirectory
    from worker.runtime.admission import AdapterLoader, Refusal, engine_request
    from worker.runtime.job_state import RunningJob

    class Exploding(AdapterLoader):
        async def load(self, name):
            raise RuntimeError("disk on fire")

    rj = RunningJob(Job.parse({"id": "j-explodes", "adapter": "x", "prompt": "hi"}), delivery=None)
    out = asyncio.run(engine_request(rj, set(), Exploding(AdapterDirectory(), engine=None)))
    assert isinstance(out, Refusal) and out.reason == "error"
    assert out.error == "adapter(s) x could not be loaded: RuntimeError: disk on fire"


@pytest.mark.parametrize("case", ["config-nested-100k-deep", "base-model-name-is-an-object",
                                  "config-is-a-fifo"])
def test_cli_add_reports_the_broken_config(case, db_engine, tiny, work, monkeypatch, capsys):
    """``openlora adapters add`` without --base-model reads the adapter's config to find the base
    model: a config nested 100k deep was a RecursionError traceback, a non-string name a TypeError,
    a FIFO a read that never returned."""
    from worker.cli_adapters import main
    model_dir, _ = tiny
    src, _ = build(case, _good(tiny), work, model_dir)
    monkeypatch.setenv("DATABASE_URL", db_engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("OPENLORA_STORE", str(work / "store"))
    monkeypatch.delenv("OPENLORA_BASE_MODEL", raising=False)
    assert main(["adapters", "add", "hostile", str(src)]) == 2
    assert CASES[case].error in capsys.readouterr().err
    assert rows(db_engine) == []


def _variant(name: str, d: Path) -> None:
    import json

    import torch
    from safetensors.torch import load_file, save_file
    from tests.chaos.hostile_adapters import Q_A, WEIGHTS, set_config
    t = load_file(str(d / WEIGHTS))
    if name in ("float64", "bfloat16", "float16"):
        save_file({k: v.to(getattr(torch, name)) for k, v in t.items()}, str(d / WEIGHTS))
    elif name == "rank-pattern":       # r says 8, each module's own rank is in rank_pattern
        set_config(d, r=8, rank_pattern={"q_proj": 4, "model.layers.0.self_attn.v_proj": 4, "v_proj": 4})
    elif name == "alpha-pattern":
        set_config(d, alpha_pattern={"model.layers.0.self_attn.q_proj": 32, "layers.1.self_attn.(q|v)_proj": 2})
    elif name == "target-modules-regex":
        set_config(d, target_modules=r".*\.(q|v)_proj")
    elif name == "symlink-inside":
        (d / "weights-v2.safetensors").write_bytes((d / WEIGHTS).read_bytes())
        (d / WEIGHTS).unlink()
        (d / WEIGHTS).symlink_to("weights-v2.safetensors")
    elif name == "training-leftovers":    # nothing below the top level is read or copied
        (d / "checkpoint-100").mkdir()
        (d / "checkpoint-100" / "optimizer.pt").write_bytes(b"\x80\x04.")
        (d / "README.md").write_text("# my adapter\n")
    elif name == "metadata":
        save_file(t, str(d / WEIGHTS), metadata={"format": "pt", "note": json.dumps({"x": 1})})
    assert Q_A in t


VARIANTS = ["float64", "bfloat16", "float16", "rank-pattern", "alpha-pattern", "target-modules-regex",
            "symlink-inside", "training-leftovers", "metadata"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_legitimate_variants_are_accepted(variant, tiny, tmp_path):
    """The stricter rules refuse nothing a PEFT user would call a valid adapter."""
    from db.adapter_check import BaseModelShape, inspect_adapter
    model_dir, _ = tiny
    d = Path(shutil.copytree(_good(tiny), tmp_path / "ok"))
    _variant(variant, d)
    m = inspect_adapter(d, BaseModelShape.from_dir(model_dir), 64)
    a = load_peft_adapter(variant, d, ModelConfig.from_dir(model_dir), max_rank=64)
    assert m.rank == a.rank == 4 and len(a.modules) == 4
    if variant == "alpha-pattern":
        assert {k: m.scaling for k, m in a.modules.items()} == {(0, "q_proj"): 8.0, (0, "v_proj"): 2.0,
                                                                (1, "q_proj"): 0.5, (1, "v_proj"): 0.5}


def test_a_config_without_lora_alpha_scales_as_peft_does(tiny, tmp_path):
    """The worker took a missing lora_alpha as r (scaling 1); PEFT and the registry take 8."""
    import json

    from peft import LoraConfig

    from db.adapter_check import BaseModelShape, inspect_adapter
    model_dir, _ = tiny
    d = Path(shutil.copytree(_good(tiny), tmp_path / "no-alpha"))
    conf = json.loads((d / "adapter_config.json").read_text())
    del conf["lora_alpha"]
    (d / "adapter_config.json").write_text(json.dumps(conf))
    peft_alpha = LoraConfig.from_pretrained(str(d)).lora_alpha
    a = load_peft_adapter("no-alpha", d, ModelConfig.from_dir(model_dir), max_rank=64)
    assert {m.scaling for m in a.modules.values()} == {peft_alpha / 4}
    assert inspect_adapter(d, BaseModelShape.from_dir(model_dir), 64).alpha == peft_alpha
