"""Decode attention: 1 to 16 new query tokens per sequence against a (block-sparse) KV cache.

Backends (:func:`sparseattn.last_backend` says which ran):

* ``"cuda"``: the split-KV flash-decoding kernels of the CUDA extension ``sparseattn._C``
  (CUDA tensors, float16/bfloat16, D in {64, 128, 256}, extension built and usable);
* ``"triton"``: otherwise on CUDA tensors, the fused Triton ``sparse_attention`` with a
  bottom-right causal layout (and an element mask for ragged ``cache_seqlens``);
* ``"cpu"``: CPU tensors, a PyTorch path that gathers only the needed key blocks.

Layouts in decode: a :class:`BlockLayout` built for ``seq_lens=(Lq, Lmax)``. Its key-block set
(full and partial tiles of its single query block) says which key blocks of the cache the decode
rows may read, per ``[B|1, Hq|1]``; block ``j`` covers cache positions ``[j*BLOCK_K, (j+1)*BLOCK_K)``.
On top of it decode always applies its own masks: each sequence's length and the bottom-right
causal mask (query row i of sequence b sits at position ``cache_seqlens[b] - Lq + i``). The
layout's own causal kind is not re-applied (it is relative to Lmax, not to each sequence), and
layouts with an element mask are rejected.
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
from ..common import check_dtype_and_dim, check_inputs
from .cpu import decode_attention_cpu

MAX_LQ = 16
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128, 256)


def _check_decode(q, k_cache, v_cache, layout_or_pattern, cache_seqlens):
    """Validate everything before any launch.
    Returns (B, Hq, Hkv, Lq, Lmax, D, layout or None, pattern or None)."""
    B, Hq, Hkv, Lq, Lmax, D = check_inputs(q, k_cache, v_cache, gqa=True, names=("q", "k_cache", "v_cache"))
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
        if not torch.compiler.is_compiling() and B and not _capturing(q):
            lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))  # one host read
            if lo < 0 or hi > Lmax:
                raise ValueError(f"cache_seqlens: expected values in [0, {Lmax}] (Lmax = k_cache.shape[2]), "
                                 f"got min {lo}, max {hi}")
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
                             f"k_cache), got {tuple(layout.seq_lens)}")
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
    clamp cache lengths to [0, Lmax] themselves)."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _block_sets(layout: BlockLayout, B: int, Hq: int, Hkv: int, seqlens: Tensor):
    """A layout -> what the decode kernels read.

    Returns ``(blk_num int32 [B, Hkv], blk_idx int32 [B, Hkv, nK], head_mask bool [Bl, Hl, nK] or
    None)``: for each (sequence, KV head) the sorted key blocks any query head of its group
    attends and that hold at least one key of the sequence; ``head_mask`` (only when the layout
    differs per query head) says which of them each query head keeps. No host round trip.
    """
    partial, full = layout.tile_masks()
    attended = (partial | full)[:, :, 0, :]                                   # [Bl, Hl, nK]
    bl, hl, nk = attended.shape
    bk = layout.block_size[1]
    group = attended if hl == 1 else attended.view(bl, Hkv, Hq // Hkv, nk).any(2)
    live = torch.arange(nk, device=seqlens.device) < ((seqlens.long() + bk - 1) // bk)[:, None]   # [B, nK]
    union = group.expand(B, group.shape[1], nk) & live[:, None, :]
    union = union.expand(B, Hkv, nk)
    blk_num, blk_idx = mask_to_lists(union, width=nk)
    return blk_num, blk_idx, (attended if hl > 1 else None)


# ----------------------------------------------------------------------------- Triton fallback
def _decode_triton(q, k, v, cache_seqlens: Optional[Tensor], layout: Optional[BlockLayout], scale: float):
    """Decode through the fused Triton sparse_attention (the fallback on CUDA without the
    extension): the layout's key blocks cut at each sequence's length, bottom-right causal.
    Ragged ``cache_seqlens`` (and layouts with BLOCK_K < 32, which the Triton tiles cannot split)
    go through an element mask ``[B, Hl, Lq, Lmax]``."""
    B, Hq, Lq, D = q.shape
    Lmax = k.shape[2]
    dev = q.device
    bk = 64 if layout is None else layout.block_size[1]
    bq = 64  # one query block (Lq <= 16); the smallest Triton query tile
    if layout is None:
        attended = torch.ones(1, 1, 1, math.ceil(Lmax / bk), dtype=torch.bool, device=dev)
    else:
        partial, full = layout.tile_masks()
        attended = partial | full                                                   # [Bl, Hl, 1, nK]
    if cache_seqlens is None and bk >= 32:
        lay = BlockLayout.from_block_mask(attended, (bq, bk), (Lq, Lmax), causal="bottom_right", sync_free=True)
        return sparse_attention(q, k, v, lay, scale=scale, return_lse=True)
    n = (torch.full((B,), Lmax, device=dev) if cache_seqlens is None else cache_seqlens).long()
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
    return sparse_attention(q, k, v, lay, scale=scale, return_lse=True)


# ----------------------------------------------------------------------------- exact masked path
def _exact_path(layout: Optional[BlockLayout], pattern, cache_seqlens: Optional[Tensor], Lq: int,
                Lmax: int) -> Optional[str]:
    """Windows and tile bitmasks are token-exact kinds the decode kernels do not evaluate, and a
    pattern's blocks move with each sequence's length. Returns None (the decode kernels),
    ``"layout"`` (one length for all sequences and a bottom-right causal layout: it is the decode
    mask itself, and sparse_attention's kernels evaluate its kinds) or ``"masked"`` (an element
    mask per sequence length)."""
    token_kinds = layout is not None and (layout.window is not None or layout.bits is not None)
    if not token_kinds and pattern is None:
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


def _decode_masked(q, k, v, cache_seqlens: Optional[Tensor], layout: BlockLayout, pattern, scale: float):
    """Exact decode through sparse_attention with an element mask ``[B, Hl, Lq, Lmax]``: each
    sequence gets its own layout (``pattern.decode_layout(Lq, n_b)`` per distinct length),
    every in-block kind included, plus its length and bottom-right causal mask. Memory
    O(B * Hl * Lq * Lmax): a fallback, not the bandwidth-bound kernel."""
    B, Hq, Lq, _ = q.shape
    Lmax = k.shape[2]
    lengths = [Lmax] * B if cache_seqlens is None else cache_seqlens.tolist()
    dense = {}
    for n in set(lengths):
        lay = layout if n == Lmax or pattern is None else pattern.decode_layout(Lq, n, q.device)
        dense[n] = torch.nn.functional.pad(lay.to_dense_mask(), (0, Lmax - n)) if n else \
            torch.zeros(1, 1, Lq, Lmax, dtype=torch.bool, device=q.device)
    hl = max(m.shape[1] for m in dense.values())
    elem = torch.stack([dense[n][0 if dense[n].shape[0] == 1 else b].expand(hl, Lq, Lmax)
                        for b, n in enumerate(lengths)])                                  # [B, Hl, Lq, Lmax]
    n = torch.tensor(lengths, device=q.device)[:, None, None, None]
    cols = torch.arange(Lmax, device=q.device)
    elem = elem & (cols <= n - Lq + torch.arange(Lq, device=q.device)[:, None]) & (cols < n)
    return sparse_attention(q, k, v, mask_layout(elem, B, Hq, Lq, Lmax), scale=scale, return_lse=True)


# ----------------------------------------------------------------------------- CUDA custom op
@torch.library.custom_op("sparseattn::decode_attention_cuda", mutates_args=())
def decode_attention_cuda(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, blk_num: Optional[Tensor],
                          blk_idx: Optional[Tensor], block_k: int, head_mask: Optional[Tensor],
                          scale: float) -> Tuple[Tensor, Tensor]:
    hm = None if head_mask is None else head_mask.to(torch.uint8)
    return _cuda.decode_attention_fwd(q, k, v, seqlens, blk_num, blk_idx, block_k, hm, scale)


@decode_attention_cuda.register_fake
def _(q, k, v, seqlens, blk_num, blk_idx, block_k, head_mask, scale):
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
                     return_lse: bool = False):
    """Attention of the last 1 to 16 query positions of each sequence over its KV cache.

    Args:
        q: ``[B, Hq, Lq, D]``, 1 <= Lq <= 16: the LAST Lq positions of each sequence (their K/V
            are already in the cache), bottom-right aligned and causal among themselves: row i of
            sequence b sits at position ``cache_seqlens[b] - Lq + i`` and sees keys at positions
            ``<= cache_seqlens[b] - Lq + i``. float16, bfloat16 or float32; D up to 256.
        k_cache, v_cache: ``[B, Hkv, Lmax, D]`` with ``Hq % Hkv == 0`` (GQA/MQA, never repeated).
        layout_or_pattern: None (dense causal decode), a :class:`BlockLayout` built for
            ``seq_lens=(Lq, Lmax)`` whose listed key blocks (per ``[B|1, Hq|1]``) are the only
            ones read, or a pattern object with ``decode_layout(Lq, Lk, device)`` returning one.
        cache_seqlens: int32 ``[B]`` on q's device, keys held by each sequence, in ``[0, Lmax]``;
            default Lmax for all. Cache rows at or past a sequence's length are never read.
            (Validating the range costs one host read, skipped while a CUDA graph is captured.)
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of each row.

    Returns:
        out ``[B, Hq, Lq, D]`` in q's dtype, and with ``return_lse`` lse ``[B, Hq, Lq]`` float32
        (natural log). A row that sees no key (e.g. ``cache_seqlens[b] < Lq``) gives 0 and -inf.
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
    """
    B, Hq, Hkv, Lq, Lmax, D, layout, pattern = _check_decode(q, k_cache, v_cache, layout_or_pattern, cache_seqlens)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    exact = _exact_path(layout, pattern, cache_seqlens, Lq, Lmax)
    if exact is not None:
        if exact == "layout":
            out, lse = sparse_attention(q, k_cache, v_cache, layout, scale=scale, return_lse=True)
        else:
            out, lse = _decode_masked(q, k_cache, v_cache, cache_seqlens, layout, pattern, scale)
            _dispatch.set_backend(_dispatch.last_backend(), "decode of a window or tile bitmasks that the decode "
                                  "kernels cannot evaluate for these lengths (ragged cache_seqlens, or a layout "
                                  "not bottom-right causal): an exact element-mask path, O(B * H * Lq * Lmax) memory")
        return (out, lse) if return_lse else out
    backend = decode_backend(q)
    if backend == "triton":
        out, lse = _decode_triton(q, k_cache, v_cache, cache_seqlens, layout, scale)
        _dispatch.set_backend("triton", _triton_reason(q))
        return (out, lse) if return_lse else out
    seqlens = (torch.full((B,), Lmax, dtype=torch.int32, device=q.device) if cache_seqlens is None
               else cache_seqlens)
    blk_num = blk_idx = head_mask = None
    block_k = 64
    if layout is not None:
        block_k = layout.block_size[1]
        blk_num, blk_idx, head_mask = _block_sets(layout, B, Hq, Hkv, seqlens)
    _dispatch.set_backend(backend, None if backend == "cuda" else "CPU tensors (decode's PyTorch CPU path)")
    if backend == "cuda":
        out, lse = decode_attention_cuda(q, k_cache, v_cache, seqlens, blk_num, blk_idx, block_k, head_mask, scale)
    else:
        blocks = None if blk_num is None else (blk_num, blk_idx)
        out, lse = decode_attention_cpu(q, k_cache, v_cache, seqlens, blocks, block_k, head_mask, scale)
    return (out, lse) if return_lse else out
