"""Kernel tests: on a machine without CUDA, run Triton through its interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed so that a failure can be replayed (pytest shows captured output)."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.fixture
def rel_err():
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere in out gives inf."""
    return _rel_err
