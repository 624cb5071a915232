"""The PyTorch CPU path of decode attention (CPU tensors)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..._alloc import empty

# Keys per chunk of the CPU path (bounds its memory).
_CPU_CHUNK = 8192


def decode_attention_cpu(q, k, v, seqlens: Tensor, blocks, block_k: int, head_mask, scale: float):
    """PyTorch decode: per sequence, gathers only the listed key blocks (or its first seqlen keys),
    in chunks of keys with an online softmax in fp32. Memory O(chunk), never O(Lmax) per row."""
    B, Hq, Lq, D = q.shape
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
        m_run = torch.full((Hkv, G * Lq), float("-inf"))
        l_run = torch.zeros(Hkv, G * Lq)
        acc = torch.zeros(Hkv, G * Lq, D)
        for c0 in range(0, tok.shape[1], _CPU_CHUNK):
            tc, vc = tok[:, c0:c0 + _CPU_CHUNK], valid[:, c0:c0 + _CPU_CHUNK]
            tci = tc.clamp(max=Lmax - 1)
            kk, vv = k[b][heads, tci].float(), v[b][heads, tci].float()     # [Hkv, C, D]
            s = torch.einsum("hrd,hcd->hrc", qb, kk) * scale
            keep = vc[:, None, :] & (tc[:, None, :] <= qpos[None, :, None])
            if head_mask is not None:
                hm = head_mask[0 if head_mask.shape[0] == 1 else b].view(Hkv, G, -1)   # [Hkv, G, nK]
                hk = torch.gather(hm, 2, (tci // block_k)[:, None, :].expand(Hkv, G, tc.shape[1]))
                keep = keep & hk.repeat_interleave(Lq, 1)
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
