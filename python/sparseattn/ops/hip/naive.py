"""Float64 oracles of HiP attention (``config.py``'s docstring: the algorithm and where we depart from
HiP's code; ``../shared/specs/methods.md`` section 1: HiP's code): the tree search that estimates
the mask (:func:`hip_mask`, :func:`hip_mask_scores`), the keys a row attends (:func:`attended`), the
sparse attention under a mask (:func:`hip_attention`) and two quality measures (:func:`hip_recall`,
:func:`best_mass`). Plain PyTorch with loops over (batch, head, query block, round): small sizes only.

Positions are 0-based: query row ``i`` of sequence ``b`` sits at ``p = q_pos[b, i]`` (default
``Lk - Lq + i``) and sees keys ``j <= p``. GQA: query head ``h`` uses kv head ``h // (Hq // Hkv)``.

Key padding (``key_padding_mask`` bool ``[B, Lk]``, True = the key exists; ``config.py``'s docstring):
the ``o_b`` leading padded keys of sequence b are cut off and the search runs on the rest as on an
unpadded sequence (positions ``p - o_b``, its own round count), the selected offsets shifted back by
``o_b``; other padded keys score -32000 in the search and are never attended."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .config import MASKED_SCORE, PAD_INDEX, HiP, HiPMask, initial_starts, num_rounds, query_positions


class HiPScores(NamedTuple):
    """The mask of :func:`hip_mask` and the float64 scores behind its decisions, for a relaxed
    comparison of a kernel's selection (near-ties are legitimate).

    Attributes:
        mask: the :class:`HiPMask` (as :func:`hip_mask` returns it).
        selected: float64 ``[B, Hq, nQ, K]``: the last round's score of each selected block, aligned
            with ``mask.indices``; NaN past ``counts`` and on blocks that select every candidate.
        best_rejected: float64 ``[B, Hq, nQ]``: the best score among the last round's children that
            were not kept (-inf: none was alive); NaN on blocks that select every candidate.
        margin: float64 ``[B, Hq, nQ]``: the smallest gap, over the block's rounds, between the K-th
            and the (K+1)-th best child score. An exact tie of two masked scores (both -32000 or both
            -inf) is decided by the tie rule in every precision and counts as +inf; +inf on blocks
            that select every candidate. A kernel whose scores err by less than ``margin / 2`` must
            select exactly the oracle's blocks.
    """
    mask: HiPMask
    selected: torch.Tensor
    best_rejected: torch.Tensor
    margin: torch.Tensor


class HiPRecall(NamedTuple):
    """Per query row, the share of its dense causal softmax mass (keys ``j <= p``, float64) that a
    mask keeps (1.0 = nothing lost).

    Attributes:
        per_row: float64 ``[B, Hq, Lq]``.
        mean: the mean over all rows (float).
        min: the smallest row (float).
    """
    per_row: torch.Tensor
    mean: float
    min: float


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _positions(B: int, Lq: int, Lk: int, q_pos: Optional[torch.Tensor], device) -> torch.Tensor:
    """int64 ``[B, Lq]`` positions (``query_positions`` without a cache by default)."""
    if q_pos is None:
        q_pos = query_positions(B, Lq, Lk, None, device)
    if tuple(q_pos.shape) != (B, Lq):
        raise ValueError(f"q_pos: expected shape {[B, Lq]}, got {list(q_pos.shape)}")
    return q_pos.to(device=device, dtype=torch.int64)


def _padding(key_padding_mask: Optional[torch.Tensor], B: int, Lk: int, device):
    """(bool ``[B, Lk]`` keys that exist, int64 ``[B]`` leading padded keys ``o_b``)."""
    if key_padding_mask is None:
        return torch.ones(B, Lk, dtype=torch.bool, device=device), torch.zeros(B, dtype=torch.int64, device=device)
    if tuple(key_padding_mask.shape) != (B, Lk) or key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask: expected bool [{B}, {Lk}], got {key_padding_mask.dtype} "
                         f"{list(key_padding_mask.shape)}")
    kpm = key_padding_mask.to(device)
    first = [int(torch.nonzero(row)[0]) if bool(row.any()) else 0 for row in kpm.cpu()]
    return kpm, torch.tensor(first, dtype=torch.int64, device=device)


def _strided_rows(hip: HiP, qb: int, Lq: int) -> torch.Tensor:
    """The rows of query block ``qb`` that score the tree's children, counted back from its last
    existing row by ``block_stride_q`` (on a full block: HiP's ``qb * BQ + j * stride + stride - 1``)."""
    bq, sq = hip.block_size_q, hip.block_stride_q
    last = min((qb + 1) * bq, Lq) - 1
    rows = [last - t * sq for t in range(bq // sq) if last - t * sq >= qb * bq]
    return torch.tensor(rows, dtype=torch.int64)


def _representative_scores(qs, kk, pos, hip: HiP, scale: float, n_blocks: int, key_ok=None) -> torch.Tensor:
    """float64 ``[n_blocks]``: the score of each key block ``r`` as a representative: the max over the
    strided rows ``i`` (``qs [n, D]`` at positions ``pos [n]``) and the keys
    ``t = r * bk + j * stride_k + stride_k - 1`` of ``q_i . k_t * scale``, with HiP's masked score
    -32000 for ``t > p_i - window`` (window or future), ``t >= Lk``, or a product exactly 0.0 (HiP's
    padding hack, reproduced), or a key that ``key_ok`` [Lk] says is padding."""
    Lk = kk.shape[0]
    bk, sk = hip.block_size_k, hip.block_stride_k
    dots = qs @ kk.T                                                        # [n, Lk], unscaled
    t = torch.arange(Lk)
    masked = (t[None, :] > pos[:, None] - hip.window) | (dots == 0.0)
    if key_ok is not None:
        masked = masked | ~key_ok[None, :]
    col = torch.where(masked, torch.tensor(MASKED_SCORE, dtype=torch.float64), dots * scale).amax(0)
    pad = max(0, n_blocks * bk - Lk)
    col = torch.cat([col, torch.full((pad,), MASKED_SCORE, dtype=torch.float64)])
    keys = torch.arange(n_blocks)[:, None] * bk + torch.arange(sk - 1, bk, sk)[None, :]
    return col[keys].amax(1)


def _exact_tie(a: float, b: float) -> bool:
    return a == b and (a == MASKED_SCORE or a == float("-inf"))


def _search(bscore: torch.Tensor, hip: HiP, bsrc: int, rounds: int):
    """The tree search of one query block over representative scores ``bscore`` (indexed by absolute
    key block). Returns (final nodes ``[(start, size, score)]`` sorted by start, best rejected score
    of the last round, smallest margin over the rounds)."""
    K = hip.k_blocks
    st = initial_starts(hip, bsrc)                       # HiP's float32 split, reproduced
    s = st[:-1]
    g = (st[1:] - st[:-1]).clamp(0, bsrc)
    sc = torch.full((K,), float("nan"), dtype=torch.float64)
    best_rej, margin = float("nan"), float("inf")
    top = bscore.shape[0] - 1
    for _ in range(rounds):
        half = g // 2
        cs = torch.stack([s, s + half], 1).flatten()     # child 2i = left of node i, 2i+1 = right
        cg = torch.stack([half, g - half], 1).flatten()
        rep = (cs + cg // 2).clamp(max=top)              # "center" representative
        csc = torch.where(cg > 0, bscore[rep], torch.tensor(float("-inf"), dtype=torch.float64))
        order = torch.sort(csc, descending=True, stable=True).indices    # ties: smaller child index
        v = csc[order]
        a, b = v[K - 1].item(), v[K].item()
        margin = min(margin, float("inf") if _exact_tie(a, b) else a - b)
        best_rej = b
        keep = order[:K]
        # next nodes sorted by start (stable: a size-0 node before a node of the same start)
        key = cs[keep] * 2 + (cg[keep] > 0).long()
        keep = keep[torch.sort(key, stable=True).indices]
        s, g, sc = cs[keep], cg[keep], csc[keep]
    nodes = [(a, b, c) for a, b, c in zip(s.tolist(), g.tolist(), sc.tolist()) if b > 0]
    return nodes, best_rej, margin


def hip_mask_scores(q: torch.Tensor, k: torch.Tensor, hip: HiP, *, q_pos: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, key_padding_mask: Optional[torch.Tensor] = None) -> HiPScores:
    """:func:`hip_mask`, with the float64 scores behind its decisions (:class:`HiPScores`)."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"k: expected a number of heads dividing q's {Hq}, got {Hkv}")
    dev = q.device
    K, bk, bq = hip.k_blocks, hip.block_size_k, hip.block_size_q
    nq = -(-Lq // bq)
    sc = _scale(q, scale)
    pos = _positions(B, Lq, Lk, q_pos, dev).cpu()
    kpm, off = (t.cpu() for t in _padding(key_padding_mask, B, Lk, dev))
    qq, kk = q.detach().double().cpu(), k.detach().double().cpu()
    p_max = int(pos.max().item()) if pos.numel() else 0             # one count for the call ...
    rounds = [num_rounds(hip, p_max - int(o)) for o in off]        # ... per sequence from its first real key
    pos = pos - off[:, None]                                         # positions from the first real key
    indices = torch.full((B, Hq, nq, K), PAD_INDEX, dtype=torch.int32)
    counts = torch.zeros(B, Hq, nq, dtype=torch.int32)
    selected = torch.full((B, Hq, nq, K), float("nan"), dtype=torch.float64)
    best_rejected = torch.full((B, Hq, nq), float("nan"), dtype=torch.float64)
    margin = torch.full((B, Hq, nq), float("inf"), dtype=torch.float64)
    for qb in range(nq):
        rows = _strided_rows(hip, qb, Lq)
        for b in range(B):
            o = int(off[b])
            p_last = int(pos[b, qb * bq:min((qb + 1) * bq, Lq)].max().item())
            bsrc = hip.candidates(p_last)
            if not hip.searches(p_last):                 # every candidate is selected
                counts[b, :, qb] = bsrc
                indices[b, :, qb, :bsrc] = ((torch.arange(bsrc) + hip.n_sink_blocks) * bk + o).to(torch.int32)
                continue
            for h in range(Hq):
                kv = kk[b, h // (Hq // Hkv), o:]         # the sequence from its first real key
                bscore = _representative_scores(qq[b, h, rows], kv, pos[b, rows], hip, sc,
                                                hip.n_sink_blocks + bsrc, kpm[b, o:])
                nodes, rejected, gap = _search(bscore, hip, bsrc, rounds[b])
                best_rejected[b, h, qb], margin[b, h, qb] = rejected, gap
                counts[b, h, qb] = len(nodes)
                for n, (start, _, score) in enumerate(nodes):
                    indices[b, h, qb, n] = start * bk + o
                    selected[b, h, qb, n] = score
    mask = HiPMask(indices.to(dev), counts.to(dev), hip, (Lq, Lk))
    return HiPScores(mask, selected.to(dev), best_rejected.to(dev), margin.to(dev))


def hip_mask(q: torch.Tensor, k: torch.Tensor, hip: HiP, *, q_pos: Optional[torch.Tensor] = None,
             scale: Optional[float] = None, key_padding_mask: Optional[torch.Tensor] = None) -> HiPMask:
    """Oracle of HiP's mask estimate: the tree search of ``config.py``'s docstring in float64.

    Per (batch, query head, query block of ``block_size_q`` rows): the candidate ``block_size_k``-token
    key blocks lie strictly between the sinks and the window of the block's last row; if there are at
    most ``mask_k`` candidate tokens all are selected, else HiP's initial split into K nodes (its
    float32 arithmetic reproduced) and ``num_rounds(hip, q_pos.max())`` rounds of halving, scoring each
    child by its center key block (max of ``q.k * scale`` over the block's strided rows and the key
    block's strided keys, -32000 for a key in a row's window or future or a product exactly 0.0: HiP's
    hack, reproduced) and keeping the K best (ties: the smaller start). The selected blocks are the
    final nodes of non-zero size, by start ascending.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (``Hq % Hkv == 0``).
        hip: the :class:`HiP` configuration.
        q_pos: int ``[B, Lq]`` 0-based positions of the rows, default ``Lk - Lq + i``.
        scale: default ``1 / sqrt(D)``.
        key_padding_mask: bool ``[B, Lk]`` (True = the key exists) or None: positions counted from
            each sequence's first real key, padded keys scored -32000 (module docstring).

    Returns:
        :class:`HiPMask`: int32 ``indices [B, Hq, nQ, K]`` (ascending token offsets, ``PAD_INDEX``
        past ``counts``) and ``counts [B, Hq, nQ]``, on q's device.

    Example::

        >>> q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16)
        >>> hip = HiP(mask_k=8, block_size_q=16, window=8, sinks=2)
        >>> m = hip_mask(q, k, hip)
        >>> m.indices.shape, m.counts[0, 0].tolist()    # block 0: 3 candidates, all selected
        (torch.Size([1, 2, 4, 4]), [3, 4, 4, 4])
    """
    return hip_mask_scores(q, k, hip, q_pos=q_pos, scale=scale, key_padding_mask=key_padding_mask).mask


def attended(mask: HiPMask, hip: HiP, Lq: int, Lk: int, q_pos: Optional[torch.Tensor] = None,
             key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool ``[B, Hq, Lq, Lk]``: the keys HiP's sparse attention gives row ``i`` (position ``p``) of
    query block ``i // block_size_q``: the union of the sinks ``{j < sinks, j <= p - window}``, the
    window ``{p - window < j <= p}`` and the selected keys ``{j in a selected block (the first counts
    entries), sinks <= j <= p - window}``; always ``j < Lk``. With ``key_padding_mask`` the positions
    ``p`` and ``j`` count from each sequence's first real key (``- o_b``) and padded keys are
    removed."""
    if tuple(mask.seq_lens) != (Lq, Lk):
        raise ValueError(f"mask: expected a mask for seq_lens {(Lq, Lk)}, got one for {tuple(mask.seq_lens)}")
    if mask.hip != hip:
        raise ValueError(f"mask: expected a mask estimated with {hip}, got one for {mask.hip}")
    B, dev = mask.indices.shape[0], mask.indices.device
    kpm, off = _padding(key_padding_mask, B, Lk, dev)
    p = (_positions(B, Lq, Lk, q_pos, dev) - off[:, None])[:, None, :, None]     # [B, 1, Lq, 1]
    j = torch.arange(Lk, device=dev) - off[:, None, None, None]                  # [B, 1, 1, Lk]
    before_window = j <= p - hip.window
    sinks = (j < hip.sinks) & before_window
    window = (j > p - hip.window) & (j <= p)
    rows_block = torch.arange(Lq, device=dev) // hip.block_size_q
    sel = mask.block_mask()[:, :, rows_block, :] & (j >= hip.sinks) & before_window
    return (sinks | window | sel) & kpm[:, None, None, :]


def _softmax(q, k, keep, scale):
    """float64 probabilities ``[B, Hq, Lq, Lk]`` over the keys ``keep``; a row keeping nothing is 0.
    Also returns the LSE ``[B, Hq, Lq]`` (-inf on such rows)."""
    qq, kk = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = ((qq @ kk.transpose(-1, -2)) * _scale(q, scale)).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    empty = torch.isneginf(lse)
    P = torch.exp(s - torch.where(empty, 0.0, lse)[..., None]).masked_fill(~keep, 0.0)
    return P, lse


def hip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hip: HiP, mask: HiPMask, *,
                  scale: Optional[float] = None, q_pos: Optional[torch.Tensor] = None, return_lse: bool = False,
                  key_padding_mask: Optional[torch.Tensor] = None):
    """Oracle of HiP's sparse attention: dense float64 softmax of ``q.k * scale`` over
    :func:`attended` keys (one softmax over the union of sinks, window and selected keys).

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``.
        hip, mask: the configuration and a :class:`HiPMask` for ``(Lq, Lk)``.
        scale: default ``1 / sqrt(D)``; q_pos: int ``[B, Lq]``, default ``Lk - Lq + i``.
        key_padding_mask: bool ``[B, Lk]`` or None (:func:`attended`).

    Returns:
        out float64 ``[B, Hq, Lq, Dv]`` (a row that sees nothing gives 0), and with ``return_lse``
        the natural-log LSE float64 ``[B, Hq, Lq]`` (-inf on such rows).
    """
    keep = attended(mask, hip, q.shape[2], k.shape[2], q_pos, key_padding_mask)
    P, lse = _softmax(q, k, keep, scale)
    out = P @ v.double().repeat_interleave(q.shape[1] // v.shape[1], 1)
    return (out, lse) if return_lse else out


def _recall(q, k, keep, scale, p) -> HiPRecall:
    """Share of each row's dense causal float64 softmax mass on ``keep`` (1.0 for a row with no key)."""
    Lk = k.shape[2]
    causal = torch.arange(Lk, device=q.device) <= p[:, None, :, None]
    P, _ = _softmax(q, k, causal, scale)
    total = P.sum(-1)
    kept = (P * (keep & causal)).sum(-1)
    per_row = torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), 1.0)
    return HiPRecall(per_row, per_row.mean().item(), per_row.min().item())


def hip_recall(q: torch.Tensor, k: torch.Tensor, mask: HiPMask, hip: HiP, *, scale: Optional[float] = None,
               q_pos: Optional[torch.Tensor] = None) -> HiPRecall:
    """Per row, the share of the dense causal (keys ``j <= p``) float64 softmax mass that falls on the
    :func:`attended` keys of ``mask`` (1.0 = nothing lost). Returns :class:`HiPRecall`."""
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    keep = attended(mask, hip, Lq, Lk, q_pos)
    return _recall(q, k, keep, scale, _positions(B, Lq, Lk, q_pos, q.device))


def best_mass(q: torch.Tensor, k: torch.Tensor, hip: HiP, *, scale: Optional[float] = None,
              q_pos: Optional[torch.Tensor] = None) -> HiPRecall:
    """What the best K-block mask keeps, for comparison with :func:`hip_recall`: per query block, the
    K candidate key blocks (of that block's candidate range) that hold the most dense causal float64
    softmax mass usable by the block's rows (summed over the rows, keys ``j <= p - window``: the part a
    selected block adds to the sinks and the window); each row then keeps its sinks, its window and
    those blocks (as :func:`attended`). The per-row share summed over a query block is >= that of any
    mask of at most K candidate blocks, HiP's included. Returns :class:`HiPRecall`."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    K, bk, bq = hip.k_blocks, hip.block_size_k, hip.block_size_q
    nq = -(-Lq // bq)
    p = _positions(B, Lq, Lk, q_pos, q.device)
    j = torch.arange(Lk, device=q.device)
    P, _ = _softmax(q, k, j <= p[:, None, :, None], scale)
    usable = P * (j <= p[:, None, :, None] - hip.window)
    indices = torch.full((B, Hq, nq, K), PAD_INDEX, dtype=torch.int32)
    counts = torch.zeros(B, Hq, nq, dtype=torch.int32)
    for qb in range(nq):
        r0, r1 = qb * bq, min((qb + 1) * bq, Lq)
        for b in range(B):
            bsrc = hip.candidates(int(p[b, r0:r1].max().item()))
            first = hip.n_sink_blocks * bk
            end = (hip.n_sink_blocks + bsrc) * bk
            col = usable[b, :, r0:r1].sum(1).cpu()                       # [Hq, Lk]
            col = torch.nn.functional.pad(col, (0, max(0, end - Lk)))[:, first:end]
            gain = col.reshape(Hq, bsrc, bk).sum(-1)                     # [Hq, bsrc]
            n = min(K, bsrc)
            top = torch.sort(torch.topk(gain, n, dim=-1).indices, dim=-1).values
            indices[b, :, qb, :n] = ((top + hip.n_sink_blocks) * bk).to(torch.int32)
            counts[b, :, qb] = n
    mask = HiPMask(indices.to(q.device), counts.to(q.device), hip, (Lq, Lk))
    return _recall(q, k, attended(mask, hip, Lq, Lk, p), scale, p)
