"""Make the engine a worker runs, from its config, with the preloaded adapters."""
from __future__ import annotations

import torch

from worker.errors import OpenLoRAError
from worker.runtime.config import RuntimeConfig


def build_engine(cfg: RuntimeConfig):
    from worker.engine import Engine
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    dtype = cfg.dtype or ("float32" if cfg.device == "cpu" else "bfloat16")
    engine = Engine(cfg.model_dir, device=cfg.device, dtype=dtype, max_loras=cfg.max_loras,
                    max_num_seqs=cfg.max_num_seqs, **cfg.engine_options)
    for name in cfg.preload:
        path = cfg.adapters.resolve(name)
        if path is None:
            raise OpenLoRAError(f"cannot preload adapter {name!r}: not in the adapter directory")
        engine.add_adapter(name, path)
    return engine
