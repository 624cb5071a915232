"""The CUDA extension ``sparseattn._C`` (built from ``csrc/`` when nvcc was present at install):
availability, and the launchers that hand it ``data_ptr()``s, strides and the current stream.

Importing this module never fails: without the extension, or without a usable GPU, every launcher
raises ``RuntimeError("no usable CUDA device: <reason>")`` and :func:`cuda_available` is False.
Launchers allocate outputs and launch; inputs were validated by the public functions (the C++ code
checks them again, cheaply, and raises instead of asserting).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._alloc import empty

try:
    from . import _C
    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # not built (no nvcc at install time, or SPARSEATTN_BUILD_CUDA=0)
    _C = None
    _IMPORT_ERROR = str(e)

_reasons: Dict[int, str] = {}
_sms: Dict[int, int] = {}


def extension_built() -> bool:
    """True when ``sparseattn._C`` was built and imports."""
    return _C is not None


def _device_index(device) -> int:
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device)
    if device.type != "cuda":
        return -1
    return torch.cuda.current_device() if device.index is None else device.index


def cuda_unavailable_reason(device=None) -> Optional[str]:
    """None when the CUDA extension can run on ``device`` (default: the current CUDA device),
    else one line saying why not: not built, no driver, no device, or an unsupported GPU."""
    if _C is None:
        return (f"extension not built: sparseattn._C is missing ({_IMPORT_ERROR}); reinstall with nvcc on PATH "
                "or SPARSEATTN_BUILD_CUDA=1")
    if device is not None and torch.device(device).type != "cuda":
        return f"not a CUDA device: {torch.device(device)}"
    if not torch.cuda.is_available():
        reason = _C.device_unavailable_reason(0)
        return _plain_cause(reason) if reason else (
            f"no GPU for torch: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda})")
    index = _device_index(device)
    if index not in _reasons:
        _reasons[index] = _C.device_unavailable_reason(index)
    return _plain_cause(_reasons[index]) if _reasons[index] else None


def _plain_cause(cuda_text: str) -> str:
    """CUDA's wording, led by the plain cause a user acts on."""
    low = cuda_text.lower()
    if "insufficient" in low or "driver" in low:
        cause = "no usable NVIDIA driver"
    elif "no cuda device" in low or "nodevice" in low or "no cuda-capable" in low:
        cause = "no GPU"
    elif "cannot run this build" in low:
        cause = "GPU not supported by this build"
    else:
        cause = "CUDA unavailable"
    return f"{cause}: {cuda_text}"


def cuda_available(device=None) -> bool:
    """True when the CUDA extension is built AND ``device`` (default: the current one) can run it."""
    return cuda_unavailable_reason(device) is None


def require(device=None) -> int:
    """The device index, or RuntimeError("no usable CUDA device: <reason>")."""
    reason = cuda_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"no usable CUDA device: {reason}")
    return _device_index(device)


def _stream(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


def num_sms(index: int) -> int:
    if index not in _sms:
        _sms[index] = _C.num_sms(index)
    return _sms[index]


# ----------------------------------------------------------------------------- layout builder
def mask_to_lists(masks: Sequence[torch.Tensor],
                  widths: Optional[Sequence[int]] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The GPU layout builder: bool masks ``[Bl, Hl, rows, cols]`` (any strides, broadcast views
    included) -> ``(counts int32 [Bl, Hl, rows], indices int32 [Bl, Hl, rows, width])`` each,
    identical to ``sparseattn.layout.mask_to_lists``. Two launches for up to 4 masks and one
    host read of the widths, unless ``widths`` fixes them (one per mask)."""
    dev = masks[0].device
    index = require(dev)
    out = []
    for start in range(0, len(masks), 4):
        group = masks[start:start + 4]
        jobs, counts = [], []
        for m in group:
            if m.dtype != torch.bool or m.dim() != 4 or m.device != dev:
                raise ValueError(f"mask_to_lists: expected 4-D bool tensors on {dev}, got {m.dtype} "
                                 f"{tuple(m.shape)} on {m.device}")
            bl, hl, rows, cols = m.shape
            c = torch.empty(bl, hl, rows, dtype=torch.int32, device=dev)
            counts.append(c)
            jobs.append([m.data_ptr(), bl, hl, rows, cols, *m.stride(), c.data_ptr(), 0, 0])
        max_counts = torch.empty(len(group), dtype=torch.int32, device=dev)
        stream = _stream(index)
        _C.build_lists_count([tuple(j) for j in jobs], max_counts.data_ptr(), index, stream)
        if widths is None:
            group_widths = [max(1, w) for w in max_counts.tolist()]  # the one host round trip
        else:
            group_widths = [max(1, int(w)) for w in widths[start:start + 4]]
        indices = []
        for j, m, w in zip(jobs, group, group_widths):
            idx = torch.empty(*m.shape[:3], w, dtype=torch.int32, device=dev)
            indices.append(idx)
            j[10], j[11] = idx.data_ptr(), w
        _C.build_lists_fill([tuple(j) for j in jobs], index, stream)
        out.extend(zip(counts, indices))
    return out


# ----------------------------------------------------------------------------- decode
def _vector_operand(t: torch.Tensor, elems: int) -> Tuple[torch.Tensor, List[int]]:
    """``(t or a copy, strides)`` fit for loads of ``elems`` elements: unit stride in the last dim,
    the other strides multiples of ``elems`` and the data ``elems * element_size``-byte aligned.
    Size-1 dims get stride 0 (never stepped; torch gives them any stride). A copy is made only when
    needed, and it is a fresh allocation: ``contiguous()`` returns a contiguous view at a
    misaligned storage offset unchanged."""
    def strides(x):
        return [0 if n == 1 else st for n, st in zip(x.shape, x.stride())]

    st = strides(t)
    if t.stride(-1) != 1 or any(x % elems for x in st[:-1]) or t.data_ptr() % (t.element_size() * elems):
        t = t.clone(memory_format=torch.contiguous_format)
        st = strides(t)
    return t, st


def decode_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor,
                         blk_num: Optional[torch.Tensor], blk_idx: Optional[torch.Tensor], block_k: int,
                         head_mask: Optional[torch.Tensor], scale: float, *,
                         block_table: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                         alibi_slopes: Optional[torch.Tensor] = None,
                         key_padding_mask: Optional[torch.Tensor] = None,
                         key_bias: Optional[torch.Tensor] = None):
    """Launch the split-KV decode kernels. q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lmax, D]`` fp16/bf16,
    D in {64, 128, 256}, or with ``block_table`` int32 ``[B, max_pages]`` the paged cache
    ``[num_pages, page_size, Hkv, D]`` (Lmax = max_pages * page_size); seqlens int32 ``[B]``;
    optional union block lists ``blk_num [B, Hkv]``, ``blk_idx [B, Hkv, W]`` and per-head block mask
    ``head_mask`` uint8 ``[Bl, Hl, nK]``; score options ``softcap`` (> 0), ``alibi_slopes`` fp32
    ``[Hq]`` or ``[B, Hq]``, ``key_bias`` float ``[B|1, Hq|1, Lmax]``, ``key_padding_mask`` bool
    ``[B, Lmax]`` (validated by the caller). Returns (out ``[B, Hq, Lq, D]`` q's dtype, lse
    ``[B, Hq, Lq]`` float32)."""
    index = require(q.device)
    B, Hq, Lq, D = q.shape
    paged = block_table is not None
    if paged:
        num_pages, page_size, Hkv = k.shape[0], k.shape[1], k.shape[2]
        Lmax = block_table.shape[1] * page_size
        if num_pages == 0:  # no page: every sequence is empty (validated lengths), nothing to read
            Lmax = 0
    else:
        Hkv, Lmax = k.shape[1], k.shape[2]
    if B * Hq * Lq == 0 or Lmax == 0:  # no row or no key: rows see nothing (0 and LSE -inf)
        return (torch.zeros(B, Hq, Lq, D, dtype=q.dtype, device=q.device),
                torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float32, device=q.device))
    # The kernels read 4-byte words of q and 16-byte vectors of K/V rows: copy only if needed.
    q, q_st = _vector_operand(q, 2)
    k, k_st = _vector_operand(k, 8)
    v, v_st = _vector_operand(v, 8)
    seqlens = seqlens.contiguous()
    max_keys = Lmax if blk_idx is None else blk_idx.shape[-1] * block_k
    splits = _C.decode_num_splits(num_sms(index), B, Hq, Hkv, Lq, max_keys)
    out = empty(B, Hq, Lq, D, dtype=q.dtype, device=q.device)
    lse = empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    # Workspace through empty() too: NaN-filled under the tests, so a split that skips a row shows.
    o_part = empty(splits, B, Hq, Lq, D, dtype=torch.float32, device=q.device)
    lse_part = empty(splits, B, Hq, Lq, dtype=torch.float32, device=q.device)
    p = _C.DecodeParams()
    p.q, p.k, p.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    p.q_sb, p.q_sh, p.q_sl = q_st[:3]
    if paged:  # [num_pages, page_size, Hkv, D]: k_sb steps a page, k_sl a row of a page
        (p.k_sb, p.k_sl, p.k_sh), (p.v_sb, p.v_sl, p.v_sh) = k_st[:3], v_st[:3]
        block_table = block_table.contiguous()
        p.block_table, p.bt_sb = block_table.data_ptr(), block_table.stride(0)
        p.max_pages, p.page_size, p.num_pages = block_table.shape[1], k.shape[1], k.shape[0]
    else:
        p.k_sb, p.k_sh, p.k_sl = k_st[:3]
        p.v_sb, p.v_sh, p.v_sl = v_st[:3]
    if softcap is not None:
        p.softcap = float(softcap)
    if alibi_slopes is not None:  # [Hq] or [B, Hq] -> batch stride 0 or Hq
        alibi_slopes = alibi_slopes.float().contiguous()
        p.alibi, p.alibi_sb = alibi_slopes.data_ptr(), (Hq if alibi_slopes.dim() == 2 else 0)
    if key_bias is not None:  # [B|1, Hq|1, Lmax], unit stride along keys, size-1 dims broadcast
        key_bias = key_bias.float().contiguous()
        p.key_bias = key_bias.data_ptr()
        p.kb_sb = 0 if key_bias.shape[0] == 1 else key_bias.stride(0)
        p.kb_sh = 0 if key_bias.shape[1] == 1 else key_bias.stride(1)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(torch.uint8).contiguous()
        p.key_padding, p.kpm_sb = key_padding_mask.data_ptr(), key_padding_mask.stride(0)
    p.out, p.lse = out.data_ptr(), lse.data_ptr()
    p.o_sb, p.o_sh, p.o_sl = out.stride()[:3]
    p.o_part, p.lse_part = o_part.data_ptr(), lse_part.data_ptr()
    p.seqlens = seqlens.data_ptr()
    if blk_idx is not None:
        blk_num, blk_idx = blk_num.contiguous(), blk_idx.contiguous()
        p.blk_num, p.blk_idx, p.blk_width = blk_num.data_ptr(), blk_idx.data_ptr(), blk_idx.shape[-1]
    p.block_k = block_k
    if head_mask is not None:
        head_mask = head_mask.contiguous()
        p.head_mask = head_mask.data_ptr()
        p.mask_b, p.mask_h, p.n_kblocks = head_mask.shape
    p.B, p.Hq, p.Hkv, p.Lq, p.Lmax, p.D = B, Hq, Hkv, Lq, Lmax, D
    p.scale = scale
    p.num_splits = splits
    p.dtype = _C.DType.bfloat16 if q.dtype == torch.bfloat16 else _C.DType.float16
    _C.decode_attention(p, index, _stream(index))
    return out, lse
