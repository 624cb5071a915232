"""Static sparse patterns: pattern objects that compile to a :class:`BlockLayout`.

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
from typing import Callable, Optional, Sequence, Tuple

import torch

from .layout import BlockLayout, check_block_mask

__all__ = ["BlockSparse", "SlidingWindow", "PowerAttention", "PerHead"]

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
    dev = b.device
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
    if causal is None:
        one = torch.ones_like(r, dtype=torch.bool)
        return one, one
    any_, all_ = k0 <= p1, k1 <= p0
    if window is not None:
        any_ = any_ & ((k0 < sinks) | (torch.clamp(p0 - k1, min=0) < window))
        all_ = all_ & ((k1 < sinks) | (p1 - torch.clamp(k0, min=sinks) < window))
    return any_, all_


def _kind_elem(qpos, kpos, kinds):
    """The kinds element-wise at positions (bottom-right causal: position compare)."""
    causal, window, sinks = kinds
    keep = torch.ones(torch.broadcast_shapes(qpos.shape, kpos.shape), dtype=torch.bool, device=qpos.device)
    if causal is not None:
        keep = keep & (kpos <= qpos)
        if window is not None:
            keep = keep & ((qpos - kpos < window) | (kpos < sinks))
    return keep


_NO_KINDS = (None, None, 0)


def _grid(Lq, Lk, off, device):
    return (torch.arange(Lq, device=device) + off)[:, None], torch.arange(Lk, device=device)[None, :]


# ----------------------------------------------------------------------------- base
class _Pattern:
    """Shared machinery. Subclasses define ``_kinds``, ``_tile``, ``_shape(Lq, Lk)``,
    ``_tiles(Lq, Lk, device, tq, tk, decode)`` and ``dense_mask``."""

    _kinds: Tuple = _NO_KINDS

    def _tile(self) -> Tuple[int, int]:
        return MAX_TILE, MAX_TILE

    def _kinds_for(self, Lq, Lk):
        """The in-block kinds at these lengths."""
        return self._kinds

    def _build(self, Lq, Lk, device, decode):
        Lq, Lk = _check_lens(Lq, Lk)
        device = _device(device)
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


# ----------------------------------------------------------------------------- SlidingWindow
class SlidingWindow(_Pattern):
    """Causal sliding window with attention sinks: key ``j`` is visible to the query at position
    ``i`` iff ``j <= i`` and (``i - j < window`` or ``j < sinks``).

    Args:
        window: keys per query, counting itself (int >= 1; larger than L = causal attention).
        sinks: the first ``sinks`` tokens are seen by every query (StreamingLLM's attention sinks).

    Example::

        >>> import torch, sparseattn as sa
        >>> q = k = v = torch.randn(1, 4, 1000, 64)
        >>> out = sa.sparse_attention(q, k, v, sa.SlidingWindow(256, sinks=4))
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
        return ((j <= i) & ((i - j < self.window) | (j < self.sinks)))[None, None]

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


# ----------------------------------------------------------------------------- PowerAttention
class PowerAttention(_Pattern):
    """PowerAttention (Chen et al., 2025): causal and blockwise. With ``b = block_size``, the query
    at position ``i`` (block ``I = i // b``) sees key ``j <= i`` (block ``J = j // b``) iff
    ``I - J`` is 0 or a power of two, or ``I - J < window_blocks``, or ``J < sink_blocks``.
    Each query block sees O(log(L / b)) key blocks.

    Args:
        block_size: b, a power of two >= 16 (the paper used 256; default 64).
        window_blocks: local window in blocks (>= 1; 1 = only the diagonal block, already included).
        sink_blocks: the first blocks every query sees (>= 0; the paper used 1).

    Example::

        >>> import torch, sparseattn as sa
        >>> q = k = v = torch.randn(1, 4, 1000, 64)
        >>> out = sa.sparse_attention(q, k, v, sa.PowerAttention(block_size=64))
    """

    _kinds = ("bottom_right", None, 0)

    def __init__(self, block_size: int = 64, window_blocks: int = 1, sink_blocks: int = 1):
        self.block_size = _check_block("block_size", block_size)
        self.window_blocks = _check_int("window_blocks", window_blocks, 1)
        self.sink_blocks = _check_int("sink_blocks", sink_blocks, 0)

    def __repr__(self):
        return (f"PowerAttention(block_size={self.block_size}, window_blocks={self.window_blocks}, "
                f"sink_blocks={self.sink_blocks})")

    def _tile(self):
        t = _tile_of(self.block_size)
        return t, t

    def _shape(self, Lq, Lk):
        return 1, 1

    def _block_visible(self, I, J):
        d = I - J
        return (d >= 0) & (((d & (d - 1)) == 0) | (d < self.window_blocks) | (J < self.sink_blocks))

    def dense_mask(self, Lq: int, Lk: int) -> torch.Tensor:
        Lq, Lk = _check_lens(Lq, Lk)
        i, j = _grid(Lq, Lk, Lk - Lq, "cpu")
        bs = self.block_size
        return ((j <= i) & self._block_visible(torch.div(i, bs, rounding_mode="floor"), j // bs))[None, None]

    def _tiles(self, Lq, Lk, device, tq, tk, decode):
        bs, off = self.block_size, Lk - Lq
        i_lo, i_hi = max(off, 0) // bs, (Lk - 1) // bs
        I = torch.arange(i_lo, i_hi + 1, device=device)
        d = sorted(set(range(min(self.window_blocks, i_hi + 1))) |
                   {1 << k for k in range(max(1, i_hi + 1).bit_length())})
        d = torch.tensor(d, dtype=torch.long, device=device)
        J = (I[:, None] - d[None, :]).flatten()
        II = I[:, None].expand(-1, d.numel()).flatten()
        s = torch.arange(min(self.sink_blocks, i_hi + 1), device=device)
        Js, Is = s[None, :].expand(I.numel(), -1).flatten(), I[:, None].expand(-1, s.numel()).flatten()
        keep = Js <= Is
        I, J = torch.cat([II, Is[keep]]), torch.cat([J, Js[keep]])
        ok = J >= 0
        I, J = I[ok], J[ok]
        z = torch.zeros_like(I)

        def visible(b, h, I, J, qpos, kpos):
            return self._block_visible(I, J)
        return _blocks_to_tiles(z, z, I, J, bs, bs, off, Lq, Lk, tq, tk, 1, visible)


# ----------------------------------------------------------------------------- BlockSparse
def _eval_mask_mod(mask_mod, B, H, rows, cols, name="mask_mod"):
    """mask_mod(b [B,1,1,1], h [1,H,1,1], q_idx [1,1,R,1], kv_idx [1,1,1,C]) -> bool 4-D with
    sizes 1 or full (validated)."""
    dev = rows.device
    bb = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hh = torch.arange(H, device=dev).view(1, H, 1, 1)
    out = mask_mod(bb, hh, rows.view(1, 1, -1, 1), cols.view(1, 1, 1, -1))
    want = (B, H, rows.numel(), cols.numel())
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected it to return a bool torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.bool:
        raise TypeError(f"{name}: expected it to return dtype torch.bool, got {out.dtype}")
    if out.dim() > 4 or any(s not in (1, t) for s, t in zip(out.shape[::-1], want[::-1])):
        raise ValueError(f"{name}: expected a result broadcastable to {list(want)} (b, h, q_idx, kv_idx), "
                         f"got shape {list(out.shape)}")
    return out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))


def _tiles_from_mask_mod(mask_mod, B, H, row0, Lq, Lk, tq, tk, device, shape=None):
    """Exact tiles of a mask_mod over query rows row0 .. row0+Lq-1 (layout rows 0..Lq-1) and keys
    0..Lk-1, a chunk of query tiles at a time: all-True tiles listed without bits, all-False
    dropped, mixed ones with bits. Returns (_Tiles, (Bl, Hl))."""
    nq, nk = math.ceil(Lq / tq), math.ceil(Lk / tk)
    cols = torch.arange(Lk, device=device)
    rows_per = max(1, _CHUNK // max(1, B * H * tq * Lk)) * tq
    parts, bl, hl = [], None, None
    for s in range(0, Lq, rows_per):
        rows = torch.arange(s, min(s + rows_per, Lq), device=device)
        m = _eval_mask_mod(mask_mod, B, H, rows + row0, cols)
        if bl is None:
            bl, hl = shape if shape is not None else (m.shape[0], m.shape[1])
        m = m.expand(bl, hl, rows.numel(), Lk)
        pad_r, pad_c = (-rows.numel()) % tq, nk * tk - Lk
        m0 = torch.nn.functional.pad(m, (0, pad_c, 0, pad_r), value=False)
        m1 = torch.nn.functional.pad(m, (0, pad_c, 0, pad_r), value=True)
        t0 = m0.view(bl, hl, -1, tq, nk, tk).transpose(3, 4)             # [bl, hl, nr, nk, tq, tk]
        any_ = t0.any(-1).any(-1)
        all_ = m1.view(bl, hl, -1, tq, nk, tk).all(-1).all(3)
        b, h, rr, c = any_.nonzero(as_tuple=True)
        mixed = ~all_[b, h, rr, c]
        parts.append((b, h, rr + s // tq, c, mixed, t0[b[mixed], h[mixed], rr[mixed], c[mixed]]))
    b, h, r, c, mixed, bits = (torch.cat(x) for x in zip(*parts))
    return _Tiles(b, h, r, c, mixed.nonzero().squeeze(1), bits), (bl, hl)


class BlockSparse(_Pattern):
    """Block-sparse attention from a block mask, a FlexAttention-style ``mask_mod`` or a
    FlexAttention ``BlockMask``.

    ``BlockSparse(block_mask, block_size)``: ``block_mask`` bool ``[B|1, H|1, nQ, nK]``, True = the
    ``block_size x block_size`` block is attended (every pair in it). The key axis needs
    ``nK = ceil(Lk / block_size)``. The query axis indexes query *positions* when
    ``nQ = ceil(Lk / block_size)`` and ``Lq <= Lk`` (row r at position ``Lk - Lq + r``: prefill with a
    cached prefix, decode), else query rows (``nQ = ceil(Lq / block_size)``, e.g. cross-attention).

    Example::

        >>> import torch, sparseattn as sa
        >>> bm = torch.rand(1, 4, 16, 16) < 0.3
        >>> p = sa.BlockSparse(bm, block_size=64)
        >>> q = k = v = torch.randn(2, 4, 1000, 64)
        >>> out = sa.sparse_attention(q, k, v, p)
    """

    def __init__(self, block_mask: torch.Tensor, block_size: int = 64):
        check_block_mask(block_mask)
        self.block_size = _check_block("block_size", block_size)
        self.block_mask = block_mask
        self._mode = "blocks"

    def __repr__(self):
        if self._mode == "blocks":
            return f"BlockSparse(block_mask={tuple(self.block_mask.shape)}, block_size={self.block_size})"
        return f"BlockSparse.{self._mode}(seq_lens={self._lens}, shape={self._bh})"

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_mask_mod(cls, mask_mod: Callable, B: Optional[int], H: Optional[int], Lq: int, Lk: int,
                      block_size: int = 64, device=None) -> "BlockSparse":
        """Exact block-sparse pattern of ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's
        signature; True = attend) for ``B x H`` and lengths ``(Lq, Lk)``; ``B``/``H`` None = 1 (broadcast).

        The mask_mod is called with broadcasting index tensors (``b [B,1,1,1]``, ``h [1,H,1,1]``,
        ``q_idx [1,1,R,1]``, ``kv_idx [1,1,1,Lk]``), a chunk of query blocks at a time (memory
        bounded, never ``Lq x Lk`` at once), and must return a bool tensor broadcastable to
        ``[B, H, R, Lk]``. ``q_idx`` is the query row, as in FlexAttention. Tiles where it is all
        True run as full tiles, all-False tiles are skipped, mixed tiles carry a bitmask.

        Example::

            >>> doc = torch.randint(0, 3, (512,)).sort().values          # document ids
            >>> def same_doc(b, h, q_idx, kv_idx):
            ...     return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
            >>> p = sa.BlockSparse.from_mask_mod(same_doc, None, None, 512, 512)
        """
        if not callable(mask_mod):
            raise TypeError(f"mask_mod: expected a callable (b, h, q_idx, kv_idx) -> bool tensor, got "
                            f"{type(mask_mod).__name__}")
        B = 1 if B is None else _check_int("B", B, 1)
        H = 1 if H is None else _check_int("H", H, 1)
        Lq, Lk = _check_lens(Lq, Lk)
        self = cls.__new__(cls)
        self.block_size = _check_block("block_size", block_size)
        self._mode, self._mask_mod, self._lens, self._BH = "from_mask_mod", mask_mod, (Lq, Lk), (B, H)
        self._device = _device(device)
        t = _tile_of(self.block_size)
        tiles, self._bh = _tiles_from_mask_mod(mask_mod, B, H, 0, Lq, Lk, t, t, self._device)
        self._cache = {(t, t, 0, Lq): tiles}
        return self

    @classmethod
    def from_flex(cls, flex_block_mask) -> "BlockSparse":
        """The pattern of a ``torch.nn.attention.flex_attention.BlockMask``: its partial blocks
        (``kv_num_blocks``/``kv_indices``, where its ``mask_mod`` applies, evaluated here into
        bitmasks), its full blocks (``full_kv_*``) and its ``BLOCK_SIZE``; gives the outputs
        ``flex_attention`` gives with it. Usable for exactly its ``seq_lengths``."""
        for attr in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "mask_mod", "seq_lengths"):
            if not hasattr(flex_block_mask, attr):
                raise TypeError("flex_block_mask: expected a torch.nn.attention.flex_attention.BlockMask, got "
                                f"{type(flex_block_mask).__name__} (no {attr})")
        bsq, bsk = (int(x) for x in flex_block_mask.BLOCK_SIZE)
        _check_block("flex_block_mask.BLOCK_SIZE[0]", bsq)
        _check_block("flex_block_mask.BLOCK_SIZE[1]", bsk)
        Lq, Lk = (int(x) for x in flex_block_mask.seq_lengths)
        kvn, kvi = flex_block_mask.kv_num_blocks, flex_block_mask.kv_indices
        if kvn.dim() != 3 or kvi.dim() != 4 or kvn.shape[-1] < math.ceil(Lq / bsq):
            raise ValueError(f"flex_block_mask: expected kv_num_blocks [B, H, >= {math.ceil(Lq / bsq)}] for "
                             f"seq_lengths {(Lq, Lk)}, got {tuple(kvn.shape)}")
        self = cls.__new__(cls)
        self.block_size = bsq
        self._mode, self._lens, self._flex = "from_flex", (Lq, Lk), flex_block_mask
        self._bh = (kvn.shape[0], kvn.shape[1])
        self._fbs = (bsq, bsk)
        nq, nk = math.ceil(Lq / bsq), math.ceil(Lk / bsk)
        dev = kvn.device
        # status of each flex block: 0 not listed, 1 partial (mask_mod), 2 full
        status = torch.zeros(*self._bh, nq, nk + 1, dtype=torch.int8, device=dev)
        lists = [(kvn, kvi, 1)]
        if getattr(flex_block_mask, "full_kv_num_blocks", None) is not None:
            lists.append((flex_block_mask.full_kv_num_blocks, flex_block_mask.full_kv_indices, 2))
        for num, idx, val in lists:
            num, idx = num[..., :nq], idx[..., :nq, :]
            used = torch.arange(idx.shape[-1], device=dev) < num[..., None].long()
            if bool((used & ((idx < 0) | (idx >= nk))).any()):
                raise ValueError(f"flex_block_mask: expected key block indices in [0, {nk}) for seq_lengths "
                                 f"{(Lq, Lk)} and BLOCK_SIZE {(bsq, bsk)}")
            status.scatter_(-1, torch.where(used, idx.long(), nk), torch.full_like(idx, val, dtype=torch.int8))
        self._status = status[..., :nk]
        self._cache = {}
        return self

    # -- shared ---------------------------------------------------------------------------------
    def _tile(self):
        if self._mode == "from_flex":
            return _tile_of(self._fbs[0]), _tile_of(self._fbs[1])
        t = _tile_of(self.block_size)
        return t, t

    def _shape(self, Lq, Lk):
        if self._mode == "blocks":
            return tuple(self.block_mask.shape[:2])
        return self._bh

    def _check_fixed(self, Lq, Lk, decode):
        lq0, lk0 = self._lens
        if Lk != lk0 or (Lq != lq0 and not (decode and Lq <= lq0)):
            what = "the key length" if decode else "(Lq, Lk)"
            raise ValueError(f"{self._mode}: this pattern was built for seq_lens (Lq, Lk) = {self._lens}, "
                             f"got {what} {(Lq, Lk)}")

    def _query_axis(self, Lq, Lk):
        """Offset of query row 0 in the block mask's query axis (see the class docstring)."""
        nq, nk = self.block_mask.shape[-2:]
        bs = self.block_size
        if nk != math.ceil(Lk / bs):
            raise ValueError(f"block_mask: expected {math.ceil(Lk / bs)} key blocks (Lk={Lk}, block_size={bs}), "
                             f"got shape {tuple(self.block_mask.shape)}")
        if Lq <= Lk and nq == math.ceil(Lk / bs):
            return Lk - Lq
        if nq == math.ceil(Lq / bs):
            return 0
        raise ValueError(f"block_mask: expected {math.ceil(Lk / bs)} query blocks (positions of Lk={Lk}) or "
                         f"{math.ceil(Lq / bs)} (rows of Lq={Lq}) for block_size={bs}, got shape "
                         f"{tuple(self.block_mask.shape)}")

    def _block_lookup(self, bm):
        nq, nk = bm.shape[-2:]

        def visible(b, h, I, J, qpos=None, kpos=None):
            bb = b if bm.shape[0] > 1 else torch.zeros_like(b)
            hh = h if bm.shape[1] > 1 else torch.zeros_like(h)
            ok = (I >= 0) & (I < nq) & (J >= 0) & (J < nk)
            return ok & bm[bb, hh, I.clamp(0, nq - 1), J.clamp(0, nk - 1)]
        return visible

    def _flex_elem(self, status):
        bsq, bsk = self._fbs
        nq, nk = status.shape[-2:]
        mask_mod = self._flex.mask_mod

        def fn(b, h, q, kv):
            bb = b if status.shape[0] > 1 else torch.zeros_like(b)
            hh = h if status.shape[1] > 1 else torch.zeros_like(h)
            st = status[bb, hh, (q // bsq).clamp(max=nq - 1), (kv // bsk).clamp(max=nk - 1)]
            out = st == 2
            part = st == 1
            if bool(part.any()):
                m = mask_mod(bb, hh, q, kv)
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                    raise TypeError("flex_block_mask.mask_mod: expected it to return a bool tensor, got "
                                    f"{getattr(m, 'dtype', type(m).__name__)}")
                out = out | (part & m)
            return out
        return fn

    def dense_mask(self, Lq: int, Lk: int) -> torch.Tensor:
        Lq, Lk = _check_lens(Lq, Lk)
        if self._mode == "blocks":
            off = self._query_axis(Lq, Lk)
            bs = self.block_size
            bm = self.block_mask.cpu()
            I = (torch.arange(Lq) + off) // bs
            return bm[:, :, I][..., torch.arange(Lk) // bs]
        self._check_fixed(Lq, Lk, False)
        rows, cols = torch.arange(Lq), torch.arange(Lk)
        if self._mode == "from_mask_mod":
            B, H = self._BH
            parts = [_eval_mask_mod(self._mask_mod, B, H, rows[s:s + 4096].to(self._device), cols.to(self._device))
                     .expand(*self._bh, -1, Lk).cpu() for s in range(0, Lq, 4096)]
            return torch.cat(parts, 2)
        fn = self._flex_elem(self._status)
        dev = self._status.device
        b = torch.arange(self._bh[0], device=dev).view(-1, 1, 1, 1)
        h = torch.arange(self._bh[1], device=dev).view(1, -1, 1, 1)
        return fn(b, h, rows.to(dev).view(1, 1, -1, 1), cols.to(dev).view(1, 1, 1, -1)).expand(
            *self._bh, Lq, Lk).cpu()

    def _tiles(self, Lq, Lk, device, tq, tk, decode):
        if self._mode == "blocks":
            off = self._query_axis(Lq, Lk)
            bm = self.block_mask.to(device)
            b, h, I, J = bm.nonzero(as_tuple=True)
            bs = self.block_size
            return _blocks_to_tiles(b, h, I, J, bs, bs, off, Lq, Lk, tq, tk, bm.shape[1], self._block_lookup(bm))
        self._check_fixed(Lq, Lk, decode)
        row0 = self._lens[0] - Lq          # decode: the last Lq rows of the pattern
        # mask_mods run on the device they were built for (their captured tensors live there)
        key = (tq, tk, row0, Lq)
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            if self._mode == "from_mask_mod":
                B, H = self._BH
                self._cache[key] = _tiles_from_mask_mod(self._mask_mod, B, H, row0, Lq, Lk, tq, tk, self._device,
                                                        shape=self._bh)[0]
            else:
                self._cache[key] = self._flex_tiles(row0, Lq, Lk, tq, tk)
        return self._cache[key].to(device)

    def _flex_tiles(self, row0, Lq, Lk, tq, tk):
        """Listed flex blocks -> tiles; partial blocks get bits from the mask_mod. Layout row r is
        pattern row r + row0 (the offset of _blocks_to_tiles)."""
        status = self._status
        b, h, I, J = status.nonzero(as_tuple=True)
        partial = status[b, h, I, J] == 1
        fn = self._flex_elem(status)

        def visible(bb, hh, II, JJ, qrow, kpos):
            return fn(bb, hh, qrow, kpos)
        bsq, bsk = self._fbs
        return _blocks_to_tiles(b, h, I, J, bsq, bsk, row0, Lq, Lk, tq, tk, self._bh[1], visible, needs_bits=partial)


# ----------------------------------------------------------------------------- PerHead
class PerHead(_Pattern):
    """One pattern per query head: head ``h`` uses ``patterns[h]`` (e.g. dense causal heads next to
    streaming heads). The layout has ``Hl = len(patterns)``, so it needs ``Hq == len(patterns)``.

    Args:
        patterns: a sequence of SlidingWindow, PowerAttention or BlockSparse patterns whose head
            dimension is 1 (a BlockSparse may have a batch dimension).

    Example::

        >>> import torch, sparseattn as sa
        >>> p = sa.PerHead([sa.SlidingWindow(10**9)] * 2 + [sa.SlidingWindow(256, sinks=4)] * 6)
        >>> q = k = v = torch.randn(1, 8, 1000, 64)
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
                kb = _eval_tile_bits(lambda bb, hh, qq, kk: _kind_elem(qq, kk, kinds), b[need], b[need],
                                     r[need], c[need], tq, tk, off, Lq, Lk)
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
