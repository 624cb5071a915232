"""What the static patterns share: conventions, validation, tile entries and the base class.

Every pattern has

* ``dense_mask(Lq, Lk)``: bool ``[B|1, H|1, Lq, Lk]``, True = attend: the definition (oracles, plots);
* ``layout(Lq, Lk, device)``: the :class:`BlockLayout` the kernels run (what ``sparse_attention`` calls);
* ``decode_layout(Lq, Lk, device)``: the layout of the last ``Lq <= 16`` query rows over a cache of
  ``Lk`` keys (what ``decode_attention`` calls).

Positions: when ``Lq != Lk`` the queries are the **last** Lq positions, query row ``r`` sits at
position ``Lk - Lq + r`` (prefill with a cached prefix, decode). Patterns defined by positions
(SlidingWindow, PowerAttention, BlockSparse from a block mask) follow it; ``from_mask_mod`` and
``from_flex`` follow FlexAttention, whose ``mask_mod`` receives the query *row* ``q_idx`` (write
``q_idx + (Lk - Lq)`` in the mask_mod for positions).

Structured patterns (SlidingWindow, PowerAttention, PerHead of them) list their tiles directly
(:meth:`BlockLayout.from_entries`), in O(listed tiles): no ``Lq x Lk`` or dense ``nQ x nK``
tensor. Window edges and sinks are token-exact in-kernel bounds; tiles where a pattern is mixed
for other reasons carry a bitmask. The layout tile (64 or 128) is chosen here, not by the user:
``min(max(block_size, 64), 128)``; pattern blocks above 128 are split into 128-tiles, blocks of 16
or 32 are grouped into 64-tiles (mixed tiles get bits).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..layout import BlockLayout
from ..layout.predicates import kinds_keep, kinds_over_tiles

MIN_TILE, MAX_TILE = 64, 128       # layout tiles the kernels accept (the kernel tile divides them)
_CHUNK = 1 << 24                   # elements per mask_mod / dense-mask evaluation chunk
_BITS_CHUNK = 1 << 23              # tile elements per bits evaluation chunk


# ----------------------------------------------------------------------------- validation
def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    return int(v)


def _check_block(name, v):
    v = _check_int(name, v, 1)
    if v < 16 or v & (v - 1):
        raise ValueError(f"{name}: expected a power of two >= 16, got {v}")
    return v


def _check_lens(Lq, Lk):
    return _check_int("Lq", Lq, 1), _check_int("Lk", Lk, 1)


def _tile_of(bs: int) -> int:
    return min(max(bs, MIN_TILE), MAX_TILE)


def _device(device):
    return torch.device("cpu") if device is None else torch.device(device)


# ----------------------------------------------------------------------------- tile entries
class _Tiles:
    """Listed tiles (b, h, r, c) int64 [n] of one (Bl, Hl) at tile (Tq, Tk), and optional bits for
    some of them: ``bits_idx`` int64 [m] into the entries, ``bits`` bool [m, Tq, Tk] (others: all True)."""

    def __init__(self, b, h, r, c, bits_idx=None, bits=None):
        self.b, self.h, self.r, self.c = b, h, r, c
        self.bits_idx, self.bits = bits_idx, bits

    @property
    def n(self):
        return self.b.numel()

    def to(self, device):
        t = lambda x: None if x is None else x.to(device)  # noqa: E731
        return _Tiles(t(self.b), t(self.h), t(self.r), t(self.c), t(self.bits_idx), t(self.bits))

    def bits_args(self):
        """``bits`` / ``bits_index`` for :meth:`BlockLayout.from_entries` (None when no entry has bits)."""
        if self.bits_idx is None or self.bits_idx.numel() == 0:
            return {}
        return {"bits": self.bits, "bits_index": self.bits_idx}


def _expand_ranges(lo: torch.Tensor, hi: torch.Tensor):
    """Inclusive ranges [lo, hi] -> (range index, value) for every value (empty ranges skipped)."""
    cnt = (hi - lo + 1).clamp(min=0)
    idx = torch.repeat_interleave(torch.arange(lo.numel(), device=lo.device), cnt)
    start = torch.cumsum(cnt, 0) - cnt
    return idx, lo[idx] + torch.arange(idx.numel(), device=lo.device) - start[idx]


def _unique_tiles(b, h, r, c, hl, nq, nk, flag=None):
    """Sorted, distinct tiles (and the OR of ``flag`` over duplicates)."""
    key = ((b * hl + h) * nq + r) * nk + c
    key, inv = torch.unique(key, return_inverse=True)
    if flag is not None:
        f = torch.zeros(key.numel(), dtype=torch.bool, device=key.device)
        flag = f.index_put_((inv,), flag, accumulate=True)
    return key // (hl * nq * nk), (key // (nq * nk)) % hl, (key // nk) % nq, key % nk, flag


def _tile_rows(r, tq, off, lq):
    """First and last query position of query tile r (positions = rows + off)."""
    return off + r * tq, off + torch.clamp((r + 1) * tq, max=lq) - 1


def _tile_cols(c, tk, lk):
    return c * tk, torch.clamp((c + 1) * tk, max=lk) - 1


def _eval_tile_bits(fn, b, h, r, c, tq, tk, off, lq, lk):
    """bits [m, Tq, Tk] of tiles (b, h, r, c) from an element function fn(b, h, qpos, kpos) ->
    bool (broadcasting), evaluated a chunk of tiles at a time. Positions past Lq/Lk are clamped
    (the layout ignores them)."""
    out = torch.empty(b.numel(), tq, tk, dtype=torch.bool, device=b.device)
    ar_q = torch.arange(tq, device=b.device)
    ar_k = torch.arange(tk, device=b.device)
    step = max(1, _BITS_CHUNK // (tq * tk))
    for s in range(0, b.numel(), step):
        sl = slice(s, s + step)
        rows = torch.clamp(r[sl, None] * tq + ar_q, max=lq - 1) + off          # positions [m, Tq]
        cols = torch.clamp(c[sl, None] * tk + ar_k, max=lk - 1)                # [m, Tk]
        val = fn(b[sl, None, None], h[sl, None, None], rows[:, :, None], cols[:, None, :])
        out[sl] = torch.as_tensor(val, device=b.device).expand(rows.shape[0], tq, tk)
    return out


def _blocks_to_tiles(b, h, I, J, bsq, bsk, off, lq, lk, tq, tk, hl, visible, needs_bits=None):
    """Pattern-block entries -> tile entries.

    (b, h, I, J): visible pattern blocks (I covers query positions [I*bsq, (I+1)*bsq), J keys
    [J*bsk, (J+1)*bsk)); query row r sits at position r + off. Every tile a listed block touches
    is listed; a tile that spans several pattern blocks (or whose entry has ``needs_bits``) gets
    bits from ``visible(b, h, I, J)`` (element-wise via positions)."""
    nq, nk = math.ceil(lq / tq), math.ceil(lk / tk)
    lo = torch.clamp(I * bsq - off, min=0)
    hi = torch.clamp((I + 1) * bsq - 1 - off, max=lq - 1)
    k_hi = torch.clamp((J + 1) * bsk - 1, max=lk - 1)
    ok = (lo <= hi) & (J >= 0) & (J * bsk < lk)
    b, h, lo, hi, J, k_hi = b[ok], h[ok], lo[ok], hi[ok], J[ok], k_hi[ok]
    flag = None if needs_bits is None else needs_bits[ok]
    r0, r1, c0, c1 = lo // tq, hi // tq, (J * bsk) // tk, k_hi // tk
    ncol = c1 - c0 + 1
    idx, k = _expand_ranges(torch.zeros_like(r0), (r1 - r0 + 1) * ncol - 1)
    r, c = r0[idx] + k // ncol[idx], c0[idx] + k % ncol[idx]
    b, h, r, c, flag = _unique_tiles(b[idx], h[idx], r, c, hl, nq, nk, None if flag is None else flag[idx])
    p0, p1 = _tile_rows(r, tq, off, lq)
    k0, k1 = _tile_cols(c, tk, lk)
    mixed = (torch.div(p0, bsq, rounding_mode="floor") != torch.div(p1, bsq, rounding_mode="floor")) | \
        (k0 // bsk != k1 // bsk)
    if flag is not None:
        mixed = mixed | flag
    bits_idx = mixed.nonzero().squeeze(1)
    bits = None
    if bits_idx.numel():
        def fn(bb, hh, qpos, kpos):
            return visible(bb, hh, torch.div(qpos, bsq, rounding_mode="floor"), kpos // bsk, qpos, kpos)
        bits = _eval_tile_bits(fn, b[bits_idx], h[bits_idx], r[bits_idx], c[bits_idx], tq, tk, off, lq, lk)
    return _Tiles(b, h, r, c, bits_idx, bits)


def _kind_class(r, c, tq, tk, off, lq, lk, kinds):
    """(any, all) of the in-block kinds (causal bottom-right, window, sinks) over tiles (r, c)."""
    causal, window, sinks = kinds
    p0, p1 = _tile_rows(r, tq, off, lq)
    k0, k1 = _tile_cols(c, tk, lk)
    return kinds_over_tiles(p0, p1, k0, k1, causal is not None, window, sinks)


def _kind_elem(qpos, kpos, kinds):
    """The kinds element-wise at positions (bottom-right causal: position compare)."""
    causal, window, sinks = kinds
    return kinds_keep(qpos, kpos, causal is not None, window, sinks)


_NO_KINDS = (None, None, 0)


def _grid(Lq, Lk, off, device):
    return (torch.arange(Lq, device=device) + off)[:, None], torch.arange(Lk, device=device)[None, :]


# ----------------------------------------------------------------------------- base
class _Pattern:
    """Shared machinery. Subclasses define ``_kinds``, ``_tile``, ``_shape(Lq, Lk)``,
    ``_tiles(Lq, Lk, device, tq, tk, decode)`` and ``dense_mask``.

    Patterns are immutable: the layout of each (Lq, Lk, device, decode) is built once and kept
    (the last :data:`LAYOUT_CACHE` of them per pattern), so a training loop that passes the same
    pattern object every step pays the build once. A tensor given to a pattern (a block mask) must
    not be changed in place afterwards; build a new pattern instead."""

    _kinds: Tuple = _NO_KINDS
    LAYOUT_CACHE = 8
    # Decode with ragged lengths: True (a window, PowerAttention: defined relative to the query's
    # position) = each sequence gets the pattern at its own length; False (a fixed block table) =
    # every sequence reads the layout for the cache's Lmax, cut at its length.
    moves_with_length = True

    def _tile(self) -> Tuple[int, int]:
        return MAX_TILE, MAX_TILE

    def _kinds_for(self, Lq, Lk):
        """The in-block kinds at these lengths."""
        return self._kinds

    def _build(self, Lq, Lk, device, decode):
        Lq, Lk = _check_lens(Lq, Lk)
        device = _device(device)
        cache = self.__dict__.setdefault("_layouts", {})
        key = (Lq, Lk, str(device), decode)
        if key not in cache:
            if len(cache) >= self.LAYOUT_CACHE:
                cache.pop(next(iter(cache)))
            cache[key] = self._new_layout(Lq, Lk, device, decode)
        return cache[key]

    def _new_layout(self, Lq, Lk, device, decode):
        tq, tk = self._tile()
        t = self._tiles(Lq, Lk, device, tq, tk, decode)
        causal, window, sinks = self._kinds_for(Lq, Lk)
        return BlockLayout.from_entries(t.b, t.h, t.r, t.c, shape=self._shape(Lq, Lk), block_size=(tq, tk),
                                        seq_lens=(Lq, Lk), causal=causal, window=window, sinks=sinks,
                                        **t.bits_args())

    def layout(self, Lq: int, Lk: int, device=None) -> BlockLayout:
        """The :class:`BlockLayout` of this pattern for ``q [.., Lq, D]`` and ``k [.., Lk, D]``."""
        return self._build(Lq, Lk, device, False)

    def decode_layout(self, Lq: int, Lk: int, device=None) -> BlockLayout:
        """The layout of the last ``Lq`` query positions over ``Lk`` cached keys (decode)."""
        return self._build(Lq, Lk, device, True)

    def density(self, Lq: int, Lk: Optional[int] = None) -> float:
        """Fraction of (query, key) pairs attended, from the layout (no dense mask)."""
        return self.layout(Lq, Lq if Lk is None else Lk).density
