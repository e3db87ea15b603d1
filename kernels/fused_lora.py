"""LoRA folded into a decode step's own kernels: no LoRA launch at all.

A decode step applies LoRA 4 times a layer (qkv, o, gate_up, down); as separate
shrink and expand kernels that is 8 launches a layer, and at batch 32 their fixed
latency, not their bytes, is what LoRA costs (bench/NOTES-kernels.md). For a step
of few tokens, every shrink and expand rides in a kernel the step runs anyway:

    qkv GEMM     shrink of q, k, v: the step's adapters' A rows sit under the base weight
                 (``LoRATails``, one block of rows per adapter), so the GEMM's extra output
                 columns are h for every token against every staged adapter
    rotary       expand of q, k, v (each token reads its own adapter's h and B), then rotary, in place
    o GEMM       shrink of o, the same way
    post norm    expand of o, + residual, w * rmsnorm (one row a program)
    gate_up GEMM shrink of gate and up, the same way
    SiLU-mul     expand of gate/up, silu(g) * u, shrink of down (a partial per column tile)
    input norm   expand of the previous down (summing those partials), + residual, w * rmsnorm

(The engine may put down's A rows under its GEMM too, and the input norm then expands from its
columns: it passes no ``down_fam`` to SiLU-mul; ``LlamaModel.down_in_gemm`` says for which steps.)

So LoRA costs its bytes, once each: the GEMMs read each staged A once, and each
token's B is read by the kernel that handles the token. Why these places
(bench/NOTES-kernels.md, batch 32 on the H100): 64 extra rows cost cuBLAS 0.3-1.7 us
under qkv, o and gate_up but 3 us under down, whose shrink therefore may run in
SiLU-mul, the kernel that makes its input (for which steps: ``LlamaModel.down_in_gemm``); a norm that also shrank gate/up took
8.3 us against 4.4 us for expand alone (one row a program reads its whole A).

h is a strided view ``[parts, T, positions, n_slices, >= max_rank]`` summed over
parts; token t uses position ``tail_pos[slot(t)]``: a GEMM's extra columns (model
dtype, one part; ``LoRATails.split``) or SiLU-mul's per-tile partials (float32, many
parts, stride 0 along positions: they are per token already). Nothing is accumulated
atomically, so no buffer needs zeroing.

Rotary and SiLU-mul run, for a step of few adapters, one program per (head or column
tile, segment): the segment's B tiles load once and multiply on tensor cores, and the
program stores its own rows only (segment 0 also takes the rows without LoRA). With
many adapters (``SEGMENTS_MAX``) one program a head or tile does every row, each row
gathering its own adapter's B rank by rank. Steps of more than ``MANY_TOKENS`` tokens
(a batch of 256 decodes) walk the step's segment blocks (``LoRAMeta``: 16 sorted rows of
one adapter, or of rows without LoRA): a program per segment would load every row of the
step, and per-row gathers multiply rank by rank on CUDA cores. (The engine gives SiLU-mul's expand of a step of
at most 8 adapters, or past MANY_TOKENS of one, to ``kernels/fused_lora_dense.py`` instead: one product against
B rows staged per position.)

Semantics (``kernels/fused_lora_torch.py``) are those of the unfused path: the
expanded projection output is rounded to the model dtype before the op that
follows, as if ``lora_apply`` had updated it. Rows whose token has no adapter
(slot -1) get no LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fused import check_norm_args, rms_norm_loaded_row
from kernels.lora_meta import SEG_BLOCK, LoRAMeta
from kernels.mma import mma, native_dot

MAX_TOKENS = 256          # tokens a step may have
MAX_ADAPTERS = 64         # adapters a step may have: tail positions under each GEMM (64 at rank 16: 3072 rows under qkv)
MANY_TOKENS = 64          # past this, several adapters take the segment-block grid: programs per segment would
                          # each read the whole step
ROW_BLOCK = 64            # rows a rotary or SiLU-mul program takes (program_id 2 walks the step's blocks)
NATIVE_EXPAND = True      # past MANY_TOKENS tokens, rotary's and SiLU-mul's expands in the model dtype (``_native_expand``)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NORM = (8, 16)          # norm: warps, rank rows of B a tile ([16, hidden]; tuned on the H100)
# h from a GEMM's columns (not SiLU-mul's parts): 16 warps, 0.15-0.4 us a call less at 32-128 tokens in every workload
# (one adapter at 32 tokens 4.23 against 4.40); from the parts it lost 0.1-0.2 (bench/NOTES-kernels.md v19)
NORM_COLUMNS = (16, 16)
# Past NORM_MANY_TOKENS rows (more than the H100's 132 SMs), the norm's programs come in waves, and at 247 registers a
# thread NORM's 8 warps fit one program an SM: (warps, rank rows, register cap) then 7.18 against 7.75 us a call at
# 256 tokens with one adapter, 7.83 against 9.72 with 16, 6.95 against 8.80 at 192 tokens (bench/NOTES-kernels.md v19)
NORM_MANY = (8, 8, 128)
NORM_MANY_TOKENS = 128
# SiLU-mul (columns a program, warps) by (grid, whether it shrinks down); tuned on the H100 (bench/NOTES-kernels.md)
SILU = {("segments", True): (64, 2), ("rows", True): (64, 4), ("blocks", True): (64, 2),
        ("segments", False): (64, 4), ("rows", False): (64, 4), ("blocks", False): (128, 4)}
ROTARY_WARPS = {"segments": 4, "rows": 8, "blocks": 4}
# rows a program takes at most on the segment and per-row grids (more programs for the GPU's 132 SMs: at 32 tokens
# rotary took 5.0 us a call with 16 rows against 5.3 with 32 for one adapter, 5.1 against 6.7 at Skewed; SiLU-mul's
# per-row grid 12.8 with 8 rows against 14.3 at Skewed; bench/NOTES-kernels.md v16)
FEW_ROWS = {("rotary", "segments"): 16, ("rotary", "rows"): 16, ("silu", "segments"): 16, ("silu", "rows"): 8}
# Steps whose h holds up to this many tail positions run a program per (tile, segment); beyond, one program a
# tile gathers each row's own adapter (bench/NOTES-kernels.md v9: at 6 adapters SiLU-mul takes 13.0 us a call
# that way against 12.7 per-row, at 2 7.8 against 11.8; rotary wins up to 8 adapters, ties at 10)
SEGMENTS_MAX = {"silu": 4, "rotary": 8}
# the norm and rotary read h and B's first rank rows masked by the slots' max rank, not the slot's own (the slots hold
# zeros past it), so those loads wait on the slot or the row's position alone; the norm at 32 tokens on the H100:
# 4.26 -> 3.90 us a call with one adapter, 4.58 -> 4.21 with 6 (bench/NOTES-kernels.md v23)
RANK_FREE = tl.constexpr(16)
RANK_UNROLL = tl.constexpr(16)  # ranks a per-row loop unrolls at once (unrolled to max_rank, the rank-64 GPU tests stalled)


@dataclass
class LoRAWeights:
    """One family's stacked slots (layout of ``kernels/lora_torch.py``); the engine passes its
    ``LoRAFamily``, which has the same four tensors."""
    lora_a: torch.Tensor          # [slots, n_slices, max_rank, in]
    lora_b: torch.Tensor          # [slots, max_rank, out_total]
    ranks: torch.Tensor           # [slots, n_slices] int32
    scalings: torch.Tensor        # [slots, n_slices] float32


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _segment(seg_slot_ptr, slot_ptr, rows, row_ok):
    """(slot, own, use) of this program's segment, ``tl.program_id(1)``: its adapter slot (-1 past the
    step's segments), the rows it handles (those of its adapter; segment 0 also takes the rows without
    LoRA) and, among them, the rows with LoRA. Every row of the step is owned by exactly one segment."""
    j = tl.program_id(1)
    slot = tl.load(seg_slot_ptr + j)
    tslot = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
    use = (tslot == slot) & (tslot >= 0)
    return slot, use | tl.where(j == 0, row_ok & (tslot < 0), False), use     # (see _position)


@triton.jit
def _row_slots(slot_ptr, rows, row_ok):
    """Several adapters: each row's slot clamped to >= 0 (for addresses), and whether it has one."""
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
    return tl.maximum(slot, 0).to(tl.int64), slot >= 0


@triton.jit
def _position(tail_pos_ptr, s0, use, n_pos, PER_ROW: tl.constexpr):
    """(position, use): the tail position of the step's slot (or, PER_ROW, of each row's), and ``use``
    narrowed to rows whose position lies inside the h given (staging guarantees it; a bug then drops
    LoRA instead of reading past h)."""
    if PER_ROW:
        p = tl.load(tail_pos_ptr + s0, mask=use, other=0)
        return p, use & (p >= 0) & (p < n_pos)
    p = tl.load(tail_pos_ptr + s0)
    return p, tl.where((p >= 0) & (p < n_pos), use, False)     # (the interpreter cannot & a scalar into a vector)


@triton.jit
def _load_h(h_ptr, stride_ht, rows, use, rank, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """h[rows, :rank] as float32 [BLOCK_M, BLOCK_R]; 0 past the rank and for rows without LoRA."""
    r = tl.arange(0, BLOCK_R)
    return tl.load(h_ptr + rows[:, None] * stride_ht + r[None, :], mask=use[:, None] & (r < rank)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _expand_tile(acc, h, slot, rank, scaling, b_ptr, stride_bs, stride_br, cols, col_ok,
                 BLOCK_R: tl.constexpr, NATIVE: tl.constexpr, IEEE: tl.constexpr):
    """acc[t, cols] += scaling * h[t, :rank] @ B[slot, :rank, cols] (h already 0 where it must not count).
    NATIVE: h holds values of B's dtype (a GEMM's columns), so their product in that dtype is exact;
    scaled after."""
    r = tl.arange(0, BLOCK_R)
    b = tl.load(b_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_bs + r[:, None] * stride_br + cols[None, :],
                mask=(r < rank)[:, None] & col_ok[None, :], other=0.0)
    if NATIVE:
        return acc + scaling * mma(h.to(b.dtype), b, True, IEEE)
    return acc + mma(h * scaling, b.to(tl.float32), False, IEEE)


@triton.jit
def _expand_rank_chunk(acc, h_rows, rank, scaling, b_rows, stride_br, cols, col_ok, r0):
    """``_expand_rows`` for ranks r0 .. r0 + RANK_UNROLL - 1, unrolled (their loads issue together)."""
    for j in tl.static_range(RANK_UNROLL):
        ok = r0 + j < rank
        hr = tl.load(h_rows + r0 + j, mask=ok, other=0.0).to(tl.float32) * scaling
        b = tl.load(b_rows[:, None] + (r0 + j) * stride_br + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc += hr[:, None] * b.to(tl.float32)
    return acc


@triton.jit
def _expand_rows(acc, h_rows, rank, scaling, b_rows, stride_br, cols, col_ok, LOOP: tl.constexpr):
    """acc[t, cols] += scaling[t] * h_rows[t][:rank[t]] @ B_rows[t][:rank[t], cols]: every row its own
    adapter (h_rows, b_rows: per-row pointers; rank 0 for rows without one). Ranks in unrolled chunks
    of RANK_UNROLL; where max_rank exceeds it (LOOP), a runtime loop over chunks up to the largest rank
    among the rows (unrolling all of max_rank stalled the rank-64 GPU tests), else the one chunk
    straight (the loop cost rotary 7.5 -> 11.3 us a call with 32 rank-16 adapters;
    bench/NOTES-kernels.md v6). One copy of the chunk either way: compile time."""
    if LOOP:
        for r0 in range(0, tl.max(rank, axis=0), RANK_UNROLL):
            acc = _expand_rank_chunk(acc, h_rows, rank, scaling, b_rows, stride_br, cols, col_ok, r0)
    else:
        acc = _expand_rank_chunk(acc, h_rows, rank, scaling, b_rows, stride_br, cols, col_ok, 0)
    return acc


@triton.jit
def _shrink_rank_chunk(part, x, a_rows, stride_ar, rank, cols, col_ok, rr, r0):
    """``_shrink_rows`` for ranks r0 .. r0 + RANK_UNROLL - 1, unrolled."""
    for j in tl.static_range(RANK_UNROLL):
        a = tl.load(a_rows[:, None] + (r0 + j) * stride_ar + cols[None, :],
                    mask=(r0 + j < rank)[:, None] & col_ok[None, :], other=0.0)
        part = tl.where(rr[None, :] == r0 + j, tl.sum(x * a.to(tl.float32), axis=1)[:, None], part)
    return part


@triton.jit
def _shrink_rows(x, a_rows, stride_ar, rank, cols, col_ok, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """[BLOCK_M, BLOCK_R] float32: x[t, cols] @ A_rows[t][:rank[t], cols].T, every row its own adapter
    (ranks in chunks as in ``_expand_rows``)."""
    rr = tl.arange(0, BLOCK_R)
    part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if BLOCK_R > RANK_UNROLL:
        for r0 in range(0, tl.max(rank, axis=0), RANK_UNROLL):
            part = _shrink_rank_chunk(part, x, a_rows, stride_ar, rank, cols, col_ok, rr, r0)
    else:
        part = _shrink_rank_chunk(part, x, a_rows, stride_ar, rank, cols, col_ok, rr, 0)
    return part


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _norm_lora_kernel(x_ptr, r_ptr, w_ptr, out_ptr, s_ptr, slot_ptr, pos_ptr, h_ptr, b_ptr, rank_ptr, scal_ptr,
                      n, n_parts, n_pos, max_rank, stride_x, stride_r, stride_o, stride_s, stride_hp, stride_ht,
                      stride_hpos, stride_bs, stride_br, eps, HAS_RES: tl.constexpr, HAS_POS: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, P_P2: tl.constexpr, RC: tl.constexpr):
    """One row, its own adapter: s = x + expand + residual, out = w * rmsnorm(s).

    The LoRA loads wait on one round trip at most: h's address on the row's position (``pos_ptr``, per row;
    none with one position) and B's on the row's slot. Neither waits on the slot's rank: h and B are zero past
    it (``norm_lora``), except B's rank chunks from RANK_FREE on, which mask by the rank so that a small rank
    among large ones reads its own rows only (bench/NOTES-kernels.md v23)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cm = cols < n
    # the loads that wait on nothing go first, to overlap the LoRA ones (issued after the LoRA loads, the row
    # with h in 224 parts took 10.1 us against 5.6; bench/NOTES-kernels.md)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
    res = x
    if HAS_RES:
        res = tl.load(r_ptr + row * stride_r + cols, mask=cm, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + row)
    use = slot >= 0
    slot = tl.maximum(slot, 0).to(tl.int64)
    h_row = h_ptr + row * stride_ht
    if HAS_POS:                                  # a position outside h (a staging bug) reads position 0, unused
        pos, use = _position(pos_ptr, row, use, n_pos, False)
        h_row += tl.where(use, pos, 0) * stride_hpos
    # h summed over its parts once ([P_P2, BLOCK_R] in one load), then B in [RC, hidden] tiles
    p = tl.arange(0, P_P2)
    rr = tl.arange(0, BLOCK_R)
    hv = tl.sum(tl.load(h_row + p[:, None] * stride_hp + rr[None, :],
                        mask=(p < n_parts)[:, None] & (rr < max_rank)[None, :], other=0.0).to(tl.float32), axis=0)
    hv = tl.where(use, hv, 0.0)                  # (where, not a product: rows without LoRA may read NaN)
    hv = tl.reshape(hv * tl.load(scal_ptr + slot), (BLOCK_R // RC, RC))
    delta = tl.zeros((BLOCK,), dtype=tl.float32)
    for rc in tl.static_range(0, BLOCK_R, RC):
        r = rc + tl.arange(0, RC)
        hc = tl.sum(tl.where((tl.arange(0, BLOCK_R // RC) == rc // RC)[:, None], hv, 0.0), axis=0)
        bm = tl.where(use, r < max_rank, False)     # (the interpreter cannot & a scalar into a vector)
        if rc + RC > RANK_FREE:
            bm = bm & (r < tl.load(rank_ptr + slot))
        b = tl.load(b_ptr + slot * stride_bs + r[:, None] * stride_br + cols[None, :],
                    mask=bm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        delta += tl.sum(hc[:, None] * b, axis=0)
    x = (x + delta).to(out_ptr.dtype.element_ty).to(tl.float32)
    rms_norm_loaded_row(x, res, w, row, cols, cm, out_ptr, s_ptr, stride_o, stride_s, n, eps, HAS_RES, True)


@triton.jit
def _block(g, sorted_ptr, blk_ptr, nb, BLOCK_M: tl.constexpr):
    """(rows, row_ok, slot) of segment block g (``LoRAMeta``'s blocks, BLOCK_M = SEG_BLOCK): up to
    BLOCK_M rows of one adapter, or without LoRA (slot -1), gathered through the sorted order. ``blk_ptr``
    is blk_start; blk_end and blk_slot follow it, ``nb`` apart."""
    i = tl.load(blk_ptr + g) + tl.arange(0, BLOCK_M)
    row_ok = i < tl.load(blk_ptr + nb + g)
    return tl.load(sorted_ptr + i, mask=row_ok, other=0), row_ok, tl.load(blk_ptr + 2 * nb + g)


@triton.jit
def _rotary_load(qkv_ptr, rows, row_ok, col, dm, stride_t, HALF: tl.constexpr):
    """The head's two halves at ``rows``, as float32, and where they go back."""
    p1 = qkv_ptr + rows[:, None] * stride_t + col[None, :]
    x1 = tl.load(p1, mask=row_ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=row_ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
    return p1, x1, x2


@triton.jit
def _rotary_expand(slot, use, p, rank, rows, sl, col, dm, h_ptr, stride_ht, stride_hpos, stride_hs, scal_ptr, b_ptr,
                   stride_bs, stride_br, HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, NATIVE: tl.constexpr, IEEE: tl.constexpr):
    """The expand of slice ``sl`` for the rows ``use`` of one adapter ``slot`` at positions ``p`` (each row's,
    or the segment's), h and B masked by ``rank`` (``_free_rank``), on the head's two halves: (e1, e2)."""
    r = tl.arange(0, BLOCK_R)
    hp = h_ptr + rows * stride_ht + p * stride_hpos + sl * stride_hs
    h = tl.load(hp[:, None] + r[None, :], mask=use[:, None] & (r < rank)[None, :], other=0.0).to(tl.float32)
    scaling = tl.load(scal_ptr + tl.maximum(slot, 0) * 3 + sl)
    zero = tl.zeros((BLOCK_M, HALF_P2), dtype=tl.float32)
    e1 = _expand_tile(zero, h, slot, rank, scaling, b_ptr, stride_bs, stride_br, col, dm, BLOCK_R, NATIVE, IEEE)
    e2 = _expand_tile(zero, h, slot, rank, scaling, b_ptr, stride_bs, stride_br, col + HALF, dm, BLOCK_R, NATIVE,
                      IEEE)
    return e1, e2


@triton.jit
def _free_rank(use, rank_ptr, max_rank, BLOCK_R: tl.constexpr):
    """The rank to mask h and B by (0 where not ``use``): up to RANK_FREE, the slots' max rank, which waits on no
    load (the slots hold zeros past each rank, as the norm relies on too); past it, the slot's own at
    ``rank_ptr``, so that a small rank among large ones reads its own rows only."""
    if BLOCK_R <= RANK_FREE:
        return tl.where(use, max_rank, 0)
    return tl.where(use, tl.load(rank_ptr, mask=use, other=0), 0)


@triton.jit
def _rows_at(row_pos_ptr, rows, use, n_pos, HAS_POS: tl.constexpr):
    """(position, use) of ``rows``: the engine's per-row positions (HAS_POS), else 0 (h with one position); ``use``
    narrowed to rows whose position lies inside h (a staging bug drops LoRA instead of reading past h)."""
    if HAS_POS:
        return _position(row_pos_ptr, rows, use, n_pos, True)
    return tl.zeros_like(rows), use


@triton.jit
def _rotary_store(p1, x1, x2, e1, e2, own, rows, row_ok, hh, d, dm, pos_ptr, cos_ptr, sin_ptr, stride_c,
                  HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, dt: tl.constexpr):
    """x += e (rounded to the model dtype), rotary on q and k heads, stored for the rows ``own``."""
    m = own[:, None] & dm[None, :]
    x1 = (x1 + e1).to(dt).to(tl.float32)
    x2 = (x2 + e2).to(dt).to(tl.float32)
    if hh < HQ + HK:
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
        cos = tl.load(cos_ptr + pos[:, None] * stride_c + d[None, :], mask=m, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos[:, None] * stride_c + d[None, :], mask=m, other=0.0).to(tl.float32)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    tl.store(p1, x1.to(dt), mask=m)
    tl.store(p1 + HALF, x2.to(dt), mask=m)


@triton.jit
def _rotary_lora_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, seg_slot_ptr, tail_pos_ptr, row_pos_ptr, h_ptr,
                        b_ptr, ranks_ptr, scal_ptr, sorted_ptr, blk_count_ptr, blk_ptr, nb, T, n_pos, max_rank,
                        stride_t, stride_c, stride_ht, stride_hpos, stride_hs, stride_bs, stride_br,
                        HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr,
                        SPLIT: tl.constexpr, HAS_POS: tl.constexpr, NATIVE: tl.constexpr, IEEE: tl.constexpr):
    """One head (program_id 0: q heads, then k heads, then v heads) of one segment's rows (program_id 1),
    or, ROWS, of every row, in one block of BLOCK_M rows (program_id 2); or, BLOCKS, of the step's segment
    blocks program_id 1, + num_programs 1, ... Off the blocks grid, each row's position comes from
    ``row_pos_ptr`` (HAS_POS; else h has one) and h's and B's loads wait on that or the slot alone."""
    hh = tl.program_id(0)
    sl = (hh >= HQ).to(tl.int32) + (hh >= HQ + HK).to(tl.int32)
    d = tl.arange(0, HALF_P2)
    dm = d < HALF
    col = hh * (2 * HALF) + d
    if BLOCKS:
        for g in range(tl.program_id(1), tl.load(blk_count_ptr + 1), tl.num_programs(1)):
            rows, row_ok, slot = _block(g, sorted_ptr, blk_ptr, nb, BLOCK_M)
            p1, x1, x2 = _rotary_load(qkv_ptr, rows, row_ok, col, dm, stride_t, HALF)
            s0 = tl.maximum(slot, 0)
            p, use = _position(tail_pos_ptr, s0, tl.where(slot >= 0, row_ok, False), n_pos, False)
            rank = _free_rank(slot >= 0, ranks_ptr + s0 * 3 + sl, max_rank, BLOCK_R)
            e1, e2 = _rotary_expand(slot, use, p, rank, rows, sl, col, dm, h_ptr, stride_ht, stride_hpos, stride_hs,
                                    scal_ptr, b_ptr, stride_bs, stride_br, HALF, HALF_P2, BLOCK_M, BLOCK_R, NATIVE,
                                    IEEE)
            _rotary_store(p1, x1, x2, e1, e2, row_ok, rows, row_ok, hh, d, dm, pos_ptr, cos_ptr, sin_ptr, stride_c,
                          HQ, HK, HALF, qkv_ptr.dtype.element_ty)
    else:
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        p1, x1, x2 = _rotary_load(qkv_ptr, rows, row_ok, col, dm, stride_t, HALF)    # waits on nothing
        if ROWS:
            own = row_ok
            s0, use = _row_slots(slot_ptr, rows, row_ok)
            p, use = _rows_at(row_pos_ptr, rows, use, n_pos, HAS_POS)
            rank = _free_rank(use, ranks_ptr + s0 * 3 + sl, max_rank, BLOCK_R)
            scaling = tl.load(scal_ptr + s0 * 3 + sl, mask=use, other=0.0)
            h_rows = h_ptr + rows * stride_ht + p * stride_hpos + sl * stride_hs
            b_rows = b_ptr + s0 * stride_bs
            zero = tl.zeros((BLOCK_M, HALF_P2), dtype=tl.float32)
            e1 = _expand_rows(zero, h_rows, rank, scaling, b_rows, stride_br, col, dm, BLOCK_R > RANK_UNROLL)
            e2 = _expand_rows(zero, h_rows, rank, scaling, b_rows, stride_br, col + HALF, dm, BLOCK_R > RANK_UNROLL)
        else:
            slot, own, use = _segment(seg_slot_ptr, slot_ptr, rows, row_ok)
            if SPLIT:                                       # (a one-segment grid compiles no branch)
                if (slot < 0) & (tl.program_id(1) > 0):
                    return                                  # past the step's segments
            p, use = _rows_at(row_pos_ptr, rows, use, n_pos, HAS_POS)
            rank = _free_rank(slot >= 0, ranks_ptr + tl.maximum(slot, 0) * 3 + sl, max_rank, BLOCK_R)
            e1, e2 = _rotary_expand(slot, use, p, rank, rows, sl, col, dm, h_ptr, stride_ht, stride_hpos, stride_hs,
                                    scal_ptr, b_ptr, stride_bs, stride_br, HALF, HALF_P2, BLOCK_M, BLOCK_R, NATIVE,
                                    IEEE)
        _rotary_store(p1, x1, x2, e1, e2, own, rows, row_ok, hh, d, dm, pos_ptr, cos_ptr, sin_ptr, stride_c,
                      HQ, HK, HALF, qkv_ptr.dtype.element_ty)          # a segment's own rows only


@triton.jit
def _silu_load(gu_ptr, rows, row_ok, cols, col_ok, n, stride_g):
    """gate and up at ``rows`` and this tile's columns, as float32."""
    m = row_ok[:, None] & col_ok[None, :]
    g = tl.load(gu_ptr + rows[:, None] * stride_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
    return g, tl.load(gu_ptr + rows[:, None] * stride_g + n + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _silu_lora(g, u, slot, use, rows, cols, col_ok, n, tail_pos_ptr, n_pos, hg_ptr, stride_hgt, stride_hgpos,
               stride_hgs, bg_ptr, stride_bgs, stride_bgr, rank_g_ptr, scal_g_ptr, a_ptr, stride_as, stride_ar,
               rank_d_ptr, dt: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, NATIVE: tl.constexpr,
               NATIVE_E: tl.constexpr, SHRINK: tl.constexpr, IEEE: tl.constexpr):
    """For the rows ``use`` of one adapter ``slot`` (none where slot < 0): gate/up's expand, silu(g) * u
    (every row) and, SHRINK, this tile's share of down's shrink: (act, part)."""
    s0 = tl.maximum(slot, 0)
    p, use = _position(tail_pos_ptr, s0, use, n_pos, False)
    hg = hg_ptr + p * stride_hgpos
    rank = tl.where(slot >= 0, tl.load(rank_g_ptr + s0 * 2), 0)
    h = _load_h(hg, stride_hgt, rows, use, rank, BLOCK_M, BLOCK_R)
    g = _expand_tile(g, h, slot, rank, tl.load(scal_g_ptr + s0 * 2), bg_ptr, stride_bgs, stride_bgr, cols,
                     col_ok, BLOCK_R, NATIVE_E, IEEE)
    rank = tl.where(slot >= 0, tl.load(rank_g_ptr + s0 * 2 + 1), 0)
    h = _load_h(hg + stride_hgs, stride_hgt, rows, use, rank, BLOCK_M, BLOCK_R)
    u = _expand_tile(u, h, slot, rank, tl.load(scal_g_ptr + s0 * 2 + 1), bg_ptr, stride_bgs, stride_bgr,
                     n + cols, col_ok, BLOCK_R, NATIVE_E, IEEE)
    act = _silu_mul(g, u, dt)
    if not SHRINK:
        return act, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)      # (nothing stores it)
    r = tl.arange(0, BLOCK_R)
    rank = tl.where(slot >= 0, tl.load(rank_d_ptr + s0), 0)
    a = tl.load(a_ptr + s0.to(tl.int64) * stride_as + r[:, None] * stride_ar + cols[None, :],
                mask=(r < rank)[:, None] & col_ok[None, :], other=0.0)
    return act, mma(tl.where(use[:, None], act, 0.0).to(act.dtype), tl.trans(a), NATIVE, IEEE)


@triton.jit
def _silu_mul(g, u, dt: tl.constexpr):
    """silu(g) * u in the model dtype, each rounded to it first (the expanded projection's output)."""
    g = g.to(dt).to(tl.float32)
    return (g / (1.0 + tl.exp(-g)) * u.to(dt).to(tl.float32)).to(dt)


@triton.jit
def _silu_store(hd_ptr, out_ptr, part, act, own, rows, cols, col_ok, stride_hdp, stride_hdt, stride_o,
                BLOCK_R: tl.constexpr, SHRINK: tl.constexpr):
    """This tile's part of down's h (SHRINK; its own part: no atomics, nothing to zero) and act, for rows
    ``own``."""
    r = tl.arange(0, BLOCK_R)
    if SHRINK:
        tl.store(hd_ptr + tl.program_id(0) * stride_hdp + rows[:, None] * stride_hdt + r[None, :], part,
                 mask=own[:, None])
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], act, mask=own[:, None] & col_ok[None, :])


@triton.jit
def _silu_mul_lora_kernel(gu_ptr, out_ptr, slot_ptr, seg_slot_ptr, tail_pos_ptr, hg_ptr, bg_ptr, rank_g_ptr,
                          scal_g_ptr, a_ptr, rank_d_ptr, hd_ptr, sorted_ptr, blk_count_ptr, blk_ptr, nb, T, n, n_pos,
                          stride_g, stride_o, stride_hgt, stride_hgpos, stride_hgs, stride_bgs, stride_bgr, stride_as,
                          stride_ar, stride_hdp, stride_hdt, BLOCK_M: tl.constexpr, BN: tl.constexpr,
                          BLOCK_R: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr, SPLIT: tl.constexpr,
                          NATIVE: tl.constexpr, NATIVE_E: tl.constexpr, SHRINK: tl.constexpr, IEEE: tl.constexpr):
    """One column tile (program_id 0) of one segment's rows (program_id 1), or, ROWS, of every row, in one
    block of BLOCK_M rows (program_id 2); or, BLOCKS, of the step's segment blocks program_id 1,
    + num_programs 1, ... Without SHRINK, down's shrink happens elsewhere (its GEMM's extra rows)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_ok = cols < n
    if BLOCKS:
        for blk in range(tl.program_id(1), tl.load(blk_count_ptr + 1), tl.num_programs(1)):
            rows, row_ok, slot = _block(blk, sorted_ptr, blk_ptr, nb, BLOCK_M)
            g, u = _silu_load(gu_ptr, rows, row_ok, cols, col_ok, n, stride_g)
            act, part = _silu_lora(g, u, slot, tl.where(slot >= 0, row_ok, False), rows, cols, col_ok, n,
                                   tail_pos_ptr, n_pos, hg_ptr, stride_hgt, stride_hgpos, stride_hgs, bg_ptr,
                                   stride_bgs, stride_bgr, rank_g_ptr, scal_g_ptr, a_ptr, stride_as, stride_ar,
                                   rank_d_ptr, out_ptr.dtype.element_ty, BLOCK_M, BLOCK_R, NATIVE, NATIVE_E, SHRINK,
                                   IEEE)
            _silu_store(hd_ptr, out_ptr, part, act, row_ok, rows, cols, col_ok, stride_hdp, stride_hdt, stride_o,
                        BLOCK_R, SHRINK)
    else:
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        g, u = _silu_load(gu_ptr, rows, row_ok, cols, col_ok, n, stride_g)       # every row: waits on nothing
        if ROWS:
            own = row_ok
            s0, use = _row_slots(slot_ptr, rows, row_ok)
            p, use = _position(tail_pos_ptr, s0, use, n_pos, True)
            h_rows = hg_ptr + rows * stride_hgt + p * stride_hgpos
            b_rows = bg_ptr + s0 * stride_bgs
            g = _expand_rows(g, h_rows, tl.load(rank_g_ptr + s0 * 2, mask=use, other=0),
                             tl.load(scal_g_ptr + s0 * 2, mask=use, other=0.0), b_rows, stride_bgr, cols, col_ok,
                             BLOCK_R > RANK_UNROLL)
            u = _expand_rows(u, h_rows + stride_hgs, tl.load(rank_g_ptr + s0 * 2 + 1, mask=use, other=0),
                             tl.load(scal_g_ptr + s0 * 2 + 1, mask=use, other=0.0), b_rows, stride_bgr, n + cols,
                             col_ok, BLOCK_R > RANK_UNROLL)
            act = _silu_mul(g, u, out_ptr.dtype.element_ty)
            part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            if SHRINK:
                part = _shrink_rows(act.to(tl.float32), a_ptr + s0 * stride_as, stride_ar,
                                    tl.load(rank_d_ptr + s0, mask=use, other=0), cols, col_ok, BLOCK_M, BLOCK_R)
        else:
            slot, own, use = _segment(seg_slot_ptr, slot_ptr, rows, row_ok)
            if SPLIT:                                       # (a one-segment grid compiles no branch)
                if (slot < 0) & (tl.program_id(1) > 0):
                    return                                  # past the step's segments
            act, part = _silu_lora(g, u, slot, use, rows, cols, col_ok, n, tail_pos_ptr, n_pos, hg_ptr, stride_hgt,
                                   stride_hgpos, stride_hgs, bg_ptr, stride_bgs, stride_bgr, rank_g_ptr, scal_g_ptr,
                                   a_ptr, stride_as, stride_ar, rank_d_ptr, out_ptr.dtype.element_ty, BLOCK_M,
                                   BLOCK_R, NATIVE, NATIVE_E, SHRINK, IEEE)
        _silu_store(hd_ptr, out_ptr, part, act, own, rows, cols, col_ok, stride_hdp, stride_hdt, stride_o, BLOCK_R,
                    SHRINK)


# ----------------------------------------------------------------------------- host side

def _check_family(name: str, fam, n_in: int | None, n_out: int | None, slices: int) -> None:
    a, b = fam.lora_a, fam.lora_b
    if a.dim() != 4 or not a.is_contiguous() or a.shape[1] != slices or (n_in is not None and a.shape[3] != n_in):
        raise ValueError(f"{name}: lora_a must be contiguous [slots, {slices}, max_rank, {n_in}], got {tuple(a.shape)}")
    if b.dim() != 3 or not b.is_contiguous() or b.shape[:2] != (a.shape[0], a.shape[2]) \
            or (n_out is not None and b.shape[2] != n_out):
        raise ValueError(f"{name}: lora_b must be contiguous [{a.shape[0]}, {a.shape[2]}, {n_out}], "
                         f"got {tuple(b.shape)}")
    for what, v, dtype in (("ranks", fam.ranks, torch.int32), ("scalings", fam.scalings, torch.float32)):
        if v.shape != (a.shape[0], slices) or v.dtype != dtype or not v.is_contiguous():
            raise ValueError(f"{name}: {what} must be contiguous {dtype} [{a.shape[0]}, {slices}], got "
                             f"{v.dtype} {tuple(v.shape)}")


def _check_h(name: str, h: torch.Tensor, parts: int | None, t: int, fam, tail_pos: torch.Tensor | None,
             needs_tail_pos: bool = True) -> None:
    """h [parts, T, positions, n_slices, >= max_rank] in any float dtype, unit stride along the rank;
    a positions stride other than 0 needs ``tail_pos`` (slot -> position), unless not ``needs_tail_pos``."""
    rank, slices = fam.lora_a.shape[2], fam.lora_a.shape[1]
    if h.dim() != 5 or h.dtype not in _DTYPES or (parts is not None and h.shape[0] != parts) \
            or h.shape[1] != t or h.shape[3] != slices or h.shape[4] < rank or h.stride(4) != 1:
        raise ValueError(f"{name}: h must be [{parts or 'parts'}, {t}, positions, {slices}, >= {rank}] with unit last "
                         f"stride, got {h.dtype} {tuple(h.shape)} strides {h.stride()}")
    if h.stride(2) and needs_tail_pos and (tail_pos is None or tail_pos.dtype != torch.int32 or tail_pos.dim() != 1
                        or tail_pos.numel() < fam.lora_a.shape[0]):
        raise ValueError(f"{name}: h with positions needs tail_pos, int32 [>= {fam.lora_a.shape[0]} slots]")


def _check_meta(meta: LoRAMeta, t: int) -> None:
    if t > MAX_TOKENS:
        raise ValueError(f"fused LoRA takes at most {MAX_TOKENS} tokens a step, got {t}")
    if meta.token_slot.numel() < t or meta.token_slot.dtype != torch.int32:
        raise ValueError(f"the LoRA metadata holds {meta.token_slot.numel()} tokens, the step {t}")


def check_silu_args(gate_up: torch.Tensor, meta: LoRAMeta, h_gate_up: torch.Tensor, gate_up_fam, down_fam,
                    tail_pos: torch.Tensor) -> tuple[int, int]:
    """(T, I) of a SiLU-mul with LoRA (this module's and ``fused_lora_dense``'s), its arguments checked."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1 or gate_up.dtype not in _DTYPES:
        raise ValueError(f"gate_up must be [T, 2I] with unit column stride, got {tuple(gate_up.shape)}")
    t, n2 = gate_up.shape
    _check_meta(meta, t)
    _check_family("gate_up", gate_up_fam, None, n2, 2)
    _check_h("gate_up", h_gate_up, 1, t, gate_up_fam, tail_pos)
    if down_fam is not None:
        _check_family("down", down_fam, n2 // 2, None, 1)
    return t, n2 // 2


def _grid(meta: LoRAMeta, h: torch.Tensor, t: int, kernel: str, grid: str | None,
          block_m: int | None = None) -> tuple[str, int, int]:
    """(grid, programs along axis 1, rows a program takes at once) of a rotary or SiLU-mul launch. Up to
    MANY_TOKENS tokens, "segments", a program per tail position of h (the step's adapters sit at distinct
    positions below it), for at most ``SEGMENTS_MAX[kernel]`` of them, else "rows" (per-row gathers); past
    MANY_TOKENS, "blocks" (the step's segment blocks, a program a SEG_BLOCK tokens of the step, each looping
    over blocks; for one adapter too: SiLU-mul without down's shrink 16.3 against 17.9 us on 64-row blocks,
    bench/NOTES-kernels.md v11), except rotary with one tail position, which takes "segments" in FEW_ROWS
    blocks (6.60 against 7.45 us at 256 tokens, v19). Decided by h's shape and the step's size, so that a
    captured graph keeps its grid for every step of its bucket; programs past the step's segments or blocks do
    nothing. ``grid`` forces one and ``block_m`` the rows a program takes off the blocks grid (by default the
    step's rows up to ``FEW_ROWS``; tests, tuning)."""
    k = h.shape[2]
    if meta.num_segments > k:
        raise ValueError(f"{meta.num_segments} adapters in the step but h holds {k} tail positions")
    if grid is None:
        grid = ("segments" if kernel == "rotary" and k == 1 else "blocks") if t > MANY_TOKENS else \
            "segments" if k <= SEGMENTS_MAX[kernel] else "rows"
    if grid == "blocks":
        return grid, triton.cdiv(t, SEG_BLOCK), SEG_BLOCK
    if grid not in ("segments", "rows"):
        raise ValueError(f"grid must be segments, rows or blocks, got {grid!r}")
    if block_m is not None and block_m not in ((4, 8, 16, 32, 64) if grid == "rows" else (16, 32, 64)):
        raise ValueError(f"block_m must be a power of two from {4 if grid == 'rows' else 16} to 64 on the {grid} "
                         f"grid, got {block_m}")
    return grid, k if grid == "segments" else 1, block_m or min(_block_m(t), FEW_ROWS[kernel, grid])


def _native_expand(h: torch.Tensor, fam) -> bool:
    """Whether the expands may multiply h by B on tensor cores in the model dtype: h holds values of that
    dtype (a GEMM's columns), so nothing rounds. Past MANY_TOKENS tokens only: at 256 tokens it took
    SiLU-mul's 16 adapters 35.2 us against 39.0 in float32 (TF32), at 32 tokens it won nothing
    (bench/NOTES-kernels.md v11)."""
    return NATIVE_EXPAND and h.shape[1] > MANY_TOKENS and native_dot(fam.lora_b.dtype) and \
        h.dtype == fam.lora_b.dtype


def _block_r(fam) -> int:
    return triton.next_power_of_2(fam.lora_a.shape[2])


def _block_m(t: int) -> int:
    return min(ROW_BLOCK, max(16, triton.next_power_of_2(t)))


def norm_lora(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, meta: LoRAMeta,
              h: torch.Tensor, fam, tail_pos: torch.Tensor | None = None, row_pos: torch.Tensor | None = None,
              num_warps: int | None = None, rank_chunk: int | None = None,
              maxnreg: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, s): s = x + expand + residual, out = w * rmsnorm(s); one program a row. Launch parameters left
    None come from NORM (NORM_COLUMNS for h from a GEMM's columns), or NORM_MANY past NORM_MANY_TOKENS rows
    (``maxnreg``: a register cap, 0 for none).

    The expand: x[t] += scaling * sum_p h[p, t, pos(t), 0] @ B[slot(t)], ``fam`` a one-slice
    family, rounded to x's dtype before the residual is added (a norm without LoRA is
    ``kernels.fused.add_rms_norm``). pos(t) is ``row_pos[t]`` (int32, each row's position, -1 for none: what
    the engine stages with the step), else ``tail_pos[slot(t)]``; h with one position needs neither.

    The norm (and rotary) rely on zeros past each slot's rank: in h (the GEMM's columns over zeroed A rows, or
    SiLU-mul's parts) and in B's first RANK_FREE rows (``AdapterSlots`` zero a slot past each rank).
    """
    check_norm_args(x, residual, weight)
    t, n = x.shape
    _check_meta(meta, t)
    _check_family("expand", fam, None, n, 1)
    _check_h("expand", h, None, t, fam, tail_pos, needs_tail_pos=row_pos is None and h.shape[2] > 1)
    pos = _row_positions(meta, t, h, tail_pos, row_pos)
    out, s = torch.empty_like(x), torch.empty_like(x)
    many = t > NORM_MANY_TOKENS
    few = NORM if h.shape[0] > 1 else NORM_COLUMNS          # SiLU-mul's parts, or one h: a GEMM's columns
    num_warps = num_warps or (NORM_MANY[0] if many else few[0])
    rank_chunk = rank_chunk or (NORM_MANY[1] if many else few[1])
    maxnreg = (NORM_MANY[2] if many else 0) if maxnreg is None else maxnreg
    if t:
        _norm_lora_kernel[(t,)](
            x, residual if residual is not None else x, weight, out, s, meta.token_slot,
            meta.token_slot if pos is None else pos, h, fam.lora_b, fam.ranks, fam.scalings, n, h.shape[0],
            h.shape[2], fam.lora_a.shape[2],
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), s.stride(0),
            *h.stride()[:3], *fam.lora_b.stride()[:2], eps, HAS_RES=residual is not None, HAS_POS=pos is not None,
            BLOCK=triton.next_power_of_2(n), BLOCK_R=max(rank_chunk, _block_r(fam)),
            P_P2=triton.next_power_of_2(h.shape[0]), RC=rank_chunk, num_warps=num_warps,
            **({"maxnreg": maxnreg} if maxnreg else {}))
    return out, s


def _row_positions(meta: LoRAMeta, t: int, h: torch.Tensor, tail_pos: torch.Tensor | None,
                   row_pos: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's position in h as the norm and rotary read it: None where h has one position (or stride 0 along
    them), else ``row_pos`` checked, or ``row_positions`` gathered here."""
    if not h.stride(2) or h.shape[2] == 1:
        return None
    if row_pos is not None:
        if row_pos.dtype != torch.int32 or row_pos.dim() != 1 or row_pos.numel() < t:
            raise ValueError(f"row_pos must be int32 [>= {t}], got {row_pos.dtype} {tuple(row_pos.shape)}")
        return row_pos
    return row_positions(meta, tail_pos, t)


def row_positions(meta: LoRAMeta, tail_pos: torch.Tensor, t: int | None = None) -> torch.Tensor:
    """int32 [t]: ``tail_pos[slot]`` of each of the step's first ``t`` rows (all of them by default), -1 without
    LoRA: the ``row_pos`` that the engine stages from the host, gathered on the device (tests, tools)."""
    slot = meta.token_slot[: meta.num_tokens if t is None else t]
    return torch.where(slot >= 0, tail_pos[slot.clamp(min=0)], -1).to(torch.int32)


def rotary_lora_(qkv: torch.Tensor, h: torch.Tensor, fam, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, meta: LoRAMeta, num_heads: int, num_kv_heads: int,
                 tail_pos: torch.Tensor, row_pos: torch.Tensor | None = None, num_warps: int | None = None,
                 grid: str | None = None, block_m: int | None = None) -> None:
    """In place on qkv [T, (HQ + 2 HK) * D]: q, k, v += scaling * h[0, t, pos(t), i] @ B (rounded), then
    rotary on q and k. h [1, T, positions, 3, R]: the qkv GEMM's extra columns (``LoRATails.split``).
    pos(t) as in ``norm_lora`` (``row_pos`` or ``tail_pos``; the segment blocks grid reads ``tail_pos``), and
    like it, for ranks up to RANK_FREE the kernel relies on zeros past each slot's rank in h and B."""
    if qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.dtype not in _DTYPES:
        raise ValueError(f"qkv must be 2-D with unit column stride, got {tuple(qkv.shape)}")
    t, width = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    if width % heads or (width // heads) % 2:
        raise ValueError(f"qkv width {width} is not {heads} heads of an even head_dim")
    dim = width // heads
    _check_family("qkv", fam, None, width, 3)
    _check_h("qkv", h, 1, t, fam, tail_pos)
    _check_meta(meta, t)
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != dim or cos.stride(1) != 1:
        raise ValueError(f"cos/sin must be [max_pos, {dim}], got {tuple(cos.shape)}")
    if positions.shape != (t,):
        raise ValueError(f"positions must be [{t}], got {tuple(positions.shape)}")
    grid, programs, block_m = _grid(meta, h, t, "rotary", grid, block_m)
    pos = None if grid == "blocks" else _row_positions(meta, t, h, tail_pos, row_pos)
    if t:
        _rotary_lora_kernel[(heads, programs, 1 if grid == "blocks" else triton.cdiv(t, block_m))](
            qkv, cos, sin, positions, meta.token_slot, meta.seg_slot, tail_pos, meta.token_slot if pos is None else pos,
            h, fam.lora_b, fam.ranks, fam.scalings, meta.sorted_idx, meta.blk_count, meta.blk_start,
            meta.blk_start.numel(), t, h.shape[2], fam.lora_a.shape[2],
            qkv.stride(0), cos.stride(0), h.stride(1), h.stride(2), h.stride(3), *fam.lora_b.stride()[:2],
            HQ=num_heads, HK=num_kv_heads, HALF=dim // 2, HALF_P2=max(16, triton.next_power_of_2(dim // 2)),
            BLOCK_M=block_m, BLOCK_R=max(16, _block_r(fam)), ROWS=grid == "rows", BLOCKS=grid == "blocks",
            SPLIT=grid == "segments" and programs > 1, HAS_POS=pos is not None, NATIVE=_native_expand(h, fam),
            IEEE=not native_dot(qkv.dtype), num_warps=num_warps or ROTARY_WARPS[grid], num_stages=3)


def silu_mul_lora(gate_up: torch.Tensor, meta: LoRAMeta, h_gate_up: torch.Tensor, gate_up_fam, down_fam,
                  tail_pos: torch.Tensor, block_n: int | None = None, num_warps: int | None = None,
                  grid: str | None = None, block_m: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act, h_down): gate_up += scaling * h_gate_up[0, t, pos(t), i] @ B (rounded), act = silu(g) * u,
    and h_down = act @ A_down.T as float32 parts [column tiles, T, 1 (stride 0), 1, R] (sum them over the
    first dim): the h that ``norm_lora`` takes. Without ``down_fam`` (down's A under its GEMM instead),
    no h_down: None."""
    t, n = check_silu_args(gate_up, meta, h_gate_up, gate_up_fam, down_fam, tail_pos)
    grid, programs, block_m = _grid(meta, h_gate_up, t, "silu", grid, block_m)
    block_n = block_n or SILU[grid, down_fam is not None][0]
    num_warps = num_warps or SILU[grid, down_fam is not None][1]
    tiles = triton.cdiv(n, block_n)
    shrink = down_fam is not None
    a_fam = down_fam if shrink else gate_up_fam        # (without the shrink: pointers nothing reads)
    block_r = max(16, _block_r(gate_up_fam), _block_r(a_fam))
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    h_down = torch.empty((tiles if shrink else 1, t, block_r), dtype=torch.float32, device=gate_up.device)
    if t:
        _silu_mul_lora_kernel[(tiles, programs, 1 if grid == "blocks" else triton.cdiv(t, block_m))](
            gate_up, out, meta.token_slot, meta.seg_slot, tail_pos, h_gate_up, gate_up_fam.lora_b, gate_up_fam.ranks,
            gate_up_fam.scalings, a_fam.lora_a, a_fam.ranks, h_down, meta.sorted_idx, meta.blk_count,
            meta.blk_start, meta.blk_start.numel(), t, n, h_gate_up.shape[2], gate_up.stride(0), out.stride(0),
            *h_gate_up.stride()[1:4], *gate_up_fam.lora_b.stride()[:2], a_fam.lora_a.stride(0),
            a_fam.lora_a.stride(2), h_down.stride(0), h_down.stride(1), BLOCK_M=block_m, BN=block_n,
            BLOCK_R=block_r, ROWS=grid == "rows", BLOCKS=grid == "blocks", SPLIT=grid == "segments" and programs > 1,
            NATIVE=native_dot(gate_up.dtype), NATIVE_E=_native_expand(h_gate_up, gate_up_fam), SHRINK=shrink,
            IEEE=not native_dot(gate_up.dtype), num_warps=num_warps)
    if not shrink:
        return out, None
    return out, h_down.as_strided((tiles, t, 1, 1, block_r), (h_down.stride(0), h_down.stride(1), 0, block_r, 1))


class LoRATails:
    """Base projection weights with room under them for the A rows of up to ``positions`` adapters.

    ``add(w, bias)`` makes ``ext = [out + extra, in]`` whose first ``out`` rows are ``w`` and
    returns that part as a view: the model keeps it as the layer's weight, so every other
    path reads exactly what it read before, and the original tensor can go. Position p holds
    one adapter's A in rows ``out + p * n_slices * max_rank`` on (``a_rows``), zeros past its
    rank as the slots hold them (the norm and rotary read those columns of h). ``F.linear(x, *weight(i, k))`` returns
    the projection and, in its extra columns, x @ A.T against the adapters at positions < k:
    a step reads the A rows of its own adapters only. The extra rows are padded to a
    multiple of ``pad``, where cuBLAS keeps a fast kernel (bench/NOTES-kernels.md: 64 for
    q/k/v and o; gate/up, 28672 rows at Llama-3-8B, took 90.3 us with 64 extra rows, 89.0
    with 128, 88.5 with none).
    """

    def __init__(self, n_slices: int, max_rank: int, positions: int = 1, pad: int = 64):
        if positions < 1 or pad < 1:
            raise ValueError(f"positions and pad must be >= 1, got {positions}, {pad}")
        self.n_slices, self.max_rank, self.positions, self.pad = n_slices, max_rank, positions, pad
        self.block = n_slices * max_rank            # rows a position takes
        self.extra = self.rows(positions)
        self.out = 0
        self.ext: list[torch.Tensor] = []
        self.bias: list[torch.Tensor | None] = []

    def rows(self, positions: int, pad: int | None = None) -> int:
        """Extra rows a GEMM over the first ``positions`` positions reads (padded to ``pad``, by default the
        tails' own; a smaller one must divide it, so that the rows lie inside the allocation)."""
        pad = pad or self.pad
        if self.pad % pad:
            raise ValueError(f"a pad of {pad} rows does not divide the tails' {self.pad}")
        return -(-positions * self.block // pad) * pad

    def add(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.ext and w.shape != (self.out, self.ext[0].shape[1]):
            raise ValueError(f"every layer's weight must be {tuple(self.ext[0][: self.out].shape)}, got {tuple(w.shape)}")
        self.out = w.shape[0]
        e = torch.zeros((self.out + self.extra, w.shape[1]), dtype=w.dtype, device=w.device)
        e[: self.out].copy_(w)
        self.ext.append(e)
        self.bias.append(None if bias is None else torch.cat((bias, bias.new_zeros(self.extra))))
        return e[: self.out]

    def weight(self, layer: int, positions: int, pad: int | None = None,
               min_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of layer ``layer`` with the A rows of the first ``positions`` positions (``rows``), or
        ``min_rows`` extra rows if more, as far as the tails reach (where cuBLAS has a faster kernel for a
        taller shape: the rows past the step's positions give h columns that no one reads)."""
        if not 1 <= positions <= self.positions:
            raise ValueError(f"positions must be in [1, {self.positions}], got {positions}")
        end = self.out + min(max(self.rows(positions, pad), min_rows), self.extra)
        b = self.bias[layer]
        return self.ext[layer][:end], None if b is None else b[:end]

    def a_rows(self, layer: int, position: int = 0) -> torch.Tensor:
        """[n_slices, max_rank, in]: where the A of the adapter at ``position`` goes."""
        e = self.ext[layer]
        at = self.out + position * self.block
        return e[at: at + self.block].view(self.n_slices, self.max_rank, e.shape[1])

    def split(self, y: torch.Tensor, positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GEMM output [T, out + rows(k)] -> (projection [T, out], h [1, T, k, n_slices, max_rank]) as views.

        h holds every whole position in the padded rows, or only the first ``positions``: the step's tail
        bucket. A kernel launches a program per position of h on its segment grid, and the positions past
        the bucket hold no adapter of the step (one adapter: gate/up's 128 padded rows are 4 positions; SiLU-mul
        with h cut to 1 took 6.42 against 6.80 us a call on the H100, bench/NOTES-kernels.md v13)."""
        t = y.shape[0]
        k = (y.shape[1] - self.out) // self.block
        if positions is not None:
            if not 1 <= positions <= k:
                raise ValueError(f"the GEMM's extra rows hold {k} tail positions, asked for {positions}")
            k = positions
        return y[:, : self.out], y[:, self.out:].as_strided(
            (1, t, k, self.n_slices, self.max_rank), (0, y.stride(0), self.block, self.max_rank, 1))
