"""Custom ops (torch.library): autograd and fake-tensor registration, so torch.compile sees one op.

``sparseattn::sparse_attention_fwd`` / ``sparseattn::sparse_attention_bwd`` dispatch to the Triton
launchers (CUDA tensors, or CPU tensors when the Triton interpreter is on) or to the PyTorch CPU
path. The layout travels as its ten list tensors (``BlockLayout.lists()``), its tile bitmasks,
element mask and in-block kinds.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import cpu

try:
    from . import triton_kernels as _tk
except ImportError:  # triton not installed: only the CPU path is available
    _tk = None


def interpreter_on() -> bool:
    return _tk is not None and _tk.INTERPRET


def backend_for(q: Tensor) -> str:
    """'triton' or 'cpu': where the custom ops run for this input.

    bf16 CPU tensors take the CPU path even with the interpreter on: the interpreter cannot run
    bf16 ``tl.dot`` (it multiplies raw bit patterns)."""
    if q.is_cuda:
        if _tk is None:
            raise RuntimeError("sparseattn: CUDA tensors need triton, which is not installed (pip install triton)")
        return "triton"
    if interpreter_on() and q.dtype != torch.bfloat16 and os.environ.get("SPARSEATTN_CPU_PATH") != "1":
        return "triton"
    return "cpu"


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
