"""``out = x @ w.T`` through cuBLASLt with an algorithm chosen by timing, not by the heuristic's first pick.

Why: cuBLAS's heuristic moves the gate_up GEMM of a decode step off its fast kernel when the LoRA
path puts A rows under the weight (batch 32, Llama-3-8B: 85 us a call on a 128x32 tile at the base
shape, 92 us on a 256x32 tile with 128 extra rows, though the rows add 0.5% of the bytes;
bench/NOTES-kernels.md v7, v17). The heuristic returns a ranked list of algorithms; ``LtGemm.tune``
times each over the layers' own weights and keeps the fastest, as PyTorch's TunableOp does on ROCm.

cuBLASLt is reached through ctypes (the library torch itself loads), so nothing is built. The
call is capturable in a CUDA graph: the workspace is preallocated and the algorithm fixed.
Choices can persist in a JSON file (``TuningCache``, keyed by GPU and cuBLASLt version): a later start
checks each cached algorithm once against F.linear instead of timing every candidate again.

    g = LtGemm(); g.tune(x, [w, ...]); g.linear(x, w) == F.linear(x, w)   (bf16/fp16, fp32 accumulation;
                                                                           equal up to summation order)
"""
from __future__ import annotations

import ctypes
import glob
import json
import logging
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_CUDA_TYPE = {torch.float16: 2, torch.bfloat16: 14}   # cudaDataType_t: CUDA_R_16F, CUDA_R_16BF
_CUDA_R_32F = 0
_COMPUTE_32F = 68                                     # cublasComputeType_t: CUBLAS_COMPUTE_32F
_DESC_TRANSA, _DESC_TRANSB = 3, 4                     # cublasLtMatmulDescAttributes_t
_PREF_MAX_WORKSPACE = 1                               # cublasLtMatmulPreferenceAttributes_t
_OP_N, _OP_T = 0, 1
ALIGN = 256                 # bytes: the heuristic's default minimum alignment of every operand, kept
WORKSPACE = 32 << 20        # bytes, as torch gives cuBLASLt on Hopper


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CuBLASLtError(RuntimeError):
    pass


log = logging.getLogger(__name__)


def _library() -> ctypes.CDLL:
    """libcublasLt as torch loaded it (by soname), else from the pip package's folder."""
    names = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    for base in {os.path.dirname(os.path.dirname(torch.__file__))}:
        names += sorted(glob.glob(os.path.join(base, "nvidia", "**", "libcublasLt.so*"), recursive=True))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CuBLASLtError(f"libcublasLt not found (tried {names})")


class _Lt:
    """The library, one handle, and typed entry points."""

    def __init__(self):
        lib = self.lib = _library()
        p, i, u64, i64, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
        for name, args in {
            "cublasLtCreate": [ctypes.POINTER(p)],
            "cublasLtMatmulDescCreate": [ctypes.POINTER(p), i, i],
            "cublasLtMatmulDescSetAttribute": [p, i, p, sz],
            "cublasLtMatrixLayoutCreate": [ctypes.POINTER(p), i, u64, u64, i64],
            "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(p)],
            "cublasLtMatmulPreferenceSetAttribute": [p, i, p, sz],
            "cublasLtMatmulPreferenceDestroy": [p],
            "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i, ctypes.POINTER(_Heuristic), ctypes.POINTER(i)],
            "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, ctypes.POINTER(_Algo), p, sz, p],
        }.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        lib.cublasLtGetVersion.argtypes, lib.cublasLtGetVersion.restype = [], sz
        self.version = int(lib.cublasLtGetVersion())
        self.handle = self.new(lib.cublasLtCreate)

    def check(self, status: int, what: str) -> None:
        if status:
            raise CuBLASLtError(f"{what} failed: cublasStatus {status}")

    def new(self, fn, *args) -> ctypes.c_void_p:
        out = ctypes.c_void_p()
        self.check(fn(ctypes.byref(out), *args), fn.__name__)
        return out


_LT: _Lt | None = None


def _lt() -> _Lt:
    global _LT
    if _LT is None:
        _LT = _Lt()
    return _LT


@dataclass(frozen=True)
class Shape:
    """x [m, k] (row stride ldx) @ w[:n].T (row stride ldw) -> out [m, n], a new contiguous tensor."""
    m: int
    n: int
    k: int
    ldx: int
    ldw: int
    dtype: torch.dtype

    def name(self) -> str:
        return f"{self.m}x{self.n}x{self.k} ldx {self.ldx} ldw {self.ldw} {str(self.dtype).removeprefix('torch.')}"


class TuningCache:
    """Chosen algorithms on disk: ``{"version": 1, "entries": {env: {shape: {"algo": [8 ints] | null, "us": t}}}}``,
    ``env`` naming the GPU, cuBLASLt's version and the candidate count (an algorithm is only meaningful to the
    library that listed it). ``null``: F.linear won. An unreadable file, or one of another format, counts as
    empty (logged); ``save`` merges with what is on disk, then replaces the file whole (write, then rename), so
    workers sharing a file lose at most each other's latest shapes."""

    VERSION = 1
    MISSING = object()

    def __init__(self, path: str | os.PathLike, env: str):
        self.path, self.env = os.path.expanduser(os.fspath(path)), env
        self.entries: dict[str, dict] = self._read().get(env, {})

    def _read(self) -> dict[str, dict]:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("GEMM tuning cache %s unreadable (%s): tuning afresh", self.path, e)
            return {}
        if not isinstance(data, dict) or data.get("version") != self.VERSION or not isinstance(data.get("entries"), dict):
            log.warning("GEMM tuning cache %s is not version %d of the format: tuning afresh", self.path, self.VERSION)
            return {}
        return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}

    def get(self, shape: Shape):
        """The algorithm's 8 words, None (F.linear won), or ``MISSING``."""
        e = self.entries.get(shape.name())
        if not isinstance(e, dict) or "algo" not in e:
            return self.MISSING
        algo = e["algo"]
        if algo is None:
            return None
        if not (isinstance(algo, list) and len(algo) == 8 and all(isinstance(v, int) and 0 <= v < 1 << 64 for v in algo)):
            return self.MISSING
        return algo

    def put(self, shape: Shape, algo: list[int] | None, us: float) -> None:
        self.entries[shape.name()] = {"algo": algo, "us": round(us, 3) if us != float("inf") else None}

    def save(self) -> None:
        every = self._read()
        every[self.env] = {**every.get(self.env, {}), **self.entries}
        folder, tmp = os.path.dirname(self.path) or ".", None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".cublaslt-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": self.VERSION, "entries": every}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:                 # a read-only home, a full disk: tuning still holds for this process
            log.warning("GEMM tuning cache %s not written: %s", self.path, e)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def shape_of(x: torch.Tensor, w: torch.Tensor) -> Shape:
    return Shape(x.shape[0], w.shape[0], x.shape[1], x.stride(0), w.stride(0), x.dtype)


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x @ w.T`` fits this path: 2-d, half precision on CUDA, rows contiguous and aligned (the output
    is allocated here: torch's allocations are aligned)."""
    return (all(t.is_cuda and t.dim() == 2 and t.stride(1) == 1 and t.dtype == x.dtype for t in (x, w))
            and x.dtype in _CUDA_TYPE and x.shape[1] == w.shape[1]
            and all(t.data_ptr() % ALIGN == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (x, w)))


class _Plan:
    """Descriptors of one shape: cuBLAS is column-major, so out.T [n, m] = op_T(w [k, n]) @ x.T [k, m]."""

    def __init__(self, s: Shape):
        lt, dt = _lt(), _CUDA_TYPE[s.dtype]
        self.desc = lt.new(lt.lib.cublasLtMatmulDescCreate, _COMPUTE_32F, _CUDA_R_32F)
        for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            v = ctypes.c_int32(op)
            lt.check(lt.lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), "set trans")
        self.a = lt.new(lt.lib.cublasLtMatrixLayoutCreate, dt, s.k, s.n, s.ldw)
        self.b = lt.new(lt.lib.cublasLtMatrixLayoutCreate, dt, s.k, s.m, s.ldx)
        self.d = lt.new(lt.lib.cublasLtMatrixLayoutCreate, dt, s.n, s.m, s.n)

    def algos(self, count: int, workspace: int) -> list[_Heuristic]:
        """The heuristic's ranked algorithms (at most ``count``) that fit ``workspace`` bytes."""
        lt = _lt()
        pref = lt.new(lt.lib.cublasLtMatmulPreferenceCreate)
        ws = ctypes.c_uint64(workspace)
        lt.check(lt.lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE, ctypes.byref(ws), 8),
                 "set workspace")
        res, got = (_Heuristic * count)(), ctypes.c_int()
        try:
            lt.check(lt.lib.cublasLtMatmulAlgoGetHeuristic(lt.handle, self.desc, self.a, self.b, self.d, self.d,
                                                           pref, count, res, ctypes.byref(got)), "heuristic")
        finally:
            lt.lib.cublasLtMatmulPreferenceDestroy(pref)
        return [res[i] for i in range(got.value) if res[i].state == 0 and res[i].workspace <= workspace]


_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


class LtGemm:
    """``F.linear(x, w)`` for the shapes it was tuned on, by the fastest of cuBLASLt's ranked algorithms.

    ``tune`` times the heuristic's candidates once per shape and remembers the winner; ``linear``
    tunes a shape it meets while ``tuning`` is on (the engine turns it on for the eager warm-up runs
    before each decode graph's capture) and otherwise runs what was chosen. A shape never tuned, or
    one where F.linear itself won, goes to ``F.linear`` unchanged. Calls are capturable in a CUDA graph
    (the workspace is allocated here, once). With a ``cache`` file, ``linear`` first takes a shape's
    choice from it (checked, not timed: ``cached``), and ``tune`` writes each new choice there.
    """

    def __init__(self, device: torch.device | str = "cuda", candidates: int = 8, tune_layers: int = 8,
                 reps: int = 10, cache: str | os.PathLike | None = None):
        self.device, self.candidates, self.tune_layers, self.reps = torch.device(device), candidates, tune_layers, reps
        self.workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device=self.device)
        self.tuning = False
        self.plans: dict[Shape, _Plan] = {}
        self.chosen: dict[Shape, _Algo | None] = {}                       # None: F.linear was fastest
        self.timings: dict[Shape, list[tuple[_Algo | None, float]]] = {}  # F.linear, then each candidate: us
        self.cached: set[Shape] = set()                                  # chosen from the cache, checked, not timed
        self.cache = None
        if cache:
            env = f"{torch.cuda.get_device_name(self.device)} / cuBLASLt {_lt().version} / {candidates} candidates"
            self.cache = TuningCache(cache, env)

    def run(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, plan: _Plan, algo: _Algo) -> torch.Tensor:
        lt = _lt()
        lt.check(lt.lib.cublasLtMatmul(
            lt.handle, plan.desc, ctypes.byref(_ONE), w.data_ptr(), plan.a, x.data_ptr(), plan.b, ctypes.byref(_ZERO),
            out.data_ptr(), plan.d, out.data_ptr(), plan.d, ctypes.byref(algo), self.workspace.data_ptr(),
            WORKSPACE, torch.cuda.current_stream(x.device).cuda_stream), "cublasLtMatmul")
        return out

    def linear(self, x: torch.Tensor, w: torch.Tensor, peers=None) -> torch.Tensor:
        """F.linear(x, w); while ``tuning`` (and not capturing), an untuned shape is tuned first over
        ``peers()``: weights of w's shape to time on (every layer's), or w alone."""
        if not (self.tuning or self.chosen) or not usable(x, w):
            return F.linear(x, w)
        shape = shape_of(x, w)
        if shape not in self.chosen and self.tuning and not torch.cuda.is_current_stream_capturing():
            if not self._from_cache(x, w, shape):
                self.tune(x, peers() if peers is not None else [w])
        pick = self.chosen.get(shape)
        if pick is None:
            return F.linear(x, w)
        return self.run(x, w, torch.empty(shape.m, shape.n, dtype=x.dtype, device=x.device), self.plans[shape], pick)

    def _from_cache(self, x: torch.Tensor, w: torch.Tensor, shape: Shape) -> bool:
        """Take the cache's choice for ``shape`` if it has one that still passes ``tune``'s checks (matches
        F.linear on random inputs, one graph node); False: tune it."""
        got = self.cache.get(shape) if self.cache is not None else TuningCache.MISSING
        if got is TuningCache.MISSING:
            return False
        if got is None:
            self.chosen[shape] = None
        else:
            algo = _Algo()
            algo.data[:] = got
            plan = _Plan(shape)
            if not self._valid(_random_like(x), w, algo, plan):
                log.warning("cached cuBLASLt algorithm for %s fails its check: tuning it again", shape.name())
                return False
            self.plans[shape], self.chosen[shape] = plan, algo
        self.cached.add(shape)
        return True

    def _valid(self, x: torch.Tensor, w: torch.Tensor, algo: _Algo, plan: _Plan, ref: torch.Tensor | None = None) -> bool:
        """Whether ``algo`` computes F.linear(x, w) and puts one node in a CUDA graph (see ``tune``)."""
        shape = shape_of(x, w)
        out = torch.empty(shape.m, shape.n, dtype=x.dtype, device=x.device)
        ref = F.linear(x, w) if ref is None else ref
        try:
            return (torch.allclose(self.run(x, w, out, plan, algo).float(), ref.float(), rtol=2e-2, atol=2e-2)
                    and _graph_nodes(lambda: self.run(x, w, out, plan, algo)) == 1)
        except CuBLASLtError:
            return False

    def tune(self, x: torch.Tensor, ws: list[torch.Tensor]) -> list[tuple[_Algo | None, float]]:
        """Time F.linear and each candidate over ``ws`` (weights of one shape, e.g. every layer's, so
        each call streams its weight from DRAM as in a step), outside any capture; keep the fastest
        one-kernel candidate whose result matches F.linear's. Returns (algorithm, us a call) for each
        (None: F.linear; inf: failed, wrong, or more than one kernel)."""
        ws = ws[: self.tune_layers]
        shape = shape_of(x, ws[0])
        if shape in self.timings or not all(usable(x, w) and shape_of(x, w) == shape for w in ws):
            return self.timings.get(shape, [])
        out = torch.empty(shape.m, shape.n, dtype=x.dtype, device=x.device)
        # timed on random inputs, not the caller's: a capture's warm-up step repeats one token in every row, and
        # such inputs ranked gate_up's candidates differently from decoding (bench/NOTES-kernels.md v17)
        x = _random_like(x)
        plan = self.plans[shape] = _Plan(shape)
        ref = F.linear(x, ws[0])
        cands = [None] + [h.algo for h in plan.algos(self.candidates, WORKSPACE)]
        times, best = [], (float("inf"), None)
        for algo in cands:
            def fn(w, a=algo):
                return F.linear(x, w) if a is None else self.run(x, w, out, plan, a)
            # a candidate must be one kernel: some add a memset (or a reduction kernel) to each call, whose gap
            # in a decode step (a memset's ~5 us a call at batch 32) this back-to-back timing does not show
            # (bench/NOTES-kernels.md v17); F.linear keeps its own split-K where it wins
            ok = algo is None or self._valid(x, ws[0], algo, plan, ref)
            t = _time_us(fn, ws, self.reps) if ok else float("inf")
            times.append((algo, t))
            if t < best[0]:
                best = (t, algo)
        self.chosen[shape] = best[1]
        self.timings[shape] = times
        if self.cache is not None:
            self.cache.put(shape, None if best[1] is None else list(best[1].data), best[0])
            self.cache.save()
        return times


def _random_like(x: torch.Tensor) -> torch.Tensor:
    """Normal values in x's shape and strides, from a private generator (the global CUDA one is left alone)."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).normal_(generator=gen)


def _graph_nodes(fn) -> int:
    """Operations (kernels, memsets) that ``fn`` puts in a CUDA graph."""
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph):
        fn()
    n = ctypes.c_size_t(0)
    status = _driver().cuGraphGetNodes(ctypes.c_void_p(graph.raw_cuda_graph()), None, ctypes.byref(n))
    if status:
        raise CuBLASLtError(f"cuGraphGetNodes failed: CUresult {status}")
    return n.value


_DRIVER: ctypes.CDLL | None = None


def _driver() -> ctypes.CDLL:
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = ctypes.CDLL("libcuda.so.1")
        _DRIVER.cuGraphGetNodes.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        _DRIVER.cuGraphGetNodes.restype = ctypes.c_int
    return _DRIVER


def _time_us(fn, ws: list[torch.Tensor], reps: int) -> float:
    """Median us a call: a CUDA graph of one call per weight of ``ws`` (so host launch time, which a
    ctypes call adds to, does not count: the step replays graphs too), replayed ``reps`` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for w in ws:
            fn(w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in ws:
            fn(w)
    graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2] * 1e3 / len(ws)
