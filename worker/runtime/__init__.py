"""The queue worker: an asyncio runtime around one engine thread, fed from Redis streams.

    python -m worker.runtime --model-dir DIR --redis-url redis://localhost:6379/0
"""
from __future__ import annotations

import asyncio
import logging

from worker.runtime.config import RuntimeConfig
from worker.runtime.runtime import WorkerRuntime


def run_worker(config: RuntimeConfig, engine=None) -> int:
    """Run one worker until SIGTERM (or an engine crash); returns the process exit code."""
    return asyncio.run(WorkerRuntime(config, engine=engine).run())


__all__ = ["RuntimeConfig", "WorkerRuntime", "run_worker"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_worker(RuntimeConfig.from_args(argv))
