"""The in-block rules, each written once in Python (the Triton kernels hold the other copy, in
``triton_kernels/attention.py``). Builders, the CPU paths, the patterns and the oracles call these.

Positions: query row ``r`` of a layout sits at position ``r + offset`` (``offset = 0`` for
top-left causal, ``Lk - Lq`` for bottom-right); keys sit at their index. Every function
broadcasts its index tensors.

* bounds: rows < Lq and columns < Lk;
* causal: key ``k`` visible to the query at position ``p`` iff ``k <= p``;
* sliding window with sinks (on top of causal): iff ``p - k < window`` or ``k < sinks``;
* positions given as data (position-id causal, packed sequences) replace ``r + offset`` and the
  key index as the coordinates of causal, window and ALiBi;
* segments (packed sequences): query and key in the same segment;
* key padding: key ``j`` visible iff its keep bit is set;
* tile bitmasks and element masks are data, read where they apply (:func:`unpack_bits`, the
  layout's ``mask``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def in_bounds(rows: torch.Tensor, cols: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """Rows and columns inside the sequences."""
    return (rows < lq) & (cols < lk)


def causal_keep(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """The causal rule at positions."""
    return kpos <= qpos


def window_keep(qpos: torch.Tensor, kpos: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """The sliding-window-with-sinks rule at positions (applies together with causal)."""
    return (qpos - kpos < window) | (kpos < sinks)


def kinds_keep(qpos: torch.Tensor, kpos: torch.Tensor, causal: bool, window: Optional[int],
               sinks: int) -> torch.Tensor:
    """Causal, then window with sinks, element-wise at positions (no bounds)."""
    keep = torch.ones(torch.broadcast_shapes(qpos.shape, kpos.shape), dtype=torch.bool, device=qpos.device)
    if causal:
        keep = keep & causal_keep(qpos, kpos)
        if window is not None:
            keep = keep & window_keep(qpos, kpos, window, sinks)
    return keep


def kinds_over_tiles(p0: torch.Tensor, p1: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, causal: bool,
                     window: Optional[int], sinks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(any, all) of :func:`kinds_keep` over tiles whose query positions span ``[p0, p1]`` and key
    positions ``[k0, k1]`` (inclusive, inside the sequences): ``any`` = some pair visible (the
    tile is listed), ``all`` = every pair visible (it can run without masking)."""
    if not causal:
        one = torch.ones(torch.broadcast_shapes(p0.shape, k0.shape), dtype=torch.bool, device=p0.device)
        return one, one
    any_, all_ = causal_keep(p1, k0), causal_keep(p0, k1)
    if window is not None:
        # some pair within the window or a sink; every key either a sink or within the window
        any_ = any_ & ((k0 < sinks) | (p0 - k1 < window))
        all_ = all_ & ((k1 < sinks) | (p1 - torch.clamp(k0, min=sinks) < window))
    return any_, all_


def segments_keep(qseg: torch.Tensor, kseg: torch.Tensor) -> torch.Tensor:
    """Packed sequences: query and key belong to the same segment."""
    return qseg == kseg


def key_keep(key_mask_values: torch.Tensor) -> torch.Tensor:
    """Key padding: the key exists (its entry of the bool key keep mask)."""
    return key_mask_values.to(torch.bool)


def alibi_distance(rows: torch.Tensor, cols: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """ALiBi's distance without positions (FlashAttention's definition): ``i + Lk - Lq - j`` for
    query row ``i`` and key ``j``, whatever the causal alignment. With positions given as data
    it is ``q_pos - k_pos`` (:meth:`BlockLayout.alibi_distance`)."""
    return rows + (lk - lq) - cols


def alibi_bias(slopes: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """ALiBi's score term (natural-log units): ``-slope * |dist|`` (broadcasting)."""
    return -slopes * dist.abs().to(slopes.dtype)


def softcap_scores(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """Gemma 2's softcap of the scaled scores: ``softcap * tanh(s / softcap)``."""
    return softcap * torch.tanh(s / softcap)


def unpack_bits(words: Optional[torch.Tensor], ids: torch.Tensor, row_in: torch.Tensor,
                col_in: torch.Tensor) -> torch.Tensor:
    """Bit (row_in, col_in) of tile bitmask ``ids`` (broadcasting; id -1 = no bitmask = True).
    Words are int32 ``[n, BLOCK_Q, ceil(BLOCK_K / 32)]``, bit k of word w = column 32 w + k."""
    if words is None or words.shape[0] == 0:     # no tile carries a bitmask: every id is -1
        return torch.ones(torch.broadcast_shapes(ids.shape, row_in.shape, col_in.shape), dtype=torch.bool,
                          device=ids.device)
    w = words[ids.clamp(min=0).long(), row_in.long(), (col_in // 32).long()]
    return (ids < 0) | (((w >> (col_in % 32).to(torch.int32)) & 1) != 0)
