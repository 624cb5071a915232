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


