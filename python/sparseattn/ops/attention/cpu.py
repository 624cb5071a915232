"""The PyTorch CPU path of sparse attention (CPU tensors when the Triton interpreter is off).

Same arguments as the Triton launchers. It gathers only the listed key blocks of a chunk of query
blocks at a time, so memory is O(listed blocks of the chunk), never O(Lq * Lk) for a sparse
layout. Scores are computed in fp32 (fp64 for fp64 inputs). The backward recomputes each chunk's
probabilities from the saved LSE, so memory stays bounded the same way.

Score options (one place, :func:`_scores`): softcap ``c * tanh(s / c)`` first, then ALiBi
``-slope * |i + Lk - Lq - j|``, the per-key bias and the element bias. Masks: every rule of the
layout, rebuilt with its per-token data (key padding mask ``key_mask [B|1, Lk]``, positions
``q_pos``/``k_pos`` as the coordinates of causal and window, segments ``q_seg``/``k_seg``), through
``BlockLayout.element_mask`` (the rules are written once, in ``layout/predicates.py``). Values may
have their own head dim Dv.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..._alloc import empty
from ...layout import BlockLayout, unpack_bits
from ...layout.predicates import alibi_bias, softcap_scores

# Elements of the gathered score tile of one chunk (~64 MB of fp32).
_CHUNK_ELEMS = 1 << 24


def _layout(lists, mask, bits, bq, bk, lq, lk, causal_offset, window, sinks, key_mask, q_pos, k_pos, q_seg,
            k_seg) -> BlockLayout:
    return BlockLayout.from_lists(lists, block_size=(bq, bk), seq_lens=(lq, lk), causal_offset=causal_offset,
                                  window=window, sinks=sinks, mask=mask, bits=bits, q_pos=q_pos, k_pos=k_pos,
                                  key_mask=key_mask, q_seg=q_seg, k_seg=k_seg)


def _chunks(q, dv: int, layout: BlockLayout):
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
    per_row = B * H * w * bk * (bq + d + dv)
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


def _per_bh(t: torch.Tensor, b5: torch.Tensor, h5: torch.Tensor):
    """(batch, head) index into a tensor whose leading dims may be 1 (broadcast)."""
    return (0 if t.shape[0] == 1 else b5), (0 if t.shape[1] == 1 else h5)


def _scores(qc, kk, tok, ok, ids, layout, bias, scale, r0, key_bias=None, alibi=None, softcap=None, key_group=None,
            group_bias=None):
    """Scores of query blocks [r0, r0 + R) (qc [B, H, R, bq, D]) against the gathered keys, with
    the score options and the layout's masks applied: ([B, H, R, bq, S], -inf where not attended; and the
    softcap's derivative ``1 - tanh(s / c)^2`` of the same shape, or None without softcap)."""
    B, H, R, bq, _ = qc.shape
    lq, lk = layout.seq_lens
    s = torch.einsum("bhrqd,bhrsd->bhrqs", qc, kk) * scale
    rows = ((r0 + torch.arange(R))[:, None] * bq + torch.arange(bq))[None, None, :, :, None]   # [1,1,R,bq,1]
    cols = tok[:, :, :, None, :]                                                                # [B,H,R,1,S]
    b5 = torch.arange(B)[:, None, None, None, None]
    h5 = torch.arange(H)[None, :, None, None, None]
    rc, cc = rows.clamp(max=lq - 1), cols.clamp(max=lk - 1)
    dcap = None
    if softcap is not None:
        s = softcap_scores(s, softcap)
        dcap = 1 - (s / softcap) ** 2
    if alibi is not None:
        s = s + alibi_bias(alibi[_per_bh(alibi, b5, h5)].to(s.dtype), layout.alibi_distance(rows, cols, b5))
    if key_bias is not None:
        s = s + key_bias[(*_per_bh(key_bias, b5, h5), cc)].to(s.dtype)
    if bias is not None:
        s = s + bias[(*_per_bh(bias, b5, h5), rc, cc)].to(s.dtype)
    if group_bias is not None:  # the row's bias of the key's group
        g = key_group[(*_per_bh(key_group, b5, h5), cc)].long()
        s = s + group_bias[b5, h5, rc, g].to(s.dtype)
    keep = ok[:, :, :, None, :] & layout.element_mask(rows, cols, b5, h5)
    if layout.bits is not None:
        keep = keep & unpack_bits(layout.bits, ids[:, :, :, None, :], torch.arange(bq)[:, None], cols % layout.block_size[1])
    return s.masked_fill(~keep, float("-inf")), dcap


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
                             sinks: int, key_mask: Optional[torch.Tensor] = None,
                             key_bias: Optional[torch.Tensor] = None, alibi: Optional[torch.Tensor] = None,
                             q_pos: Optional[torch.Tensor] = None, k_pos: Optional[torch.Tensor] = None,
                             softcap: Optional[float] = None, q_seg: Optional[torch.Tensor] = None,
                             k_seg: Optional[torch.Tensor] = None, key_group: Optional[torch.Tensor] = None,
                             group_bias: Optional[torch.Tensor] = None):
    B, H, lq, d = q.shape
    lk = k.shape[2]
    ct = _compute_dtype(q)
    layout = _layout(lists, mask, bits, layout_bq, layout_bk, lq, lk, causal_offset, window, sinks, key_mask, q_pos,
                     k_pos, q_seg, k_seg)
    out = empty(B, H, lq, v.shape[3], dtype=q.dtype, device=q.device)
    lse = empty(B, H, lq, dtype=torch.float32, device=q.device)
    kf, vf = k.to(ct), v.to(ct)
    options = (key_bias, alibi, softcap, key_group, group_bias)
    for r0, r1, tok, ok, ids in _chunks(q, v.shape[3], layout):
        kk, vv, _ = _gather(kf, vf, tok, H // k.shape[1])
        s, _ = _scores(_rows(q, r0, r1, layout_bq).to(ct), kk, tok, ok, ids, layout, bias, scale, r0, *options)
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
                             window: Optional[int], sinks: int, key_mask: Optional[torch.Tensor] = None,
                             key_bias: Optional[torch.Tensor] = None, alibi: Optional[torch.Tensor] = None,
                             q_pos: Optional[torch.Tensor] = None, k_pos: Optional[torch.Tensor] = None,
                             softcap: Optional[float] = None, q_seg: Optional[torch.Tensor] = None,
                             k_seg: Optional[torch.Tensor] = None, key_group: Optional[torch.Tensor] = None,
                             group_bias: Optional[torch.Tensor] = None):
    B, H, lq, d = q.shape
    lk = k.shape[2]
    ct = _compute_dtype(q)
    layout = _layout(lists, mask, bits, layout_bq, layout_bk, lq, lk, causal_offset, window, sinks, key_mask, q_pos,
                     k_pos, q_seg, k_seg)
    kf, vf = k.to(ct), v.to(ct)
    dq = torch.zeros(B, H, lq, d, dtype=ct)
    dk = torch.zeros(k.shape, dtype=ct)
    dv = torch.zeros(v.shape, dtype=ct)
    delta = (do.to(ct) * out.to(ct)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(ct)
    lse2 = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).to(ct)
    options = (key_bias, alibi, softcap, key_group, group_bias)
    for r0, r1, tok, ok, ids in _chunks(q, v.shape[3], layout):
        kk, vv, index = _gather(kf, vf, tok, H // k.shape[1])
        qc = _rows(q, r0, r1, layout_bq).to(ct)
        doc = _rows(do, r0, r1, layout_bq).to(ct)
        s, dcap = _scores(qc, kk, tok, ok, ids, layout, bias, scale, r0, *options)
        p = torch.exp(s - _rows(lse2, r0, r1, layout_bq)[..., None])
        dp = torch.einsum("bhrqd,bhrsd->bhrqs", doc, vv)
        ds = p * (dp - _rows(delta, r0, r1, layout_bq)[..., None])
        if dcap is not None:  # through the softcap: d(c tanh(s / c)) / ds = 1 - tanh(s / c)^2
            ds = ds * dcap
        n = min(lq, r1 * layout_bq) - r0 * layout_bq
        dq[:, :, r0 * layout_bq:r1 * layout_bq] = (torch.einsum("bhrqs,bhrsd->bhrqd", ds, kk) * scale).flatten(2, 3)[:, :, :n]
        # Scatter the gathered key/value gradients back (padding tokens carry exact zeros).
        dk.index_put_(index, torch.einsum("bhrqs,bhrqd->bhrsd", ds, qc) * scale, accumulate=True)
        dv.index_put_(index, torch.einsum("bhrqs,bhrqd->bhrsd", p, doc), accumulate=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def probabilities(q, k, lse, lists: List[torch.Tensor], mask: Optional[torch.Tensor], bits: Optional[torch.Tensor],
                  scale: float, layout_bq: int, layout_bk: int, causal_offset: Optional[int], window: Optional[int],
                  sinks: int, key_mask=None, q_pos=None, k_pos=None, q_seg=None, k_seg=None):
    """Yield ``(r0, r1, tok, p)`` per chunk of query blocks ``[r0, r1)``: the key index of each
    gathered slot ``tok [B, H, R, S]`` and the normalised probabilities ``p [B, H, R, BLOCK_Q, S]``
    recomputed from the saved LSE (0 on slots that are padding or masked), as the backward does:
    what the statistics op's CPU path reduces. Memory O(listed blocks of a chunk)."""
    B, H, lq, d = q.shape
    lk = k.shape[2]
    ct = _compute_dtype(q)
    layout = _layout(lists, mask, bits, layout_bq, layout_bk, lq, lk, causal_offset, window, sinks, key_mask, q_pos,
                     k_pos, q_seg, k_seg)
    kf = k.to(ct)
    lse2 = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).to(ct)
    for r0, r1, tok, ok, ids in _chunks(q, 0, layout):
        kk, _, _ = _gather(kf, kf[..., :0], tok, H // k.shape[1])
        s, _ = _scores(_rows(q, r0, r1, layout_bq).to(ct), kk, tok, ok, ids, layout, None, scale, r0)
        yield r0, r1, tok, torch.exp(s - _rows(lse2, r0, r1, layout_bq)[..., None])
