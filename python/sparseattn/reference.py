"""Float64 oracles. They define what each op computes and are the correctness reference of every
kernel; they are never used as a silent fallback. Each lives beside its op
(``sparseattn/ops/<op>/naive.py``); this module gathers them, with the tolerance rule.

Conventions shared with the kernels: a query row that sees no key returns 0 (and LSE -inf),
where torch's math backend returns NaN.
"""
from __future__ import annotations

import torch

from .ops.attention.naive import attention, sparse_attention, varlen_attention
from .ops.decode.naive import decode_attention, decode_mask
from .ops.hip.naive import best_mass as hip_best_mass, hip_attention, hip_mask, hip_recall
from .ops.lightning.naive import lightning_attention
from .ops.redistribution.naive import act_attention, var_attention
from .ops.stats.naive import attention_stats
from .ops.routing.naive import routing_attention
from .patterns.sparsed import sparsed_blocks
from .patterns.topk_blocks import topk_blocks
from .visual import naive as visual   # the sa.visual helpers' oracles (CCA / AKI masks, importance scores, ...)

__all__ = ["attention", "sparse_attention", "varlen_attention", "decode_attention", "decode_mask",
           "lightning_attention",
           "assert_close"]
__all__ += ["attention_stats", "act_attention", "var_attention", "visual"]
__all__ += ["routing_attention", "sparsed_blocks", "topk_blocks"]
__all__ += ["hip_attention", "hip_best_mass", "hip_mask", "hip_recall"]



# Absolute floor of the oracle tolerance per dtype (covers a baseline that happens to be exact).
TOLERANCE_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-12}
TOLERANCE_FACTOR = 3.0


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> None:
    """The oracle rule of sparseattn's tests and benchmarks:
    ``max|out - ref| <= TOLERANCE_FACTOR * max|base - ref| + TOLERANCE_FLOOR[dtype]``, where ``ref``
    is the float64 oracle and ``base`` the same computation in ``out``'s dtype (the error any
    same-precision implementation makes). Raises AssertionError with the numbers."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    ref = ref.double().to(out.device)   # an oracle may have run on another device (the CPU)
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    base_err = (base.double().to(out.device) - ref).abs().nan_to_num(0.0).max().item() if out.numel() else 0.0
    tol = TOLERANCE_FACTOR * base_err + TOLERANCE_FLOOR[out.dtype]
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} (baseline error {base_err:.3g})"
