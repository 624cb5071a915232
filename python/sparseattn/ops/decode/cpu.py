"""The PyTorch CPU path of decode attention (CPU tensors)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._alloc import empty

# Keys per chunk of the CPU path (bounds its memory).
_CPU_CHUNK = 8192


def decode_attention_cpu(q, k, v, seqlens: Tensor, blocks, block_k: int, head_mask, scale: float, *,
                         block_table: Optional[Tensor] = None, softcap: Optional[float] = None,
                         alibi_slopes: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                         key_bias: Optional[Tensor] = None, elem_mask: Optional[Tensor] = None):
    """PyTorch decode: per sequence, gathers only the listed key blocks (or its first seqlen keys),
    in chunks of keys with an online softmax in fp32. Memory O(chunk), never O(Lmax) per row.

    ``k, v``: ``[B, Hkv, Lmax, D]``, or with ``block_table`` int32 ``[B, max_pages]`` the paged
    cache ``[num_pages, page_size, Hkv, D]``: each chunk's rows are read through the table (page
    indices clamped to the cache), never a gathered copy of the cache. Scores: ``scale``, then
    ``softcap``, ALiBi (``alibi_slopes`` ``[Hq]`` or ``[B, Hq]``) and ``key_bias``
    ``[B|1, Hq|1, Lmax]``; then the masks: length, bottom-right causal, listed blocks,
    ``head_mask``, ``key_padding_mask`` ``[B, Lmax]`` and ``elem_mask`` ``[B|1, Hl|1, Lq, Lmax]``
    (the exact paths' token-level mask)."""
    B, Hq, Lq, D = q.shape
    paged = block_table is not None
    if paged:
        num_pages, page_size, Hkv = k.shape[0], k.shape[1], k.shape[2]
        Lmax = block_table.shape[1] * page_size
    else:
        Hkv, Lmax = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = empty(B, Hq, Lq, D, dtype=q.dtype, device=q.device)
    lse = empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    heads = torch.arange(Hkv)[:, None]
    for b, n in enumerate(seqlens.tolist()):
        qb = q[b].float().reshape(Hkv, G * Lq, D)                       # row r = g * Lq + i
        qpos = (n - Lq + torch.arange(Lq)).repeat(G)                    # [G * Lq]
        if blocks is None:
            tok = torch.arange(n).expand(Hkv, n)
            valid = torch.ones(Hkv, n, dtype=torch.bool)
        else:
            cnt = blocks[0][b].long()                                   # [Hkv]
            w = int(cnt.max()) if cnt.numel() else 0
            slots = torch.arange(w * block_k)
            tok = (blocks[1][b, :, :w].long()[..., None] * block_k + torch.arange(block_k)).flatten(-2)
            valid = (slots < cnt[:, None] * block_k) & (tok < n)
        # Per-row options of this sequence, rows r = g * Lq + i of KV head h (query head h * G + g).
        slope = None
        if alibi_slopes is not None:
            sl = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
            slope = sl.float().view(Hkv, G).repeat_interleave(Lq, 1)[..., None]        # [Hkv, G*Lq, 1]
        bias = None
        if key_bias is not None:
            kb = key_bias[0 if key_bias.shape[0] == 1 else b].float()                   # [Hq|1, Lmax]
            bias = kb.expand(Hq, Lmax).reshape(Hkv, G, Lmax)
        emask = None
        if elem_mask is not None:
            em = elem_mask[0 if elem_mask.shape[0] == 1 else b]                          # [Hl, Lq, Lmax]
            emask = em.expand(Hq, Lq, Lmax).reshape(Hkv, G * Lq, Lmax)
        m_run = torch.full((Hkv, G * Lq), float("-inf"))
        l_run = torch.zeros(Hkv, G * Lq)
        acc = torch.zeros(Hkv, G * Lq, D)
        for c0 in range(0, tok.shape[1], _CPU_CHUNK):
            tc, vc = tok[:, c0:c0 + _CPU_CHUNK], valid[:, c0:c0 + _CPU_CHUNK]
            tci = tc.clamp(max=max(Lmax - 1, 0))
            C = tc.shape[1]
            if paged:  # logical key t -> row t % page_size of page block_table[b, t // page_size]
                page = block_table[b].long()[tci // page_size].clamp(0, num_pages - 1)   # [Hkv, C]
                row = tci % page_size
                kk, vv = k[page, row, heads].float(), v[page, row, heads].float()        # [Hkv, C, D]
            else:
                kk, vv = k[b][heads, tci].float(), v[b][heads, tci].float()             # [Hkv, C, D]
            s = torch.einsum("hrd,hcd->hrc", qb, kk) * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            if slope is not None:
                s = s - slope * (qpos[None, :, None] - tc[:, None, :]).abs().float()
            if bias is not None:
                s = s + torch.gather(bias, 2, tci[:, None, :].expand(Hkv, G, C)).repeat_interleave(Lq, 1)
            keep = vc[:, None, :] & (tc[:, None, :] <= qpos[None, :, None])
            if head_mask is not None:
                hm = head_mask[0 if head_mask.shape[0] == 1 else b].view(Hkv, G, -1)   # [Hkv, G, nK]
                hk = torch.gather(hm, 2, (tci // block_k)[:, None, :].expand(Hkv, G, C))
                keep = keep & hk.repeat_interleave(Lq, 1)
            if key_padding_mask is not None:
                keep = keep & key_padding_mask[b][tci][:, None, :]
            if emask is not None:
                keep = keep & torch.gather(emask, 2, tci[:, None, :].expand(Hkv, G * Lq, C))
            s = s.masked_fill(~keep, float("-inf"))
            m_new = torch.maximum(m_run, s.amax(-1))
            m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m_run - m_safe)
            l_run = l_run * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("hrc,hcd->hrd", p, vv)
            m_run = m_new
        empty_row = l_run == 0
        l_safe = torch.where(empty_row, torch.ones_like(l_run), l_run)
        out[b] = (acc / l_safe[..., None]).reshape(Hq, Lq, D).to(q.dtype)
        lse[b] = torch.where(empty_row, torch.full_like(l_run, float("-inf")),
                             torch.where(torch.isneginf(m_run), 0.0, m_run) + torch.log(l_safe)).reshape(Hq, Lq)
    return out, lse
