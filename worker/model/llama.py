"""Llama forward over a paged KV cache, with per-token multi-LoRA.

Tokens of all sequences in a step are flattened into one [T, hidden] batch
(prefill chunks and decodes together); attention finds each sequence's context
through its block table.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from kernels.lora_meta import StagedBuffer
from worker.model.config import ModelConfig
from worker.model.weights import ModelWeights
from worker.step_inputs import StepInputs


# rows under each base weight come in multiples of these (where cuBLAS keeps its fast kernel for the
# shape; bench/NOTES-kernels.md; down's at 256 tokens through F.linear: 57.4 us bare, 67.6 with 64 extra rows,
# 55.4 with 256; a step may read fewer rows in multiples of a divisor, DOWN_PAD_*)
TAIL_PAD = {"qkv": 64, "o": 64, "gate_up": 128, "down": 256}
# tail positions a fused step's GEMMs read, its adapters rounded up to one of these: powers of two and the
# steps between them (a step's GEMMs read every position of its bucket; with powers of two alone, batch 256's
# 47 Skewed adapters read 64 adapters' A rows); each is one more captured graph a batch bucket
TAIL_BUCKETS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# down's shrink runs in SiLU-mul (float32 parts that the next norm sums) or in down's GEMM (its A rows under it,
# the norm expanding from its columns), whichever measured cheaper over a layer's gate_up GEMM .. norm on the H100
# (bench/tune_down_shrink.py, four runs; bench/NOTES-kernels.md v13): the GEMM past 32 tokens (at 64, 16-21 us a
# layer less with 8-64 adapters) and up to 8 tail positions (1-2.7 us less at 8-16 tokens, Uniform's 6 at 32 tokens
# 2.4-2.7 less, one adapter at 32 from +0.9 to -3.8); SiLU-mul for more positions up to 32 tokens (16 at 32 tokens:
# the GEMM's 256 extra rows cost 0.5-4.7 us more, 32: 0.4 more; 12, the engine bench's Skewed: a tie)
DOWN_SHRINK_IN_SILU_TOKENS = 32
DOWN_GEMM_MAX_POSITIONS = 8
DOWN_PAD_FEW_TOKENS = 128   # down's extra rows in steps of at most MANY_TOKENS tokens (256 cost 3-10 us a layer more)
# past MANY_TOKENS on the tuned GEMMs (``LtGemm``): at 256 tokens the bare shape 53.3 us, +64 rows 53.8, +128 54.5,
# +256 55.0 (bench/results/2026-11-25-h100-lt-gemm-one-256.txt); F.linear alone keeps TAIL_PAD's 256 (+64: 67.5)
DOWN_PAD_MANY_TOKENS = 64
# gate/up's extra rows in steps of at most MANY_TOKENS tokens: more than 128 and up to this many read this many (the
# rows past the step's positions give h columns no one reads). At 32 tokens cuBLAS ran +256 rows at 85.6-87.6 us at
# best, and on the heuristic's first pick 87.6-89.9, but +384 at 85.1-85.3 on all three machines probed (bare
# 84.3). The engine bench, batch 32, one machine: Uniform (6 adapters, 192 rows) 9.1 -> 7.0%
# (bench/NOTES-kernels.md v22)
GATE_UP_SPAN_FEW_TOKENS = 384


class LlamaModel:
    """The forward pass; LoRA goes through ``lora.apply(x, y, layer, family, meta)`` (the SGMV kernels),
    or, for steps of at most ``fused_lora_tokens`` tokens and ``fused_lora.MAX_ADAPTERS`` adapters, rides in
    the qkv, o and gate_up GEMMs and the norm, rotary and SiLU-mul kernels (``kernels/fused_lora.py``: no LoRA
    launch at all; bench/NOTES-kernels.md)."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, ops, lora, fused_lora_tokens: int = 0,
                 tuned_gemms: bool = False, gemm_tuning_cache: str = ""):
        self.cfg = cfg
        self.w = weights
        self.ops = ops            # attention, norms, rotary, SiLU-mul (torch references or Triton)
        self.lora = lora          # AdapterSlots: the LoRA weights resident for this step
        # the projections' GEMMs on cuBLASLt algorithms timed per shape (``kernels/cublaslt.py``), tuned while
        # ``tuning()`` is on: the decode graphs' warm-up runs
        self.gemm = None
        if tuned_gemms and weights.embed.is_cuda and weights.embed.dtype in (torch.float16, torch.bfloat16):
            from kernels.cublaslt import LtGemm
            self.gemm = LtGemm(weights.embed.device, cache=gemm_tuning_cache or None)
        self.fused_lora_tokens = self.tail_positions = 0
        if fused_lora_tokens:
            from kernels import fused_lora, fused_lora_dense          # Triton: imported only where it runs
            self.fused, self.dense = fused_lora, fused_lora_dense
            self.fused_lora_tokens = min(fused_lora_tokens, fused_lora.MAX_TOKENS)
            # qkv, o and gate_up get room under them for the A rows of a step's adapters (one position each,
            # at most one adapter a token); the layers keep views of the base part, so the other paths read
            # exactly the weights they read before (one layer at a time: the copy being made is the only
            # extra memory); as many as a fused step may have adapters
            self.tail_positions = min(lora.num_slots, self.fused_lora_tokens, fused_lora.MAX_ADAPTERS)
            fams = (("qkv", 3), ("o", 1), ("gate_up", 2), ("down", 1))
            self.tails = {f: fused_lora.LoRATails(n, lora.max_rank, self.tail_positions, TAIL_PAD[f]) for f, n in fams}
            for w in weights.layers:
                w.qkv = self.tails["qkv"].add(w.qkv, w.qkv_bias)
                w.o = self.tails["o"].add(w.o)
                w.gate_up = self.tails["gate_up"].add(w.gate_up)
                w.down = self.tails["down"].add(w.down)
            # gate/up's B rows too, at the first positions, for steps that few adapters take the dense expand
            # (``fused_lora_dense``; 235 MB at Llama-3-8B, rank 16)
            self.b_tails = fused_lora_dense.ExpandTails(
                len(weights.layers), min(fused_lora_dense.DENSE_POSITIONS, self.tail_positions), lora.max_rank,
                weights.layers[0].gate_up.shape[0], weights.embed.dtype, weights.embed.device)
            self._staged: list[tuple[int, int] | None] = [None] * self.tail_positions   # (slot, generation)
            # slot -> position, then row -> position (-1: no LoRA) for the step's tokens: the norm's and rotary's h
            # loads wait on the row's own entry instead of its slot's (``fused_lora.norm_lora``); one copy moves both
            self._pos = StagedBuffer(lora.num_slots + self.fused_lora_tokens, torch.int32, weights.embed.device)
            self.tail_pos, self.row_pos = self._pos.device[:lora.num_slots], self._pos.device[lora.num_slots:]
            self._pos_of = [0] * lora.num_slots                                                 # its host copy
            self._rows_put: list[int] | None = None                      # the row positions of the last copy
            self._stage_key: tuple | None = None     # (bucket, slots, their generations) of the last staging
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
        if lora and self.fused_path(s):
            self.stage_lora(s)
            return self._forward_fused_lora(s, kv_caches)
        layers, eps = self.w.layers, cfg.rms_norm_eps
        h, residual = ops.add_rms_norm(F.embedding(s.input_ids, self.w.embed), None, layers[0].input_norm, eps)
        for i, layer in enumerate(layers):
            qkv = self._linear(h, layer.qkv, layer.qkv_bias, peers=lambda: [w.qkv for w in layers])
            if lora:
                lora.apply(h, qkv, i, "qkv", s.lora)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q, k = ops.rotary(q.view(t, cfg.num_heads, cfg.head_dim), k.view(t, cfg.num_kv_heads, cfg.head_dim),
                              self.cos, self.sin, s.positions)
            attn = self._attend(q, k, v, kv_caches[i], s)
            o = self._linear(attn, layer.o, peers=lambda: [w.o for w in layers])
            if lora:
                lora.apply(attn, o, i, "o", s.lora)
            h, residual = ops.add_rms_norm(o, residual, layer.post_norm, eps)
            gu = self._linear(h, layer.gate_up, peers=lambda: [w.gate_up for w in layers])
            if lora:
                lora.apply(h, gu, i, "gate_up", s.lora)
            act = ops.silu_mul(gu)
            d = self._linear(act, layer.down, peers=lambda: [w.down for w in layers])
            if lora:
                lora.apply(act, d, i, "down", s.lora)
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else self.w.norm
            h, residual = ops.add_rms_norm(d, residual, next_norm, eps)
        return h

    def fused_path(self, s: StepInputs) -> bool:
        """Whether this step's LoRA rides in the step's own kernels: at most ``fused_lora_tokens`` tokens,
        and at least one adapter but no more than the tails hold."""
        return self.fuses(s.input_ids.shape[0], s.lora.num_segments)

    def fuses(self, tokens: int, adapters: int) -> bool:
        """``fused_path`` for a step of ``tokens`` tokens over ``adapters`` adapters."""
        return tokens <= self.fused_lora_tokens and 1 <= adapters <= self.tail_positions

    def tail_bucket(self, adapters: int, tokens: int) -> int:
        """Positions the GEMMs of a fused step read: its adapters rounded up to the next of ``TAIL_BUCKETS``,
        but no more than the step's tokens or the tails hold (a captured graph fixes the GEMM shapes, so steps
        share these few sizes; ``tail_buckets`` lists them)."""
        up = next((b for b in TAIL_BUCKETS if b >= adapters), 1 << (adapters - 1).bit_length())
        return min(up, tokens, self.tail_positions)

    def tail_buckets(self, tokens: int) -> list[int]:
        """Every ``tail_bucket`` a step of ``tokens`` tokens can have."""
        most = min(tokens, self.tail_positions)
        return sorted({self.tail_bucket(k, tokens) for k in range(1, most + 1)})

    def down_in_gemm(self, tokens: int, positions: int) -> bool:
        """Whether a fused step of ``tokens`` tokens over ``positions`` tail positions shrinks down in its GEMM
        rather than in SiLU-mul (``DOWN_SHRINK_IN_SILU_TOKENS``)."""
        return tokens > DOWN_SHRINK_IN_SILU_TOKENS or positions <= DOWN_GEMM_MAX_POSITIONS

    def stage_lora(self, s: StepInputs) -> None:
        """Put the A rows (q/k/v, o, gate/up, down) of the step's adapters under the base weights, at positions
        below the step's ``tail_bucket``, unless they are there, and at the first ``b_tails.positions`` positions
        gate/up's B rows into ``b_tails`` too; ``tail_pos`` maps each slot to its position.

        Runs before a step (a captured graph replays without it). An adapter that is already staged below
        the bucket, with its slot's contents unchanged since, stays where it is; the others go to free
        positions there (a copy of about 1.25 MB a layer at rank 16, 2.2 MB with gate/up's B). So steady decoding
        copies nothing, and a step with the same adapters, bucket and slot contents as the last staging
        stages nothing; its rows' positions (``row_pos``) move only if the rows changed.
        """
        if not self.fused_path(s):
            return
        if s.input_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return                                  # capture: the replays stage their own adapters
        need = s.lora.slots
        bucket = self.tail_bucket(len(need), s.input_ids.shape[0])
        gen = self.lora.generation
        key = (bucket, tuple(need), tuple(gen[slot] for slot in need))
        if key != self._stage_key:                  # else the last staging left these adapters in place
            self._stage(need, bucket, gen)
            self._stage_key = key
        rows = [self._pos_of[slot] if slot >= 0 else -1 for slot in s.lora.token_slots]
        if rows != self._rows_put:
            self._pos.put(self._pos_of, tail={len(self._pos_of): rows})
            self._rows_put = rows

    def _stage(self, need: list[int], bucket: int, gen: list[int]) -> None:
        """``stage_lora``'s copies, and the new positions into ``_pos_of``."""
        where = {e[0]: p for p, e in enumerate(self._staged[:bucket]) if e is not None and e[1] == gen[e[0]]}
        pos = {slot: where[slot] for slot in need if slot in where}
        free = iter(sorted(set(range(bucket)) - set(pos.values())))
        dst, src = [], []
        for slot in need:
            if slot in pos:
                continue
            p = pos[slot] = next(free)
            self._staged[p] = (slot, gen[slot])
            for i, fams in enumerate(self.lora.layers):
                for f, tails in self.tails.items():
                    dst.append(tails.a_rows(i, p))
                    src.append(fams[f].lora_a[slot])
                if p < self.b_tails.positions:
                    dst.append(self.b_tails.rows(i, p))
                    src.append(fams["gate_up"].lora_b[slot])
        if dst:
            torch._foreach_copy_(dst, src)
        for slot, p in pos.items():
            self._pos_of[slot] = p

    def _forward_fused_lora(self, s: StepInputs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``forward`` with the step's adapters folded into its GEMMs and small kernels.

        q/k/v's, o's and gate/up's shrinks come out of the extra columns of their GEMMs
        (``stage_lora`` put the A rows of the step's adapters there), down's from SiLU-mul or its GEMM too
        (``down_in_gemm``), and every expand happens in the kernel that reads the projection's output next.
        """
        cfg, fl, pos, row_pos = self.cfg, self.fused, self.tail_pos, self.row_pos
        layers, fams, eps, meta = self.w.layers, self.lora.layers, cfg.rms_norm_eps, s.lora
        qkv_t, o_t, gu_t = self.tails["qkv"], self.tails["o"], self.tails["gate_up"]
        t = s.input_ids.shape[0]
        k = self.tail_bucket(meta.num_segments, t)
        down_t = self.tails["down"] if self.down_in_gemm(t, k) else None
        down_pad = DOWN_PAD_FEW_TOKENS if t <= fl.MANY_TOKENS else \
            DOWN_PAD_MANY_TOKENS if self.gemm is not None else None
        gu_rows = GATE_UP_SPAN_FEW_TOKENS if t <= fl.MANY_TOKENS and \
            TAIL_PAD["gate_up"] < gu_t.rows(k) <= GATE_UP_SPAN_FEW_TOKENS else 0
        dense = k <= self.b_tails.positions and self.dense.takes(k, self.lora.max_rank, t, self.w.embed.dtype)
        h, residual = self.ops.add_rms_norm(F.embedding(s.input_ids, self.w.embed), None, layers[0].input_norm, eps)
        for i, layer in enumerate(layers):
            fam = fams[i]
            qkv, h_qkv = qkv_t.split(self._linear(h, *qkv_t.weight(i, k), peers=self._peers(qkv_t, k)), k)
            fl.rotary_lora_(qkv, h_qkv, fam["qkv"], self.cos, self.sin, s.positions, meta, cfg.num_heads,
                            cfg.num_kv_heads, pos, row_pos)
            q, kk, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            attn = self._attend(q, kk, v, kv_caches[i], s)
            o, h_o = o_t.split(self._linear(attn, *o_t.weight(i, k), peers=self._peers(o_t, k)), k)
            h, residual = fl.norm_lora(o, residual, layer.post_norm, eps, meta, h_o, fam["o"], pos, row_pos)
            gu, h_gu = gu_t.split(self._linear(h, *gu_t.weight(i, k, min_rows=gu_rows),
                                               peers=self._peers(gu_t, k, min_rows=gu_rows)), k)
            down_fam = None if down_t else fam["down"]
            if dense:
                act, h_down = self.dense.silu_mul_lora_dense(gu, meta, h_gu, fam["gate_up"], down_fam, pos,
                                                             self.b_tails.b[i])
            else:
                act, h_down = fl.silu_mul_lora(gu, meta, h_gu, fam["gate_up"], down_fam, pos)
            if down_t:
                d, h_down = down_t.split(self._linear(act, *down_t.weight(i, k, down_pad),
                                                      peers=self._peers(down_t, k, down_pad)), k)
            else:
                d = self._linear(act, layer.down, peers=lambda: [w.down for w in layers])
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else self.w.norm
            h, residual = fl.norm_lora(d, residual, next_norm, eps, meta, h_down, fam["down"], pos, row_pos)
        return h

    def _linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, peers=None) -> torch.Tensor:
        """F.linear(x, w, bias), on the cuBLASLt algorithm tuned for its shape where there is one (``gemm``);
        ``peers()``: the same projection's weight in every layer, to time a new shape on while tuning."""
        if self.gemm is None or bias is not None:
            return F.linear(x, w, bias)
        return self.gemm.linear(x, w, peers)

    def _peers(self, tails, positions: int, pad: int | None = None, min_rows: int = 0):
        return lambda: [tails.weight(j, positions, pad, min_rows)[0] for j in range(len(self.w.layers))]

    @contextmanager
    def tuning(self):
        """Within: the GEMMs time cuBLASLt's candidates for each shape they have not met (eager calls only)."""
        if self.gemm is None:
            yield
            return
        self.gemm.tuning = True
        try:
            yield
        finally:
            self.gemm.tuning = False

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
