"""Shared test helpers: devices, dtypes, fresh inputs and the oracle tolerance rule."""
from __future__ import annotations

import torch

from sparseattn.reference import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 runs everywhere: on the CPU through the interpreter with the shim of interpreter_shim.py.
DTYPES = [torch.float16, torch.float32, torch.bfloat16]


def randn(*shape, dtype=torch.float32, device=DEVICE, requires_grad=False, scale=1.0):
    """Fresh random normal input (never zeros)."""
    t = (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous [B, H, L, D] view (HF layout: [B, L, H, D] transposed)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)


def assert_oracle(name: str, out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> None:
    """The oracle rule (sparseattn.reference.assert_close): error against float64 within a small
    multiple of the error of a same-dtype PyTorch computation."""
    assert_close(name, out, ref, base)
