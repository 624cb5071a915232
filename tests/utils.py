"""Shared test helpers: devices, dtypes, fresh inputs and the oracle tolerance rule."""
from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 tl.dot does not work in the Triton interpreter: bf16 runs on CUDA only.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Absolute floor of the tolerance, per dtype (covers a baseline that happens to be exact).
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}
FACTOR = 3.0


def randn(*shape, dtype=torch.float32, device=DEVICE, requires_grad=False, scale=1.0):
    """Fresh random normal input (never zeros)."""
    t = (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous [B, H, L, D] view (HF layout: [B, L, H, D] transposed)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)


def assert_oracle(name: str, out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> None:
    """|out - ref| <= FACTOR * |base - ref| + FLOOR, where ref is float64 and base is a PyTorch
    computation in out's dtype (the error a same-precision implementation makes)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    ref = ref.double()
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    base_err = (base.double() - ref).abs().nan_to_num(0.0).max().item() if out.numel() else 0.0
    tol = FACTOR * base_err + FLOOR[out.dtype]
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} (baseline error {base_err:.3g})"

