"""Lightning attention: linear attention with per-head decay, chunked (Lightning Attention-2).

Public ``lightning_attention`` (training / prefill), ``lightning_attention_step`` (decode) and
``lightning_slopes``; the custom ops ``sparseattn::lightning_attention_fwd`` / ``_bwd`` / ``_step``
dispatch to the Triton launchers (``sparseattn.triton_kernels.lightning``) or to the PyTorch CPU
path :mod:`.cpu` (the same chunked algorithm and the same three-pass backward, in PyTorch ops).
Oracle: ``sparseattn.reference.lightning_attention`` (float64 step-by-step recurrence).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ... import _dispatch
from ..._dispatch import backend_for
from ..common import MAX_HEAD_DIM, SUPPORTED_DTYPES, check_inputs
from ..library import custom_op
from .cpu import lightning_attention_bwd_cpu, lightning_attention_step_cpu, lightning_pass_cpu

try:
    from ...triton_kernels import lightning as _tkl
except ImportError:  # triton not installed: only the CPU path is available
    _tkl = None

__all__ = ["lightning_attention", "lightning_attention_step", "lightning_slopes"]



# ----------------------------------------------------------------------------- custom ops
@custom_op("sparseattn::lightning_attention_fwd", differentiable=True)
def lightning_attention_fwd(q: Tensor, k: Tensor, v: Tensor, slopes: Optional[Tensor],
                            initial_state: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    if backend_for(q) == "triton":
        return _tkl.lightning_attention_fwd(q, k, v, slopes, initial_state, scale)
    o, final = lightning_pass_cpu(q, k, v, slopes, initial_state, scale, scale, 1.0)
    return o.to(q.dtype), final


@torch.library.register_fake("sparseattn::lightning_attention_fwd")
def _(q, k, v, slopes, initial_state, scale):
    B, H, L, Dk = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, Dk, v.shape[-1], dtype=torch.float32)


@custom_op("sparseattn::lightning_attention_bwd")
def lightning_attention_bwd(do: Tensor, dsf: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                            slopes: Optional[Tensor], initial_state: Optional[Tensor],
                            scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend_for(q) == "triton":
        dq, dk, dv, ds0 = _tkl.lightning_attention_bwd(do, dsf, q, k, v, slopes, initial_state, scale)
    else:
        dq, dk, dv, ds0 = lightning_attention_bwd_cpu(do, dsf, q, k, v, slopes, initial_state, scale)
    ds0 = q.new_empty(0) if initial_state is None else ds0.to(initial_state.dtype).contiguous()
    return dq, dk, dv, ds0


@torch.library.register_fake("sparseattn::lightning_attention_bwd")
def _(do, dsf, q, k, v, slopes, initial_state, scale):
    dense = torch.contiguous_format
    ds0 = q.new_empty(0) if initial_state is None else torch.empty_like(initial_state, memory_format=dense)
    return (torch.empty_like(q, memory_format=dense), torch.empty_like(k, memory_format=dense),
            torch.empty_like(v, memory_format=dense), ds0)


def _setup_context(ctx, inputs, output):
    q, k, v, slopes, initial_state, scale = inputs
    ctx.save_for_backward(q, k, v, slopes, initial_state)
    ctx.scale = scale


def _backward(ctx, do, dsf):
    q, k, v, slopes, initial_state = ctx.saved_tensors
    do = do.contiguous()  # autograd may hand in stride-0 or transposed gradients
    dsf = None if dsf is None else dsf.contiguous()
    dq, dk, dv, ds0 = lightning_attention_bwd(do, dsf, q, k, v, slopes, initial_state, ctx.scale)
    return dq, dk, dv, None, (ds0 if initial_state is not None else None), None


torch.library.register_autograd("sparseattn::lightning_attention_fwd", _backward, setup_context=_setup_context)


@custom_op("sparseattn::lightning_attention_step")
def lightning_attention_step_op(q: Tensor, k: Tensor, v: Tensor, state: Tensor, slopes: Optional[Tensor],
                                scale: float) -> Tuple[Tensor, Tensor]:
    if backend_for(q) == "triton":
        return _tkl.lightning_attention_step(q, k, v, state, slopes, scale)
    return lightning_attention_step_cpu(q, k, v, state, slopes, scale)


@torch.library.register_fake("sparseattn::lightning_attention_step")
def _(q, k, v, state, slopes, scale):
    B, H, Dk = q.shape
    return q.new_empty(B, H, v.shape[-1]), q.new_empty(B, H, Dk, v.shape[-1], dtype=torch.float32)


# ----------------------------------------------------------------------------- public API
# Lightning has no GQA: its state is per head, [B, H, Dk, Dv], and q, k, v share H.
_NO_GQA = "(lightning_attention has no GQA: repeat K/V heads with k.repeat_interleave(Hq // Hkv, 1) first)"

def _set_backend(q: Tensor) -> None:
    backend = backend_for(q)
    _dispatch.set_backend(backend, _dispatch.cpu_reason(q) if backend == "cpu" else None)


def lightning_slopes(num_heads: int, layer_idx: Optional[int] = None, num_layers: Optional[int] = None,
                     device=None) -> Tensor:
    """Per-head decay rates of TransNormerLLM / MiniMax-01 (``lambda_h = exp(-slopes[h])``).

    The ALiBi geometric sequence ``2^(-8 (h+1) / n)`` for a power-of-two ``n`` heads (interleaved
    for other counts); with ``layer_idx`` and ``num_layers`` scaled by
    ``1 - layer_idx / (num_layers - 1) + 1e-5`` (``1 + 1e-5`` for one layer), so deeper layers
    decay less.

    Returns: float32 ``[num_heads]``.

    Example::

        >>> import sparseattn as sa
        >>> sa.lightning_slopes(8)[:2]
        tensor([0.5000, 0.2500])
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads: expected an int >= 1, got {num_heads!r}")
    if (layer_idx is None) != (num_layers is None):
        raise ValueError(f"layer_idx, num_layers: expected both or neither, got {layer_idx!r} and {num_layers!r}")

    def power_of_2(n: int) -> List[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    def slopes(n: int) -> List[float]:
        if math.log2(n).is_integer():
            return power_of_2(n)
        closest = 2 ** math.floor(math.log2(n))
        return power_of_2(closest) + slopes(2 * closest)[0::2][: n - closest]

    out = torch.tensor(slopes(num_heads), dtype=torch.float32, device=device)
    if num_layers is not None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected an int >= 1, got {num_layers!r}")
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer_idx: expected an int in [0, {num_layers}), got {layer_idx!r}")
        factor = 1 + 1e-5 if num_layers == 1 else 1 - layer_idx / (num_layers - 1) + 1e-5
        out = out * factor
    return out


def check_slopes(slopes, H: int, device) -> Optional[Tensor]:
    """slopes: None or a float tensor of H non-negative rates ([H] or MiniMax's [H, 1, 1])."""
    if slopes is None:
        return None
    if not isinstance(slopes, Tensor):
        raise TypeError(f"slopes: expected a torch.Tensor of shape [{H}] or None, got {type(slopes).__name__}")
    if not slopes.is_floating_point():
        raise TypeError(f"slopes: expected a floating point dtype, got {slopes.dtype}")
    if slopes.numel() != H or (slopes.dim() > 1 and slopes.shape[0] != H):
        raise ValueError(f"slopes: expected shape [{H}] (one rate per head), got {list(slopes.shape)}")
    if slopes.device != device:
        raise ValueError(f"slopes: expected device {device} (as q), got {slopes.device}")
    if slopes.requires_grad:
        raise ValueError("slopes: expected a constant (no requires_grad); decay rates are not trained")
    slopes = slopes.reshape(H).to(torch.float32).contiguous()
    if not torch.compiler.is_compiling():
        bad = (slopes < 0) | ~torch.isfinite(slopes)
        if bool(bad.any()):
            raise ValueError(f"slopes: expected finite rates >= 0 (lambda = exp(-slope) <= 1), got "
                             f"{slopes[bad][:4].tolist()}")
    return slopes


def _check_state(state, name: str, B: int, H: int, Dk: int, Dv: int, device) -> None:
    if not isinstance(state, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [{B}, {H}, {Dk}, {Dv}], got {type(state).__name__}")
    if not state.is_floating_point():
        raise TypeError(f"{name}: expected a floating point dtype, got {state.dtype}")
    if tuple(state.shape) != (B, H, Dk, Dv):
        raise ValueError(f"{name}: expected shape [B, H, Dk, Dv] = [{B}, {H}, {Dk}, {Dv}], got {list(state.shape)}")
    if state.device != device:
        raise ValueError(f"{name}: expected device {device} (as q), got {state.device}")


def check_dims(q, Dk: int, Dv: int) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q: expected float16, bfloat16 or float32, got {q.dtype} (sparseattn.reference "
                        "computes in float64)")
    for name, d in (("q", Dk), ("v", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: expected head dim in [1, {MAX_HEAD_DIM}], got {d}")


def lightning_attention(q: Tensor, k: Tensor, v: Tensor, slopes: Optional[Tensor] = None,
                        scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                        output_final_state: bool = False):
    """Lightning attention: causal linear attention with per-head exponential decay, no softmax.

    For head h with ``lambda_h = exp(-slopes[h])``::

        o_t = scale * sum_{j <= t} lambda_h^(t-j) (q_t . k_j) v_j + scale * lambda_h^(t+1) q_t S0
        S_L = lambda_h^L S0 + sum_j lambda_h^(L-1-j) k_j^T v_j

    Args:
        q, k: ``[B, H, L, Dk]``; v: ``[B, H, L, Dv]``; float16, bfloat16 or float32, one dtype; Dk,
            Dv <= 256; any strides; any L >= 1.
        slopes: ``[H]`` decay rates >= 0 (constants, e.g. :func:`lightning_slopes`); None = no decay.
        scale: default ``1 / sqrt(Dk)``.
        initial_state: optional ``S0 [B, H, Dk, Dv]``, differentiable, in any float dtype
            independent of q's (fp32 with fp16 / bf16 inputs is the usual case: a final state fed
            back). It is read into the fp32 state (exactly; float64 is rounded to fp32); its
            gradient is computed in fp32 and returned in its own dtype.
        output_final_state: also return ``S_L``.

    Returns:
        o ``[B, H, L, Dv]`` in q's dtype; with ``output_final_state`` also the final state
        ``[B, H, Dk, Dv]`` float32. Differentiable in q, k, v, initial_state and the final state.
        The state stays fp32 through the whole walk, for fp16 and bf16 inputs too: the final
        state (and the gradient of S0) is as accurate as an fp32 recurrence over the same inputs.

    Example::

        >>> import torch, sparseattn as sa
        >>> q, k, v = (torch.randn(1, 4, 300, 64) for _ in range(3))
        >>> o, state = sa.lightning_attention(q, k, v, sa.lightning_slopes(4), output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([1, 4, 300, 64]), torch.Size([1, 4, 64, 64]))
    """
    B, H, _, L, _, Dk = check_inputs(q, k, v, gqa=False, same_value_dim=False, why_same_heads=_NO_GQA)
    Dv = v.shape[-1]
    check_dims(q, Dk, Dv)
    if L < 1:
        raise ValueError(f"q: expected a sequence length >= 1, got {L}")
    slopes = check_slopes(slopes, H, q.device)
    if initial_state is not None:
        _check_state(initial_state, "initial_state", B, H, Dk, Dv, q.device)
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    _set_backend(q)
    o, final = lightning_attention_fwd(q, k, v, slopes, initial_state, scale)
    return (o, final) if output_final_state else o


def lightning_attention_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, slopes: Optional[Tensor] = None,
                             scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """One decode step of :func:`lightning_attention` (the recurrent form).

    ``S' = lambda S + k^T v``, ``o = scale q S'``: feeding tokens one by one from
    ``state = initial_state`` (or zeros) reproduces the chunked forward.

    Args:
        q, k: ``[B, H, Dk]``; v: ``[B, H, Dv]``; one dtype (float16, bfloat16, float32).
        state: ``[B, H, Dk, Dv]``, e.g. the fp32 final state of a prefill (any float dtype,
            read into fp32; the update is computed in fp32 whatever q's dtype).
        slopes: ``[H]`` decay rates >= 0 or None; scale: default ``1 / sqrt(Dk)``.

    Returns:
        (o ``[B, H, Dv]`` in q's dtype, new state ``[B, H, Dk, Dv]`` float32). The input state is
        not modified. Runs the Triton step kernel; a call that needs gradients runs PyTorch ops.

    Example::

        >>> import torch, sparseattn as sa
        >>> q, k, v = (torch.randn(1, 4, 50, 64) for _ in range(3))
        >>> o, state = sa.lightning_attention(q, k, v, output_final_state=True)
        >>> o_t, state = sa.lightning_attention_step(q[:, :, -1], k[:, :, -1], v[:, :, -1], state)
    """
    for t, n in zip((q, k, v), ("q", "k", "v")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{n}: expected 3 dims [B, H, D] (one token), got shape {tuple(t.shape)}")
    check_inputs(q[:, :, None], k[:, :, None], v[:, :, None], gqa=False, same_value_dim=False,
                 why_same_heads=_NO_GQA)
    B, H, Dk = q.shape
    Dv = v.shape[-1]
    check_dims(q, Dk, Dv)
    _check_state(state, "state", B, H, Dk, Dv, q.device)
    slopes = check_slopes(slopes, H, q.device)
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, state)):
        _dispatch.set_backend("torch", "lightning_attention_step with inputs that require grad (PyTorch ops, "
                              "differentiable)")
        return lightning_attention_step_cpu(q, k, v, state, slopes, scale)
    _set_backend(q)
    return lightning_attention_step_op(q, k, v, state, slopes, scale)
