"""Float64 oracle of :func:`sparseattn.decode_attention`: dense attention under the decode mask."""
from __future__ import annotations

from typing import Optional

import torch

from ..attention.naive import attention


def _pattern_rows(pattern, q_len: int, length: int) -> torch.Tensor:
    """The pattern's definition for the last ``q_len`` rows over ``length`` keys (a pattern built
    for one ``(Lq, Lk)``, such as ``BlockSparse.from_mask_mod``, gives its own last rows)."""
    lens = getattr(pattern, "seq_lens", None)
    if lens is not None:
        if lens[1] != length:
            raise ValueError(f"layout: this pattern was built for seq_lens {tuple(lens)}, got a cache length {length}")
        return pattern.dense_mask(*lens)[..., lens[0] - q_len:, :]
    return pattern.dense_mask(q_len, length)


def decode_mask(q_len: int, cache_len: int, cache_seqlens: Optional[torch.Tensor] = None, layout=None,
                batch: int = 1, device=None) -> torch.Tensor:
    """Element mask of decode: bool ``[B, Hl|1, Lq, Lmax]``, True = attend.

    Query row i of sequence b sits at position ``cache_seqlens[b] - Lq + i`` and sees key j iff
    ``j <= cache_seqlens[b] - Lq + i`` (bottom-right causal; keys past the length are excluded
    with it) and, with a layout (built for ``(Lq, Lmax)``), key block ``j // BLOCK_K`` is listed.
    ``layout`` may also be a pattern object (what ``decode_attention`` takes). A pattern whose
    decode layout is token-exact (windows, sinks, tile bitmasks) moves with each sequence's length:
    sequence b sees what the pattern's definition ``dense_mask(Lq, cache_seqlens[b])`` allows. A
    pattern of whole blocks (a block mask) is its layout for ``(Lq, Lmax)``, as above.
    """
    if layout is not None and not hasattr(layout, "tile_masks"):
        lay = layout.decode_layout(q_len, cache_len, device)
        if lay.window is None and lay.bits is None:
            layout = lay
    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), cache_len, dtype=torch.int64, device=device)
    n = cache_seqlens.long().to(device)
    rows = n[:, None, None] - q_len + torch.arange(q_len, device=device)[None, :, None]
    keep = (torch.arange(cache_len, device=device)[None, None, :] <= rows)[:, None]      # [B, 1, Lq, Lmax]
    if layout is not None and not hasattr(layout, "tile_masks"):
        dense = []
        for b, length in enumerate(n.tolist()):
            m = _pattern_rows(layout, q_len, length) if length else torch.zeros(1, 1, q_len, 0, dtype=torch.bool)
            dense.append(torch.nn.functional.pad(m[0 if m.shape[0] == 1 else b], (0, cache_len - length)))
        heads = max(m.shape[0] for m in dense)
        keep = keep & torch.stack([m.expand(heads, q_len, cache_len) for m in dense]).to(device)
    elif layout is not None:
        bk = layout.block_size[1]
        partial, full = layout.tile_masks()
        blocks = (partial | full)[:, :, 0, :].to(device)                                 # [Bl, Hl, nK]
        keep = keep & blocks.repeat_interleave(bk, -1)[..., None, :cache_len]
    return keep


def decode_attention(q, k_cache, v_cache, layout=None, cache_seqlens: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, return_lse: bool = False, dtype: torch.dtype = torch.float64):
    """Oracle of :func:`sparseattn.decode_attention`: dense attention under :func:`decode_mask`
    (``layout``: None, a BlockLayout or a pattern object, as the op takes)."""
    mask = decode_mask(q.shape[2], k_cache.shape[2], cache_seqlens, layout, q.shape[0], q.device)
    return attention(q, k_cache, v_cache, mask=mask, scale=scale, return_lse=return_lse, dtype=dtype)
