"""Float64 oracle of :func:`sparseattn.lightning_attention`: the step-by-step recurrence."""
from __future__ import annotations

import math
from typing import Optional

import torch


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                        dtype: torch.dtype = torch.float64):
    """Oracle of :func:`sparseattn.lightning_attention`: the step-by-step recurrence in ``dtype``
    (default float64), ``S_t = lambda S_{t-1} + k_t^T v_t`` from ``S_{-1} = S0`` (or zeros),
    ``o_t = scale q_t S_t``, with ``lambda_h = exp(-slopes[h])`` (1 when slopes is None).

    Args:
        q, k: ``[B, H, L, Dk]``; v: ``[B, H, L, Dv]``; slopes ``[H]`` or None; scale default
            ``1 / sqrt(Dk)``; initial_state ``[B, H, Dk, Dv]`` or None.
        dtype: compute dtype (state included); pass the inputs' dtype for a same-precision baseline.

    Returns:
        (o ``[B, H, L, Dv]``, final state ``[B, H, Dk, Dv]``), both in ``dtype``. Differentiable.

    Example::

        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> o, s = lightning_attention(q, k, v, torch.tensor([0.5, 0.1]))
        >>> o.dtype, s.shape
        (torch.float64, torch.Size([1, 2, 16, 16]))
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, H, L, Dk = q.shape
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    state = (initial_state.to(dtype) if initial_state is not None
             else torch.zeros(B, H, Dk, v.shape[-1], dtype=dtype, device=q.device))
    lam = None if slopes is None else torch.exp(-slopes.reshape(H).to(dtype)).view(1, H, 1, 1)
    outs = []
    for t in range(L):
        if lam is not None:
            state = lam * state
        state = state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], state) * scale)
    o = torch.stack(outs, 2) if outs else q.new_empty(B, H, 0, v.shape[-1])
    return o, state
