"""The CPU path of decode attention (CPU tensors).

Where the C++ CPU kernel is built (:mod:`..attention.cpu_kernel`), its ``decode`` op runs: one
call for every sequence and KV head, the listed key blocks (or each sequence's first ``seqlen``
keys) read where they are (paged caches through the table; fp16 / bf16 rows converted to float32
as they are read), length, causal rule and softcap in the kernel, the other options as one
additive mask by slot (the rules of :func:`_mask`). Otherwise (no kernel, or a mask over 64 MB) a
PyTorch path:

all sequences and KV heads at once: each (sequence, KV head) gathers the key blocks it reads
(its listed blocks, or its first ``seqlen`` keys) into ``[B, Hkv, C, D]``, a chunk of keys at a
time, and its ``G * Lq`` query rows (the query heads of a KV head, GQA) attend them in one call of
the attention op's compute step (:func:`..attention.cpu.attend`: torch's fused CPU attention, or
matmuls with a softcap). Chunks merge by their LSE. Nothing loops over sequences or blocks in
Python; an unpaged dense cache read by every row is not even gathered (a view of the cache).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..attention import cpu_kernel
from ..attention.cpu import attend, merge

# Elements of the gathered keys / values and the mask of one chunk (~64 MB of fp32).
_CHUNK_ELEMS = 1 << 24


def decode_attention_cpu(q, k, v, seqlens: Optional[Tensor], blocks, block_k: int, head_mask, scale: float, *,
                         block_table: Optional[Tensor] = None, softcap: Optional[float] = None,
                         alibi_slopes: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                         key_bias: Optional[Tensor] = None, elem_mask: Optional[Tensor] = None):
    """PyTorch decode: gathers only the listed key blocks (or each sequence's first seqlen keys),
    in chunks of keys merged by their LSE, scores in fp32 (fp64 for fp64). Memory O(chunk).
    ``seqlens``: int32 ``[B]``, or None (every sequence Lmax long).

    ``k, v``: ``[B, Hkv, Lmax, D]``, or with ``block_table`` int32 ``[B, max_pages]`` the paged
    cache ``[num_pages, page_size, Hkv, D]``: each chunk's rows are read through the table (page
    indices clamped to the cache), never a gathered copy of the cache. ``blocks``: None or
    ``(count int [B, Hkv], block ids int [B, Hkv, W])`` of ``block_k``-key blocks. Scores:
    ``scale``, then ``softcap``, ALiBi (``alibi_slopes`` ``[Hq]`` or ``[B, Hq]``) and ``key_bias``
    ``[B|1, Hq|1, Lmax]``; then the masks: length, bottom-right causal, listed blocks,
    ``head_mask`` ``[B|1, Hq, nK]``, ``key_padding_mask`` ``[B, Lmax]`` and ``elem_mask``
    ``[B|1, Hl|1, Lq, Lmax]`` (the exact paths' token-level mask). Returns (out ``[B, Hq, Lq, D]``
    in q's dtype, lse ``[B, Hq, Lq]`` float32; 0 and -inf on a row that sees no key)."""
    kern = cpu_kernel.ops()
    if kern is not None:
        got = _decode_kernel(kern, q, k, v, seqlens, blocks, block_k, head_mask, scale, block_table, softcap,
                             alibi_slopes, key_padding_mask, key_bias, elem_mask)
        if got is not None:
            return got
    return _decode(q, k, v, seqlens, blocks, block_k, head_mask, scale, block_table, softcap, alibi_slopes,
                   key_padding_mask, key_bias, elem_mask)


def _keys(n: Tensor, blocks, block_k: int, B: int, Hkv: int):
    """The key slots of each (sequence, KV head): ``(tok [B, Hkv, T] key positions, valid [B, Hkv, T]
    the slots holding a key of the sequence, ids [B, Hkv, w] or None)``; slot t * block_k + j is key j
    of list entry t (without lists, slot = position, T the longest length)."""
    if blocks is None:
        T = int(n.max()) if B else 0
        tok = torch.arange(T).expand(B, Hkv, T)
        return tok, tok < n[:, None, None], None
    cnt = blocks[0].long()                                             # [B, Hkv]
    w = int(cnt.max()) if cnt.numel() else 0
    ids = blocks[1][:, :, :w].long()
    tok = (ids[..., None] * block_k + torch.arange(block_k)).flatten(-2)
    valid = (torch.arange(w * block_k) < cnt[..., None] * block_k) & (tok < n[:, None, None])
    return tok, valid, ids


def _decode_kernel(kern, q, k, v, seqlens, blocks, block_k, head_mask, scale, block_table, softcap, alibi_slopes,
                   key_padding_mask, key_bias, elem_mask):
    """Decode by the C++ kernel: (out, lse) as :func:`decode_attention_cpu`, or None when the mask of
    the options would exceed ``_CHUNK_ELEMS`` (the PyTorch path then walks it in chunks)."""
    B, Hq, Lq, D = q.shape
    if block_table is None:
        Hkv, Lmax = k.shape[1], k.shape[2]
    else:
        Hkv, Lmax = k.shape[2], block_table.shape[1] * k.shape[1]
    G, M = Hq // Hkv, (Hq // Hkv) * Lq
    mask = None
    if any(t is not None for t in (head_mask, key_padding_mask, elem_mask, alibi_slopes, key_bias)):
        n = torch.full((B,), Lmax) if seqlens is None else seqlens.long().clamp(0, Lmax)
        tok, valid, ids = _keys(n, blocks, block_k, B, Hkv)
        if B * Hkv * M * tok.shape[-1] > _CHUNK_ELEMS:
            return None
        qpos = (n[:, None] - Lq + torch.arange(Lq)).repeat(1, G)
        mask = _mask(tok, tok.clamp(max=max(Lmax - 1, 0)), valid, qpos, Lq, G, block_k, head_mask, key_padding_mask,
                     elem_mask, alibi_slopes, key_bias, torch.float32, True, structural=False)
        if blocks is not None:
            blocks = (blocks[0], blocks[1][:, :, :ids.shape[-1]])
    return kern.decode(q, k, v, seqlens, None if blocks is None else blocks[0], None if blocks is None else blocks[1],
                       block_k, mask, scale, 0.0 if softcap is None else float(softcap), block_table)


def _decode(q, k, v, seqlens, blocks, block_k, head_mask, scale, block_table, softcap, alibi_slopes,
            key_padding_mask, key_bias, elem_mask):
    B, Hq, Lq, D = q.shape
    paged = block_table is not None
    if paged:
        num_pages, page_size, Hkv = k.shape[0], k.shape[1], k.shape[2]
        Lmax = block_table.shape[1] * page_size
    else:
        Hkv, Lmax = k.shape[1], k.shape[2]
    if seqlens is None:
        seqlens = torch.full((B,), Lmax, dtype=torch.int32)
    G, M = Hq // Hkv, (Hq // Hkv) * Lq
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = seqlens.long()
    qx = q.to(ct).reshape(B, Hkv, M, D)                               # row m = g * Lq + i of KV head h
    qpos = (n[:, None] - Lq + torch.arange(Lq)).repeat(1, G)         # [B, M]: each row's position
    tok, valid, ids = _keys(n, blocks, block_k, B, Hkv)
    T = tok.shape[-1]
    # how the chunk's keys are read: a view of the cache (dense), whole blocks of it, or rows
    plane = (torch.arange(B)[:, None, None] * Hkv + torch.arange(Hkv)[None, :, None])      # [B, Hkv, 1]
    by_block = blocks is not None and not paged and Lmax % block_k == 0 and k.is_contiguous() and v.is_contiguous()
    out = lse = None
    chunk = max(block_k, _CHUNK_ELEMS // max(1, B * Hkv * (2 * D + M)) // block_k * block_k)
    for c0 in range(0, T, chunk):
        tc, ok = tok[..., c0:c0 + chunk], valid[..., c0:c0 + chunk]
        tci = tc.clamp(max=max(Lmax - 1, 0))
        if blocks is None and not paged:
            kk, vv = k[:, :, c0:c0 + tc.shape[-1]], v[:, :, c0:c0 + tc.shape[-1]]   # the chunk's T - c0 keys
        elif by_block:
            rows = (plane * (Lmax // block_k) + ids[..., c0 // block_k:(c0 + chunk) // block_k]).reshape(-1)
            kk, vv = (t.view(-1, block_k, D).index_select(0, rows).view(B, Hkv, -1, D) for t in (k, v))
        elif paged:  # logical key t -> row t % page_size of page block_table[b, t // page_size]
            page = block_table.long()[plane // Hkv, tci // page_size].clamp(0, num_pages - 1)   # [B, Hkv, C]
            h3 = torch.arange(Hkv)[None, :, None]
            kk, vv = k[page, tci % page_size, h3], v[page, tci % page_size, h3]
        else:
            kk, vv = k[plane // Hkv, plane % Hkv, tci], v[plane // Hkv, plane % Hkv, tci]   # [B, Hkv, C, D]
        all_ok = bool(ok.all())
        kk, vv = kk.to(ct), vv.to(ct)
        if not all_ok:  # rows past a length (or of unused pages) may hold anything, NaN included
            kk, vv = (torch.where(ok[..., None], t, torch.zeros((), dtype=ct)) for t in (kk, vv))
        mask = _mask(tc, tci, ok, qpos, Lq, G, block_k, head_mask, key_padding_mask, elem_mask, alibi_slopes,
                     key_bias, ct, all_ok)
        o, l = attend(qx, kk, vv, mask, scale, softcap)
        out, lse = (o, l) if out is None else merge(out, lse, o, l)
    if out is None:  # nothing to read: every row sees no key
        out, lse = torch.zeros(B, Hkv, M, D, dtype=ct), torch.full((B, Hkv, M), float("-inf"), dtype=ct)
    return out.reshape(B, Hq, Lq, D).to(q.dtype), lse.reshape(B, Hq, Lq).float()


def _mask(tc, tci, ok, qpos, Lq: int, G: int, block_k: int, head_mask, key_padding_mask, elem_mask, alibi_slopes,
          key_bias, ct, all_valid: bool, structural: bool = True) -> Optional[Tensor]:
    """Float mask ``[B, Hkv, M|1, C]`` of one chunk (``tc`` [B, Hkv, C] the keys, ``ok`` the slots
    that hold one of the sequence's keys): the additive scores (ALiBi, key bias) and -inf where a
    rule drops the pair; None when nothing applies (every slot valid, one new token, no option).
    ``structural=False``: without the length and causal rules (the C++ kernel applies those)."""
    B, Hkv, C = tc.shape
    M = G * Lq
    keep = None if all_valid or not structural else ok[:, :, None, :]
    if Lq > 1 and structural:  # bottom-right causal within the new tokens (one token: the length already says it)
        causal = tc[:, :, None, :] <= qpos[:, None, :, None]
        keep = causal if keep is None else keep & causal
    if all(t is None for t in (head_mask, key_padding_mask, elem_mask, alibi_slopes, key_bias)):
        return None if keep is None else torch.where(keep, 0.0, float("-inf")).to(ct)
    b4 = torch.arange(B)[:, None, None, None]
    hq = (torch.arange(Hkv)[:, None] * G + torch.arange(M) // Lq)[None, :, :, None]   # query head of each row
    col = tci[:, :, None, :]
    rules = []
    if head_mask is not None:
        rules.append(head_mask[0 if head_mask.shape[0] == 1 else b4, hq, col // block_k].bool())
    if key_padding_mask is not None:
        rules.append(key_padding_mask[torch.arange(B)[:, None, None], tci][:, :, None, :].bool())
    if elem_mask is not None:
        em = elem_mask
        rules.append(em[0 if em.shape[0] == 1 else b4, 0 if em.shape[1] == 1 else hq,
                        (torch.arange(M) % Lq)[None, None, :, None], col].bool())
    for r in rules:
        keep = r if keep is None else keep & r
    add = None
    if alibi_slopes is not None:
        sl = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]            # [B|1, Hq]
        slope = sl[0 if sl.shape[0] == 1 else b4, hq].to(ct)                              # [B|1, Hkv, M, 1]
        add = -slope * (qpos[:, None, :, None] - tc[:, :, None, :]).abs().to(ct)
    if key_bias is not None:
        kb = key_bias[0 if key_bias.shape[0] == 1 else b4, 0 if key_bias.shape[1] == 1 else hq, col].to(ct)
        add = kb if add is None else add + kb
    if keep is None:
        return add
    base = torch.zeros((), dtype=ct) if add is None else add
    return torch.where(keep, base, torch.full((), float("-inf"), dtype=ct))
