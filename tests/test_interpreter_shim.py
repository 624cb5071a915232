"""The tests' fix of the interpreter's dot (interpreter_shim.py), and the package's probe."""
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import sparseattn as sa
from sparseattn.triton_kernels import probe

import interpreter_shim
from utils import randn

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")


@triton.jit
def _dot_kernel(A, B, C, PRECISION: tl.constexpr):
    r = tl.arange(0, 16)
    a = tl.load(A + r[:, None] * 16 + r[None, :])
    b = tl.load(B + r[:, None] * 16 + r[None, :])
    tl.store(C + r[:, None] * 16 + r[None, :], tl.dot(a, b, input_precision=PRECISION))


def _dot(a, b, precision="ieee"):
    c = torch.empty(16, 16, dtype=torch.float32)
    _dot_kernel[(1,)](a, b, c, precision)
    return c


def test_interpreter_bf16_dot_is_still_wrong_without_the_shim(monkeypatch):
    """When this fails, upstream fixed the interpreter's bf16 dot: remove the bf16 half of the shim."""
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", interpreter_shim.ORIGINAL_CREATE_DOT)
    a, b = randn(16, 16, dtype=torch.bfloat16), randn(16, 16, dtype=torch.bfloat16)
    err = (_dot(a, b) - a.float() @ b.float()).abs().max().item()
    assert err > 1e3, f"the interpreter's own bf16 dot is right now (error {err:.3g}): drop the bf16 shim"


def test_bf16_dot_exact_with_the_shim():
    a, b = randn(16, 16, dtype=torch.bfloat16), randn(16, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(_dot(a, b), a.float() @ b.float(), rtol=1e-6, atol=1e-6)


def test_tf32_dot_rounds_operands():
    a, b = randn(16, 16), randn(16, 16)
    rounded = [torch.from_numpy(interpreter_shim.round_tf32(t.numpy())) for t in (a, b)]
    torch.testing.assert_close(_dot(a, b, "tf32"), rounded[0] @ rounded[1], rtol=1e-6, atol=1e-6)
    assert not torch.equal(_dot(a, b, "tf32"), _dot(a, b, "ieee"))
    # round to nearest even at 10 explicit mantissa bits
    x = np.array([1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -10 + 2 ** -12], dtype=np.float32)
    assert interpreter_shim.round_tf32(x).tolist() == [1.0, 1 + 2 ** -9, 1 + 2 ** -10]


@triton.jit
def _cast_kernel(X, Y):
    r = tl.arange(0, 16)
    tl.store(Y + r, tl.load(X + r).to(tl.bfloat16))


def test_interpreter_bf16_cast_is_still_truncating_without_the_shim(monkeypatch):
    """When this fails, upstream rounds float32 -> bf16 to nearest even: drop that half of the shim."""
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", interpreter_shim.ORIGINAL_CAST_IMPL)
    x, y = torch.full((16,), 1 - 2 ** -24), torch.empty(16, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y)
    assert y[0].item() == 1 - 2 ** -8, "the interpreter's own float32 -> bf16 cast rounds now: drop the shim's"


def test_bf16_cast_rounds_to_nearest_even_with_the_shim():
    x = torch.cat([torch.tensor([1 - 2 ** -24, 1 + 2 ** -8 + 2 ** -10, 1 + 2 ** -9, 1 + 3 * 2 ** -9]), randn(12)])
    y = torch.empty(16, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y)
    assert torch.equal(y, x.to(torch.bfloat16))     # torch rounds to nearest even, as the GPU does


def test_package_probes_the_interpreter(monkeypatch):
    assert probe.interpreter_bf16_dot_ok()   # the shim is installed by conftest
    q, k, v = (randn(1, 2, 64, 32, dtype=torch.bfloat16) for _ in range(3))
    sa.sparse_attention(q, k, v, sa.SlidingWindow(16))
    assert sa.last_backend() == "triton" and sa.last_fallback_reason() is None
