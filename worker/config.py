"""Engine configuration: one validated object, defaults that run on one machine."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.errors import OpenLoRAError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EngineConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_loras: int = 4                  # GPU slots: distinct adapters in one step
    max_lora_rank: int = 64
    block_size: int = 16
    num_blocks: int | None = None       # None: from memory (GPU) or 512 (CPU)
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None    # None: the model's context
    lora_backend: str = "auto"          # torch | triton | auto (triton on CUDA)
    attention_backend: str = "auto"     # torch | triton | auto
    starvation_steps: int = 8
    low_priority_tokens: int = 2048     # prefill tokens a step for requests below priority 0 (batch scoring):
                                        # on the H100 online TTFT stays ~1.2x idle at 2048, 2.4x at 8192
    host_cache_bytes: int = 8 << 30     # adapters kept in host memory (LRU); the rest reload from disk
    pinned_host_bytes: int = 1 << 30    # of which page-locked once at start-up (CUDA), for stall-free loads
    cuda_graphs: bool = True            # replay decode steps from captured graphs (CUDA only)
    async_scheduling: bool = True       # launch the next decode step before the host has read this one's
                                        # tokens (they feed it on the device), so the host's per-step work
                                        # overlaps the GPU's; a sequence that stops early costs one wasted row
    fused_lora_tokens: int = 256        # steps of at most this many tokens fold LoRA into the base GEMMs and
                                        # the norm, rotary and SiLU-mul kernels (Triton backends only) when
                                        # they have at most 64 adapters; costs min(max_loras, this, 64)
                                        # adapters' A rows of extra weight memory (q/k/v, o, gate/up, and
                                        # down where this exceeds 64: ~2.5 GB at Llama-3-8B, rank 16);
                                        # 0 = always separate SGMV
    tuned_gemms: bool = True            # CUDA, fp16/bf16: the projections' GEMMs in each decode graph run the
                                        # fastest of cuBLASLt's ranked algorithms for their shape, timed while
                                        # the graphs are captured (kernels/cublaslt.py; its heuristic's first
                                        # pick costs gate/up 5% with LoRA's rows under it at batch 32)
    gemm_tuning_cache: str = "~/.cache/openlora/cublaslt.json"  # where tuned_gemms keeps its choices per GPU
                                        # and cuBLASLt version, so a restart checks them instead of timing
                                        # again; "" = tune at every start

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise OpenLoRAError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
            self.dtype = DTYPES[self.dtype]
        for name in ("max_loras", "max_lora_rank", "block_size", "max_num_seqs", "max_num_batched_tokens",
                     "starvation_steps", "low_priority_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise OpenLoRAError(f"{name} must be a positive integer, got {value!r}")
        for name in ("cuda_graphs", "tuned_gemms", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise OpenLoRAError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.gemm_tuning_cache, str):
            raise OpenLoRAError(f"gemm_tuning_cache must be a file path or \"\", got {self.gemm_tuning_cache!r}")
        if not isinstance(self.fused_lora_tokens, int) or self.fused_lora_tokens < 0:
            raise OpenLoRAError(f"fused_lora_tokens must be an integer >= 0, got {self.fused_lora_tokens!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise OpenLoRAError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise OpenLoRAError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("lora_backend", "attention_backend"):
            if getattr(self, name) not in ("auto", "torch", "triton"):
                raise OpenLoRAError(f"{name} must be auto, torch or triton, got {getattr(self, name)!r}")

    def backend(self, name: str) -> str:
        choice = getattr(self, name)
        if choice == "auto":
            return "triton" if torch.device(self.device).type == "cuda" else "torch"
        return choice
