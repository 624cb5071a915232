"""Layouts from per-token data: position-id causal (:meth:`BlockLayout.from_positions`) and key
keep masks (:meth:`BlockLayout.with_key_padding`).

Both rules are evaluated in the kernels from one value per token (a position, a keep bit), never
from an element mask. The layout only has to say which tiles they cut: a tile where the rule keeps
nothing is dropped, a tile where it keeps some pairs is partial (the kernels evaluate the rule
there), a tile where it keeps every pair stays full. The rules themselves are written once in
Python in :mod:`.predicates` (``kinds_keep`` at the given positions, ``key_keep``) and once in Triton
(``triton_kernels/walk.py``: ``_coords`` with ``_causal``, ``_key_mask``).

:func:`refine` applies such a tile classification to existing lists on the device with fixed list
widths (partial lists ``wp + wf`` wide): no host read, so a key padding mask costs no sync and
runs under ``torch.compile`` and in a CUDA graph.
"""
from __future__ import annotations

import math

import torch

from .builders import _check_block_size


def _check_vector(t, name: str, dtype: torch.dtype, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} ({what}), got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected 2 dims {what}, got shape {tuple(t.shape)}")


def _block_reduce(x: torch.Tensor, block: int, fill, op) -> torch.Tensor:
    """[B, L] -> [B, ceil(L / block)]: ``op`` ("amin"/"amax"/"any"/"all") over each block, the tail
    past L padded with ``fill``."""
    B, L = x.shape
    n = math.ceil(L / block)
    padded = torch.nn.functional.pad(x, (0, n * block - L), value=fill) if n * block != L else x
    return getattr(padded.view(B, n, block), op)(-1)


def from_positions(cls, q_pos: torch.Tensor, k_pos: torch.Tensor, block_size):
    """:meth:`BlockLayout.from_positions` (documented there)."""
    bq, bk = _check_block_size(block_size)
    _check_vector(q_pos, "q_pos", torch.int32, "int32 [B, Lq]")
    _check_vector(k_pos, "k_pos", torch.int32, "int32 [B, Lk]")
    if k_pos.shape[0] != q_pos.shape[0]:
        raise ValueError(f"k_pos: expected batch {q_pos.shape[0]} (as q_pos), got {k_pos.shape[0]}")
    if k_pos.device != q_pos.device:
        raise ValueError(f"k_pos: expected device {q_pos.device} (as q_pos), got {k_pos.device}")
    lq, lk = q_pos.shape[1], k_pos.shape[1]
    if lq == 0 or lk == 0:
        raise ValueError(f"q_pos, k_pos: expected non-empty sequences, got Lq={lq}, Lk={lk}")
    big = torch.iinfo(torch.int32).max
    qmin = _block_reduce(q_pos, bq, big, "amin")[:, :, None]          # [B, nQ, 1]
    qmax = _block_reduce(q_pos, bq, -big, "amax")[:, :, None]
    kmin = _block_reduce(k_pos, bk, big, "amin")[:, None, :]          # [B, 1, nK]
    kmax = _block_reduce(k_pos, bk, -big, "amax")[:, None, :]
    nq, nk = qmin.shape[1], kmin.shape[2]
    inside = ((torch.arange(nq, device=q_pos.device) + 1) * bq <= lq)[:, None] & \
        ((torch.arange(nk, device=q_pos.device) + 1) * bk <= lk)[None, :]
    any_ = kmin <= qmax
    full = (kmax <= qmin) & inside
    layout = cls._from_tile_masks((any_ & ~full)[:, None], full[:, None], (bq, bk), (lq, lk), 0, None, 0, None)
    layout.q_pos, layout.k_pos = q_pos.contiguous(), k_pos.contiguous()
    return layout


def with_key_padding(layout, key_padding_mask: torch.Tensor):
    """:meth:`BlockLayout.with_key_padding` (documented there)."""
    lq, lk = layout.seq_lens
    _check_vector(key_padding_mask, "key_padding_mask", torch.bool, f"bool [B, Lk={lk}]")
    if key_padding_mask.shape[1] != lk:
        raise ValueError(f"key_padding_mask: expected shape [B, {lk}] (Lk), got {tuple(key_padding_mask.shape)}")
    if layout.shape[0] not in (1, key_padding_mask.shape[0]):
        raise ValueError(f"key_padding_mask: expected batch {layout.shape[0]} (as the layout) or a layout of batch "
                         f"1, got {key_padding_mask.shape[0]}")
    if key_padding_mask.device != layout.device:
        raise ValueError(f"key_padding_mask: expected device {layout.device} (as the layout), got "
                         f"{key_padding_mask.device}")
    bk = layout.block_size[1]
    any_k = _block_reduce(key_padding_mask, bk, False, "any")[:, None, None, :]   # [B, 1, 1, nK]
    all_k = _block_reduce(key_padding_mask, bk, True, "all")[:, None, None, :]
    keep = key_padding_mask if layout.key_mask is None else layout.key_mask & key_padding_mask
    return refine(layout, any_k, all_k, key_mask=keep.contiguous())


def _refine_lists(idx, bid, num, full_idx, full_num, tile_any, tile_all, n_cols: int):
    """One direction: entries of the partial lists (with bitmask ids) and full lists, classified
    by ``tile_any`` / ``tile_all`` ``[B', H', n_rows, n_cols]`` (broadcasting against the lists):
    partial entries with any kept stay partial; full entries keep all -> full, some -> partial
    (no bitmask), none -> dropped. Returns (num, idx, bid, full_num, full_idx), fixed widths."""
    shape = torch.broadcast_shapes(num.shape, tile_any.shape[:-1])
    idx, bid, num = idx.expand(*shape, idx.shape[-1]), bid.expand(*shape, bid.shape[-1]), num.expand(shape)
    full_idx, full_num = full_idx.expand(*shape, full_idx.shape[-1]), full_num.expand(shape)
    tile_any, tile_all = tile_any.expand(*shape, n_cols), tile_all.expand(*shape, n_cols)

    def cls(ids, count):
        used = torch.arange(ids.shape[-1], device=ids.device) < count[..., None]
        ids_l = ids.long()
        return used & tile_any.gather(-1, ids_l), used & tile_all.gather(-1, ids_l)

    p_any, _ = cls(idx, num)
    f_any, f_all = cls(full_idx, full_num)
    cand = torch.cat([idx, full_idx], -1).long()
    keep = torch.cat([p_any, f_any & ~f_all], -1)
    pay = torch.cat([bid, torch.full_like(full_idx, -1)], -1)
    key, order = torch.where(keep, cand, n_cols).sort(dim=-1)
    used = key < n_cols
    new_num = used.sum(-1, dtype=torch.int32)
    new_idx = torch.where(used, key, 0).to(torch.int32)
    new_bid = torch.where(used, pay.gather(-1, order), -1).to(torch.int32)
    fkey = torch.where(f_all, full_idx.long(), n_cols).sort(dim=-1).values
    fused = fkey < n_cols
    return (new_num, new_idx.contiguous(), new_bid.contiguous(), fused.sum(-1, dtype=torch.int32),
            torch.where(fused, fkey, 0).to(torch.int32).contiguous())


def refine(layout, tile_any: torch.Tensor, tile_all: torch.Tensor, **kinds):
    """The layout with its tiles reclassified by a per-tile rule: ``tile_any`` / ``tile_all`` bool
    ``[B'|1, H'|1, nQ, nK]`` (some / every pair of the tile kept by the new rule, which must hold
    outside the tiles too: only listed tiles are looked at). ``kinds`` set the new rule's data on
    the result (``key_mask``, ``q_pos``, ``k_pos``). Device ops, fixed widths, no host read."""
    nq, nk = layout.num_blocks
    kv = _refine_lists(layout.kv_indices, layout.kv_bit_ids, layout.kv_num_blocks, layout.full_kv_indices,
                       layout.full_kv_num_blocks, tile_any, tile_all, nk)
    qd = _refine_lists(layout.q_indices, layout.q_bit_ids, layout.q_num_blocks, layout.full_q_indices,
                       layout.full_q_num_blocks, tile_any.transpose(-1, -2), tile_all.transpose(-1, -2), nq)
    # BlockLayout._LISTS order: num, indices, bit ids, full num, full indices (kv, then q)
    lists = [kv[0], kv[1], kv[2], kv[3], kv[4], qd[0], qd[1], qd[2], qd[3], qd[4]]
    out = type(layout).from_lists(lists, block_size=layout.block_size, seq_lens=layout.seq_lens, **layout.kinds())
    for name, value in kinds.items():
        setattr(out, name, value)
    return out


def _ranges(x: torch.Tensor, block: int):
    """(min, max) over blocks of an int32 [L] token vector (the last block's padding ignored)."""
    big = torch.iinfo(torch.int32).max
    x = x[None]
    return _block_reduce(x, block, big, "amin")[0], _block_reduce(x, block, -big, "amax")[0]


def varlen_tokens(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int):
    """Per-token data of a packed batch: (q_seg, k_seg, q_pos, k_pos) int32 ``[total]``: the segment
    of each token and its position in its sequence, queries bottom-right aligned (row i of a
    sequence with Lq_n queries and Lk_n keys at ``i + Lk_n - Lq_n``, FlashAttention's varlen
    convention). Device ops, no host read; segments clamped into ``[0, N)`` so that malformed
    lengths (unchecked under torch.compile) cannot index out of bounds."""
    n = cu_seqlens_q.numel() - 1
    dev = cu_seqlens_q.device
    cq, ck = cu_seqlens_q.long(), cu_seqlens_k.long()

    def seg_of(cu, total):
        tok = torch.arange(total, device=dev)
        return tok, torch.searchsorted(cu[1:].contiguous(), tok, right=True).clamp(max=max(n - 1, 0))

    tq, sq = seg_of(cq, total_q)
    tk, sk = seg_of(ck, total_k)
    len_q, len_k = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    q_pos = tq - cq[sq] + (len_k - len_q)[sq]
    k_pos = tk - ck[sk]
    return tuple(t.to(torch.int32) for t in (sq, sk, q_pos, k_pos))


def from_varlen(cls, cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, block_size, causal: bool,
                window, sinks: int):
    """The layout of a packed variable-length batch over ``seq_lens=(total_q, total_k)``: the
    segment rule (query and key in one sequence) and, with ``causal``, bottom-right causal per
    sequence (with a window and sinks in the sequence's own positions), evaluated in the kernels
    from per-token segments and positions. Tiles are classified from each block's range of
    segments and positions: a tile whose blocks share no sequence is never listed; a tile inside
    one sequence gets the causal / window classification of the dense builders; a tile straddling
    a sequence boundary is partial (its rows of other sequences are masked). Lists are as wide as
    the block grid (fixed widths, no host read: memory O(nQ * nK) int32, the only non-O(total)
    term). Used by :func:`sparseattn.varlen_attention`."""
    from .builders import _check_kinds
    from .predicates import kinds_over_tiles

    bq, bk = block_size
    offset, window, sinks = _check_kinds("bottom_right" if causal else None, window, sinks, 0, 0)
    q_seg, k_seg, q_pos, k_pos = varlen_tokens(cu_seqlens_q, cu_seqlens_k, total_q, total_k)
    sq0, sq1 = _ranges(q_seg, bq)
    sk0, sk1 = _ranges(k_seg, bk)
    pq0, pq1 = _ranges(q_pos, bq)
    pk0, pk1 = _ranges(k_pos, bk)
    sq0, sq1, pq0, pq1 = (t[:, None] for t in (sq0, sq1, pq0, pq1))
    overlap = (sq0 <= sk1[None]) & (sk0[None] <= sq1)
    single = (sq0 == sq1) & (sk0 == sk1)[None] & (sq0 == sk0[None])
    any_, all_ = kinds_over_tiles(pq0, pq1, pk0[None], pk1[None], causal, window, sinks)
    nq, nk = overlap.shape
    inside = ((torch.arange(nq, device=q_seg.device) + 1) * bq <= total_q)[:, None] & \
        ((torch.arange(nk, device=q_seg.device) + 1) * bk <= total_k)[None, :]
    listed = overlap & (~single | any_)
    full = single & all_ & inside
    layout = cls._from_tile_masks((listed & ~full)[None, None], full[None, None], (bq, bk), (total_q, total_k),
                                  0 if causal else None, window, sinks, None, sync_free=True)
    # positions: the coordinates of the causal / window rules and of ALiBi (|i + Lk_n - Lq_n - j| per sequence)
    layout.q_pos, layout.k_pos = q_pos[None], k_pos[None]
    layout.q_seg, layout.k_seg = q_seg[None], k_seg[None]
    return layout
