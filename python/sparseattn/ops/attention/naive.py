"""Float64 oracles of the attention ops: dense softmax attention under a mask, and
:func:`sparseattn.sparse_attention` under ``layout.to_dense_mask()``. A row that sees no key gives
0 (LSE -inf), where torch's math backend gives NaN.

Score options (each applied in this order, on the scaled scores ``s = q.k * scale``): ``softcap``
``c * tanh(s / c)`` (Gemma 2), ALiBi ``-slope * |i + Lk - Lq - j|`` (FlashAttention's definition),
``key_bias`` added per key, then the float ``mask``; the key padding mask drops keys. Gradients go
to q, k, v only (exactly through the softcap)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...layout.predicates import alibi_bias, alibi_distance, kinds_keep, softcap_scores


def _score_options(s: torch.Tensor, key_bias, softcap, alibi_slopes, alibi_dist=None) -> torch.Tensor:
    """Softcap, ALiBi and the key bias on scaled scores ``s [B, Hq, Lq, Lk]`` (in ``s``'s dtype).
    ``alibi_dist`` (broadcastable to ``[B, 1, Lq, Lk]``): ALiBi's distance, default FlashAttention's
    ``i + Lk - Lq - j``."""
    lq, lk = s.shape[-2:]
    if softcap is not None:
        s = softcap_scores(s, softcap)
    if alibi_slopes is not None:
        a = alibi_slopes.to(s.dtype)
        a = a.reshape(1, -1, 1, 1) if a.dim() == 1 else a[:, :, None, None]
        if alibi_dist is None:
            alibi_dist = alibi_distance(torch.arange(lq, device=s.device)[:, None],
                                        torch.arange(lk, device=s.device)[None, :], lq, lk)
        s = s + alibi_bias(a, alibi_dist)
    if key_bias is not None:
        s = s + key_bias.to(s.dtype)[..., None, :]
    return s


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, is_causal: bool = False, return_lse: bool = False,
              dtype: torch.dtype = torch.float64, *, key_padding_mask: Optional[torch.Tensor] = None,
              key_bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
              alibi_slopes: Optional[torch.Tensor] = None, alibi_dist: Optional[torch.Tensor] = None):
    """Softmax attention computed in ``dtype`` (default float64).

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``; ``Hq % Hkv == 0`` (GQA).
        mask: bool (True = attend) or float (added to the scores), broadcastable to ``[B, Hq, Lq, Lk]``.
        scale: score scale, default ``1 / sqrt(D)``.
        is_causal: key j visible to query i iff ``j <= i`` (top-left, as torch).
        return_lse: also return the log-sum-exp of the final scores, ``[B, Hq, Lq]`` (natural log).
        dtype: compute dtype; pass the inputs' dtype to get a same-precision baseline for tolerances.
        key_padding_mask: bool ``[B, Lk]``, True = the key exists; other keys are dropped.
        key_bias: float ``[B|1, Hq|1, Lk]`` added to every query's score of key j (may hold -inf).
        softcap: ``c > 0``: scores become ``c * tanh(s / c)`` before ALiBi, key_bias and ``mask``.
        alibi_slopes: ``[Hq]`` or ``[B, Hq]``: adds ``-slope * |i + Lk - Lq - j|``.
        alibi_dist: ALiBi's distance instead of ``i + Lk - Lq - j`` (positions given as data).

    Returns:
        out ``[B, Hq, Lq, Dv]`` in ``dtype`` (and lse).

    Example::

        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> attention(q, k, v, is_causal=True).dtype
        torch.float64
        >>> attention(q, k, v, softcap=30.0, alibi_slopes=torch.tensor([0.5, 0.25])).shape
        torch.Size([1, 2, 8, 16])
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    lq, lk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = _score_options((q @ k.transpose(-1, -2)) * scale, key_bias, softcap, alibi_slopes, alibi_dist)
    keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if is_causal:
        keep = keep.tril()
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.to(torch.bool)[:, None, None, :]
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
                     dtype: torch.dtype = torch.float64, *, key_padding_mask: Optional[torch.Tensor] = None,
                     key_bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                     alibi_slopes: Optional[torch.Tensor] = None):
    """Oracle of :func:`sparseattn.sparse_attention`: dense attention under ``layout.to_dense_mask()``,
    with the same score options as :func:`attention` (ALiBi distances from the layout's positions
    when it has some, :meth:`BlockLayout.alibi_distance`)."""
    dist = None
    if alibi_slopes is not None and layout.q_pos is not None:
        lq, lk = layout.seq_lens
        b = torch.arange(layout.q_pos.shape[0], device=q.device)[:, None, None, None]
        dist = layout.alibi_distance(torch.arange(lq, device=q.device)[:, None],
                                     torch.arange(lk, device=q.device)[None, :], b)
    return attention(q, k, v, mask=layout.to_dense_mask(), scale=scale, return_lse=return_lse, dtype=dtype,
                     key_padding_mask=key_padding_mask, key_bias=key_bias, softcap=softcap,
                     alibi_slopes=alibi_slopes, alibi_dist=dist)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool = False, window: Optional[int] = None,
                     sinks: int = 0, softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, return_lse: bool = False, dtype: torch.dtype = torch.float64):
    """Oracle of :func:`sparseattn.varlen_attention`: :func:`attention` on each sequence of the packed
    batch on its own (``[total, H, D]`` inputs, int32 ``cu_seqlens``), bottom-right causal with a
    window and sinks in the sequence's positions. Returns out ``[total_q, Hq, Dv]`` (and lse
    ``[Hq, total_q]``) in ``dtype``."""
    outs, lses = [], []
    for a, b, c, d in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k[:-1].tolist(),
                          cu_seqlens_k[1:].tolist()):
        qs, ks, vs = (t[x:y].transpose(0, 1)[None] for t, x, y in ((q, a, b), (k, c, d), (v, c, d)))
        lq, lk = b - a, d - c
        rows, cols = torch.arange(lq, device=q.device)[:, None], torch.arange(lk, device=q.device)[None, :]
        keep = kinds_keep(rows + (lk - lq), cols, causal, window, sinks)
        o, l = attention(qs, ks, vs, mask=keep, scale=scale, return_lse=True, dtype=dtype, softcap=softcap,
                         alibi_slopes=alibi_slopes)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    out, lse = torch.cat(outs), torch.cat(lses, -1)
    return (out, lse) if return_lse else out
