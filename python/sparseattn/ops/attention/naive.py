"""Float64 oracles of the attention ops: dense softmax attention under a mask, and
:func:`sparseattn.sparse_attention` under ``layout.to_dense_mask()``. A row that sees no key gives
0 (LSE -inf), where torch's math backend gives NaN."""
from __future__ import annotations

import math
from typing import Optional

import torch


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
