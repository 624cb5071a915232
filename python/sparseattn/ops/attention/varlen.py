"""Variable-length packed batches (FlashAttention's ``flash_attn_varlen_func`` layout) on the
sparse_attention op.

The packed tensors are read in place as one ``[1, H, total, D]`` sequence (a permuted view, no
copy, no padding to ``max_seqlen``); the layout (:func:`sparseattn.layout.tokens.from_varlen`)
carries per-token segments and positions, and the kernels' segment and position rules keep every
query inside its own sequence, bottom-right causal there when asked.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...layout import BlockLayout
from ..common import check_dtype_and_dim, check_inputs, check_score_options
from .op import run

# Layout block of the varlen layouts (as the SDPA drop-in's).
VARLEN_BLOCK = (128, 128)


def _check_cu(cu, name: str, total: int, max_seqlen, max_name: str, device, n: Optional[int]) -> int:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name}: expected an int32 torch.Tensor [N + 1], got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name}: expected shape [N + 1] with N >= 1 sequences, got {tuple(cu.shape)}")
    if n is not None and cu.numel() != n:
        raise ValueError(f"{name}: expected {n} entries (as cu_seqlens_q), got {cu.numel()}")
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device} (as q), got {cu.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{max_name}: expected a Python int >= 0, got {max_seqlen!r}")
    capturing = cu.is_cuda and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing:  # one host read; under compile the kernels clamp
        vals = cu.tolist()
        lens = [b - a for a, b in zip(vals, vals[1:])]
        if vals[0] != 0 or min(lens) < 0:
            raise ValueError(f"{name}: expected 0 first and non-decreasing values, got {vals[:8]}"
                             f"{'...' if len(vals) > 8 else ''}")
        if vals[-1] != total:
            raise ValueError(f"{name}: expected the last value to be the packed length {total}, got {vals[-1]}")
        if max(lens) > max_seqlen:
            raise ValueError(f"{max_name}: expected at least the longest sequence, {max(lens)}, got {max_seqlen}")
    return cu.numel()


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, *, causal: bool = False, window: Optional[int] = None, sinks: int = 0,
                     softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
                     scale: Optional[float] = None, return_lse: bool = False):
    """Attention over a packed batch of sequences of different lengths (FlashAttention's varlen API).

    Args:
        q: ``[total_q, Hq, D]``; k: ``[total_k, Hkv, D]``; v: ``[total_k, Hkv, Dv]``: the sequences
            concatenated (``Hq % Hkv == 0``; float16, bfloat16 or float32; any strides).
        cu_seqlens_q, cu_seqlens_k: int32 ``[N + 1]``: sequence n is rows
            ``cu[n]:cu[n + 1]`` (0 first, non-decreasing, last = total). Checked with one host read,
            skipped under ``torch.compile`` and CUDA graph capture (the kernels then stay in bounds).
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest sequence (validated as
            above; the kernels do not need them).
        causal: bottom-right causal per sequence (query row i of a sequence with Lq_n queries and
            Lk_n keys sees keys ``j <= i + Lk_n - Lq_n``, FlashAttention's varlen convention).
        window, sinks: with causal, also only the last ``window`` keys (and the first ``sinks``) of
            each sequence, in its own positions.
        softcap, alibi_slopes, scale: as :func:`sparseattn.sparse_attention`; ALiBi distances are
            ``|i + Lk_n - Lq_n - j|`` within each sequence.
        return_lse: also return the LSE, ``[Hq, total_q]`` float32 (FlashAttention's layout).

    Returns:
        out ``[total_q, Hq, Dv]`` (a view of a ``[Hq, total_q, Dv]`` buffer), and lse. A query sees
        only keys of its own sequence; a row that sees none gives 0 (LSE -inf). Differentiable in
        q, k, v; runs under ``torch.compile(fullgraph=True)`` (no host read while compiling).

    Memory is O(total) for tensors plus the layout's lists, O(nQ * nK) int32 over 128-token
    blocks; tiles of one sequence never meet keys of another except where a tile straddles a
    sequence boundary (masked there).

    Example::

        >>> import torch, sparseattn as sa
        >>> lens = [100, 37, 250]
        >>> cu = torch.tensor([0, 100, 137, 387], dtype=torch.int32)
        >>> q, k, v = (torch.randn(387, 4, 64) for _ in range(3))
        >>> out = sa.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True)
        >>> out.shape
        torch.Size([387, 4, 64])
    """
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected 3 dims [total, H, D] (packed sequences), got shape {tuple(t.shape)}")
    q4, k4, v4 = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))  # [1, H, total, D] views
    _, Hq, _, total_q, total_k, D = check_inputs(q4, k4, v4, gqa=True, same_value_dim=False)
    check_dtype_and_dim(q)
    check_dtype_and_dim(v, "v")
    n = _check_cu(cu_seqlens_q, "cu_seqlens_q", total_q, max_seqlen_q, "max_seqlen_q", q.device, None)
    _check_cu(cu_seqlens_k, "cu_seqlens_k", total_k, max_seqlen_k, "max_seqlen_k", q.device, n)
    if alibi_slopes is not None and isinstance(alibi_slopes, Tensor) and alibi_slopes.dim() == 2:
        raise ValueError(f"alibi_slopes: expected shape [{Hq}] for packed sequences, got {tuple(alibi_slopes.shape)}")
    options = check_score_options(1, Hq, total_k, q.device, softcap=softcap, alibi_slopes=alibi_slopes)
    layout = BlockLayout.from_varlen(cu_seqlens_q, cu_seqlens_k, total_q, total_k, causal=causal, window=window,
                                     sinks=sinks)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out, lse = run(q4, k4, v4, layout, None, scale, options)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out
