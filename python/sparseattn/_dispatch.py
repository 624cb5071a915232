"""Backend choice per call, and why a call left the fused kernels.

Every public op ends its dispatch with :func:`set_backend`: the path that ran, and for a path
other than the fused kernels the reason. :func:`last_backend` and :func:`last_fallback_reason`
are per thread. The first time a reason occurs in a process it is reported once with
``warnings.warn(..., FallbackWarning)``, so users learn they are off the fast path (tests turn it
into an error with ``pytest.warns`` / ``warnings.simplefilter("error", FallbackWarning)``).
"""
from __future__ import annotations

import sys
import threading
import warnings
from typing import Optional

import torch

from . import _config

try:
    from . import triton_kernels as _tk
except ImportError:  # triton not installed: only the CPU paths are available
    _tk = None


class FallbackWarning(UserWarning):
    """A call ran outside sparseattn's fused kernels; the message says why
    (:func:`last_fallback_reason` returns the same reason)."""


_state = threading.local()
_reported = set()
_lock = threading.Lock()

BACKENDS = ("triton", "cpu", "cuda", "torch")


def last_backend() -> Optional[str]:
    """Which path ran the last attention call of this thread:

    * ``"triton"``: the fused Triton kernels (CUDA, or CPU under the Triton interpreter);
    * ``"cpu"``: sparseattn's CPU path (its C++ CPU kernel reads only the listed key blocks, or
      without it they are gathered for torch's fused CPU attention);
    * ``"cuda"``: the CUDA extension's decode kernels (``decode_attention``);
    * ``"torch"``: ``torch.nn.functional.scaled_dot_product_attention`` (a documented fallback);
    * ``None``: nothing ran yet in this thread.
    """
    return getattr(_state, "backend", None)


def last_fallback_reason() -> Optional[str]:
    """Why the last attention call of this thread did not run sparseattn's fused kernels
    (Triton, or the CUDA extension for decode), or None when it did."""
    return getattr(_state, "reason", None)


def set_backend(name: str, reason: Optional[str] = None) -> None:
    """Record the path of this call (one of :data:`BACKENDS`) and, when it is not the fast path
    (the CPU path, torch, or an exact but slower masked route through the kernels), why. A reason
    is warned about the first time it occurs in the process."""
    _state.backend = name
    _state.reason = reason
    if reason is not None and not torch.compiler.is_compiling():   # (a lock cannot be traced)
        with _lock:
            first = reason not in _reported
            _reported.add(reason)
        if first:
            warnings.warn(f"sparseattn: off the fused fast path ({name} backend): {reason} "
                          "(reported once per reason)", FallbackWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """warnings' stacklevel of the first frame outside sparseattn (the user's call)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("sparseattn."):
        frame, level = frame.f_back, level + 1
    return level


def interpreter_on() -> bool:
    """True when the Triton kernels run through the interpreter (``TRITON_INTERPRET=1`` was set
    before they were imported)."""
    return _tk is not None and _tk.INTERPRET


def cpu_reason(q: torch.Tensor) -> Optional[str]:
    """Why CPU tensor ``q`` does not take the (interpreted) Triton kernels, or None when it does.

    bf16 CPU tensors take the CPU path when the interpreter's bf16 ``tl.dot`` is wrong (Triton
    3.6's multiplies raw bit patterns): probed once with a tiny dot, so a fixed interpreter (or
    the tests' shim) sends bf16 to the kernels."""
    if not interpreter_on():
        return "CPU tensors (the Triton kernels need CUDA, or TRITON_INTERPRET=1 for tests)"
    if q.dtype == torch.bfloat16:
        from .triton_kernels.probe import interpreter_bf16_dot_ok

        if not interpreter_bf16_dot_ok():
            return "bfloat16 CPU tensors (the Triton interpreter's bf16 dot is wrong)"
    if _config.flag("SPARSEATTN_CPU_PATH"):
        return "SPARSEATTN_CPU_PATH=1"
    return None


def backend_for(q: torch.Tensor) -> str:
    """'triton' or 'cpu': where the custom ops run for this input."""
    if q.is_cuda:
        if _tk is None:
            raise RuntimeError("sparseattn: CUDA tensors need triton, which is not installed (pip install triton)")
        return "triton"
    return "cpu" if cpu_reason(q) is not None else "triton"


def triton_kernels():
    """The kernel package (``sparseattn.triton_kernels``); None without triton."""
    return _tk
