"""Llama forward over a paged KV cache, with per-token multi-LoRA.

Tokens of all sequences in a step are flattened into one [T, hidden] batch
(prefill chunks and decodes together); attention finds each sequence's context
through its block table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.model.config import ModelConfig
from worker.model.weights import ModelWeights
from worker.step_inputs import StepInputs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, 1, D] (halves repeated, as in HF's rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaModel:
    """The forward pass; LoRA goes through ``lora.apply(x, y, layer, family, meta)``."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, ops, lora):
        self.cfg = cfg
        self.w = weights
        self.ops = ops            # write_kv / attention backend (torch reference or Triton)
        self.lora = lora          # AdapterSlots: the LoRA weights resident for this step
        device = weights.embed.device
        pos = torch.arange(cfg.max_context, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, cfg.inv_freq().to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(weights.embed.dtype)   # [max_context, D]
        self.sin = emb.sin().to(weights.embed.dtype)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, s: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for every token of the step."""
        cfg, t = self.cfg, s.input_ids.shape[0]
        lora = None if s.lora.no_lora else self.lora
        x = F.embedding(s.input_ids, self.w.embed)
        cos, sin = self.cos[s.positions].unsqueeze(1), self.sin[s.positions].unsqueeze(1)
        for i, layer in enumerate(self.w.layers):
            h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            if lora:
                lora.apply(h, qkv, i, "qkv", s.lora)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = apply_rotary(q.view(t, cfg.num_heads, cfg.head_dim), cos, sin)
            k = apply_rotary(k.view(t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
            k_cache, v_cache = kv_caches[i]
            self.ops.write_kv(k, v, k_cache, v_cache, s.slot_mapping)
            attn = self.ops.attention(q, k_cache, v_cache, s.block_tables, s.context_lens, s.cu_seqlens_q,
                                      self.scale, s.max_q_len).reshape(t, cfg.q_size)
            o = F.linear(attn, layer.o)
            if lora:
                lora.apply(attn, o, i, "o", s.lora)
            x = x + o
            h = rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            gu = F.linear(h, layer.gate_up)
            if lora:
                lora.apply(h, gu, i, "gate_up", s.lora)
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate) * up
            d = F.linear(act, layer.down)
            if lora:
                lora.apply(act, d, i, "down", s.lora)
            x = x + d
        return rms_norm(x, self.w.norm, cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 logits."""
        return F.linear(hidden, self.w.lm_head).float()
