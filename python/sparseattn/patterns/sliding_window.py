"""SlidingWindow: causal sliding window with attention sinks (StreamingLLM)."""
from __future__ import annotations

import math

import torch

from ._base import _Pattern, _Tiles, _check_int, _check_lens, _expand_ranges, _grid, _kind_elem, _tile_rows, _unique_tiles


class SlidingWindow(_Pattern):
    """Causal sliding window with attention sinks: key ``j`` is visible to the query at position
    ``i`` iff ``j <= i`` and (``i - j < window`` or ``j < sinks``).

    Args:
        window: keys per query, counting itself (int >= 1; larger than L = causal attention).
        sinks: the first ``sinks`` tokens are seen by every query (StreamingLLM's attention sinks).

    Example::

        >>> import torch, sparseattn as sa
        >>> q = k = v = torch.randn(1, 2, 500, 64)
        >>> out = sa.sparse_attention(q, k, v, sa.SlidingWindow(128, sinks=4))
    """

    def __init__(self, window: int, sinks: int = 0):
        self.window = _check_int("window", window, 1)
        self.sinks = _check_int("sinks", sinks, 0)
        self._kinds = ("bottom_right", self.window, self.sinks)

    def __repr__(self):
        return f"SlidingWindow(window={self.window}, sinks={self.sinks})"

    def _kinds_for(self, Lq, Lk):
        # i - j <= Lk - 1 < window: the window never cuts, the pattern is plain causal
        return ("bottom_right", None, 0) if self.window >= Lk else self._kinds

    def _shape(self, Lq, Lk):
        return 1, 1

    def dense_mask(self, Lq: int, Lk: int) -> torch.Tensor:
        Lq, Lk = _check_lens(Lq, Lk)
        i, j = _grid(Lq, Lk, Lk - Lq, "cpu")
        return _kind_elem(i, j, self._kinds)[None, None]

    def _tiles(self, Lq, Lk, device, tq, tk, decode):
        off = Lk - Lq
        nq = math.ceil(Lq / tq)
        r = torch.arange(nq, device=device)
        p0, p1 = _tile_rows(r, tq, off, Lq)
        p1 = torch.clamp(p1, max=Lk - 1)
        # the window band of each query tile, then its sink tiles
        lo = torch.cat([torch.clamp(p0 - self.window + 1, min=0) // tk, torch.zeros_like(r)])
        hi = torch.cat([torch.where(p1 >= 0, p1 // tk, -1),
                        torch.where(p1 >= 0, (torch.clamp(torch.clamp(p1 + 1, max=self.sinks), min=0) - 1), -1)
                        .div(tk, rounding_mode="floor")])
        idx, c = _expand_ranges(lo, hi)
        rr = torch.cat([r, r])[idx]
        z = torch.zeros_like(rr)
        b, h, rr, c, _ = _unique_tiles(z, z, rr, c, 1, nq, math.ceil(Lk / tk))
        return _Tiles(b, h, rr, c)


