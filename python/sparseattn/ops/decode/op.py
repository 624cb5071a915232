"""Decode attention: 1 to 16 new query tokens per sequence against a (block-sparse) KV cache.

Backends (:func:`sparseattn.last_backend` says which ran):

* ``"cuda"``: the split-KV flash-decoding kernels of the CUDA extension ``sparseattn._C``
  (CUDA tensors, float16/bfloat16, D in {64, 128, 256}, extension built and usable);
* ``"triton"``: otherwise on CUDA tensors, the fused Triton ``sparse_attention`` with a
  bottom-right causal layout (and an element mask for ragged ``cache_seqlens``);
* ``"cpu"``: CPU tensors: the C++ CPU kernel reading only the needed key blocks, or without it a
  PyTorch path that gathers them (:mod:`.cpu`).

Layouts in decode: a :class:`BlockLayout` built for ``seq_lens=(Lq, Lmax)``. Its key-block set
(full and partial tiles of its single query block) says which key blocks of the cache the decode
rows may read, per ``[B|1, Hq|1]``; block ``j`` covers cache positions ``[j*BLOCK_K, (j+1)*BLOCK_K)``.
On top of it decode always applies its own masks: each sequence's length and the bottom-right
causal mask (query row i of sequence b sits at position ``cache_seqlens[b] - Lq + i``). The
layout's own causal kind is not re-applied (it is relative to Lmax, not to each sequence), and
layouts with an element mask are rejected.

Paged caches (``block_table``): ``k_cache``/``v_cache`` are ``[num_pages, page_size, Hkv, D]`` and
logical key t of sequence b is row ``t % page_size`` of page ``block_table[b, t // page_size]``.
Layouts, patterns, ``key_padding_mask``, ``key_bias`` and ALiBi positions are all logical. Every
path reads the pages through the table (the CUDA kernel computes each row's address, the C++ CPU
kernel reads each row through it, the CPU gather path indexes each chunk of keys, the Triton path
calls ``paged_sparse_attention``): no gathered copy of the cache.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _cuda, _dispatch
from ...layout import BlockLayout, mask_to_lists
from ..attention.op import sparse_attention
from ..attention.sdpa import mask_layout
from ..common import check_dtype_and_dim, check_inputs, check_score_options
from ..library import custom_op
from ..attention import cpu_kernel
from .cpu import decode_attention_cpu

MAX_LQ = 16
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128, 256)


def _check_paged(q, k_cache, v_cache, block_table):
    """q and a paged cache ``[num_pages, page_size, Hkv, D]`` with its ``block_table`` int32
    ``[B, max_pages]``: the checks of check_inputs on the logical cache ``[B, Hkv, Lmax, D]``
    (Lmax = max_pages * page_size), plus the table's own. Returns (B, Hq, Hkv, Lq, Lmax, D)."""
    for t, n in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{n}: expected 4 dims [num_pages, page_size, Hkv, D] (a paged cache, with "
                             f"block_table), got shape {tuple(t.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache, v_cache: expected the same shape [num_pages, page_size, Hkv, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not isinstance(block_table, Tensor):
        raise TypeError(f"block_table: expected an int32 torch.Tensor [B, max_pages] or None, got "
                        f"{type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table: expected dtype torch.int32, got {block_table.dtype}")
    if block_table.dim() != 2:
        raise ValueError(f"block_table: expected 2 dims [B, max_pages], got shape {tuple(block_table.shape)}")
    num_pages, page_size, Hkv, Dk = k_cache.shape
    # The logical cache [B, Hkv, Lmax, D] as a one-element stride-0 view, for the shared checks.
    B = q.shape[0] if isinstance(q, Tensor) and q.dim() == 4 else block_table.shape[0]
    lmax = block_table.shape[1] * page_size
    logical = [(t if t.numel() else t.new_empty(1)).as_strided((B, Hkv, lmax, Dk), (0, 0, 0, 0))
               for t in (k_cache, v_cache)]
    out = check_inputs(q, *logical, gqa=True, names=("q", "k_cache", "v_cache"))
    if block_table.shape[0] != B:
        raise ValueError(f"block_table: expected shape [{B}, max_pages] (batch of q), got {tuple(block_table.shape)}")
    if block_table.device != q.device:
        raise ValueError(f"block_table: expected device {q.device} (as q), got {block_table.device}")
    if page_size % 16 or page_size == 0:
        raise ValueError(f"k_cache: expected a page size (dim 1 with block_table) that is a multiple of 16, "
                         f"got {page_size}")
    return out


def _check_options(q, B, Hq, Lmax, softcap, alibi_slopes, key_padding_mask, key_bias) -> dict:
    """The score options and key masks (logical positions), checked by the one check of every
    attention function (:func:`..common.check_score_options`). Returns the given ones as keyword
    arguments of sparse_attention."""
    check_score_options(B, Hq, Lmax, q.device, key_padding_mask=key_padding_mask, key_bias=key_bias,
                        softcap=softcap, alibi_slopes=alibi_slopes)
    opts = dict(softcap=None if softcap is None else float(softcap), alibi_slopes=alibi_slopes,
                key_padding_mask=key_padding_mask, key_bias=key_bias)
    return {n: x for n, x in opts.items() if x is not None}


def _check_decode(q, k_cache, v_cache, layout_or_pattern, cache_seqlens, block_table=None):
    """Validate everything before any launch.
    Returns (B, Hq, Hkv, Lq, Lmax, D, layout or None, pattern or None)."""
    if block_table is None:
        B, Hq, Hkv, Lq, Lmax, D = check_inputs(q, k_cache, v_cache, gqa=True, names=("q", "k_cache", "v_cache"))
    else:
        B, Hq, Hkv, Lq, Lmax, D = _check_paged(q, k_cache, v_cache, block_table)
    check_dtype_and_dim(q)
    if not 1 <= Lq <= MAX_LQ:
        raise ValueError(f"q: expected 1 <= Lq <= {MAX_LQ} query positions (dim 2), got {Lq}")
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, Tensor):
            raise TypeError(f"cache_seqlens: expected an int32 torch.Tensor [B] or None, got "
                            f"{type(cache_seqlens).__name__}")
        if cache_seqlens.dtype != torch.int32:
            raise TypeError(f"cache_seqlens: expected dtype torch.int32, got {cache_seqlens.dtype}")
        if tuple(cache_seqlens.shape) != (B,):
            raise ValueError(f"cache_seqlens: expected shape [{B}] (batch of q), got {tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens: expected device {q.device} (as q), got {cache_seqlens.device}")
    ranges = [t for t in (cache_seqlens, block_table) if t is not None and t.numel()]
    if ranges and not torch.compiler.is_compiling() and not _capturing(q):
        lims = torch.stack([torch.stack(torch.aminmax(t)) for t in ranges]).tolist()   # one host read
        if cache_seqlens is not None and cache_seqlens.numel():
            lo, hi = lims.pop(0)
            if lo < 0 or hi > Lmax:
                where = "k_cache.shape[2]" if block_table is None else "max_pages x page_size"
                raise ValueError(f"cache_seqlens: expected values in [0, {Lmax}] (Lmax = {where}), "
                                 f"got min {lo}, max {hi}")
        if lims:
            lo, hi = lims.pop(0)
            if lo < 0 or hi >= k_cache.shape[0]:
                raise ValueError(f"block_table: expected page indices in [0, {k_cache.shape[0]}) (num_pages = "
                                 f"k_cache.shape[0]), got min {lo}, max {hi}")
    layout = layout_or_pattern
    pattern = None if layout is None or isinstance(layout, BlockLayout) else layout
    if layout is not None and not isinstance(layout, BlockLayout):
        if not callable(getattr(layout, "decode_layout", None)):
            raise TypeError("layout_or_pattern: expected None, a sparseattn.BlockLayout or a pattern with "
                            f"decode_layout(Lq, Lk, device), got {type(layout).__name__}")
        layout = layout.decode_layout(Lq, Lmax, q.device)
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout_or_pattern: decode_layout() must return a BlockLayout, got {type(layout).__name__}")
    if layout is not None:
        if tuple(layout.seq_lens) != (Lq, Lmax):
            raise ValueError(f"layout_or_pattern: expected a layout for seq_lens {(Lq, Lmax)} (Lq of q, Lmax of "
                             f"the cache), got {tuple(layout.seq_lens)}")
        bl, hl = layout.shape
        if bl not in (1, B) or hl not in (1, Hq):
            raise ValueError(f"layout_or_pattern: expected lists of shape [1|{B}, 1|{Hq}, ...], got [{bl}, {hl}, ...]")
        if layout.device != q.device:
            raise ValueError(f"layout_or_pattern: expected device {q.device} (as q), got {layout.device}")
        if layout.mask is not None:
            raise ValueError("layout_or_pattern: expected a layout without an element mask (decode reads whole "
                             "key blocks), got one with mask")
    return B, Hq, Hkv, Lq, Lmax, D, layout, pattern


def _capturing(q: Tensor) -> bool:
    """True while a CUDA graph is being captured on q's device: no host reads then (the kernels
    clamp cache lengths to [0, Lmax] and page indices to [0, num_pages) themselves)."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _block_sets(layout: BlockLayout, B: int, Hq: int, Hkv: int, seqlens: Optional[Tensor]):
    """A layout -> what the decode kernels read.

    Returns ``(blk_num int32 [B, Hkv], blk_idx int32 [B, Hkv, nK], head_mask bool [Bl, Hl, nK] or
    None)``: for each (sequence, KV head) the sorted key blocks any query head of its group
    attends and that hold at least one key of the sequence (``seqlens`` None: every block);
    ``head_mask`` (only when the layout differs per query head) says which of them each query
    head keeps. No host round trip.
    """
    partial, full = layout.tile_masks()
    attended = (partial | full)[:, :, 0, :]                                   # [Bl, Hl, nK]
    bl, hl, nk = attended.shape
    bk = layout.block_size[1]
    group = attended if hl == 1 else attended.view(bl, Hkv, Hq // Hkv, nk).any(2)
    union = group.expand(B, group.shape[1], nk)
    if seqlens is not None:
        live = torch.arange(nk, device=seqlens.device) < ((seqlens.long() + bk - 1) // bk)[:, None]   # [B, nK]
        union = union & live[:, None, :]
    union = union.expand(B, Hkv, nk)
    blk_num, blk_idx = mask_to_lists(union, width=nk)
    return blk_num, blk_idx, (attended if hl > 1 else None)


def _cached_block_sets(layout: BlockLayout, B: int, Hq: int, Hkv: int, seqlens: Optional[Tensor]):
    """:func:`_block_sets`, kept on the layout (layouts are immutable) per (B, Hq, Hkv, lengths), a
    few entries, where the lengths are known without a device sync: None (every block, on any
    device) or CPU lengths (read for free). A decode loop that reuses one layout then pays its ~30
    small tensor ops (~0.3 ms on CPU; as many launches on CUDA) once, not per step. CUDA lengths
    are never read back (no sync, capture-safe), nor under torch.compile: rebuilt per call there."""
    if torch.compiler.is_compiling() or (seqlens is not None and seqlens.is_cuda):
        return _block_sets(layout, B, Hq, Hkv, seqlens)
    cache = layout.__dict__.setdefault("_decode_block_sets", {})
    key = (B, Hq, Hkv, None if seqlens is None else tuple(seqlens.tolist()))
    if key not in cache:
        if len(cache) >= 8:
            cache.clear()
        cache[key] = _block_sets(layout, B, Hq, Hkv, seqlens)
    return cache[key]


# ----------------------------------------------------------------------------- Triton fallback
def _sparse(q, k, v, layout: BlockLayout, scale: float, block_table: Optional[Tensor], opts: dict):
    """sparse_attention on the logical cache, or paged_sparse_attention through the table."""
    if block_table is None:
        return sparse_attention(q, k, v, layout, scale=scale, return_lse=True, **opts)
    from ..attention.op import paged_sparse_attention
    return paged_sparse_attention(q, k, v, block_table, layout, scale, **opts)


def _alibi_lse(lse: Tensor, alibi_slopes: Optional[Tensor], cache_seqlens: Optional[Tensor], Lmax: int) -> Tensor:
    """sparse_attention's ALiBi distance is ``|i + Lmax - Lq - j|``; decode's is ``|i + n_b - Lq - j|``.
    On every key a row sees (``j <= n_b - Lq + i``) they differ by the constant ``Lmax - n_b``: the
    softmax is the same, the LSE is lower by ``slope * (Lmax - n_b)``, added back here."""
    if alibi_slopes is None or cache_seqlens is None:
        return lse
    slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]                # [B|1, Hq]
    shift = slopes * (Lmax - cache_seqlens.float())[:, None]                                  # [B, Hq]
    return lse + shift[..., None]


def _decode_triton(q, k, v, cache_seqlens: Optional[Tensor], layout: Optional[BlockLayout], scale: float, *,
                   block_table: Optional[Tensor] = None, softcap: Optional[float] = None,
                   alibi_slopes: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                   key_bias: Optional[Tensor] = None):
    """Decode through the fused Triton sparse_attention (the fallback on CUDA without the
    extension), or paged_sparse_attention with a ``block_table``: the layout's key blocks cut at
    each sequence's length, bottom-right causal. Ragged ``cache_seqlens`` are a key padding mask
    when Lq = 1 (the one row of sequence b sees ``j <= n_b - 1``, i.e. the keys ``j < n_b``);
    with Lq > 1 the causal diagonal moves with each length, which one bottom-right causal mask on
    Lmax cannot express, so they (and layouts with BLOCK_K < 32, which the Triton tiles cannot
    split) go through an element mask ``[B, Hl, Lq, Lmax]``."""
    B, Hq, Lq, D = q.shape
    Lmax = k.shape[2] if block_table is None else block_table.shape[1] * k.shape[1]
    dev = q.device
    opts = {n: x for n, x in (("softcap", softcap), ("alibi_slopes", alibi_slopes),
                               ("key_padding_mask", key_padding_mask), ("key_bias", key_bias)) if x is not None}
    bk = 64 if layout is None else layout.block_size[1]
    bq = 64  # one query block (Lq <= 16); the smallest Triton query tile
    if layout is None:
        attended = torch.ones(1, 1, 1, math.ceil(Lmax / bk), dtype=torch.bool, device=dev)
    else:
        partial, full = layout.tile_masks()
        attended = partial | full                                                   # [Bl, Hl, 1, nK]
    if cache_seqlens is None and bk >= 32:
        lay = BlockLayout.from_block_mask(attended, (bq, bk), (Lq, Lmax), causal="bottom_right", sync_free=True)
        return _sparse(q, k, v, lay, scale, block_table, opts)
    n = (torch.full((B,), Lmax, device=dev) if cache_seqlens is None else cache_seqlens).long()
    if Lq == 1 and bk >= 32:
        pad = torch.arange(Lmax, device=dev)[None, :] < n[:, None]                 # [B, Lmax]
        opts["key_padding_mask"] = pad if key_padding_mask is None else pad & key_padding_mask
        live = torch.arange(attended.shape[-1], device=dev) < ((n + bk - 1) // bk)[:, None]
        lay = BlockLayout.from_block_mask(attended & live[:, None, None, :], (bq, bk), (Lq, Lmax), sync_free=True)
        out, lse = _sparse(q, k, v, lay, scale, block_table, opts)
        return out, _alibi_lse(lse, alibi_slopes, cache_seqlens, Lmax)
    rows = n[:, None, None] - Lq + torch.arange(Lq, device=dev)[None, :, None]
    elem = (torch.arange(Lmax, device=dev)[None, None, :] <= rows)[:, None]       # [B, 1, Lq, Lmax]
    if bk < 32:
        elem = elem & attended.repeat_interleave(bk, -1)[..., :Lmax]                # [B, Hl, Lq, Lmax]
        bk = 64
        nk = math.ceil(Lmax / bk)
        attended = torch.nn.functional.pad(elem.any(2, keepdim=True), (0, nk * bk - Lmax)).view(
            *elem.shape[:2], 1, nk, bk).any(-1)
    nk = attended.shape[-1]
    live = torch.arange(nk, device=dev) < ((n + bk - 1) // bk)[:, None]
    lay = BlockLayout.from_block_mask(attended & live[:, None, None, :], (bq, bk), (Lq, Lmax), mask=elem,
                                      sync_free=True)
    out, lse = _sparse(q, k, v, lay, scale, block_table, opts)
    return out, _alibi_lse(lse, alibi_slopes, cache_seqlens, Lmax)


# ----------------------------------------------------------------------------- exact masked path
def _exact_path(layout: Optional[BlockLayout], pattern, cache_seqlens: Optional[Tensor], Lq: int,
                Lmax: int) -> Optional[str]:
    """Windows and tile bitmasks are token-exact kinds the decode kernels do not evaluate, and the
    blocks of a pattern that ``moves_with_length`` (a window, PowerAttention) move with each
    sequence's length (a fixed block table's do not: its Lmax layout, cut at each length). Returns
    None (the decode kernels), ``"layout"`` (one length for all sequences and a bottom-right causal
    layout: it is the decode mask itself, and sparse_attention's kernels evaluate its kinds) or
    ``"masked"`` (an element mask per sequence length)."""
    token_kinds = layout is not None and (layout.window is not None or layout.bits is not None)
    moving = pattern is not None and getattr(pattern, "moves_with_length", True)
    if not token_kinds and not moving:
        return None  # a plain block layout: no host read here
    ragged = cache_seqlens is not None and bool((cache_seqlens != Lmax).any())
    if ragged:
        if token_kinds and pattern is None:
            raise ValueError("layout_or_pattern: a BlockLayout with a window or tile bitmasks is built for one "
                             "length; with ragged cache_seqlens pass the pattern object itself, got a BlockLayout")
        return "masked"
    if token_kinds:
        return "layout" if layout.causal_offset == Lmax - Lq else "masked"
    return None


def _masked_elem(q, Lmax: int, cache_seqlens: Optional[Tensor], layout: BlockLayout, pattern) -> Tensor:
    """The exact decode mask, bool ``[B, Hl, Lq, Lmax]``: each sequence gets its own layout
    (``pattern.decode_layout(Lq, n_b)`` per distinct length, for a pattern that moves with the
    length; else the Lmax layout), every in-block kind included, plus its length and bottom-right
    causal mask. Memory O(B * Hl * Lq * Lmax): a fallback, not the bandwidth-bound kernel."""
    B, Hq, Lq, _ = q.shape
    lengths = [Lmax] * B if cache_seqlens is None else cache_seqlens.tolist()
    dense = {}
    for n in set(lengths):
        if n == 0:  # an empty sequence sees nothing (and a pattern has no layout for 0 keys)
            dense[n] = torch.zeros(1, 1, Lq, Lmax, dtype=torch.bool, device=q.device)
            continue
        moves = pattern is not None and getattr(pattern, "moves_with_length", True)
        m = (pattern.decode_layout(Lq, n, q.device) if moves and n != Lmax else layout).to_dense_mask()
        dense[n] = torch.nn.functional.pad(m, (0, Lmax - m.shape[-1]))
    hl = max(m.shape[1] for m in dense.values())
    elem = torch.stack([dense[n][0 if dense[n].shape[0] == 1 else b].expand(hl, Lq, Lmax)
                        for b, n in enumerate(lengths)])                                  # [B, Hl, Lq, Lmax]
    n = torch.tensor(lengths, device=q.device)[:, None, None, None]
    cols = torch.arange(Lmax, device=q.device)
    return elem & (cols <= n - Lq + torch.arange(Lq, device=q.device)[:, None]) & (cols < n)


def _decode_masked(q, k, v, cache_seqlens: Optional[Tensor], layout: BlockLayout, pattern, scale: float,
                   block_table: Optional[Tensor], opts: dict, backend: str):
    """The exact masked path: :func:`_masked_elem` read by decode's CPU path (CPU tensors) or by
    sparse_attention / paged_sparse_attention (ALiBi's LSE shifted back to each sequence's own
    positions, see :func:`_alibi_lse`)."""
    B, Hq, Lq, _ = q.shape
    Lmax = layout.seq_lens[1]
    elem = _masked_elem(q, Lmax, cache_seqlens, layout, pattern)
    if backend == "cpu":
        return decode_attention_cpu(q, k, v, cache_seqlens, None, 64, None, scale, block_table=block_table,
                                    elem_mask=elem, **opts)
    out, lse = _sparse(q, k, v, mask_layout(elem, B, Hq, Lq, Lmax), scale, block_table, opts)
    return out, _alibi_lse(lse, opts.get("alibi_slopes"), cache_seqlens, Lmax)


_MASKED_REASON = ("decode of a window or tile bitmasks that the decode kernels cannot evaluate for these lengths "
                  "(ragged cache_seqlens, or a layout not bottom-right causal): an exact element-mask path, "
                  "O(B * H * Lq * Lmax) memory")


# ----------------------------------------------------------------------------- CUDA custom op
@custom_op("sparseattn::decode_attention_cuda")
def decode_attention_cuda(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, blk_num: Optional[Tensor],
                          blk_idx: Optional[Tensor], block_k: int, head_mask: Optional[Tensor],
                          scale: float, block_table: Optional[Tensor], softcap: float,
                          alibi_slopes: Optional[Tensor], key_padding_mask: Optional[Tensor],
                          key_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    hm = None if head_mask is None else head_mask.to(torch.uint8)
    return _cuda.decode_attention_fwd(q, k, v, seqlens, blk_num, blk_idx, block_k, hm, scale,
                                      block_table=block_table, softcap=softcap if softcap > 0 else None,
                                      alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask,
                                      key_bias=key_bias)


@torch.library.register_fake("sparseattn::decode_attention_cuda")
def _(q, k, v, seqlens, blk_num, blk_idx, block_k, head_mask, scale, block_table, softcap, alibi_slopes,
      key_padding_mask, key_bias):
    B, H, lq, d = q.shape
    return q.new_empty(B, H, lq, d), q.new_empty(B, H, lq, dtype=torch.float32)


def decode_backend(q: Tensor) -> str:
    """Which path :func:`decode_attention` takes for ``q``: "cuda", "triton" or "cpu"."""
    if not q.is_cuda:
        return "cpu"
    if q.dtype in CUDA_DTYPES and q.shape[-1] in CUDA_HEAD_DIMS and _cuda.cuda_available(q.device):
        return "cuda"
    return "triton"


def _triton_reason(q: Tensor) -> str:
    """Why a CUDA decode call runs the Triton sparse_attention kernels, not the decode kernels."""
    if q.dtype not in CUDA_DTYPES:
        return f"decode in {q.dtype} (the CUDA decode kernels take float16 and bfloat16)"
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"decode with head dim {q.shape[-1]} (the CUDA decode kernels take {CUDA_HEAD_DIMS})"
    return f"decode without the CUDA extension ({_cuda.cuda_unavailable_reason(q.device)})"


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, layout_or_pattern=None,
                     cache_seqlens: Optional[Tensor] = None, scale: Optional[float] = None,
                     return_lse: bool = False, block_table: Optional[Tensor] = None,
                     softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None, *,
                     key_padding_mask: Optional[Tensor] = None, key_bias: Optional[Tensor] = None):
    """Attention of the last 1 to 16 query positions of each sequence over its KV cache.

    Args:
        q: ``[B, Hq, Lq, D]``, 1 <= Lq <= 16: the LAST Lq positions of each sequence (their K/V
            are already in the cache), bottom-right aligned and causal among themselves: row i of
            sequence b sits at position ``cache_seqlens[b] - Lq + i`` and sees keys at positions
            ``<= cache_seqlens[b] - Lq + i``. float16, bfloat16 or float32; D up to 256.
        k_cache, v_cache: ``[B, Hkv, Lmax, D]`` with ``Hq % Hkv == 0`` (GQA/MQA, never repeated);
            with ``block_table``, the paged cache ``[num_pages, page_size, Hkv, D]`` (the vLLM /
            FlashAttention layout; page_size a multiple of 16).
        layout_or_pattern: None (dense causal decode), a :class:`BlockLayout` built for
            ``seq_lens=(Lq, Lmax)`` whose listed key blocks (per ``[B|1, Hq|1]``) are the only
            ones read, or a pattern object with ``decode_layout(Lq, Lk, device)`` returning one.
            Always in logical positions (also with a paged cache). With ragged ``cache_seqlens``
            a pattern defined relative to the query's position (SlidingWindow, PowerAttention,
            PerHead of them; any object without ``moves_with_length = False``) applies at each
            sequence's own length; a fixed block table (BlockSparse, from_mask_mod, from_flex)
            is its layout for Lmax, cut at each length.
        cache_seqlens: int32 ``[B]`` on q's device, keys held by each sequence, in ``[0, Lmax]``;
            default Lmax for all. Cache rows at or past a sequence's length are never read.
            (Validating the range costs one host read, skipped while a CUDA graph is captured or
            under torch.compile; the kernels clamp lengths to ``[0, Lmax]``.)
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of each row.
        block_table: int32 ``[B, max_pages]`` on q's device, or None (contiguous cache): a paged
            cache, logical key position t of sequence b is row ``t % page_size`` of page
            ``block_table[b, t // page_size]``; ``Lmax = max_pages * page_size`` (logical). Pages
            are read in place through the table (no gathered copy). Entries must lie in
            ``[0, num_pages)`` (all of them, used or not; checked with the same host read as
            ``cache_seqlens``, skipped under capture or torch.compile, where the kernels clamp
            page indices into the cache instead).
        softcap: float > 0 or None: scores become ``softcap * tanh(score / softcap)`` after
            scaling, before ALiBi, the key bias and the masks (Gemma 2).
        alibi_slopes: float32 ``[Hq]`` or ``[B, Hq]`` on q's device: score ``-= slope * |pos_i - j|``
            for key j and row i at ``pos_i = cache_seqlens[b] - Lq + i`` (FlashAttention's
            ``|i + Lk - Lq - j|`` with Lk each sequence's own length).
        key_padding_mask: bool ``[B, Lmax]`` on q's device (keyword only), logical positions:
            True = the key exists; False keys are never attended.
        key_bias: float ``[B|1, Hq|1, Lmax]`` on q's device (keyword only), logical positions:
            added to the scores after ALiBi; ``-inf`` knocks a key out. Must not require grad.

    The order on each score is: ``* scale``, softcap, ``+`` ALiBi, ``+ key_bias``, then the masks
    (length, causal, layout, key padding).

    Returns:
        out ``[B, Hq, Lq, D]`` in q's dtype, and with ``return_lse`` lse ``[B, Hq, Lq]`` float32
        (natural log, of the modified scores). A row that sees no key (e.g.
        ``cache_seqlens[b] < Lq``, or every key padded or biased to -inf) gives 0 and -inf.
        Inference only (no autograd). Dense decode and plain block layouts on CUDA never read
        back to the host, so they can be captured in a CUDA graph (call once outside the capture
        first: that call compiles and times the kernels). Pattern objects and layouts with
        windows or tile bitmasks read the lengths on the host: with one length for all sequences
        and a bottom-right causal layout (SlidingWindow, PowerAttention, ...) they run the fused
        sparse_attention kernels on that layout; with ragged lengths an exact masked path.

    Example::

        >>> import torch, sparseattn as sa
        >>> q = torch.randn(2, 8, 1, 64)                       # one new token, 8 query heads
        >>> k = v = torch.randn(2, 2, 1024, 64)                # 2 KV heads, cache of 1024
        >>> lens = torch.tensor([1024, 300], dtype=torch.int32)
        >>> out = sa.decode_attention(q, k, v, cache_seqlens=lens)
        >>> bm = torch.rand(1, 1, 1, 16) < 0.3                 # keep ~30% of the 64-key blocks
        >>> layout = sa.BlockLayout.from_block_mask(bm, block_size=(16, 64), seq_lens=(1, 1024))
        >>> out, lse = sa.decode_attention(q, k, v, layout, cache_seqlens=lens, return_lse=True)
        >>> pages = torch.randn(40, 64, 2, 64)                 # paged: 40 pages of 64 rows
        >>> table = torch.randperm(40, dtype=torch.int32)[:32].view(2, 16)   # Lmax = 16 x 64
        >>> out = sa.decode_attention(q, pages, pages, cache_seqlens=lens, block_table=table,
        ...                           softcap=30.0, alibi_slopes=torch.rand(8))
    """
    B, Hq, Hkv, Lq, Lmax, D, layout, pattern = _check_decode(q, k_cache, v_cache, layout_or_pattern,
                                                             cache_seqlens, block_table)
    opts = _check_options(q, B, Hq, Lmax, softcap, alibi_slopes, key_padding_mask, key_bias)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    exact = _exact_path(layout, pattern, cache_seqlens, Lq, Lmax)
    backend = decode_backend(q)
    if exact == "masked":
        out, lse = _decode_masked(q, k_cache, v_cache, cache_seqlens, layout, pattern, scale, block_table, opts,
                                  backend)
        _dispatch.set_backend("cpu" if backend == "cpu" else _dispatch.last_backend(), _MASKED_REASON)
        return (out, lse) if return_lse else out
    if exact == "layout" and backend != "cpu":  # one length (Lmax) for all: no ALiBi shift
        out, lse = _sparse(q, k_cache, v_cache, layout, scale, block_table, opts)
        return (out, lse) if return_lse else out
    if backend == "triton":
        out, lse = _decode_triton(q, k_cache, v_cache, cache_seqlens, layout, scale, block_table=block_table, **opts)
        _dispatch.set_backend("triton", _triton_reason(q))
        return (out, lse) if return_lse else out
    blk_num = blk_idx = head_mask = elem = None
    block_k = 64
    if layout is not None:
        block_k = layout.block_size[1]
        # the C++ CPU kernel cuts each list at its sequence's length itself: lists of every block,
        # kept on the layout across decode steps (whose lengths change every step)
        kernel = backend == "cpu" and cpu_kernel.ops() is not None
        blk_num, blk_idx, head_mask = _cached_block_sets(layout, B, Hq, Hkv, None if kernel else cache_seqlens)
        if exact == "layout":  # CPU: the listed blocks, and the layout's in-block kinds as a mask
            elem = layout.to_dense_mask()
    if backend == "cuda":
        _dispatch.set_backend(backend, None)
        seqlens = (torch.full((B,), Lmax, dtype=torch.int32, device=q.device) if cache_seqlens is None
                   else cache_seqlens)
        out, lse = decode_attention_cuda(q, k_cache, v_cache, seqlens, blk_num, blk_idx, block_k, head_mask, scale,
                                         block_table, opts.get("softcap", 0.0), alibi_slopes, key_padding_mask,
                                         key_bias)
    else:
        _dispatch.set_backend(backend, "CPU tensors (decode's CPU path)")
        blocks = None if blk_num is None else (blk_num, blk_idx)
        out, lse = decode_attention_cpu(q, k_cache, v_cache, cache_seqlens, blocks, block_k, head_mask, scale,
                                        block_table=block_table, elem_mask=elem, **opts)
    return (out, lse) if return_lse else out
