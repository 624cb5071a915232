"""Masks of the vision-language papers as static patterns: Concentric Causal Attention (CCA) and
AKI's modality-mutual attention.

Both follow the conventions of :mod:`sparseattn.patterns` (``layout``, ``decode_layout``,
``dense_mask``, ``density``; layouts cached per ``(Lq, Lk, device)``): when ``Lq != Lk`` the queries
are the **last** Lq tokens, query row ``r`` is token ``Lk - Lq + r`` (prefill with a cached prefix,
decode). Neither ever builds an ``Lq x Lk`` mask for its layout:

* :class:`ConcentricCausal` is position-id causal: its layout is
  :meth:`BlockLayout.from_positions` over its own position ids, evaluated in the kernels from one
  int32 per token;
* :class:`ModalityMutual` lists its tiles directly (the causal staircase plus the
  image-rows x question-columns rectangle), O(listed tiles), with packed bits only in the tiles the
  staircase or the rectangle's edges cut.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ..layout import BlockLayout
from ..patterns._base import (_Pattern, _Tiles, _check_int, _check_lens, _device, _eval_tile_bits, _expand_ranges,
                              _grid, _tile_cols, _tile_rows, _unique_tiles)


def _check_tile(block_size) -> int:
    bs = _check_int("block_size", block_size, 1)
    if bs not in (64, 128):
        raise ValueError(f"block_size: expected 64 or 128 (the layout tiles the kernels take), got {bs}")
    return bs


def concentric_rings(grid: Tuple[int, int] = (24, 24), device=None) -> torch.Tensor:
    """Ring of each patch of an ``H x W`` grid in raster order: ``min(r, c, H-1-r, W-1-c)`` (the
    outer border is ring 0). Returns int32 ``[H * W]``.

    Example::

        >>> from sparseattn.visual.patterns import concentric_rings
        >>> concentric_rings((4, 4)).view(4, 4).tolist()
        [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """
    H, W = _check_grid(grid)
    r = torch.arange(H, device=_device(device))[:, None]
    c = torch.arange(W, device=_device(device))[None, :]
    ring = torch.minimum(torch.minimum(r, c), torch.minimum(H - 1 - r, W - 1 - c))
    return ring.reshape(-1).to(torch.int32)


def _check_grid(grid) -> Tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid: expected a pair (H, W) of ints, got {grid!r}")
    return _check_int("grid[0]", grid[0], 1), _check_int("grid[1]", grid[1], 1)


class ConcentricCausal(_Pattern):
    """Concentric Causal Attention (CCA, Xing et al., NeurIPS 2024): the image's patches are
    numbered by concentric rings instead of raster order, and attention is causal in those numbers.

    Patch ``(r, c)`` of the ``H x W`` grid gets ring ``min(r, c, H-1-r, W-1-c)`` (0 = outer border).
    Position ids: text before the image ``0 .. image_start-1``; image token ``(r, c)``
    ``image_start + ring``; text after the image ``image_start + max_ring + 1, ...`` (the image
    takes ``max_ring + 1`` positions, 12 for 24 x 24). Query ``i`` attends key ``j`` iff
    ``pos[j] <= pos[i]``: image tokens see earlier text and every token of their own or outer
    rings, whatever the raster order; text sees everything before it. This is the reference
    code's mask (causal, with the image x image block replaced by ``ring(k) <= ring(q)``), in the
    compact form the spec verified; the same ids go into RoPE (:meth:`positions`).

    Args:
        image_start: index of the first image token (int >= 0).
        grid: ``(H, W)`` patches, raster order; the image is ``H * W`` tokens long.
        block_size: layout tile, 64 or 128.

    The layout is :meth:`BlockLayout.from_positions` over these ids (queries = the last Lq tokens,
    ``Lq <= Lk``), lists ``[1, 1, ...]``; sequences may end inside the image. Decode
    (:meth:`decode_layout`) of tokens after the image is causal attention (their ids exceed every
    earlier id); decoding a token inside the image is refused (ValueError), since the decode
    kernels evaluate causality by index.

    Example::

        >>> import torch, sparseattn as sa
        >>> cca = sa.visual.ConcentricCausal(image_start=5, grid=(6, 6), block_size=64)
        >>> cca.positions(45)[:12].tolist()      # text 0..4, then rings of the first patch row
        [0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5]
        >>> cca.positions(45)[-4:].tolist()      # text after the image (tokens 41..44): from 5 + 3
        [8, 9, 10, 11]
        >>> q = k = v = torch.randn(1, 2, 45, 32)
        >>> out = sa.sparse_attention(q, k, v, cca)
    """

    def __init__(self, image_start: int, grid: Tuple[int, int] = (24, 24), *, block_size: int = 128):
        self.image_start = _check_int("image_start", image_start, 0)
        self.grid = _check_grid(grid)
        self.block_size = _check_tile(block_size)
        self.image_len = self.grid[0] * self.grid[1]
        self.num_rings = (min(self.grid) - 1) // 2 + 1

    def __repr__(self):
        return f"ConcentricCausal(image_start={self.image_start}, grid={self.grid})"

    @property
    def image_end(self) -> int:
        return self.image_start + self.image_len

    def _tile(self):
        return self.block_size, self.block_size

    def _shape(self, Lq, Lk):
        return 1, 1

    def positions(self, L: int, device=None) -> torch.Tensor:
        """Position ids of tokens ``0 .. L-1``, int32 ``[L]`` (for RoPE; ``[None]`` for a batch)."""
        L = _check_int("L", L, 1)
        dev = _device(device)
        t = torch.arange(L, device=dev)
        s, e = self.image_start, self.image_end
        ring = concentric_rings(self.grid, dev).long()
        img = s + ring[torch.clamp(t - s, 0, self.image_len - 1)]
        after = t - self.image_len + self.num_rings
        return torch.where(t < s, t, torch.where(t < e, img, after)).to(torch.int32)

    def _check_q(self, Lq, Lk):
        Lq, Lk = _check_lens(Lq, Lk)
        if Lq > Lk:
            raise ValueError(f"Lq: expected Lq <= Lk (queries are the last Lq of the Lk tokens), got Lq={Lq}, Lk={Lk}")
        return Lq, Lk

    def dense_mask(self, Lq: int, Lk: int) -> torch.Tensor:
        """bool ``[1, 1, Lq, Lk]``: ``pos[j] <= pos[Lk - Lq + i]``."""
        Lq, Lk = self._check_q(Lq, Lk)
        pos = self.positions(Lk)
        return (pos[None, :] <= pos[Lk - Lq:, None])[None, None]

    def _new_layout(self, Lq, Lk, device, decode):
        Lq, Lk = self._check_q(Lq, Lk)
        if decode and Lk - Lq < self.image_end and Lk > self.image_start:
            raise ValueError(f"Lk: decode of CCA is causal attention only for tokens outside the image "
                             f"[{self.image_start}, {self.image_end}); the last Lq={Lq} of Lk={Lk} tokens reach "
                             f"into it "
                             f"(run them through sparse_attention with this pattern instead)")
        k_pos = self.positions(Lk, device)[None]
        return BlockLayout.from_positions(k_pos[:, Lk - Lq:].contiguous(), k_pos, self._tile())


class ModalityMutual(_Pattern):
    """AKI's modality-mutual attention (Sony, "Seeing is Understanding"): causal attention, plus
    the image rows see the question that follows the image.

    Query ``i`` attends key ``j`` iff ``j <= i``, or ``i`` is an image token
    (``image_start <= i < image_start + image_len``) and ``image_start + image_len <= j <
    question_end``. ``question_end`` is excluded (AKI: the first ``<|assistant|>`` token). When
    ``question_end <= image_start + image_len`` (AKI without the token, or without an image) the
    rectangle is empty: plain causal attention.

    Reference-code note: AKI's ``_make_modality_mutual_mask`` indexes ``q_end`` in the text before
    the image tokens are spliced in and writes ``M[img : img+Nv, img+Nv : q_end+Nv] = 1``; here all
    indices are in the spliced sequence, so ``question_end = q_end + Nv``. Padding keys are the
    engine's ``key_padding_mask``, as AKI sets them to 0. Generated tokens use plain causal
    attention in AKI, which is what this mask gives rows after the image: :meth:`decode_layout`
    serves them (decode is causal by definition), and refuses (ValueError) decoded image rows
    that would see later cached question tokens.

    Args:
        image_start, image_len, question_end: ints >= 0 (token indices).
        block_size: layout tile, 64 or 128.

    The layout lists the causal staircase's tiles and the rectangle's tiles directly (lists
    ``[1, 1, ...]``, O(listed tiles)); tiles cut by the diagonal or the rectangle's edges carry a
    packed bitmask, the others run unmasked.

    Example::

        >>> import torch, sparseattn as sa
        >>> mm = sa.visual.ModalityMutual(image_start=3, image_len=100, question_end=140, block_size=64)
        >>> m = mm.dense_mask(160, 160)[0, 0]
        >>> bool(m[50, 120]), bool(m[120, 130]), bool(m[50, 140])   # image row sees the question, not past it
        (True, False, False)
        >>> q = k = v = torch.randn(1, 2, 160, 32)
        >>> out = sa.sparse_attention(q, k, v, mm)
    """

    def __init__(self, image_start: int, image_len: int, question_end: int, *, block_size: int = 128):
        self.image_start = _check_int("image_start", image_start, 0)
        self.image_len = _check_int("image_len", image_len, 0)
        self.question_end = _check_int("question_end", question_end, 0)
        self.block_size = _check_tile(block_size)

    def __repr__(self):
        return (f"ModalityMutual(image_start={self.image_start}, image_len={self.image_len}, "
                f"question_end={self.question_end})")

    @property
    def image_end(self) -> int:
        return self.image_start + self.image_len

    def _tile(self):
        return self.block_size, self.block_size

    def _shape(self, Lq, Lk):
        return 1, 1

    def _allowed(self, qpos, kpos):
        """The definition, element-wise at positions (broadcasting)."""
        s, e = self.image_start, self.image_end
        rect = (qpos >= s) & (qpos < e) & (kpos >= e) & (kpos < self.question_end)
        return (kpos <= qpos) | rect

    def dense_mask(self, Lq: int, Lk: int) -> torch.Tensor:
        """bool ``[1, 1, Lq, Lk]`` (query row ``i`` at token ``Lk - Lq + i``)."""
        Lq, Lk = _check_lens(Lq, Lk)
        i, j = _grid(Lq, Lk, Lk - Lq, "cpu")
        return self._allowed(i, j)[None, None]

    def _tiles(self, Lq, Lk, device, tq, tk, decode):
        off = Lk - Lq
        e = self.image_end
        if decode and off < e and Lk - 1 >= self.image_start and min(self.question_end, Lk) > max(e, off + 1):
            raise ValueError(f"Lk: decode is causal attention, but of the last Lq={Lq} of Lk={Lk} tokens some are "
                             f"image rows that see later cached question tokens (up to {self.question_end}); run them "
                             f"through sparse_attention with this pattern instead")
        nq, nk = math.ceil(Lq / tq), math.ceil(Lk / tk)
        r = torch.arange(nq, device=device)
        p0, p1 = _tile_rows(r, tq, off, Lq)                 # first / last token of each query tile
        # causal staircase: key tiles 0 .. p1 // tk (none for tiles of rows before token 0)
        hi = torch.where(p1 >= 0, torch.clamp(p1, max=Lk - 1) // tk, -1)
        # rectangle: tiles holding image rows x key tiles holding question tokens
        s, e, qe = self.image_start, self.image_end, min(self.question_end, Lk)
        img_rows = (p1 >= s) & (p0 < e) & (qe > e)
        lo_r = torch.full_like(r, e // tk)
        hi_r = torch.where(img_rows, torch.full_like(r, (max(qe, 1) - 1) // tk), -1)
        idx, c = _expand_ranges(torch.cat([torch.zeros_like(r), lo_r]), torch.cat([hi, hi_r]))
        rr = torch.cat([r, r])[idx]
        z = torch.zeros_like(rr)
        b, h, rr, c, _ = _unique_tiles(z, z, rr, c, 1, nq, nk)
        # tiles entirely below the diagonal need no bits; the rest get them (all-True ones become full)
        q0, _ = _tile_rows(rr, tq, off, Lq)
        _, k1 = _tile_cols(c, tk, Lk)
        bits_idx = (k1 > q0).nonzero().squeeze(1)
        bits = None
        if bits_idx.numel():
            bits = _eval_tile_bits(lambda bb, hh, qp, kp: self._allowed(qp, kp), b[bits_idx], h[bits_idx],
                                   rr[bits_idx], c[bits_idx], tq, tk, off, Lq, Lk)
        return _Tiles(b, h, rr, c, bits_idx, bits)
