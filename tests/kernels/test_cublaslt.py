"""cuBLASLt GEMMs on timed algorithms (kernels/cublaslt.py) against F.linear in fp32.

The GPU tests run on the lent machine; on CPU only the path's own refusals run (every CPU tensor
goes to F.linear).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.cublaslt import CuBLASLtError, LtGemm, Shape, TuningCache, _graph_nodes, _Plan, shape_of, usable
from worker.config import EngineConfig
from worker.errors import OpenLoRAError

gpu = pytest.mark.gpu


def test_cpu_and_float32_operands_are_not_taken():
    x, w = torch.randn(4, 64), torch.randn(96, 64)
    assert not usable(x, w)
    assert not usable(x.bfloat16(), w.bfloat16())


def test_tuned_gemms_must_be_a_bool():
    with pytest.raises(OpenLoRAError, match="tuned_gemms"):
        EngineConfig(tuned_gemms="yes")


def test_gemm_tuning_cache_must_be_a_path():
    with pytest.raises(OpenLoRAError, match="gemm_tuning_cache"):
        EngineConfig(gemm_tuning_cache=None)


SHAPE = Shape(32, 4224, 4096, 4096, 4096, torch.bfloat16)
ALGO = [1, 2 ** 64 - 1, 0, 7, 8, 9, 10, 11]


def test_tuning_cache_keeps_choices_per_environment(tmp_path):
    """Choices survive a reload for their GPU / library only; a save keeps other environments' entries and
    merges with what another process wrote meanwhile."""
    path = tmp_path / "sub" / "cublaslt.json"
    a = TuningCache(path, "H100 / 130000")
    assert a.get(SHAPE) is TuningCache.MISSING
    a.put(SHAPE, ALGO, 85.4)
    a.put(Shape(1, 6144, 4096, 4096, 4096, torch.float16), None, 12.0)
    other = TuningCache(path, "H200 / 130000")
    a.save()
    other.put(SHAPE, [5] * 8, float("inf"))
    other.save()
    again = TuningCache(path, "H100 / 130000")
    assert again.get(SHAPE) == ALGO
    assert again.get(Shape(1, 6144, 4096, 4096, 4096, torch.float16)) is None       # F.linear won
    assert again.get(Shape(1, 6144, 4096, 4096, 4096, torch.bfloat16)) is TuningCache.MISSING
    assert TuningCache(path, "H200 / 130000").get(SHAPE) == [5] * 8
    assert TuningCache(path, "H100 / 120000").get(SHAPE) is TuningCache.MISSING


@pytest.mark.parametrize("text, warned", [
    ("{not json", True), ('{"version": 0, "entries": {}}', True), ("[1, 2]", True),
    ('{"version": 1, "entries": {"env": {"%s": {"algo": [1, 2]}}}}' % SHAPE.name(), False),
    ('{"version": 1, "entries": {"env": {"%s": {"algo": [-1, 0, 0, 0, 0, 0, 0, 0]}}}}' % SHAPE.name(), False)])
def test_a_damaged_tuning_cache_counts_as_empty(tmp_path, caplog, text, warned):
    """A file that is not the format is logged and ignored; an entry that is not an algorithm is tuned again."""
    path = tmp_path / "cublaslt.json"
    path.write_text(text)
    cache = TuningCache(path, "env")
    assert cache.get(SHAPE) is TuningCache.MISSING
    assert ("tuning afresh" in caplog.text) == warned
    cache.put(SHAPE, ALGO, 1.0)
    cache.save()                                      # replaces the damaged file
    assert TuningCache(path, "env").get(SHAPE) == ALGO


def test_an_unwritable_tuning_cache_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = TuningCache(blocker / "cublaslt.json", "env")        # its folder would be a file
    cache.put(SHAPE, ALGO, 1.0)
    cache.save()
    assert "not written" in caplog.text
    assert cache.get(SHAPE) == ALGO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    folder = tmp_path / "taken"
    (folder / "cublaslt.json").mkdir(parents=True)                 # the file's name is a folder: replace fails
    cache = TuningCache(folder / "cublaslt.json", "env")
    cache.put(SHAPE, ALGO, 1.0)
    cache.save()
    assert [p.name for p in folder.iterdir()] == ["cublaslt.json"]  # no temporary file left behind


def _close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = F.linear(x.float(), w.float())
    err = (got.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err < 2e-2, err


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, k", [(1, 4160, 4096), (7, 6144, 4096), (32, 28800, 4096), (32, 4224, 14336),
                                     (256, 4864, 4096), (19, 200, 136)])
def test_every_candidate_matches_linear(m, n, k, dtype, seed):
    """Each of the heuristic's candidates computes x @ w.T (masked tails: n, m, k off the tile sizes; a fresh
    poisoned output each time, so an unwritten element fails), and ``linear`` runs the winner."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5 for _ in range(3)]
    gemm = LtGemm("cuda", candidates=8, tune_layers=3, reps=3)
    times = gemm.tune(x, ws)
    assert times and times[0][0] is None and len(times) >= 2
    shape = shape_of(x, ws[0])
    plan: _Plan = gemm.plans[shape]
    ran = 0
    for algo, _ in times[1:]:
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        try:
            gemm.run(x, ws[1], out, plan, algo)
        except CuBLASLtError:
            continue
        _close(out, x, ws[1])
        ran += 1
    assert ran
    pick = gemm.chosen[shape]
    if pick is not None:                             # a chosen candidate is one kernel, nothing around it
        assert _graph_nodes(lambda: gemm.run(x, ws[2], torch.empty(m, n, device="cuda", dtype=dtype), plan, pick)) == 1
    _close(gemm.linear(x, ws[2]), x, ws[2])


@gpu
def test_tuned_linear_replays_in_a_graph_with_new_inputs(seed):
    m, n, k = 32, 28800, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    gemm = LtGemm("cuda", reps=3)
    gemm.tuning = True
    gemm.linear(x, w)                                # tunes on the eager call
    gemm.tuning = False
    assert shape_of(x, w) in gemm.chosen
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gemm.linear(x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemm.linear(x, w)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        y.fill_(float("nan"))
        graph.replay()
        _close(y, x, w)


@gpu
def test_operands_off_the_path_fall_back_to_linear(seed):
    """A misaligned view, a column-strided weight and fp32 go to F.linear, and still compute x @ w.T."""
    gemm = LtGemm("cuda", reps=3)
    gemm.tuning = True
    flat = torch.randn(32 * 512 + 8, device="cuda", dtype=torch.bfloat16)
    base = flat[:32 * 512].view(32, 512)
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    for x, ww in ((flat[8:].view(32, 512), w), (base, w.t().contiguous().t()), (base.float(), w.float())):
        assert not usable(x, ww)
        _close(gemm.linear(x, ww), x, ww)
    assert not gemm.chosen


@gpu
def test_a_cached_choice_is_checked_not_timed(seed, tmp_path):
    """A second LtGemm on the same cache file takes the first one's algorithm without timing the candidates,
    and computes x @ w.T with it."""
    m, n, k = 32, 4224, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    path = tmp_path / "cublaslt.json"
    first = LtGemm("cuda", reps=3, cache=path)
    first.tuning = True
    first.linear(x, w)
    shape = shape_of(x, w)
    assert shape in first.timings and path.exists()
    second = LtGemm("cuda", reps=3, cache=path)
    second.tuning = True
    _close(second.linear(x, w), x, w)
    assert shape in second.cached and shape not in second.timings
    pick, again = first.chosen[shape], second.chosen[shape]
    assert (pick is None and again is None) or list(pick.data) == list(again.data)
