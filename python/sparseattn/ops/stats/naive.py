"""Float64 oracle of :func:`sparseattn.attention_stats`: the dense probabilities under the layout's
mask, then each statistic by its definition."""
from __future__ import annotations

import math
from typing import Optional

import torch


def attention_stats(q, k, layout, *, scale: Optional[float] = None, query_weights=None, key_groups=None,
                    num_groups: Optional[int] = None, head_reduce: str = "none", dtype=torch.float64) -> dict:
    """Statistics of ``P = softmax(q k^T * scale)`` under ``layout.to_dense_mask()`` (rows that see
    nothing are 0), computed in ``dtype``: a dict with ``column_sum`` / ``column_max`` ``[B, Hq, Lk]``
    (``sum_i w_i P_ij`` and ``max_{i: w_i != 0} P_ij``), ``group_mass`` ``[B, Hq, Lq, G]``,
    ``block_sums`` ``[B, Hq, nQ, nK]``, ``lse`` ``[B, Hq, Lq]``; ``head_reduce`` "mean" / "sum" reduces
    every statistic over the query heads (dim 1 of size 1)."""
    q, k = q.to(dtype), k.to(dtype)
    B, H, lq, d = q.shape
    lk = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], 1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~layout.to_dense_mask(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None]).nan_to_num(0.0)
    p = torch.where(torch.isneginf(lse)[..., None], 0.0, p)
    w = torch.ones(1, 1, lq, dtype=dtype, device=q.device) if query_weights is None else query_weights.to(dtype)
    w = w if w.dim() == 3 else w[:, None]
    out = {"lse": lse,
           "column_sum": (p * w[..., None]).sum(2),
           "column_max": torch.where(w[..., None] != 0, p, 0.0).amax(2)}
    if key_groups is not None:
        G = int(key_groups.max()) + 1 if num_groups is None else num_groups
        kg = key_groups if key_groups.dim() == 3 else key_groups[:, None]
        onehot = (kg.long()[..., None] == torch.arange(G, device=kg.device)).to(dtype)  # [B, H|1, Lk, G]
        out["group_mass"] = torch.einsum("bhqk,bhkg->bhqg", p, onehot.expand(B, H, lk, G))
    bq, bk = layout.block_size
    nq, nk = -(-lq // bq), -(-lk // bk)
    padded = torch.nn.functional.pad(p, (0, nk * bk - lk, 0, nq * bq - lq))
    out["block_sums"] = padded.view(B, H, nq, bq, nk, bk).sum((3, 5))
    if head_reduce != "none":
        out = {n: (t.mean(1, keepdim=True) if head_reduce == "mean" else t.sum(1, keepdim=True)) if n != "lse" else t
               for n, t in out.items()}
    return out
