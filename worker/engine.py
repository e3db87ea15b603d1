"""The engine: add requests, step, stream; ``generate`` for offline use in one process.

``step()`` reads top to bottom: schedule, launch (build the step's inputs, run the model, queue the
sampling), then, with ``async_scheduling``, launch the next decode step ahead, and post-process the
launched step (stop checks, detokenize, free what finished).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.config import EngineConfig
from worker.cuda_graphs import DecodeGraphs
from worker.errors import AdapterError, InvalidRequestError, PromptTooLongError, UnknownAdapterError
from worker.kv_cache import KVCache
from worker.lora.backend import make_lora_backend
from worker.lora.host_cache import HostCache
from worker.lora.merge import ensemble_key, merge_adapters
from worker.lora.peft_format import LoRAAdapter, load_peft_adapter, pin_packed
from worker.lora.slots import AdapterSlots
from worker.model.config import ModelConfig
from worker.model.llama import LlamaModel
from worker.model.weights import load_weights, random_weights
from worker.model_ops import make_ops
from worker.outputs import CompletionOutput, RequestOutput
from worker.postprocess import finish_output, process_sampled
from worker.sampler import Sampled, prompt_logprobs, sample_async, to_device
from worker.sampling_params import SamplingParams
from worker.scheduler import ScheduledSeq, Scheduler
from worker.scoring import LoglikScore, encode_pair, loglik, score_params
from worker.sequence import Sequence
from worker.step_inputs import StepBuffers

__all__ = ["Engine", "SamplingParams", "EngineConfig"]


@dataclass(eq=False)
class _Launched:
    """A step queued on the device: its logits, the prompt-logprob rows, the sequences it samples for (in row
    order) and the sampling, read back by ``Engine._finish``."""
    logits: torch.Tensor
    prompt_rows: dict[ScheduledSeq, tuple[int, int, int]]
    sampled_seqs: list[ScheduledSeq]
    sampled: Sampled | None


class Engine:
    def __init__(self, model_dir: str | Path, random_init: bool = False, progress=None, **options):
        self.config = cfg = EngineConfig(**options)
        self.device = torch.device(cfg.device)
        self.model_config = mc = ModelConfig.from_dir(model_dir)
        self.model_dir = str(model_dir)
        weights = (random_weights(mc, self.device, cfg.dtype) if random_init
                   else load_weights(model_dir, mc, self.device, cfg.dtype, progress))
        self.tokenizer = _load_tokenizer(model_dir)
        self.adapters = HostCache(self._load_adapter, cfg.host_cache_bytes, pin_memory=self.device.type == "cuda",
                                  pinned_bytes=min(cfg.host_cache_bytes, cfg.pinned_host_bytes))
        self.slots = AdapterSlots(mc, cfg.max_loras, cfg.max_lora_rank, self.device, cfg.dtype,
                                  make_lora_backend(cfg.backend("lora_backend")))
        fused = cfg.backend("lora_backend") == cfg.backend("attention_backend") == "triton"
        self.model = LlamaModel(mc, weights, make_ops(cfg.backend("attention_backend")), self.slots,
                                cfg.fused_lora_tokens if fused else 0, cfg.tuned_gemms, cfg.gemm_tuning_cache)
        num_blocks = cfg.num_blocks or self._auto_num_blocks()
        self.kv = KVCache(mc, num_blocks, cfg.block_size, self.device, cfg.dtype)
        self.max_model_len = min(cfg.max_model_len or mc.max_context, mc.max_context, num_blocks * cfg.block_size)
        self.scheduler = Scheduler(self.kv, self.slots, self.adapters, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   cfg.starvation_steps, cfg.low_priority_tokens)
        self.buffers = StepBuffers(cfg.max_num_batched_tokens, cfg.max_num_seqs,
                                   -(-self.max_model_len // cfg.block_size), cfg.max_loras, self.device)
        self.graphs = None
        if cfg.cuda_graphs and self.device.type == "cuda":
            # a decode step holds one token per sequence: its batch is bounded by both limits
            self.graphs = DecodeGraphs(self.model, self.kv, self.buffers,
                                       min(cfg.max_num_seqs, cfg.max_num_batched_tokens, 256))
            self.graphs.capture(progress)
        self.seqs: dict[str, Sequence] = {}
        self._aborted: list[RequestOutput] = []
        self._in_flight: _Launched | None = None    # launched ahead (async_scheduling), not yet post-processed
        self._staged: torch.cuda.Event | None = None  # recorded after the last launch's input copies
        self.ahead_steps = 0                        # steps launched ahead of their inputs' host read

    # -- adapters ----------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str | Path) -> LoRAAdapter:
        """Load and validate a PEFT adapter now (errors raise here); replaces an idle adapter of the same name."""
        _check_name(name)
        return self._register(name, path, self._load_adapter(name, str(path)))

    def register_adapter(self, name: str, path: str | Path) -> None:
        """Make an adapter known without reading it: it loads in the background when a request first needs it;
        if it then fails to load, the requests waiting for it finish with an error."""
        _check_name(name)
        self._register(name, path, None)

    def add_lora(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """Register an adapter already validated into memory (``load_peft_adapter``, merges)."""
        return self._register(adapter.name, None, adapter)

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        """Keep ``name`` in host memory and, once loaded, in its GPU slot (never evicted)."""
        if name not in self.adapters:
            raise UnknownAdapterError(f"adapter {name!r} is not registered")
        self.adapters.pin(name, pinned)
        (self.slots.pinned.add if pinned else self.slots.pinned.discard)(name)

    def _register(self, name: str, path, adapter: LoRAAdapter | None) -> LoRAAdapter | None:
        if name in self.adapters:
            self.slots.evict(name)      # raises while running requests use the old version
            self._drop_ensembles_of(name)
        if adapter is not None and self.device.type == "cuda" and not all(
                m.a.is_pinned() or m.a.device.type != "cpu" for m in adapter.modules.values()):
            pin_packed(adapter, arena=self.adapters.arena)
        self.adapters.register(name, path, adapter)
        return adapter

    def _load_adapter(self, name: str, path: str) -> LoRAAdapter:
        return load_peft_adapter(name, path, self.model_config, self.config.max_lora_rank, self.config.dtype)

    def ensemble(self, members: list[tuple[str, float]], strategy: str = "linear", **params) -> str:
        """The name of the merged adapter for a weighted set of registered adapters, merged on first use.

        Cached under (ids, versions, weights, strategy, params): a new version of a
        member makes a new merge. ``params``: density, majority_sign_method, seed.
        """
        if not members:
            raise InvalidRequestError("an ensemble needs at least one adapter")
        ids = [m[0] for m in members]
        weights = [float(m[1]) for m in members]
        for i in ids:
            if i not in self.adapters:
                raise UnknownAdapterError(f"unknown adapter {i!r} in ensemble")
        key = ensemble_key([(i, self.adapters.version(i)) for i in ids], weights, strategy, params)
        name = f"ensemble:{key[:24]}"
        if name not in self.adapters:
            merged = merge_adapters([self.adapters.wait(i) for i in ids], weights, strategy, name=name,
                                    max_rank=self.config.max_lora_rank, **params)
            self.add_lora(merged)
            self.adapters.entry(name).members = set(ids)
        return name

    def _drop_ensembles_of(self, member: str) -> None:
        for name in [n for n in self.adapters if member in self.adapters.entry(n).members]:
            if not self.slots.in_use(name):
                self.slots.evict(name)
                self.adapters.remove(name)

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        if any(s.adapter == name for s in self.seqs.values()):
            raise AdapterError(f"adapter {name!r} has requests in flight")
        self.slots.evict(name)
        self.adapters.remove(name)
        self.slots.pinned.discard(name)
        self._drop_ensembles_of(name)

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | list[int], adapter: str | None = None,
                    params: SamplingParams | None = None, priority: int = 0) -> str:
        """Validate and queue one request; raises InvalidRequestError (and subclasses) for bad input.
        Requests of higher ``priority`` are admitted first (batch scoring runs below 0)."""
        seq = self._make_sequence(request_id, prompt, adapter, params or SamplingParams(), priority)
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        self._aborted.append(RequestOutput(request_id, [], "", [], finished=True, finish_reason="abort"))
        return True

    def cache_stats(self) -> dict[str, int]:
        """Counters of the adapter cache: requests admitted with an adapter, loads into GPU slots, and the
        host tier's hits, misses (reads from disk) and completed loads."""
        return {"admissions": self.slots.acquires, "gpu_loads": self.slots.loads, "host_hits": self.adapters.hits,
                "host_misses": self.adapters.misses, "host_loads": self.adapters.loads}

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Run one step and return the outputs of one step.

        With ``async_scheduling``, a decode step of the sequences that the step just run samples for is
        launched before that step's tokens reach the host (they feed it on the device), and the host then
        processes the earlier step while the device runs the new one: the host's work (stop checks,
        outputs, scheduling, staging inputs) overlaps the device's instead of adding to it. Such a step
        returns the outputs of the step before it; a sequence that the earlier step finishes (EOS, a stop
        string, an abort) has a row in the step in flight whose token is dropped.
        """
        outputs, self._aborted = self._aborted, []
        done = self._in_flight
        if done is None:
            scheduled = self.scheduler.schedule()
            outputs += self._report_failed_loads()
            if not scheduled:
                if self.scheduler.waiting:
                    time.sleep(0.001)       # only loads are pending: do not spin
                return outputs
            done = self._launch(scheduled)
        self._in_flight = self._launch_ahead(done) if self.config.async_scheduling else None
        return outputs + self._finish(done)

    def _launch(self, scheduled: list[ScheduledSeq], feed: tuple[torch.Tensor, list[int]] | None = None) -> _Launched:
        """Queue one forward pass and its sampling on the device. ``feed``: (sampled tokens of the step in
        flight, the row of each of this step's input tokens in them), for a step from ``schedule_ahead``."""
        lists, prompt_rows, sample_rows = self._build_inputs(scheduled)
        ids, pos, slots_map, tables, ctx, q_lens, token_slots, logits_idx = lists
        if self._staged is not None:
            self._staged.synchronize()      # the last step's input copies are done: their host twins are free

        def before_run():
            if feed is not None:
                self.buffers.feed_tokens(*feed)
            if self.device.type == "cuda":
                self._staged = torch.cuda.Event()
                self._staged.record()

        if self.graphs is not None and max(q_lens) == 1 and not prompt_rows and len(ids) <= self.graphs.max_batch:
            logits = self.graphs.run(ids, pos, slots_map, tables, ctx, token_slots, before_replay=before_run)
        else:
            inputs = self.buffers.fill(ids, pos, slots_map, tables, ctx, q_lens, logits_idx, token_slots)
            before_run()
            hidden = self.model.forward(inputs, self.kv.layers)
            logits = self.model.logits(hidden[inputs.logits_idx])
        for sch in scheduled:
            sch.seq.num_computed += sch.num_new
        sampled = None
        if sample_rows:
            seqs = [s.seq for s in sample_rows]
            rows = list(sample_rows.values())
            picked = logits if rows == list(range(logits.shape[0])) else logits[to_device(rows, logits.device)]
            sampled = sample_async(picked, [s.params for s in seqs], [s.generator for s in seqs])
        return _Launched(logits, prompt_rows, list(sample_rows), sampled)

    def _launch_ahead(self, done: _Launched) -> _Launched | None:
        """Launch the next decode step of every running sequence while ``done`` is still on the device, if
        ``done`` samples a token for each of them and the scheduler can take them as they are; None if not."""
        if done.sampled is None:
            return None
        # (rows of sequences that finished while ``done`` was queued, by a stop or an abort, are skipped)
        row = {sch.seq: i for i, sch in enumerate(done.sampled_seqs) if not sch.seq.finished}
        running = self.scheduler.running
        if len(row) != len(running) or any(s not in row for s in running):
            return None
        # in ``done``'s order (the scheduler's): the same rows as a step scheduled after it would have
        seqs = [s for s in row if not self._ends_by_length(s)]
        scheduled = self.scheduler.schedule_ahead(seqs)
        if scheduled is None:
            return None
        self.ahead_steps += 1
        return self._launch(scheduled, (done.sampled.tokens, [row[s] for s in seqs]))

    def _ends_by_length(self, seq: Sequence) -> bool:
        """Whether the token being sampled for ``seq`` finishes it by length (``process_sampled``)."""
        return len(seq.output_ids) + 1 >= seq.params.max_tokens or seq.num_tokens + 1 >= self.max_model_len

    def _finish(self, done: _Launched) -> list[RequestOutput]:
        """Wait for a launched step's results and post-process them: prompt logprobs, then each sampled
        token (stop checks, detokenizing, freeing what finished). Rows of sequences that finished since
        the step was launched are dropped."""
        outputs: list[RequestOutput] = []
        for sch, (lo, hi, first_target) in done.prompt_rows.items():
            seq = sch.seq
            targets = [seq.prompt_ids[first_target + j] for j in range(hi - lo)]
            seq.prompt_logprobs.extend(prompt_logprobs(done.logits[lo:hi], targets, seq.params.prompt_logprobs))
        if done.sampled is None:
            return outputs
        tokens, lps = done.sampled.result()
        for sch, tok, lp in zip(done.sampled_seqs, tokens, lps):
            seq = sch.seq
            if seq.finished:
                continue
            out = process_sampled(seq, tok, lp, self.tokenizer, self.max_model_len)
            if out.finished:
                self.scheduler.finish(seq)
                self.seqs.pop(seq.request_id, None)
            outputs.append(out)
        return outputs

    def _report_failed_loads(self) -> list[RequestOutput]:
        failed, self.scheduler.failed = self.scheduler.failed, []
        for seq in failed:
            self.seqs.pop(seq.request_id, None)
        return [RequestOutput(s.request_id, [], "", [], finished=True, finish_reason="error", error=s.error)
                for s in failed]

    def generate(self, prompts: list[str | list[int]] | str, adapters: list[str | None] | str | None = None,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[CompletionOutput]:
        """Run a batch to completion. Every request is validated before any is queued."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        adapters = adapters if isinstance(adapters, list) else [adapters] * n
        params = params if isinstance(params, list) else [params or SamplingParams()] * n
        if len(adapters) != n or len(params) != n:
            raise InvalidRequestError(f"{n} prompts need {n} adapters and params, got {len(adapters)} and {len(params)}")
        seqs = [self._make_sequence(None, p, a, sp) for p, a, sp in zip(prompts, adapters, params)]
        for seq in seqs:
            self.seqs[seq.request_id] = seq
            self.scheduler.add(seq)
        while any(not s.finished for s in seqs):
            self.step()
        return [finish_output(s, self.tokenizer) for s in seqs]

    def score(self, prompts: list[str | list[int]], completions: list[str | list[int]] | None = None,
              adapters: list[str | None] | str | None = None, per_token: bool = False) -> list[LoglikScore]:
        """Log-likelihood of each completion after its prompt (without completions: of each prompt
        after its first token): sum, mean, token count, greedy flag, optionally per token."""
        completions = completions if completions is not None else [None] * len(prompts)
        if len(completions) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts need {len(prompts)} completions, got {len(completions)}")
        pairs = [encode_pair(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        outs = self.generate([ids for ids, _ in pairs], adapters, [score_params(start) for _, start in pairs])
        for o in outs:
            if o.error:
                raise InvalidRequestError(o.error)
        return [loglik(o.prompt_logprobs, start, per_token) for o, (_, start) in zip(outs, pairs)]

    def encode_pair(self, prompt: str | list[int], completion: str | list[int] | None) -> tuple[list[int], int]:
        """Token ids of a scored request and the first scored position (see ``worker.scoring``)."""
        ids, start = encode_pair(self.tokenizer, prompt, completion)
        self._encode(ids)           # range checks
        return ids, start

    # -- internals ---------------------------------------------------------------------------
    def _make_sequence(self, request_id, prompt, adapter, params: SamplingParams, priority: int = 0) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        request_id = str(request_id) if request_id is not None else uuid.uuid4().hex
        if request_id in self.seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        if adapter is not None and adapter not in self.adapters:
            raise UnknownAdapterError(f"unknown adapter {adapter!r} (loaded: {', '.join(sorted(self.adapters)) or 'none'})")
        ids = self._encode(prompt)
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt is {len(ids)} tokens; the context holds {self.max_model_len} "
                                     "including at least one generated token")
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        elif not params.greedy:
            gen = torch.Generator(device=self.device).manual_seed(int.from_bytes(uuid.uuid4().bytes[:8], "little") >> 1)
        return Sequence(request_id, ids, params, adapter, gen, self._eos_ids(), priority)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids instead of text")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidRequestError(f"token ids out of range [0, {self.model_config.vocab_size}): {bad[:5]}")
        else:
            raise InvalidRequestError("prompt must be a string or a list of token ids")
        if not ids:
            raise InvalidRequestError("prompt is empty")
        return ids

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(ids)

    def _build_inputs(self, scheduled: list[ScheduledSeq]):
        bs = self.config.block_size
        ids, pos, slots_map, tables, ctx, q_lens, token_slots, logits_idx = [], [], [], [], [], [], [], []
        prompt_rows: dict[ScheduledSeq, tuple[int, int, int]] = {}
        sample_rows: dict[ScheduledSeq, int] = {}
        for sch in scheduled:
            seq, start, n = sch.seq, sch.seq.num_computed, sch.num_new
            row0 = len(ids)
            for p in range(start, start + n):
                ids.append(0 if sch.ahead else seq.token_at(p))     # ahead: fed on the device
                pos.append(p)
                slots_map.append(seq.block_table[p // bs] * bs + p % bs)
            tables.append(seq.block_table)
            ctx.append(start + n)
            q_lens.append(n)
            token_slots.extend([seq.slot] * n)
            if seq.wants_prompt_logprobs:
                # position p predicts prompt token p + 1; skip targets already scored before a preemption
                first = max(start, len(seq.prompt_logprobs) - 1)
                last = min(start + n, len(seq.prompt_ids) - 1)
                if last > first:
                    prompt_rows[sch] = (len(logits_idx), len(logits_idx) + last - first, first + 1)
                    logits_idx.extend(row0 + p - start for p in range(first, last))
            if sch.completes:
                sample_rows[sch] = len(logits_idx)
                logits_idx.append(row0 + n - 1)
        return (ids, pos, slots_map, tables, ctx, q_lens, token_slots, logits_idx), prompt_rows, sample_rows

    def _auto_num_blocks(self) -> int:
        per_block = KVCache.bytes_per_block(self.model_config, self.config.block_size, self.config.dtype)
        if self.device.type != "cuda":
            return 512
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free - (1 - self.config.gpu_memory_utilization) * total - (1 << 30)  # 1 GiB for activations
        if budget < per_block:
            raise MemoryError("no GPU memory left for the KV cache")
        return int(budget // per_block)


def _check_name(name) -> None:
    if not isinstance(name, str) or not name:
        raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")


def _load_tokenizer(model_dir):
    d = Path(model_dir)
    if not ((d / "tokenizer.json").exists() or (d / "tokenizer.model").exists()):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(d))
