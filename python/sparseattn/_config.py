"""Every ``SPARSEATTN_*`` environment variable, in one table, read through :func:`get`.

Variables are read at each use (not cached at import) so that a test or a benchmark can change
one for a single call; nothing else in the package reads ``os.environ`` for them.

========================== ========= ========================================================
variable                   default   meaning
========================== ========= ========================================================
SPARSEATTN_CPU_PATH        ``0``     ``1``: CPU tensors take the PyTorch CPU path even when the
                                     Triton interpreter is on (the interpreter is for tests)
SPARSEATTN_CPU_KERNEL      ``1``     ``0``: the CPU path gathers key blocks and calls torch's fused
                                     CPU attention instead of its C++ kernel (built on first use)
SPARSEATTN_CONFIG          (unset)   pin one kernel config, ``BLOCK_M=128,BLOCK_N=64,num_warps=8,
                                     num_stages=3``, for reproducible benchmarks
SPARSEATTN_AUTOTUNE        ``1``     ``0``: no timing, every kernel runs its first fitting config
SPARSEATTN_GPU_LAYOUT      ``1``     ``0``: build layouts of CUDA masks with torch ops instead
                                     of the CUDA extension's layout builder
SPARSEATTN_NAN_FILL        ``0``     ``1``: fill fresh kernel outputs with NaN (tests: an
                                     unwritten element fails loudly)
SPARSEATTN_BUILD_CUDA      ``auto``  build time (``setup.py``): ``auto`` / ``0`` / ``1``, build the
                                     CUDA extension; at run time it only explains a missing one
SPARSEATTN_CUDA_ARCHS      ``80;90a`` build time (``setup.py``): CUDA architectures of the extension
SPARSEATTN_CMAKE_BUILD_DIR (derived) build time (``setup.py``): CMake build directory
========================== ========= ========================================================

``setup.py`` cannot import the package it builds, so it reads the three build-time variables
itself; they are listed here so that this table is the one place a user looks.
"""
from __future__ import annotations

import os
from typing import Optional

DEFAULTS = {
    "SPARSEATTN_CPU_PATH": "0",
    "SPARSEATTN_CPU_KERNEL": "1",
    "SPARSEATTN_CONFIG": "",
    "SPARSEATTN_AUTOTUNE": "1",
    "SPARSEATTN_GPU_LAYOUT": "1",
    "SPARSEATTN_NAN_FILL": "0",
    "SPARSEATTN_BUILD_CUDA": "auto",
    "SPARSEATTN_CUDA_ARCHS": "80;90a",
    "SPARSEATTN_CMAKE_BUILD_DIR": "",
}


def get(name: str) -> str:
    """The value of ``name`` (one of :data:`DEFAULTS`), stripped, or its default."""
    if name not in DEFAULTS:
        raise KeyError(f"{name}: not a sparseattn variable (expected one of {sorted(DEFAULTS)})")
    return os.environ.get(name, DEFAULTS[name]).strip()


def flag(name: str) -> bool:
    """A 0/1 variable as a bool (anything but ``0`` and empty is on)."""
    return get(name) not in ("0", "")


def text(name: str) -> Optional[str]:
    """A free-form variable, or None when unset or empty."""
    return get(name) or None
