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


class LlamaModel:
    """The forward pass; LoRA goes through ``lora.apply(x, y, layer, family, meta)``, or, for steps of
    at most ``fused_lora_tokens`` tokens with one adapter, rides in the norm, rotary and SiLU-mul
    kernels (``kernels/fused_lora.py``: 3 LoRA launches a layer instead of 8). With several
    adapters the separate segment-major SGMV kernels are faster (bench/NOTES-kernels.md)."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, ops, lora, fused_lora_tokens: int = 0):
        self.cfg = cfg
        self.w = weights
        self.ops = ops            # attention, norms, rotary, SiLU-mul (torch references or Triton)
        self.lora = lora          # AdapterSlots: the LoRA weights resident for this step
        self.fused_lora_tokens = 0
        if fused_lora_tokens:
            from kernels import fused_lora          # Triton: imported only where it runs
            self.fused = fused_lora
            self.fused_lora_tokens = min(fused_lora_tokens, fused_lora.MAX_TOKENS)
        device = weights.embed.device
        pos = torch.arange(cfg.max_context, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, cfg.inv_freq().to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(weights.embed.dtype).contiguous()   # [max_context, D]
        self.sin = emb.sin().to(weights.embed.dtype).contiguous()
        self.scale = cfg.head_dim ** -0.5

    def forward(self, s: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for every token of the step."""
        cfg, ops, t = self.cfg, self.ops, s.input_ids.shape[0]
        lora = None if s.lora.no_lora else self.lora
        if lora and t <= self.fused_lora_tokens and s.lora.num_segments == 1:
            return self._forward_fused_lora(s, kv_caches)
        layers, eps = self.w.layers, cfg.rms_norm_eps
        h, residual = ops.add_rms_norm(F.embedding(s.input_ids, self.w.embed), None, layers[0].input_norm, eps)
        for i, layer in enumerate(layers):
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            if lora:
                lora.apply(h, qkv, i, "qkv", s.lora)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q, k = ops.rotary(q.view(t, cfg.num_heads, cfg.head_dim), k.view(t, cfg.num_kv_heads, cfg.head_dim),
                              self.cos, self.sin, s.positions)
            attn = self._attend(q, k, v, kv_caches[i], s)
            o = F.linear(attn, layer.o)
            if lora:
                lora.apply(attn, o, i, "o", s.lora)
            h, residual = ops.add_rms_norm(o, residual, layer.post_norm, eps)
            gu = F.linear(h, layer.gate_up)
            if lora:
                lora.apply(h, gu, i, "gate_up", s.lora)
            act = ops.silu_mul(gu)
            d = F.linear(act, layer.down)
            if lora:
                lora.apply(act, d, i, "down", s.lora)
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else self.w.norm
            h, residual = ops.add_rms_norm(d, residual, next_norm, eps)
        return h

    def _forward_fused_lora(self, s: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``forward`` with each LoRA shrink and expand inside the kernel next to its projection.

        The shrinks accumulate into one zeroed buffer for the whole step (one memset, not one
        per layer): per layer 3 slices of qkv, then o, gate and up, down.
        """
        cfg, fl, t = self.cfg, self.fused, s.input_ids.shape[0]
        layers, fams, eps, meta = self.w.layers, self.lora.layers, cfg.rms_norm_eps, s.lora
        hbuf = torch.zeros((len(layers), 7, t, self.lora.max_rank), dtype=torch.float32, device=s.input_ids.device)
        h_qkv, h_o, h_gu, h_down = (hbuf[:, 0:3], hbuf[:, 3:4], hbuf[:, 4:6], hbuf[:, 6:7])
        h, residual = fl.norm_lora(F.embedding(s.input_ids, self.w.embed), None, layers[0].input_norm, eps, meta,
                                   shrink=(h_qkv[0], fams[0]["qkv"]))
        for i, layer in enumerate(layers):
            fam = fams[i]
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            fl.rotary_lora_(qkv, h_qkv[i], fam["qkv"], self.cos, self.sin, s.positions, meta, cfg.num_heads,
                            cfg.num_kv_heads)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            attn = self._attend(q, k, v, kv_caches[i], s)
            o = F.linear(attn, layer.o)
            fl.shrink_cols(attn, h_o[i], fam["o"], meta)
            h, residual = fl.norm_lora(o, residual, layer.post_norm, eps, meta, expand=(h_o[i], fam["o"]),
                                       shrink=(h_gu[i], fam["gate_up"]))
            act = fl.silu_mul_lora(F.linear(h, layer.gate_up), meta, expand=(h_gu[i], fam["gate_up"]),
                                   shrink=(h_down[i], fam["down"]))
            last = i + 1 == len(layers)
            h, residual = fl.norm_lora(F.linear(act, layer.down), residual,
                                       self.w.norm if last else layers[i + 1].input_norm, eps, meta,
                                       expand=(h_down[i], fam["down"]),
                                       shrink=None if last else (h_qkv[i + 1], fams[i + 1]["qkv"]))
        return h

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], s: StepInputs) -> torch.Tensor:
        """Write the step's K/V rows into the layer's paged cache, then attention: [T, q_size]."""
        cfg, t = self.cfg, q.shape[0]
        k_cache, v_cache = kv_cache
        self.ops.write_kv(k.view(t, cfg.num_kv_heads, cfg.head_dim), v.view(t, cfg.num_kv_heads, cfg.head_dim),
                          k_cache, v_cache, s.slot_mapping)
        return self.ops.attention(q.view(t, cfg.num_heads, cfg.head_dim), k_cache, v_cache, s.block_tables,
                                  s.context_lens, s.cu_seqlens_q, self.scale, s.max_q_len).reshape(t, cfg.q_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 logits."""
        return F.linear(hidden, self.w.lm_head).float()
