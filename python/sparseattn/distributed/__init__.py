"""Sequence parallelism over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each rank of ``group`` holds one contiguous piece of the sequence, in rank order (rank 0 holds the
first tokens). Pieces may have different lengths (a world size that does not divide the sequence
is fine); every rank must pass the same batch, heads, head dims and dtype.

* :func:`lightning_attention_sp` (LASP-2): the only collective of the forward is one all-gather of
  each rank's ``[B, H, Dk, Dv]`` fp32 chunk state (plus its length): its size does not depend on
  L. Each rank combines the states of the ranks before it with the decay (a prefix scan), then runs
  the chunked kernel on its piece with that as the initial state. The backward is symmetric: one
  all-gather of each rank's gradient of its incoming state, a suffix combine, and the local
  backward with the result as the gradient of its chunk state.
* :func:`attention_sp` (LASP-2H, softmax layers of hybrid models): one all-gather of K and V (one
  tensor), local causal attention of the rank's queries against the keys up to its last position
  (bottom-right aligned: global offsets), and the gradients of K and V returned to their owners
  with one reduce-scatter. A tiny all-gather of the piece lengths comes first.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..layout import BlockLayout
from ..ops.attention.op import sparse_attention
from ..ops.attention.sdpa import SDPA_BLOCK, scaled_dot_product_attention
from ..ops.common import check_inputs
from ..ops.lightning.op import check_dims, check_slopes, lightning_attention_bwd, lightning_attention_fwd

__all__ = ["attention_sp", "lightning_attention_sp"]

_LEN_SPLIT = float(1 << 20)  # a length travels as two fp32 numbers (exact up to 2^44 tokens)


def _group_info(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("group: torch.distributed is not initialized (call torch.distributed.init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather(t: Tensor, world: int, group) -> Tensor:
    """[*] -> [world, *] (contiguous), one collective."""
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return torch.stack(out)


# ----------------------------------------------------------------------------- LASP-2
def _decay_pow(slopes: Optional[Tensor], n, H: int, device) -> Tensor:
    """lambda^n per head, [1, H, 1, 1] fp32 (n: a number or a [N] tensor -> [1, H, N, 1])."""
    if slopes is None:
        return torch.ones(1, H, 1, 1, device=device)
    if isinstance(n, Tensor):
        return torch.exp(-slopes.view(1, H, 1, 1) * n.to(torch.float32).view(1, 1, -1, 1))
    return torch.exp(-slopes.view(1, H, 1, 1) * float(n))


class _LASP2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, scale, group):
        world, rank = _group_info(group)
        B, H, L, Dk = q.shape
        Dv = v.shape[-1]
        pos = torch.arange(L, device=q.device)
        # This piece's own state: sum_j lambda^(L-1-j) k_j^T v_j (exponents of position differences).
        kw = k.to(torch.float32) * _decay_pow(slopes, L - 1 - pos, H, q.device)
        local = kw.transpose(-1, -2) @ v.to(torch.float32)
        meta = torch.tensor([L // _LEN_SPLIT, L % _LEN_SPLIT], dtype=torch.float32, device=q.device)
        got = _all_gather(torch.cat([local.flatten(), meta]), world, group)
        lens = [int(r[-2].item() * _LEN_SPLIT + r[-1].item()) for r in got]
        states = got[:, :-2].view(world, B, H, Dk, Dv)
        s_in = torch.zeros(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
        for r in range(rank):  # prefix combine with the decay over each earlier piece
            s_in = _decay_pow(slopes, lens[r], H, q.device) * s_in + states[r]
        ctx.save_for_backward(q, k, v, slopes, s_in)
        ctx.info = (scale, group, world, rank, lens)
        if L == 0:
            return q.new_empty(B, H, 0, Dv)
        o, _ = lightning_attention_fwd(q, k, v, slopes, s_in, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, slopes, s_in = ctx.saved_tensors
        scale, group, world, rank, lens = ctx.info
        B, H, L, Dk = q.shape
        do = do.contiguous()
        pos = torch.arange(L, device=q.device)
        # Gradient of this piece's incoming state: scale * sum_t lambda^(t+1) q_t^T do_t.
        qw = q.to(torch.float32) * (_decay_pow(slopes, pos + 1, H, q.device) * scale)
        d_in = qw.transpose(-1, -2) @ do.to(torch.float32)
        d_ins = _all_gather(d_in, world, group)
        d_local = torch.zeros_like(d_in)
        for r in range(world - 1, rank, -1):  # suffix combine: what later pieces need of this state
            d_local = _decay_pow(slopes, lens[r], H, q.device) * d_local + d_ins[r]
        if L == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None
        dq, dk, dv, _ = lightning_attention_bwd(do, d_local if rank < world - 1 else None, q, k, v, slopes,
                                                s_in, scale)
        return dq, dk, dv, None, None, None


def lightning_attention_sp(q_local: Tensor, k_local: Tensor, v_local: Tensor, slopes: Optional[Tensor] = None,
                           scale: Optional[float] = None, group=None) -> Tensor:
    """Sequence-parallel :func:`sparseattn.lightning_attention` (LASP-2).

    Args:
        q_local, k_local: ``[B, H, L_r, Dk]``; v_local: ``[B, H, L_r, Dv]``: this rank's contiguous
            piece of the sequence (rank order = sequence order; ``L_r`` may differ between ranks).
        slopes: ``[H]`` decay rates >= 0 or None; scale: default ``1 / sqrt(Dk)``.
        group: process group, default the default group.

    Returns:
        ``[B, H, L_r, Dv]``: the rows of the single-process output for this rank's tokens.
        Differentiable in q, k, v (the backward does one all-gather too).

    Example (every rank, after ``torch.distributed.init_process_group``)::

        >>> o_local = sa.distributed.lightning_attention_sp(  # needs a process group  # doctest: +SKIP
        ...     q_local, k_local, v_local, sa.lightning_slopes(H))
    """
    B, H, _, L, _, Dk = check_inputs(q_local, k_local, v_local, gqa=False, same_value_dim=False,
                                      names=("q_local", "k_local", "v_local"))
    check_dims(q_local, Dk, v_local.shape[-1])
    slopes = check_slopes(slopes, H, q_local.device)
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    return _LASP2.apply(q_local, k_local, v_local, slopes, scale, group)


# ----------------------------------------------------------------------------- LASP-2H
class _GatherSequence(torch.autograd.Function):
    """[B, H, L_r, D] per rank -> [B, H, sum L_r, D] (all-gather, padded to the longest piece);
    backward: one reduce-scatter of the gradient back to the owners."""

    @staticmethod
    def forward(ctx, x, lens: List[int], group):
        world, rank = _group_info(group)
        ctx.info = (lens, group, world, rank)
        pad = max(lens) - x.shape[2]
        got = _all_gather(F.pad(x, (0, 0, 0, pad)), world, group)               # [W, B, H, maxL, D]
        return torch.cat([got[r][:, :, :lens[r]] for r in range(world)], 2)

    @staticmethod
    def backward(ctx, g):
        lens, group, world, rank = ctx.info
        longest = max(lens)
        parts = list(torch.split(g, lens, dim=2))
        parts = [F.pad(p, (0, 0, 0, longest - p.shape[2])).contiguous() for p in parts]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, op=dist.ReduceOp.SUM, group=group)
        return out[:, :, :lens[rank]], None, None


def _causal_attention(q, k, v, scale, enable_gqa):
    """Causal attention of the last Lq positions against Lk >= Lq keys (bottom-right aligned)."""
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    if q.dtype in (torch.float16, torch.bfloat16, torch.float32) and D <= 256 and v.shape[-1] == D:
        bq, bk = SDPA_BLOCK
        bm = torch.ones(1, 1, math.ceil(Lq / bq), math.ceil(Lk / bk), dtype=torch.bool, device=q.device)
        layout = BlockLayout.from_block_mask(bm, SDPA_BLOCK, (Lq, Lk), causal="bottom_right")
        return sparse_attention(q, k, v, layout, scale=scale)
    keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)  # documented fallback
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=enable_gqa)


def attention_sp(q_local: Tensor, k_local: Tensor, v_local: Tensor, is_causal: bool = True,
                 scale: Optional[float] = None, group=None, enable_gqa: bool = False) -> Tensor:
    """Sequence-parallel softmax attention (LASP-2H, the softmax layers of hybrid models).

    Args:
        q_local: ``[B, Hq, L_r, D]``; k_local, v_local: ``[B, Hkv, L_r, D]`` / ``[B, Hkv, L_r, Dv]``:
            this rank's contiguous piece of the sequence (rank order; ``L_r`` may differ).
        is_causal: global causal mask (query at global position i sees keys j <= i).
        scale: default ``1 / sqrt(D)``; enable_gqa: ``Hq`` a multiple of ``Hkv``.
        group: process group, default the default group.

    Returns:
        ``[B, Hq, L_r, Dv]``, this rank's rows of the single-process attention. Differentiable;
        dK and dV return to their owners with one reduce-scatter.

    Example (every rank)::

        >>> o_local = sa.distributed.attention_sp(  # needs a process group  # doctest: +SKIP
        ...     q_local, k_local, v_local, is_causal=True)
    """
    _, _, _, L, _, D = check_inputs(q_local, k_local, v_local, gqa=enable_gqa, same_value_dim=False,
                                     names=("q_local", "k_local", "v_local"))
    world, rank = _group_info(group)
    lens = [int(x) for x in _all_gather(torch.tensor([L], device=q_local.device), world, group).flatten()]
    Dk = k_local.shape[-1]
    kv = _GatherSequence.apply(torch.cat([k_local, v_local], -1), lens, group)
    k_all, v_all = kv[..., :Dk], kv[..., Dk:]
    if L == 0:
        return q_local.new_empty(*q_local.shape[:3], v_local.shape[-1]) + 0 * kv.sum()
    if is_causal:
        end = sum(lens[:rank + 1])
        return _causal_attention(q_local, k_all[:, :, :end], v_all[:, :, :end], scale, enable_gqa)
    return scaled_dot_product_attention(q_local, k_all, v_all, scale=scale, enable_gqa=enable_gqa)
