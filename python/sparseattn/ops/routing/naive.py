"""Float64 oracle of :func:`sparseattn.routing_attention`, given the cluster memberships (which
``routing_attention(..., return_clusters=True)`` returns): per cluster, dense softmax attention
over its members under the position rule, then the scatter-mean."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

LN_EPS = 1e-6


def routing_attention(q: torch.Tensor, k: Optional[torch.Tensor], v: torch.Tensor, q_clusters: torch.Tensor,
                      k_clusters: torch.Tensor, *, share_qk: bool = False, causal: bool = True,
                      scale: Optional[float] = None, count_eps: float = 0.0, dtype: torch.dtype = torch.float64):
    """Routing attention computed in ``dtype`` (default float64) for given memberships.

    Args:
        q, k, v: ``[B, H, L, D]`` (k ignored with ``share_qk``: the keys are the normalised q).
        q_clusters, k_clusters: int ``[B, H, C, w]`` positions of each cluster's queries and keys.
        share_qk, causal, scale, count_eps: as in :func:`sparseattn.routing_attention`.
        dtype: compute dtype (pass q's dtype for a same-precision baseline).

    Returns:
        ``[B, H, L, D]`` in ``dtype``.
    """
    q, v = q.to(dtype), v.to(dtype)
    qn = F.layer_norm(q, (q.shape[-1],), eps=LN_EPS)
    kn = qn if share_qk else F.layer_norm(k.to(dtype), (k.shape[-1],), eps=LN_EPS)
    B, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, H, L, v.shape[-1], dtype=dtype, device=q.device)
    count = torch.zeros(B, H, L, dtype=dtype, device=q.device)
    for b in range(B):
        for h in range(H):
            for c in range(q_clusters.shape[2]):
                qi, ki = q_clusters[b, h, c].long().to(q.device), k_clusters[b, h, c].long().to(q.device)
                s = (qn[b, h, qi] @ kn[b, h, ki].T) * scale
                if causal:
                    s = s.masked_fill(ki[None, :] > qi[:, None], float("-inf"))
                seen = torch.isfinite(s).any(-1, keepdim=True)
                p = torch.softmax(torch.where(seen, s, 0.0), -1) * seen
                out[b, h].index_add_(0, qi, p @ v[b, h, ki])
                count[b, h].index_add_(0, qi, torch.ones(len(qi), dtype=dtype, device=q.device))
    return torch.where(count[..., None] > 0, out / (count[..., None] + count_eps), 0.0)
