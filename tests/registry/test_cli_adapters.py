"""``openlora adapters add|ls|show|rm`` against a real database (SQLite and PostgreSQL) and a store in tmp."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli_adapters import format_table, human_bytes, main

REPO = Path(__file__).parents[2]


@pytest.fixture
def cli_env(db_engine, tmp_path, monkeypatch):
    env = {"DATABASE_URL": db_engine.url.render_as_string(hide_password=False),
           "OPENLORA_STORE": str(tmp_path / "store"), "OPENLORA_HOME": str(tmp_path / "home")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPENLORA_BASE_MODEL", raising=False)
    return env


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["adapters", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_ls_show_rm(cli_env, tiny, capsys):
    model_dir, adapters = tiny
    code, out, err = cli(capsys, "add", "acme/sql", str(adapters["ad0"]), "--tenant", "acme",
                         "--base-model", str(model_dir))
    assert code == 0, err
    assert out.startswith("registered acme/sql v1: rank 8")
    # no --base-model: the adapter's base_model_name_or_path is a local directory, so it is used
    assert cli(capsys, "add", "chat", str(adapters["ad3"]), "--public")[0] == 0
    assert cli(capsys, "add", "chat", str(adapters["ad3"]))[0] == 0          # version 2

    code, out, _ = cli(capsys, "ls")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "VERSION", "RANK", "ALPHA", "TARGETS", "SIZE", "TENANT",
                                              "CREATED"]
    assert lines[1].split()[:5] == ["acme/sql", "1", "8", "16",
                                    "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]
    assert lines[1].split()[7] == "acme"
    assert lines[2].split()[:5] == ["chat", "2", "32", "32", "k_proj,up_proj"] and lines[2].split()[7] == "-"
    assert len({line.index("VERSION") if i == 0 else None for i, line in enumerate(lines)} - {None}) == 1
    assert cli(capsys, "ls", "--tenant", "acme")[1].count("\n") == 2           # header + one row

    code, out, _ = cli(capsys, "show", "acme/sql")
    assert code == 0 and "sha256:" in out and "storage:" in out and "acme~sql/v1" in out

    code, out, _ = cli(capsys, "rm", "acme/sql")
    assert code == 0 and "removed acme/sql" in out
    assert "acme/sql" not in cli(capsys, "ls")[1]
    assert not (Path(cli_env["OPENLORA_STORE"]) / "acme").exists()


def test_errors_go_to_stderr_with_exit_code_2(cli_env, tiny, tmp_path, capsys):
    model_dir, adapters = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapters["ad1"] / "adapter_config.json").read_text())
    (bad / "adapter_model.pt").write_bytes(b"pickle")
    code, out, err = cli(capsys, "add", "bad", str(bad), "--base-model", str(model_dir))
    assert code == 2 and out == "" and "pickle file(s) are refused" in err and err.startswith("error: ")
    code, _, err = cli(capsys, "show", "nope")
    assert code == 2 and "'nope' is not registered" in err
    code, _, err = cli(capsys, "rm", "nope")
    assert code == 2 and "not registered" in err
    code, _, err = cli(capsys, "add", "Bad Id", str(adapters["ad1"]), "--base-model", str(model_dir))
    assert code == 2 and "invalid adapter id" in err
    assert cli(capsys, "ls")[1].strip() == "no adapters registered"


def test_module_entry_point(cli_env, tiny):
    model_dir, adapters = tiny
    run = subprocess.run([sys.executable, "-m", "worker.cli_adapters", "adapters", "add", "m1",
                          adapters["ad1"].as_uri(), "--base-model", str(model_dir)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "worker.cli_adapters", "adapters", "ls"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0 and run.stdout.splitlines()[1].split()[:3] == ["m1", "1", "4"]


def test_table_formatting():
    table = format_table([("a", "1", "8", "16", "q_proj", "1.0 KiB", "-", "2026-01-01 00:00:00"),
                          ("long/name", "12", "64", "128", "q_proj,v_proj", "10.5 MiB", "acme", "2026-01-02 00:00:00")])
    assert table.splitlines() == [
        "ID         VERSION  RANK  ALPHA  TARGETS            SIZE  TENANT  CREATED",
        "a                1     8     16  q_proj          1.0 KiB  -       2026-01-01 00:00:00",
        "long/name       12    64    128  q_proj,v_proj  10.5 MiB  acme    2026-01-02 00:00:00",
    ]
    assert human_bytes(512) == "512 B" and human_bytes(3 * 1024 * 1024) == "3.0 MiB"
