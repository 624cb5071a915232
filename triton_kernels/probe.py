"""What the Triton interpreter can run, found by running it once (not by a flag).

Triton 3.6's interpreter multiplies bf16 ``tl.dot`` operands as their raw 16-bit storage, so bf16
CPU tensors take the PyTorch CPU path unless a tiny bf16 dot comes out right here (a fixed
interpreter, or the tests' shim, makes it right)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import INTERPRET


@triton.jit
def _bf16_dot_probe_kernel(A, B, C):
    r = tl.arange(0, 16)
    a = tl.load(A + r[:, None] * 16 + r[None, :])
    b = tl.load(B + r[:, None] * 16 + r[None, :])
    tl.store(C + r[:, None] * 16 + r[None, :], tl.dot(a, b))


@functools.lru_cache(maxsize=None)
def interpreter_bf16_dot_ok() -> bool:
    """True when the interpreter's bf16 ``tl.dot`` matches float32 products of the same values
    (small integers: every product and sum is exact in both)."""
    if not INTERPRET:
        return False
    vals = (torch.arange(256, dtype=torch.float32).view(16, 16) % 7 - 3)
    a, b = vals.to(torch.bfloat16), vals.t().contiguous().to(torch.bfloat16)
    c = torch.empty(16, 16, dtype=torch.float32)
    _bf16_dot_probe_kernel[(1,)](a, b, c)
    return torch.equal(c, a.float() @ b.float())
