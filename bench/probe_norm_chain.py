"""Probe: does the LoRA norm pay for its dependent loads (slot -> position, rank -> h, B)? (bench/NOTES-kernels.md
v23, results/2026-11-25-h100-norm-chain-probe.txt; run before 4381e05, whose norm took the fastest variant.)

    python bench/probe_norm_chain.py

Variants of the kernel as it was (same code otherwise): POS 0: position = tail_pos[slot], 1: a per-row position
array staged by the host, 2: none (one position: 0); RANK_MASK: mask h and B by the slot's rank, or by BLOCK_R only
(B and A past the rank zeroed at load). Beside them the engine's norm_lora of the day (after 4381e05: the POS 1 / 2,
no-mask variant, here gathering its row positions itself) and the plain add_rms_norm. 32 and 64 tokens, Identical /
Uniform / Distinct."""
import sys
from pathlib import Path
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch
import triton
import triton.language as tl
from kernels import fused, fused_lora as fl
from kernels.fused import rms_norm_loaded_row
from kernels.lora_meta import LoRAMeta
from bench.fused_lora_setup import H, LAYERS, dev, dt, fam, gemm_h, per_call, workload_slots
from worker.model.llama import TAIL_BUCKETS

SLOTS = 65


@triton.jit
def _norm_v(x_ptr, r_ptr, w_ptr, out_ptr, s_ptr, slot_ptr, pos_ptr, rowpos_ptr, h_ptr, b_ptr, rank_ptr, scal_ptr,
            n, n_pos, stride_x, stride_r, stride_o, stride_s, stride_ht, stride_hpos,
            stride_bs, stride_br, eps, POS: tl.constexpr, RANK_MASK: tl.constexpr, BLOCK: tl.constexpr,
            BLOCK_R: tl.constexpr, RC: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cm = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
    res = tl.load(r_ptr + row * stride_r + cols, mask=cm, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + row)
    use = slot >= 0
    slot = tl.maximum(slot, 0).to(tl.int64)
    h_row = h_ptr + row * stride_ht
    if POS == 0:
        p = tl.load(pos_ptr + slot)
        use = tl.where((p >= 0) & (p < n_pos), use, False)
        h_row += p * stride_hpos
    elif POS == 1:
        p = tl.load(rowpos_ptr + row)
        use = (p >= 0) & (p < n_pos)
        h_row += tl.maximum(p, 0) * stride_hpos
    rr = tl.arange(0, BLOCK_R)
    if RANK_MASK:
        rank = tl.where(use, tl.load(rank_ptr + slot), 0)
        hv = tl.load(h_row + rr, mask=rr < rank, other=0.0).to(tl.float32)
    else:
        rank = BLOCK_R
        hv = tl.load(h_row + rr).to(tl.float32)
        hv = tl.where(use, hv, 0.0)
    hv = tl.reshape(hv * tl.load(scal_ptr + slot), (BLOCK_R // RC, RC))
    delta = tl.zeros((BLOCK,), dtype=tl.float32)
    for rc in tl.static_range(0, BLOCK_R, RC):
        r = rc + tl.arange(0, RC)
        hc = tl.sum(tl.where((tl.arange(0, BLOCK_R // RC) == rc // RC)[:, None], hv, 0.0), axis=0)
        b = tl.load(b_ptr + slot * stride_bs + r[:, None] * stride_br + cols[None, :],
                    mask=(r < rank)[:, None] & cm[None, :], other=0.0).to(tl.float32)
        delta += tl.sum(hc[:, None] * b, axis=0)
    x = (x + delta).to(out_ptr.dtype.element_ty).to(tl.float32)
    rms_norm_loaded_row(x, res, w, row, cols, cm, out_ptr, s_ptr, stride_o, stride_s, n, eps, True, True)


def norm_v(x, res, w, eps, meta, h, f, tail_pos, row_pos, pos_mode, rank_mask, warps=16, rc=16):
    t, n = x.shape
    out, s = torch.empty_like(x), torch.empty_like(x)
    _norm_v[(t,)](x, res, w, out, s, meta.token_slot, tail_pos, row_pos, h, f.lora_b, f.ranks, f.scalings, n,
                  h.shape[2], x.stride(0), res.stride(0), out.stride(0), s.stride(0), h.stride(1), h.stride(2),
                  *f.lora_b.stride()[:2], eps, POS=pos_mode, RANK_MASK=rank_mask, BLOCK=triton.next_power_of_2(n),
                  BLOCK_R=16, RC=rc, num_warps=warps)
    return out, s


def main():
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    tail_pos = torch.arange(SLOTS, dtype=torch.int32, device=dev) - 1
    f_o = [fam(H, [H], SLOTS) for _ in range(LAYERS)]
    w = torch.ones(H, device=dev, dtype=dt)
    for t in (32, 64):
        x = [torch.randn(t, H, device=dev).to(dt) for _ in range(LAYERS)]
        res = torch.randn(t, H, device=dev).to(dt)
        plain = per_call(lambda i: fused.add_rms_norm(x[i], res, w, 1e-5))
        print(f"\n#### {t} tokens\nadd_rms_norm (plain): {plain:6.2f} us", flush=True)
        for name in ("identical", "uniform", "distinct"):
            drawn = workload_slots(name, t, SLOTS)
            meta = LoRAMeta.allocate(t, SLOTS, dev).fill(drawn)
            k = min(next(b for b in TAIL_BUCKETS if b >= meta.num_segments), t)
            h = gemm_h(H, 1, k, t)
            row_pos = fl.row_positions(meta, tail_pos, t)
            ref = fl.norm_lora(x[0], res, w, 1e-5, meta, h, f_o[0], tail_pos)
            eng = per_call(lambda i: fl.norm_lora(x[i], res, w, 1e-5, meta, h, f_o[i], tail_pos))
            print(f"== {name}: {meta.num_segments} adapters, bucket {k}\nengine norm_lora      : {eng:6.2f} us",
                  flush=True)
            for pm, rm in ((0, True), (0, False), (1, True), (1, False), (2, True), (2, False)):
                if pm == 2 and k > 1:
                    continue
                out = norm_v(x[0], res, w, 1e-5, meta, h, f_o[0], tail_pos, row_pos, pm, rm)
                diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref))
                us = per_call(lambda i: norm_v(x[i], res, w, 1e-5, meta, h, f_o[i], tail_pos, row_pos, pm, rm))
                print(f"pos {['tail_pos[slot]', 'row_pos[row] ', 'none (0)     '][pm]} rank mask {str(rm):5}: "
                      f"{us:6.2f} us  |diff| {diff:.3g}", flush=True)


if __name__ == "__main__":
    main()
