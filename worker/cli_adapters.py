"""``openlora adapters add|ls|show|rm``: the adapter registry from the command line.

The database is ``DATABASE_URL`` (default: SQLite under ``$OPENLORA_HOME``),
the store ``OPENLORA_STORE`` (default ``$OPENLORA_HOME/store``, ``OPENLORA_HOME``
defaulting to ``~/.openlora``). Errors go to stderr with exit code 2.
Heavy imports (SQLAlchemy, the store) happen inside the handlers, so other
``openlora`` commands start as fast as before.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

TABLE_COLUMNS = ("ID", "VERSION", "RANK", "ALPHA", "TARGETS", "SIZE", "TENANT", "CREATED")


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add ``adapters`` and its sub-commands to an ``add_subparsers()`` object."""
    p = subparsers.add_parser("adapters", help="register, list, show and remove LoRA adapters")
    sub = p.add_subparsers(dest="adapters_command", required=True)
    add = sub.add_parser("add", help="validate a PEFT adapter directory, copy it into the store, register it")
    add.add_argument("id", help="adapter id: 'name' or 'namespace/name' ([a-z0-9._-])")
    add.add_argument("path", help="adapter directory (adapter_config.json + adapter_model.safetensors) or file:// URI")
    add.add_argument("--tenant", default=None, help="owning tenant (default: none, a system adapter)")
    add.add_argument("--base-model", default=os.environ.get("OPENLORA_BASE_MODEL"), metavar="DIR",
                     help="base model directory whose config.json the shapes must match "
                          "(default: $OPENLORA_BASE_MODEL, else the adapter's base_model_name_or_path if local)")
    add.add_argument("--public", action="store_true", help="visible to every tenant")
    add.add_argument("--name", default=None, help="display name (default: the id)")
    add.add_argument("--max-rank", type=int, default=int(os.environ.get("OPENLORA_MAX_LORA_RANK", 64)),
                     help="largest rank the servers accept (default: 64)")
    ls = sub.add_parser("ls", help="list registered adapters")
    ls.add_argument("--tenant", default=None, help="only this tenant's adapters")
    show = sub.add_parser("show", help="every field of one adapter")
    show.add_argument("id")
    rm = sub.add_parser("rm", help="unregister an adapter and delete its files (every version)")
    rm.add_argument("id")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``adapters`` command; 0 on success, 2 with a message on stderr on failure."""
    from sqlalchemy.exc import SQLAlchemyError

    from db.adapters import AdapterOwnershipError
    from db.store import AdapterValidationError

    handlers = {"add": cmd_add, "ls": cmd_ls, "show": cmd_show, "rm": cmd_rm}
    try:
        return handlers[args.adapters_command](args)
    except (AdapterValidationError, AdapterOwnershipError, LookupError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
    except SQLAlchemyError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        print(f"error: database: {first}", file=sys.stderr)
    return 2


def store_root(env=None) -> Path:
    from db.session import openlora_home
    env = os.environ if env is None else env
    return Path(env.get("OPENLORA_STORE") or openlora_home(env) / "store").expanduser()


def _open():
    from db.session import init_db
    from db.store import LocalStore
    return init_db(), LocalStore(store_root())


def cmd_add(args) -> int:
    from db.session import session_scope
    from db.store import AdapterValidationError, register, resolve_source

    base = args.base_model or _local_base_model(resolve_source(args.path))
    if base is None:
        raise AdapterValidationError("cannot check the adapter's shapes: pass --base-model DIR "
                                     "(or set OPENLORA_BASE_MODEL)")
    engine, store = _open()
    with session_scope(engine) as s:
        row = register(s, store, args.path, args.id, tenant=args.tenant, base_model=base,
                       max_rank=args.max_rank, public=args.public, name=args.name)
    print(f"registered {row.id} v{row.version}: rank {row.rank}, {', '.join(row.target_modules)}, "
          f"{human_bytes(row.bytes)}, sha256 {row.sha256[:12]} -> {row.storage_uri}")
    return 0


def _local_base_model(src: Path) -> str | None:
    from db.adapter_check import CONFIG_FILE, check_source_dir, read_config
    check_source_dir(src)        # a broken adapter is reported as what it is, as register() would
    name = read_config(src / CONFIG_FILE).get("base_model_name_or_path")
    return name if name and (Path(name) / "config.json").is_file() else None


def cmd_ls(args) -> int:
    from sqlmodel import select

    from db.adapters import Adapter
    from db.session import session_scope
    engine, _ = _open()
    with session_scope(engine) as s:
        q = select(Adapter).order_by(Adapter.id)
        if args.tenant is not None:
            q = q.where(Adapter.tenant == args.tenant)
        rows = s.exec(q).all()
    print(format_table([_table_row(r) for r in rows]))
    return 0


def cmd_show(args) -> int:
    from db.adapters import Adapter
    from db.session import session_scope
    engine, _ = _open()
    with session_scope(engine) as s:
        row = s.get(Adapter, args.id)
    if row is None:
        raise LookupError(f"adapter {args.id!r} is not registered")
    fields = [("id", row.id), ("name", row.name), ("version", row.version), ("tenant", row.tenant or "-"),
              ("visibility", row.visibility), ("base model", row.base_model), ("rank", row.rank),
              ("alpha", f"{row.alpha:g}"), ("targets", ", ".join(row.target_modules)),
              ("size", f"{human_bytes(row.bytes)} ({row.bytes} bytes)"), ("sha256", row.sha256),
              ("group", row.group), ("storage", row.storage_uri), ("created", _time(row.created_at)),
              ("updated", _time(row.updated_at))]
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k + ':':<{width + 1}} {v}")
    return 0


def cmd_rm(args) -> int:
    from db.session import session_scope
    from db.store import unregister
    engine, store = _open()
    with session_scope(engine) as s:
        row = unregister(s, store, args.id, any_tenant=True)
    print(f"removed {row.id} (every version, files included)")
    return 0


def _table_row(r) -> tuple[str, ...]:
    return (r.id, str(r.version), str(r.rank), f"{r.alpha:g}", ",".join(r.target_modules) or "-",
            human_bytes(r.bytes), r.tenant or "-", _time(r.created_at))


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """Left-aligned columns, numbers right-aligned, two spaces apart; a note when there are no rows."""
    if not rows:
        return "no adapters registered"
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    right = {1, 2, 3, 5}                       # version, rank, alpha, size

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), *(line(r) for r in rows)])


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _time(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openlora")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
