"""The one matrix product of the Triton kernels, in the precision each path needs."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def native_dot(dtype: torch.dtype) -> bool:
    """Whether ``mma`` may multiply in ``dtype`` itself: fp16/bf16 on a GPU, never under the
    interpreter (TRITON_INTERPRET=1 computes bf16 wrongly) nor for fp32 inputs."""
    return os.environ.get("TRITON_INTERPRET") != "1" and dtype != torch.float32


@triton.jit
def mma(a, b, NATIVE: tl.constexpr, IEEE: tl.constexpr):
    """a @ b accumulated in fp32.

    NATIVE: in the inputs' dtype (bf16/fp16 tensor cores on the GPU). Otherwise both are
    cast to fp32 first, and IEEE asks for exact fp32 products (the fp32 path and the CPU
    interpreter, which computes bf16 wrongly) instead of TF32.
    """
    if NATIVE:
        return tl.dot(a, b)
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(tl.float32), b.to(tl.float32))
