"""Layouts built on the device from computed key-block ids (:meth:`BlockLayout.from_topk`): what
content-based patterns (top-k of pooled scores, routing, SparseD, HiP) feed.

Every list has a width fixed by the input's shape, so the build is a fixed sequence of torch ops
with no host read: it runs inside ``torch.compile(fullgraph=True)`` and a CUDA graph capture.

* kv lists (partial and full), ``k`` wide: per query block, map the ids that are not usable (-1
  or any id outside ``[0, nK)``) to the sentinel ``nK``, sort, turn an id equal to its predecessor
  into the sentinel, classify the tiles with the in-block kinds (``_classify_tiles``, the rule
  :meth:`BlockLayout.from_block_mask` uses), drop the tiles they leave empty, and sort each of
  the partial and full selections once more so that the ids come first, ascending; slots past
  the count hold 0. O(nQ k log k) per (batch, head).
* transposed lists, ``nQ`` wide (the only fixed bound: a key block may be listed by every query
  block): the used (key block, query block) pairs of a (batch, head) are sorted by key block
  then query block, each key block's run is found by a binary search and gathered into its row.
  O(nQ k log(nQ k) + nK nQ), the last term being the lists' own size.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .builders import _check_block_size, _check_kinds, _check_seq_lens, _classify_tiles, _is_compiling


def _check_indices(indices, nq: int) -> None:
    """Shape and dtype only: nothing is read from the device."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices: expected dtype torch.int32 or torch.int64, got {indices.dtype}")
    if indices.dim() != 4 or indices.shape[2] != nq:
        raise ValueError(f"indices: expected shape [B|1, H|1, {nq}, k] (nQ = {nq} query blocks), "
                         f"got {tuple(indices.shape)}")


def _should_validate(indices: torch.Tensor, validate: Optional[bool]) -> bool:
    if validate is not None:
        return bool(validate)
    if indices.numel() == 0 or _is_compiling():
        return False
    return not (indices.is_cuda and torch.cuda.is_current_stream_capturing())


def _validate_range(indices: torch.Tensor, nk: int, seq_lens, block_size) -> None:
    """One host read: the smallest and largest id."""
    lo, hi = torch.stack(torch.aminmax(indices)).tolist()
    if lo < -1 or hi >= nk:
        raise ValueError(f"indices: expected key-block ids in [0, {nk}) or -1 for an unused slot "
                         f"(seq_lens={tuple(seq_lens)}, block_size={tuple(block_size)}), got values in [{lo}, {hi}]")


def _compact(ids: torch.Tensor, keep: torch.Tensor, sentinel: int):
    """(counts int32, ids int32): the kept ids of each row first, ascending, then 0."""
    key = torch.where(keep, ids, sentinel).sort(dim=-1).values
    used = key < sentinel
    return used.sum(-1, dtype=torch.int32), torch.where(used, key, 0).to(torch.int32)


def _transpose(counts: torch.Tensor, idx: torch.Tensor, n_cols: int):
    """Lists of the columns of each row ([..., n_rows] counts, [..., n_rows, w] ids) -> lists of the
    rows of each column: counts int32 [..., n_cols], ids int32 [..., n_cols, n_rows] (ascending,
    padded with 0). Fixed shapes, no host read."""
    *lead, n_rows, w = idx.shape
    rows = torch.arange(n_rows, device=idx.device)
    used = torch.arange(w, device=idx.device) < counts[..., None]
    # pairs keyed column-major; unused slots sort last (key n_cols * n_rows)
    key = torch.where(used, idx.long() * n_rows + rows[:, None], n_cols * n_rows).flatten(-2).sort(dim=-1).values
    bounds = torch.arange(n_cols + 1, device=idx.device) * n_rows
    bounds = torch.searchsorted(key, bounds.expand(*lead, n_cols + 1).contiguous())
    start, count = bounds[..., :-1], bounds.diff(dim=-1)
    pos = (start[..., None] + rows).clamp(max=key.shape[-1] - 1)
    got = key.gather(-1, pos.flatten(-2)).view(*lead, n_cols, n_rows) % n_rows
    return count.to(torch.int32), torch.where(rows < count[..., None], got, 0).to(torch.int32)


def from_topk(cls, indices: torch.Tensor, block_size, seq_lens, causal: Optional[str] = None,
              window: Optional[int] = None, sinks: int = 0, validate: Optional[bool] = None):
    """:meth:`BlockLayout.from_topk` (documented there)."""
    bq, bk = _check_block_size(block_size)
    lq, lk = _check_seq_lens(seq_lens)
    offset, window, sinks = _check_kinds(causal, window, sinks, lq, lk)
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    _check_indices(indices, nq)
    if _should_validate(indices, validate):
        _validate_range(indices, nk, (lq, lk), (bq, bk))
    if indices.shape[-1] == 0:  # one padding slot: a list is at least 1 wide
        indices = indices.new_full((*indices.shape[:3], 1), -1)
    dev = indices.device
    ids = indices.long()
    ids = torch.where((ids >= 0) & (ids < nk), ids, nk).sort(dim=-1).values
    dup = torch.cat([torch.zeros_like(ids[..., :1], dtype=torch.bool), ids[..., 1:] == ids[..., :-1]], -1)
    attended, partial = _classify_tiles(torch.arange(nq, device=dev)[:, None], ids.clamp(max=nk - 1), (bq, bk),
                                        (lq, lk), offset, window, sinks)
    keep = (ids < nk) & ~dup & attended
    kv_n, kv_i = _compact(ids, keep & partial, nk)
    fkv_n, fkv_i = _compact(ids, keep & ~partial, nk)
    q_n, q_i = _transpose(kv_n, kv_i, nk)
    fq_n, fq_i = _transpose(fkv_n, fkv_i, nk)
    return cls(block_size=(bq, bk), seq_lens=(lq, lk), kv_num_blocks=kv_n, kv_indices=kv_i,
               kv_bit_ids=torch.full_like(kv_i, -1), full_kv_num_blocks=fkv_n, full_kv_indices=fkv_i,
               q_num_blocks=q_n, q_indices=q_i, q_bit_ids=torch.full_like(q_i, -1), full_q_num_blocks=fq_n,
               full_q_indices=fq_i, causal_offset=offset, window=window, sinks=sinks)
