"""``sa.patch_sdpa()``: route ``torch.nn.functional.scaled_dot_product_attention`` to sparseattn's
drop-in, for code that calls torch's function itself (timm, diffusers, ``nn.MultiheadAttention``,
one's own training loop).

The patch replaces one attribute, ``torch.nn.functional.scaled_dot_product_attention``, for the
whole process (every thread). Code that looks the name up when it calls (``F.scaled_dot_product_attention(...)``,
``torch.nn.functional.scaled_dot_product_attention(...)``, torch's own ``multi_head_attention_forward``)
gets the drop-in; a reference taken before patching
(``from torch.nn.functional import scaled_dot_product_attention`` at import time) keeps calling
torch's function.

Calls the drop-in does not take (dropout, float64, D > 256, ...: see
:func:`sparseattn.scaled_dot_product_attention`) and inputs it does not accept (nested tensors,
tensor subclasses such as DTensor) go to torch's original function, which sparseattn took when it
was imported (:data:`.sdpa.TORCH_SDPA`), never to the patched name: no recursion.
:func:`sparseattn.last_backend` and :func:`sparseattn.last_fallback_reason` say which path ran.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F

from ... import _dispatch
from .sdpa import TORCH_SDPA, scaled_dot_product_attention

_lock = threading.Lock()
_calls_on = False      # patch_sdpa() called as a function (idempotent) and not undone by unpatch_sdpa()
_depth = 0             # open ``with sa.patch_sdpa():`` blocks
_saved = None          # what torch.nn.functional held when the patch went in


def _torch_only(query, key, value) -> Optional[str]:
    """Why torch's original must take these inputs (ones the drop-in's checks would refuse but
    torch's function takes), or None."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if isinstance(t, torch.Tensor):
            if t.is_nested:
                return f"nested tensor {name} (torch's own function takes it)"
            if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
                return f"tensor subclass {type(t).__name__} as {name} (torch's own function takes it)"
    return None


def patched_scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         scale=None, enable_gqa=False, *, softcap=None, alibi_slopes=None):
    """What ``torch.nn.functional.scaled_dot_product_attention`` is while :func:`patch_sdpa` is on:
    :func:`sparseattn.scaled_dot_product_attention`, except for nested tensors and tensor
    subclasses, which go to torch's original function."""
    reason = _torch_only(query, key, value)
    if reason is not None:
        if softcap is not None or alibi_slopes is not None:
            raise ValueError(f"softcap, alibi_slopes: not available on torch's function, which these inputs take "
                             f"({reason})")
        _dispatch.set_backend("torch", reason)
        return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                        softcap=softcap, alibi_slopes=alibi_slopes)


def _apply() -> None:
    """Install or restore, from the state (call under _lock)."""
    global _saved
    want = _calls_on or _depth > 0
    installed = F.scaled_dot_product_attention is patched_scaled_dot_product_attention
    if want and not installed:
        _saved = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = patched_scaled_dot_product_attention
    elif not want and installed:
        F.scaled_dot_product_attention = _saved if _saved is not None else TORCH_SDPA
        _saved = None


class SdpaPatch:
    """What :func:`patch_sdpa` returns: the patch is on from the call; used as a context manager,
    it is undone when the ``with`` block ends (an exception too), unless an enclosing block or a
    plain ``patch_sdpa()`` call still holds it."""

    def __init__(self, enable: bool):
        global _calls_on
        self.enable, self._owns_call, self._entered = enable, False, False
        if enable:
            with _lock:
                self._owns_call = not _calls_on     # this call switched the patch on
                _calls_on = True
                _apply()

    def __enter__(self) -> "SdpaPatch":
        global _calls_on, _depth
        if self.enable and not self._entered:
            with _lock:
                if self._owns_call:                  # the block, not the call, holds the patch now
                    _calls_on, self._owns_call = False, False
                _depth += 1
                self._entered = True
                _apply()
        return self

    def __exit__(self, *exc) -> bool:
        global _depth
        if self._entered:
            with _lock:
                self._entered = False
                _depth = max(0, _depth - 1)
                _apply()
        return False

    @property
    def active(self) -> bool:
        """True while ``torch.nn.functional.scaled_dot_product_attention`` is sparseattn's."""
        return is_sdpa_patched()


def patch_sdpa(enable: bool = True) -> SdpaPatch:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to
    :func:`sparseattn.scaled_dot_product_attention` (process-wide).

    Two forms:

    * context manager: ``with sa.patch_sdpa(): ...`` restores torch's function when the block
      ends, also on an exception; blocks nest (only the outermost end restores);
    * call: ``sa.patch_sdpa()`` (or ``sa.patch_sdpa(enable=True)``) switches it on until
      :func:`unpatch_sdpa`; calling it again is a no-op (one ``unpatch_sdpa()`` undoes any number
      of calls), and ``with`` blocks inside it leave it on.

    ``enable=False`` does nothing (``with sa.patch_sdpa(enable=use_sparseattn): ...``).

    What the drop-in does not take (``dropout_p > 0``, float64, D > 256, a float mask that
    requires grad, nested tensors, tensor subclasses) runs torch's original function; CPU tensors
    outside the Triton interpreter run torch's CPU SDPA as the drop-in always does.
    :func:`sparseattn.last_backend` / :func:`sparseattn.last_fallback_reason` tell which path
    ran. Only the attribute of ``torch.nn.functional`` is replaced: a reference taken earlier
    (``from torch.nn.functional import scaled_dot_product_attention``) still calls torch's.

    Example::

        >>> import torch, torch.nn.functional as F, sparseattn as sa
        >>> q = k = v = torch.randn(1, 2, 64, 16)
        >>> with sa.patch_sdpa():
        ...     out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # sparseattn's drop-in
        >>> ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # torch's again
        >>> bool(torch.allclose(out, ref, atol=1e-5))
        True
    """
    if not isinstance(enable, bool):
        raise TypeError(f"enable: expected a bool, got {type(enable).__name__}")
    return SdpaPatch(enable)


def unpatch_sdpa() -> None:
    """Undo :func:`patch_sdpa` called as a function: torch's function is back unless a
    ``with sa.patch_sdpa():`` block is still open (that block restores it when it ends).
    A no-op when nothing is patched."""
    global _calls_on
    with _lock:
        _calls_on = False
        _apply()


def is_sdpa_patched() -> bool:
    """True while ``torch.nn.functional.scaled_dot_product_attention`` is sparseattn's drop-in."""
    return F.scaled_dot_product_attention is patched_scaled_dot_product_attention
