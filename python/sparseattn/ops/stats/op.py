"""Attention statistics without the attention matrix: the custom ops and ``sa.attention_stats``.

Naming chain: kernels ``triton_kernels/stats.py::_attention_stats_{columns,rows}_kernel`` ->
launchers ``attention_stats_columns`` / ``attention_stats_rows`` -> custom ops
``sparseattn::attention_stats_columns`` / ``_rows`` (here) -> public :func:`attention_stats` (here)
-> CPU path :mod:`.cpu` -> oracle :func:`.naive.attention_stats`
(``sparseattn.reference.attention_stats``).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ... import _dispatch
from ..._dispatch import backend_for
from ...layout import BlockLayout
from ..attention.op import sparse_attention
from ..common import check_dtype_and_dim, check_inputs, check_layout, resolve_layout
from ..library import custom_op
from . import cpu

_tk = _dispatch.triton_kernels()
_HEAD_REDUCE = ("none", "mean", "sum")
# Layout block of the layout built when none is given (as the SDPA drop-in's).
STATS_BLOCK = (128, 128)


@custom_op("sparseattn::attention_stats_columns")
def attention_stats_columns(q: Tensor, k: Tensor, lse: Tensor, weights: Tensor, layout: List[Tensor],
                            mask: Optional[Tensor], bits: Optional[Tensor], scale: float, block_q: int, block_k: int,
                            causal_offset: Optional[int], window: Optional[int], sinks: int,
                            key_mask: Optional[Tensor], q_pos: Optional[Tensor], k_pos: Optional[Tensor],
                            q_seg: Optional[Tensor], k_seg: Optional[Tensor],
                            reduce_heads: bool) -> Tuple[Tensor, Tensor]:
    impl = _tk.attention_stats_columns if backend_for(q) == "triton" else cpu.attention_stats_columns_cpu
    return impl(q, k, lse, weights, layout, mask, bits, scale, block_q, block_k, causal_offset, window, sinks,
                key_mask, q_pos, k_pos, q_seg, k_seg, reduce_heads)


@torch.library.register_fake("sparseattn::attention_stats_columns")
def _(q, k, lse, weights, layout, *rest):
    B, H = q.shape[:2]
    n = 1 if rest[-1] else H
    return q.new_empty(B, n, k.shape[2], dtype=torch.float32), q.new_empty(B, n, k.shape[2], dtype=torch.float32)


@custom_op("sparseattn::attention_stats_rows")
def attention_stats_rows(q: Tensor, k: Tensor, lse: Tensor, key_groups: Optional[Tensor], num_groups: int,
                         layout: List[Tensor], mask: Optional[Tensor], bits: Optional[Tensor], scale: float,
                         block_q: int, block_k: int, causal_offset: Optional[int], window: Optional[int], sinks: int,
                         key_mask: Optional[Tensor], q_pos: Optional[Tensor], k_pos: Optional[Tensor],
                         q_seg: Optional[Tensor], k_seg: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    impl = _tk.attention_stats_rows if backend_for(q) == "triton" else cpu.attention_stats_rows_cpu
    return impl(q, k, lse, key_groups, num_groups, layout, mask, bits, scale, block_q, block_k, causal_offset, window,
                sinks, key_mask, q_pos, k_pos, q_seg, k_seg)


@torch.library.register_fake("sparseattn::attention_stats_rows")
def _(q, k, lse, key_groups, num_groups, layout, mask, bits, scale, block_q, block_k, *rest):
    B, H, lq = q.shape[:3]
    nq, nk = -(-lq // block_q), -(-k.shape[2] // block_k)
    return q.new_empty(B, H, lq, num_groups, dtype=torch.float32), q.new_empty(B, H, nq, nk, dtype=torch.float32)


class AttentionStats(NamedTuple):
    """What :func:`attention_stats` returns (None for a statistic not asked for); fp32."""
    column_sum: Optional[Tensor]
    column_max: Optional[Tensor]
    group_mass: Optional[Tensor]
    block_sums: Optional[Tensor]
    lse: Tensor


def _layout_args(layout: BlockLayout):
    return (layout.lists(), layout.mask, layout.bits), (*layout.block_size, layout.causal_offset, layout.window,
                                                        layout.sinks, layout.key_mask, layout.q_pos, layout.k_pos,
                                                        layout.q_seg, layout.k_seg)


def _check_vector(t, name, shapes, dtype_ok, what, device):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what} or None, got {type(t).__name__}")
    if not dtype_ok(t.dtype):
        raise TypeError(f"{name}: expected {what}, got dtype {t.dtype}")
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name}: expected shape {' or '.join(str(list(s)) for s in shapes)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (as q), got {t.device}")


def attention_stats(q: Tensor, k: Tensor, layout_or_pattern=None, *, is_causal: bool = False,
                    scale: Optional[float] = None, lse: Optional[Tensor] = None,
                    query_weights: Optional[Tensor] = None, key_groups: Optional[Tensor] = None,
                    num_groups: Optional[int] = None, column_sum: bool = True, column_max: bool = False,
                    block_sums: bool = False, head_reduce: str = "none") -> AttentionStats:
    """Statistics of the attention probabilities ``P`` of a call, in one extra pass over the same
    layout, without the ``[Lq, Lk]`` matrix: what H2O, FastV, SparseD and the visual-token methods
    read from ``output_attentions=True`` today.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (GQA; fp16, bf16, fp32; any strides).
        layout_or_pattern: the call's layout or pattern (as :func:`sparseattn.sparse_attention`),
            or None: dense, causal (top-left, as torch) with ``is_causal``.
        scale: score scale, default ``1 / sqrt(D)``.
        lse: ``[B, Hq, Lq]`` float32 from the attention call (``return_lse=True``) with the same
            layout and scale: skips the LSE pass. Otherwise the LSE pass runs (the forward kernel
            with a zero-width value).
        query_weights: ``[B, Lq]`` or ``[B, Hq, Lq]`` float: the weights ``w`` of the column sums
            (default 1; a 0 also drops the row from the column maxima).
        key_groups: int ``[B, Lk]`` or ``[B, Hq, Lk]`` (per head) with values in
            ``[0, num_groups)``: group of each key for ``group_mass`` (None: not computed).
            ``num_groups`` defaults to ``max + 1`` (a host read).
        column_sum, column_max, block_sums: which statistics to compute.
        head_reduce: "none", "mean" or "sum": reduce every statistic over the query heads (column
            statistics inside the kernel, per-head maxima then reduced like the sums).

    Returns:
        :class:`AttentionStats` with, in fp32 (dim 1 is 1 after a head reduction):
        ``column_sum [B, Hq, Lk] = sum_i w_i P_ij``, ``column_max [B, Hq, Lk] = max_{i: w_i != 0} P_ij``,
        ``group_mass [B, Hq, Lq, G] = sum_{j: group j = g} P_ij``, ``block_sums [B, Hq, nQ, nK]`` (P
        summed over each layout tile; SparseD's block importance before its mean), ``lse``.
        Deterministic (partial sums reduced in a fixed order, no atomics). Forward only.

    Example::

        >>> import torch, sparseattn as sa
        >>> q, k = torch.randn(1, 4, 200, 32), torch.randn(1, 2, 200, 32)
        >>> st = sa.attention_stats(q, k, is_causal=True, head_reduce="mean", column_max=True)
        >>> st.column_sum.shape, st.column_max.shape
        (torch.Size([1, 1, 200]), torch.Size([1, 1, 200]))
    """
    B, Hq, Hkv, Lq, Lk, D = check_inputs(q, k, k, gqa=True, names=("q", "k", "k"))
    check_dtype_and_dim(q)
    if head_reduce not in _HEAD_REDUCE:
        raise ValueError(f"head_reduce: expected one of {_HEAD_REDUCE}, got {head_reduce!r}")
    if layout_or_pattern is None:
        nq, nk = math.ceil(Lq / STATS_BLOCK[0]), math.ceil(Lk / STATS_BLOCK[1])
        layout = BlockLayout.from_block_mask(torch.ones(1, 1, nq, nk, dtype=torch.bool, device=q.device), STATS_BLOCK,
                                             (Lq, Lk), causal="top_left" if is_causal else None)
    else:
        if is_causal:
            raise ValueError("is_causal: expected False with a layout or pattern (it carries its own causal rule), "
                             "got True")
        pattern = None if isinstance(layout_or_pattern, BlockLayout) else layout_or_pattern
        layout = resolve_layout(layout_or_pattern, q, k)
        check_layout(layout, B, Hq, Lq, Lk, q.device, pattern)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if lse is None:
        zero_v = q.new_zeros(1, 1, 1, 1).expand(B, Hkv, Lk, 1)   # the forward with a 1-wide zero value: its LSE
        _, lse = sparse_attention(q, k, zero_v, layout, scale=scale, return_lse=True)
    else:
        _check_vector(lse, "lse", [(B, Hq, Lq)], lambda d: d == torch.float32, "float32 [B, Hq, Lq]", q.device)
    weights = torch.ones(1, 1, Lq, device=q.device)
    if query_weights is not None:
        _check_vector(query_weights, "query_weights", [(B, Lq), (B, Hq, Lq)], lambda d: d.is_floating_point,
                      "a float tensor", q.device)
        weights = (query_weights[:, None] if query_weights.dim() == 2 else query_weights).float()
    if key_groups is not None:
        _check_vector(key_groups, "key_groups", [(B, Lk), (B, Hq, Lk)],
                      lambda d: not d.is_floating_point and d != torch.bool, "an integer tensor", q.device)
        if num_groups is None:
            num_groups = int(key_groups.max()) + 1 if key_groups.numel() else 1
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups: expected an int >= 1, got {num_groups!r}")
        key_groups = (key_groups[:, None] if key_groups.dim() == 2 else key_groups).to(torch.int32)
    backend = backend_for(q)
    _dispatch.set_backend(backend, _dispatch.cpu_reason(q) if backend == "cpu" else None)
    (lists, mask, bits), kinds = _layout_args(layout)
    reduce = head_reduce != "none"
    csum = cmax = mass = bsums = None
    if column_sum or column_max:
        csum, cmax = attention_stats_columns(q, k, lse, weights, lists, mask, bits, scale, *kinds, reduce)
        if head_reduce == "mean":
            csum, cmax = csum / Hq, cmax / Hq
    if key_groups is not None or block_sums:
        mass, bsums = attention_stats_rows(q, k, lse, key_groups, num_groups or 1, lists, mask, bits, scale, *kinds)
        if reduce:
            mass, bsums = (t.mean(1, keepdim=True) if head_reduce == "mean" else t.sum(1, keepdim=True)
                           for t in (mass, bsums))
    return AttentionStats(csum if column_sum else None, cmax if column_max else None,
                          mass if key_groups is not None else None, bsums if block_sums else None, lse)
