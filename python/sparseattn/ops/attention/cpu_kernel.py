"""The CPU kernel of sparse attention (``cpu_kernel.cpp``): built on first use, or the reason it is not.

The CPU path (:mod:`.cpu`) runs each kind of listed tiles through this kernel when it is there:
it reads the listed key blocks in place and writes (or merges into) the output rows, where the
gather path copies the blocks and calls torch's fused CPU attention; decode's CPU path
(:mod:`..decode.cpu`) runs its ``decode`` op on the KV cache. The kernel is compiled once
per machine and torch by ``torch.utils.cpp_extension.load`` with the machine's C++ compiler (``-O3
-march=native``; ~20 s on 2 cores, cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) and needs ninja (a dependency of the package) and a torch that exports
the BLAS ``sgemm_`` (torch's x86 wheels do: MKL).

``SPARSEATTN_CPU_KERNEL=0`` keeps the gather path. A failed build (no compiler, no BLAS symbols)
is not an error: the gather path runs, a ``FallbackWarning`` says so once, and
:func:`unavailable_reason` says why.
"""
from __future__ import annotations

import os
import platform
import threading
import warnings
from typing import Optional

import torch

from ... import _config
from ..._dispatch import FallbackWarning

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernel.cpp")
_LOCK = threading.Lock()
_STATE = {}


def _flags():
    flags = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # GCC keeps to 256-bit vectors on AVX-512 machines unless told; the softmax loops ran ~1.3x
        # faster with 512 (one measurement, 2-core Xeon VM); harmless where AVX-512 is absent.
        flags.append("-mprefer-vector-width=512")
    return flags


def _build():
    from torch.utils import cpp_extension

    cpp_extension.load(name="sparseattn_cpu_attention", sources=[_SOURCE], is_python_module=False,
                       extra_cflags=_flags(), extra_ldflags=["-fopenmp"])
    if not torch.ops.sparseattn_cpu.available():
        raise RuntimeError("this torch does not export the BLAS sgemm_ the kernel calls")
    torch.library.register_fake("sparseattn_cpu::decode")(_decode_fake)
    torch.library.register_autograd("sparseattn_cpu::decode", _decode_no_backward)


def _decode_no_backward(ctx, *grads):
    """decode_attention is inference only: a backward through it raises (as through the CUDA decode
    op) instead of torch's default for ops without a formula, a warning and no gradient."""
    raise RuntimeError("sparseattn_cpu::decode: not differentiable (decode_attention is inference only)")


def _decode_fake(q, k, v, seqlens, blk_num, blk_idx, block_k, mask, scale, softcap, block_table=None):
    """The decode op's outputs for torch.compile's tracing: out ``[B, Hq, Lq, Dv]`` in q's dtype,
    lse ``[B, Hq, Lq]`` float32 (fwd and bwd run inside sparse_attention's custom op, never traced)."""
    B, Hq, Lq, _ = q.shape
    return q.new_empty(B, Hq, Lq, v.shape[-1]), q.new_empty(B, Hq, Lq, dtype=torch.float32)


def ops():
    """``torch.ops.sparseattn_cpu`` (``fwd``, ``bwd``, ``decode``) once built, or None (see
    :func:`unavailable_reason`)."""
    if not _config.flag("SPARSEATTN_CPU_KERNEL"):
        return None
    if "ok" not in _STATE:
        with _LOCK:
            if "ok" not in _STATE:
                try:
                    _build()
                    _STATE["ok"] = True
                except Exception as exc:  # no compiler, no ninja, no BLAS symbols: the gather path runs
                    _STATE["ok"], _STATE["why"] = False, f"{type(exc).__name__}: {exc}".strip()
                    warnings.warn("sparseattn: the CPU kernel (ops/attention/cpu_kernel.cpp) did not build, the "
                                  f"CPU path gathers key blocks instead (slower): {_STATE['why'][:500]}",
                                  FallbackWarning, stacklevel=2)
    return torch.ops.sparseattn_cpu if _STATE["ok"] else None


def unavailable_reason() -> Optional[str]:
    """Why the CPU kernel does not run (None when it does): disabled, or its build's error."""
    if not _config.flag("SPARSEATTN_CPU_KERNEL"):
        return "SPARSEATTN_CPU_KERNEL=0"
    ops()
    return _STATE.get("why")
