"""The ``torch.nn.functional.scaled_dot_product_attention`` drop-in, on the sparse_attention op.

Bool masks become a layout (tiles with no True skipped, all-True tiles full, mixed tiles read the
mask), float masks a bias, ``is_causal`` the in-kernel causal rule. What the kernels cannot do
goes to torch's own function, with the reason recorded (:func:`sparseattn.last_fallback_reason`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ... import _dispatch
from ...layout import BlockLayout
from ...layout.predicates import alibi_bias, alibi_distance
from ..common import MAX_HEAD_DIM, SUPPORTED_DTYPES, ScoreOptions, check_inputs, check_score_options
from .op import run

# Layout block of the layouts built by scaled_dot_product_attention.
SDPA_BLOCK = (128, 128)

# torch's own function, taken when sparseattn is imported: the fallbacks call it, never the name
# ``F.scaled_dot_product_attention``, which sa.patch_sdpa() points at the drop-in (no recursion).
TORCH_SDPA = F.scaled_dot_product_attention

_dense_layouts: Dict[Tuple, BlockLayout] = {}


def _broadcast_mask(attn_mask: torch.Tensor, B, Hq, Lq, Lk) -> torch.Tensor:
    """attn_mask broadcastable to [B, Hq, Lq, Lk] -> a 4-D view with sizes 1 or full (no copy)."""
    shape = tuple(attn_mask.shape)
    target = (B, Hq, Lq, Lk)
    if attn_mask.dim() > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
        raise ValueError(f"attn_mask: expected a shape broadcastable to {list(target)}, got {list(shape)}")
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + shape)


def _block_any_all(mask: torch.Tensor, bq: int, bk: int, lq: int, lk: int):
    """(any, all) of a bool mask [Bm, Hm, Lq|1, Lk|1] over tiles -> [Bm, Hm, nQ|1, nK|1]."""
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    m_any = m_all = mask
    if mask.shape[2] > 1:
        pad = nq * bq - lq
        m_any = F.pad(m_any.to(torch.uint8), (0, 0, 0, pad), value=0).unflatten(2, (nq, bq)).amax(3)
        m_all = F.pad(m_all.to(torch.uint8), (0, 0, 0, pad), value=1).unflatten(2, (nq, bq)).amin(3)
    if mask.shape[3] > 1:
        pad = nk * bk - lk
        m_any = F.pad(m_any.to(torch.uint8), (0, pad), value=0).unflatten(3, (nk, bk)).amax(4)
        m_all = F.pad(m_all.to(torch.uint8), (0, pad), value=1).unflatten(3, (nk, bk)).amin(4)
    return m_any.bool(), m_all.bool()


def _dense_layout(lq: int, lk: int, causal: Optional[str], device) -> BlockLayout:
    """Layout of dense (or causal: "top_left" / "bottom_right") attention; cached outside torch.compile."""
    key = (lq, lk, causal, str(device))
    if key in _dense_layouts:
        return _dense_layouts[key]
    bq, bk = SDPA_BLOCK
    bm = torch.ones(1, 1, math.ceil(lq / bq), math.ceil(lk / bk), dtype=torch.bool, device=device)
    layout = BlockLayout.from_block_mask(bm, SDPA_BLOCK, (lq, lk), causal=causal)
    if not torch.compiler.is_compiling():
        if len(_dense_layouts) > 64:
            _dense_layouts.clear()
        _dense_layouts[key] = layout
    return layout


def mask_layout(mask: torch.Tensor, B, Hq, lq, lk) -> BlockLayout:
    """Layout of a bool attn_mask: tiles with no True are skipped, all-True tiles run as full
    tiles, mixed tiles read the mask. Built without a host read (lists as wide as the block grid),
    so a training step with a mask does not wait on the GPU here."""
    bq, bk = SDPA_BLOCK
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    m_any, m_all = _block_any_all(mask, bq, bk, lq, lk)
    shape = (mask.shape[0], mask.shape[1], nq, nk)
    return BlockLayout.from_block_mask(m_any.expand(shape), SDPA_BLOCK, (lq, lk),
                                       mask=mask.expand(mask.shape[0], mask.shape[1], lq, lk),
                                       partial_blocks=~m_all.expand(shape), sync_free=True)


def _causal_bias(attn_mask, Lq: int, Lk: int) -> Optional[str]:
    """The causal alignment of a ``torch.nn.attention.bias.CausalBias`` ("top_left" for
    ``causal_upper_left``, "bottom_right" for ``causal_lower_right``); None for a plain tensor.
    Other tensor subclasses of ``torch.nn.attention`` are refused (their storage is not a mask)."""
    cls = type(attn_mask)
    if not cls.__module__.startswith("torch.nn.attention"):
        return None
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if not isinstance(attn_mask, CausalBias):
        raise TypeError(f"attn_mask: expected a bool or float tensor or a CausalBias, got {cls.__name__}")
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (Lq, Lk):
        raise ValueError(f"attn_mask: expected a CausalBias for (Lq, Lk) = {(Lq, Lk)}, got "
                         f"{(attn_mask.seq_len_q, attn_mask.seq_len_kv)}")
    return "top_left" if attn_mask.variant == CausalVariant.UPPER_LEFT else "bottom_right"


def _to_4d(query, key, value):
    """Views ``[B, H, L, D]`` of inputs of any rank torch takes (``[..., H, L, D]``, ``[L, D]``), batch
    dims broadcast between query and key/value (stride 0, no copy for 4-D inputs); and the shape
    of the output's leading dims."""
    for t, n in zip((query, key, value), ("query", "key", "value")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{n}: expected at least 2 dims [..., L, D], got shape {tuple(t.shape)}")
    if query.dim() == key.dim() == value.dim() == 4 and query.shape[0] == key.shape[0] == value.shape[0]:
        return query, key, value, None
    heads = [t.shape[-3] if t.dim() >= 3 else 1 for t in (query, key, value)]
    try:
        lead = torch.broadcast_shapes(*(tuple(t.shape[:-3]) for t in (query, key, value)))
    except RuntimeError:
        raise ValueError(f"query, key, value: expected batch dims that broadcast, got shapes {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}") from None
    out = [t.reshape((1,) * (max(0, 3 - t.dim())) + tuple(t.shape)).expand(*lead, h, *t.shape[-2:])
           .reshape(-1, h, *t.shape[-2:]) for t, h in zip((query, key, value), heads)]
    return (*out, tuple(lead) + ((heads[0],) if query.dim() >= 3 else ()))


def fallback_reason(query, key, value, attn_mask, dropout_p) -> Optional[str]:
    """Why these inputs go to torch's function, or None when the kernels take them."""
    if dropout_p > 0.0:
        return "dropout_p > 0"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype}"
    if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(query.shape[-1], value.shape[-1])} > {MAX_HEAD_DIM}"
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad:
        return "float attn_mask that requires grad"
    if query.numel() == 0 or key.numel() == 0:
        return "empty input"
    return None


def _with_alibi(attn_mask, is_causal: bool, slopes: torch.Tensor, B, Hq, Lq, Lk, dtype):
    """The float mask ``[B|1, Hq, Lq, Lk]`` torch's function needs for ALiBi (it has no ALiBi
    argument): the slopes' bias plus the bool or float mask (or the causal rule). O(Lq * Lk): the
    fallbacks only."""
    dev = slopes.device
    bias = alibi_bias(slopes[:, :, None, None], alibi_distance(torch.arange(Lq, device=dev)[:, None],
                                                               torch.arange(Lk, device=dev)[None, :], Lq, Lk)).to(dtype)
    if is_causal:
        attn_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=dev).tril()
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return bias.masked_fill(~attn_mask, float("-inf"))
    return bias + attn_mask


def _torch_sdpa(query, key, value, attn_mask, mask4, dropout_p, is_causal, scale, enable_gqa, reason: str,
                options: ScoreOptions, original=None):
    """torch's own function (the fallbacks, and CPU tensors outside the Triton interpreter, where
    torch's CPU kernels beat sparseattn's gather path on all SDPA can express), with rows that
    see no key set to 0 as on every other path (torch's value there depends on its backend).
    ALiBi becomes a float mask; a softcap has no torch equivalent (ValueError). ``original``: the
    caller's tensors of another rank (or batch dims that broadcast), given to torch as they came:
    torch chooses its CPU kernel by rank (a 3-D fp16 call's dV was 10x closer to float64 than the
    same call as 4-D: found by fuzzing), so the drop-in calls it exactly as the caller would."""
    if options.softcap is not None:
        raise ValueError(f"softcap: not available on torch's fallback path, which these inputs take ({reason})")
    if options.alibi is not None:
        B, Hq, Lq, Lk = *query.shape[:3], key.shape[2]
        attn_mask = _with_alibi(mask4, is_causal, options.alibi, B, Hq, Lq, Lk, query.dtype)
        mask4, is_causal, original = attn_mask, False, None
    _dispatch.set_backend("torch", reason)
    if original is not None and (original[3] is None or _causal_bias(original[3], query.shape[2], key.shape[2])
                                 is None):
        q0, k0, v0, m0 = original
        out = TORCH_SDPA(q0, k0, v0, attn_mask=m0, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
        out = out.reshape(*query.shape[:3], out.shape[-1])
    else:
        out = TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
    if mask4 is not None:
        empty = ~mask4.any(-1) if mask4.dtype == torch.bool else torch.isneginf(mask4).all(-1)
        out = out.masked_fill(empty[..., None], 0)
    return out


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, softcap: Optional[float] = None,
                                 alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on the fused kernels.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]``; value: ``[B, Hkv, Lk, Dv]``; any strides.
            As torch, any rank >= 2 (``[..., H, L, D]``, ``[L, D]``), and batch dims that broadcast
            between query and key/value (a K/V batch of 1 for a query batch of 3 is read with
            stride 0, not copied).
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
            ``[B, Hq, Lq, Lk]``. Bool masks become a layout: tiles with no True are skipped. A
            mask whose query axis has size 1 (``[B|1, 1, 1, Lk]``, Hugging Face's padding mask)
            runs as a key padding mask (one bit per key in the kernel, padding-only tiles skipped,
            :meth:`BlockLayout.with_key_padding`); a float one of shape ``[B|1, H|1, 1, Lk]`` as a
            per-key bias: O(Lk), never expanded to ``[Lq, Lk]``.
            A ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left`` /
            ``causal_lower_right``) becomes the in-kernel causal rule with that alignment.
        dropout_p: dropout probability (> 0 falls back to torch).
        is_causal: top-left causal mask (``ones(Lq, Lk).tril()``, as torch); not with attn_mask.
        scale: score scale, default ``1 / sqrt(D)``.
        enable_gqa: allow ``Hq`` to be a multiple of ``Hkv`` (K/V heads shared by groups).
        softcap: keyword-only extension: ``softcap * tanh(score / softcap)`` after scaling, before
            masking (Gemma 2), exact gradient. Not on torch's fallback paths (ValueError there).
        alibi_slopes: keyword-only extension: float32 ``[Hq]`` or ``[B, Hq]``, adds
            ``-slope * |i + Lk - Lq - j|`` (FlashAttention's definition); on torch's fallback
            paths it becomes a float mask.

    Returns:
        ``[B, Hq, Lq, Dv]`` in query's dtype. A query row with no visible key gives 0, on every
        path (torch's own value there depends on its backend).

    Runs the Triton kernels for float16/bfloat16/float32 with D and Dv <= 256 (Dv may differ from
    D); otherwise (dropout, float64, D > 256, a float mask that requires grad) it calls torch's own
    function, as it does for CPU tensors (torch's CPU kernels are faster than sparseattn's CPU
    path; rows that see no key still give 0) unless a softcap or ALiBi asks for sparseattn's CPU
    path. :func:`last_backend` says which path ran.

    Example::

        >>> import torch, sparseattn as sa
        >>> q = k = v = torch.randn(2, 8, 128, 64)
        >>> out = sa.scaled_dot_product_attention(q, k, v, is_causal=True)
    """
    original = (query, key, value, attn_mask)
    query4, key, value, lead = _to_4d(query, key, value)
    if lead is not None:
        if isinstance(attn_mask, torch.Tensor) and _causal_bias(attn_mask, query4.shape[2], key.shape[2]) is None:
            target = (*lead, query4.shape[2], key.shape[2])
            if attn_mask.dim() > len(target) or any(m not in (1, t) for m, t in zip(attn_mask.shape[::-1],
                                                                                     target[::-1])):
                raise ValueError(f"attn_mask: expected a shape broadcastable to {list(target)}, got "
                                 f"{list(attn_mask.shape)}")
            attn_mask = attn_mask.expand(target).reshape(-1, *query4.shape[1:3], key.shape[2])
        out = _sdpa_4d(query4, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap,
                       alibi_slopes, original=original)
        return out.reshape(*lead, *out.shape[2:])
    return _sdpa_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap, alibi_slopes)


def _sdpa_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap, alibi_slopes,
             original=None):
    """:func:`scaled_dot_product_attention` on 4-D inputs of one batch size. ``original``: the
    caller's own (query, key, value, attn_mask) when they were not, which torch's fallback gets
    as they came (torch picks its backend, and with it its rounding, by rank)."""
    B, Hq, _, Lq, Lk, D = check_inputs(query, key, value, gqa=enable_gqa, names=("query", "key", "value"),
                                        same_value_dim=False)
    causal = "top_left" if is_causal else None
    if attn_mask is not None and _causal_bias(attn_mask, Lq, Lk) is not None:
        if is_causal:
            raise ValueError("attn_mask: expected None when is_causal=True (as torch), got a CausalBias")
        causal = _causal_bias(attn_mask, Lq, Lk)
        # the fallbacks get torch's own semantics as a bool mask (rows that see nothing give 0)
        attn_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril(0 if causal == "top_left"
                                                                                    else Lk - Lq)
        is_causal = False
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask: expected dtype torch.bool or a float dtype, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask: expected device {query.device}, got {attn_mask.device}")
        if is_causal:
            raise ValueError("attn_mask: expected None when is_causal=True (as torch), got a tensor")
        mask4 = _broadcast_mask(attn_mask, B, Hq, Lq, Lk)
    options = check_score_options(B, Hq, Lk, query.device, softcap=softcap, alibi_slopes=alibi_slopes)
    reason = fallback_reason(query, key, value, attn_mask, dropout_p)
    if reason is None and _dispatch.backend_for(query) == "cpu" and softcap is None and alibi_slopes is None:
        reason = _dispatch.cpu_reason(query) + "; torch's CPU kernels beat the CPU gather path on what SDPA expresses"
    if reason is not None:
        return _torch_sdpa(query, key, value, attn_mask, mask4 if attn_mask is not None else None, dropout_p,
                           is_causal, scale, enable_gqa, reason, options, original)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bias = None
    per_key = attn_mask is not None and causal is None and mask4.shape[2] == 1 and mask4.shape[3] == Lk
    if causal is not None or attn_mask is None:
        layout = _dense_layout(Lq, Lk, causal, query.device)
    elif per_key and attn_mask.dtype == torch.bool and mask4.shape[1] == 1:
        # a key padding mask: one bit per key in the kernel, padding-only tiles skipped
        layout = _dense_layout(Lq, Lk, None, query.device).with_key_padding(mask4[:, 0, 0, :].expand(B, Lk))
    elif attn_mask.dtype == torch.bool:
        layout = mask_layout(mask4, B, Hq, Lq, Lk)
    elif per_key:
        layout = _dense_layout(Lq, Lk, None, query.device)
        options = options._replace(key_bias=mask4[:, :, 0, :])
    else:
        layout = _dense_layout(Lq, Lk, None, query.device)
        bias = mask4.expand(mask4.shape[0], mask4.shape[1], Lq, Lk)
    out, _ = run(query, key, value, layout, bias, scale, options)
    return out
