"""Base-model weights: read from ``*.safetensors`` and fused for the forward pass.

q/k/v become one [q+2kv, hidden] matrix and gate/up one [2*inter, hidden]
matrix, so a layer runs two large GEMMs where the checkpoint has five.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from worker.errors import OpenLoRAError
from worker.model.config import ModelConfig


@dataclass
class LayerWeights:
    input_norm: torch.Tensor      # [hidden]
    qkv: torch.Tensor             # [q + 2 kv, hidden]
    qkv_bias: torch.Tensor | None  # [q + 2 kv]
    o: torch.Tensor               # [hidden, q]
    post_norm: torch.Tensor       # [hidden]
    gate_up: torch.Tensor         # [2 inter, hidden]
    down: torch.Tensor            # [hidden, inter]


@dataclass
class ModelWeights:
    embed: torch.Tensor           # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor            # [hidden]
    lm_head: torch.Tensor         # [vocab, hidden] (the embedding itself when tied)

    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in _all_tensors(self):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def _all_tensors(w: ModelWeights):
    yield from (w.embed, w.norm, w.lm_head)
    for layer in w.layers:
        yield from (t for t in vars(layer).values() if t is not None)


def load_weights(model_dir: str | Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                 progress=None) -> ModelWeights:
    """Read every tensor the model needs from the safetensors files of ``model_dir``."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise OpenLoRAError(f"no *.safetensors weights in {model_dir} (pickled .bin checkpoints are not loaded)")
    raw: dict[str, torch.Tensor] = {}
    for i, f in enumerate(files):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                raw[name.removeprefix("model.")] = st.get_tensor(name)
        if progress:
            progress(i + 1, len(files), f.name)

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            t = raw.pop(name)
        except KeyError as e:
            raise OpenLoRAError(f"weight {name!r} is missing from {model_dir}") from e
        if tuple(t.shape) != shape:
            raise OpenLoRAError(f"weight {name!r} has shape {tuple(t.shape)}, config says {shape}")
        return t.to(device=device, dtype=dtype)

    h, inter, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        qkv = torch.cat([take(p + "self_attn.q_proj.weight", (q, h)), take(p + "self_attn.k_proj.weight", (kv, h)),
                         take(p + "self_attn.v_proj.weight", (kv, h))])
        bias = None
        if cfg.qkv_bias:
            bias = torch.cat([take(p + "self_attn.q_proj.bias", (q,)), take(p + "self_attn.k_proj.bias", (kv,)),
                              take(p + "self_attn.v_proj.bias", (kv,))])
        layers.append(LayerWeights(
            input_norm=take(p + "input_layernorm.weight", (h,)),
            qkv=qkv, qkv_bias=bias,
            o=take(p + "self_attn.o_proj.weight", (h, q)),
            post_norm=take(p + "post_attention_layernorm.weight", (h,)),
            gate_up=torch.cat([take(p + "mlp.gate_proj.weight", (inter, h)), take(p + "mlp.up_proj.weight", (inter, h))]),
            down=take(p + "mlp.down_proj.weight", (h, inter)),
        ))
    embed = take("embed_tokens.weight", (cfg.vocab_size, h))
    lm_head = embed if cfg.tie_word_embeddings or "lm_head.weight" not in raw else take("lm_head.weight", (cfg.vocab_size, h))
    return ModelWeights(embed=embed, layers=layers, norm=take("norm.weight", (h,)), lm_head=lm_head)


def random_weights(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> ModelWeights:
    """Random weights of the configured shape, made on the device (benchmarks; nothing is downloaded)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, inter, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    layers = [LayerWeights(input_norm=torch.ones(h, device=device, dtype=dtype), qkv=rnd(q + 2 * kv, h),
                           qkv_bias=rnd(q + 2 * kv) if cfg.qkv_bias else None, o=rnd(h, q),
                           post_norm=torch.ones(h, device=device, dtype=dtype), gate_up=rnd(2 * inter, h),
                           down=rnd(h, inter)) for _ in range(cfg.num_layers)]
    embed = rnd(cfg.vocab_size, h, std=1.0)
    lm_head = embed if cfg.tie_word_embeddings else rnd(cfg.vocab_size, h)
    return ModelWeights(embed=embed, layers=layers, norm=torch.ones(h, device=device, dtype=dtype), lm_head=lm_head)
