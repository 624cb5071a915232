"""BlockSparse: a block mask, a FlexAttention mask_mod, or a FlexAttention BlockMask."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..layout import check_block_mask
from ._base import _CHUNK, _Pattern, _Tiles, _blocks_to_tiles, _check_block, _check_int, _check_lens, _device, _tile_of


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
    nk = math.ceil(Lk / tk)
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

    :meth:`from_mask_mod` and :meth:`from_flex` return patterns built for one ``(Lq, Lk)``
    (:class:`MaskModPattern`, :class:`FlexPattern`), usable wherever a BlockSparse is.

    Example::

        >>> import torch, sparseattn as sa
        >>> bm = torch.rand(1, 2, 4, 4) < 0.3
        >>> p = sa.BlockSparse(bm, block_size=64)
        >>> q = k = v = torch.randn(2, 2, 250, 64)
        >>> out = sa.sparse_attention(q, k, v, p)
    """

    moves_with_length = False   # a fixed block table (decode: its layout for Lmax, cut at each length)

    def __init__(self, block_mask: torch.Tensor, block_size: int = 64):
        check_block_mask(block_mask)
        self.block_size = _check_block("block_size", block_size)
        self.block_mask = block_mask

    def __repr__(self):
        return f"BlockSparse(block_mask={tuple(self.block_mask.shape)}, block_size={self.block_size})"

    @staticmethod
    def from_mask_mod(mask_mod: Callable, B: Optional[int], H: Optional[int], Lq: int, Lk: int,
                      block_size: int = 64, device=None) -> "MaskModPattern":
        """Exact block-sparse pattern of ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's
        signature; True = attend): see :class:`MaskModPattern`.

        Example::

            >>> import torch, sparseattn as sa
            >>> doc = torch.randint(0, 3, (512,)).sort().values          # document ids
            >>> def same_doc(b, h, q_idx, kv_idx):
            ...     return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
            >>> p = sa.BlockSparse.from_mask_mod(same_doc, None, None, 512, 512)
        """
        return MaskModPattern(mask_mod, B, H, Lq, Lk, block_size, device)

    @staticmethod
    def from_flex(flex_block_mask) -> "FlexPattern":
        """The pattern of a ``torch.nn.attention.flex_attention.BlockMask``: see :class:`FlexPattern`."""
        return FlexPattern(flex_block_mask)

    def _tile(self):
        t = _tile_of(self.block_size)
        return t, t

    def _shape(self, Lq, Lk):
        return tuple(self.block_mask.shape[:2])

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

    def dense_mask(self, Lq: int, Lk: int) -> torch.Tensor:
        Lq, Lk = _check_lens(Lq, Lk)
        off = self._query_axis(Lq, Lk)
        bs = self.block_size
        bm = self.block_mask.cpu()
        I = (torch.arange(Lq) + off) // bs
        return bm[:, :, I][..., torch.arange(Lk) // bs]

    def _tiles(self, Lq, Lk, device, tq, tk, decode):
        off = self._query_axis(Lq, Lk)
        bm = self.block_mask.to(device)
        b, h, I, J = bm.nonzero(as_tuple=True)
        nq, nk = bm.shape[-2:]

        def visible(bb, hh, II, JJ, qpos=None, kpos=None):
            bb = bb if bm.shape[0] > 1 else torch.zeros_like(bb)
            hh = hh if bm.shape[1] > 1 else torch.zeros_like(hh)
            ok = (II >= 0) & (II < nq) & (JJ >= 0) & (JJ < nk)
            return ok & bm[bb, hh, II.clamp(0, nq - 1), JJ.clamp(0, nk - 1)]
        bs = self.block_size
        return _blocks_to_tiles(b, h, I, J, bs, bs, off, Lq, Lk, tq, tk, bm.shape[1], visible)


class _FixedLengthPattern(_Pattern):
    """A pattern built for one ``(Lq, Lk)`` (decode may take its last rows), whose tiles are
    computed once per tile shape and kept. Subclasses set ``seq_lens``, ``shape`` (Bl, Hl),
    ``block_sizes`` and define ``_element(b, h, q_row, kv_pos)``, ``_make_tiles(row0, Lq, Lk, tq, tk)``."""

    moves_with_length = False   # built for one (Lq, Lk)

    def __init__(self, seq_lens, shape, block_sizes, device):
        self.seq_lens, self.shape, self.block_sizes, self.device = seq_lens, shape, block_sizes, device
        self._cache = {}

    def __repr__(self):
        return f"BlockSparse.{self._NAME}(seq_lens={self.seq_lens}, shape={self.shape})"

    def _tile(self):
        return _tile_of(self.block_sizes[0]), _tile_of(self.block_sizes[1])

    def _shape(self, Lq, Lk):
        return self.shape

    def _check_fixed(self, Lq, Lk, decode):
        lq0, lk0 = self.seq_lens
        if Lk != lk0 or (Lq != lq0 and not (decode and Lq <= lq0)):
            what = "the key length" if decode else "(Lq, Lk)"
            raise ValueError(f"{self._NAME}: this pattern was built for seq_lens (Lq, Lk) = {self.seq_lens}, "
                             f"got {what} {(Lq, Lk)}")

    def dense_mask(self, Lq: int, Lk: int) -> torch.Tensor:
        Lq, Lk = _check_lens(Lq, Lk)
        self._check_fixed(Lq, Lk, False)
        dev = self.device
        b = torch.arange(self.shape[0], device=dev).view(-1, 1, 1, 1)
        h = torch.arange(self.shape[1], device=dev).view(1, -1, 1, 1)
        cols = torch.arange(Lk, device=dev).view(1, 1, 1, -1)
        parts = []
        for s in range(0, Lq, 4096):
            rows = torch.arange(s, min(s + 4096, Lq), device=dev).view(1, 1, -1, 1)
            parts.append(self._element(b, h, rows, cols).expand(*self.shape, rows.shape[2], Lk).cpu())
        return torch.cat(parts, 2)

    def _tiles(self, Lq, Lk, device, tq, tk, decode):
        self._check_fixed(Lq, Lk, decode)
        row0 = self.seq_lens[0] - Lq          # decode: the last Lq rows of the pattern
        key = (tq, tk, row0, Lq)
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            # evaluated on the device the pattern was built for (a mask_mod's captured tensors live there)
            self._cache[key] = self._make_tiles(row0, Lq, Lk, tq, tk)
        return self._cache[key].to(device)


class MaskModPattern(_FixedLengthPattern):
    """Exact block-sparse pattern of ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's
    signature; True = attend) for ``B x H`` and lengths ``(Lq, Lk)``; ``B``/``H`` None = 1 (broadcast).
    Made by :meth:`BlockSparse.from_mask_mod`.

    The mask_mod is called with broadcasting index tensors (``b [B,1,1,1]``, ``h [1,H,1,1]``,
    ``q_idx [1,1,R,1]``, ``kv_idx [1,1,1,Lk]``), a chunk of query blocks at a time (memory
    bounded, never ``Lq x Lk`` at once), and must return a bool tensor broadcastable to
    ``[B, H, R, Lk]``. ``q_idx`` is the query row, as in FlexAttention. Tiles where it is all
    True run as full tiles, all-False tiles are skipped, mixed tiles carry a bitmask.
    """

    _NAME = "from_mask_mod"

    def __init__(self, mask_mod: Callable, B: Optional[int], H: Optional[int], Lq: int, Lk: int,
                 block_size: int = 64, device=None):
        if not callable(mask_mod):
            raise TypeError(f"mask_mod: expected a callable (b, h, q_idx, kv_idx) -> bool tensor, got "
                            f"{type(mask_mod).__name__}")
        B = 1 if B is None else _check_int("B", B, 1)
        H = 1 if H is None else _check_int("H", H, 1)
        Lq, Lk = _check_lens(Lq, Lk)
        self.block_size = _check_block("block_size", block_size)
        self.mask_mod, self.batch_heads = mask_mod, (B, H)
        device = _device(device)
        t = _tile_of(self.block_size)
        tiles, shape = _tiles_from_mask_mod(mask_mod, B, H, 0, Lq, Lk, t, t, device)
        super().__init__((Lq, Lk), shape, (self.block_size, self.block_size), device)
        self._cache[(t, t, 0, Lq)] = tiles

    def _element(self, b, h, q_row, kv_pos):
        B, H = self.batch_heads
        return _eval_mask_mod(self.mask_mod, B, H, q_row.flatten(), kv_pos.flatten())

    def _make_tiles(self, row0, Lq, Lk, tq, tk):
        B, H = self.batch_heads
        return _tiles_from_mask_mod(self.mask_mod, B, H, row0, Lq, Lk, tq, tk, self.device, shape=self.shape)[0]


class FlexPattern(_FixedLengthPattern):
    """The pattern of a ``torch.nn.attention.flex_attention.BlockMask``: its partial blocks
    (``kv_num_blocks``/``kv_indices``, where its ``mask_mod`` applies, evaluated here into
    bitmasks), its full blocks (``full_kv_*``) and its ``BLOCK_SIZE``; gives the outputs
    ``flex_attention`` gives with it. Usable for exactly its ``seq_lengths``. Made by
    :meth:`BlockSparse.from_flex`."""

    _NAME = "from_flex"

    def __init__(self, flex_block_mask):
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
        super().__init__((Lq, Lk), (kvn.shape[0], kvn.shape[1]), (bsq, bsk), kvn.device)
        self.block_size = bsq
        self.mask_mod = flex_block_mask.mask_mod
        nq, nk = math.ceil(Lq / bsq), math.ceil(Lk / bsk)
        # status of each flex block: 0 not listed, 1 partial (mask_mod), 2 full
        status = torch.zeros(*self.shape, nq, nk + 1, dtype=torch.int8, device=self.device)
        lists = [(kvn, kvi, 1)]
        if getattr(flex_block_mask, "full_kv_num_blocks", None) is not None:
            lists.append((flex_block_mask.full_kv_num_blocks, flex_block_mask.full_kv_indices, 2))
        for num, idx, val in lists:
            num, idx = num[..., :nq], idx[..., :nq, :]
            used = torch.arange(idx.shape[-1], device=self.device) < num[..., None].long()
            if bool((used & ((idx < 0) | (idx >= nk))).any()):
                raise ValueError(f"flex_block_mask: expected key block indices in [0, {nk}) for seq_lengths "
                                 f"{(Lq, Lk)} and BLOCK_SIZE {(bsq, bsk)}")
            status.scatter_(-1, torch.where(used, idx.long(), nk), torch.full_like(idx, val, dtype=torch.int8))
        self.status = status[..., :nk]

    def _element(self, b, h, q, kv):
        bsq, bsk = self.block_sizes
        status = self.status
        nq, nk = status.shape[-2:]
        bb = b if status.shape[0] > 1 else torch.zeros_like(b)
        hh = h if status.shape[1] > 1 else torch.zeros_like(h)
        st = status[bb, hh, (q // bsq).clamp(max=nq - 1), (kv // bsk).clamp(max=nk - 1)]
        out = st == 2
        part = st == 1
        if bool(part.any()):
            m = self.mask_mod(bb, hh, q, kv)
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError("flex_block_mask.mask_mod: expected it to return a bool tensor, got "
                                f"{getattr(m, 'dtype', type(m).__name__)}")
            out = out | (part & m)
        return out

    def _make_tiles(self, row0, Lq, Lk, tq, tk):
        """Listed flex blocks -> tiles; partial blocks get bits from the mask_mod. Layout row r is
        pattern row r + row0 (the offset of _blocks_to_tiles)."""
        b, h, I, J = self.status.nonzero(as_tuple=True)
        partial = self.status[b, h, I, J] == 1

        def visible(bb, hh, II, JJ, qrow, kpos):
            return self._element(bb, hh, qrow, kpos)
        bsq, bsk = self.block_sizes
        return _blocks_to_tiles(b, h, I, J, bsq, bsk, row0, Lq, Lk, tq, tk, self.shape[1], visible,
                                needs_bits=partial)
