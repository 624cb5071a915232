"""Float64 oracle of :func:`sparseattn.decode_attention`: dense attention under the decode mask."""
from __future__ import annotations

from typing import Optional

import torch

from ..attention.naive import attention


def decode_mask(q_len: int, cache_len: int, cache_seqlens: Optional[torch.Tensor] = None, layout=None,
                batch: int = 1, device=None) -> torch.Tensor:
    """Element mask of decode: bool ``[B, Hl|1, Lq, Lmax]``, True = attend.

    Query row i of sequence b sits at position ``cache_seqlens[b] - Lq + i`` and sees key j iff
    ``j <= cache_seqlens[b] - Lq + i`` (bottom-right causal; keys past the length are excluded
    with it) and, with a layout (built for ``(Lq, Lmax)``), key block ``j // BLOCK_K`` is listed.
    """
    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), cache_len, dtype=torch.int64, device=device)
    n = cache_seqlens.long().to(device)
    rows = n[:, None, None] - q_len + torch.arange(q_len, device=device)[None, :, None]
    keep = (torch.arange(cache_len, device=device)[None, None, :] <= rows)[:, None]      # [B, 1, Lq, Lmax]
    if layout is not None:
        bk = layout.block_size[1]
        partial, full = layout.tile_masks()
        blocks = (partial | full)[:, :, 0, :].to(device)                                 # [Bl, Hl, nK]
        keep = keep & blocks.repeat_interleave(bk, -1)[..., None, :cache_len]
    return keep


def decode_attention(q, k_cache, v_cache, layout=None, cache_seqlens: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, return_lse: bool = False, dtype: torch.dtype = torch.float64):
    """Oracle of :func:`sparseattn.decode_attention`: dense attention under :func:`decode_mask`."""
    mask = decode_mask(q.shape[2], k_cache.shape[2], cache_seqlens, layout, q.shape[0], q.device)
    return attention(q, k_cache, v_cache, mask=mask, scale=scale, return_lse=return_lse, dtype=dtype)
