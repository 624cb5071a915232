"""Float64 oracle of :func:`sparseattn.decode_attention`: dense attention under the decode mask."""
from __future__ import annotations

import math
from typing import Optional

import torch



def _pattern_rows(pattern, q_len: int, length: int) -> torch.Tensor:
    """The pattern's definition for the last ``q_len`` rows over ``length`` keys (a pattern built
    for one ``(Lq, Lk)``, such as ``BlockSparse.from_mask_mod``, gives its own last rows)."""
    lens = getattr(pattern, "seq_lens", None)
    if lens is not None:
        if lens[1] != length:
            raise ValueError(f"layout: this pattern was built for seq_lens {tuple(lens)}, got a cache length {length}")
        return pattern.dense_mask(*lens)[..., lens[0] - q_len:, :]
    if not hasattr(pattern, "dense_mask"):   # an object with decode_layout only
        return pattern.decode_layout(q_len, length).to_dense_mask()
    return pattern.dense_mask(q_len, length)


def decode_mask(q_len: int, cache_len: int, cache_seqlens: Optional[torch.Tensor] = None, layout=None,
                batch: int = 1, device=None) -> torch.Tensor:
    """Element mask of decode: bool ``[B, Hl|1, Lq, Lmax]``, True = attend.

    Query row i of sequence b sits at position ``cache_seqlens[b] - Lq + i`` and sees key j iff
    ``j <= cache_seqlens[b] - Lq + i`` (bottom-right causal; keys past the length are excluded
    with it) and, with a layout (built for ``(Lq, Lmax)``), key block ``j // BLOCK_K`` is listed.
    A layout's in-block kinds (window, sinks, tile bitmasks) are evaluated as well: within the
    listed tiles, ``layout.to_dense_mask()``. ``layout`` may also be a pattern object (what
    ``decode_attention`` takes). A pattern defined relative to the query's position (SlidingWindow,
    PowerAttention: ``moves_with_length``) moves with each sequence's length: sequence b sees what
    the pattern's definition ``dense_mask(Lq, cache_seqlens[b])`` allows. A fixed block table
    (BlockSparse and its from_mask_mod / from_flex forms) is its layout for ``(Lq, Lmax)``, as above.
    """
    if layout is not None and not hasattr(layout, "tile_masks") and not getattr(layout, "moves_with_length", True):
        layout = layout.decode_layout(q_len, cache_len, device)
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
        if layout.window is not None or layout.bits is not None:
            keep = keep & layout.to_dense_mask().to(device)
    return keep


def logical_cache(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """A paged cache ``[num_pages, page_size, Hkv, D]`` read through ``block_table`` int32
    ``[B, max_pages]`` as the contiguous cache ``[B, Hkv, max_pages * page_size, D]`` it stands for
    (logical key t of sequence b is row ``t % page_size`` of page ``block_table[b, t // page_size]``).
    A gathered copy: for oracles and tests only."""
    B, pages = block_table.shape
    ps = cache.shape[1]
    return cache[block_table.long().to(cache.device)].reshape(B, pages * ps, *cache.shape[2:]).transpose(1, 2)


def decode_attention(q, k_cache, v_cache, layout=None, cache_seqlens: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, return_lse: bool = False,
                     block_table: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                     alibi_slopes: Optional[torch.Tensor] = None, *,
                     key_padding_mask: Optional[torch.Tensor] = None, key_bias: Optional[torch.Tensor] = None,
                     dtype: torch.dtype = torch.float64):
    """Oracle of :func:`sparseattn.decode_attention` (the same arguments), computed in ``dtype``:
    dense attention under :func:`decode_mask` (``layout``: None, a BlockLayout or a pattern object,
    as the op takes) and ``key_padding_mask``, with the scores ``s * scale``, then
    ``softcap * tanh(s / softcap)``, then ``- slope * |pos_i - j|`` (row i at position
    ``cache_seqlens[b] - Lq + i``), then ``+ key_bias``. A paged cache is gathered into its logical
    contiguous form first. Rows that see nothing give 0 and LSE -inf."""
    if block_table is not None:
        k_cache, v_cache = logical_cache(k_cache, block_table), logical_cache(v_cache, block_table)
    B, Hq, Lq, D = q.shape
    Lmax = k_cache.shape[2]
    mask = decode_mask(Lq, Lmax, cache_seqlens, layout, B, q.device)                     # [B, Hl, Lq, Lmax]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.to(q.device)[:, None, None, :]
    q, k, v = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
    group = Hq // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale                                                # [B, Hq, Lq, Lmax]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        n = (torch.full((B,), Lmax) if cache_seqlens is None else cache_seqlens).to(q.device, torch.float64)
        pos = n[:, None, None, None] - Lq + torch.arange(Lq, device=q.device, dtype=torch.float64)[:, None]
        dist = (pos - torch.arange(Lmax, device=q.device, dtype=torch.float64)).abs()    # [B, 1, Lq, Lmax]
        slopes = alibi_slopes.to(q.device, torch.float64)
        slopes = slopes[None, :] if slopes.dim() == 1 else slopes
        s = s - (slopes[:, :, None, None] * dist).to(dtype)
    if key_bias is not None:
        s = s + key_bias.to(q.device, dtype)[:, :, None, :]
    return attention_from_scores(s, v, mask, return_lse)


def attention_from_scores(s: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, return_lse: bool):
    """Softmax of the scores ``s`` where ``keep`` (bool, broadcast) holds, times v; a row that keeps
    nothing (or whose kept scores are all -inf) gives 0 and LSE -inf."""
    s = s.masked_fill(~keep, float("-inf"))
    if s.shape[-1] == 0:   # no keys at all (an empty cache): one -inf column keeps every row empty
        s, v = torch.nn.functional.pad(s, (0, 1), value=float("-inf")), torch.nn.functional.pad(v, (0, 0, 0, 1))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    out = (p / l_safe) @ v
    if not return_lse:
        return out
    return out, torch.where(empty, torch.full_like(l, float("-inf")), m + torch.log(l_safe)).squeeze(-1)
