"""BlockLayout: the one sparse format every pattern and kernel of sparseattn uses."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .builders import (_check_block_size, _check_kinds, _check_seq_lens, _classify_tiles, _entries_to_lists,
                       _gpu_lists, _is_compiling, _pack_bits, check_block_mask, mask_to_lists)
from .predicates import alibi_distance, in_bounds, key_keep, kinds_keep, segments_keep, unpack_bits


class BlockLayout:
    """Which key blocks each query block attends to: the one sparse format of sparseattn.

    The score matrix of one (batch, head) is cut into tiles of ``block_size = (BLOCK_Q, BLOCK_K)``
    over sequence lengths ``seq_lens = (Lq, Lk)``: ``nQ = ceil(Lq / BLOCK_Q)`` query blocks and
    ``nK = ceil(Lk / BLOCK_K)`` key blocks. Every listed tile is one of two kinds:

    * **full**: every (query, key) pair in it is attended; kernels run it with no mask arithmetic;
    * **partial**: pairs inside it are masked by the in-block mask kinds below.

    Tiles not listed are skipped entirely: no load, no FLOP.

    Lists (all int32, sorted ascending within a row; entries past the count are padding, in range
    but never read):

    * ``kv_num_blocks [Bl, Hl, nQ]``, ``kv_indices [Bl, Hl, nQ, maxK]``: partial key blocks of each
      query block; ``full_kv_num_blocks``, ``full_kv_indices``: its full key blocks (padding is 0);
    * ``q_num_blocks [Bl, Hl, nK]``, ``q_indices [Bl, Hl, nK, maxQ]`` and ``full_q_*``: the transposed
      lists (query blocks of each key block), used by the dK/dV pass of the backward.

    ``maxK`` / ``maxQ`` are the widest row of each list, so a key block that every query block
    attends (a sink) makes the transposed lists ``nQ`` wide.

    ``Bl`` is 1 or the batch size and ``Hl`` is 1 or the number of query heads; a size-1 dimension
    broadcasts (the kernels read it with stride 0, nothing is copied).

    In-block mask kinds, evaluated inside partial tiles by the kernels:

    * sequence bounds: rows >= Lq and columns >= Lk are never attended (tiles that cross a bound are
      always partial);
    * causal: key j is visible to query i iff ``j <= i + causal_offset``; ``causal="top_left"`` gives
      offset 0 (torch's ``is_causal``), ``"bottom_right"`` gives ``Lk - Lq`` (queries are the last
      Lq positions, as in decode and prefill with a cached prefix);
    * sliding window with sinks (with causal): key j is visible to query i iff ``j <= i + offset``
      and (``i + offset - j < window`` or ``j < sinks``), token-exact;
    * per-tile bitmasks ``bits`` (int32 ``[n, BLOCK_Q, ceil(BLOCK_K / 32)]``, bit k of word w =
      column 32 w + k of the tile): ``kv_bit_ids`` / ``q_bit_ids`` (same shapes as ``kv_indices`` /
      ``q_indices``) give each partial tile's bitmask, -1 for none. Arbitrary masks (a mask_mod,
      a FlexAttention BlockMask) become these, O(listed tiles) in memory;
    * an element mask ``mask`` (bool ``[Bl|1, Hl|1, Lq, Lk]``, True = attend), read only in partial
      tiles: what an arbitrary boolean ``attn_mask`` of scaled_dot_product_attention becomes (it is
      already dense).

    Build one with :meth:`from_block_mask`, :meth:`from_indices` or :meth:`from_entries`; all
    validate their input. :meth:`from_topk` builds one on the device with fixed-width lists.
    ``to_dense_mask()`` gives the element mask (for oracles and plots), ``density`` the fraction of
    attended (query, key) pairs.

    Example::

        >>> import torch, sparseattn as sa
        >>> bm = torch.rand(1, 1, 4, 4) < 0.5                      # [B|1, H|1, nQ, nK]
        >>> layout = sa.BlockLayout.from_block_mask(bm, block_size=(64, 64), seq_lens=(256, 200))
        >>> layout.to_dense_mask().shape
        torch.Size([1, 1, 256, 200])
    """

    def __init__(self, *, block_size, seq_lens, kv_num_blocks, kv_indices, kv_bit_ids, full_kv_num_blocks,
                 full_kv_indices, q_num_blocks, q_indices, q_bit_ids, full_q_num_blocks, full_q_indices,
                 causal_offset: Optional[int] = None, window: Optional[int] = None, sinks: int = 0,
                 mask: Optional[torch.Tensor] = None, bits: Optional[torch.Tensor] = None,
                 q_pos: Optional[torch.Tensor] = None, k_pos: Optional[torch.Tensor] = None,
                 key_mask: Optional[torch.Tensor] = None, q_seg: Optional[torch.Tensor] = None,
                 k_seg: Optional[torch.Tensor] = None):
        # Internal: use from_block_mask / from_indices / from_entries, which validate and build the lists.
        self.block_size = block_size
        self.seq_lens = seq_lens
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.kv_bit_ids = kv_bit_ids
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.q_bit_ids = q_bit_ids
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.causal_offset = causal_offset
        self.window = window
        self.sinks = sinks
        self.mask = mask
        self.bits = bits
        self.q_pos = q_pos
        self.k_pos = k_pos
        self.key_mask = key_mask
        self.q_seg = q_seg
        self.k_seg = k_seg

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_size=(64, 64), seq_lens=None,
                        causal: Optional[str] = None, mask: Optional[torch.Tensor] = None,
                        partial_blocks: Optional[torch.Tensor] = None, window: Optional[int] = None,
                        sinks: int = 0, sync_free: bool = False) -> "BlockLayout":
        """Build a layout from a block mask.

        Args:
            block_mask: bool ``[B|1, H|1, nQ, nK]``, True = the tile is attended.
            block_size: ``(BLOCK_Q, BLOCK_K)`` or one int; powers of two >= 16.
            seq_lens: ``(Lq, Lk)``; default ``(nQ * BLOCK_Q, nK * BLOCK_K)``. Must give exactly
                ``nQ`` and ``nK`` blocks.
            causal: None, ``"top_left"`` or ``"bottom_right"``: an in-block causal mask on top of
                the block mask (tiles entirely above the diagonal are dropped).
            mask: optional element mask, bool ``[B|1, H|1, Lq, Lk]`` (True = attend), applied in
                partial tiles. Tiles where it is mixed must be marked in ``partial_blocks``.
            partial_blocks: optional bool like ``block_mask``: tiles that need the element mask.
            window, sinks: sliding window with attention sinks (needs ``causal``): key j visible
                to query i iff ``j <= i + offset`` and (``i + offset - j < window`` or ``j < sinks``).
            sync_free: make the lists as wide as the block grid (``nK`` entries per query block,
                ``nQ`` per key block) instead of the widest row: nothing is read back to the host,
                so on a GPU the build stays asynchronous (``scaled_dot_product_attention`` uses it
                for bool masks). Costs list memory only: the kernels read ``num_blocks`` entries.

        Returns:
            BlockLayout. Tiles crossing a sequence bound or the causal diagonal are partial,
            the others full.
        """
        check_block_mask(block_mask)
        bq, bk = _check_block_size(block_size)
        nq, nk = block_mask.shape[-2:]
        if seq_lens is None:
            seq_lens = (nq * bq, nk * bk)
        lq, lk = _check_seq_lens(seq_lens)
        if (math.ceil(lq / bq), math.ceil(lk / bk)) != (nq, nk):
            raise ValueError(
                f"block_mask: expected [..., {math.ceil(lq / bq)}, {math.ceil(lk / bk)}] blocks for "
                f"seq_lens={(lq, lk)} and block_size={(bq, bk)}, got shape {tuple(block_mask.shape)}")
        offset, window, sinks = _check_kinds(causal, window, sinks, lq, lk)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask: expected a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
            if mask.dim() != 4 or tuple(mask.shape[-2:]) != (lq, lk):
                raise ValueError(f"mask: expected shape [B|1, H|1, {lq}, {lk}], got {tuple(mask.shape)}")
            for d, name in ((0, "B"), (1, "H")):
                if 1 not in (mask.shape[d], block_mask.shape[d]) and mask.shape[d] != block_mask.shape[d]:
                    raise ValueError(f"mask: dim {d} ({name}) must be 1 or {block_mask.shape[d]}, got {mask.shape[d]}")
        dev = block_mask.device
        attended, partial = _classify_tiles(torch.arange(nq, device=dev)[:, None], torch.arange(nk, device=dev)[None, :],
                                            (bq, bk), (lq, lk), offset, window, sinks)
        attended = block_mask & attended
        if partial_blocks is not None:
            partial = partial | partial_blocks
        if mask is not None and partial_blocks is None:
            partial = torch.ones_like(partial)
        full_mask = attended & ~partial
        partial_mask = attended & partial
        if mask is not None:
            # The lists and the element mask share one (Bl, Hl).
            bl, hl = torch.broadcast_shapes(tuple(mask.shape[:2]), tuple(block_mask.shape[:2]))
            mask = mask.expand(bl, hl, lq, lk)
            partial_mask = partial_mask.expand(bl, hl, nq, nk)
            full_mask = full_mask.expand(bl, hl, nq, nk)
        return cls._from_tile_masks(partial_mask, full_mask, (bq, bk), (lq, lk), offset, window, sinks, mask,
                                    sync_free)

    @classmethod
    def from_indices(cls, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_size=(64, 64),
                     seq_lens=None, causal: Optional[str] = None, window: Optional[int] = None,
                     sinks: int = 0) -> "BlockLayout":
        """Build a layout from FlexAttention-style lists, in O(listed blocks).

        Args:
            kv_num_blocks: int ``[B|1, H|1, nQ]``: how many key blocks query block i attends.
            kv_indices: int ``[B|1, H|1, nQ, maxK]``: those key blocks (any order, duplicates
                allowed; the first ``kv_num_blocks`` entries of each row are read, each in ``[0, nK)``).
            block_size, seq_lens, causal, window, sinks: as in :meth:`from_block_mask`;
                ``seq_lens`` is required.
        """
        for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name}: expected dtype torch.int32 or torch.int64, got {t.dtype}")
        if seq_lens is None:
            raise ValueError("seq_lens: required by from_indices, got None")
        bq, bk = _check_block_size(block_size)
        lq, lk = _check_seq_lens(seq_lens)
        nq = math.ceil(lq / bq)
        if kv_num_blocks.dim() != 3 or kv_num_blocks.shape[-1] != nq:
            raise ValueError(f"kv_num_blocks: expected shape [B|1, H|1, {nq}], got {tuple(kv_num_blocks.shape)}")
        if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != tuple(kv_num_blocks.shape):
            raise ValueError(f"kv_indices: expected shape [{', '.join(map(str, kv_num_blocks.shape))}, maxK], "
                             f"got {tuple(kv_indices.shape)}")
        width = kv_indices.shape[-1]
        if not _is_compiling() and bool(((kv_num_blocks < 0) | (kv_num_blocks > width)).any()):
            raise ValueError(f"kv_num_blocks: expected values in [0, {width}] (kv_indices' last dim), got "
                             f"[{int(kv_num_blocks.min())}, {int(kv_num_blocks.max())}]")
        used = torch.arange(width, device=kv_indices.device) < kv_num_blocks[..., None]
        b, h, r, slot = used.nonzero(as_tuple=True)
        return cls.from_entries(b, h, r, kv_indices[b, h, r, slot].long(), shape=tuple(kv_num_blocks.shape[:2]),
                                block_size=(bq, bk), seq_lens=(lq, lk), causal=causal, window=window, sinks=sinks,
                                _name="kv_indices")

    @classmethod
    def from_topk(cls, indices: torch.Tensor, block_size, seq_lens, causal: Optional[str] = None,
                  window: Optional[int] = None, sinks: int = 0, validate: Optional[bool] = None) -> "BlockLayout":
        """Build a layout on the device from key-block ids per query block (top-k selections, routing,
        HiP): no host read, fixed list widths, so it runs inside ``torch.compile(fullgraph=True)``
        and a CUDA graph capture.

        Args:
            indices: int32 or int64 ``[B|1, H|1, nQ, k]``: the key blocks query block i attends, any
                order, duplicates allowed, -1 for an unused slot. An id outside ``[0, nK)`` is
                dropped on the device (it never reaches a kernel); see ``validate``.
            block_size, seq_lens, causal, window, sinks: as in :meth:`from_block_mask`;
                ``seq_lens`` ``(Lq, Lk)`` is required and must give ``nQ`` query blocks.
            validate: check the ids' range (ValueError naming ``indices`` with the range expected
                and the min and max received) with one host read. None (default): check unless
                compiling (``torch.compiler.is_compiling()``) or capturing a CUDA graph; False: never
                read; True: always (a graph break under ``torch.compile``).

        Returns:
            BlockLayout with fixed-width lists: ``kv_indices`` and ``full_kv_indices`` are ``k`` wide
            (1 if ``k == 0``), the transposed ``q_indices`` and ``full_q_indices`` ``nQ`` wide. Each
            row holds its distinct ids ascending, then 0; the counts exclude -1, duplicates,
            out-of-range ids and tiles the causal / window rule leaves empty, so no kernel runs a
            tile for them. The partial/full split, the lists' contents and ``to_dense_mask()`` are
            those of :meth:`from_block_mask` on the block mask of the same tiles.

        Example::

            >>> import torch, sparseattn as sa
            >>> q, k = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
            >>> pooled = q.unflatten(2, (4, 64)).mean(3) @ k.unflatten(2, (4, 64)).mean(3).transpose(-1, -2)
            >>> ids = pooled.topk(2, dim=-1).indices                   # [1, 2, nQ=4, 2]
            >>> layout = sa.BlockLayout.from_topk(ids, 64, (256, 256), causal="top_left")
            >>> layout.kv_indices.shape, layout.q_indices.shape
            (torch.Size([1, 2, 4, 2]), torch.Size([1, 2, 4, 4]))
        """
        from .dynamic import from_topk
        return from_topk(cls, indices, block_size, seq_lens, causal, window, sinks, validate)

    @classmethod
    def from_positions(cls, q_pos: torch.Tensor, k_pos: torch.Tensor, block_size=(64, 64)) -> "BlockLayout":
        """Position-id causal: query ``i`` attends key ``j`` iff ``k_pos[b, j] <= q_pos[b, i]``.

        Positions need not be sorted or unique (Concentric Causal Attention gives many visual
        tokens one position; packed or left-padded batches have their own numbering). The rule is
        evaluated in the kernels from the two position vectors (no bitmask, no element mask); the
        lists say which tiles it cuts: a tile is skipped when ``min k_pos > max q_pos``, full when
        ``max k_pos <= min q_pos`` (and inside both sequences), partial otherwise. Composes with
        :meth:`with_key_padding`.

        Args:
            q_pos: int32 ``[B, Lq]``; k_pos: int32 ``[B, Lk]``, same batch and device.
            block_size: ``(BLOCK_Q, BLOCK_K)`` or one int, as in :meth:`from_block_mask`.

        Returns:
            BlockLayout for ``seq_lens=(Lq, Lk)``, lists ``[B, 1, ...]`` (one per batch element).

        Example::

            >>> import torch, sparseattn as sa
            >>> pos = torch.tensor([[0, 1, 1, 1, 1, 2, 3, 4]], dtype=torch.int32)   # 4 tokens share position 1
            >>> layout = sa.BlockLayout.from_positions(pos, pos, block_size=16)
            >>> int(layout.to_dense_mask()[0, 0, 1].sum())                           # token 1 sees 0..4
            5
        """
        from .tokens import from_positions
        return from_positions(cls, q_pos, k_pos, block_size)

    @classmethod
    def from_varlen(cls, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int, *,
                    causal: bool = False, window: Optional[int] = None, sinks: int = 0,
                    block_size=(128, 128)) -> "BlockLayout":
        """The layout of a packed variable-length batch (what :func:`sparseattn.varlen_attention`
        runs): ``seq_lens=(total_q, total_k)``, a query attends only keys of its own sequence
        (``cu_seqlens_*`` int32 ``[N + 1]``, unchecked here), bottom-right causal per sequence with
        ``causal``, and a window with sinks in each sequence's own positions. Per-token segments
        and positions are evaluated in the kernels; built on the device without a host read.
        See :func:`sparseattn.layout.tokens.from_varlen`."""
        from .tokens import from_varlen
        return from_varlen(cls, cu_seqlens_q, cu_seqlens_k, total_q, total_k, _check_block_size(block_size), causal,
                           window, sinks)

    def with_key_padding(self, key_padding_mask: torch.Tensor) -> "BlockLayout":
        """This layout with a key keep mask: key ``j`` of batch element ``b`` is attended only if
        ``key_padding_mask[b, j]`` (True = the key exists; Hugging Face's attention_mask).

        One bit per key read in the kernels, never an element mask; tiles whose keys are all
        padding are dropped, tiles with some padding become partial, the rest keep their kind.
        Built on the device with fixed list widths (no host read). Composes with every other kind
        (a second call ANDs the masks). A row that then sees no key gives 0 (LSE -inf).

        Args:
            key_padding_mask: bool ``[B, Lk]`` on the layout's device (B = the layout's batch, or
                any batch when the layout's is 1).

        Returns:
            BlockLayout with lists ``[B, Hl, ...]``.
        """
        from .tokens import with_key_padding
        return with_key_padding(self, key_padding_mask)

    @classmethod
    def from_entries(cls, b: torch.Tensor, h: torch.Tensor, r: torch.Tensor, c: torch.Tensor, *, shape,
                     block_size, seq_lens, causal: Optional[str] = None, window: Optional[int] = None,
                     sinks: int = 0, bits: Optional[torch.Tensor] = None, bits_index: Optional[torch.Tensor] = None,
                     _name: str = "c") -> "BlockLayout":
        """Build a layout from its listed tiles, in O(n log n) for n tiles (never an nQ x nK mask):
        what structured patterns use.

        Args:
            b, h, r, c: int 1-D tensors of one length n (duplicates allowed): tile (query block
                ``r``, key block ``c``) is listed for batch ``b < Bl`` and query head ``h < Hl``.
            shape: ``(Bl, Hl)`` of the lists (1 = broadcast over batch / query heads).
            block_size, seq_lens, causal, window, sinks: as in :meth:`from_block_mask`.
            bits: optional bool ``[n, BLOCK_Q, BLOCK_K]``: an element mask inside each listed tile
                (True = attend), combined with the kinds. Tiles whose bits are all False are dropped,
                all-True tiles run as full tiles when the kinds allow, mixed tiles become partial
                tiles with a packed bitmask. Duplicated tiles OR their bits.
            bits_index: optional int ``[m]``: only these entries carry bits (``bits`` is then
                ``[m, BLOCK_Q, BLOCK_K]``); the others are all True. Memory O(m * BLOCK_Q * BLOCK_K).
        """
        bq, bk = _check_block_size(block_size)
        lq, lk = _check_seq_lens(seq_lens)
        offset, window, sinks = _check_kinds(causal, window, sinks, lq, lk)
        nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
        bl, hl = (int(x) for x in shape)
        n = b.numel()
        for name, t, hi in (("b", b, bl), ("h", h, hl), ("r", r, nq), (_name, c, nk)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != n:
                raise ValueError(f"{name}: expected a 1-D tensor of {n} tile indices, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.is_floating_point() or t.dtype == torch.bool:
                raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")
            if n and not _is_compiling() and bool(((t < 0) | (t >= hi)).any()):
                bad = t[(t < 0) | (t >= hi)][0]
                raise ValueError(f"{name}: expected block indices in [0, {hi}) for seq_lens={(lq, lk)}, "
                                 f"block_size={(bq, bk)} and shape={(bl, hl)}, got {int(bad)}")
        if bits is not None:
            if bits_index is None:
                bits_index = torch.arange(n, device=b.device)
            m = bits_index.numel()
            if bits.dtype != torch.bool or tuple(bits.shape) != (m, bq, bk):
                raise ValueError(f"bits: expected bool [{m}, {bq}, {bk}], got {bits.dtype} {tuple(bits.shape)}")
        plane = b.long() * hl + h.long()
        key, inverse = torch.unique((plane * nq + r.long()) * nk + c.long(), return_inverse=True)
        plane, r, c = key // (nq * nk), (key // nk) % nq, key % nk
        attended, partial = _classify_tiles(r, c, (bq, bk), (lq, lk), offset, window, sinks)
        packed, bit_id = None, torch.full_like(r, -1)
        if bits is not None:
            # A tile listed once without bits is all True; the others OR their entries' bits.
            plain = torch.ones(n, dtype=torch.bool, device=r.device)
            plain[bits_index] = False
            tile_plain = torch.zeros(key.numel(), dtype=torch.bool, device=r.device)
            tile_plain.index_put_((inverse,), plain, accumulate=True)
            tiles = inverse[bits_index]
            carried = torch.unique(tiles[~tile_plain[tiles]])
            slot = torch.full((key.numel(),), -1, dtype=torch.long, device=r.device)
            slot[carried] = torch.arange(carried.numel(), device=r.device)
            merged = torch.zeros(carried.numel(), bq, bk, dtype=torch.bool, device=r.device)
            sel = slot[tiles] >= 0
            merged.index_put_((slot[tiles][sel],), bits[sel], accumulate=True)
            # Only positions inside the sequences count.
            rc, cc = r[carried], c[carried]
            valid = ((rc[:, None] * bq + torch.arange(bq, device=r.device)) < lq)[:, :, None] & \
                    ((cc[:, None] * bk + torch.arange(bk, device=r.device)) < lk)[:, None, :]
            merged = merged | ~valid
            any_ = torch.ones_like(attended)
            all_ = torch.ones_like(attended)
            any_[carried] = (merged & valid).flatten(1).any(1)
            all_[carried] = merged.flatten(1).all(1)
            attended = attended & any_
            mixed = attended & ~all_
            partial = partial | mixed
            bit_id[mixed] = torch.arange(int(mixed.sum()), device=r.device)
            packed = _pack_bits(merged[slot[mixed]])
        keep = attended
        plane, r, c, partial, bit_id = plane[keep], r[keep], c[keep], partial[keep], bit_id[keep]
        out = {}
        for prefix, major, minor, n_major, n_minor in (("kv", r, c, nq, nk), ("q", c, r, nk, nq)):
            for full, sel in ((False, partial), (True, ~partial)):
                cnt, idx, pay = _entries_to_lists(plane[sel] * n_major + major[sel], minor[sel], bl * hl * n_major,
                                                  n_minor, None if full else bit_id[sel])
                name = ("full_" if full else "") + prefix
                out[name + "_num_blocks"] = cnt.view(bl, hl, n_major)
                out[name + "_indices"] = idx.view(bl, hl, n_major, -1)
                if not full:
                    out[prefix + "_bit_ids"] = pay.view(bl, hl, n_major, -1)
        return cls(block_size=(bq, bk), seq_lens=(lq, lk), causal_offset=offset, window=window, sinks=sinks,
                   bits=packed, **out)

    @classmethod
    def _from_tile_masks(cls, partial_mask, full_mask, block_size, seq_lens, causal_offset, window, sinks, mask,
                         sync_free=False):
        masks = (partial_mask, full_mask, partial_mask.transpose(-1, -2), full_mask.transpose(-1, -2))
        widths = [m.shape[-1] for m in masks] if sync_free else [None] * 4
        lists = (_gpu_lists(masks, widths if sync_free else None)
                 or [mask_to_lists(m, w) for m, w in zip(masks, widths)])
        (kv_n, kv_i), (fkv_n, fkv_i), (q_n, q_i), (fq_n, fq_i) = lists
        return cls(block_size=block_size, seq_lens=seq_lens, kv_num_blocks=kv_n, kv_indices=kv_i,
                   kv_bit_ids=torch.full_like(kv_i, -1), full_kv_num_blocks=fkv_n, full_kv_indices=fkv_i,
                   q_num_blocks=q_n, q_indices=q_i, q_bit_ids=torch.full_like(q_i, -1), full_q_num_blocks=fq_n,
                   full_q_indices=fq_i, causal_offset=causal_offset, window=window, sinks=sinks, mask=mask)

    # ------------------------------------------------------------------ views
    @property
    def num_blocks(self) -> Tuple[int, int]:
        """(nQ, nK)."""
        return self.kv_num_blocks.shape[-1], self.q_num_blocks.shape[-1]

    @property
    def shape(self) -> Tuple[int, int]:
        """(Bl, Hl): the batch and head sizes of the lists (1 = broadcast)."""
        return self.kv_num_blocks.shape[0], self.kv_num_blocks.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    _LISTS = ("kv_num_blocks", "kv_indices", "kv_bit_ids", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "q_bit_ids", "full_q_num_blocks", "full_q_indices")

    def lists(self):
        """The ten list tensors in the order the custom ops take them (``BlockLayout._LISTS``)."""
        return [getattr(self, name) for name in self._LISTS]

    @classmethod
    def from_lists(cls, lists, *, block_size, seq_lens, causal_offset=None, window=None, sinks=0, mask=None,
                   bits=None, q_pos=None, k_pos=None, key_mask=None, q_seg=None, k_seg=None) -> "BlockLayout":
        """Inverse of :meth:`lists` (for the op layer; no validation)."""
        return cls(block_size=block_size, seq_lens=seq_lens, causal_offset=causal_offset, window=window,
                   sinks=sinks, mask=mask, bits=bits, q_pos=q_pos, k_pos=k_pos, key_mask=key_mask, q_seg=q_seg,
                   k_seg=k_seg, **dict(zip(cls._LISTS, lists)))

    def kinds(self) -> dict:
        """The in-block kinds and their data (what :meth:`from_lists` takes besides the lists)."""
        return dict(causal_offset=self.causal_offset, window=self.window, sinks=self.sinks, mask=self.mask,
                    bits=self.bits, q_pos=self.q_pos, k_pos=self.k_pos, key_mask=self.key_mask, q_seg=self.q_seg,
                    k_seg=self.k_seg)

    def to(self, device) -> "BlockLayout":
        t = lambda x: None if x is None else x.to(device)  # noqa: E731
        kinds = {n: t(x) if isinstance(x, torch.Tensor) else x for n, x in self.kinds().items()}
        return BlockLayout.from_lists([t(x) for x in self.lists()], block_size=self.block_size,
                                      seq_lens=self.seq_lens, **kinds)

    def tile_masks(self):
        """(partial, full) bool [Bl, Hl, nQ, nK] rebuilt from the lists."""
        nk = self.num_blocks[1]
        return tuple(self._rows_to_mask(num, idx, nk) for num, idx in (
            (self.kv_num_blocks, self.kv_indices), (self.full_kv_num_blocks, self.full_kv_indices)))

    @staticmethod
    def _rows_to_mask(num, idx, nk):
        used = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        m = torch.zeros(*num.shape, nk + 1, dtype=torch.bool, device=idx.device)
        m.scatter_(-1, torch.where(used, idx.long(), nk), True)
        return m[..., :nk]

    def element_mask(self, rows: torch.Tensor, cols: torch.Tensor, b=None, h=None) -> torch.Tensor:
        """The in-block kinds at query positions ``rows`` and key positions ``cols`` (broadcasting
        index tensors; ``b``/``h`` index the element mask, the positions and the key mask when
        there are some). Tile bitmasks are not included: they belong to a tile (see
        :func:`unpack_bits`)."""
        lq, lk = self.seq_lens
        r, c = rows.clamp(max=lq - 1), cols.clamp(max=lk - 1)
        if self.q_pos is not None:  # positions given as data are the coordinates of causal / window
            pb = 0 if self.q_pos.shape[0] == 1 or b is None else b
            pq, pk = self.q_pos[pb, r], self.k_pos[pb, c]
        else:
            pq, pk = rows + (self.causal_offset or 0), cols
        keep = in_bounds(rows, cols, lq, lk) & kinds_keep(pq, pk, self.causal_offset is not None, self.window,
                                                           self.sinks)
        if self.q_seg is not None:
            sb = 0 if self.q_seg.shape[0] == 1 or b is None else b
            keep = keep & segments_keep(self.q_seg[sb, r], self.k_seg[sb, c])
        if self.key_mask is not None:
            kb = 0 if self.key_mask.shape[0] == 1 or b is None else b
            keep = keep & key_keep(self.key_mask[kb, c])
        if self.mask is not None:
            mb = 0 if self.mask.shape[0] == 1 or b is None else b
            mh = 0 if self.mask.shape[1] == 1 or h is None else h
            keep = keep & self.mask[mb, mh, rows.clamp(max=lq - 1), cols.clamp(max=lk - 1)]
        return keep

    def alibi_distance(self, rows: torch.Tensor, cols: torch.Tensor, b=None) -> torch.Tensor:
        """ALiBi's distance at query rows ``rows`` and keys ``cols``: ``q_pos - k_pos`` when the
        layout has positions (packed sequences: within each sequence), else FlashAttention's
        ``i + Lk - Lq - j`` (:func:`.predicates.alibi_distance`)."""
        lq, lk = self.seq_lens
        if self.q_pos is None:
            return alibi_distance(rows, cols, lq, lk)
        pb = 0 if self.q_pos.shape[0] == 1 or b is None else b
        return self.q_pos[pb, rows.clamp(max=lq - 1)] - self.k_pos[pb, cols.clamp(max=lk - 1)]

    def _partial_tiles(self):
        """(b, h, r, c, bit id) of every partial tile, as 1-D tensors."""
        used = torch.arange(self.kv_indices.shape[-1], device=self.device) < self.kv_num_blocks[..., None]
        b, h, r, slot = used.nonzero(as_tuple=True)
        return b, h, r, self.kv_indices[b, h, r, slot].long(), self.kv_bit_ids[b, h, r, slot]

    def _tile_elements(self, b, h, r, c, ids):
        """Element masks [n, BLOCK_Q, BLOCK_K] of tiles (kinds and bitmasks) with their positions."""
        bq, bk = self.block_size
        rows = r[:, None, None] * bq + torch.arange(bq, device=r.device)[:, None]
        cols = c[:, None, None] * bk + torch.arange(bk, device=r.device)[None, :]
        keep = self.element_mask(rows, cols, b[:, None, None], h[:, None, None])
        keep = keep & unpack_bits(self.bits, ids[:, None, None], rows - r[:, None, None] * bq,
                                  cols - c[:, None, None] * bk)
        return keep, rows, cols

    def to_dense_mask(self) -> torch.Tensor:
        """bool ``[Bl, Hl, Lq, Lk]``, True = attend. O(Lq * Lk): for oracles and plots."""
        bq, bk = self.block_size
        lq, lk = self.seq_lens
        partial, full = self.tile_masks()
        tiles = (partial | full).repeat_interleave(bq, -2)[..., :lq, :].repeat_interleave(bk, -1)[..., :lk]
        dev = tiles.device
        rows = torch.arange(lq, device=dev)[:, None]
        cols = torch.arange(lk, device=dev)[None, :]
        # batch / head indices over the widest of the lists and the per-element / per-token data
        sizes = [t.shape[:2] for t in (self.mask,) if t is not None] + [tiles.shape[:2]]
        sizes += [(t.shape[0], 1) for t in (self.q_pos, self.key_mask, self.q_seg) if t is not None]
        b = torch.arange(max(n for n, _ in sizes), device=dev)[:, None, None, None]
        h = torch.arange(max(n for _, n in sizes), device=dev)[None, :, None, None]
        dense = tiles & self.element_mask(rows, cols, b, h)
        if self.bits is not None:
            b, h, r, c, ids = self._partial_tiles()
            sel = ids >= 0
            keep, rows, cols = self._tile_elements(b[sel], h[sel], r[sel], c[sel], ids[sel])
            drop = ~keep & (rows < lq) & (cols < lk)
            n, i, j = drop.nonzero(as_tuple=True)
            dense[b[sel][n], h[sel][n], rows[n, i, 0], cols[n, 0, j]] = False
        return dense

    @property
    def density(self) -> float:
        """Fraction of (query, key) pairs attended, over all (batch, head) of the lists."""
        bq, bk = self.block_size
        lq, lk = self.seq_lens
        bl, hl = self.shape
        total = bl * hl * lq * lk
        n_full = int(self.full_kv_num_blocks.sum()) * bq * bk  # full tiles never cross a bound
        tiles = self._partial_tiles()
        count = 0
        for chunk in zip(*(t.split(max(1, (1 << 22) // (bq * bk))) for t in tiles)):
            count += int(self._tile_elements(*chunk)[0].sum())
        return (n_full + count) / total

    def __repr__(self) -> str:
        return (f"BlockLayout(block_size={self.block_size}, seq_lens={self.seq_lens}, shape={self.shape}, "
                f"causal_offset={self.causal_offset}, window={self.window}, sinks={self.sinks}, "
                f"bits={0 if self.bits is None else self.bits.shape[0]}, mask={'yes' if self.mask is not None else 'no'}, "
                f"positions={'yes' if self.q_pos is not None else 'no'}, "
                f"key_mask={'yes' if self.key_mask is not None else 'no'}, "
                f"device={self.device})")
