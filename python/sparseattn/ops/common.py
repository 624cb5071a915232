"""What every op shares: the one input check, the supported dtypes and head dims, and the
pattern-or-layout argument."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ..layout import BlockLayout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check_inputs(q, k, v, *, gqa: bool, names=("q", "k", "v"), same_value_dim: bool = True,
                 why_same_heads: str = "without enable_gqa=True"):
    """The one input check of every public attention function. Returns (B, Hq, Hkv, Lq, Lk, D).
    ``why_same_heads``: what the error says when ``gqa`` is False and the head counts differ."""
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
        raise ValueError(f"{qn}, {kn}: expected the same number of heads {why_same_heads}, got {Hq} and {Hkv}")
    return B, Hq, Hkv, Lq, Lk, D


def check_dtype_and_dim(q: torch.Tensor, name: str = "q") -> None:
    """The kernels' dtypes and head dims (float64 is for the oracles)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16 or float32, got {q.dtype} (sparseattn.reference "
                        "computes in float64)")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"{name}: expected head dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")


def check_layout(layout, B, Hq, Lq, Lk, device, pattern=None) -> None:
    """A layout built for these lengths, batch, heads and device (``pattern``: the object it was
    built from, named in the error)."""
    if pattern is not None and isinstance(layout, BlockLayout):
        bl, hl = layout.shape
        if hl not in (1, Hq):
            per = (f"has {len(pattern.patterns)} patterns (one per head)" if hasattr(pattern, "patterns")
                   else f"gives a layout for {hl} heads")
            raise ValueError(f"layout: {type(pattern).__name__} {per}, but q has {Hq} heads")
        if bl not in (1, B):
            raise ValueError(f"layout: {type(pattern).__name__} gives a layout for batch {bl}, but q has batch {B}")
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


def resolve_layout(layout_or_pattern, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
    """A BlockLayout as is; a static pattern (``.layout(Lq, Lk, device)``) or a content-based one
    (``.layout_for(q, k)``) turned into its layout for these inputs."""
    obj = layout_or_pattern
    if isinstance(obj, BlockLayout):
        return obj
    if callable(getattr(obj, "layout_for", None)):
        return obj.layout_for(q, k)
    if callable(getattr(obj, "layout", None)):
        return obj.layout(q.shape[2], k.shape[2], q.device)
    return obj  # check_layout names what was received


class ScoreOptions(NamedTuple):
    """The per-call score options of the softmax attention kernels, checked and normalised
    (:func:`check_score_options`): key keep mask bool ``[B, Lk]``, per-key bias ``[B|1, H|1, Lk]``,
    ALiBi slopes fp32 ``[B|1, Hq]``, query / key positions int32 ``[B|1, Lq]`` / ``[B|1, Lk]``
    (the coordinates of the causal / window / ALiBi rules, from the layout), softcap (float),
    query / key segment ids int32 (packed sequences, from the layout), key groups int32
    ``[B|1, H|1, Lk]`` with a per-row group bias fp32 ``[B, H, Lq, G]`` (attention redistribution:
    the log of each group's probability factor per row)."""
    key_mask: Optional[torch.Tensor] = None
    key_bias: Optional[torch.Tensor] = None
    alibi: Optional[torch.Tensor] = None
    q_pos: Optional[torch.Tensor] = None
    k_pos: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    q_seg: Optional[torch.Tensor] = None
    k_seg: Optional[torch.Tensor] = None
    key_group: Optional[torch.Tensor] = None
    group_bias: Optional[torch.Tensor] = None


def _check_tensor(t, name: str, what: str, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what} or None, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (as q), got {t.device}")


def check_score_options(B: int, Hq: int, Lk: int, device, *, key_padding_mask=None, key_bias=None, softcap=None,
                        alibi_slopes=None) -> ScoreOptions:
    """Check the score options of an attention call (q of batch B and Hq heads, Lk keys) and
    normalise them for the kernels; the key padding mask is returned as ``key_mask`` (the caller
    folds it into the layout with :meth:`BlockLayout.with_key_padding`)."""
    if key_padding_mask is not None:
        _check_tensor(key_padding_mask, "key_padding_mask", f"bool [B={B}, Lk={Lk}]", device)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = the key exists), got "
                            f"{key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask: expected shape [{B}, {Lk}] (B of q, Lk of k), got "
                             f"{tuple(key_padding_mask.shape)}")
    if key_bias is not None:
        _check_tensor(key_bias, "key_bias", f"float [B|1, Hq|1, Lk={Lk}]", device)
        if not key_bias.is_floating_point():
            raise TypeError(f"key_bias: expected a floating point dtype, got {key_bias.dtype}")
        if key_bias.dim() != 3 or key_bias.shape[0] not in (1, B) or key_bias.shape[1] not in (1, Hq) \
                or key_bias.shape[2] != Lk:
            raise ValueError(f"key_bias: expected shape [1|{B}, 1|{Hq}, {Lk}], got {tuple(key_bias.shape)}")
        if key_bias.requires_grad:
            raise ValueError("key_bias: expected a tensor that does not require grad (no gradient flows to the "
                             "per-key bias; pass key_bias.detach()), got requires_grad=True")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap: expected a float > 0 or None, got {type(softcap).__name__}")
        if not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap: expected a finite float > 0 or None, got {softcap!r}")
        softcap = float(softcap)
    alibi = None
    if alibi_slopes is not None:
        _check_tensor(alibi_slopes, "alibi_slopes", f"float32 [{Hq}] or [{B}, {Hq}]", device)
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes: expected dtype torch.float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise ValueError(f"alibi_slopes: expected shape [{Hq}] or [{B}, {Hq}] (query heads), got "
                             f"{tuple(alibi_slopes.shape)}")
        alibi = alibi_slopes.detach().reshape(-1, Hq)
    return ScoreOptions(key_mask=key_padding_mask, key_bias=None if key_bias is None else key_bias.detach(),
                        alibi=alibi, softcap=softcap)
