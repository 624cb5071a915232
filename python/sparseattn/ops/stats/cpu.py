"""The PyTorch CPU path of the attention statistics (CPU tensors when the Triton interpreter is off).

Same arguments as the Triton launchers. Probabilities come chunk by chunk (a chunk of query
blocks against its listed key blocks) from the attention op's CPU path
(:func:`..attention.cpu.probabilities`, the same rules); each chunk is reduced into the
statistics at once, so memory is O(listed blocks of a chunk + outputs), never O(Lq * Lk).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..attention.cpu import probabilities


def _rows_of(t: torch.Tensor, r0: int, r1: int, bq: int) -> torch.Tensor:
    """Rows of query blocks [r0, r1) of a [..., Lq] tensor as [..., R, bq], zero-padded."""
    part = t[..., r0 * bq:r1 * bq]
    part = torch.nn.functional.pad(part, (0, (r1 - r0) * bq - part.shape[-1]))
    return part.unflatten(-1, (r1 - r0, bq))


def attention_stats_columns_cpu(q, k, lse, weights, lists: List[torch.Tensor], mask: Optional[torch.Tensor],
                                bits: Optional[torch.Tensor], scale: float, bq: int, bk: int,
                                causal_offset: Optional[int], window: Optional[int], sinks: int, key_mask, q_pos, k_pos,
                                q_seg, k_seg, reduce_heads: bool):
    B, H, lq, _ = q.shape
    lk = k.shape[2]
    csum = torch.zeros(B, H, lk, dtype=torch.float32)
    cmax = torch.zeros(B, H, lk, dtype=torch.float32)
    w = weights.float().expand(B, H, lq)
    b_idx = torch.arange(B)[:, None, None, None]
    h_idx = torch.arange(H)[None, :, None, None]
    for r0, r1, tok, p in probabilities(q, k, lse, lists, mask, bits, scale, bq, bk, causal_offset, window, sinks,
                                        key_mask, q_pos, k_pos, q_seg, k_seg):
        wr = _rows_of(w, r0, r1, bq)[..., None]                                   # [B, H, R, bq, 1]
        col = tok.clamp(max=lk - 1)
        csum.index_put_((b_idx, h_idx, col), (p * wr).sum(3).float(), accumulate=True)   # padding slots add 0
        top = torch.where(wr != 0, p, torch.zeros_like(p)).amax(3).float()
        cmax.view(B * H, lk).scatter_reduce_(1, col.reshape(B * H, -1), top.reshape(B * H, -1), "amax")
    if reduce_heads:
        return csum.sum(1, keepdim=True), cmax.sum(1, keepdim=True)
    return csum, cmax


def attention_stats_rows_cpu(q, k, lse, key_groups, num_groups: int, lists: List[torch.Tensor],
                             mask: Optional[torch.Tensor], bits: Optional[torch.Tensor], scale: float, bq: int, bk: int,
                             causal_offset: Optional[int], window: Optional[int], sinks: int, key_mask, q_pos, k_pos,
                             q_seg, k_seg):
    B, H, lq, _ = q.shape
    lk = k.shape[2]
    nq, nk = -(-lq // bq), -(-lk // bk)
    mass = torch.zeros(B, H, lq, max(1, num_groups), dtype=torch.float32)
    blocks = torch.zeros(B, H, nq, nk, dtype=torch.float32)
    groups = (torch.zeros(1, 1, lk, dtype=torch.long) if key_groups is None else key_groups.long()).expand(B, H, lk)
    g = torch.arange(max(1, num_groups))
    for r0, r1, tok, p in probabilities(q, k, lse, lists, mask, bits, scale, bq, bk, causal_offset, window, sinks,
                                        key_mask, q_pos, k_pos, q_seg, k_seg):
        col = tok.clamp(max=lk - 1)
        grp = torch.gather(groups[:, :, None, :].expand(B, H, r1 - r0, lk), 3, col)              # [B, H, R, S]
        m = torch.einsum("bhrqs,bhrsg->bhrqg", p, (grp[..., None] == g).to(p.dtype)).flatten(2, 3)
        n = min(lq, r1 * bq) - r0 * bq
        mass[:, :, r0 * bq:r0 * bq + n] = m[:, :, :n].float()
        blocks[:, :, r0:r1].scatter_add_(3, col // bk, p.sum(3).float())
    return mass[..., :num_groups], blocks
