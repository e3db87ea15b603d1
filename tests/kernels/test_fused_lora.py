"""LoRA folded into the norm, rotary and SiLU-mul kernels and the qkv/o/gate_up GEMMs
(kernels/fused_lora.py) against the unfused torch ops, for one adapter and for several.

Weights past each slot's rank are NaN, and so are the h entries a consumer must
not read (other adapters' positions, past a rank, rows without LoRA): a kernel
that reads them fails. Adapters sit at tail positions other than their slots.
The norm reads B's first RANK_FREE rows and h past the rank, which the engine keeps
zero: its tests put zeros there and NaN past them.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import fused_lora as fl
from kernels.fused_lora import MANY_TOKENS, MAX_TOKENS, LoRATails, LoRAWeights, norm_lora, rotary_lora_, silu_mul_lora
from kernels.fused_lora_dense import ExpandTails, fits, silu_mul_lora_dense
from kernels.fused_lora_torch import norm_lora_ref, rotary_lora_ref, shrink_ref, silu_mul_lora_ref
from kernels.lora_meta import LoRAMeta

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
SLOTS = 5
ADAPTERS = [1, 3]           # adapters a step
GRIDS = ["segments", "rows", "blocks"]  # rotary and SiLU-mul: a program per segment, per-row gathers, segment blocks
RANKS = [16, 64] if CUDA else [8, 24]       # 24: the per-row kernels loop over ranks in chunks of 16
# hidden, heads, kv heads, head_dim, intermediate, tokens; CPU shapes stay small for the interpreter
SHAPES = [(96, 2, 1, 32, 200, 5), (64, 2, 1, 16, 136, 19)] if not CUDA else \
    [(4096, 32, 8, 128, 14336, 32), (4096, 32, 8, 128, 14336, 64), (4096, 32, 8, 128, 14336, 7)]


def family(n_in, widths, ranks, max_rank, dtype, zero_below=0):
    """Random stacked slots; entries past each slot's rank are NaN, except B's rows below ``zero_below``: 0."""
    slots, n = len(ranks), len(widths)
    a = (torch.randn(slots, n, max_rank, n_in, device=DEV) / n_in ** 0.5)
    b = (torch.randn(slots, max_rank, sum(widths), device=DEV) / max_rank ** 0.5)
    r = torch.tensor(ranks, dtype=torch.int32).reshape(slots, n)
    offs = [0] + torch.tensor(widths).cumsum(0).tolist()
    for s in range(slots):
        for i in range(n):
            a[s, i, r[s, i]:] = float("nan")
            b[s, r[s, i]:, offs[i]:offs[i + 1]] = float("nan")
            b[s, r[s, i]:zero_below, offs[i]:offs[i + 1]] = 0.0
    return LoRAWeights(a.to(dtype), b.to(dtype), r.to(DEV), (torch.rand(slots, n, device=DEV) + 0.5).float())


def ranks_for(n_slices, max_rank):
    """Mixed ranks across slices: full, small, untargeted, odd."""
    pattern = [max_rank, max(1, max_rank // 4), 0, 5 % max_rank or 1]
    return [[pattern[(s + i) % 4] for i in range(n_slices)] for s in range(SLOTS)]


def poison(h, fam, slots, tail_pos, past_rank=float("nan")):
    """h [parts, T, positions, n_slices, R] as a consumer gets it: NaN everywhere a token must not read
    (other positions, rows without LoRA), and ``past_rank`` past its rank in its own position (the engine's
    zeros there: the norm reads them). Positions with stride 0 are per token already."""
    h = h.clone()
    own = [tail_pos[s] if h.stride(2) else 0 for s in slots]
    for t, s in enumerate(slots):
        for pos in range(h.shape[2]):
            for i in range(h.shape[3]):
                if s >= 0 and pos == own[t]:
                    h[:, t, pos, i, int(fam.ranks[s, i]):] = past_rank
                else:
                    h[:, t, pos, i] = float("nan")
    return h


def token_mix(t, adapters):
    """``adapters`` adapters (never slot 0 alone, so the slot index matters) with rows without LoRA among
    their rows, and a tail position for every slot that is not the slot itself."""
    slots = (torch.randperm(SLOTS - 1)[:adapters] + 1).tolist()
    mix = [-1 if i == 0 or i % 7 == 3 else slots[i % adapters] for i in range(t)]
    tail_pos = torch.randperm(SLOTS).tolist()
    meta = LoRAMeta.allocate(t + 2, SLOTS + 2, DEV).fill(mix)     # capacity above the step: a graph's buffers
    return mix, meta, tail_pos, torch.tensor(tail_pos + [-7] * 2, dtype=torch.int32, device=DEV)


def gemm_h(x, fam, mix, tail_pos, n_out, past_rank=float("nan")):
    """(projection, h) from a GEMM over a weight with every slot's A at its tail position; h poisoned
    (``poison``)."""
    n_slices, max_rank = fam.lora_a.shape[1], fam.lora_a.shape[2]
    tails = LoRATails(n_slices, max_rank, SLOTS)
    tails.add((torch.randn(n_out, x.shape[1], device=DEV) / x.shape[1] ** 0.5).to(x.dtype))
    for s in range(SLOTS):
        tails.a_rows(0, tail_pos[s]).copy_(fam.lora_a[s].nan_to_num(0.0))
    y, h = tails.split(F.linear(x, *tails.weight(0, SLOTS)))
    ref_h = h.clone()
    h.copy_(poison(h, fam, mix, tail_pos, past_rank))            # writes through into y's extra columns
    return y, h, ref_h


def parts_h(parts):
    """[n, T, R] float32 partials -> the [n, T, 1 (stride 0), 1, R] view norm_lora takes."""
    return parts.as_strided((parts.shape[0], parts.shape[1], 1, 1, parts.shape[2]),
                            (parts.stride(0), parts.stride(1), 0, parts.shape[2], 1))


@pytest.mark.parametrize("adapters", ADAPTERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
@pytest.mark.parametrize("max_rank", RANKS)
def test_norm_lora_expand_from_parts(seed, rel_err, adapters, dtype, hidden, hq, hk, d, inter, t, max_rank):
    """The input norm: expand of the previous down from SiLU-mul's float32 parts, residual, norm."""
    mix, meta, tail_pos, _ = token_mix(t, adapters)
    f_d = family(inter, [hidden], ranks_for(1, max_rank), max_rank, dtype, zero_below=fl.RANK_FREE)
    x = torch.randn(t, hidden, device=DEV).to(dtype)
    res = torch.randn(t, hidden, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    parts = parts_h(torch.stack([shrink_ref(torch.randn(t, inter, device=DEV).to(dtype), f_d, mix)[0]
                                 for _ in range(5)]))
    out, s = norm_lora(x, res, w, 1e-6, meta, poison(parts, f_d, mix, tail_pos, 0.0), f_d)
    ref_out, ref_s = norm_lora_ref(x, res, w, 1e-6, mix, parts, f_d)
    assert rel_err(s, ref_s) <= TOL[dtype] and rel_err(out, ref_out) <= TOL[dtype]
    none = [i for i, sl in enumerate(mix) if sl < 0]
    assert torch.equal(s[none], x[none] + res[none]), "rows without LoRA must be the plain residual add"


@pytest.mark.parametrize("adapters", ADAPTERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_lora_expand_from_gemm_columns(seed, rel_err, adapters, dtype):
    """The post-attention norm: expand of o from the o GEMM's extra columns (model dtype, a strided view), each
    row's position gathered from ``tail_pos`` or given per row as the engine stages it (``row_pos``); with one
    adapter at one position, neither."""
    hidden, t, r = (96, 9, 8) if not CUDA else (4096, 8, 16)
    mix, meta, tail_pos, tail_pos_dev = token_mix(t, adapters)
    f_o = family(hidden, [hidden], ranks_for(1, r), r, dtype, zero_below=fl.RANK_FREE)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    x, h, ref_h = gemm_h(torch.randn(t, hidden, device=DEV).to(dtype), f_o, mix, tail_pos, hidden, 0.0)
    row_pos = torch.tensor([tail_pos[s] if s >= 0 else -1 for s in mix] + [-7], dtype=torch.int32, device=DEV)
    for res in (torch.randn(t, hidden, device=DEV).to(dtype), None):      # without a residual: s = x + expand
        ref_out, ref_s = norm_lora_ref(x, res, w, 1e-6, mix, ref_h, f_o, tail_pos)
        for pos in ({"tail_pos": tail_pos_dev}, {"row_pos": row_pos}):
            out, s = norm_lora(x, res, w, 1e-6, meta, h, f_o, **pos)
            assert rel_err(s, ref_s) <= TOL[dtype] and rel_err(out, ref_out) <= TOL[dtype], list(pos)
    if adapters == 1:              # slot 1 (rank r / 4) at position 0: h cut to it, read without a position
        mix = [1 if s >= 0 else -1 for s in mix]
        meta = LoRAMeta.allocate(t, SLOTS, DEV).fill(mix)
        at = [1, 0] + list(range(2, SLOTS))
        x, h, ref_h = gemm_h(torch.randn(t, hidden, device=DEV).to(dtype), f_o, mix, at, hidden, 0.0)
        res = torch.randn(t, hidden, device=DEV).to(dtype)
        out, s = norm_lora(x, res, w, 1e-6, meta, h[:, :, :1], f_o)
        ref_out, ref_s = norm_lora_ref(x, res, w, 1e-6, mix, ref_h, f_o, at)
        assert rel_err(s, ref_s) <= TOL[dtype] and rel_err(out, ref_out) <= TOL[dtype]


@pytest.mark.parametrize("adapters", ADAPTERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_lora_past_many_rows(seed, rel_err, adapters, dtype):
    """Past NORM_MANY_TOKENS rows the norm launches with NORM_MANY (B in more rank chunks, a register cap on the
    GPU); the same step with NORM's parameters forced must match the reference too."""
    hidden, r = (96, 16) if not CUDA else (4096, 16)
    t = fl.NORM_MANY_TOKENS + 5
    mix, meta, tail_pos, tail_pos_dev = token_mix(t, adapters)
    f_o = family(hidden, [hidden], ranks_for(1, r), r, dtype, zero_below=fl.RANK_FREE)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    x, h, ref_h = gemm_h(torch.randn(t, hidden, device=DEV).to(dtype), f_o, mix, tail_pos, hidden, 0.0)
    res = torch.randn(t, hidden, device=DEV).to(dtype)
    ref_out, ref_s = norm_lora_ref(x, res, w, 1e-6, mix, ref_h, f_o, tail_pos)
    for launch in ({}, {"num_warps": fl.NORM[0], "rank_chunk": fl.NORM[1], "maxnreg": 0}):
        out, s = norm_lora(x, res, w, 1e-6, meta, h, f_o, tail_pos_dev, **launch)
        assert rel_err(s, ref_s) <= TOL[dtype] and rel_err(out, ref_out) <= TOL[dtype], launch


def test_one_adapter_rotary_takes_segments_past_many_tokens():
    """Rotary with one tail position takes the segment grid past MANY_TOKENS (rows straight, FEW_ROWS a program);
    with more positions, and SiLU-mul always, the segment blocks. The grid follows h's shape, not the step's
    adapters, so a captured graph keeps it."""
    t = MANY_TOKENS + 1
    meta = LoRAMeta.allocate(t, SLOTS, DEV).fill([1] * t)
    one, two = torch.empty(1, t, 1, 3, 8, device=DEV), torch.empty(1, t, 2, 3, 8, device=DEV)
    assert fl._grid(meta, one, t, "rotary", None) == ("segments", 1, fl.FEW_ROWS["rotary", "segments"])
    assert fl._grid(meta, two, t, "rotary", None)[0] == "blocks"
    assert fl._grid(meta, one, t, "silu", None)[0] == "blocks"
    assert fl._grid(meta, one, MANY_TOKENS, "rotary", None)[0] == "segments"


def rotary_tables(d, dtype):
    max_pos = 64
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    emb = torch.outer(torch.arange(max_pos, device=DEV).float(), inv).repeat(1, 2)
    return emb.cos().to(dtype), emb.sin().to(dtype), max_pos


@pytest.mark.parametrize("adapters", ADAPTERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
@pytest.mark.parametrize("max_rank", RANKS)
@pytest.mark.parametrize("grid", GRIDS)
def test_rotary_lora_from_gemm_columns(seed, rel_err, adapters, dtype, hidden, hq, hk, d, inter, t, max_rank, grid):
    check_rotary(rel_err, adapters, dtype, hidden, hq, hk, d, t, max_rank, grid)


def check_rotary(rel_err, adapters, dtype, hidden, hq, hk, d, t, max_rank, grid):
    """Rotary reads h and B unmasked by the rank up to RANK_FREE, like the norm: zeros there, NaN past. Each row's
    position gathered from ``tail_pos``, or given per row (``row_pos``: the blocks grid reads ``tail_pos``)."""
    mix, meta, tail_pos, tail_pos_dev = token_mix(t, adapters)
    f = family(hidden, [hq * d, hk * d, hk * d], ranks_for(3, max_rank), max_rank, dtype, zero_below=fl.RANK_FREE)
    qkv, h, ref_h = gemm_h(torch.randn(t, hidden, device=DEV).to(dtype), f, mix, tail_pos, f.lora_b.shape[2], 0.0)
    cos, sin, max_pos = rotary_tables(d, dtype)
    pos = torch.randint(0, max_pos, (t,), device=DEV)
    ref = rotary_lora_ref(qkv.clone(), ref_h, f, cos, sin, pos, mix, hq, hk, tail_pos)
    row_pos = torch.tensor([tail_pos[s] if s >= 0 else -1 for s in mix], dtype=torch.int32, device=DEV)
    for where in ({}, {"row_pos": row_pos}):
        out = qkv.clone()
        rotary_lora_(out, h, f, cos, sin, pos, meta, hq, hk, tail_pos_dev, grid=grid, **where)
        assert rel_err(out, ref) <= TOL[dtype] * 2, list(where)


@pytest.mark.parametrize("adapters", ADAPTERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES)
@pytest.mark.parametrize("max_rank", RANKS)
@pytest.mark.parametrize("grid", GRIDS)
def test_silu_mul_lora(seed, rel_err, adapters, dtype, hidden, hq, hk, d, inter, t, max_rank, grid):
    """gate/up's h from the gate_up GEMM's extra columns; down's shrink as per-tile parts."""
    check_silu_mul(rel_err, adapters, dtype, hidden, inter, t, max_rank, grid)


def check_silu_mul(rel_err, adapters, dtype, hidden, inter, t, max_rank, grid):
    mix, meta, tail_pos, tail_pos_dev = token_mix(t, adapters)
    f_gu = family(hidden, [inter, inter], ranks_for(2, max_rank), max_rank, dtype)
    f_d = family(inter, [hidden], ranks_for(1, max_rank), max_rank, dtype)
    gu, h, ref_h = gemm_h(torch.randn(t, hidden, device=DEV).to(dtype), f_gu, mix, tail_pos, 2 * inter)
    ref_gu = gu.clone()
    act, parts = silu_mul_lora(gu, meta, h, f_gu, f_d, tail_pos_dev, grid=grid)
    ref_act, ref_hd = silu_mul_lora_ref(ref_gu, mix, expand=(ref_h, f_gu), shrink=f_d, tail_pos=tail_pos)
    assert rel_err(act, ref_act) <= TOL[dtype] * 2
    assert parts.shape[0] > 1, "several column tiles, so the parts really are summed"
    assert parts.shape[2:4] == (1, 1) and parts.stride(2) == 0, "the parts are per token: no positions"
    assert rel_err(parts.sum(0)[None, :, 0, 0, :max_rank], ref_hd) <= TOL[dtype] * 2
    # rows a program: a count the grid cannot take is refused; 16 splits the CPU's steps of 19 tokens in two
    if grid in ("segments", "rows"):
        with pytest.raises(ValueError, match="block_m must be"):
            silu_mul_lora(gu, meta, h, f_gu, f_d, tail_pos_dev, grid=grid, block_m=12)
        act16, parts16 = silu_mul_lora(gu, meta, h, f_gu, f_d, tail_pos_dev, grid=grid, block_m=16)
        assert rel_err(act16, ref_act) <= TOL[dtype] * 2
        assert rel_err(parts16.sum(0)[None, :, 0, 0, :max_rank], ref_hd) <= TOL[dtype] * 2
    act2, none = silu_mul_lora(gu, meta, h, f_gu, None, tail_pos_dev, grid=grid)   # down's shrink elsewhere
    assert none is None and rel_err(act2, ref_act) <= TOL[dtype] * 2       # (its own tile and warps: not bitwise)


@pytest.mark.parametrize("adapters", [1, 3, SLOTS - 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, hq, hk, d, inter, t", SHAPES[:2])
@pytest.mark.parametrize("max_rank", RANKS)
def test_silu_mul_lora_dense(seed, rel_err, adapters, dtype, hidden, hq, hk, d, inter, t, max_rank):
    """gate/up's expand as one product against the B tails: every slot's B staged at its tail position (rows
    past its rank as the slots leave them: finite), h NaN wherever a row must not read it."""
    mix, meta, tail_pos, tail_pos_dev = token_mix(t, adapters)
    f_gu = family(hidden, [inter, inter], ranks_for(2, max_rank), max_rank, dtype)
    f_d = family(inter, [hidden], ranks_for(1, max_rank), max_rank, dtype)
    gu, h, ref_h = gemm_h(torch.randn(t, hidden, device=DEV).to(dtype), f_gu, mix, tail_pos, 2 * inter)
    b_tails = ExpandTails(1, SLOTS + 1, max_rank, 2 * inter, dtype, DEV)      # a position past the slots: unused
    b_tails.b[0].normal_()
    for slot in range(SLOTS):
        b_tails.rows(0, tail_pos[slot]).copy_(f_gu.lora_b[slot].nan_to_num(1e3))
    ref_act, ref_hd = silu_mul_lora_ref(gu.clone(), mix, expand=(ref_h, f_gu), shrink=f_d, tail_pos=tail_pos)
    h = h[:, :, :SLOTS]                     # k positions of h, more of the tails
    if not fits(SLOTS, max_rank, t, dtype):
        with pytest.raises(ValueError, match="too large for shared memory"):
            silu_mul_lora_dense(gu, meta, h, f_gu, None, tail_pos_dev, b_tails.b[0])
        return
    for down in (f_d, None):
        act, parts = silu_mul_lora_dense(gu, meta, h, f_gu, down, tail_pos_dev, b_tails.b[0])
        assert rel_err(act, ref_act) <= TOL[dtype] * 2
        assert (parts is None) == (down is None)
        if down is not None:
            assert parts.shape[0] > 1 and rel_err(parts.sum(0)[None, :, 0, 0, :max_rank], ref_hd) <= TOL[dtype] * 2
    with pytest.raises(ValueError, match="b_tail must be"):
        silu_mul_lora_dense(gu, meta, h, f_gu, None, tail_pos_dev, b_tails.b[0][: max_rank * (SLOTS - 1)])
    with pytest.raises(ValueError, match="position must be in"):
        b_tails.rows(0, SLOTS + 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_lora_dense_past_many_tokens(seed, rel_err, dtype):
    """Past MANY_TOKENS one-adapter steps keep the dense expand, on its wider tiles (row blocks with a masked
    tail, rows without LoRA); steps of two positions there do not take it."""
    from kernels.fused_lora import MANY_TOKENS
    from kernels.fused_lora_dense import takes
    hidden, inter, max_rank, t = 64, 200, RANKS[0], MANY_TOKENS + 7
    mix, meta, tail_pos, tail_pos_dev = token_mix(t, 1)
    assert takes(1, max_rank, t, dtype) and not takes(2, max_rank, t, dtype) and takes(2, max_rank, MANY_TOKENS, dtype)
    f_gu = family(hidden, [inter, inter], ranks_for(2, max_rank), max_rank, dtype)
    gu, h, ref_h = gemm_h(torch.randn(t, hidden, device=DEV).to(dtype), f_gu, mix, tail_pos, 2 * inter)
    b_tails = ExpandTails(1, SLOTS, max_rank, 2 * inter, dtype, DEV)
    b_tails.b[0].normal_()
    for slot in range(SLOTS):
        b_tails.rows(0, tail_pos[slot]).copy_(f_gu.lora_b[slot].nan_to_num(1e3))
    ref_act, _ = silu_mul_lora_ref(gu.clone(), mix, expand=(ref_h, f_gu), tail_pos=tail_pos)
    act, none = silu_mul_lora_dense(gu, meta, h[:, :, :SLOTS], f_gu, None, tail_pos_dev, b_tails.b[0])
    assert none is None and rel_err(act, ref_act) <= TOL[dtype] * 2


@pytest.mark.parametrize("adapters", ADAPTERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", [None, "segments", "blocks"])
def test_steps_past_many_tokens(seed, rel_err, adapters, dtype, grid):
    """Past MANY_TOKENS, rotary and SiLU-mul take the step in blocks of rows: by default the step's segment
    blocks (each segment's last partial, and blocks of the rows without LoRA); forced to "segments", a program
    per segment over blocks of ROW_BLOCK rows, the last partial."""
    hidden, hq, hk, d, inter, _ = SHAPES[0]
    t = MANY_TOKENS + 7 if not CUDA else MAX_TOKENS
    check_rotary(rel_err, adapters, dtype, hidden, hq, hk, d, t, RANKS[-1], grid)
    check_silu_mul(rel_err, adapters, dtype, hidden, inter, t, RANKS[-1], grid)


@pytest.mark.parametrize("pad", [64, 128])
def test_tails_hold_the_base_weight_and_several_adapters(seed, rel_err, pad):
    n_out, n_in, t, r = 40, 24, 3, 8
    w = [torch.randn(n_out, n_in, device=DEV) for _ in range(2)]
    bias = [torch.randn(n_out, device=DEV), None]
    tails = LoRATails(3, r, positions=4, pad=pad)
    base = [tails.add(wi, b) for wi, b in zip(w, bias)]
    assert torch.equal(base[1], w[1]) and base[1].data_ptr() == tails.ext[1].data_ptr()
    a = torch.randn(4, 3, r, n_in, device=DEV)
    for p in range(4):
        tails.a_rows(1, p).copy_(a[p])
    x = torch.randn(t, n_in, device=DEV)
    for k in (1, 2, 4):                 # a GEMM over the first k positions reads only their rows
        wk, bk = tails.weight(1, k)
        assert bk is None and wk.shape[0] == n_out + tails.rows(k) and tails.rows(k) % pad == 0
        y, h = tails.split(F.linear(x, wk, bk))
        assert h.shape[:4] == (1, t, tails.rows(k) // (3 * r), 3) and h.shape[2] >= k
        assert rel_err(y, x @ w[1].T) <= 1e-6
        assert rel_err(h[0, :, :k], torch.einsum("tc,pirc->tpir", x, a[:k])) <= 1e-6
        _, hk = tails.split(F.linear(x, wk, bk), k)      # h cut to the step's k positions: the same values
        assert hk.shape[2] == k and torch.equal(hk, h[:, :, :k])
        with pytest.raises(ValueError, match="tail positions"):
            tails.split(F.linear(x, wk, bk), h.shape[2] + 1)
    # more rows than the positions need (a faster GEMM shape): the same projection and h, up to the tails' end
    wk, _ = tails.weight(1, 1, min_rows=2 * 3 * r)
    assert wk.shape[0] == n_out + max(tails.rows(1), 2 * 3 * r)
    y, h = tails.split(F.linear(x, wk), 1)
    assert rel_err(y, x @ w[1].T) <= 1e-6 and rel_err(h[0, :, :1], torch.einsum("tc,pirc->tpir", x, a[:1])) <= 1e-6
    assert tails.weight(1, 1, min_rows=10 ** 6)[0].shape[0] == n_out + tails.extra
    y0, _ = tails.split(F.linear(x, *tails.weight(0, 4)))
    assert rel_err(y0, x @ w[0].T + bias[0]) <= 1e-6
    with pytest.raises(ValueError, match="every layer"):
        tails.add(torch.randn(n_out + 1, n_in, device=DEV))
    with pytest.raises(ValueError, match="positions must be in"):
        tails.weight(0, 5)


def test_bad_inputs(seed):
    f = family(16, [16], [[4]] * SLOTS, 4, torch.float32)
    _, meta, _, tail_pos = token_mix(3, 1)
    x = torch.randn(3, 16, device=DEV)
    w = torch.ones(16, device=DEV)
    h = torch.zeros(1, 3, 2, 1, 4, device=DEV)
    big = MAX_TOKENS + 1
    with pytest.raises(ValueError, match="at most"):
        norm_lora(torch.randn(big, 16, device=DEV), None, w, 1e-6, LoRAMeta.allocate(big, 2, DEV).fill([0] * big),
                  torch.zeros(1, big, 1, 1, 4, device=DEV), f, tail_pos)
    with pytest.raises(ValueError, match="h must be"):
        norm_lora(x, None, w, 1e-6, meta, torch.zeros(1, 3, 4, device=DEV), f, tail_pos)
    with pytest.raises(ValueError, match="needs tail_pos"):
        norm_lora(x, None, w, 1e-6, meta, h, f)
    with pytest.raises(ValueError, match="row_pos must be int32"):
        norm_lora(x, None, w, 1e-6, meta, h, f, row_pos=torch.zeros(2, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="lora_b"):
        norm_lora(torch.randn(3, 15, device=DEV), None, torch.ones(15, device=DEV), 1e-6, meta, h, f, tail_pos)
    with pytest.raises(ValueError, match="heads"):
        rotary_lora_(torch.randn(3, 30, device=DEV), torch.zeros(1, 3, 1, 3, 4, device=DEV), f,
                     torch.ones(4, 2, device=DEV), torch.ones(4, 2, device=DEV), torch.zeros(3, device=DEV), meta, 2, 2,
                     tail_pos)
    f_gu = family(16, [8, 8], [[4, 4]] * SLOTS, 4, torch.float32)
    f_d = family(8, [16], [[4]] * SLOTS, 4, torch.float32)
    _, meta3, _, tail_pos = token_mix(7, 3)
    with pytest.raises(ValueError, match="3 adapters in the step but h holds 2 tail positions"):
        silu_mul_lora(torch.randn(7, 16, device=DEV), meta3, torch.zeros(1, 7, 2, 2, 4, device=DEV), f_gu, f_d,
                      tail_pos)
    with pytest.raises(ValueError, match="grid must be"):
        silu_mul_lora(torch.randn(7, 16, device=DEV), meta3, torch.zeros(1, 7, 4, 2, 4, device=DEV), f_gu, f_d,
                      tail_pos, grid="tiles")
