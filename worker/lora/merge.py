"""Ensembles: a weighted set of LoRA adapters merged into one adapter, as PEFT's ``add_weighted_adapter`` does.

Strategies (``delta_i = s_i * B_i @ A_i`` is adapter i's update of a module):

* ``linear`` — exact: ``delta = sum_i w_i * delta_i``, by concatenating ranks
  (``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, scaling 1).
  This is PEFT's ``combination_type="cat"``; PEFT's own "linear" (summing A's
  and B's of equal rank) is an approximation and is not offered.
* ``ties``, ``dare_linear``, ``dare_ties`` — PEFT's task arithmetic on the A
  and on the B matrices separately (``_generalized_task_arithmetic_weighted_adapter``):
  A's are weighted by ``sign(w s) sqrt(|w s|)``, B's by ``sqrt(|w s|)``, then
  pruned (magnitude for TIES, random with rescale for DARE), sign-elected and
  merged with ``peft.utils.merge_utils``. Not exact (products of sums are not
  sums of products), which is why PEFT offers them. Ranks may differ here
  (PEFT refuses that): smaller ones are zero-padded to the largest.

A module that only some adapters target counts as zero for the others. DARE's
random masks come from a ``torch.Generator`` seeded with ``seed``, drawn module
by module in model order (layer, then q k v o gate up down; A before B), the
same stream as PEFT after ``torch.manual_seed(seed)`` — without touching the
global RNG. Arithmetic runs in float32; results take the first adapter's dtype.
"""
from __future__ import annotations

import hashlib
import json
import math

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune, task_arithmetic

from worker.errors import AdapterError
from worker.lora.peft_format import MODULE_SLICES, LoRAAdapter, LoRAModule

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
# params that change the result of each strategy (others are dropped from the cache key)
_PARAMS = {"linear": (), "ties": ("density", "majority_sign_method"), "dare_linear": ("density", "seed"),
           "dare_ties": ("density", "majority_sign_method", "seed")}
_ORDER = {name: i for i, name in enumerate(MODULE_SLICES)}


def merge_adapters(adapters: list[LoRAAdapter], weights: list[float], strategy: str = "linear",
                   density: float | None = None, majority_sign_method: str = "total", seed: int = 0,
                   name: str | None = None, max_rank: int | None = None) -> LoRAAdapter:
    """One adapter whose modules combine ``adapters`` weighted by ``weights``; raises AdapterError."""
    params = _check(adapters, weights, strategy, density, majority_sign_method, seed)
    keys = sorted({k for a in adapters for k in a.modules}, key=lambda k: (k[0], _ORDER[k[1]]))
    dtype = next(iter(adapters[0].modules.values())).a.dtype
    gen = torch.Generator().manual_seed(seed)
    merged = LoRAAdapter(name=name or "ensemble-" + ensemble_key([(a.name, 0) for a in adapters], weights,
                                                                 strategy, params)[:16],
                         path="", base_model=adapters[0].base_model)
    for key in keys:
        present = [(a.modules[key], float(w)) for a, w in zip(adapters, weights) if key in a.modules]
        if len({m.a.shape[1] for m, _ in present}) > 1 or len({m.b.shape[0] for m, _ in present}) > 1:
            raise AdapterError(f"cannot merge layers.{key[0]}.{key[1]}: the adapters' shapes differ "
                               f"({[(tuple(m.a.shape), tuple(m.b.shape)) for m, _ in present]}); "
                               "are they for different base models?")
        if strategy == "linear" or len(adapters) == 1:
            a, b = _concat(present)
        else:
            a, b = _task_arithmetic(present, strategy, density, majority_sign_method, gen)
        merged.modules[key] = LoRAModule(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), scaling=1.0)
    if max_rank is not None and merged.rank > max_rank:
        raise AdapterError(f"merged adapter has rank {merged.rank}, over the server's limit {max_rank} "
                           "(linear merging adds the ranks: merge fewer adapters or use ties/dare)")
    return merged


def _check(adapters, weights, strategy, density, majority_sign_method, seed) -> dict:
    if strategy not in STRATEGIES:
        raise AdapterError(f"unknown merge strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    if not adapters:
        raise AdapterError("an ensemble needs at least one adapter")
    if len(weights) != len(adapters):
        raise AdapterError(f"{len(adapters)} adapters but {len(weights)} weights")
    if any(not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) for w in weights):
        raise AdapterError(f"weights must be finite numbers, got {weights!r}")
    if any(not a.modules for a in adapters):
        raise AdapterError("cannot merge an adapter without modules")
    if strategy != "linear":
        if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
            raise AdapterError(f"strategy {strategy!r} needs a density in (0, 1], got {density!r}")
        if majority_sign_method not in SIGN_METHODS:
            raise AdapterError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise AdapterError(f"seed must be an integer, got {seed!r}")
    return {"density": density, "majority_sign_method": majority_sign_method, "seed": seed}


def _concat(present: list[tuple[LoRAModule, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    # PEFT "cat": the weight and the adapter's own scaling fold into A; the ranks stack.
    a = torch.cat([m.a.float() * (w * m.scaling) for m, w in present], dim=0)     # [sum r, in]
    b = torch.cat([m.b.float() for m, _ in present], dim=1)                       # [out, sum r]
    return a, b


def _task_arithmetic(present, strategy, density, sign_method, gen) -> tuple[torch.Tensor, torch.Tensor]:
    rank = max(m.rank for m, _ in present)
    a_list = [_pad_rows(m.a.float(), rank) for m, _ in present]                   # [r, in] each
    b_list = [_pad_rows(m.b.float().T, rank).T for m, _ in present]               # [out, r] each
    ws = [w * m.scaling for m, w in present]
    # the sign goes on A only, else it would cancel in B @ A (as PEFT does)
    w_a = torch.tensor([math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in ws])
    w_b = torch.tensor([math.sqrt(abs(w)) for w in ws])
    return (_combine(a_list, w_a, strategy, density, sign_method, gen),
            _combine(b_list, w_b, strategy, density, sign_method, gen))


def _combine(tensors: list[torch.Tensor], weights: torch.Tensor, strategy: str, density: float,
             sign_method: str, gen: torch.Generator) -> torch.Tensor:
    """peft.utils.merge_utils.{ties, dare_linear, dare_ties}, with DARE's masks drawn from ``gen``."""
    if strategy == "ties":
        tensors = [prune(t, density, method="magnitude") for t in tensors]
    else:
        tensors = [_random_prune(t, density, gen) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    if strategy == "dare_linear":
        return task_arithmetic(tensors, weights)
    mask = calculate_majority_sign_mask(stacked, method=sign_method)
    return disjoint_merge(stacked * weights.view(-1, *([1] * (stacked.dim() - 1))), mask)


def _random_prune(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    # merge_utils.random_pruning(rescale=True) with an explicit generator; density 1 draws nothing, as in PEFT
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * mask / density


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def ensemble_key(ids_with_versions, weights, strategy: str, params: dict | None = None) -> str:
    """sha256 (hex) of the canonical JSON of an ensemble: the cache key of its merged adapter.

    ``ids_with_versions``: ``[(id, version), ...]`` in merge order (order matters:
    it decides rank order and DARE's random stream). Params that do not change
    the strategy's result are left out, so e.g. a seed never splits a TIES cache.
    """
    ids = [(str(i), int(v)) for i, v in ids_with_versions]
    if len(ids) != len(weights):
        raise AdapterError(f"{len(ids)} adapters but {len(weights)} weights")
    if strategy not in STRATEGIES:
        raise AdapterError(f"unknown merge strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    params = params or {}
    relevant = {k: params[k] for k in _PARAMS[strategy] if params.get(k) is not None}
    if "density" in relevant:
        relevant["density"] = float(relevant["density"])
    doc = {"adapters": [[i, v, float(w)] for (i, v), w in zip(ids, weights)], "strategy": strategy,
           "params": relevant}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
