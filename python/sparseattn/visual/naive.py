"""Float64 oracles of :mod:`sparseattn.visual`, written from the papers' reference code (loops and
dense matrices, small sizes only): the definitions the tests compare against. Never a fallback.

Example::

    >>> import torch
    >>> from sparseattn.visual import naive
    >>> naive.cca_mask(image_start=1, grid=(2, 2), L=6).int().tolist()[1:5]   # image rows: one ring
    [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]
"""
from __future__ import annotations

import math

import torch


def cca_rings(grid):
    """Rings of an H x W grid built as CCA's code does: a rectangle that shrinks by one patch on
    every side per ring, every patch on its border getting that ring. int64 ``[H * W]``."""
    H, W = grid
    ring = torch.full((H, W), -1, dtype=torch.int64)
    r0, c0, r1, c1, n = 0, 0, H - 1, W - 1, 0
    while r0 <= r1 and c0 <= c1:
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                if r in (r0, r1) or c in (c0, c1):
                    ring[r, c] = n
        r0, c0, r1, c1, n = r0 + 1, c0 + 1, r1 - 1, c1 - 1, n + 1
    return ring.reshape(-1)


def cca_positions(image_start: int, grid, L: int) -> torch.Tensor:
    """CCA's position ids of tokens 0..L-1 (text, ``image_start + ring``, then text from
    ``image_start + max_ring + 1``). int64 ``[L]``."""
    ring = cca_rings(grid)
    n_img, n_pos = ring.numel(), int(ring.max()) + 1
    out = []
    for t in range(L):
        if t < image_start:
            out.append(t)
        elif t < image_start + n_img:
            out.append(image_start + int(ring[t - image_start]))
        else:
            out.append(t - n_img + n_pos)
    return torch.tensor(out, dtype=torch.int64)


def cca_mask(image_start: int, grid, L: int) -> torch.Tensor:
    """CCA's mask as its code builds it: causal, with the image x image block replaced by
    ``ring(key) <= ring(query)``. bool ``[L, L]``."""
    m = torch.ones(L, L, dtype=torch.bool).tril()
    ring = cca_rings(grid)
    s, e = image_start, min(image_start + ring.numel(), L)
    for i in range(s, e):
        for j in range(s, e):
            m[i, j] = bool(ring[j - s] <= ring[i - s])
    return m


def modality_mutual_mask(image_start: int, image_len: int, question_end: int, L: int) -> torch.Tensor:
    """AKI's ``_make_modality_mutual_mask`` (indices in the spliced sequence): causal, then
    ``M[img : img + Nv, img + Nv : question_end] = 1``. bool ``[L, L]``."""
    m = torch.ones(L, L, dtype=torch.bool).tril()
    e = image_start + image_len
    m[image_start:e, e:question_end] = True
    return m


def row_softmax(scores: torch.Tensor, visible=None) -> torch.Tensor:
    """Softmax of the last axis in float64; a row with nothing visible is 0."""
    s = scores.double()
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))
    z = p.sum(-1, keepdim=True)
    return p / torch.where(z > 0, z, 1.0)


def _probs(q, k, scale, visible=None):
    """Dense float64 probabilities ``[B, Hq, Lq, Lk]`` (GQA by repeating K)."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return row_softmax(q @ k.transpose(-1, -2) * scale, visible)


def cls_importance(q, k, cls_index=0, patch_slice=slice(1, None), scale=None):
    """FasterVLM: ``attentions[:, :, cls, patch_slice].mean(heads)`` of the dense float64 softmax."""
    return _probs(q, k, scale)[:, :, cls_index, patch_slice].mean(1)


def last_query_importance(q, k, key_slice, is_causal=True, scale=None, key_padding_mask=None):
    """FastV: the dense float64 softmax (SDPA's top-left causal mask), head mean, last row, columns."""
    Lq, Lk = q.shape[2], k.shape[2]
    vis = torch.ones(Lq, Lk, dtype=torch.bool).tril() if is_causal else torch.ones(Lq, Lk, dtype=torch.bool)
    vis = vis[None, None]
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.cpu()[:, None, None, :]
    row = _probs(q.cpu(), k.cpu(), scale, vis)[:, :, -1].mean(1)                 # [B, Lk]
    if isinstance(key_slice, slice):
        return row[:, key_slice]
    cols = key_slice.cpu().long()
    return torch.stack([row[b, cols[b] if cols.dim() == 2 and cols.shape[0] > 1 else cols.reshape(-1)]
                        for b in range(row.shape[0])])


def damro_scores(q_merged, k_merged):
    """DAMRO: ``softmax(Q K^T * C^-0.5)[:, 0, 1:]`` over the merged heads, float64 ``[B, N - 1]``."""
    q, k = q_merged.double(), k_merged.double()
    return row_softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))[:, 0, 1:]


def compact_kv(k_cache, v_cache, keep, cache_seqlens=None):
    """Per-sequence loop: the kept rows (bool ``keep [B, Lmax]``, below the length) in order.
    Returns lists (k_b [Hkv, n_b, D], v_b, positions_b) per sequence."""
    out = []
    for b in range(k_cache.shape[0]):
        n = k_cache.shape[2] if cache_seqlens is None else int(cache_seqlens[b])
        pos = [t for t in range(n) if bool(keep[b, t])]
        idx = torch.tensor(pos, dtype=torch.long, device=k_cache.device)
        out.append((k_cache[b][:, idx], v_cache[b][:, idx], pos))
    return out


def massive_activation_sinks(hidden, dims, tau=20.0, eps=1e-6):
    """VAR's DimProspector in float64: ``|h / sqrt(mean(h^2) + eps)|`` in any of ``dims`` > tau."""
    h = hidden.double()
    r = (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)).abs()
    return r[..., list(dims)].amax(-1) > tau


def massive_activation_ratio(hidden, dims, eps=1e-6):
    """The float64 statistic itself (for tests that keep away from the threshold)."""
    h = hidden.double()
    r = (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)).abs()
    return r[..., list(dims)].amax(-1)
