"""Float64 oracles. They define what each op computes and are the correctness reference of every
kernel; they are never used as a silent fallback.

Conventions shared with the kernels: a query row that sees no key returns 0 (and LSE -inf),
where torch's math backend returns NaN.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["attention", "sparse_attention", "decode_attention", "decode_mask"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, is_causal: bool = False, return_lse: bool = False,
              dtype: torch.dtype = torch.float64):
    """Softmax attention computed in ``dtype`` (default float64).

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``; ``Hq % Hkv == 0`` (GQA).
        mask: bool (True = attend) or float (added to the scores), broadcastable to ``[B, Hq, Lq, Lk]``.
        scale: score scale, default ``1 / sqrt(D)``.
        is_causal: key j visible to query i iff ``j <= i`` (top-left, as torch).
        return_lse: also return the log-sum-exp of the scaled scores, ``[B, Hq, Lq]`` (natural log).
        dtype: compute dtype; pass the inputs' dtype to get a same-precision baseline for tolerances.

    Returns:
        out ``[B, Hq, Lq, Dv]`` in ``dtype`` (and lse).

    Example::

        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> attention(q, k, v, is_causal=True).dtype
        torch.float64
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    lq, lk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if is_causal:
        keep = keep.tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            s = s + mask.to(dtype)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    empty = l == 0
    out = (p / torch.where(empty, torch.ones_like(l), l)) @ v
    if not return_lse:
        return out
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m + torch.log(torch.where(empty, torch.ones_like(l), l)))
    return out, lse.squeeze(-1)


def sparse_attention(q, k, v, layout, scale: Optional[float] = None, return_lse: bool = False,
                     dtype: torch.dtype = torch.float64):
    """Oracle of :func:`sparseattn.sparse_attention`: dense attention under ``layout.to_dense_mask()``."""
    return attention(q, k, v, mask=layout.to_dense_mask(), scale=scale, return_lse=return_lse, dtype=dtype)


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
    ref = ref.double()
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    base_err = (base.double() - ref).abs().nan_to_num(0.0).max().item() if out.numel() else 0.0
    tol = TOLERANCE_FACTOR * base_err + TOLERANCE_FLOOR[out.dtype]
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} (baseline error {base_err:.3g})"


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                        dtype: torch.dtype = torch.float64):
    """Oracle of :func:`sparseattn.lightning_attention`: the step-by-step recurrence in ``dtype``
    (default float64), ``S_t = lambda S_{t-1} + k_t^T v_t`` from ``S_{-1} = S0`` (or zeros),
    ``o_t = scale q_t S_t``, with ``lambda_h = exp(-slopes[h])`` (1 when slopes is None).

    Args:
        q, k: ``[B, H, L, Dk]``; v: ``[B, H, L, Dv]``; slopes ``[H]`` or None; scale default
            ``1 / sqrt(Dk)``; initial_state ``[B, H, Dk, Dv]`` or None.
        dtype: compute dtype (state included); pass the inputs' dtype for a same-precision baseline.

    Returns:
        (o ``[B, H, L, Dv]``, final state ``[B, H, Dk, Dv]``), both in ``dtype``. Differentiable.

    Example::

        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> o, s = lightning_attention(q, k, v, torch.tensor([0.5, 0.1]))
        >>> o.dtype, s.shape
        (torch.float64, torch.Size([1, 2, 16, 16]))
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, H, L, Dk = q.shape
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    state = (initial_state.to(dtype) if initial_state is not None
             else torch.zeros(B, H, Dk, v.shape[-1], dtype=dtype, device=q.device))
    lam = None if slopes is None else torch.exp(-slopes.reshape(H).to(dtype)).view(1, H, 1, 1)
    outs = []
    for t in range(L):
        if lam is not None:
            state = lam * state
        state = state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], state) * scale)
    o = torch.stack(outs, 2) if outs else q.new_empty(B, H, 0, v.shape[-1])
    return o, state


__all__ += ["lightning_attention"]


def decode_mask(q_len: int, cache_len: int, cache_seqlens: Optional[torch.Tensor] = None, layout=None,
                batch: int = 1, device=None) -> torch.Tensor:
    """Element mask of decode: bool ``[B, Hl|1, Lq, Lmax]``, True = attend.

    Query row i of sequence b sits at position ``cache_seqlens[b] - Lq + i`` and sees key j iff
    ``j <= cache_seqlens[b] - Lq + i`` (bottom-right causal; keys past the length are excluded
    with it) and, with a layout (built for ``(Lq, Lmax)``), key block ``j // BLOCK_K`` is listed.
    """
    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), cache_len, dtype=torch.int64, device=device)
    n = cache_seqlens.long().to(device)
    rows = n[:, None, None] - q_len + torch.arange(q_len, device=device)[None, :, None]
    keep = (torch.arange(cache_len, device=device)[None, None, :] <= rows)[:, None]      # [B, 1, Lq, Lmax]
    if layout is not None:
        bk = layout.block_size[1]
        partial, full = layout._tile_masks()
        blocks = (partial | full)[:, :, 0, :].to(device)                                 # [Bl, Hl, nK]
        keep = keep & blocks.repeat_interleave(bk, -1)[..., None, :cache_len]
    return keep


def decode_attention(q, k_cache, v_cache, layout=None, cache_seqlens: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, return_lse: bool = False, dtype: torch.dtype = torch.float64):
    """Oracle of :func:`sparseattn.decode_attention`: dense attention under :func:`decode_mask`."""
    mask = decode_mask(q.shape[2], k_cache.shape[2], cache_seqlens, layout, q.shape[0], q.device)
    return attention(q, k_cache, v_cache, mask=mask, scale=scale, return_lse=return_lse, dtype=dtype)
