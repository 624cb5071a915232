"""Hugging Face transformers models on sparseattn's kernels: ``attn_implementation="sparseattn"``.

:func:`register` adds an attention function (transformers' ``AttentionInterface``) and a mask
function (``AttentionMaskInterface``) under one name. The mask function hands the attention
function a compact description instead of a dense ``[B, 1, Lq, Lk]`` mask:

* ``None``: no padding; the layer's own rule applies (causal from ``module.is_causal``, the
  model's sliding window from the ``sliding_window`` argument or ``module.sliding_window``),
  queries aligned to the last keys (bottom-right, as with a KV cache);
* uint8 ``[B, 1, 1, n]``, ``n <= Lk``: the 2-D padding mask of the keys (1 = the key exists),
  read as the kernels' key-padding rule, the layer's own rule on top. ``n < Lk`` happens with a
  static cache: its slots past the last query are empty, and the attention function reads only
  the first ``n`` keys (a view). (uint8 marks it as this form: transformers' masks are bool or
  float; 4-D, so that transformers hands it to the layers unchanged, also when ``generate()``
  builds a static cache's masks ahead of the forward);
* bool ``[B, 1, 1, Lk]``: the whole rule is "these keys" (bidirectional layers; the one-row
  decode mask transformers builds for a static cache): key padding, no causal rule;
* any other 4-D mask (built by transformers' ``sdpa_mask`` for what the rules above cannot say:
  packed sequences, mask overlays, chunked attention; or given to the model by the caller) is
  run as an element mask or bias by :func:`sparseattn.scaled_dot_product_attention`, with the
  reason recorded (:func:`sparseattn.last_fallback_reason`).

The attention function runs prefill (and training) through :func:`sparseattn.sparse_attention`
with the layer's pattern or a dense (causal, windowed) layout, and decode steps (at most 16
queries against more keys, no gradient) through :func:`sparseattn.decode_attention`. GQA heads
are never repeated; ``scaling`` and Gemma 2's ``softcap`` pass through.

A layer whose pattern is a :class:`sparseattn.HiP` runs HiP's own ops instead (:func:`_hip_forward`):
prefill and training :func:`sparseattn.hip_mask` + :func:`sparseattn.hip_attention` with the
padding as HiP's key padding rule (positions counted from each sequence's first real token), decode
steps :func:`sparseattn.hip_decode` with a :class:`sparseattn.HiPDecodeState` kept on the module
from one step to the next (dropped when a prefill runs, or when a step does not continue the last
one). HiP is causal by construction; non-causal layers, a model's sliding window, softcap,
attention dropout and dense 4-D masks are refused with a ValueError.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

try:
    from transformers import AttentionInterface
    from transformers import masking_utils
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # the optional extra
    raise ImportError("sparseattn.integrations.transformers needs Hugging Face transformers: "
                      "pip install \"sparseattn[hf]\" (or pip install \"transformers>=4.56,<6\")") from e

from .. import _dispatch
from ..layout import BlockLayout
from ..ops.attention.op import sparse_attention
from ..ops.attention.sdpa import fallback_reason, scaled_dot_product_attention
from ..ops.common import resolve_layout
from ..ops.decode.op import MAX_LQ, decode_attention
from ..ops.hip.config import HiP
from ..ops.hip.op import hip_attention, hip_decode, hip_mask

__all__ = ["register", "attention_forward", "mask_function", "pattern_for", "DECODE_MAX_QUERIES", "RECORD_HIP"]

DECODE_MAX_QUERIES = MAX_LQ        # a step with at most this many queries (and more keys) is decode
PREFILL_BLOCK = (128, 128)         # tiles of the dense / windowed prefill layouts (as the SDPA drop-in)
SHORT_BLOCK = (64, 64)             # ... when both lengths fit in 64: no tile rows wasted on nothing
DECODE_BLOCK = (64, 64)            # tiles of the windowed decode layout (one query block)

KEYS_DTYPE = torch.uint8           # marks the mask function's key padding mask (transformers' are bool or float)

# Tests and debugging: when True, every HiP call of a layer appends a dict to the module's
# ``sparseattn_hip_log`` list: kind ("prefill" / "decode"), the HiPMask (prefill) or the
# HiPDecodeState (decode) it used, key_padding_mask, cache_seqlens, and q, k, v, out (detached).
RECORD_HIP = False
_HIP_STATE = "_sparseattn_hip_state"       # module attribute: (HiPDecodeState, where the last step ended)

_registry: Dict[str, object] = {}                 # name -> pattern spec given to register()
_layouts: Dict[Tuple, BlockLayout] = {}           # dense / windowed layouts, built once per shape
_AND_CODE = masking_utils.and_masks(masking_utils.causal_mask_function).__code__

FOUR_D_REASON = ("a 4-D attention mask that no compact rule describes (transformers built it for packed "
                 "sequences, a mask overlay, chunked or bidirectional-window attention, a static cache's prefill "
                 "under torch.compile, or the caller passed one): run by the SDPA drop-in as an element mask or "
                 "bias, O(Lq x Lk)")


# ----------------------------------------------------------------------------- registration
def _is_pattern(obj) -> bool:
    return isinstance(obj, HiP) or callable(getattr(obj, "layout", None)) or \
        callable(getattr(obj, "layout_for", None))


def _check_pattern(p, what: str):
    if p is not None and not _is_pattern(p):
        hint = " (a BlockLayout is built for one (Lq, Lk): pass a pattern object)" if isinstance(p, BlockLayout) else ""
        raise TypeError(f"{what}: expected None, a sparseattn pattern (with layout(Lq, Lk, device) or "
                        f"layout_for(q, k)) or a sparseattn.HiP{hint}, got {type(p).__name__}")


def register(name: str = "sparseattn", pattern=None) -> str:
    """Register sparseattn with transformers under ``name``: the attention function and its mask
    function, so ``attn_implementation=name`` runs every attention layer on sparseattn's kernels.

    Args:
        name: the ``attn_implementation`` string (registering a name again replaces its pattern).
        pattern: what each layer attends to, besides the model's own rules (padding, causal, a
            model's sliding window): ``None`` (dense), one pattern object for every layer
            (``sa.PowerAttention()``, ``sa.SlidingWindow(...)``, ``sa.TopKBlocks(...)``,
            ``sa.HiP(...)``, ...), or a callable ``pattern(layer_idx, module) -> pattern | None``
            asked once per attention module (e.g. ``lambda i, m: None if i < 2 else
            sa.PowerAttention()``). Patterns of a causal layer must be causal and bottom-right
            aligned (the built-in causal patterns are). Layers with a model sliding window run that
            window: their pattern must be None. A ``sa.HiP`` runs HiP's own ops (prefill
            ``hip_attention``, decode ``hip_decode`` with a per-layer state); causal layers only.

    Returns:
        ``name``.

    Example::

        >>> import sparseattn as sa
        >>> from sparseattn.integrations import transformers as sat
        >>> sat.register("sparseattn_power", pattern=lambda i, m: None if i < 1 else sa.PowerAttention())
        'sparseattn_power'
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    if name in ("eager", "sdpa", "flex_attention") or name.startswith("flash_attention"):
        raise ValueError(f"name: expected a name of its own, got transformers' built-in {name!r}")
    if not callable(pattern):
        _check_pattern(pattern, "pattern")       # None, a pattern object, or a callable
    _registry[name] = pattern
    AttentionInterface.register(name, _attention_for(name))
    AttentionMaskInterface.register(name, mask_function)
    return name


def pattern_for(module: torch.nn.Module, name: str = "sparseattn"):
    """The pattern of this attention module under the registration ``name`` (None = dense):
    the registered pattern object, or the callable's answer for ``(module.layer_idx, module)``,
    asked once per module and kept on it."""
    spec = _registry[name]
    if spec is None or _is_pattern(spec):
        return spec
    cache = module.__dict__.get("_sparseattn_patterns")
    hit = None if cache is None else cache.get(name)
    if hit is not None and hit[0] is spec:
        return hit[1]
    p = spec(getattr(module, "layer_idx", None), module)
    _check_pattern(p, f"pattern({getattr(module, 'layer_idx', None)}, {type(module).__name__})")
    if cache is None:
        cache = module.__dict__["_sparseattn_patterns"] = {}
    cache[name] = (spec, p)
    return p


def _attention_for(name: str) -> Callable:
    def sparseattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, softcap=None, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                 sliding_window=sliding_window, softcap=softcap, pattern=pattern_for(module, name),
                                 **kwargs)
    sparseattn_attention.__qualname__ = f"sparseattn_attention[{name}]"
    return sparseattn_attention


# ----------------------------------------------------------------------------- the mask function
def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _same_function(f, g, depth: int = 0) -> bool:
    """f and g are the same code with equal closures (mask functions built by the same factory
    with the same arguments)."""
    if f is g:
        return True
    if depth > 4 or getattr(f, "__code__", None) is None or f.__code__ is not getattr(g, "__code__", None):
        return False
    cf, cg = f.__closure__ or (), g.__closure__ or ()
    if len(cf) != len(cg):
        return False
    for a, b in zip(cf, cg):
        a, b = a.cell_contents, b.cell_contents
        if isinstance(a, tuple) and isinstance(b, tuple):
            if len(a) != len(b) or not all(_same_function(x, y, depth + 1) for x, y in zip(a, b)):
                return False
        elif callable(a):
            if not _same_function(a, b, depth + 1):
                return False
        elif type(a) is not type(b) or isinstance(a, torch.Tensor) or a != b:
            return False
    return True


def _mask_kind(kw) -> Optional[str]:
    """"causal", "sliding", "bidirectional", or None (anything else: a dense mask is built)."""
    fn = kw.get("mask_function", masking_utils.causal_mask_function)
    if kw.get("use_vmap", False):          # or_mask_function / and_mask_function overlays
        return None
    if fn is getattr(masking_utils, "bidirectional_mask_function", None):   # transformers >= 5
        return "bidirectional"
    # False: packed sequences, block overlays, a caller that asks for a materialised mask (or a
    # static cache decoding). On transformers 4.x (query positions as cache_position) it means a
    # static cache or an overlay, and overlays change the mask function, checked exactly below
    # outside torch.compile.
    legacy = "cache_position" in kw
    if not kw.get("allow_is_causal_skip", True) and (not legacy or _compiling()):
        return None
    if fn is masking_utils.causal_mask_function:
        return "causal"
    size = kw.get("local_size")
    if size is not None and size == getattr(kw.get("config"), "sliding_window", None) and \
            getattr(fn, "__code__", None) is _AND_CODE:
        # Closures cannot be inspected while dynamo traces; outside it the match is checked exactly.
        if _compiling() or _same_function(fn, masking_utils.sliding_window_causal_mask_function(size)):
            return "sliding"
    return None


def _padding(mask: Optional[torch.Tensor], kv_length: int, kv_offset: int) -> Optional[torch.Tensor]:
    """The 2-D padding mask of the keys ``[kv_offset, kv_offset + kv_length)`` (positions it does
    not cover, the empty slots of a static cache, are False), bool ``[B, kv_length]``."""
    if mask is None:
        return None
    mask = mask.bool()
    missing = kv_offset + kv_length - mask.shape[-1]
    if missing > 0:
        mask = F.pad(mask, (0, missing))
    return mask[:, kv_offset:kv_offset + kv_length]


def _dense(kw) -> torch.Tensor:
    """transformers' own dense bool mask [B, 1, Lq, Lk] (the fallback)."""
    kw = dict(kw, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)   # never None
    return masking_utils.sdpa_mask(**kw)


def mask_function(**kw):
    """The mask function registered with ``AttentionMaskInterface`` (transformers calls it with
    keywords: ``batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
    attention_mask, local_size, allow_is_causal_skip, use_vmap, config, device, ...``; 4.x passes
    ``cache_position`` for the query positions). Returns ``None``, a uint8 ``[B, 1, 1, n]`` key
    padding mask (the layer's own rule on top), a bool ``[B, 1, 1, Lk]`` key mask (the whole
    rule), or transformers' dense ``[B, 1, Lq, Lk]`` bool mask for what these cannot describe (see
    the module docstring). All are 4-D or None, so transformers passes them to the layers as they
    are (``generate()`` builds the masks of a static cache ahead and hands them to the model)."""
    kind = _mask_kind(kw)
    if kind is None:
        return _dense(kw)
    batch, kv_length, kv_offset = kw["batch_size"], kw["kv_length"], kw.get("kv_offset", 0)
    if "q_length" in kw:
        q_length, q_offset = kw["q_length"], kw.get("q_offset", 0)
    else:  # transformers 4.x
        cache_position = kw["cache_position"]
        q_length, q_offset = cache_position.shape[0], cache_position[0]
    pad = _padding(kw.get("attention_mask"), kv_length, kv_offset)
    device = pad.device if pad is not None else kw.get("device", "cpu")
    if kind == "bidirectional":
        keep = pad if pad is not None else torch.ones(batch, kv_length, dtype=torch.bool, device=device)
        return keep[:, None, None, :]
    if isinstance(q_offset, torch.Tensor):      # a static cache: one host read, none while compiling
        if _compiling():
            return _dense(kw)
        q_offset = int(q_offset)
    n = q_offset + q_length - kv_offset          # the keys up to the last query's position
    if not q_length <= n <= kv_length:
        return _dense(kw)
    if pad is None and n == kv_length:
        return None
    keep = torch.ones(batch, n, dtype=torch.bool, device=device) if pad is None else pad[:, :n]
    return keep.to(KEYS_DTYPE)[:, None, None, :]


# ----------------------------------------------------------------------------- the attention function
def _rule_layout(lq: int, lk: int, causal: bool, window: Optional[int], device, block) -> BlockLayout:
    """Dense layout, bottom-right causal with an optional window; cached outside torch.compile."""
    key = (lq, lk, causal, window, str(device), block)
    if key in _layouts:
        return _layouts[key]
    bm = torch.ones(1, 1, math.ceil(lq / block[0]), math.ceil(lk / block[1]), dtype=torch.bool, device=device)
    layout = BlockLayout.from_block_mask(bm, block, (lq, lk), causal="bottom_right" if causal else None,
                                         window=window)
    if not _compiling():
        if len(_layouts) > 64:
            _layouts.clear()
        _layouts[key] = layout
    return layout


def _rule_mask(b: int, lq: int, lk: int, causal: bool, window: Optional[int], pad, device) -> torch.Tensor:
    """The same rule as a dense bool mask [B|1, 1, Lq, Lk] (the fallbacks only)."""
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    keep = (j <= i) if causal else torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal and window is not None:
        keep = keep & (i - j < window)
    keep = keep[None, None]
    return keep if pad is None else keep & pad[:, None, None, :]


def _fallback(q, k, v, mask4, causal, window, pad, pattern, scale, dropout, softcap, reason: Optional[str]):
    """sparseattn's SDPA drop-in on a dense mask (the pattern's included); records ``reason``."""
    lk, n = k.shape[2], k.shape[2]
    if mask4 is None:
        mask4 = _rule_mask(q.shape[0], q.shape[2], lk, causal, window, pad, q.device)
    else:
        if mask4.dtype != torch.bool:
            mask4 = mask4.to(q.dtype)
        if pattern is not None:
            # The pattern's queries are the last of the keys the last query sees: all of them,
            # except in a static cache (empty slots at the end). One host read finds that count.
            seen = mask4[..., -1, :] if mask4.dtype == torch.bool else \
                mask4[..., -1, :] > torch.finfo(mask4.dtype).min / 2
            seen = seen.reshape(-1, seen.shape[-1]).any(0).expand(lk)
            n = max(int(seen.nonzero().max()) + 1 if bool(seen.any()) else lk, q.shape[2])
    if pattern is not None:
        keep = F.pad(resolve_layout(pattern, q, k[:, :, :n]).to_dense_mask(), (0, lk - n))
        mask4 = mask4 & keep if mask4.dtype == torch.bool else mask4.masked_fill(~keep, float("-inf"))
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask4, dropout_p=dropout, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1], softcap=softcap)
    if reason is not None:
        own = _dispatch.last_fallback_reason()
        _dispatch.set_backend(_dispatch.last_backend(), reason if own is None else f"{reason}; {own}")
    return out


def _decode(q, k, v, pattern, window, pad, complete: bool, scale, softcap):
    """A decode step: decode_attention with the layer's pattern (or window)."""
    lq, lk = q.shape[2], k.shape[2]
    target, seqlens = pattern, None
    if pattern is None and window is not None and window < lk:
        target = _rule_layout(lq, lk, True, window, q.device, DECODE_BLOCK)
    elif pattern is not None and not callable(getattr(pattern, "decode_layout", None)):
        # a content-based pattern: its own layout from q and k
        return sparse_attention(q, k, v, pattern, scale=scale, key_padding_mask=pad, softcap=softcap)
    if pattern is not None and complete:
        # A static cache's decode row: it sits at the last key it sees (itself). Outside
        # torch.compile one host read finds that length; equal for all rows (as in generate()),
        # the cache is cut there and the pattern runs bottom-right aligned, as on a dynamic cache.
        seqlens = ((torch.arange(lk, device=q.device) + 1) * pad).amax(-1).to(torch.int32)
        if not _compiling():
            lo, hi = (int(x) for x in torch.aminmax(seqlens))
            if lo == hi >= lq:
                k, v, pad, seqlens = k[:, :, :hi], v[:, :, :hi], pad[:, :hi], None
    return decode_attention(q, k, v, target, cache_seqlens=seqlens, scale=scale, softcap=softcap,
                            key_padding_mask=pad)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None, *, pattern=None,
                      **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function contract on sparseattn (what :func:`register` installs,
    with ``pattern`` from :func:`pattern_for`).

    Args:
        module: the attention module (``is_causal``, ``sliding_window``, ``layer_idx`` are read).
        query: ``[B, Hq, Lq, D]``; key, value: ``[B, Hkv, Lk, D]`` (``Hq % Hkv == 0``, not repeated).
        attention_mask: what :func:`mask_function` returned (None, uint8 ``[B, 1, 1, n]``, bool
            ``[B, 1, 1, Lk]``), a 2-D padding mask ``[B, n]`` (read as the uint8 form), or any
            other 4-D bool / float mask (the fallback).
        scaling: score scale (default ``1 / sqrt(D)``); dropout: > 0 falls back to torch.
        sliding_window: the model's window (a query sees keys ``i - j < window``); default
            ``module.sliding_window``. softcap: Gemma 2's ``attn_logit_softcapping``.
        pattern: None (dense), a sparseattn pattern for this layer, or a ``sa.HiP`` (HiP's ops:
            :func:`_hip_forward`).
        kwargs: ``is_causal`` (default ``module.is_causal``); ``s_aux`` and ``position_bias``
            are refused (ValueError); others are ignored.

    Returns:
        ``(out [B, Lq, Hq, D], None)``: no attention weights.
    """
    for extra in ("s_aux", "position_bias"):
        if kwargs.get(extra) is not None:
            raise ValueError(f"{extra}: not supported by sparseattn's attention (use attn_implementation='eager' "
                             f"for this model), got a tensor")
    b, _, lq, _ = query.shape
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    if window is not None and pattern is not None:
        raise ValueError(f"pattern: layer {getattr(module, 'layer_idx', None)} has the model's sliding window "
                         f"{window}, which it keeps; expected None as its pattern, got {pattern!r}")
    if isinstance(pattern, HiP):
        return _hip_forward(module, query, key, value, attention_mask, pattern, scaling, dropout, softcap, causal)
    mask4 = pad = None
    complete = False
    if attention_mask is not None:
        if attention_mask.dim() == 2 or (attention_mask.dim() == 4 and attention_mask.dtype == KEYS_DTYPE and
                                         tuple(attention_mask.shape[1:3]) == (1, 1)):
            n = attention_mask.shape[-1]
            if n > key.shape[2]:
                raise ValueError(f"attention_mask: expected at most {key.shape[2]} keys (Lk), got shape "
                                 f"{tuple(attention_mask.shape)}")
            key, value = key[:, :, :n], value[:, :, :n]    # the filled slots of a static cache (a view)
            pad = attention_mask.reshape(attention_mask.shape[0], n).bool()
        elif attention_mask.dim() == 4 and attention_mask.dtype == torch.bool and \
                tuple(attention_mask.shape[1:]) == (1, 1, key.shape[2]):
            pad, complete = attention_mask[:, 0, 0, :].expand(b, key.shape[2]), True
            causal, window = False, None                   # the keys it lists are the whole rule
        else:
            mask4 = attention_mask
    lk = key.shape[2]
    if window is not None and not causal:
        raise ValueError(f"sliding_window: expected a causal layer with a window, got is_causal=False and "
                         f"window {window}")
    if window is not None and window >= lk:
        window = None                                      # it never cuts
    if mask4 is not None:
        out = _fallback(query, key, value, mask4, causal, window, pad, pattern, scaling, dropout, softcap,
                        FOUR_D_REASON)
        return out.transpose(1, 2).contiguous(), None
    if fallback_reason(query, key, value, None, dropout) is not None:   # dropout, dtype, head dim: torch
        out = _fallback(query, key, value, None, causal, window, pad, pattern, scaling, dropout, softcap, None)
        return out.transpose(1, 2).contiguous(), None
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if lq <= DECODE_MAX_QUERIES and lk > lq and (causal or lq == 1) and not grad:
        out = _decode(query, key, value, pattern, window, pad, complete, scaling, softcap)
    else:
        if pattern is None:
            block = SHORT_BLOCK if max(lq, lk) <= SHORT_BLOCK[0] else PREFILL_BLOCK
            layout = _rule_layout(lq, lk, causal, window, query.device, block)
        else:
            layout = resolve_layout(pattern, query, key)
            if causal and layout.q_pos is None and layout.causal_offset != lk - lq:
                raise ValueError(f"pattern: layer {getattr(module, 'layer_idx', None)} is causal; expected a "
                                 f"causal pattern aligned bottom-right (causal offset {lk - lq}), got {pattern!r} "
                                 f"with causal offset {layout.causal_offset}")
        out = sparse_attention(query, key, value, layout, scale=scaling, key_padding_mask=pad, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------- HiP layers
def _hip_padding(layer, attention_mask, key, value):
    """(key, value cut to the filled slots, padding bool [B, n] or None, cache_seqlens int32 [B]
    or None) from the mask forms a HiP layer accepts; ValueError for the others."""
    if attention_mask is None:
        return key, value, None, None
    b, lk = attention_mask.shape[0], key.shape[2]
    if attention_mask.dim() == 2 or (attention_mask.dim() == 4 and attention_mask.dtype == KEYS_DTYPE and
                                     tuple(attention_mask.shape[1:3]) == (1, 1)):
        n = attention_mask.shape[-1]
        if n > lk:
            raise ValueError(f"attention_mask: expected at most {lk} keys (Lk), got shape "
                             f"{tuple(attention_mask.shape)}")
        return key[:, :, :n], value[:, :, :n], attention_mask.reshape(b, n).bool(), None
    if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool and \
            tuple(attention_mask.shape[1:]) == (1, 1, lk):
        # a static cache's decode row: the keys it sees are the filled slots; its position is
        # the last of them (computed on the device)
        pad = attention_mask[:, 0, 0, :]
        seqlens = ((torch.arange(lk, device=key.device) + 1) * pad).amax(-1).to(torch.int32)
        return key, value, pad, seqlens
    raise ValueError(f"attention_mask: layer {layer} runs HiP (sa.HiP), which takes a padding mask only; expected "
                     f"None, a 2-D padding mask or sparseattn's key mask, got a {attention_mask.dim()}-D "
                     f"{attention_mask.dtype} mask of shape {tuple(attention_mask.shape)} (packed sequences, mask "
                     f"overlays, a static cache's prefill under torch.compile, or a caller's 4-D mask: run this "
                     f"layer without HiP)")


def _log(module, **entry):
    if RECORD_HIP:
        log = module.__dict__.setdefault("sparseattn_hip_log", [])
        log.append({n: (t.detach() if isinstance(t, torch.Tensor) else t) for n, t in entry.items()})


def _hip_forward(module, q, k, v, attention_mask, hip: HiP, scale, dropout, softcap, causal):
    """A layer whose pattern is ``hip``: prefill / training through hip_mask + hip_attention
    (the layer's decode state dropped), decode steps through :func:`_hip_decode_step`."""
    layer = getattr(module, "layer_idx", None)
    if not causal:
        raise ValueError(f"pattern: layer {layer} is not causal; HiP (sa.HiP) is causal by construction (the queries "
                         f"are the last positions of the keys): expected a causal decoder layer, got is_causal=False")
    if softcap is not None:
        raise ValueError(f"softcap: HiP (sa.HiP) has no logit softcap; expected None on layer {layer}, got {softcap} "
                         f"(give this layer the pattern None)")
    if dropout:
        raise ValueError(f"dropout: HiP (sa.HiP) has no attention dropout; expected 0.0 on layer {layer}, got "
                         f"{dropout} (model.eval(), or attention_dropout=0 in the config)")
    k, v, pad, seqlens = _hip_padding(layer, attention_mask, k, v)
    lq, lk = q.shape[2], k.shape[2]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if lq <= DECODE_MAX_QUERIES and lk > lq and not grad:
        out = _hip_decode_step(module, q, k, v, hip, pad, seqlens, scale)
    else:
        if seqlens is not None:   # a static cache's one-row mask with a gradient: the keys up to the row
            raise ValueError(f"attention_mask: layer {layer} runs HiP; a one-row static-cache mask is for decode "
                             f"steps without gradient, got one with query length {lq} and a gradient")
        module.__dict__.pop(_HIP_STATE, None)          # a new prefill: the next decode step starts afresh
        mask = hip_mask(q.detach(), k.detach(), hip, scale=scale, key_padding_mask=pad)
        out = hip_attention(q, k, v, hip, mask, scale=scale, key_padding_mask=pad)
        if not _compiling():
            _log(module, kind="prefill", mask=mask, key_padding_mask=pad, cache_seqlens=None, q=q, k=k, v=v, out=out)
    return out.transpose(1, 2).contiguous(), None


@torch.compiler.disable
def _hip_decode_step(module, q, k, v, hip: HiP, pad, seqlens, scale):
    """One decode step of a HiP layer: sa.hip_decode with the state the module kept from the
    previous step, if this step continues it (the same batch and heads, its rows right after the
    last step's: ``Lk - Lq`` keys before them on a dynamic cache, ``cache_seqlens - Lq`` on a static
    one); else a fresh state (a refresh). Runs outside torch.compile (a graph break): the state is
    Python data and the continuity check reads the lengths on the host."""
    if seqlens is not None:
        # A static cache: read only the slots up to the longest row (one host read); when every
        # row sits at the same length, the step is the dynamic cache's (the same Lk, the same
        # round count of the mask search).
        lo, hi = (int(x) for x in torch.aminmax(seqlens))
        k, v, pad = k[:, :, :hi], v[:, :, :hi], pad[:, :hi]
        seqlens = None if lo == hi else seqlens
    lq, lk = q.shape[2], k.shape[2]
    kept = module.__dict__.get(_HIP_STATE)
    state = None
    if kept is not None:
        prev, end = kept
        if prev.hip == hip and tuple(prev.indices.shape[:2]) == tuple(q.shape[:2]) and prev.recent_q.shape[-1] == \
                q.shape[-1]:
            if seqlens is None:
                state = prev if end == lk - lq else None
            elif isinstance(end, torch.Tensor) and end.shape == seqlens.shape and bool((end == seqlens - lq).all()):
                state = prev
    out, new = hip_decode(q, k, v, hip, cache_seqlens=seqlens, state=state, scale=scale, key_padding_mask=pad)
    module.__dict__[_HIP_STATE] = (new, lk if seqlens is None else seqlens)
    _log(module, kind="decode", state=new, key_padding_mask=pad, cache_seqlens=seqlens, q=q, k=k, v=v, out=out)
    return out
