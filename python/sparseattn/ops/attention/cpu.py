"""The PyTorch CPU path of sparse attention (CPU tensors when the Triton interpreter is off).

Same arguments as the Triton launchers. It gathers only the listed key blocks of a chunk of query
blocks at a time, so memory is O(listed blocks of the chunk), never O(Lq * Lk) for a sparse
layout. Scores are computed in fp32 (fp64 for fp64 inputs). The backward recomputes each chunk's
probabilities from the saved LSE, so memory stays bounded the same way.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..._alloc import empty
from ...layout import BlockLayout, unpack_bits

# Elements of the gathered score tile of one chunk (~64 MB of fp32).
_CHUNK_ELEMS = 1 << 24


def _layout(lists, mask, bits, bq, bk, lq, lk, causal_offset, window, sinks) -> BlockLayout:
    return BlockLayout.from_lists(lists, block_size=(bq, bk), seq_lens=(lq, lk), causal_offset=causal_offset,
                                  window=window, sinks=sinks, mask=mask, bits=bits)


def _chunks(q, layout: BlockLayout):
    """Yield (r0, r1, key-token index [B, H, R, S], token valid [B, H, R, S], tile bitmask id of
    each token [B, H, R, S]) per chunk of query blocks."""
    B, H, lq, d = q.shape
    bq, bk = layout.block_size
    # Lists may be padded past their longest row (sync_free layouts are as wide as the block grid):
    # gather only up to the longest row (a host read costs nothing here).
    wp, wf = (max(1, int(n.max())) if n.numel() else 1 for n in (layout.kv_num_blocks, layout.full_kv_num_blocks))
    kvi, fkvi, kvb = layout.kv_indices[..., :wp], layout.full_kv_indices[..., :wf], layout.kv_bit_ids[..., :wp]
    idx = torch.cat([kvi, fkvi], -1).long()
    valid = torch.cat([torch.arange(kvi.shape[-1]) < layout.kv_num_blocks[..., None],
                       torch.arange(fkvi.shape[-1]) < layout.full_kv_num_blocks[..., None]], -1)
    ids = torch.cat([kvb, torch.full_like(fkvi, -1)], -1)
    nq, w = idx.shape[-2], idx.shape[-1]
    idx, valid, ids = (t.expand(B, H, nq, w) for t in (idx, valid, ids))
    per_row = B * H * w * bk * (bq + d)
    rows = max(1, _CHUNK_ELEMS // max(1, per_row))
    ar = torch.arange(bk)

    def tokens(t, r0, r1):
        return t[:, :, r0:r1, :, None].expand(B, H, r1 - r0, w, bk).flatten(-2)

    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        yield r0, r1, (idx[:, :, r0:r1, :, None] * bk + ar).flatten(-2), tokens(valid, r0, r1), tokens(ids, r0, r1)


def _gather(k, v, tok, group):
    """Keys and values of the listed tokens: [B, H, R, S, D] each, plus the index used."""
    B, H = tok.shape[:2]
    index = (torch.arange(B)[:, None, None, None], torch.arange(H)[None, :, None, None] // group,
             tok.clamp(max=k.shape[2] - 1))
    return k[index], v[index], index


def _scores(qc, kk, tok, ok, ids, layout, bias, scale, r0):
    """Scaled scores of query blocks [r0, r0 + R) (qc [B, H, R, bq, D]) against the gathered keys,
    with the in-block masks and the bias applied: [B, H, R, bq, S], -inf where not attended."""
    B, H, R, bq, _ = qc.shape
    lq, lk = layout.seq_lens
    s = torch.einsum("bhrqd,bhrsd->bhrqs", qc, kk) * scale
    rows = ((r0 + torch.arange(R))[:, None] * bq + torch.arange(bq))[None, None, :, :, None]   # [1,1,R,bq,1]
    cols = tok[:, :, :, None, :]                                                                # [B,H,R,1,S]
    b5 = torch.arange(B)[:, None, None, None, None]
    h5 = torch.arange(H)[None, :, None, None, None]
    keep = ok[:, :, :, None, :] & layout.element_mask(rows, cols, b5, h5)
    if layout.bits is not None:
        keep = keep & unpack_bits(layout.bits, ids[:, :, :, None, :], torch.arange(bq)[:, None], cols % layout.block_size[1])
    if bias is not None:
        bb = 0 if bias.shape[0] == 1 else b5
        bh = 0 if bias.shape[1] == 1 else h5
        s = s + bias[bb, bh, rows.clamp(max=lq - 1), cols.clamp(max=lk - 1)].to(s.dtype)
    return s.masked_fill(~keep, float("-inf"))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor, r0: int, r1: int, bq: int) -> torch.Tensor:
    """Rows of query blocks [r0, r1) of a [B, H, Lq, ...] tensor, zero-padded to whole blocks."""
    part = t[:, :, r0 * bq:r1 * bq]
    pad = (r1 - r0) * bq - part.shape[2]
    if pad:
        part = torch.cat([part, part.new_zeros(*part.shape[:2], pad, *part.shape[3:])], 2)
    return part.reshape(*part.shape[:2], r1 - r0, bq, *part.shape[3:])


def sparse_attention_fwd_cpu(q, k, v, lists: List[torch.Tensor], mask: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], bits: Optional[torch.Tensor], scale: float,
                             layout_bq: int, layout_bk: int, causal_offset: Optional[int], window: Optional[int],
                             sinks: int):
    B, H, lq, d = q.shape
    lk = k.shape[2]
    ct = _compute_dtype(q)
    layout = _layout(lists, mask, bits, layout_bq, layout_bk, lq, lk, causal_offset, window, sinks)
    out = empty(B, H, lq, d, dtype=q.dtype, device=q.device)
    lse = empty(B, H, lq, dtype=torch.float32, device=q.device)
    kf, vf = k.to(ct), v.to(ct)
    for r0, r1, tok, ok, ids in _chunks(q, layout):
        kk, vv, _ = _gather(kf, vf, tok, H // k.shape[1])
        s = _scores(_rows(q, r0, r1, layout_bq).to(ct), kk, tok, ok, ids, layout, bias, scale, r0)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        unseen = l == 0  # rows with no visible key
        l_safe = torch.where(unseen, torch.ones_like(l), l)
        o_c = torch.einsum("bhrqs,bhrsd->bhrqd", p / l_safe, vv)
        l_c = torch.where(unseen, torch.full_like(l, float("-inf")), m + torch.log(l_safe)).squeeze(-1)
        n = min(lq, r1 * layout_bq) - r0 * layout_bq
        out[:, :, r0 * layout_bq:r1 * layout_bq] = o_c.flatten(2, 3)[:, :, :n].to(q.dtype)
        lse[:, :, r0 * layout_bq:r1 * layout_bq] = l_c.flatten(2, 3)[:, :, :n].float()
    return out, lse


def sparse_attention_bwd_cpu(do, dlse, q, k, v, out, lse, lists: List[torch.Tensor],
                             mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: Optional[torch.Tensor],
                             scale: float, layout_bq: int, layout_bk: int, causal_offset: Optional[int],
                             window: Optional[int], sinks: int):
    B, H, lq, d = q.shape
    lk = k.shape[2]
    ct = _compute_dtype(q)
    layout = _layout(lists, mask, bits, layout_bq, layout_bk, lq, lk, causal_offset, window, sinks)
    kf, vf = k.to(ct), v.to(ct)
    dq = torch.zeros(B, H, lq, d, dtype=ct)
    dk = torch.zeros(k.shape, dtype=ct)
    dv = torch.zeros(v.shape, dtype=ct)
    delta = (do.to(ct) * out.to(ct)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(ct)
    lse2 = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).to(ct)
    for r0, r1, tok, ok, ids in _chunks(q, layout):
        kk, vv, index = _gather(kf, vf, tok, H // k.shape[1])
        qc = _rows(q, r0, r1, layout_bq).to(ct)
        doc = _rows(do, r0, r1, layout_bq).to(ct)
        s = _scores(qc, kk, tok, ok, ids, layout, bias, scale, r0)
        p = torch.exp(s - _rows(lse2, r0, r1, layout_bq)[..., None])
        dp = torch.einsum("bhrqd,bhrsd->bhrqs", doc, vv)
        ds = p * (dp - _rows(delta, r0, r1, layout_bq)[..., None])
        n = min(lq, r1 * layout_bq) - r0 * layout_bq
        dq[:, :, r0 * layout_bq:r1 * layout_bq] = (torch.einsum("bhrqs,bhrsd->bhrqd", ds, kk) * scale).flatten(2, 3)[:, :, :n]
        # Scatter the gathered key/value gradients back (padding tokens carry exact zeros).
        dk.index_put_(index, torch.einsum("bhrqs,bhrqd->bhrsd", ds, qc) * scale, accumulate=True)
        dv.index_put_(index, torch.einsum("bhrqs,bhrqd->bhrsd", p, doc), accumulate=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
