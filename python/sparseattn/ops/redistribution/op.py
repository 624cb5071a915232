"""Attention redistribution, fused: VAR ("See What You Are Told", ICLR 2025) and ACT (attention
calibration, ICML 2024), as ``sa.visual.var_attention`` / ``sa.visual.act_attention``.

Both move probability mass between groups of keys, per row, by factors that depend on row
statistics of the plain softmax. The statistics come from :func:`sparseattn.attention_stats`
(LSE, group masses, column sums: walks over the same tiles, no ``Lq x Lk`` tensor); the factors
``c_i(g)`` are turned into a per-row, per-group bias ``log c_i(g)`` and the output is one more
``sparse_attention`` pass with that bias (the walk's ``group_bias`` rule): the kernel's own
normalisation then gives ``A'_ij = c_i(g_j) A_ij / sum_j c_i(g_j) A_ij = c_i(g_j) A_ij``, since
both methods preserve row sums. One accumulator, not one per group.

Oracles: :mod:`.naive` (``sa.reference.var_attention`` / ``act_attention``), the reference codes'
formulas on dense float64 probabilities (``../shared/specs/methods.md``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...layout import BlockLayout
from ..attention.op import run
from ..common import ScoreOptions, check_dtype_and_dim, check_inputs
from ..stats.op import attention_stats

# Layout block of the dense layouts built here (as the SDPA drop-in's).
BLOCK = (128, 128)


def _layout(Lq: int, Lk: int, is_causal: bool, device) -> BlockLayout:
    """Dense attention, bottom-right causal with ``is_causal`` (queries are the last Lq positions)."""
    bm = torch.ones(1, 1, math.ceil(Lq / BLOCK[0]), math.ceil(Lk / BLOCK[1]), dtype=torch.bool, device=device)
    return BlockLayout.from_block_mask(bm, BLOCK, (Lq, Lk), causal="bottom_right" if is_causal else None)


def _check_mask(t, name: str, shape, device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a bool torch.Tensor {list(shape)}, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (as q), got {t.device}")


def _check_fraction(x, name: str, lo_open: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 or x > 1 \
            or (lo_open and x == 0):
        raise ValueError(f"{name}: expected a float in {'(0' if lo_open else '[0'}, 1], got {x!r}")
    return float(x)


def _decode_layout(cache_seqlens, B: int, Lq: int, Lmax: int, device) -> BlockLayout:
    """Decode against a cache: row i of sequence b at position ``n_b - Lq + i`` sees the keys at
    positions ``<= n_b - Lq + i`` and ``< n_b``, as position-id causal plus a key padding mask."""
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens: expected an int32 torch.Tensor [{B}], got "
                        f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)}")
    if tuple(cache_seqlens.shape) != (B,) or cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens: expected shape [{B}] on {device}, got {list(cache_seqlens.shape)} on "
                         f"{cache_seqlens.device}")
    if not 1 <= Lq <= 16:
        raise ValueError(f"q: expected 1 <= Lq <= 16 query positions with cache_seqlens (decode), got {Lq}")
    n = cache_seqlens.long()[:, None]
    q_pos = (n - Lq + torch.arange(Lq, device=device)).to(torch.int32)
    k_pos = torch.arange(Lmax, device=device, dtype=torch.int32).expand(B, Lmax).contiguous()
    return BlockLayout.from_positions(q_pos, k_pos, (64, 64)).with_key_padding(k_pos < n)


def _reweighted(q, k, v, layout, scale, key_group, factors):
    """The output pass: attention with ``log(factors)`` ``[B, H, Lq, G]`` added to each key's group."""
    bias = torch.log(factors.float()).contiguous()
    return run(q, k, v, layout, None, scale, ScoreOptions(key_group=key_group, group_bias=bias))[0]


def var_attention(q: Tensor, k: Tensor, v: Tensor, image_mask: Tensor, sink_mask: Tensor, *, p: float = 0.6,
                  rho: float = 0.5, summ: float = 0.2, query_mask: Optional[Tensor] = None, is_causal: bool = True,
                  scale: Optional[float] = None, cache_seqlens: Optional[Tensor] = None,
                  return_selected: bool = False):
    """VAR attention redistribution ("See What You Are Told", ICLR 2025), fused: no ``Lq x Lk`` tensor.

    For each (batch, head, query) row of the softmax ``A``: image mass ``summ_i = sum_{j in I} A_ij``,
    visual-sink share ``portion_i = sum_{j in S_v} A_ij / sum_{j in I} (A_ij + 1e-6)``
    (``I = image_mask``, ``S_v = I and sink_mask``, ``S_t = sink_mask \\ I``). A row is selected when
    ``portion_i <= rho``, ``summ_i >= summ``, ``query_mask`` allows it and its batch element has a
    visual sink; there the sinks (visual and text) keep ``p * A_ij`` and the freed mass
    ``(1 - p) * sum_{j in S_v or S_t} A_ij`` goes to the non-sink image keys in proportion to ``A_ij``.
    Other rows are plain attention; row sums stay 1.

    Faithful to the reference code (MICV-yonsei/VisAttnSink, ``VARProcessor``): the budget counts
    text sinks (BOS) too, the denominator adds 1e-6 per image key, nothing is selected in a batch
    element without a visual sink. Dropped on purpose: rows with no non-sink image mass (where the
    reference divides by zero) are left unchanged. Which heads, layers and queries take part
    (image-centric heads, text queries after the image, layers 2..L-1) is the caller's choice:
    call it per layer and pass ``query_mask``.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D|Dv]`` (GQA; fp16, bf16, fp32).
        image_mask, sink_mask: bool ``[B, Lk]`` (sinks: e.g. :func:`massive_activation_sinks`).
        p, rho, summ: the method's constants (defaults of the reference config).
        query_mask: bool ``[B, Lq]``: rows that may be redistributed (default all).
        is_causal: causal, bottom-right aligned (queries are the last Lq positions).
        scale: score scale, default ``1 / sqrt(D)``.
        cache_seqlens: int32 ``[B]``: the decode form, ``k``/``v`` a cache ``[B, Hkv, Lmax, D]`` of
            which sequence b holds ``cache_seqlens[b]`` keys and the Lq (<= 16) queries are its last
            positions (as :func:`sparseattn.decode_attention`; masks in cache positions). Built as
            position-id causal plus a key padding mask: exact for ragged lengths, no host read.
        return_selected: also return the selection ``[B, Hq, Lq]`` bool.

    Returns:
        out ``[B, Hq, Lq, Dv]`` (and the selection). Forward only. Two passes over the tiles: the
        statistics (LSE and the group masses of :func:`sparseattn.attention_stats`), then the output
        with a per-row group bias.

    Example::

        >>> import torch, sparseattn as sa
        >>> q, k, v = (torch.randn(1, 2, 96, 32) for _ in range(3))
        >>> image = (torch.arange(96) >= 8) & (torch.arange(96) < 72)          # 64 image tokens
        >>> sinks = torch.zeros(96, dtype=torch.bool); sinks[[0, 10, 11]] = True
        >>> out, sel = sa.visual.var_attention(q, k, v, image[None], sinks[None], return_selected=True)
        >>> out.shape, sel.shape
        (torch.Size([1, 2, 96, 32]), torch.Size([1, 2, 96]))
    """
    B, Hq, _, Lq, Lk, D = check_inputs(q, k, v, gqa=True, same_value_dim=False)
    check_dtype_and_dim(q)
    _check_mask(image_mask, "image_mask", (B, Lk), q.device)
    _check_mask(sink_mask, "sink_mask", (B, Lk), q.device)
    if query_mask is not None:
        _check_mask(query_mask, "query_mask", (B, Lq), q.device)
    p, rho, summ = _check_fraction(p, "p"), _check_fraction(rho, "rho"), _check_fraction(summ, "summ")
    if cache_seqlens is None:
        layout = _layout(Lq, Lk, is_causal, q.device)
    else:
        layout = _decode_layout(cache_seqlens, B, Lq, Lk, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # key groups: 0 other, 1 text sink, 2 visual sink, 3 non-sink image
    group = (sink_mask & ~image_mask).int() + 2 * (sink_mask & image_mask).int() + 3 * (image_mask & ~sink_mask).int()
    st = attention_stats(q, k, layout, scale=scale, key_groups=group, num_groups=4, column_sum=False)
    m = st.group_mass.double()                                                       # [B, H, Lq, 4]
    summation = m[..., 2] + m[..., 3]
    portion = m[..., 2] / (summation + 1e-6 * image_mask.sum(-1).double()[:, None, None])
    selected = (portion <= rho) & (summation >= summ) & (m[..., 3] > 0)
    selected = selected & (image_mask & sink_mask).any(-1)[:, None, None] & torch.isfinite(st.lse)
    if query_mask is not None:
        selected = selected & query_mask[:, None, :]
    budget = (1 - p) * (m[..., 1] + m[..., 2])
    one = torch.ones_like(summation)
    factors = torch.stack([one, torch.where(selected, p, one), torch.where(selected, p, one),
                           torch.where(selected, 1 + budget / torch.where(selected, m[..., 3], one), one)], -1)
    out = _reweighted(q, k, v, layout, scale, group[:, None].contiguous(), factors)
    return (out, selected) if return_selected else out


def act_attention(q: Tensor, k: Tensor, v: Tensor, *, alpha: float = 0.1, beta: float = 0.4, is_causal: bool = True,
                  scale: Optional[float] = None, return_sinks: bool = False):
    """ACT attention calibration (ICML 2024), prefill, fused: no ``Lq x Lk`` tensor.

    Per (batch, head): key j is a sink when its column mean ``sum_i A_ij / (rows that can see j)``
    exceeds ``alpha``, except the first (smallest-index) detected sink (usually BOS), which the
    reference code (GATECH-EIC/ACT, ``atten_process_eval``) drops. Every row but row 0 keeps
    ``beta * A_ij`` on the sinks and gives ``(1 - beta)`` of its sink mass to its other visible keys
    in proportion to ``A_ij``; row 0 is unchanged (the reference's ``A'[0, 0] = 1`` under causal
    masking). Dropped on purpose: a row with no visible non-sink key (the reference divides by
    zero) is unchanged. Heads are the caller's choice (the paper picks them offline): call it on
    the heads to calibrate.

    Args:
        q, k, v: ``[B, Hq, L, D]``, ``[B, Hkv, L, D|Dv]``: square (prefill), as the reference.
        alpha, beta: the method's threshold and kept fraction (reference scripts: 0.1, 0.4).
        is_causal: causal (the reference's setting); without it every row sees every key.
        scale: score scale, default ``1 / sqrt(D)``.
        return_sinks: also return the sinks ``[B, Hq, L]`` bool.

    Returns:
        out ``[B, Hq, L, Dv]`` (and the sinks). Forward only. Four passes over the tiles: LSE,
        column sums, the rows' sink mass, the output with a per-row group bias (the issue's plan
        has three: the sink mass per row is one more statistics pass here).
    """
    B, Hq, _, Lq, Lk, D = check_inputs(q, k, v, gqa=True, same_value_dim=False)
    check_dtype_and_dim(q)
    if Lq != Lk:
        raise ValueError(f"q, k: expected a square attention map (prefill, as the reference), got Lq={Lq}, Lk={Lk}")
    alpha, beta = _check_fraction(alpha, "alpha"), _check_fraction(beta, "beta", lo_open=True)
    layout = _layout(Lq, Lk, is_causal, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    st = attention_stats(q, k, layout, scale=scale)
    j = torch.arange(Lk, device=q.device)
    seen_by = (Lq - j) if is_causal else torch.full_like(j, Lq)
    sinks = st.column_sum / seen_by.float() > alpha                                  # [B, H, Lk]
    first = torch.where(sinks, j, Lk).amin(-1, keepdim=True)
    sinks = sinks & (j != first)
    mass = attention_stats(q, k, layout, scale=scale, lse=st.lse, key_groups=sinks.int(), num_groups=2,
                           column_sum=False).group_mass.double()                    # [B, H, Lq, 2]
    m_o, m_s = mass[..., 0], mass[..., 1]
    rows = (torch.arange(Lq, device=q.device) >= 1) & (m_o > 0)
    one = torch.ones_like(m_o)
    factors = torch.stack([torch.where(rows, 1 + (1 - beta) * m_s / torch.where(rows, m_o, one), one),
                           torch.where(rows, beta, one)], -1)
    out = _reweighted(q, k, v, layout, scale, sinks.int().contiguous(), factors)
    return (out, sinks) if return_sinks else out
