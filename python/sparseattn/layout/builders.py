"""Builders of the lists of a BlockLayout: argument checks, lists from bool masks (torch ops or the
CUDA extension's builder) and from tile entries, tile classification under the in-block rules,
bit packing. BlockLayout's constructors and :mod:`.dynamic` call these."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _config
from .predicates import kinds_over_tiles

_CAUSAL_KINDS = (None, "top_left", "bottom_right")


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_block_size(block_size) -> Tuple[int, int]:
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) for b in block_size)):
        raise TypeError(f"block_size: expected an int or a pair of ints, got {block_size!r}")
    for b in block_size:
        if b < 16 or b & (b - 1):
            raise ValueError(f"block_size: expected powers of two >= 16, got {tuple(block_size)}")
    return int(block_size[0]), int(block_size[1])


def _check_seq_lens(seq_lens) -> Tuple[int, int]:
    if (not isinstance(seq_lens, (tuple, list)) or len(seq_lens) != 2
            or not all(isinstance(s, int) for s in seq_lens)):
        raise TypeError(f"seq_lens: expected a pair of ints (Lq, Lk), got {seq_lens!r}")
    if seq_lens[0] < 1 or seq_lens[1] < 1:
        raise ValueError(f"seq_lens: expected lengths >= 1, got {tuple(seq_lens)}")
    return int(seq_lens[0]), int(seq_lens[1])


def check_block_mask(block_mask) -> None:
    """A block mask is a bool tensor [B|1, H|1, nQ, nK]."""
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask: expected a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask: expected dtype torch.bool, got {block_mask.dtype}")
    if block_mask.dim() != 4:
        raise ValueError(f"block_mask: expected 4 dims [B|1, H|1, nQ, nK], got shape {tuple(block_mask.shape)}")


def mask_to_lists(mask: torch.Tensor, width: Optional[int] = None):
    """bool [..., n_rows, n] -> (counts int32 [..., n_rows], sorted indices int32 [..., n_rows, width]).

    Row r lists the columns where mask is True, ascending, then pads with 0 (in range, never
    read). width defaults to the largest count (at least 1), or n under torch.compile.
    """
    n = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    if width is None:
        width = n if _is_compiling() else max(1, int(counts.max())) if counts.numel() else 1
    cols = torch.arange(n, device=mask.device, dtype=torch.int32)
    key = torch.where(mask, cols, cols + n)
    idx = key.sort(dim=-1).values[..., :width]
    idx = torch.where(idx >= n, 0, idx).to(torch.int32)  # padding is 0, as in _entries_to_lists
    return counts, idx.contiguous()


def _check_kinds(causal, window, sinks, lq: int, lk: int):
    """Validate the in-block kinds; returns (causal_offset, window, sinks)."""
    if causal not in _CAUSAL_KINDS:
        raise ValueError(f"causal: expected one of {_CAUSAL_KINDS}, got {causal!r}")
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window: expected an int >= 1 or None, got {window!r}")
        if causal is None:
            raise ValueError("window: expected causal='top_left' or 'bottom_right' with a window, got causal=None")
    if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
        raise ValueError(f"sinks: expected an int >= 0, got {sinks!r}")
    if sinks and window is None:
        raise ValueError(f"sinks: expected 0 without a window, got {sinks}")
    offset = None if causal is None else (0 if causal == "top_left" else lk - lq)
    return offset, window, int(sinks)


def _classify_tiles(r, c, block_size, seq_lens, causal_offset, window=None, sinks=0):
    """(attended, partial) of tiles at query-block ``r`` and key-block ``c`` (broadcasting index
    tensors) under the built-in kinds (:func:`.predicates.kinds_over_tiles`). A tile with no
    visible pair is not attended; a tile crossing a sequence bound, the diagonal or a window edge
    is partial."""
    (bq, bk), (lq, lk) = block_size, seq_lens
    off = causal_offset or 0
    p0, p1 = r * bq + off, torch.clamp((r + 1) * bq, max=lq) - 1 + off
    k0, k1 = c * bk, torch.clamp((c + 1) * bk, max=lk) - 1
    attended, whole = kinds_over_tiles(p0, p1, k0, k1, causal_offset is not None, window, sinks)
    partial = ((r + 1) * bq > lq) | ((c + 1) * bk > lk) | ~whole
    return attended, partial


def _entries_to_lists(row, col, n_rows: int, n_cols: int, payload=None):
    """Entries (row, col) -> (counts int32 [n_rows], indices int32 [n_rows, width], payload int32
    [n_rows, width] or None): each row's distinct columns, ascending, padded with 0 (payload with
    -1); ``payload`` (one int per entry) travels with its entry. O(entries log entries)."""
    key, inverse = torch.unique(row * n_cols + col, return_inverse=True)  # sorted, duplicates dropped
    row, col = key // n_cols, key % n_cols
    counts = torch.bincount(row, minlength=n_rows)
    width = max(1, int(counts.max())) if counts.numel() else 1
    pos = torch.arange(key.numel(), device=key.device) - (torch.cumsum(counts, 0) - counts)[row]
    idx = torch.zeros(n_rows, width, dtype=torch.int32, device=key.device)
    idx[row, pos] = col.to(torch.int32)
    pay = None
    if payload is not None:
        pay = torch.full((n_rows, width), -1, dtype=torch.int32, device=key.device)
        pay[row[inverse], pos[inverse]] = payload.to(torch.int32)
    return counts.to(torch.int32), idx, pay


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [m, BQ, BK] -> int32 words [m, BQ, ceil(BK / 32)], bit k of word w = column 32 w + k."""
    m, bq, bk = bits.shape
    nw = -(-bk // 32)
    padded = torch.zeros(m, bq, nw * 32, dtype=torch.int64, device=bits.device)
    padded[..., :bk] = bits.long()
    words = (padded.view(m, bq, nw, 32) << torch.arange(32, device=bits.device)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _gpu_lists(masks, widths=None):
    """The CUDA layout builder (``sparseattn._C``, identical lists) for CUDA masks when the
    extension is built and usable and ``SPARSEATTN_GPU_LAYOUT`` is not ``0``; else None (also for
    an empty mask, e.g. a batch of 0, which the kernels do not take). ``widths``: fixed list widths
    (no host read), as ``_mask_to_lists``'s ``width``."""
    if not masks[0].is_cuda or _is_compiling() or not _config.flag("SPARSEATTN_GPU_LAYOUT"):
        return None
    if any(m.numel() == 0 for m in masks):
        return None
    from .. import _cuda
    return _cuda.mask_to_lists(masks, widths) if _cuda.cuda_available(masks[0].device) else None
