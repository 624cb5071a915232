"""Output allocation shared by every launcher and the CPU path, and the launchers' device guard.

With ``SPARSEATTN_NAN_FILL=1`` (the tests set it) fresh float outputs are filled with NaN, so an
element a kernel forgets to write fails loudly instead of passing with stale memory."""
from __future__ import annotations

import contextlib

import torch

from . import _config


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    if t.is_floating_point() and _config.flag("SPARSEATTN_NAN_FILL"):
        t.fill_(float("nan"))
    return t


def on_device(t: torch.Tensor):
    """Context making ``t``'s CUDA device the current one for a launch: Triton launches on the
    current device (and its current stream), so tensors on cuda:1 while cuda:0 is current would
    otherwise run on the wrong GPU. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
