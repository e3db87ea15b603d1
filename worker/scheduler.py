"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Each step, in order:
1. running sequences, decodes first (one token each) so a long prompt never
   stalls them, then prefills in progress (a chunk each, within the budget);
   when KV blocks run out, the most recently arrived running sequence is
   preempted: its blocks are freed and it goes back to the head of the queue,
   to be recomputed later;
2. waiting sequences, first come first served, each taking a prefill chunk,
   as long as the budget, the batch size, free blocks and LoRA slots allow.
   A request whose adapter is still loading (from disk to host, or into its
   GPU slot) waits without holding back the others. A request whose adapter
   finds no free slot is passed over too; once passed over ``starvation_steps``
   times, nothing behind it is admitted until it gets its slot, so busy adapters
   cannot starve it. A request whose adapter failed to load is failed, with
   the loader's message, and handed back through ``failed``.

Priorities: the waiting queue is ordered by priority (higher first, then arrival).
Prefills below priority 0 (batch scoring) come last: they run only in steps where
no online (priority >= 0) request prefills, and take at most ``low_priority_tokens``
a step, so an online request's first token waits for neither their compute nor a
long step it arrived behind. Decodes of every priority run first, as before.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from worker.errors import AdapterError
from worker.kv_cache import KVCache
from worker.lora.slots import AdapterSlots
from worker.sequence import Sequence, Status


@dataclass(eq=False)   # identity hash: used as a dict key per step
class ScheduledSeq:
    seq: Sequence
    num_new: int        # tokens computed this step, from seq.num_computed
    ahead: bool = False  # a decode of the token that the step still in flight samples (``schedule_ahead``)

    @property
    def completes(self) -> bool:
        """After this step every known token of the sequence is in the cache: sample the next one."""
        return self.ahead or self.seq.num_computed + self.num_new == self.seq.num_tokens


class Scheduler:
    def __init__(self, kv: KVCache, slots: AdapterSlots, adapters, max_num_seqs: int,
                 max_num_batched_tokens: int, starvation_steps: int = 8, low_priority_tokens: int | None = None):
        self.kv = kv
        self.slots = slots
        self.adapters = adapters            # HostCache: the host tier, loading from disk in the background
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.low_priority_tokens = low_priority_tokens or max_num_batched_tokens
        self.starvation_steps = starvation_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.failed: list[Sequence] = []    # requests whose adapter failed to load, for the engine to report
        self._load_errors: dict[str, str] = {}

    def add(self, seq: Sequence) -> None:
        if not self.waiting or self.waiting[-1].priority >= seq.priority:
            self.waiting.append(seq)            # the common case: no one to overtake
            return
        at = next(i for i, s in enumerate(self.waiting) if s.priority < seq.priority)
        self.waiting.insert(at, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        self._budget, self._low_budget = self.budget, self.low_priority_tokens
        out: list[ScheduledSeq] = []
        order = sorted(self.running, key=lambda s: (_prefilling(s), -s.priority, s.arrival))
        batch = [s for s in order if s.priority < 0 and _prefilling(s)]
        urgent = [s for s in order if not (s.priority < 0 and _prefilling(s))]
        preempted = self._run(out, urgent, batch)
        if preempted:
            return out
        self._admit(out, min_priority=0)
        if any(_prefilling(sch.seq) and sch.seq.priority >= 0 for sch in out):
            return out                          # an online prefill runs: keep its step short
        self._run(out, batch, [])
        self._admit(out)
        return out

    def schedule_ahead(self, seqs: list[Sequence]) -> list[ScheduledSeq] | None:
        """A decode step for ``seqs`` while the step that samples their next tokens is still on the device:
        one token each, at position ``num_computed`` (that step's count). None, and nothing scheduled, where
        it could not run as planned: requests wait that ``schedule`` could admit (admission may load adapters
        into slots the step in flight still reads; with the batch full it admits nothing), the budget is short,
        or KV blocks run out (``schedule`` preempts; this does not)."""
        if (self.waiting and len(self.running) < self.max_num_seqs) or not seqs or len(seqs) > self.budget:
            return None
        need = sum(max(self.kv.blocks_for(s.num_computed + 1) - len(s.block_table), 0) for s in seqs)
        if need > self.kv.allocator.num_free:
            return None
        for s in seqs:
            self._reserve(s, 1)
        return [ScheduledSeq(s, 1, ahead=True) for s in seqs]

    def _run(self, out: list[ScheduledSeq], queue: list[Sequence], spare: list[Sequence]) -> bool:
        """Schedule running sequences in order; when KV blocks run out, preempt from ``spare``
        (batch prefills) first, then from the back of ``queue``. True if anything was preempted."""
        queue, preempted = list(queue), False
        while queue and self._budget > 0:
            seq = queue.pop(0)
            n = self._allowance(seq)
            if n == 0:
                continue
            while not self._reserve(seq, n):
                victim = spare.pop() if spare else queue.pop() if queue else seq
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self._take(out, seq, n)
        return preempted

    def _allowance(self, seq: Sequence) -> int:
        """Tokens ``seq`` may compute this step under the budgets left."""
        n = min(seq.num_tokens - seq.num_computed, self._budget)
        if seq.priority < 0 and n > 1:
            n = min(n, self._low_budget)
        return max(n, 0)

    def _take(self, out: list[ScheduledSeq], seq: Sequence, n: int) -> None:
        out.append(ScheduledSeq(seq, n))
        self._budget -= n
        if seq.priority < 0 and n > 1:
            self._low_budget -= n

    def _admit(self, out: list[ScheduledSeq], min_priority: int | None = None) -> None:
        passed_over: list[Sequence] = []
        while self.waiting and self._budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if min_priority is not None and seq.priority < min_priority:
                break
            state = "ready" if seq.adapter is None else self._adapter_state(seq.adapter)
            if state == "failed":
                self._fail_waiting(seq.adapter, passed_over)
                continue
            if state == "loading":
                passed_over.append(self.waiting.popleft())
                continue
            if state == "no-slot":
                seq.skipped += 1
                if seq.skipped >= self.starvation_steps:
                    break                       # drain: nothing overtakes a starving request
                passed_over.append(self.waiting.popleft())
                continue
            n = self._allowance(seq)
            if n == 0:
                break                           # the batch share of this step is spent
            if not self._reserve(seq, n):
                break                           # out of KV blocks: wait for running sequences to finish
            self.waiting.popleft()
            if seq.adapter is not None:
                seq.slot = self.slots.acquire(seq.adapter)
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._take(out, seq, n)
        self.waiting.extendleft(reversed(passed_over))

    def _adapter_state(self, name: str) -> str:
        """ready | loading | no-slot | failed; starts the loads that are due."""
        if self.slots.ready(name):
            return "ready"
        if name in self.slots.slot_of:
            return "loading"                    # copying into its slot
        if not self.slots.can_start_load():
            return "no-slot"                    # no slot could take it: do not read it from disk yet
        try:
            host = self.adapters.get(name)      # starts a background read from disk if needed
        except AdapterError as e:
            self._load_errors[name] = str(e)
            return "failed"
        if host is None:
            return "loading"
        if not self.slots.start_load(host):
            return "no-slot"
        return "ready" if self.slots.ready(name) else "loading"

    def _fail_waiting(self, adapter: str, passed_over: list[Sequence]) -> None:
        """Fail every waiting request for ``adapter``: its load failed."""
        error = self._load_errors.pop(adapter)
        for queue in (self.waiting, passed_over):
            for seq in [s for s in queue if s.adapter == adapter]:
                queue.remove(seq)
                self._release(seq)
                seq.status = Status.FINISHED
                seq.finish_reason, seq.error = "error", error
                self.failed.append(seq)

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Allocate the blocks ``seq`` needs for ``n`` more tokens; False if there are not enough free."""
        need = self.kv.blocks_for(seq.num_computed + n) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.kv.allocator.num_free:
            return False
        seq.block_table.extend(self.kv.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s KV blocks and requeue it at the head; it will be recomputed from its tokens."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.kv.allocator.free(seq.block_table)
        seq.block_table = []
        if seq.slot >= 0:
            self.slots.release(seq.adapter)
            seq.slot = -1


def _prefilling(seq: Sequence) -> bool:
    return seq.num_tokens - seq.num_computed > 1
