"""Output allocation shared by every launcher and the CPU path.

With ``SPARSEATTN_NAN_FILL=1`` (the tests set it) fresh float outputs are filled with NaN, so an
element a kernel forgets to write fails loudly instead of passing with stale memory."""
from __future__ import annotations

import os

import torch


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    if t.is_floating_point() and os.environ.get("SPARSEATTN_NAN_FILL") == "1":
        t.fill_(float("nan"))
    return t
