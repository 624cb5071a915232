"""Public attention functions: ``sparse_attention`` and the ``scaled_dot_product_attention`` drop-in."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import ops
from .layout import BlockLayout

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# Layout block of the layouts built by scaled_dot_product_attention.
SDPA_BLOCK = (128, 128)

_last_backend = {"name": None}
_dense_layouts: Dict[Tuple, BlockLayout] = {}


def last_backend() -> Optional[str]:
    """Which path ran the last attention call of this process:

    * ``"triton"``: the fused Triton kernels (CUDA, or CPU under the Triton interpreter);
    * ``"cpu"``: sparseattn's PyTorch CPU path (gathers only the listed key blocks);
    * ``"cuda"``: the CUDA extension's decode kernels (``decode_attention``);
    * ``"torch"``: ``torch.nn.functional.scaled_dot_product_attention`` (a documented fallback);
    * ``None``: nothing ran yet.
    """
    return _last_backend["name"]


def _set_backend(name: str) -> None:
    _last_backend["name"] = name


def _check_inputs(q, k, v, *, gqa: bool, names=("q", "k", "v"), same_value_dim: bool = True):
    """The one input check of every public attention function. Returns (B, Hq, Hkv, Lq, Lk, D)."""
    for t, n in zip((q, k, v), names):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{n}: expected a floating point dtype (float16, bfloat16, float32), got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{n}: expected 4 dims [B, H, L, D], got shape {tuple(t.shape)}")
    qn, kn, vn = names
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{qn}, {kn}, {vn}: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{qn}, {kn}, {vn}: expected one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{kn}, {vn}: expected batch size {B} (as {qn}), got {k.shape[0]} and {v.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"{kn}: expected head dim {D} (as {qn}), got {k.shape[3]}")
    if same_value_dim and v.shape[3] != D:
        raise ValueError(f"{vn}: expected head dim {D} (as {qn}), got {v.shape[3]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"{kn}, {vn}: expected the same heads and length, got {tuple(k.shape)} and {tuple(v.shape)}")
    Hkv, Lk = k.shape[1], k.shape[2]
    for n, heads in ((qn, Hq), (kn, Hkv)):
        if heads == 0:  # (empty batches and lengths are fine; a head count of 0 is a caller's bug)
            raise ValueError(f"{n}: expected at least one head, got shape {tuple((q if n == qn else k).shape)}")
    if gqa:
        if Hq % Hkv:
            raise ValueError(f"{qn}: expected a number of heads divisible by {kn}'s {Hkv}, got {Hq}")
    elif Hq != Hkv:
        raise ValueError(f"{qn}, {kn}: expected the same number of heads without enable_gqa=True, got {Hq} and {Hkv}")
    return B, Hq, Hkv, Lq, Lk, D


def _check_layout(layout, B, Hq, Lq, Lk, device):
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a sparseattn.BlockLayout or a pattern with .layout(Lq, Lk, device), "
                        f"got {type(layout).__name__}")
    if tuple(layout.seq_lens) != (Lq, Lk):
        raise ValueError(f"layout: expected seq_lens {(Lq, Lk)} (q and k lengths), got {tuple(layout.seq_lens)}")
    bl, hl = layout.shape
    if bl not in (1, B) or hl not in (1, Hq):
        raise ValueError(f"layout: expected lists of shape [1|{B}, 1|{Hq}, ...], got [{bl}, {hl}, ...]")
    if layout.device != device:
        raise ValueError(f"layout: expected device {device} (as q), got {layout.device}")


def _run(q, k, v, layout: BlockLayout, bias, scale):
    _set_backend(ops.backend_for(q))
    return ops.sparse_attention_fwd(q, k, v, layout.lists(), layout.mask, bias, layout.bits, scale,
                                    *layout.block_size, layout.causal_offset, layout.window, layout.sinks)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                     scale: Optional[float] = None, return_lse: bool = False):
    """Block-sparse attention: each query block attends only to the key blocks ``layout`` lists.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA/MQA, K/V are not
            repeated); float16, bfloat16 or float32; D up to 256; any strides.
        layout: a :class:`BlockLayout` built for ``seq_lens=(Lq, Lk)``, lists of shape
            ``[B|1, Hq|1, ...]``, or a pattern (any object with ``.layout(Lq, Lk, device)``).
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
    B, Hq, _, Lq, Lk, D = _check_inputs(q, k, v, gqa=True)
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"q: expected float16, bfloat16 or float32, got {q.dtype} (sparseattn.reference "
                        "computes in float64)")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q: expected head dim <= {MAX_HEAD_DIM}, got {D}")
    if not isinstance(layout, BlockLayout) and callable(getattr(layout, "layout", None)):
        layout = layout.layout(Lq, Lk, q.device)  # a pattern object
    _check_layout(layout, B, Hq, Lq, Lk, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out, lse = _run(q, k, v, layout, None, scale)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- SDPA drop-in
def _broadcast_mask(attn_mask: torch.Tensor, B, Hq, Lq, Lk) -> torch.Tensor:
    """attn_mask broadcastable to [B, Hq, Lq, Lk] -> a 4-D view with sizes 1 or full (no copy)."""
    shape = tuple(attn_mask.shape)
    target = (B, Hq, Lq, Lk)
    if attn_mask.dim() > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
        raise ValueError(f"attn_mask: expected a shape broadcastable to {list(target)}, got {list(shape)}")
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + shape)


def _block_any_all(mask: torch.Tensor, bq: int, bk: int, lq: int, lk: int):
    """(any, all) of a bool mask [Bm, Hm, Lq|1, Lk|1] over tiles -> [Bm, Hm, nQ|1, nK|1]."""
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    m_any = m_all = mask
    if mask.shape[2] > 1:
        pad = nq * bq - lq
        m_any = F.pad(m_any.to(torch.uint8), (0, 0, 0, pad), value=0).unflatten(2, (nq, bq)).amax(3)
        m_all = F.pad(m_all.to(torch.uint8), (0, 0, 0, pad), value=1).unflatten(2, (nq, bq)).amin(3)
    if mask.shape[3] > 1:
        pad = nk * bk - lk
        m_any = F.pad(m_any.to(torch.uint8), (0, pad), value=0).unflatten(3, (nk, bk)).amax(4)
        m_all = F.pad(m_all.to(torch.uint8), (0, pad), value=1).unflatten(3, (nk, bk)).amin(4)
    return m_any.bool(), m_all.bool()


def _dense_layout(lq: int, lk: int, causal: bool, device) -> BlockLayout:
    """Layout of dense (or top-left causal) attention; cached outside torch.compile."""
    key = (lq, lk, causal, str(device))
    if key in _dense_layouts:
        return _dense_layouts[key]
    bq, bk = SDPA_BLOCK
    bm = torch.ones(1, 1, math.ceil(lq / bq), math.ceil(lk / bk), dtype=torch.bool, device=device)
    layout = BlockLayout.from_block_mask(bm, SDPA_BLOCK, (lq, lk), causal="top_left" if causal else None)
    if not torch.compiler.is_compiling():
        if len(_dense_layouts) > 64:
            _dense_layouts.clear()
        _dense_layouts[key] = layout
    return layout


def _mask_layout(mask: torch.Tensor, B, Hq, lq, lk) -> BlockLayout:
    """Layout of a bool attn_mask: tiles with no True are skipped, all-True tiles run as full
    tiles, mixed tiles read the mask. Built without a host read (lists as wide as the block grid),
    so a training step with a mask does not wait on the GPU here."""
    bq, bk = SDPA_BLOCK
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    m_any, m_all = _block_any_all(mask, bq, bk, lq, lk)
    shape = (mask.shape[0], mask.shape[1], nq, nk)
    return BlockLayout.from_block_mask(m_any.expand(shape), SDPA_BLOCK, (lq, lk),
                                       mask=mask.expand(mask.shape[0], mask.shape[1], lq, lk),
                                       partial_blocks=~m_all.expand(shape), sync_free=True)


def _fallback_reason(query, key, value, attn_mask, dropout_p) -> Optional[str]:
    if dropout_p > 0.0:
        return "dropout_p > 0"
    if query.dtype not in _SUPPORTED:
        return f"dtype {query.dtype}"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} > {MAX_HEAD_DIM}"
    if value.shape[-1] != query.shape[-1]:
        return "value head dim differs from query head dim"
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad:
        return "float attn_mask that requires grad"
    if query.numel() == 0 or key.numel() == 0:
        return "empty input"
    return None


def _torch_sdpa(query, key, value, attn_mask, mask4, dropout_p, is_causal, scale, enable_gqa):
    """torch's own function (the fallbacks, and CPU tensors outside the Triton interpreter, where
    torch's CPU kernels beat sparseattn's gather path on all SDPA can express), with rows that
    see no key set to 0 as on every other path (torch's value there depends on its backend)."""
    _set_backend("torch")
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if mask4 is not None:
        empty = ~mask4.any(-1) if mask4.dtype == torch.bool else torch.isneginf(mask4).all(-1)
        out = out.masked_fill(empty[..., None], 0)
    return out


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on the fused kernels.

    Args:
        query: ``[B, Hq, Lq, D]``; key: ``[B, Hkv, Lk, D]``; value: ``[B, Hkv, Lk, Dv]``; any strides.
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
            ``[B, Hq, Lq, Lk]``. Bool masks become a layout: tiles with no True are skipped.
        dropout_p: dropout probability (> 0 falls back to torch).
        is_causal: top-left causal mask (``ones(Lq, Lk).tril()``, as torch); not with attn_mask.
        scale: score scale, default ``1 / sqrt(D)``.
        enable_gqa: allow ``Hq`` to be a multiple of ``Hkv`` (K/V heads shared by groups).

    Returns:
        ``[B, Hq, Lq, Dv]`` in query's dtype. A query row with no visible key gives 0, on every
        path (torch's own value there depends on its backend).

    Runs the Triton kernels for float16/bfloat16/float32 with D <= 256 and Dv == D; otherwise
    (dropout, float64, D > 256, Dv != D, a float mask that requires grad) it calls torch's own
    function, as it does for CPU tensors (torch's CPU kernels are faster than sparseattn's CPU
    path; rows that see no key still give 0). :func:`last_backend` says which path ran.

    Example::

        >>> import torch, sparseattn as sa
        >>> q = k = v = torch.randn(2, 8, 128, 64)
        >>> out = sa.scaled_dot_product_attention(q, k, v, is_causal=True)
    """
    B, Hq, _, Lq, Lk, D = _check_inputs(query, key, value, gqa=enable_gqa, names=("query", "key", "value"),
                                        same_value_dim=False)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask: expected dtype torch.bool or a float dtype, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask: expected device {query.device}, got {attn_mask.device}")
        if is_causal:
            raise ValueError("attn_mask: expected None when is_causal=True (as torch), got a tensor")
        mask4 = _broadcast_mask(attn_mask, B, Hq, Lq, Lk)
    if _fallback_reason(query, key, value, attn_mask, dropout_p) is not None or ops.backend_for(query) == "cpu":
        return _torch_sdpa(query, key, value, attn_mask, mask4 if attn_mask is not None else None, dropout_p,
                           is_causal, scale, enable_gqa)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bias = None
    if attn_mask is None:
        layout = _dense_layout(Lq, Lk, is_causal, query.device)
    elif attn_mask.dtype == torch.bool:
        layout = _mask_layout(mask4, B, Hq, Lq, Lk)
    else:
        layout = _dense_layout(Lq, Lk, False, query.device)
        bias = mask4.expand(mask4.shape[0], mask4.shape[1], Lq, Lk)
    out, _ = _run(query, key, value, layout, bias, scale)
    return out
