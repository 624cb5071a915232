"""Lightning attention benchmark suite (``python -m sparseattn.bench --suite lightning``).

GPU: B=2, H=16, D=128, bf16, L = 2K..256K, forward and forward+backward, against
flash-linear-attention's ``chunk_simple_gla`` with the same per-head decay (``g_gamma = -slopes``;
n/a when ``fla`` is not installed) and dense causal torch SDPA, measured in the same run. Inputs
live in ``[B, L, H, D]`` memory (FLA's layout); sparseattn reads the same memory as ``[B, H, L, D]``
views, so neither side pays a copy. Time per token is ``ms / (B * L)``.

``flops`` counts the chunked algorithm's useful work with 64-token chunks: per token and head,
the state read and update (``2 * 2 * Dk * Dv``) and the causal half of the intra-chunk products
(``2 * 32 * (Dk + Dv)``); forward+backward counts 3.5x the forward (the table's
convention). ``params`` carry the LASP-2
collective payload per rank and step (``lasp2_payload_bytes = B * H * Dk * Dv * 4``, independent
of L) next to the LASP-2H payload (K and V of the whole sequence) for the same shape.

CPU (quick): tiny sizes on sparseattn's PyTorch CPU path against torch SDPA on CPU. Inputs are
built when a case first runs, in the shared input cache (:data:`.harness.INPUTS`), rotated, and
freed when the next size starts (a 256K-token case holds several GB).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .harness import INPUTS, Case

CHUNK = 64


def _fla():
    """flash-linear-attention's chunk_simple_gla, or None when it is not installed."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    return chunk_simple_gla


def _flops(B, H, L, D, direction):
    fwd = B * H * L * (2 * 2 * D * D + 2 * (CHUNK // 2) * 2 * D)
    return fwd if direction == "fwd" else 3.5 * fwd  # the table's convention


def _check(sa, device, dtype, D, slopes):
    """Forward and gradients at a small size against the float64 recurrence, by the oracle rule
    (``sparseattn.reference.assert_close``)."""

    def check():
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(1, slopes.numel(), 300, D, device=device, generator=g).to(dtype)
                       for _ in range(4))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def run(fn):
            o = fn(*leaves)
            return [o] + list(torch.autograd.grad(o, leaves, do.to(o.dtype)))

        got = run(lambda q, k, v: sa.lightning_attention(q, k, v, slopes))
        ref = run(lambda q, k, v: sa.reference.lightning_attention(q, k, v, slopes)[0])
        base = run(lambda q, k, v: sa.reference.lightning_attention(q, k, v, slopes, dtype=dtype)[0])
        for name, a, r, b in zip(("o", "dq", "dk", "dv"), got, ref, base):
            sa.reference.assert_close(f"lightning {name}", a, r, b)

    return check


def _case(sa, device, dtype, B, H, L, D, direction, slopes, fla) -> Case:
    def make():
        q, k, v = (torch.randn(B, L, H, D, device=device, dtype=dtype) for _ in range(3))
        need = direction == "fwd+bwd"
        return (tuple(t.requires_grad_(need) for t in (q, k, v))
                + (torch.randn(B, L, H, D, device=device, dtype=dtype),))

    size = ("lightning", B, H, L, D, dtype, device)

    def step(fn: Callable):
        def go():
            q, k, v, do = INPUTS.get(size, f"qkv do {direction}", make, device, rotate=True)
            o = fn(q, k, v)
            if direction == "fwd+bwd":
                torch.autograd.grad(o, (q, k, v), do if o.shape == do.shape else do.transpose(1, 2))
            return o
        return go

    bhld = lambda t: t.transpose(1, 2)  # noqa: E731 - [B, L, H, D] memory as [B, H, L, D]
    ours = step(lambda q, k, v: sa.lightning_attention(bhld(q), bhld(k), bhld(v), slopes))
    anchors = {}
    if device == "cuda":
        anchors["fla chunk_simple_gla"] = None if fla is None else step(
            lambda q, k, v: fla(q, k, v, g_gamma=-slopes, output_final_state=False)[0])
    anchors["sdpa causal" if device == "cuda" else "torch sdpa (cpu)"] = step(
        lambda q, k, v: F.scaled_dot_product_attention(bhld(q), bhld(k), bhld(v), is_causal=True))
    elem = torch.finfo(dtype).bits // 8
    params = dict(B=B, H=H, L=L, D=D, dtype=str(dtype).replace("torch.", ""), direction=direction,
                  lasp2_payload_bytes=B * H * D * D * 4, lasp2h_payload_bytes=2 * B * H * L * D * elem)
    return Case(op="lightning_attention", params=params, run=ours, anchors=anchors,
                flops=_flops(B, H, L, D, direction), bytes=4 * B * H * L * D * elem,
                check=_check(sa, device, dtype, D, slopes))


def lightning_suite(device: str, quick: bool, args=None) -> Iterable[Case]:
    """Cases of the lightning suite (see the module docstring)."""
    import sparseattn as sa

    if device == "cuda":
        B, H, D, dtype = 2, 16, 128, torch.bfloat16
        lengths = [2048 << i for i in range(8)]  # 2K .. 256K
        if quick:
            lengths = [2048, 16384]
        fla = _fla()
    else:
        B, H, D, dtype = 1, 2, 32, torch.float32
        lengths = [256, 1024] if quick else [256, 1024, 4096]
        fla = None
    lengths = getattr(args, "lengths", None) or lengths
    head_dims = getattr(args, "head_dims", None) or [D]
    slopes = sa.lightning_slopes(H, device=device)
    for D in head_dims:
        for direction in ("fwd", "fwd+bwd"):
            for L in lengths:
                yield _case(sa, device, dtype, B, H, L, D, direction, slopes, fla)
