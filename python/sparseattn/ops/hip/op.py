"""HiP attention: the custom ops and the public ``sa.hip_mask``, ``sa.hip_attention``,
``sa.hip_decode`` and ``sa.hip_recall``.

Naming chain: kernels ``triton_kernels/hip.py::_hip_mask_kernel`` / ``_hip_attention_fwd_kernel``
/ ``_hip_attention_bwd_kernel`` -> launchers ``hip_mask`` / ``hip_attention_fwd`` /
``hip_attention_bwd`` -> custom ops ``sparseattn::hip_mask`` / ``hip_attention_fwd`` /
``hip_attention_bwd`` (here) -> public functions (here) -> CPU path :mod:`.cpu` -> oracles
:mod:`.naive` (``sparseattn.reference.hip_mask`` / ``hip_attention``). The algorithm and every
decision that departs from hip-attention's code: :mod:`.config`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from ... import _dispatch
from ..._dispatch import backend_for
from ..common import check_dtype_and_dim, check_inputs, check_score_options
from ..library import custom_op
from . import cpu, naive
from .config import HiP, HiPMask, key_offsets, num_rounds, query_positions, rounds_per_batch

_tk = _dispatch.triton_kernels()
MAX_DECODE_LQ = 16


def _kernels():
    from ...triton_kernels import hip
    return hip


@custom_op("sparseattn::hip_mask")
def hip_mask_op(q: Tensor, k: Tensor, q_pos: Tensor, kpm: Optional[Tensor], k_off: Optional[Tensor],
                rounds_b: Optional[Tensor], mask_k: int, bq: int, stride_q: int, bk: int, stride_k: int, window: int,
                sinks: int, scale: float, rounds: int) -> Tuple[Tensor, Tensor]:
    hip = HiP(mask_k, bq, stride_q, bk, stride_k, window, sinks)
    if backend_for(q) == "triton":
        return _kernels().hip_mask(q, k, q_pos, hip, scale, rounds, bq, kpm, k_off, rounds_b)
    return cpu.hip_mask_cpu(q, k, q_pos, hip, scale, rounds, bq, kpm, k_off, rounds_b)


@torch.library.register_fake("sparseattn::hip_mask")
def _(q, k, q_pos, kpm, k_off, rounds_b, mask_k, bq, stride_q, bk, stride_k, *rest):
    B, H, Lq, _ = q.shape
    nq = -(-Lq // bq)
    return q.new_empty(B, H, nq, mask_k // bk, dtype=torch.int32), q.new_empty(B, H, nq, dtype=torch.int32)


def _hip_of(mask_k, bq, bk, window, sinks) -> HiP:
    return HiP(mask_k=mask_k, block_size_q=bq, block_stride_q=1, block_size_k=bk, block_stride_k=1, window=window,
               sinks=sinks)


@custom_op("sparseattn::hip_attention_fwd", differentiable=True)
def hip_attention_fwd(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, indices: Tensor, counts: Tensor,
                      kpm: Optional[Tensor], k_off: Optional[Tensor], mask_k: int, bq: int, bk: int, window: int,
                      sinks: int, scale: float) -> Tuple[Tensor, Tensor]:
    hip = _hip_of(mask_k, bq, bk, window, sinks)
    if backend_for(q) == "triton":
        return _kernels().hip_attention_fwd(q, k, v, q_pos, indices, counts, hip, scale, bq, kpm, k_off)
    out, lse = cpu.hip_attention_cpu(q, k, v, q_pos, indices, counts, hip, scale, bq, kpm, k_off)
    return out, lse.double()   # the op's LSE is float64, as sparse_attention_fwd's


@torch.library.register_fake("sparseattn::hip_attention_fwd")
def _(q, k, v, *rest):
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(B, H, Lq, dtype=torch.float64)


@custom_op("sparseattn::hip_attention_bwd")
def hip_attention_bwd(do: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      q_pos: Tensor, indices: Tensor, counts: Tensor, kpm: Optional[Tensor], k_off: Optional[Tensor],
                      mask_k: int, bq: int, bk: int, window: int, sinks: int,
                      scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    hip = _hip_of(mask_k, bq, bk, window, sinks)
    if backend_for(q) == "triton":
        return _kernels().hip_attention_bwd(do, dlse, q, k, v, out, lse, q_pos, indices, counts, hip, scale, bq, kpm,
                                            k_off)
    return cpu.hip_attention_bwd_cpu(do, dlse, q, k, v, q_pos, indices, counts, hip, scale, bq, kpm, k_off)


@torch.library.register_fake("sparseattn::hip_attention_bwd")
def _(do, dlse, q, k, v, *rest):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, q_pos, indices, counts, kpm, k_off, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_pos, indices, counts, kpm, k_off)
    ctx.params = params


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, q_pos, indices, counts, kpm, k_off = ctx.saved_tensors
    dlse = None if dlse is None else dlse.float().contiguous()
    dq, dk, dv = hip_attention_bwd(dout.contiguous(), dlse, q, k, v, out, lse, q_pos, indices, counts, kpm, k_off,
                                   *ctx.params)
    return (dq, dk, dv) + (None,) * 11


torch.library.register_autograd("sparseattn::hip_attention_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def _check_hip(hip) -> HiP:
    if not isinstance(hip, HiP):
        raise TypeError(f"hip: expected a sparseattn.HiP, got {type(hip).__name__}")
    return hip


def _scale(scale, D: int) -> float:
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


def _record(q: Tensor) -> None:
    backend = backend_for(q)
    _dispatch.set_backend(backend, _dispatch.cpu_reason(q) if backend == "cpu" else None)


class _Padding:
    """A checked key padding mask, as the ops take it: ``kpm`` uint8 ``[B, Lk]`` (contiguous) and
    ``k_off`` int32 ``[B]`` (leading padded keys, :func:`key_offsets`), both None without one."""

    def __init__(self, key_padding_mask: Optional[Tensor], B: int, Hq: int, Lk: int, device):
        check_score_options(B, Hq, Lk, device, key_padding_mask=key_padding_mask)
        self.kpm = self.k_off = None
        if key_padding_mask is not None:
            self.kpm = key_padding_mask.contiguous().view(torch.uint8)
            self.k_off = key_offsets(key_padding_mask, B, device)

    def positions(self, q_pos: Tensor) -> Tensor:
        """HiP's positions: counted from each sequence's first real key."""
        return q_pos if self.k_off is None else (q_pos - self.k_off[:, None]).contiguous()


def _estimate(q: Tensor, k: Tensor, q_pos: Tensor, hip: HiP, scale: float, bq: int, p_max: int,
              pad: _Padding) -> Tuple[Tensor, Tensor]:
    rounds_b = None if pad.k_off is None else rounds_per_batch(hip, p_max, pad.k_off)
    return hip_mask_op(q, k, pad.positions(q_pos), pad.kpm, pad.k_off, rounds_b, hip.mask_k, bq,
                       hip.block_stride_q, hip.block_size_k, hip.block_stride_k, hip.window, hip.sinks, scale,
                       num_rounds(hip, p_max))


def hip_mask(q: Tensor, k: Tensor, hip: HiP, *, scale: Optional[float] = None,
             key_padding_mask: Optional[Tensor] = None) -> HiPMask:
    """Estimate HiP's mask: for each (batch, query head, query block of ``hip.block_size_q`` rows)
    the ``hip.mask_k`` keys (``K = mask_k / block_size_k`` blocks) found by the tree search, on the
    device, in ``O(L log L)``; no ``[Lq, Lk]`` tensor.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (GQA, any strides; float16, bfloat16, float32).
            The queries are the last Lq positions: row ``i`` sits at ``Lk - Lq + i``.
        hip: the :class:`HiP` configuration.
        scale: score scale (default ``1 / sqrt(D)``; it only matters against HiP's -32000 mask value).
        key_padding_mask: bool ``[B, Lk]``, True = the key exists (Hugging Face's attention_mask), or
            None. Positions count from each sequence's first real key (a left-padded sequence gets
            the mask of the same sequence unpadded, its offsets shifted by the padding); other
            padded keys score as masked, so a real key is never passed over for one.

    Returns:
        :class:`HiPMask` (indices int32 ``[B, Hq, nQ, K]``: token offsets into k, counts int32
        ``[B, Hq, nQ]``).

    Example::

        >>> import torch, sparseattn as sa
        >>> hip = sa.HiP(mask_k=32, block_size_q=16, window=32, sinks=4)
        >>> q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 256, 16)
        >>> mask = sa.hip_mask(q, k, hip)
        >>> mask.indices.shape, int(mask.counts.max())
        (torch.Size([1, 2, 4, 16]), 16)
    """
    hip = _check_hip(hip)
    B, Hq, _, Lq, Lk, D = check_inputs(q, k, k, gqa=True, names=("q", "k", "k"))
    check_dtype_and_dim(q)
    pad = _Padding(key_padding_mask, B, Hq, Lk, q.device)
    _record(q)
    idx, cnt = _estimate(q, k, query_positions(B, Lq, Lk, None, q.device), hip, _scale(scale, D), hip.block_size_q,
                         Lk - 1, pad)
    return HiPMask(idx, cnt, hip, (Lq, Lk))


def _attend(q, k, v, q_pos, mask_idx, mask_cnt, hip: HiP, scale: float, bq: int, pad: _Padding):
    """(out, lse float32) of the op (whose float64 LSE stays saved for the backward)."""
    out, lse = hip_attention_fwd(q, k, v, pad.positions(q_pos), mask_idx.contiguous(), mask_cnt.contiguous(), pad.kpm,
                                 pad.k_off, hip.mask_k, bq, hip.block_size_k, hip.window, hip.sinks, scale)
    return out, lse.float()


def hip_attention(q: Tensor, k: Tensor, v: Tensor, hip: HiP, mask: Optional[HiPMask] = None,
                  scale: Optional[float] = None, return_lse: bool = False, *,
                  key_padding_mask: Optional[Tensor] = None):
    """HiP attention: one softmax per query row over three disjoint key sets: the attention sinks
    ``{j < sinks, j <= p - window}``, the sliding window ``{p - window < j <= p}`` and the keys of
    the mask's selected blocks ``{sinks <= j <= p - window}``, where ``p = Lk - Lq + i`` is the row's
    position. Selected keys are loaded through the index list (gathered tiles of 64 keys), the
    sinks and window as contiguous tiles.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]`` (GQA, any strides,
            float16 / bfloat16 / float32).
        hip: the :class:`HiP` configuration.
        mask: a :class:`HiPMask` from :func:`hip_mask` for these lengths and this config, or None
            to estimate it here (no gradient flows through the estimation).
        scale: default ``1 / sqrt(D)``. return_lse: also return the natural-log LSE ``[B, Hq, Lq]``.
        key_padding_mask: bool ``[B, Lk]``, True = the key exists, or None. Padded keys are never
            attended (sinks, window and selected keys alike) and get no gradient; positions count
            from each sequence's first real key (:func:`hip_mask`), so a left-padded sequence's
            sinks are its first real tokens. A mask given in ``mask`` must come from the same
            ``key_padding_mask``.

    Returns:
        out ``[B, Hq, Lq, Dv]`` (q's dtype), and lse with ``return_lse``. A row that sees nothing
        (e.g. a query inside the left padding) gives 0 (lse -inf). Differentiable in q, k, v through
        the fixed mask; dK / dV are summed with float32 atomics on the GPU (not bitwise
        deterministic).
    """
    hip = _check_hip(hip)
    B, Hq, _, Lq, Lk, D = check_inputs(q, k, v, gqa=True, same_value_dim=False)
    check_dtype_and_dim(q)
    check_dtype_and_dim(v, "v")
    scale = _scale(scale, D)
    pad = _Padding(key_padding_mask, B, Hq, Lk, q.device)
    if mask is None:
        mask = hip_mask(q.detach(), k.detach(), hip, scale=scale, key_padding_mask=key_padding_mask)
    elif not isinstance(mask, HiPMask):
        raise TypeError(f"mask: expected a sparseattn.HiPMask or None, got {type(mask).__name__}")
    mask.check_for(B, Hq, Lq, Lk, hip, q.device)
    _record(q)
    out, lse = _attend(q, k, v, query_positions(B, Lq, Lk, None, q.device), mask.indices, mask.counts, hip, scale,
                       hip.block_size_q, pad)
    return (out, lse) if return_lse else out


@dataclass
class HiPDecodeState:
    """What :func:`hip_decode` carries from one step to the next (pass it back each step).

    Attributes:
        indices / counts: the cached mask of the current refresh period, ``[B, Hq, 1, K]`` / ``[B, Hq, 1]``.
        recent_q: the last ``refresh_interval - 1`` decode query rows ``[B, Hq, n, D]`` (the
            "prefix query" of the next refresh).
        step: decode steps taken with this state (a refresh runs when ``step % refresh_interval == 0``).
        refreshed: whether the last step re-estimated the mask.
    """
    hip: HiP
    indices: Tensor
    counts: Tensor
    recent_q: Tensor
    step: int = 0
    refreshed: bool = False


def hip_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, hip: HiP, cache_seqlens: Optional[Tensor] = None,
               state: Optional[HiPDecodeState] = None, scale: Optional[float] = None, *,
               key_padding_mask: Optional[Tensor] = None):
    """One HiP decode step: ``Lq`` (1 to 16) new query rows per sequence against a KV cache, with
    hip-attention's mask refresh: on the first call and every ``hip.refresh_interval`` steps the
    mask is re-estimated from one query block made of the last ``refresh_interval - 1`` decode query
    rows (kept in ``state``) plus the current rows; between refreshes the cached blocks are reused
    while the window moves with the position.

    Args:
        q: ``[B, Hq, Lq, D]``, the rows at positions ``n_b - Lq + i`` of sequence b.
        k_cache / v_cache: ``[B, Hkv, Lmax, D|Dv]`` (any strides; keys past ``n_b`` are never read).
        hip: the :class:`HiP` configuration.
        cache_seqlens: int32 ``[B]``: ``n_b``, the tokens of sequence b in the cache (the current rows
            included; at least Lq, unchecked: a row at a negative position sees nothing); None: Lmax.
        state: the :class:`HiPDecodeState` the previous step returned, or None on the first step.
        scale: default ``1 / sqrt(D)``.
        key_padding_mask: bool ``[B, Lmax]`` (True = the key exists), or None: as in
            :func:`hip_attention` (positions count from each sequence's first real key; padded keys
            are never attended nor selected). Pass the same padding every step (a left-padded
            batch's prompt padding stays where it is).

    Returns:
        (out ``[B, Hq, Lq, Dv]``, state for the next step).

    Example::

        >>> import torch, sparseattn as sa
        >>> hip = sa.HiP(mask_k=32, block_size_q=16, window=32, sinks=4, refresh_interval=4)
        >>> kc, vc = torch.randn(2, 1, 300, 16), torch.randn(2, 1, 300, 16)
        >>> lens = torch.tensor([200, 300], dtype=torch.int32)
        >>> out, state = sa.hip_decode(torch.randn(2, 2, 1, 16), kc, vc, hip, lens)
        >>> out, state = sa.hip_decode(torch.randn(2, 2, 1, 16), kc, vc, hip, lens + 1, state=state)
        >>> state.step, state.refreshed
        (2, False)
    """
    hip = _check_hip(hip)
    B, Hq, _, Lq, Lmax, D = check_inputs(q, k_cache, v_cache, gqa=True, names=("q", "k_cache", "v_cache"),
                                         same_value_dim=False)
    check_dtype_and_dim(q)
    check_dtype_and_dim(v_cache, "v_cache")
    if not 1 <= Lq <= MAX_DECODE_LQ:
        raise ValueError(f"q: expected 1 to {MAX_DECODE_LQ} query rows per decode step, got {Lq}")
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32:
            raise TypeError(f"cache_seqlens: expected an int32 torch.Tensor [{B}], got "
                            f"{type(cache_seqlens).__name__} {getattr(cache_seqlens, 'dtype', '')}".rstrip())
        if tuple(cache_seqlens.shape) != (B,) or cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens: expected shape [{B}] on {q.device}, got {list(cache_seqlens.shape)} "
                             f"on {cache_seqlens.device}")
    if state is not None:
        if not isinstance(state, HiPDecodeState):
            raise TypeError(f"state: expected a sparseattn.HiPDecodeState or None, got {type(state).__name__}")
        if state.hip != hip or state.indices.shape[:2] != (B, Hq) or state.recent_q.shape[-1] != D:
            raise ValueError(f"state: expected a state of this config and shapes (B={B}, Hq={Hq}, D={D}), got one "
                             f"for {state.hip} and indices {list(state.indices.shape)}")
    scale = _scale(scale, D)
    pad = _Padding(key_padding_mask, B, Hq, Lmax, q.device)
    _record(q)
    keep = hip.refresh_interval - 1
    if state is None:
        recent = q.new_empty(B, Hq, 0, D)
        step = 0
    else:
        recent, step = state.recent_q, state.step
    refresh = step % hip.refresh_interval == 0
    if refresh:
        block_q = torch.cat((recent, q), 2) if recent.shape[2] else q
        n = block_q.shape[2]
        bq = max(hip.block_size_q, triton.next_power_of_2(n))
        idx, cnt = _estimate(block_q, k_cache, query_positions(B, n, Lmax, cache_seqlens, q.device), hip, scale, bq,
                             Lmax - 1, pad)
    else:
        idx, cnt = state.indices, state.counts
    out, _ = _attend(q, k_cache, v_cache, query_positions(B, Lq, Lmax, cache_seqlens, q.device), idx, cnt, hip,
                     scale, hip.block_size_q, pad)
    recent = torch.cat((recent, q.detach()), 2)[:, :, max(0, recent.shape[2] + Lq - keep):] if keep else recent
    return out, HiPDecodeState(hip, idx, cnt, recent, step + 1, refresh)


def hip_recall(q: Tensor, k: Tensor, mask: HiPMask, hip: HiP, *, scale: Optional[float] = None):
    """HiP's quality metric: per query row, the share of the dense float64 causal softmax mass that
    falls on the row's attended set (sinks, window, selected keys; 1.0 = nothing lost), with its
    mean and minimum (:class:`sparseattn.ops.hip.naive.HiPRecall`). Dense in float64: an evaluation
    tool for moderate lengths, not a kernel."""
    hip = _check_hip(hip)
    B, Hq, _, Lq, Lk, D = check_inputs(q, k, k, gqa=True, names=("q", "k", "k"))
    if not isinstance(mask, HiPMask):
        raise TypeError(f"mask: expected a sparseattn.HiPMask, got {type(mask).__name__}")
    mask.check_for(B, Hq, Lq, Lk, hip, q.device)
    return naive.hip_recall(q, k, mask, hip, scale=scale)
