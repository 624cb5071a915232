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
from ..common import ScoreOptions, check_dtype_and_dim, check_inputs, check_layout, check_score_options, resolve_layout
from ..library import custom_op
from . import cpu

_tk = _dispatch.triton_kernels()


@custom_op("sparseattn::sparse_attention_fwd", differentiable=True)
def sparse_attention_fwd(q: Tensor, k: Tensor, v: Tensor, layout: List[Tensor], mask: Optional[Tensor],
                         bias: Optional[Tensor], bits: Optional[Tensor], scale: float, block_q: int, block_k: int,
                         causal_offset: Optional[int], window: Optional[int], sinks: int, key_mask: Optional[Tensor],
                         key_bias: Optional[Tensor], alibi: Optional[Tensor], q_pos: Optional[Tensor],
                         k_pos: Optional[Tensor], softcap: Optional[float], q_seg: Optional[Tensor],
                         k_seg: Optional[Tensor], key_group: Optional[Tensor],
                         group_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    args = (q, k, v, layout, mask, bias, bits, scale, block_q, block_k, causal_offset, window, sinks, key_mask,
            key_bias, alibi, q_pos, k_pos, softcap, q_seg, k_seg, key_group, group_bias)
    if backend_for(q) == "triton":
        return _tk.sparse_attention_fwd(*args)
    out, lse = cpu.sparse_attention_fwd_cpu(*args)
    return out, lse.double()   # the op's LSE is float64 (the kernels': see triton_kernels.attention.fwd_epilogue)


@torch.library.register_fake("sparseattn::sparse_attention_fwd")
def _(q, k, v, layout, mask, bias, bits, scale, block_q, block_k, causal_offset, window, sinks, *options):
    B, H, lq, _ = q.shape
    return q.new_empty(B, H, lq, v.shape[-1]), q.new_empty(B, H, lq, dtype=torch.float64)


@custom_op("sparseattn::sparse_attention_bwd")
def sparse_attention_bwd(do: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         lse: Tensor, layout: List[Tensor], mask: Optional[Tensor], bias: Optional[Tensor],
                         bits: Optional[Tensor], scale: float, block_q: int, block_k: int,
                         causal_offset: Optional[int], window: Optional[int], sinks: int, key_mask: Optional[Tensor],
                         key_bias: Optional[Tensor], alibi: Optional[Tensor], q_pos: Optional[Tensor],
                         k_pos: Optional[Tensor], softcap: Optional[float], q_seg: Optional[Tensor],
                         k_seg: Optional[Tensor], key_group: Optional[Tensor],
                         group_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    impl = _tk.sparse_attention_bwd
    if backend_for(q) != "triton":
        impl, lse = cpu.sparse_attention_bwd_cpu, lse.float()    # exact: the CPU path's LSE is float32
    return impl(do, dlse, q, k, v, out, lse, layout, mask, bias, bits, scale, block_q, block_k, causal_offset,
                window, sinks, key_mask, key_bias, alibi, q_pos, k_pos, softcap, q_seg, k_seg, key_group, group_bias)


@torch.library.register_fake("sparseattn::sparse_attention_bwd")
def _(do, dlse, q, k, v, out, lse, layout, *rest):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, layout, mask, bias, bits, scale, bq, bk, causal_offset, window, sinks, *options = inputs
    key_mask, key_bias, alibi, q_pos, k_pos, softcap, q_seg, k_seg, key_group, group_bias = options
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, bias, bits, key_mask, key_bias, alibi, q_pos, k_pos, q_seg, k_seg,
                          key_group, group_bias, *layout)
    ctx.params = (scale, bq, bk, causal_offset, window, sinks)
    ctx.softcap = softcap


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, bias, bits, key_mask, key_bias, alibi, q_pos, k_pos, q_seg, k_seg, key_group, \
        group_bias, *layout = ctx.saved_tensors
    dout = dout.contiguous()  # autograd may hand in stride-0 or transposed gradients
    dlse = None if dlse is None else dlse.float().contiguous()   # the op's LSE is float64; the kernels' dLSE float32
    dq, dk, dv = sparse_attention_bwd(dout, dlse, q, k, v, out, lse, layout, mask, bias, bits, *ctx.params, key_mask,
                                      key_bias, alibi, q_pos, k_pos, ctx.softcap, q_seg, k_seg, key_group, group_bias)
    return (dq, dk, dv, [None] * len(layout)) + (None,) * 19  # mask .. group_bias


torch.library.register_autograd("sparseattn::sparse_attention_fwd", _backward, setup_context=_setup_context)


@custom_op("sparseattn::paged_sparse_attention_fwd")
def paged_sparse_attention_fwd(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layout: List[Tensor],
                               mask: Optional[Tensor], bits: Optional[Tensor], scale: float, block_q: int,
                               block_k: int, causal_offset: Optional[int], window: Optional[int], sinks: int,
                               key_mask: Optional[Tensor], key_bias: Optional[Tensor], alibi: Optional[Tensor],
                               softcap: Optional[float]) -> Tuple[Tensor, Tensor]:
    args = (layout, mask, None, bits, scale, block_q, block_k, causal_offset, window, sinks, key_mask, key_bias, alibi,
            None, None, softcap)
    if backend_for(q) == "triton":
        return _tk.sparse_attention_fwd(q, k_pages, v_pages, *args, block_table=block_table)
    # the CPU path reads a logical copy (decode's own CPU path reads the pages directly)
    k, v = (t[block_table.long()].flatten(1, 2).transpose(1, 2) for t in (k_pages, v_pages))
    out, lse = cpu.sparse_attention_fwd_cpu(q, k, v, *args)
    return out, lse.double()


@torch.library.register_fake("sparseattn::paged_sparse_attention_fwd")
def _(q, k_pages, v_pages, block_table, *rest):
    B, H, lq, _ = q.shape
    return q.new_empty(B, H, lq, v_pages.shape[-1]), q.new_empty(B, H, lq, dtype=torch.float64)


def paged_sparse_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layout: BlockLayout,
                           scale: float, *, key_padding_mask: Optional[Tensor] = None,
                           key_bias: Optional[Tensor] = None, softcap: Optional[float] = None,
                           alibi_slopes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Forward-only sparse attention over a paged K/V cache (what decode's Triton path runs):
    ``k_pages`` / ``v_pages`` ``[num_pages, page_size, Hkv, D]`` read through ``block_table`` int32
    ``[B, max_pages]`` (no gather copy on the kernels), ``layout`` in logical positions for
    ``seq_lens=(Lq, max_pages * page_size)``. Inputs are checked by the caller
    (:func:`sparseattn.decode_attention`); options as :func:`sparse_attention`. Returns (out, lse)."""
    B, Hq, _, _ = q.shape
    page_size = k_pages.shape[1]
    lk = block_table.shape[1] * page_size
    if k_pages.stride(0) != page_size * k_pages.stride(1) or v_pages.stride(0) != page_size * v_pages.stride(1):
        k_pages, v_pages = k_pages.contiguous(), v_pages.contiguous()  # pages must hold consecutive rows
    options = check_score_options(B, Hq, lk, q.device, key_padding_mask=key_padding_mask, key_bias=key_bias,
                                  softcap=softcap, alibi_slopes=alibi_slopes)
    if key_padding_mask is not None:
        layout = layout.with_key_padding(key_padding_mask)
    if layout.q_pos is not None:
        raise ValueError("layout: expected a layout without positions for a paged cache, got one from from_positions")
    backend = backend_for(q)
    _dispatch.set_backend(backend, _dispatch.cpu_reason(q) if backend == "cpu" else None)
    out, lse = paged_sparse_attention_fwd(q, k_pages, v_pages, block_table, layout.lists(), layout.mask, layout.bits,
                                          scale, *layout.block_size, layout.causal_offset, layout.window, layout.sinks,
                                          layout.key_mask, options.key_bias, options.alibi, options.softcap)
    return out, lse.float()


def run(q, k, v, layout: BlockLayout, bias, scale, options: ScoreOptions = ScoreOptions()):
    """The fused op on a checked layout (its key mask and positions included) with the checked
    score options (``options.key_mask`` / positions are ignored: they come from the layout);
    records the backend (and why, off the kernels). Returns (out, lse float32); the op's float64
    LSE stays saved for the backward."""
    backend = backend_for(q)
    _dispatch.set_backend(backend, _dispatch.cpu_reason(q) if backend == "cpu" else None)
    out, lse = sparse_attention_fwd(q, k, v, layout.lists(), layout.mask, bias, layout.bits, scale, *layout.block_size,
                                    layout.causal_offset, layout.window, layout.sinks, layout.key_mask,
                                    options.key_bias, options.alibi, layout.q_pos, layout.k_pos, options.softcap,
                                    layout.q_seg, layout.k_seg, options.key_group, options.group_bias)
    return out, lse.float()


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                     scale: Optional[float] = None, return_lse: bool = False, *,
                     key_padding_mask: Optional[torch.Tensor] = None, key_bias: Optional[torch.Tensor] = None,
                     softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None):
    """Block-sparse attention: each query block attends only to the key blocks ``layout`` lists.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B|1, Hkv, Lk, D]``, v: ``[B|1, Hkv, Lk, Dv]`` with ``Hq % Hkv == 0``
            (GQA/MQA, K/V are not repeated; a K/V batch of 1 is shared by the batch, as FlexAttention
            allows, read with stride 0); float16, bfloat16 or float32; D and Dv up to 256 (Dv may
            differ from D, e.g. MLA's 192 / 128); any strides.
        layout: a :class:`BlockLayout` built for ``seq_lens=(Lq, Lk)``, lists of shape
            ``[B|1, Hq|1, ...]``, or a pattern: a static one (``.layout(Lq, Lk, device)``) or a
            content-based one (``.layout_for(q, k)``, built on the device from q and k).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of each row.
        key_padding_mask: bool ``[B, Lk]``, True = the key exists (Hugging Face's attention_mask):
            one bit per key read in the kernel, tiles of padding only skipped
            (:meth:`BlockLayout.with_key_padding`, no host read).
        key_bias: float ``[B|1, Hq|1, Lk]`` added to every row's scores after scaling (natural-log
            units; ``-inf`` knocks a key out): O(Lk) instead of an ``[Lq, Lk]`` bias. No gradient
            (one that requires grad is a ValueError).
        softcap: ``softcap * tanh(score / softcap)`` after scaling, before the biases and masks
            (Gemma 2), with its exact gradient.
        alibi_slopes: float32 ``[Hq]`` or ``[B, Hq]``: adds ``-slope * |i + Lk - Lq - j|`` for query
            row i and key j (FlashAttention's definition, whatever the layout's causal alignment).
            No gradient to the slopes.

    Scores are ``s = q.k * scale``, then softcap, then ALiBi, key_bias and the layout's bias are
    added, then the masks (layout, key padding) apply.

    Returns:
        out ``[B, Hq, Lq, Dv]`` (q's dtype), and with ``return_lse`` lse ``[B, Hq, Lq]`` float32
        (natural log). A row with no visible key (or only ``-inf`` scores) gives 0 and lse -inf.
        Differentiable in q, k, v (and through lse); the backward is deterministic (no atomics:
        two runs give bitwise-equal gradients).

    Example::

        >>> import torch, sparseattn as sa
        >>> q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
        >>> bm = torch.rand(1, 1, 4, 4) < 0.5
        >>> layout = sa.BlockLayout.from_block_mask(bm, block_size=64, seq_lens=(256, 256))
        >>> out = sa.sparse_attention(q, k, v, layout)
        >>> pad = torch.arange(256)[None] < 200                    # the last 56 keys are padding
        >>> out = sa.sparse_attention(q, k, v, layout, key_padding_mask=pad, softcap=30.0)
    """
    if isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor) and q.dim() == 4 \
            and k.dim() == 4 and v.dim() == 4 and q.shape[0] > 1 and k.shape[0] == v.shape[0] == 1:
        k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])  # read with stride 0
    B, Hq, _, Lq, Lk, D = check_inputs(q, k, v, gqa=True, same_value_dim=False)
    check_dtype_and_dim(q)
    check_dtype_and_dim(v, "v")
    options = check_score_options(B, Hq, Lk, q.device, key_padding_mask=key_padding_mask, key_bias=key_bias,
                                  softcap=softcap, alibi_slopes=alibi_slopes)
    pattern = None if isinstance(layout, BlockLayout) else layout
    layout = resolve_layout(layout, q, k)
    check_layout(layout, B, Hq, Lq, Lk, q.device, pattern)
    if key_padding_mask is not None:
        layout = layout.with_key_padding(key_padding_mask)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out, lse = run(q, k, v, layout, None, scale, options)
    return (out, lse) if return_lse else out
