"""HiP's PyTorch CPU path: the tree search and the token-sparse attention with plain tensor ops,
vectorised over (batch, head, query block), computing in float32 like the kernels (the same
packed sort keys, the same float32 initial split), so that it selects what the kernel selects.

Attention gathers, per query block, the keys of its three sets (the sinks, the window's range of
the block, the selected blocks): memory ``O(B H Lq (sinks + window + block_size_q + mask_k))``,
never ``Lq x Lk``. Its backward recomputes those gathers and scatters dK / dV back.

Key padding (``config.py``'s docstring): ``q_pos`` arrives counted from each sequence's first real
key; ``kpm`` bool ``[B, Lk]`` and ``k_off`` int ``[B]`` (the leading padded keys) map the keys: a
key at relative position ``r`` is row ``r + k_off[b]`` of k."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .config import MASKED_SCORE, PAD_INDEX, HiP


def _kv_heads(t: Tensor, H: int) -> Tensor:
    return t.repeat_interleave(H // t.shape[1], 1) if t.shape[1] != H else t


def _gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    """t [B, H, L, D], idx [B, H, ...] (in range) -> [B, H, ..., D]."""
    B, H, L, D = t.shape
    flat = idx.reshape(B, H, -1)
    return torch.gather(t, 2, flat[..., None].expand(B, H, flat.shape[2], D)).reshape(*idx.shape, D)


def _block_positions(q_pos: Tensor, B: int, Lq: int, bq: int) -> Tensor:
    """int64 [B, nQ, bq] positions of each block's rows, -1 past Lq."""
    nq = -(-Lq // bq)
    pos = torch.full((B, nq * bq), -1, dtype=torch.int64, device=q_pos.device)
    pos[:, :Lq] = q_pos.expand(B, Lq)
    return pos.view(B, nq, bq)


def _keys(kpm: Optional[Tensor], k_off: Optional[Tensor], B: int, Lk: int, dev):
    """(bool [B, Lk + 1] keys that exist, a False column appended for out-of-range keys; int64 [B]
    offsets)."""
    ok = torch.ones(B, Lk, dtype=torch.bool, device=dev) if kpm is None else kpm.bool()
    off = torch.zeros(B, dtype=torch.int64, device=dev) if k_off is None else k_off.long()
    return torch.nn.functional.pad(ok, (0, 1)), off


def _exists(ok: Tensor, rows: Tensor) -> Tensor:
    """ok [B, Lk + 1], rows int64 [B, H, ...] (any value) -> bool [B, H, ...]: the row is in [0, Lk)
    and not padding."""
    B, Lk = ok.shape[0], ok.shape[1] - 1
    r = torch.where((rows >= 0) & (rows < Lk), rows, Lk)
    return torch.gather(ok, 1, r.reshape(B, -1)).reshape(r.shape)


def hip_mask_cpu(q: Tensor, k: Tensor, q_pos: Tensor, hip: HiP, scale: float, rounds: int,
                 bq: int, kpm: Optional[Tensor] = None, k_off: Optional[Tensor] = None,
                 rounds_b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(indices int32 [B, H, nQ, K], counts int32 [B, H, nQ]); what ``triton_kernels/hip.py``'s
    mask kernel computes (``rounds_b`` int [B]: each sequence's round count, at most ``rounds``)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dev = q.device
    key_ok, off = _keys(kpm, k_off, B, Lk, dev)
    K, bk, sq, sk = hip.k_blocks, hip.block_size_k, hip.block_stride_q, hip.block_stride_k
    pos = _block_positions(q_pos, B, Lq, bq)
    nq = pos.shape[1]
    p_last = pos.amax(-1)                                                          # [B, nQ]
    tsrc = (p_last + 1 - hip.window - hip.sinks).clamp(min=0)
    bsrc = -(-tsrc // bk)
    nsb = hip.n_sink_blocks
    kk = torch.arange(K, device=dev)
    # blocks without a search: every candidate
    direct = torch.where(kk < bsrc[..., None], (nsb + kk) * bk + off[:, None, None], PAD_INDEX)   # [B, nQ, K]
    idx = direct[:, None].expand(B, H, nq, K).clone()
    cnt = bsrc.clamp(max=K)[:, None].expand(B, H, nq).clone()
    search = tsrc > hip.mask_k
    if not bool(search.any()) or rounds == 0:
        return idx.to(torch.int32), cnt.to(torch.int32)
    # strided rows counted back from each block's last existing row
    starts = torch.arange(nq, device=dev) * bq
    r_last = torch.clamp(starts + bq, max=Lq) - 1
    rows = r_last[:, None] - torch.arange(bq // sq, device=dev) * sq                   # [nQ, R]
    row_ok = rows >= starts[:, None]
    rows_c = rows.clamp(min=0)
    qs = q.float()[:, :, rows_c] * row_ok[None, None, :, :, None]                     # [B, H, nQ, R, D]
    rpos = torch.where(row_ok[None], q_pos.expand(B, Lq).long()[:, rows_c], -1)      # [B, nQ, R]
    kf = _kv_heads(k, H).float()
    # HiP's float32 initial split
    top = torch.where(bsrc > 0, torch.pow(2, torch.floor(torch.log2(bsrc.clamp(min=1).double()))).long(), 1)
    align = -(-top // K)
    ratio = bsrc.float() / float(K)
    i = torch.arange(K + 1, device=dev, dtype=torch.float32)
    edge = torch.minimum((ratio[..., None] * i).long() // align[..., None] * align[..., None], bsrc[..., None]) + nsb
    node_s = edge[..., :-1]
    node_g = torch.clamp(torch.minimum(edge[..., 1:] - edge[..., :-1], bsrc[..., None]), min=0)
    node_s = node_s[:, None].expand(B, H, nq, K).clone()
    node_g = node_g[:, None].expand(B, H, nq, K).clone()
    j = torch.arange(bk // sk, device=dev) * sk + (sk - 1)
    ci = torch.arange(2 * K, device=dev)
    for r in range(rounds):
        half = node_g // 2
        cs = torch.stack((node_s, node_s + half), -1).flatten(-2)                     # [B, H, nQ, 2K]
        cg = torch.stack((half, node_g - half), -1).flatten(-2)
        keys = (cs + cg // 2)[..., None] * bk + j                                      # [B, H, nQ, 2K, NKS]
        rows_k = keys + off[:, None, None, None, None]                                 # rows of k
        k_ok = _exists(key_ok, rows_k)
        kv = _gather_rows(kf, rows_k.clamp(max=Lk - 1))                                # [..., 2K, NKS, D]
        s = torch.einsum("bhqrd,bhqcjd->bhqrcj", qs, kv)
        ok = row_ok[None, None, :, :, None, None] & k_ok[:, :, :, None] & (s != 0) & \
            (keys[:, :, :, None] <= rpos[:, None, :, :, None, None] - hip.window)
        s = torch.where(ok, s * scale, MASKED_SCORE).amax(-1).amax(-2)                  # [B, H, nQ, 2K]
        s = torch.where(cg > 0, s, float("-inf"))
        bits = s.view(torch.int32).long()
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = ((2147483647 - ordered) << 16) | ci
        kth = key.sort(-1).values[..., K - 1:K]
        kept = key <= kth
        packed = torch.where(kept, 0, 1 << 62) | (cs << 21) | cg
        first = packed.sort(-1).values[..., :K]
        new_s, new_g = (first >> 21) & ((1 << 40) - 1), first & ((1 << 21) - 1)
        if rounds_b is None:
            node_s, node_g = new_s, new_g
        else:                                          # a sequence's own rounds: later ones leave it
            on = (r < rounds_b.long())[:, None, None, None]
            node_s, node_g = torch.where(on, new_s, node_s), torch.where(on, new_g, node_g)
    alive = node_g > 0
    final = torch.where(alive, 0, 1 << 62) | node_s
    final = final.sort(-1).values & ((1 << 40) - 1)
    count = alive.sum(-1)
    found = torch.where(kk < count[..., None], final * bk + off[:, None, None, None], PAD_INDEX)
    sel = search[:, None].expand(B, H, nq)
    idx = torch.where(sel[..., None], found, idx)
    cnt = torch.where(sel, count, cnt)
    return idx.to(torch.int32), cnt.to(torch.int32)


def _attention_parts(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, indices: Tensor, counts: Tensor, hip: HiP,
                     scale: float, bq: int, kpm: Optional[Tensor] = None, k_off: Optional[Tensor] = None):
    """The forward's pieces: (key index per block [B, H, nQ, N], gathered K / V float32
    [B, H, nQ, N, D], query blocks float32 [B, H, nQ, bq, D], probabilities [B, H, nQ, bq, N],
    lse [B, H, nQ, bq])."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dev = q.device
    W, S, bk = hip.window, hip.sinks, hip.block_size_k
    key_ok, off = _keys(kpm, k_off, B, Lk, dev)
    o = off[:, None, None, None]
    pos = _block_positions(q_pos, B, Lq, bq)                                       # [B, nQ, bq]
    nq = pos.shape[1]
    p_lo = torch.where(pos >= 0, pos, 1 << 40).amin(-1)                             # [B, nQ]
    # the three key lists of each block: sinks, the window's range (relative positions), the
    # selected tokens (rows of k)
    sink = torch.arange(S, device=dev).expand(B, nq, S)
    win = p_lo[..., None] - W + 1 + torch.arange(W + bq - 1, device=dev)
    n_sel = indices.shape[-1] * bk
    t = torch.arange(n_sel, device=dev)
    listed = t < counts[..., None].long() * bk                                     # [B, H, nQ, n_sel]
    sel = torch.where(listed, indices.long().gather(-1, (t // bk).expand_as(listed)) + t % bk, -1)
    keys = torch.cat((sink[:, None].expand(B, H, nq, S) + o, win[:, None].expand(B, H, nq, W + bq - 1) + o, sel), -1)
    kind = torch.cat((torch.zeros(S, device=dev), torch.ones(W + bq - 1, device=dev),
                      torch.full((n_sel,), 2.0, device=dev)))                          # 0 sink, 1 window, 2 selected
    p = pos[:, None, :, :, None]                                                   # [B, 1, nQ, bq, 1]
    j = (keys - o)[:, :, :, None, :]                                               # [B, H, nQ, 1, N] relative
    exists = (keys >= 0)[:, :, :, None, :] & _exists(key_ok, keys)[:, :, :, None, :] & (p >= 0)
    keep = torch.where(kind == 0, (j < S) & (j <= p - W),
                       torch.where(kind == 1, (j > p - W) & (j <= p), (j >= S) & (j <= p - W))) & exists
    keys = keys.clamp(0, Lk - 1)
    kg = _gather_rows(_kv_heads(k, H).float(), keys)                               # [B, H, nQ, N, D]
    vg = _gather_rows(_kv_heads(v, H).float(), keys)
    qb = torch.nn.functional.pad(q.float(), (0, 0, 0, nq * bq - Lq)).view(B, H, nq, bq, D)
    s = torch.einsum("bhqmd,bhqnd->bhqmn", qb, kg) * scale
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    seen = lse > float("-inf")
    prob = torch.exp(s - torch.where(seen, lse, 0.0)[..., None]).masked_fill(~keep, 0.0)
    return keys, kg, vg, qb, prob, lse


def _rows(t: Tensor, Lq: int) -> Tensor:
    """[B, H, nQ, bq, ...] -> [B, H, Lq, ...]."""
    return t.flatten(2, 3)[:, :, :Lq]


def hip_attention_cpu(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, indices: Tensor, counts: Tensor, hip: HiP,
                      scale: float, bq: int, kpm: Optional[Tensor] = None,
                      k_off: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(out [B, H, Lq, Dv] in q's dtype, lse [B, H, Lq] float32)."""
    _, _, vg, _, prob, lse = _attention_parts(q, k, v, q_pos, indices, counts, hip, scale, bq, kpm, k_off)
    out = torch.einsum("bhqmn,bhqnd->bhqmd", prob, vg)
    return _rows(out, q.shape[2]).to(q.dtype), _rows(lse, q.shape[2]).contiguous()


def hip_attention_bwd_cpu(do: Tensor, dlse, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, indices: Tensor,
                          counts: Tensor, hip: HiP, scale: float, bq: int, kpm: Optional[Tensor] = None,
                          k_off: Optional[Tensor] = None):
    """(dq, dk, dv): the softmax backward over the same gathered keys, dK / dV scattered back."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    keys, kg, vg, qb, prob, _ = _attention_parts(q, k, v, q_pos, indices, counts, hip, scale, bq, kpm, k_off)
    nq = qb.shape[2]
    dob = torch.nn.functional.pad(do.float(), (0, 0, 0, nq * bq - Lq)).view(B, H, nq, bq, -1)
    out = torch.einsum("bhqmn,bhqnd->bhqmd", prob, vg)
    delta = (out * dob).sum(-1)
    if dlse is not None:
        delta = delta - torch.nn.functional.pad(dlse.float(), (0, nq * bq - Lq)).view(B, H, nq, bq)
    ds = prob * (torch.einsum("bhqmd,bhqnd->bhqmn", dob, vg) - delta[..., None])
    dq = _rows(torch.einsum("bhqmn,bhqnd->bhqmd", ds, kg) * scale, Lq)
    dkg = torch.einsum("bhqmn,bhqmd->bhqnd", ds, qb) * scale
    dvg = torch.einsum("bhqmn,bhqmd->bhqnd", prob, dob)

    def scatter(g: Tensor) -> Tensor:
        flat = keys.reshape(B, H, -1)
        acc = torch.zeros(B, H, Lk, g.shape[-1], dtype=torch.float32, device=q.device)
        acc.scatter_add_(2, flat[..., None].expand(-1, -1, -1, g.shape[-1]), g.reshape(B, H, -1, g.shape[-1]))
        return acc.view(B, Hkv, H // Hkv, Lk, -1).sum(2)

    return dq.to(q.dtype), scatter(dkg).to(k.dtype), scatter(dvg).to(v.dtype)
