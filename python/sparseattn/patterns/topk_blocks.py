"""TopKBlocks: key blocks chosen per query block from a cheap pooled estimate of q.k, then exact
block-sparse attention on them (the estimate of MInference's block-sparse heads and NSA's
compression branch).

Positions follow the package (:mod:`._base`): when ``Lq != Lk`` the queries are the last Lq
positions (query row ``r`` at position ``Lk - Lq + r``), causal is bottom-right.

The estimate and the selection are torch ops in fp32 (fp64 for fp64 inputs), chunked over query
blocks so that no more than ~``_CHUNK`` scores exist at once; the lists are built on the device by
:meth:`BlockLayout.from_topk` (fixed widths, ``validate=False``): no host read, so ``layout_for``
and ``sparse_attention(q, k, v, pattern)`` run inside ``torch.compile(fullgraph=True)`` and CUDA
graphs. A fused estimate kernel is future work (the statistics issue); the estimate costs
``O(Lq/bs * Lk/bs * D)`` for ``mean_pool`` and ``O(Lq/bs * Lk * D)`` for ``max_pool``.

The oracle :func:`topk_blocks` (``sparseattn.reference.topk_blocks``) recomputes the selection in
float64 with plain loops.
"""
from __future__ import annotations

import math

import torch

from ..layout import BlockLayout
from ..ops.common import check_inputs
from ._base import MAX_TILE, MIN_TILE, _check_int

ESTIMATES = ("mean_pool", "max_pool")
_CHUNK = 1 << 25  # score elements per chunk of query blocks (128 MB of fp32)


# ----------------------------------------------------------------------------- shared pieces
def check_pattern_block(name: str, v) -> int:
    """A pattern block the kernels' layout tiles cover exactly: a power of two >= 64 (blocks
    above 128 are split into 128-wide tiles)."""
    v = _check_int(name, v, 1)
    if v < MIN_TILE or v & (v - 1):
        raise ValueError(f"{name}: expected a power of two >= {MIN_TILE} (the kernels' layout tiles are "
                         f"{MIN_TILE} or {MAX_TILE} wide; finer blocks would need per-tile bits), got {v}")
    return v


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for 16- and 32-bit inputs, fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def block_means(x: torch.Tensor, bs: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, H, ceil(L / bs), D]``: the mean of each block's rows (a last
    partial block averages its own rows), accumulated in ``dtype`` without copying ``x``."""
    n_full, rest = divmod(x.shape[2], bs)
    parts = []
    if n_full:
        parts.append(x[:, :, :n_full * bs].unflatten(2, (n_full, bs)).sum(3, dtype=dtype) / bs)
    if rest:
        parts.append(x[:, :, n_full * bs:].sum(2, keepdim=True, dtype=dtype) / rest)
    return torch.cat(parts, 2)


def topk_lowest_first(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best candidates of each row, ties broken towards the lower index: int64
    ``[..., k]`` ids in score order, -1 where a row has fewer than ``k`` candidates. ``k`` must be
    ``<= scores.shape[-1]``. A stable descending sort keeps equal scores in index order."""
    s = scores.masked_fill(~candidates, float("-inf"))
    idx = s.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.where(candidates.expand_as(s).gather(-1, idx), idx, -1)


def to_tiles(ids: torch.Tensor, bs: int, lq: int) -> tuple:
    """Pattern-block ids ``[B, H, nQ, W]`` (-1 = none) -> (layout-tile ids, tile size): blocks of 64
    or 128 are the tiles; a larger block is split into ``bs / 128`` tiles of 128 on both axes."""
    if bs <= MAX_TILE:
        return ids, bs
    r = bs // MAX_TILE
    rows = ids.repeat_interleave(r, dim=2)[:, :, :math.ceil(lq / MAX_TILE)]
    cols = rows[..., None] * r + torch.arange(r, device=ids.device)
    return torch.where(rows[..., None] >= 0, cols, -1).flatten(-2), MAX_TILE


def ids_to_block_mask(ids: torch.Tensor, nk: int) -> torch.Tensor:
    """``[..., W]`` ids (-1 = none) -> bool ``[..., nK]``."""
    mask = torch.zeros(*ids.shape[:-1], nk + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(-1, torch.where(ids >= 0, ids, nk).long(), True)
    return mask[..., :nk]


# ----------------------------------------------------------------------------- the pattern
class TopKBlocks:
    """Content-based block-sparse attention: per query block, the ``topk`` key blocks with the best
    pooled score, plus always-kept window and sink blocks.

    Block scores (pattern blocks of ``block_size`` tokens on both axes):

    * ``"mean_pool"``: (mean query of the query block) . (mean key of the key block);
    * ``"max_pool"``: max over the key block's keys of (mean query) . key.

    Per query block ``I`` (query positions ``p0..p1``, bottom-right aligned) the kept key blocks are

    * **window**: the key blocks holding ``p0..p1`` and the ``window_blocks - 1`` blocks before them
      (non-causal: also the ``window_blocks - 1`` blocks after them); none for ``window_blocks=0``;
    * **sinks**: key blocks ``0 .. sink_blocks - 1``;
    * **top-k**: the ``topk`` best of the other visible key blocks (causal: blocks starting at or
      before ``p1``), ties broken towards the lower block index. Window and sink blocks are not
      counted in ``topk``; a query block with fewer candidates keeps them all.

    Causal patterns also apply the token-level causal rule inside the kept blocks.

    GQA: the estimate is per **query** head; query head ``h`` is scored against key head
    ``h // (Hq // Hkv)`` (the head its attention reads), so the layout is ``[B, Hq, ...]``.
    Per (batch, head). Scores are not differentiated (the selection is discrete).

    Args:
        block_size: pattern block in tokens, a power of two >= 64 (128-wide tiles above 128).
        topk: key blocks chosen per query block (int >= 1).
        estimate: ``"mean_pool"`` or ``"max_pool"``.
        window_blocks: local blocks always kept (int >= 0).
        sink_blocks: first blocks always kept (int >= 0).
        causal: causal (bottom-right) or bidirectional attention.

    Example::

        >>> import torch, sparseattn as sa
        >>> q, k, v = (torch.randn(1, 2, 512, 64) for _ in range(3))
        >>> pat = sa.TopKBlocks(block_size=64, topk=2, window_blocks=1, sink_blocks=1)
        >>> layout = pat.layout_for(q, k)               # built on the device, no host read
        >>> out = sa.sparse_attention(q, k, v, pat)     # estimates per call
        >>> int(layout.kv_num_blocks.max() + layout.full_kv_num_blocks.max()) <= 4
        True
    """

    def __init__(self, block_size: int = 64, topk: int = 16, estimate: str = "mean_pool", window_blocks: int = 1,
                 sink_blocks: int = 1, causal: bool = True):
        self.block_size = check_pattern_block("block_size", block_size)
        self.topk = _check_int("topk", topk, 1)
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate: expected one of {ESTIMATES}, got {estimate!r}")
        self.estimate = estimate
        self.window_blocks = _check_int("window_blocks", window_blocks, 0)
        self.sink_blocks = _check_int("sink_blocks", sink_blocks, 0)
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        self.causal = causal

    def __repr__(self):
        return (f"TopKBlocks(block_size={self.block_size}, topk={self.topk}, estimate={self.estimate!r}, "
                f"window_blocks={self.window_blocks}, sink_blocks={self.sink_blocks}, causal={self.causal})")

    # ------------------------------------------------------------------ pieces
    def _check(self, q, k):
        B, Hq, Hkv, Lq, Lk, D = check_inputs(q, k, k, gqa=True, names=("q", "k", "k"))
        if Lq == 0 or Lk == 0:
            raise ValueError(f"q, k: expected lengths >= 1, got Lq={Lq}, Lk={Lk}")
        return B, Hq, Hkv, Lq, Lk, D

    def _keys(self, k, dt):
        """What the scores read of k: its block means (mean_pool) or k itself in ``dt`` (max_pool),
        computed once per call."""
        return block_means(k, self.block_size, dt) if self.estimate == "mean_pool" else k.to(dt)

    def _scores(self, qm, keys, lk, i0, i1):
        """Scores [B, Hq, i1 - i0, nK] of query blocks i0..i1 (qm: [B, Hkv, G, nQ, D]; keys from
        :meth:`_keys`)."""
        B, Hkv, G, _, D = qm.shape
        c = i1 - i0
        qc = qm[:, :, :, i0:i1].reshape(B, Hkv, G * c, D)
        s = qc @ keys.transpose(-1, -2)                                       # [B, Hkv, G*c, nK or Lk]
        if self.estimate == "max_pool":
            bs = self.block_size
            nk = math.ceil(lk / bs)
            s = torch.nn.functional.pad(s, (0, nk * bs - lk), value=float("-inf"))
            s = s.unflatten(-1, (nk, bs)).amax(-1)
        return s.view(B, Hkv * G, c, -1)

    def _rules(self, i0, i1, lq, lk, device):
        """(visible, forced ids) of query blocks i0..i1: visible bool [c, nK] (causal reach);
        forced int64 [c, Wf] (sinks then window blocks, -1 = none)."""
        bs, w = self.block_size, self.window_blocks
        nk = math.ceil(lk / bs)
        I = torch.arange(i0, i1, device=device)
        J = torch.arange(nk, device=device)
        off = lk - lq
        p0 = I * bs + off
        p1 = torch.clamp((I + 1) * bs, max=lq) - 1 + off
        visible = (J * bs <= p1[:, None]) if self.causal else torch.ones(i1 - i0, nk, dtype=torch.bool, device=device)
        first = torch.div(p0, bs, rounding_mode="floor") - max(w - 1, 0)
        last = torch.div(p1, bs, rounding_mode="floor") + (0 if self.causal else max(w - 1, 0))
        if w:
            span = 2 * w if not self.causal else w + 1
            win = first[:, None] + torch.arange(span, device=device)
            win = torch.where((win >= 0) & (win <= last[:, None]) & (win < nk), win, -1)
        else:
            win = torch.empty(i1 - i0, 0, dtype=torch.long, device=device)
        ns = min(self.sink_blocks, nk)
        sink = torch.arange(ns, device=device).expand(i1 - i0, ns)
        sink = torch.where(visible[:, :ns], sink, -1)
        return visible, torch.cat([sink, win], -1)

    def select_blocks(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Key-block ids per query block: int32 ``[B, Hq, nQ, W]`` (pattern blocks), the sink
        blocks, then the window blocks, then the top-k in score order; -1 for an unused slot
        (duplicates between sinks and window may occur). No host read."""
        B, Hq, Hkv, Lq, Lk, D = self._check(q, k)
        bs = self.block_size
        nq, nk = math.ceil(Lq / bs), math.ceil(Lk / bs)
        dt = compute_dtype(q)
        q, k = q.detach(), k.detach()
        qm = block_means(q, bs, dt).view(B, Hkv, Hq // Hkv, nq, D)
        keys = self._keys(k, dt)
        per_block = B * Hq * nk * (1 if self.estimate == "mean_pool" else bs)
        step = max(1, _CHUNK // max(1, per_block))
        kk = min(self.topk, nk)
        out = []
        for i0 in range(0, nq, step):
            i1 = min(nq, i0 + step)
            visible, forced = self._rules(i0, i1, Lq, Lk, q.device)
            cand = visible & ~ids_to_block_mask(forced, nk)
            top = topk_lowest_first(self._scores(qm, keys, Lk, i0, i1), cand, kk)
            out.append(torch.cat([forced.expand(B, Hq, *forced.shape), top], -1))
        return torch.cat(out, 2).to(torch.int32)

    def block_mask(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The selection as bool ``[B, Hq, nQ, nK]`` over pattern blocks (True = kept)."""
        return ids_to_block_mask(self.select_blocks(q, k), math.ceil(k.shape[2] / self.block_size))

    def block_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The estimate of every (query block, key block) pair: ``[B, Hq, nQ, nK]`` fp32 (fp64 for
        fp64 inputs), before any rule. For inspection and plots: it holds all nQ x nK scores."""
        B, Hq, Hkv, Lq, Lk, D = self._check(q, k)
        bs = self.block_size
        dt = compute_dtype(q)
        qm = block_means(q.detach(), bs, dt).view(B, Hkv, Hq // Hkv, -1, D)
        return self._scores(qm, self._keys(k.detach(), dt), Lk, 0, qm.shape[3])

    def layout_for(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        """The :class:`BlockLayout` of this selection for ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``:
        lists ``[B, Hq, ...]``, built on q's device with no host read."""
        ids = self.select_blocks(q, k)
        tiles, t = to_tiles(ids, self.block_size, q.shape[2])
        return BlockLayout.from_topk(tiles, t, (q.shape[2], k.shape[2]),
                                     causal="bottom_right" if self.causal else None, validate=False)


# ----------------------------------------------------------------------------- oracle
def topk_blocks(q: torch.Tensor, k: torch.Tensor, pattern: TopKBlocks, return_scores: bool = False):
    """Float64 oracle of :class:`TopKBlocks`' selection (``sparseattn.reference.topk_blocks``).

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0``.
        pattern: the TopKBlocks whose selection to recompute.
        return_scores: also return the float64 scores ``[B, Hq, nQ, nK]`` and the candidate mask
            ``[nQ, nK]`` (visible blocks that are neither window nor sink: where top-k chooses).

    Returns:
        bool ``[B, Hq, nQ, nK]``: the kept pattern blocks (and scores, candidates).
    """
    bs, p = pattern.block_size, pattern
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nq, nk = -(-Lq // bs), -(-Lk // bs)
    qd, kd = q.detach().double(), k.detach().double()
    off = Lk - Lq
    scores = torch.empty(B, Hq, nq, nk, dtype=torch.float64)
    for I in range(nq):
        qm = qd[:, :, I * bs:(I + 1) * bs].mean(2)                                  # [B, Hq, D]
        for J in range(nk):
            kb = kd[:, :, J * bs:(J + 1) * bs].repeat_interleave(G, 1)               # [B, Hq, n, D]
            if p.estimate == "mean_pool":
                scores[:, :, I, J] = (qm * kb.mean(2)).sum(-1)
            else:
                scores[:, :, I, J] = (kb @ qm[..., None])[..., 0].amax(-1)
    keep = torch.zeros(B, Hq, nq, nk, dtype=torch.bool)
    cand = torch.zeros(nq, nk, dtype=torch.bool)
    w = p.window_blocks
    for I in range(nq):
        p0, p1 = I * bs + off, min((I + 1) * bs, Lq) - 1 + off
        vis = [J for J in range(nk) if not p.causal or J * bs <= p1]
        lo, hi = p0 // bs - (w - 1), p1 // bs + (0 if p.causal else w - 1)
        forced = {J for J in vis if (w and lo <= J <= hi) or J < p.sink_blocks}
        cands = [J for J in vis if J not in forced]
        for J in forced:
            keep[:, :, I, J] = True
        for J in cands:
            cand[I, J] = True
        for b in range(B):
            for h in range(Hq):
                s = scores[b, h, I]
                for J in sorted(cands, key=lambda j: (-s[j].item(), j))[:p.topk]:
                    keep[b, h, I, J] = True
    return (keep, scores, cand) if return_scores else keep
