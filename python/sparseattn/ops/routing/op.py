"""Routing attention (Routing Transformer, Roy et al., TACL 2021): balanced k-means clusters of
queries and keys, exact softmax attention inside each cluster, outputs averaged back per token.

Naming chain: public :func:`routing_attention` (here) -> the engine's
``sparseattn::sparse_attention_fwd`` custom op (:mod:`..attention.op`, Triton kernels or the CPU
path) on the gathered clusters -> oracle :func:`.naive.routing_attention`
(``sparseattn.reference.routing_attention``). No kernel of its own: routing, gather and the
scatter are torch ops; the clusters run as a batch of short sequences (``[B, H * C, w, D]``)
through the block-sparse engine, with a layout built on the device (no host read), so the whole
op runs inside ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ...layout import BlockLayout
from ..attention.op import sparse_attention
from ..common import check_dtype_and_dim, check_inputs

LN_EPS = 1e-6      # the reference code's layer_norm epsilon
_TILE = 64         # layout tile of the cluster sequences
_SCATTER_CHUNK = 1 << 24  # gathered elements per step of the scatter-mean


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Layer norm over the last dim without gain or bias (``layer_norm(..., scaling=False)``),
    computed in fp32 (fp64 for fp64 inputs)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.layer_norm(x.to(dt), (x.shape[-1],), eps=LN_EPS)


def _check_centroids(centroids, H, D):
    if not isinstance(centroids, torch.Tensor) or not centroids.is_floating_point():
        raise TypeError(f"centroids: expected a floating point tensor [H, C, D], got {type(centroids).__name__}")
    if centroids.dim() != 3 or centroids.shape[0] != H or centroids.shape[2] != D or centroids.shape[1] < 1:
        raise ValueError(f"centroids: expected shape [H={H}, C >= 1, D={D}], got {tuple(centroids.shape)}")


def route(x_normed: torch.Tensor, centroids: torch.Tensor, window: int) -> torch.Tensor:
    """Balanced routing: for each cluster the ``window`` items with the largest dot product with
    its centroid (ties towards the lower position), sorted by position.

    Args:
        x_normed: ``[B, H, L, D]`` (layer-normalised queries or keys); centroids: ``[H, C, D]``.
    Returns:
        int64 ``[B, H, C, window]`` positions, ascending in each cluster.
    """
    d = torch.einsum("bhld,hcd->bhcl", x_normed.detach(), centroids.detach().to(x_normed.dtype))
    top = d.sort(dim=-1, descending=True, stable=True).indices[..., :window]
    return top.sort(dim=-1).values


def _cluster_layout(q_idx, k_idx, w: int, causal: bool, same_lists: bool) -> BlockLayout:
    """Layout of the gathered clusters ``[B, H * C]`` sequences of ``w`` items: dense, causal over
    slots (shared lists: slot order is position order), or the position rule ``k_pos <= q_pos``
    (separate lists) as an element mask with per-tile attended / full classes."""
    dev, nw = q_idx.device, math.ceil(w / _TILE)
    if not causal or same_lists:
        ids = torch.arange(nw, device=dev).expand(1, 1, nw, nw)
        return BlockLayout.from_topk(ids, _TILE, (w, w), causal="top_left" if causal else None, validate=False)
    B, H, C, _ = q_idx.shape
    qp, kp = q_idx.reshape(B, H * C, w), k_idx.reshape(B, H * C, w)
    starts = torch.arange(nw, device=dev) * _TILE
    ends = torch.clamp(starts + _TILE, max=w) - 1
    # sorted positions: a tile has a visible pair iff its first key <= its last query, and is all
    # visible iff its last key <= its first query
    attended = kp[..., None, starts] <= qp[..., ends, None]
    full = kp[..., None, ends] <= qp[..., starts, None]
    mask = kp[..., None, :] <= qp[..., :, None]
    return BlockLayout.from_block_mask(attended, _TILE, (w, w), mask=mask, partial_blocks=attended & ~full,
                                       sync_free=True)


def _scatter_mean(out_g: torch.Tensor, q_idx: torch.Tensor, L: int, count_eps: float) -> torch.Tensor:
    """Cluster outputs ``[B, H, C, w, Dv]`` -> per-token ``[B, H, L, Dv]``: the sum over the clusters
    holding a token divided by (their number + count_eps), 0 for a token in none. Deterministic:
    each token gathers its (at most C) cluster outputs through a slot table and sums them in
    cluster order, in fp32, a chunk of clusters at a time (no atomics)."""
    B, H, C, w, Dv = out_g.shape
    dev = out_g.device
    slot = torch.full((B, H, L, C), -1, dtype=torch.long, device=dev)
    slot.scatter_(2, q_idx.transpose(-1, -2), torch.arange(w, device=dev)[:, None].expand(B, H, w, C))
    count = (slot >= 0).sum(-1, keepdim=True)
    flat = torch.where(slot >= 0, slot + torch.arange(C, device=dev) * w, C * w)  # C * w: a zero row
    src = torch.cat([out_g.reshape(B, H, C * w, Dv), out_g.new_zeros(B, H, 1, Dv)], 2)
    acc = torch.zeros(B, H, L, Dv, dtype=torch.float64 if out_g.dtype == torch.float64 else torch.float32, device=dev)
    step = max(1, _SCATTER_CHUNK // max(1, B * H * L * Dv))
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        idx = flat[..., c0:c1].reshape(B, H, L * (c1 - c0), 1).expand(-1, -1, -1, Dv)
        acc = acc + src.gather(2, idx).view(B, H, L, c1 - c0, Dv).to(acc.dtype).sum(3)
    return torch.where(count > 0, acc / (count + count_eps), 0.0)


def routing_attention(q: torch.Tensor, k: Optional[torch.Tensor], v: torch.Tensor, centroids: torch.Tensor,
                      window: int, *, share_qk: bool = False, causal: bool = True, scale: Optional[float] = None,
                      return_clusters: bool = False, count_eps: float = 0.0):
    """Routing attention: each head's queries and keys are routed to ``C`` balanced clusters and
    attend within them.

    Per (batch, head): queries and keys are layer-normalised without gain (the attention uses the
    normalised q and k); each cluster ``c`` takes the ``window`` queries and the ``window`` keys
    with the largest dot product with centroid ``c`` (an item may be in several clusters or none;
    ties towards the lower position), sorted by position; each query attends the keys of its
    cluster under the causal rule by position (``k_pos <= q_pos``; a query with no such key in a
    cluster gets 0 from it); a query's output is its outputs summed over the clusters holding it,
    divided by (their number + ``count_eps``), 0 if none.

    Gradients flow to q, k and v (through the layer norm), not to the centroids (routing is
    discrete); train them with :func:`routing_kmeans_update`. The scatter-mean is deterministic
    (no atomics); its backward is torch's gather backward.

    Cost: routing ``O(L C D)``, attention ``O(C w^2 D)`` on the block-sparse kernels. Separate
    q/k lists with ``causal`` also build an element mask of ``B H C w^2`` bools (the position rule
    is no built-in in-block kind); shared lists and non-causal clusters need none.

    Args:
        q: ``[B, H, L, D]``; k: ``[B, H, L, D]``, or None with ``share_qk``; v: ``[B, H, L, D]``;
            float16, bfloat16 or float32.
        centroids: ``[H, C, D]``, one set per head (the reference initialises them as
            ``layer_norm(randn)``).
        window: items per cluster (int >= 1; more than L takes all L).
        share_qk: keys are the (normalised) queries and share their clusters (the reference's
            default for language models); then ``k`` must be None or ``q`` itself.
        causal: the causal rule inside clusters; False: every key of the cluster.
        scale: score scale, default ``1 / sqrt(D)``. The reference code scales q before the
            layer norm, which undoes it: pass ``scale=1.0`` to reproduce its logits.
        return_clusters: also return the memberships.
        count_eps: added to the number of clusters in the average; the reference code uses 0.01
            (``count + 1e-2``), so its outputs are slightly shrunk.

    Returns:
        out ``[B, H, L, D]`` in q's dtype; with ``return_clusters`` also
        ``(q_clusters, k_clusters)``, int64 ``[B, H, C, w]`` positions sorted ascending
        (``k_clusters is q_clusters`` with ``share_qk``), what
        ``sparseattn.reference.routing_attention`` takes.

    Quirks of the reference code not reproduced: with separate query and key lists it masks by
    slot order (key slot <= query slot) rather than by position; it masks keys whose value vector
    is all zeros (padding); it adds relative position embeddings over slot distance.

    Example::

        >>> import torch, torch.nn.functional as F, sparseattn as sa
        >>> q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))
        >>> centroids = F.layer_norm(torch.randn(2, 4, 64), (64,))        # [H, C, D]
        >>> out = sa.routing_attention(q, k, v, centroids, window=64)
        >>> centroids = sa.routing_kmeans_update(centroids, torch.cat([q, k], 2))
    """
    if share_qk:
        if k is not None and k is not q:
            raise ValueError("k: expected None (or q itself) with share_qk=True: the keys are the queries")
        k = q
    elif k is None:
        raise ValueError("k: expected a tensor [B, H, L, D] (None only with share_qk=True)")
    B, H, Hkv, L, Lk, D = check_inputs(q, k, v, gqa=True)
    if Hkv != H:
        raise ValueError(f"k: expected {H} heads as q (routing attention has no GQA), got {Hkv}")
    check_dtype_and_dim(q)
    if Lk != L:
        raise ValueError(f"q, k: expected self-attention over one sequence (the same length), got {L} and {Lk}")
    _check_centroids(centroids, H, D)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected an int >= 1, got {window!r}")
    if not isinstance(count_eps, (int, float)) or isinstance(count_eps, bool) or count_eps < 0:
        raise ValueError(f"count_eps: expected a float >= 0, got {count_eps!r}")
    C, w = centroids.shape[1], min(window, L)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    qn32 = layer_norm(q)
    kn32 = qn32 if share_qk else layer_norm(k)
    q_idx = route(qn32, centroids, w)
    k_idx = q_idx if share_qk else route(kn32, centroids, w)
    qn, kn = qn32.to(q.dtype), kn32.to(q.dtype)

    def gather(x, idx):
        return x.gather(2, idx.reshape(B, H, C * w, 1).expand(-1, -1, -1, x.shape[-1])).view(B, H * C, w, x.shape[-1])

    layout = _cluster_layout(q_idx, k_idx, w, causal, share_qk)
    out_g = sparse_attention(gather(qn, q_idx), gather(kn, k_idx), gather(v, k_idx), layout, scale=scale)
    out = _scatter_mean(out_g.view(B, H, C, w, -1), q_idx, L, float(count_eps)).to(q.dtype)
    return (out, (q_idx, k_idx)) if return_clusters else out


@torch.no_grad()
def routing_kmeans_update(centroids: torch.Tensor, x: torch.Tensor, decay: float = 0.999) -> torch.Tensor:
    """One EMA k-means step of the routing centroids (a training helper; no gradient).

    Each item of ``x`` (layer-normalised without gain, as :func:`routing_attention` does) is
    assigned to its nearest centroid (largest dot product, ties towards the lower cluster); each
    cluster that got items moves to ``decay * centroid + (1 - decay) * mean of its items``; a
    cluster with none is unchanged. Pass queries and keys together (``torch.cat([q, k], 2)``): the
    reference updates from both.

    Args:
        centroids: ``[H, C, D]``; x: ``[B, H, L, D]``; decay: in [0, 1).
    Returns:
        the new centroids ``[H, C, D]`` (centroids' dtype; the input is not modified).

    The reference code keeps EMA sums and counts as separate state (VQ-VAE style, with Laplace
    smoothing of the counts); this stateless step averages within the batch instead.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating point tensor [B, H, L, D], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    _check_centroids(centroids, x.shape[1], x.shape[3])
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f"decay: expected a float in [0, 1), got {decay!r}")
    xn = layer_norm(x)
    mu = centroids.to(xn.dtype)
    assign = torch.einsum("bhld,hcd->bhlc", xn, mu).argmax(-1)                      # [B, H, L]
    onehot = F.one_hot(assign, mu.shape[1]).to(xn.dtype)                              # [B, H, L, C]
    sums = torch.einsum("bhlc,bhld->hcd", onehot, xn)
    counts = onehot.sum((0, 2))[..., None]                                            # [H, C, 1]
    new = decay * mu + (1 - decay) * sums / counts.clamp(min=1)
    return torch.where(counts > 0, new, mu).to(centroids.dtype)
