"""The ``openlora`` command line."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from db.session import openlora_home
from worker.cli_adapters import add_subcommands as add_adapter_commands
from worker.cli_score import add_subcommands as add_score_commands

DEFAULT_HOME = openlora_home()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openlora", description="Serve many LoRA adapters of one base model.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="tiny model + several adapters decoded in one batch, streamed side by side")
    demo.add_argument("--dir", type=Path, default=DEFAULT_HOME / "tiny", help="where the tiny model is made")
    demo.add_argument("--adapters", type=int, default=4)
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--offline", action="store_true",
                      help="the engine in this process, no Redis/worker/API (the original demo)")

    worker = sub.add_parser("worker", help="run one queue worker (the runtime without Celery)", add_help=False)
    worker.add_argument("runtime_args", nargs=argparse.REMAINDER,
                        help="the flags of `python -m worker.runtime` (see `openlora worker --help`)")

    for name, what, port in (("api", "the HTTP API (OpenAI-compatible + native jobs)", 8000),
                             ("relay", "the websocket relay (/v1/jobs/{id}/stream)", 8001)):
        p = sub.add_parser(name, help=f"serve {what}; settings from REDIS_URL, OPENLORA_* env vars")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=port)
        p.add_argument("--redis-url", default=None, help="default: $REDIS_URL or redis://localhost:6379/0")
        p.add_argument("--model-dir", default=None, help="base model dir (tokenizer, chat template, lengths)")
        p.add_argument("--log-level", default="info")

    submit = sub.add_parser("submit", help="submit one job and print its output (tokens as they come with --stream)")
    submit.add_argument("prompt")
    submit.add_argument("--adapter", default=None, help="adapter id (default: the base model)")
    submit.add_argument("--stream", action="store_true")
    submit.add_argument("--max-tokens", type=int, default=64)
    submit.add_argument("--temperature", type=float, default=0.0)
    submit.add_argument("--seed", type=int, default=None)
    submit.add_argument("--id", default=None, help="job id (resubmitting an id returns the existing job)")
    submit.add_argument("--redis-url", default=None)
    submit.add_argument("--timeout", type=float, default=300)

    tiny = sub.add_parser("make-tiny", help="write a random tiny Llama, a tokenizer and random PEFT adapters")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--adapters", type=int, default=4)
    tiny.add_argument("--model-type", choices=["llama", "qwen2"], default="llama")

    gen = sub.add_parser("generate", help="offline generation with the engine in this process")
    gen.add_argument("model_dir", type=Path)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="load a PEFT adapter")
    gen.add_argument("--use", action="append", default=None, metavar="NAME",
                     help="adapter per prompt, in order ('-' = base model)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    gen.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")

    add_adapter_commands(sub)
    add_score_commands(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:        # its flags are the runtime's own: hand them over unparsed
        argv = ["worker", "--", *argv[1:]] if len(argv) > 1 and argv[1] != "--" else argv
    args = parser.parse_args(argv)
    if args.command == "worker" and args.runtime_args[:1] == ["--"]:
        args.runtime_args = args.runtime_args[1:]
    if args.command in ("adapters", "score"):
        return args.run(args)
    from worker.errors import OpenLoRAError
    try:
        return {"demo": cmd_demo, "make-tiny": cmd_make_tiny, "generate": cmd_generate, "worker": cmd_worker,
                "api": cmd_serve, "relay": cmd_serve, "submit": cmd_submit}[args.command](args)
    except OpenLoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_make_tiny(args) -> int:
    from worker.tiny import TinySpec, make_tiny_setup
    model, adapters = make_tiny_setup(args.dir, args.adapters, TinySpec(model_type=args.model_type))
    print(f"model:    {model}")
    for name, path in adapters.items():
        print(f"adapter:  {name:6s} {path}")
    return 0


def cmd_generate(args) -> int:
    import torch
    from worker.engine import Engine, SamplingParams
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    engine = Engine(args.model_dir, device=args.device, dtype=dtype, progress=_progress("weights"))
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        engine.add_adapter(name, path)
    uses = args.use or [None] * len(args.prompt)
    uses = [None if u in (None, "-") else u for u in uses]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    for prompt, adapter, out in zip(args.prompt, uses, engine.generate(args.prompt, uses, params)):
        print(f"[{adapter or 'base'}] {prompt!r} -> {out.text!r} ({len(out.token_ids)} tokens, {out.finish_reason})")
    del torch
    return 0


def cmd_worker(args) -> int:
    from worker.runtime import main as runtime_main
    return runtime_main(args.runtime_args)


def cmd_serve(args) -> int:
    import uvicorn
    from producer.api import ApiSettings, SettingsError, create_app
    from producer.relay import create_relay_app
    from worker.errors import OpenLoRAError
    try:
        settings = ApiSettings.from_env(redis_url=args.redis_url, model_dir=args.model_dir)
    except (SettingsError, ValueError) as e:
        raise OpenLoRAError(f"bad {args.command} configuration: {e}") from e
    app = (create_app if args.command == "api" else create_relay_app)(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_submit(args) -> int:
    from producer import Client, ProducerError
    client = Client(args.redis_url)
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        params["seed"] = args.seed
    try:
        h = client.submit(**({"id": args.id} if args.id else {}), prompt=args.prompt, adapter=args.adapter,
                          params=params)
        print(f"job {h.id} on shard {h.shard}{'' if h.created else ' (already submitted)'}", file=sys.stderr)
        if args.stream:
            for chunk in h.stream(timeout=args.timeout):
                print(chunk.text, end="", flush=True)
            print()
        res = h.wait(args.timeout)
    except ProducerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        client.close()
    if not args.stream:
        print(res.text)
    print(f"[{res.status}: {res.finish_reason}, {res.completion_tokens} tokens, worker {res.worker}]"
          + (f" {res.error}" if res.error else ""), file=sys.stderr)
    return 0 if res.ok else 1


def cmd_demo(args) -> int:
    if not args.offline:
        from worker.demo_fleet import run_demo
        from worker.tiny import make_tiny_setup
        model_dir, adapters = _tiny_setup(args.dir, args.adapters, make_tiny_setup)
        return run_demo(Path(model_dir), adapters, args.max_tokens, args.seed)
    from worker.engine import Engine, SamplingParams
    from worker.tiny import make_tiny_setup
    model_dir, adapters = _tiny_setup(args.dir, args.adapters, make_tiny_setup)
    print(f"loading the engine (tiny random Llama, CPU, float32) from {model_dir}")
    engine = Engine(model_dir, max_loras=max(1, len(adapters)))
    for name, path in adapters.items():
        a = engine.add_adapter(name, path)
        print(f"  adapter {name}: rank {a.rank}, targets {','.join(a.target_modules)}")
    names = [None, *adapters]
    prompts = ["the quick brown fox", "SELECT name FROM", "def main():", "Bonjour, ça va?", "every token streams"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=args.seed, ignore_eos=True)
    ids = {}
    for k, name in enumerate(names):
        ids[engine.add_request(None, prompts[k % len(prompts)], name, params)] = k
    width = 18
    print("\nstreaming, one row per engine step (one batch holds every adapter):")
    print(" step | " + " | ".join(f"{(n or 'base'):<{width}}" for n in names))
    texts = [""] * len(names)
    step, start, tokens = 0, time.perf_counter(), 0
    while engine.has_unfinished():
        cells = [""] * len(names)
        for out in engine.step():
            k = ids[out.request_id]
            cells[k] = out.text_delta
            texts[k] += out.text_delta
            tokens += len(out.new_token_ids)
        step += 1
        print(f" {step:4d} | " + " | ".join(f"{_printable(c)[:width]:<{width}}" for c in cells), flush=True)
    elapsed = time.perf_counter() - start
    print(f"\n{tokens} tokens for {len(names)} requests in {step} steps, {elapsed:.2f} s ({tokens / elapsed:.0f} tok/s)")
    print("\nfinal texts:")
    for k, name in enumerate(names):
        print(f"  {(name or 'base'):<6} {prompts[k % len(prompts)]!r} -> {_printable(texts[k])!r}")
    return 0


def _tiny_setup(directory: Path, n: int, make):
    model_dir, adapters_dir = directory / "model", directory / "adapters"
    if (model_dir / "config.json").exists() and all((adapters_dir / f"ad{k}").exists() for k in range(n)):
        return model_dir, {f"ad{k}": adapters_dir / f"ad{k}" for k in range(n)}
    print(f"making a tiny random Llama, a tokenizer and {n} PEFT adapters in {directory} ...", flush=True)
    return make(directory, n)


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else "·" for c in s)


def _progress(what: str):
    def report(done: int, total: int, name: str) -> None:
        print(f"  {what}: {done}/{total} {name}", file=sys.stderr, flush=True)
    return report


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
