"""Block-sparse attention over a BlockLayout: the custom ops and the public ``sparse_attention``.

Naming chain: kernel ``triton_kernels/attention.py::_sparse_attention_fwd_kernel`` -> launcher
``sparseattn.triton_kernels.attention.sparse_attention_fwd`` -> custom op
``sparseattn::sparse_attention_fwd`` (here, with its fake and autograd) -> public
:func:`sparse_attention` (here) -> CPU path :mod:`.cpu` -> oracle :func:`.naive.sparse_attention`
(``sparseattn.reference.sparse_attention``); likewise ``_bwd`` for the backward.

The custom ops dispatch to the Triton launchers (CUDA tensors, or CPU tensors when the Triton
interpreter is on) or to the PyTorch CPU path. The layout travels as its ten list tensors
(``BlockLayout.lists()``), its tile bitmasks, element mask and in-block kinds.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ... import _dispatch
from ..._dispatch import backend_for
from ...layout import BlockLayout
from ..common import check_dtype_and_dim, check_inputs, check_layout, resolve_layout
from . import cpu

_tk = _dispatch.triton_kernels()


@torch.library.custom_op("sparseattn::sparse_attention_fwd", mutates_args=())
def sparse_attention_fwd(q: Tensor, k: Tensor, v: Tensor, layout: List[Tensor], mask: Optional[Tensor],
                         bias: Optional[Tensor], bits: Optional[Tensor], scale: float, block_q: int, block_k: int,
                         causal_offset: Optional[int], window: Optional[int], sinks: int) -> Tuple[Tensor, Tensor]:
    impl = _tk.sparse_attention_fwd if backend_for(q) == "triton" else cpu.sparse_attention_fwd_cpu
    return impl(q, k, v, layout, mask, bias, bits, scale, block_q, block_k, causal_offset, window, sinks)


@sparse_attention_fwd.register_fake
def _(q, k, v, layout, mask, bias, bits, scale, block_q, block_k, causal_offset, window, sinks):
    B, H, lq, d = q.shape
    return q.new_empty(B, H, lq, d), q.new_empty(B, H, lq, dtype=torch.float32)


@torch.library.custom_op("sparseattn::sparse_attention_bwd", mutates_args=())
def sparse_attention_bwd(do: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         lse: Tensor, layout: List[Tensor], mask: Optional[Tensor], bias: Optional[Tensor],
                         bits: Optional[Tensor], scale: float, block_q: int, block_k: int,
                         causal_offset: Optional[int], window: Optional[int],
                         sinks: int) -> Tuple[Tensor, Tensor, Tensor]:
    impl = _tk.sparse_attention_bwd if backend_for(q) == "triton" else cpu.sparse_attention_bwd_cpu
    return impl(do, dlse, q, k, v, out, lse, layout, mask, bias, bits, scale, block_q, block_k, causal_offset,
                window, sinks)


@sparse_attention_bwd.register_fake
def _(do, dlse, q, k, v, out, lse, layout, mask, bias, bits, scale, block_q, block_k, causal_offset, window, sinks):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, layout, mask, bias, bits, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, bias, bits, *layout)
    ctx.params = params


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, bias, bits, *layout = ctx.saved_tensors
    dout = dout.contiguous()  # autograd may hand in stride-0 or transposed gradients
    dlse = None if dlse is None else dlse.contiguous()
    dq, dk, dv = sparse_attention_bwd(dout, dlse, q, k, v, out, lse, layout, mask, bias, bits, *ctx.params)
    return (dq, dk, dv, [None] * len(layout)) + (None,) * (3 + len(ctx.params))


torch.library.register_autograd("sparseattn::sparse_attention_fwd", _backward, setup_context=_setup_context)


def run(q, k, v, layout: BlockLayout, bias, scale):
    """The fused op on a checked layout; records the backend (and why, off the kernels)."""
    backend = backend_for(q)
    _dispatch.set_backend(backend, _dispatch.cpu_reason(q) if backend == "cpu" else None)
    return sparse_attention_fwd(q, k, v, layout.lists(), layout.mask, bias, layout.bits, scale,
                                *layout.block_size, layout.causal_offset, layout.window, layout.sinks)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                     scale: Optional[float] = None, return_lse: bool = False):
    """Block-sparse attention: each query block attends only to the key blocks ``layout`` lists.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B|1, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA/MQA, K/V are not
            repeated; a K/V batch of 1 is shared by the batch, as FlexAttention allows, read with
            stride 0); float16, bfloat16 or float32; D up to 256; any strides.
        layout: a :class:`BlockLayout` built for ``seq_lens=(Lq, Lk)``, lists of shape
            ``[B|1, Hq|1, ...]``, or a pattern: a static one (``.layout(Lq, Lk, device)``) or a
            content-based one (``.layout_for(q, k)``, built on the device from q and k).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of each row.

    Returns:
        out ``[B, Hq, Lq, D]`` (q's dtype), and with ``return_lse`` lse ``[B, Hq, Lq]`` float32
        (natural log). A row with no visible key gives 0 and lse -inf. Differentiable in q, k, v
        (and through lse).

    Example::

        >>> import torch, sparseattn as sa
        >>> q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
        >>> bm = torch.rand(1, 1, 4, 4) < 0.5
        >>> layout = sa.BlockLayout.from_block_mask(bm, block_size=64, seq_lens=(256, 256))
        >>> out = sa.sparse_attention(q, k, v, layout)
    """
    if isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor) and q.dim() == 4 \
            and k.dim() == 4 and v.dim() == 4 and q.shape[0] > 1 and k.shape[0] == v.shape[0] == 1:
        k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])  # read with stride 0
    B, Hq, _, Lq, Lk, D = check_inputs(q, k, v, gqa=True)
    check_dtype_and_dim(q)
    pattern = None if isinstance(layout, BlockLayout) else layout
    layout = resolve_layout(layout, q, k)
    check_layout(layout, B, Hq, Lq, Lk, q.device, pattern)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out, lse = run(q, k, v, layout, None, scale)
    return (out, lse) if return_lse else out
