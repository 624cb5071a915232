"""Float64 oracles of the attention redistribution methods: dense probabilities, then the
reference code's formulas (``../shared/specs/methods.md``, sections VAR and ACT)."""
from __future__ import annotations

import math
from typing import Optional

import torch


def _probabilities(q, k, keep, scale, dtype):
    q, k = q.to(dtype), k.to(dtype)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    return torch.where(torch.isneginf(lse), 0.0, torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)))


def _causal_keep(lq, lk, is_causal, device):
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    return keep.tril(lk - lq) if is_causal else keep


def var_attention(q, k, v, image_mask, sink_mask, *, p=0.6, rho=0.5, summ=0.2, query_mask=None, is_causal=True,
                  scale=None, cache_seqlens=None, selected: Optional[torch.Tensor] = None, dtype=torch.float64):
    """VAR on the dense probabilities ``A`` (causal bottom-right): the selection
    ``portion = sum_{S_v} A / sum_{I} (A + 1e-6) <= rho`` and ``sum_I A >= summ`` (rows allowed by
    ``query_mask``, batch elements with a visual sink), then for selected rows sinks (visual and
    text) keep ``p A`` and ``(1 - p)`` of their mass goes to the non-sink image keys in proportion to
    ``A``. ``selected`` ``[B, Hq, Lq]`` overrides the selection (to test away from thresholds).
    ``cache_seqlens``: the decode form (row i of sequence b at ``n_b - Lq + i``, keys ``< n_b``).
    Returns (out ``[B, Hq, Lq, Dv]``, selected)."""
    B, H, lq, _ = q.shape
    lk = k.shape[2]
    keep = _causal_keep(lq, lk, is_causal, q.device)
    if cache_seqlens is not None:
        n = cache_seqlens.long()[:, None, None, None]
        j = torch.arange(lk, device=q.device)
        keep = (j <= n - lq + torch.arange(lq, device=q.device)[:, None]) & (j < n)
    A = _probabilities(q, k, keep, scale, dtype)
    img, snk = image_mask[:, None, None, :], sink_mask[:, None, None, :]
    sv, st, ni = img & snk, snk & ~img, img & ~snk
    summation = (A * img).sum(-1)
    portion = (A * sv).sum(-1) / ((A + 1e-6) * img).sum(-1)
    if selected is None:
        selected = (portion <= rho) & (summation >= summ)
        selected = selected & (image_mask & sink_mask).any(-1)[:, None, None]
        if query_mask is not None:
            selected = selected & query_mask[:, None, :]
    m_ni = (A * ni).sum(-1, keepdim=True)
    selected = selected & (m_ni[..., 0] > 0)
    budget = (1 - p) * (A * (sv | st)).sum(-1, keepdim=True)
    new = torch.where(sv | st, p * A, A) + torch.where(ni, budget * A / torch.where(m_ni > 0, m_ni, 1.0), 0.0)
    A = torch.where(selected[..., None], new, A)
    vv = v.to(dtype).repeat_interleave(H // v.shape[1], 1)
    return A @ vv, selected


def act_attention(q, k, v, *, alpha=0.1, beta=0.4, is_causal=True, scale=None, sinks: Optional[torch.Tensor] = None,
                  dtype=torch.float64):
    """ACT on the dense probabilities ``A`` (square): column means ``c_j = sum_i A_ij / (rows that
    can see j)``, sinks ``c_j > alpha`` minus the first (smallest) detected index per (batch, head);
    every row but row 0 gives ``(1 - beta)`` of its sink mass to its other visible keys in proportion
    to ``A`` and keeps ``beta A`` on the sinks; row 0 is unchanged (the reference's ``A'[0, 0] = 1``
    under causal masking). ``sinks`` ``[B, Hq, Lk]`` overrides the detection. Returns (out, sinks)."""
    B, H, lq, _ = q.shape
    lk = k.shape[2]
    keep = _causal_keep(lq, lk, is_causal, q.device)
    A = _probabilities(q, k, keep, scale, dtype)
    if sinks is None:
        c = A.sum(2) / keep.sum(0).to(dtype)
        sinks = c > alpha
        first = torch.where(sinks, torch.arange(lk, device=q.device), lk).amin(-1, keepdim=True)
        sinks = sinks & (torch.arange(lk, device=q.device) != first)
    s = sinks[:, :, None, :]
    m_s = (A * s).sum(-1, keepdim=True)
    m_o = (A * ~s).sum(-1, keepdim=True)
    new = torch.where(s, beta * A, A + (1 - beta) * m_s * A / torch.where(m_o > 0, m_o, 1.0))
    rows = (torch.arange(lq, device=q.device) >= 1)[:, None] & (m_o > 0)
    A = torch.where(rows, new, A)
    vv = v.to(dtype).repeat_interleave(H // v.shape[1], 1)
    return A @ vv, sinks
