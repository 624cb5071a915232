"""PerHead: a different static pattern per query head."""
from __future__ import annotations

from typing import Sequence

import torch

from ._base import _NO_KINDS, _Pattern, _Tiles, _eval_tile_bits, _kind_class, _kind_elem


class PerHead(_Pattern):
    """One pattern per query head: head ``h`` uses ``patterns[h]`` (e.g. dense causal heads next to
    streaming heads). The layout has ``Hl = len(patterns)``, so it needs ``Hq == len(patterns)``.

    Args:
        patterns: a sequence of SlidingWindow, PowerAttention or BlockSparse patterns whose head
            dimension is 1 (a BlockSparse may have a batch dimension).

    Example::

        >>> import torch, sparseattn as sa
        >>> p = sa.PerHead([sa.SlidingWindow(10**9)] * 2 + [sa.SlidingWindow(128, sinks=4)] * 2)
        >>> q = k = v = torch.randn(1, 4, 300, 64)
        >>> out = sa.sparse_attention(q, k, v, p)
    """

    def __init__(self, patterns: Sequence[_Pattern]):
        patterns = list(patterns) if isinstance(patterns, (list, tuple)) else patterns
        if not isinstance(patterns, list) or not patterns:
            raise TypeError(f"patterns: expected a non-empty list of patterns, got {type(patterns).__name__}")
        for i, p in enumerate(patterns):
            if not isinstance(p, _Pattern) or isinstance(p, PerHead):
                raise TypeError(f"patterns[{i}]: expected a SlidingWindow, PowerAttention or BlockSparse, got "
                                f"{type(p).__name__}")
        self.patterns = patterns

    @property
    def moves_with_length(self) -> bool:
        """Decode with ragged lengths: each sequence at its own length when any head's pattern moves."""
        return any(p.moves_with_length for p in self.patterns)

    def _kinds_for(self, Lq, Lk):
        """One set of kinds for the layout: the heads' own when they agree, else plain bottom-right
        causal when all are causal, else none; each head's remaining kinds become bits."""
        kinds = {p._kinds_for(Lq, Lk) for p in self.patterns}
        if len(kinds) == 1:
            return kinds.pop()
        if all(k[0] == "bottom_right" for k in kinds):
            return ("bottom_right", None, 0)
        return _NO_KINDS

    def __repr__(self):
        return f"PerHead({self.patterns!r})"

    def _tile(self):
        tiles = [p._tile() for p in self.patterns]
        return min(t[0] for t in tiles), min(t[1] for t in tiles)

    def _shape(self, Lq, Lk):
        bls = {p._shape(Lq, Lk)[0] for p in self.patterns}
        hls = {p._shape(Lq, Lk)[1] for p in self.patterns}
        if hls != {1}:
            raise ValueError(f"patterns: expected patterns with one head each (H = 1), got head sizes {sorted(hls)}")
        if len(bls - {1}) > 1:
            raise ValueError(f"patterns: expected batch sizes 1 or one common B, got {sorted(bls)}")
        return max(bls), len(self.patterns)

    def dense_mask(self, Lq: int, Lk: int) -> torch.Tensor:
        bl, _ = self._shape(Lq, Lk)
        return torch.cat([p.dense_mask(Lq, Lk).expand(bl, 1, Lq, Lk) for p in self.patterns], 1)

    def _tiles(self, Lq, Lk, device, tq, tk, decode):
        bl, _ = self._shape(Lq, Lk)
        off = Lk - Lq
        common = self._kinds_for(Lq, Lk)
        parts = []
        for head, p in enumerate(self.patterns):
            kinds = p._kinds_for(Lq, Lk)
            t = p._tiles(Lq, Lk, device, tq, tk, decode)
            b, r, c = t.b, t.r, t.c
            has_bits = torch.zeros(t.n, dtype=torch.bool, device=device)
            bits = torch.ones(0, tq, tk, dtype=torch.bool, device=device)
            if t.bits_idx is not None and t.bits_idx.numel():
                has_bits[t.bits_idx] = True
                bits = t.bits
            slot = torch.cumsum(has_bits, 0) - 1              # entry -> its row in bits
            if kinds != common:
                # the sub-pattern's own kinds become bits where they are mixed over a tile
                any_, all_ = _kind_class(r, c, tq, tk, off, Lq, Lk, kinds)
                keep = any_
                b, r, c, has_bits, slot, all_ = b[keep], r[keep], c[keep], has_bits[keep], slot[keep], all_[keep]
                need = ~all_
                kb = _eval_tile_bits(lambda bb, hh, qq, kk: _kind_elem(qq, kk, kinds), b[need],
                                     torch.full_like(b[need], head), r[need], c[need], tq, tk, off, Lq, Lk)
                own = torch.ones(int(need.sum()), tq, tk, dtype=torch.bool, device=device)
                sel = has_bits[need]
                own[sel] = bits[slot[need][sel]]
                new_bits = torch.ones(int((has_bits | need).sum()), tq, tk, dtype=torch.bool, device=device)
                new_has = has_bits | need
                new_slot = torch.cumsum(new_has, 0) - 1
                new_bits[new_slot[has_bits & ~need]] = bits[slot[has_bits & ~need]]
                new_bits[new_slot[need]] = own & kb
                has_bits, bits, slot = new_has, new_bits, new_slot
            if bl > 1 and p._shape(Lq, Lk)[0] == 1:       # broadcast this head's entries over the batch
                n = b.numel()
                rep = torch.arange(bl, device=device).repeat_interleave(n)
                src = torch.arange(n, device=device).repeat(bl)
                b, r, c, has_bits = rep, r[src], c[src], has_bits[src]
                idx = slot[src][has_bits]
                bits = bits[idx]
                slot = torch.cumsum(has_bits, 0) - 1
            parts.append((b, torch.full_like(b, head), r, c, has_bits, bits))
        b, h, r, c, has_bits, bits = (torch.cat(x) for x in zip(*parts))
        return _Tiles(b, h, r, c, has_bits.nonzero().squeeze(1), bits)
