"""Visual-token helpers: importance scores from one attention row, top-k selection, key keep
masks, KV-cache compaction and massive-activation sinks.

The scores of FasterVLM, FastV and DAMRO are one probability row per image (the [CLS] query, the
last query): O(H * Lk * D) work in PyTorch, in fp32, never an ``[Lq, Lk]`` tensor. Statistics over
many query rows (column sums, TransPrune's IGA, VFlowOpt's column means) are
``sa.attention_stats``.

Pruning without compaction is the engine's key keep mask: ``keep_mask`` gives the bool ``[B, Lk]``
``key_padding_mask`` of ``sparse_attention`` / ``decode_attention``, where tiles whose keys are all
dropped are skipped (the cost is that of the kept keys). Pruning with compaction is
:func:`compact_kv` (FastV's and VFlowOpt's KV-cache variants).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..ops.common import check_inputs

# ----------------------------------------------------------------------------- validation
def _check_float(t, name: str, dims: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor {what}, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dims {what}, got shape {tuple(t.shape)}")


def _check_qk(q, k):
    """The one input check of the attention functions (GQA), plus non-empty sequences."""
    check_inputs(q, k, k, gqa=True, names=("q", "k", "k"))
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"q, k: expected non-empty sequences, got Lq={q.shape[2]}, Lk={k.shape[2]}")


def _check_scale(scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not scale > 0:
        raise ValueError(f"scale: expected a float > 0, got {scale}")
    return float(scale)


def _check_int(name, v, lo, hi=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name}: expected an int in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return v


def _row_probs(q_row: torch.Tensor, k: torch.Tensor, scale: float, visible: Optional[torch.Tensor]) -> torch.Tensor:
    """Head-mean softmax of one query row per (batch, head): ``q_row [B, Hq, D]``, ``k [B, Hkv, Lk, D]``,
    ``visible`` bool ``[B, Lk]`` or None. fp32 ``[B, Lk]``; a row that sees nothing gives 0."""
    B, Hq, D = q_row.shape
    Hkv = k.shape[1]
    qg = q_row.float().view(B, Hkv, Hq // Hkv, D)
    s = torch.matmul(qg, k.float().transpose(-1, -2)) * scale                # [B, Hkv, G, Lk]
    if visible is not None:
        s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))                   # exp(-inf) = 0 for hidden keys
    z = p.sum(-1, keepdim=True)
    p = p / torch.where(z > 0, z, 1.0)
    return p.mean(dim=(1, 2))


# ----------------------------------------------------------------------------- importance scores
def cls_importance(q: torch.Tensor, k: torch.Tensor, cls_index: int = 0, patch_slice: slice = slice(1, None),
                   scale: Optional[float] = None) -> torch.Tensor:
    """FasterVLM's [CLS] attention score: the head-mean attention probability row of the [CLS]
    query over the patch keys, in the ViT layer whose features are kept (LLaVA-1.5: the
    penultimate layer of CLIP ViT-L/14-336, 576 patches).

    ``a[b, j] = mean_h softmax_k(scale * q[b, h, cls] . k[b, h // G, k])[patch_slice][j]``: the
    softmax runs over all ``Lk`` keys (ViT attention is bidirectional, the [CLS] key included),
    then the patch columns are taken (FasterVLM's ``attentions[-2][:, :, 0, 1:]``, head mean).

    Args:
        q: ``[B, Hq, Lq, D]`` (only row ``cls_index`` is read); k: ``[B, Hkv, Lk, D]``, ``Hq % Hkv == 0``.
        cls_index: the [CLS] query row. patch_slice: the patch columns (a slice of ``0 .. Lk-1``).
        scale: score scale, default ``1 / sqrt(D)``.

    Returns:
        fp32 ``[B, N]`` (N = the patch columns), each row summing to at most 1. Keep the top-T
        with :func:`select_tokens` (FasterVLM inserts them in raster order).

    Example::

        >>> import torch, sparseattn as sa
        >>> q = k = torch.randn(2, 4, 1 + 36, 16)            # [CLS] + 6 x 6 patches
        >>> a = sa.visual.cls_importance(q, k)
        >>> a.shape, sa.visual.select_tokens(a, 9).shape
        (torch.Size([2, 36]), torch.Size([2, 9]))
    """
    _check_qk(q, k)
    _check_int("cls_index", cls_index, 0, q.shape[2] - 1)
    if not isinstance(patch_slice, slice):
        raise TypeError(f"patch_slice: expected a slice of the key axis, got {type(patch_slice).__name__}")
    probs = _row_probs(q[:, :, cls_index], k, _check_scale(scale, q.shape[3]), None)
    return probs[:, patch_slice]


def _key_columns(key_slice, B: int, Lk: int, device) -> Union[slice, torch.Tensor]:
    if isinstance(key_slice, slice):
        return key_slice
    if not isinstance(key_slice, torch.Tensor):
        raise TypeError(f"key_slice: expected a slice or an int tensor [N] / [B, N], got {type(key_slice).__name__}")
    if key_slice.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"key_slice: expected an int32/int64 tensor, got {key_slice.dtype}")
    if key_slice.dim() not in (1, 2) or (key_slice.dim() == 2 and key_slice.shape[0] not in (1, B)):
        raise ValueError(f"key_slice: expected shape [N] or [B={B}, N], got {tuple(key_slice.shape)}")
    if key_slice.device != device:
        raise ValueError(f"key_slice: expected device {device} (as q), got {key_slice.device}")
    return key_slice


def last_query_importance(q: torch.Tensor, k: torch.Tensor, key_slice, is_causal: bool = True, *,
                          scale: Optional[float] = None,
                          key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FastV's score: the head-mean attention probabilities of the **last query row** over the
    image columns (FastV takes them from layer K-1's eager attention, ``K = 2``; ranks them and
    keeps ``(1 - R) * 576`` image tokens).

    ``a[b, n] = mean_h P[b, h, Lq-1, cols[n]]``, with ``P`` the softmax of ``scale * q . k`` of the
    same call of SDPA: ``is_causal`` is torch's top-left rule (row ``Lq - 1`` sees keys
    ``j <= Lq - 1``; with ``Lq == Lk``, FastV's prefill, every key), ``key_padding_mask`` bool
    ``[B, Lk]`` drops keys (False = absent). To score one new token against a cache, pass
    ``is_causal=False``.

    Args:
        q: ``[B, Hq, Lq, D]`` (only row ``Lq - 1`` is read); k: ``[B, Hkv, Lk, D]``.
        key_slice: the image columns: a slice (``slice(35, 35 + 576)``), or int ``[N]`` / ``[B, N]``.

    Returns:
        fp32 ``[B, N]``; zeros for a batch whose last row sees no key.

    Example::

        >>> import torch, sparseattn as sa
        >>> q = k = torch.randn(1, 4, 100, 16)
        >>> a = sa.visual.last_query_importance(q, k, slice(10, 74))     # 64 image tokens
        >>> keep = sa.visual.select_tokens(a, 32)                        # FastV R = 50%
        >>> mask = sa.visual.keep_mask(keep, 100, start=10, span=64)     # key_padding_mask [1, 100]
        >>> int(mask.sum())
        68
    """
    _check_qk(q, k)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool, got {type(is_causal).__name__}")
    cols = _key_columns(key_slice, B, Lk, q.device)
    visible = None
    if is_causal and Lq < Lk:
        visible = (torch.arange(Lk, device=q.device) <= Lq - 1)[None].expand(B, Lk)
    if key_padding_mask is not None:
        _check_keep(key_padding_mask, "key_padding_mask", B, Lk, q.device)
        visible = key_padding_mask if visible is None else visible & key_padding_mask
    probs = _row_probs(q[:, :, Lq - 1], k, _check_scale(scale, D), visible)
    if isinstance(cols, slice):
        return probs[:, cols]
    cols = cols.long() if cols.dim() == 2 else cols.long()[None]
    return probs.gather(1, cols.expand(B, cols.shape[-1]))


def damro_outliers(q_merged: torch.Tensor, k_merged: torch.Tensor, k: int = 10):
    """DAMRO's outlier visual tokens: the [CLS] row of one **merged-head** softmax of the ViT's
    concatenated, unscaled q/k projections (``q_proj`` / ``k_proj`` outputs of layer -2),
    ``A = softmax(Q K^T / sqrt(C))`` with ``C`` the full width (1024 for CLIP-L), not the model's
    per-head softmax; then its top-k over the patches.

    Args:
        q_merged, k_merged: ``[B, N, C]`` (token 0 is [CLS], tokens 1.. the patches).
        k: outliers to return, ``1 <= k <= N - 1`` (DAMRO's run script: 10 for MME, 4 for POPE / CHAIR).

    Returns:
        ``(indices, scores)``: indices int64 ``[B, k]`` into the patches (token index - 1), in
        descending score order as the reference's ``topk`` (pass the scores to
        :func:`select_tokens` for raster order); scores fp32 ``[B, N - 1]``
        (``A[:, 0, 1:]``). Near-ties may be ordered either way.

    Example::

        >>> import torch, sparseattn as sa
        >>> qm, km = torch.randn(2, 1 + 36, 64), torch.randn(2, 1 + 36, 64)
        >>> idx, scores = sa.visual.damro_outliers(qm, km, k=4)
        >>> idx.shape, scores.shape
        (torch.Size([2, 4]), torch.Size([2, 36]))
    """
    _check_float(q_merged, "q_merged", 3, "[B, N, C]")
    _check_float(k_merged, "k_merged", 3, "[B, N, C]")
    if k_merged.shape != q_merged.shape:
        raise ValueError(f"k_merged: expected shape {tuple(q_merged.shape)} (as q_merged), got {tuple(k_merged.shape)}")
    if k_merged.device != q_merged.device:
        raise ValueError(f"k_merged: expected device {q_merged.device} (as q_merged), got {k_merged.device}")
    B, N, C = q_merged.shape
    if N < 2:
        raise ValueError(f"q_merged: expected N >= 2 tokens ([CLS] + patches), got N={N}")
    _check_int("k", k, 1, N - 1)
    probs = _row_probs(q_merged[:, None, 0], k_merged[:, None], 1.0 / math.sqrt(C), None)   # one "head"
    scores = probs[:, 1:]
    return scores.topk(k, dim=-1).indices, scores


# ----------------------------------------------------------------------------- selection
def select_tokens(scores: torch.Tensor, keep: int, order: str = "position") -> torch.Tensor:
    """Indices of the ``keep`` highest-scoring tokens along the last axis.

    Args:
        scores: float ``[..., N]`` (e.g. :func:`cls_importance`).
        keep: how many to keep, ``0 <= keep <= N`` (FastV: ``(1 - R) * N``; FasterVLM: 144, 58, 29).
        order: ``"position"`` (ascending index: the kept tokens in their original order, as
            FasterVLM, FastV and TransPrune re-insert them) or ``"score"`` (descending score).

    Returns:
        int64 ``[..., keep]``. Tokens whose scores tie at the boundary may be chosen either way.

    Example::

        >>> import torch, sparseattn as sa
        >>> sa.visual.select_tokens(torch.tensor([0.1, 0.5, 0.2, 0.9]), 2).tolist()
        [1, 3]
        >>> sa.visual.select_tokens(torch.tensor([0.1, 0.5, 0.2, 0.9]), 2, order="score").tolist()
        [3, 1]
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a torch.Tensor [..., N], got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores: expected a floating-point tensor, got {scores.dtype}")
    if scores.dim() == 0:
        raise ValueError("scores: expected at least 1 dim [..., N], got a scalar")
    _check_int("keep", keep, 0, scores.shape[-1])
    if order not in ("position", "score"):
        raise ValueError(f"order: expected 'position' or 'score', got {order!r}")
    idx = scores.topk(keep, dim=-1, sorted=True).indices
    return idx.sort(dim=-1).values if order == "position" else idx


def _check_keep(mask, name, B, L, device):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool torch.Tensor [B, {L}], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool [B, {L}], got {mask.dtype}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"{name}: expected shape [{B}, {L}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name}: expected device {device}, got {mask.device}")


def keep_mask(indices: torch.Tensor, seq_len: int, start: int = 0, span: Optional[int] = None) -> torch.Tensor:
    """The key keep mask of a pruning: bool ``[B, seq_len]``, True outside the pruned span
    ``[start, start + span)`` and at ``start + indices`` inside it (pass it as
    ``key_padding_mask=`` to :func:`sparseattn.sparse_attention` / ``decode_attention``, FastV's
    in-place variant, or to :func:`compact_kv`). Negative indices are padding (ignored).

    Args:
        indices: int ``[B, n]`` (or ``[n]``, batch 1) into the span, e.g. :func:`select_tokens`.
        seq_len: the key length. start, span: the pruned span (default: ``start`` to the end).

    Example::

        >>> import torch, sparseattn as sa
        >>> sa.visual.keep_mask(torch.tensor([[0, 2]]), 6, start=1, span=4).int().tolist()
        [[1, 1, 0, 1, 0, 1]]
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected an int torch.Tensor [B, n], got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices: expected an int32/int64 tensor, got {indices.dtype}")
    if indices.dim() not in (1, 2):
        raise ValueError(f"indices: expected shape [B, n] or [n], got {tuple(indices.shape)}")
    seq_len = _check_int("seq_len", seq_len, 1)
    start = _check_int("start", start, 0, seq_len)
    span = seq_len - start if span is None else _check_int("span", span, 0, seq_len - start)
    idx = (indices if indices.dim() == 2 else indices[None]).long()
    B, dev = idx.shape[0], idx.device
    ok = (idx >= 0) & (idx < span)
    hits = torch.zeros(B, seq_len + 1, dtype=torch.int32, device=dev)
    hits.scatter_add_(1, torch.where(ok, idx + start, seq_len), torch.ones_like(idx, dtype=torch.int32))
    t = torch.arange(seq_len, device=dev)
    outside = (t < start) | (t >= start + span)
    return outside[None] | (hits[:, :seq_len] > 0)


# ----------------------------------------------------------------------------- KV compaction
def compact_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, keep: torch.Tensor,
               cache_seqlens: Optional[torch.Tensor] = None, *, max_len: Optional[int] = None):
    """Gather the kept tokens of each sequence into a dense prefix of a new KV cache (FastV's and
    VFlowOpt's KV-cache variants), keeping their original positions for RoPE.

    Device ops only (a sort of the keep flags and one gather per cache): no host read, so it runs
    under ``torch.compile`` and in a CUDA graph. Decode over the result (``cache_seqlens=`` the
    new lengths) equals decode over the old cache with the dropped keys masked
    (``key_padding_mask=keep``) whenever the new query tokens' own keys are kept (the last Lq
    tokens; always for Lq = 1). The positions are the kept tokens' original indices: FastV keeps
    the original ``position_ids`` of the survivors; new tokens continue from the old length.

    Args:
        k_cache: ``[B, Hkv, Lmax, D]``; v_cache: ``[B, Hkv, Lmax, Dv]`` (contiguous caches).
        keep: bool ``[B, Lmax]`` (True = keep), or int ``[B, n]`` token indices (negative = none;
            duplicates count once), e.g. from :func:`select_tokens` plus the text.
        cache_seqlens: int32 ``[B]``, tokens held per sequence (default Lmax); tokens at or past a
            sequence's length are dropped whatever ``keep`` says.
        max_len: rows of the new caches (default: Lmax for a bool ``keep``, n for indices); only
            the first ``max_len`` kept tokens of a sequence are kept.

    Returns:
        ``(k_new, v_new, new_seqlens, positions)``: caches ``[B, Hkv, W, D|Dv]`` with rows at or
        past a sequence's new length zeroed, ``new_seqlens`` int32 ``[B]``, ``positions`` int32
        ``[B, W]`` (the original index of each kept row, -1 past the new length).

    Example::

        >>> import torch, sparseattn as sa
        >>> k = v = torch.randn(2, 2, 64, 16)
        >>> keep = torch.rand(2, 64) < 0.5
        >>> keep[:, -1] = True                                  # the newest token stays
        >>> k2, v2, lens, pos = sa.visual.compact_kv(k, v, keep)
        >>> q = torch.randn(2, 4, 1, 16)
        >>> a = sa.decode_attention(q, k2, v2, cache_seqlens=lens)
        >>> b = sa.decode_attention(q, k, v, key_padding_mask=keep)
        >>> bool(torch.allclose(a, b, atol=1e-5))
        True
    """
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_float(t, name, 4, "[B, Hkv, Lmax, D]")
    B, Hkv, Lmax, D = k_cache.shape
    dev = k_cache.device
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache: expected shape [{B}, {Hkv}, {Lmax}, Dv] (as k_cache), got {tuple(v_cache.shape)}")
    if v_cache.device != dev:
        raise ValueError(f"v_cache: expected device {dev} (as k_cache), got {v_cache.device}")
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"keep: expected a bool [B, Lmax] or int [B, n] torch.Tensor, got {type(keep).__name__}")
    if keep.device != dev:
        raise ValueError(f"keep: expected device {dev} (as k_cache), got {keep.device}")
    if keep.dtype == torch.bool:
        _check_keep(keep, "keep", B, Lmax, dev)
        flags, width = keep, Lmax
    elif keep.dtype in (torch.int32, torch.int64):
        if keep.dim() != 2 or keep.shape[0] != B:
            raise ValueError(f"keep: expected int indices of shape [B={B}, n], got {tuple(keep.shape)}")
        width = keep.shape[1]
        if width == 0:
            raise ValueError(f"keep: expected at least one index per sequence, got shape {tuple(keep.shape)}")
        hits = torch.zeros(B, Lmax + 1, dtype=torch.int32, device=dev)
        ok = (keep >= 0) & (keep < Lmax)
        hits.scatter_add_(1, torch.where(ok, keep.long(), Lmax), torch.ones_like(keep, dtype=torch.int32))
        flags = hits[:, :Lmax] > 0
    else:
        raise TypeError(f"keep: expected dtype torch.bool, int32 or int64, got {keep.dtype}")
    if max_len is not None:
        width = _check_int("max_len", max_len, 1, Lmax)
    t = torch.arange(Lmax, device=dev)
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or \
                tuple(cache_seqlens.shape) != (B,):
            raise TypeError(f"cache_seqlens: expected an int32 tensor [B={B}], got "
                            f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)} "
                            f"{tuple(getattr(cache_seqlens, 'shape', ()))}")
        if cache_seqlens.device != dev:
            raise ValueError(f"cache_seqlens: expected device {dev} (as k_cache), got {cache_seqlens.device}")
        flags = flags & (t[None] < cache_seqlens[:, None].long())
    # kept tokens first, in their original order: sort keys t (kept) and Lmax + t (dropped), all distinct
    order = torch.where(flags, t[None], Lmax + t[None]).argsort(dim=-1)[:, :width]          # [B, W]
    new_len = flags.sum(-1).clamp(max=width)
    used = torch.arange(width, device=dev)[None] < new_len[:, None]                          # [B, W]

    def gather(cache):
        idx = order[:, None, :, None].expand(B, cache.shape[1], width, cache.shape[3])
        return cache.gather(2, idx).masked_fill_(~used[:, None, :, None], 0)

    positions = torch.where(used, order, -1).to(torch.int32)
    return gather(k_cache), gather(v_cache), new_len.to(torch.int32), positions


# ----------------------------------------------------------------------------- sinks
def massive_activation_sinks(hidden: torch.Tensor, dims, tau: float = 20.0, *, eps: float = 1e-6) -> torch.Tensor:
    """VAR's visual-sink detection (DimProspector): token ``t`` is a sink when its RMS-normalised
    hidden state is massive in one of the model's sink dimensions,
    ``max_{d in dims} |h[t, d]| / sqrt(mean_c h[t, c]^2 + eps) > tau``, in fp32, with no learned
    norm weight (VAR's reference: ``eps = 1e-6``, ``tau = 20``; LLaVA-1.5-7B ``dims = (2533, 1415)``,
    13B ``(2100, 4743)``). Computed on the hidden state entering a layer, once at prefill; the
    result is the ``sink_mask`` of ``var_attention``.

    Args:
        hidden: float ``[..., L, C]`` (``[B, L, C]`` usually).
        dims: an int, a sequence of ints or an int tensor of channels in ``[0, C)``.
        tau: threshold (strict ``>``).

    Returns:
        bool ``[..., L]``.

    Example::

        >>> import torch, sparseattn as sa
        >>> h = torch.randn(1, 6, 1024)
        >>> h[0, 2, 7] = 400.0                                    # a massive activation in channel 7: r ~ 32
        >>> sa.visual.massive_activation_sinks(h, dims=(7, 9)).tolist()
        [[False, False, True, False, False, False]]
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor [..., L, C], got {type(hidden).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden: expected a floating-point tensor, got {hidden.dtype}")
    if hidden.dim() < 2 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden: expected shape [..., L, C] with C >= 1, got {tuple(hidden.shape)}")
    C = hidden.shape[-1]
    if isinstance(dims, torch.Tensor):
        if dims.dtype not in (torch.int32, torch.int64) or dims.dim() > 1:
            raise TypeError(f"dims: expected an int tensor [n], got {dims.dtype} {tuple(dims.shape)}")
        dims = dims.reshape(-1).tolist()
    elif isinstance(dims, int) and not isinstance(dims, bool):
        dims = [dims]
    elif not isinstance(dims, Sequence) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"dims: expected an int or a sequence of ints, got {dims!r}")
    if len(dims) == 0 or any(not 0 <= d < C for d in dims):
        raise ValueError(f"dims: expected one or more channels in [0, {C}), got {list(dims)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau: expected a float, got {type(tau).__name__}")
    ms = torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float32).square() / C           # mean(h^2), fp32
    sel = hidden[..., list(dims)].float().abs().amax(-1)
    return sel / torch.sqrt(ms + eps) > tau
