"""HiP attention (hierarchically pruned attention, hip-attention v1.1): the mask estimation (tree
search) and the token-sparse attention over sinks, sliding window and the selected key blocks,
forward and backward.

Naming chain: ``_hip_mask_kernel`` -> launcher ``hip_mask`` -> custom op ``sparseattn::hip_mask``
-> public ``sparseattn.hip_mask`` -> oracle ``sparseattn.reference.hip_mask``;
``_hip_attention_fwd_kernel`` / ``_hip_attention_bwd_kernel`` -> ``hip_attention_fwd`` /
``hip_attention_bwd`` -> ``sparseattn::hip_attention_fwd`` / ``_bwd`` -> ``sparseattn.hip_attention``
(and ``hip_decode``) -> ``sparseattn.reference.hip_attention``. The algorithm, its defaults and the
decisions where this package departs from HiP's code are in ``sparseattn/ops/hip/config.py``.

**Mask** (one program per (batch, head, query block)): the block's strided query rows stay in
registers; the K tree nodes (start block, size) are two int32 vectors. A round builds the 2K
children (``tl.join``: left and right interleaved), scores them in chunks of 64 key columns (the
representative blocks' strided keys gathered from K, one ``tl.dot`` with the query rows, masked
products -32000, max over rows and keys; chunk scores go through a small scratch buffer, as Triton
cannot slice a register vector), then keeps the K best with two sorts of packed int64 keys: (score
descending, child index) to find the K-th best key, then (kept first, start, size) to gather the
kept children in start order. No [Lq, Lk] tensor: memory O(B H nQ K). One launch runs every round
(the round count comes from the host, from the lengths).

**Attention** (query-major; the query tile lies in one HiP query block): the one online softmax
of ``attention.py``'s forward BODY (``_fwd_tile``) over three disjoint key sets, walked by
:func:`hip_walk`: the sink keys before the window's range, the window's contiguous range (tiles
of BLOCK_N keys; both under the window rule of ``walk.py``, ``_causal`` + ``_window``), then the
selected keys as gathered tiles: BLOCK_N keys = BLOCK_N / block_size_k selected blocks, each row's
address from the mask (``load_cols_at``), under HiP's rule ``sinks <= j <= p - window``. Query
positions are data (``q_pos`` [B, Lq]), so ragged decode batches need no layout.

**Backward** (one query-major kernel): dQ over the same walk; dK / dV of every visited tile added
with fp32 atomics into [B, Hkv, Lk, D] buffers (a selected key is shared by query blocks that do
not know of each other: no transposed list exists). Not bitwise deterministic, unlike the
block-sparse backward.

**Key padding** (optional ``KPM`` uint8 [B, Lk], ``KOFF`` int32 [B] leading padded keys, ``ROUNDS``
int32 [B]; None without padding, compiled out): positions (``q_pos``) arrive counted from each
sequence's first real key (``config.py``); a key at relative position ``r`` is row ``r + KOFF[b]``
of K / V. The mask kernel runs on the plane shifted by ``KOFF[b]`` rows (the sequence as if
unpadded, with its own round count) and scores padded keys -32000; the attention walks relative
positions, loads rows ``r + KOFF[b]``, and drops padded keys from every set.
"""
from __future__ import annotations

from collections import namedtuple

import torch
import triton
import triton.language as tl

from .._alloc import empty, on_device
from .attention import LOG2E, _fwd_tile, bwd_delta, fwd_epilogue
from .common import (INTERPRET, Plane, block_d_of, load_cols_at, load_rows, load_rows_at, load_vec, log_tile,
                     plane, program_tile, save_tile_log, store_rows, tile_log, view, view_type)
from .walk import RuleFlags, _causal, _window, lse2_split

# HiP's rule data: lengths, window, sinks, base-2 score scale.
HipArgs = namedtuple("HipArgs", ["Lq", "Lk", "window", "sinks", "qk_scale"])
# The BODYs of attention.py read rule flags: none of the block-sparse rules is on here.
NO_RULES = RuleFlags(*([False] * len(RuleFlags._fields)))
MASKED_SCORE = tl.constexpr(-32000.0)
PAD_INDEX = tl.constexpr(2147483647)
MASK_COLS = 64          # key columns scored per chunk of children in the mask kernel


def _tiles(kernel: str, elem: int, bq: int, lq: int) -> dict:
    """The attention kernels' tiles (fixed; the GPU timing of issue 17 is to tune them), chosen
    from ptxas's report on sm_90 at D 128 (16-bit) / D 64 (fp32): no spills in the forward, <= 68
    bytes in the 16-bit backward (64 x 64 spilled 724). The query tile stays inside one HiP query
    block (BLOCK_M <= bq). Under the interpreter: the largest tiles (fewest iterations)."""
    if INTERPRET:
        m, n, warps = 64, 64, 4
    elif elem == 4:
        m, n, warps = 32, 32, 8
    else:
        m, n, warps = 64, 64 if kernel == "fwd" else 32, 8
    return dict(BLOCK_M=min(bq, m, max(16, triton.next_power_of_2(lq))), BLOCK_N=n, num_warps=warps)


# ----------------------------------------------------------------------------- mask
@triton.jit
def _children_scores(Q_rows, rows_pos, row_ok, K, SCR, SCORE, n_child, Lk, window, scale,
                     ROWS: tl.constexpr, CH: tl.constexpr, NKS: tl.constexpr, BK: tl.constexpr,
                     STRIDE_K: tl.constexpr, NC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     KPM=None):
    """Score the children whose representative block and size are in SCR[0:NC] / SCR[NC:2NC]
    into SCORE[0:NC]: max over the strided rows x the representative's strided keys of
    q.k * scale, -32000 where masked (key in the row's window or future, past Lk, product 0.0,
    row absent, a padded key where KPM, the sequence's uint8 key mask, says 0); -inf for size-0
    children."""
    j = tl.arange(0, NKS)
    for c0 in range(0, n_child, CH):
        c = c0 + tl.arange(0, CH)
        c_ok = c < n_child
        rep = tl.load(SCR + c, mask=c_ok, other=0)
        size = tl.load(SCR + NC + c, mask=c_ok, other=0)
        keys = tl.reshape(rep[:, None] * BK + j[None, :] * STRIDE_K + (STRIDE_K - 1), [CH * NKS])
        k_ok = tl.reshape(c_ok[:, None] & (j[None, :] >= 0), [CH * NKS]) & (keys < Lk)
        if KPM is not None:
            k_ok = k_ok & (tl.load(KPM + keys, mask=k_ok, other=0) != 0)
        kt = load_cols_at(K, keys, k_ok, True, HEAD_DIM, BLOCK_D)                            # [D, CH*NKS]
        s = tl.dot(Q_rows, kt, input_precision="ieee")                                       # [ROWS, CH*NKS]
        ok = row_ok[:, None] & k_ok[None, :] & (keys[None, :] <= rows_pos[:, None] - window) & (s != 0.0)
        s = tl.where(ok, s * scale, MASKED_SCORE)
        best = tl.max(tl.max(tl.reshape(s, [ROWS, CH, NKS]), 2), 0)                     # [CH]
        best = tl.where(size > 0, best, float("-inf"))
        tl.store(SCORE + c, best, mask=c_ok)


@triton.jit
def _first_half(x, N: tl.constexpr):
    """The first N entries of a [2N] vector."""
    a, _ = tl.split(tl.permute(tl.reshape(x, [2, N]), [1, 0]))
    return a


@triton.jit
def _hip_mask_kernel(Q, K, QPOS, qpos_sb, IDX, CNT, SCR, SCORE, Lq, Lk, H, GROUP, NQ, window, sinks, mask_k, scale,
                     rounds, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr,
                     STRIDE_Q: tl.constexpr, ROWS: tl.constexpr, BK: tl.constexpr, STRIDE_K: tl.constexpr,
                     KB: tl.constexpr, NKB: tl.constexpr, CH: tl.constexpr, KPM=None, KOFF=None, ROUNDS=None):
    """indices [B, H, NQ, KB] / counts [B, H, NQ] of one (batch, head, query block); SCR int32
    [programs, 4 NKB] and SCORE fp32 [programs, 2 NKB] are this program's scratch. Key padding
    (KPM uint8 [B, Lk], KOFF / ROUNDS int32 [B], or None): the search runs on the keys from row
    KOFF[b] on, with the sequence's own round count; the indices are shifted back."""
    NKS: tl.constexpr = BK // STRIDE_K
    pid = tl.program_id(0)
    qb = pid % NQ
    bh = pid // NQ
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if KOFF is not None:
        off = tl.load(KOFF + b)
        rounds = tl.load(ROUNDS + b)
        kpm = KPM + b * Lk + off
        Lk = Lk - off
    else:
        off = 0
        kpm = None
    start = qb * BQ
    offs = start + tl.arange(0, BQ)
    pos = tl.load(QPOS + b * qpos_sb + offs, mask=offs < Lq, other=-1)
    p_last = tl.max(pos)
    tsrc = tl.maximum(p_last + 1 - window - sinks, 0)
    bsrc = tl.cdiv(tsrc, BK)
    nsb = tl.cdiv(sinks, BK)
    kk = tl.arange(0, NKB)
    out = IDX + pid.to(tl.int64) * KB
    if tsrc <= mask_k:  # every candidate block is selected
        tl.store(out + kk, tl.where(kk < bsrc, (nsb + kk) * BK + off, PAD_INDEX), mask=kk < KB)
        tl.store(CNT + pid, bsrc)
    else:
        r_last = tl.minimum(start + BQ, Lq) - 1
        t = tl.arange(0, ROWS)
        rows = r_last - t * STRIDE_Q
        row_ok = (t < BQ // STRIDE_Q) & (rows >= start)
        q_rows = load_rows_at(plane(Q, b, h), rows, row_ok, True, HEAD_DIM, BLOCK_D)          # [ROWS, D]
        rows_pos = tl.load(QPOS + b * qpos_sb + rows, mask=row_ok, other=-1)
        Kp = plane(K, b, h // GROUP)
        if KOFF is not None:                                                 # the sequence from its first real key
            Kp = Plane(Kp.ptr + off.to(tl.int64) * Kp.sr, Kp.sr, Kp.sc)
        # initial split, HiP's float32 arithmetic, aligned to ceil(2^floor(log2 bsrc) / K)
        top = bsrc * 0 + 1
        while top * 2 <= bsrc:
            top *= 2
        align = tl.cdiv(top, KB)
        ratio = tl.math.div_rn(bsrc.to(tl.float32), tl.full([], KB, tl.float32))
        cur = tl.minimum(((ratio * kk.to(tl.float32)).to(tl.int32) // align) * align, bsrc) + nsb
        nxt = tl.minimum(((ratio * (kk + 1).to(tl.float32)).to(tl.int32) // align) * align, bsrc) + nsb
        node_s = cur
        node_g = tl.where(kk < KB, tl.maximum(tl.minimum(nxt - cur, bsrc), 0), 0)
        scr = SCR + pid.to(tl.int64) * (4 * NKB)
        sco = SCORE + pid.to(tl.int64) * (2 * NKB)
        ci = tl.arange(0, 2 * NKB)
        for _ in range(rounds):
            half = node_g // 2
            cs = tl.reshape(tl.join(node_s, node_s + half), [2 * NKB])     # children: left, right interleaved
            cg = tl.reshape(tl.join(half, node_g - half), [2 * NKB])
            tl.store(scr + ci, cs + cg // 2)                                 # representative blocks
            tl.store(scr + 2 * NKB + ci, cg)
            tl.debug_barrier()
            _children_scores(q_rows, rows_pos, row_ok, Kp, scr, sco, 2 * NKB, Lk, window, scale, ROWS, CH, NKS, BK,
                             STRIDE_K, 2 * NKB, HEAD_DIM, BLOCK_D, kpm)
            tl.debug_barrier()
            score = tl.load(sco + ci)
            # keys ordered as (score descending, child index ascending)
            bits = score.to(tl.int32, bitcast=True)
            ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
            key = ((2147483647 - ordered) << 16) | ci.to(tl.int64)               # < 2^48: 2K < 2^16
            kth = tl.sum(tl.where(ci == KB - 1, tl.sort(key), 0))
            kept = key <= kth
            # the kept children in start order (kept first), then the rest
            packed = tl.where(kept, 0, 1 << 62) | (cs.to(tl.int64) << 21) | cg.to(tl.int64)
            first = _first_half(tl.sort(packed), NKB)
            node_s = ((first >> 21) & ((1 << 40) - 1)).to(tl.int32)
            node_g = tl.where(kk < KB, (first & ((1 << 21) - 1)).to(tl.int32), 0)
            tl.debug_barrier()
        alive = node_g > 0
        final = tl.sort(tl.where(alive, 0, 1 << 62) | node_s.to(tl.int64))
        count = tl.sum(alive.to(tl.int32))
        tl.store(out + kk, tl.where(kk < count, (final & ((1 << 40) - 1)).to(tl.int32) * BK + off, PAD_INDEX),
                 mask=kk < KB)
        tl.store(CNT + pid, count)


def _rows_of(bq: int, stride_q: int) -> int:
    return max(16, bq // stride_q)


def _mask_consts(hip, bq: int, D: int) -> dict:
    nks = hip.block_size_k // hip.block_stride_k
    nkb = triton.next_power_of_2(hip.k_blocks)
    return dict(HEAD_DIM=D, BLOCK_D=block_d_of(D), BQ=bq, STRIDE_Q=hip.block_stride_q,
                ROWS=_rows_of(bq, hip.block_stride_q), BK=hip.block_size_k, STRIDE_K=hip.block_stride_k,
                KB=hip.k_blocks, NKB=nkb, CH=max(MASK_COLS // nks, 1))


def hip_mask(q, k, q_pos, hip, scale: float, rounds: int, bq: int, kpm=None, k_off=None, rounds_b=None):
    """Launch the mask estimation: q [B, H, Lq, D], k [B, Hkv, Lk, D] (any strides), q_pos int32
    [B|1, Lq] (row stride 1), query blocks of ``bq`` rows; key padding: kpm uint8 [B, Lk]
    (contiguous), k_off / rounds_b int32 [B], or all None. Returns (indices int32 [B, H, nQ, K],
    counts int32 [B, H, nQ])."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nq = triton.cdiv(Lq, bq)
    consts = _mask_consts(hip, bq, D)
    nkb = consts["NKB"]
    idx = empty(B, H, nq, hip.k_blocks, dtype=torch.int32, device=q.device)
    cnt = empty(B, H, nq, dtype=torch.int32, device=q.device)
    progs = B * H * nq
    scr = torch.empty(progs, 4 * nkb, dtype=torch.int32, device=q.device)
    sco = torch.empty(progs, 2 * nkb, dtype=torch.float32, device=q.device)
    qpos_sb = q_pos.stride(0) if q_pos.shape[0] > 1 else 0
    if progs:
        with on_device(q):
            _hip_mask_kernel[(progs,)](view(q), view(k), q_pos, qpos_sb, idx, cnt, scr, sco, Lq, Lk, H, H // Hkv, nq,
                                       hip.window, hip.sinks, hip.mask_k, scale, rounds, **consts, KPM=kpm, KOFF=k_off,
                                       ROUNDS=rounds_b, num_warps=4, num_stages=1)
    return idx, cnt


# ----------------------------------------------------------------------------- attention
@triton.jit
def _hip_keep(ok, pq, kj, args, SELECTED: tl.constexpr):
    """HiP's attended set of query positions ``pq`` [M, 1] and keys ``kj`` [1, N] (``ok``: the key
    exists and belongs to this set's list): the window rule of the block-sparse walk (causal, the
    last ``window`` keys, plus sinks), or for the selected keys ``sinks <= j <= p - window``."""
    if SELECTED:
        return _causal(ok & (kj >= args.sinks), pq - args.window, kj)
    else:
        return _window(_causal(ok, pq, kj), pq, kj, args)


@triton.jit
def _visit(carry, ctx, q, pq, rows, kj, ok, X, Y, args, SELECTED: tl.constexpr, BODY: tl.constexpr,
           RULES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr,
           BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, KPM=None):
    """One key tile at rows ``rows`` of K / V, relative positions ``kj`` (``ok``: listed and inside
    Lk): scores, HiP's rule, the BODY. KPM: the sequence's uint8 key mask (padded keys dropped)."""
    if KPM is not None:
        ok = ok & (tl.load(KPM + rows, mask=ok, other=0) != 0)
    x = load_cols_at(X, rows, ok, True, HEAD_DIM, BLOCK_D)                                    # [D, N]
    if Y is not None:
        y = load_cols_at(Y, rows, ok, True, HEAD_DV, BLOCK_DV)
    else:
        y = None
    s = tl.dot(q, x, input_precision=PRECISION) * args.qk_scale
    s = tl.where(_hip_keep(ok[None, :], pq[:, None], kj[None, :], args, SELECTED), s, float("-inf"))
    carry, _ = BODY(carry, ctx, s, 1.0, x, y, rows, True, RULES, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, PRECISION)
    return carry


@triton.jit
def hip_walk(carry, ctx, q, pq, X, Y, args, idx, count, BLOCK_N: tl.constexpr, BK: tl.constexpr, BODY: tl.constexpr,
             RULES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
             PRECISION: tl.constexpr, LOG=None, log_plane=0, KPM=None, off=0):
    """Visit HiP's three disjoint key sets for the query rows at positions ``pq`` (-1: no row):
    the sinks before the window's range, the window's range (tiles aligned to BLOCK_N), then the
    ``count`` selected blocks of BK tokens whose token offsets start at ``idx``. LOG: the tile log
    (work accounting, ``walk.py``: row = the set, 0 sinks / 1 window / 2 selected) or None;
    log_plane: the (batch, head) plane it logs under. Key padding: positions are relative, key
    ``r`` is row ``r + off``; KPM (the sequence's uint8 key mask) or None."""
    Lk = args.Lk
    lo = tl.min(tl.where(pq >= 0, pq, 1 << 30))
    hi = tl.max(pq)
    w_lo = (tl.maximum(lo - args.window + 1, 0) // BLOCK_N) * BLOCK_N
    for n0 in range(0, tl.minimum(args.sinks, w_lo), BLOCK_N):                # sinks left of the window's range
        kj = n0 + tl.arange(0, BLOCK_N)
        rows = kj + off
        if LOG is not None:
            log_tile(LOG, log_plane, 0, n0, 1)
        carry = _visit(carry, ctx, q, pq, rows, kj, rows < Lk, X, Y, args, False, BODY, RULES, HEAD_DIM, BLOCK_D,
                       HEAD_DV, BLOCK_DV, PRECISION, KPM)
    for n0 in range(w_lo, hi + 1, BLOCK_N):                                   # the window (and sinks inside it)
        kj = n0 + tl.arange(0, BLOCK_N)
        rows = kj + off
        if LOG is not None:
            log_tile(LOG, log_plane, 1, n0, 1)
        carry = _visit(carry, ctx, q, pq, rows, kj, rows < Lk, X, Y, args, False, BODY, RULES, HEAD_DIM, BLOCK_D,
                       HEAD_DV, BLOCK_DV, PRECISION, KPM)
    n_tok = count * BK
    for n0 in range(0, n_tok, BLOCK_N):                                       # the selected blocks, gathered
        v = n0 + tl.arange(0, BLOCK_N)
        listed = v < n_tok
        rows = tl.load(idx + v // BK, mask=listed, other=0) + v % BK
        if LOG is not None:
            log_tile(LOG, log_plane, 2, n0, 1)
        carry = _visit(carry, ctx, q, pq, rows, rows - off, listed & (rows < Lk), X, Y, args, True, BODY, RULES,
                       HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, PRECISION, KPM)
    return carry


@triton.jit
def _hip_rows(QPOS, qpos_sb, IDX, CNT, b, h, H, blk, NQ, offs_m, Lq, KB: tl.constexpr):
    """(positions of the tile's rows, -1 past Lq; the block's index list; its count)."""
    pq = tl.load(QPOS + b * qpos_sb + offs_m, mask=offs_m < Lq, other=-1)
    row = (b * H + h) * NQ + blk
    return pq, IDX + row * KB, tl.load(CNT + row)


@triton.jit
def _hip_attention_fwd_kernel(Q, K, V, O, LSE, QPOS, qpos_sb, IDX, CNT, args, H, GROUP, NQ,
                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr,
                              BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BQ: tl.constexpr,
                              BK: tl.constexpr, KB: tl.constexpr, RULES: tl.constexpr, PRECISION: tl.constexpr,
                              LOG=None, KPM=None, KOFF=None):
    """O [B, H, Lq, Dv] and LSE [B, H, Lq] of one query tile (inside query block ``blk``); key
    padding: KPM uint8 [B, Lk] and KOFF int32 [B], or None."""
    Lq = args.Lq
    b, h, hk, blk, offs_m = program_tile(Lq, H, GROUP, BLOCK_M, BQ)
    q = load_rows(plane(Q, b, h), offs_m, Lq, True, HEAD_DIM, BLOCK_D)
    pq, idx, count = _hip_rows(QPOS, qpos_sb, IDX, CNT, b, h, H, blk, NQ, offs_m, Lq, KB)
    init = (tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32),
            tl.full([BLOCK_M], float("-inf"), dtype=tl.float32))
    if KOFF is not None:                                   # key padding: the sequence's mask and offset
        kpm = KPM + b * args.Lk
        off = tl.load(KOFF + b)
    else:
        kpm = None
        off = 0
    carry = hip_walk(init, (plane(V, b, hk), args.Lk, args), q, pq, plane(K, b, hk), None, args, idx, count, BLOCK_N,
                     BK, _fwd_tile, RULES, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, PRECISION,
                     LOG, b * H + h, kpm, off)
    out, lse = fwd_epilogue(carry)
    store_rows(plane(O, b, h), offs_m, Lq, out, HEAD_DV, BLOCK_DV)
    tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _hip_bwd_tile(dq, ctx, s, dcap, k_t, v_t, offs_n, MASKED: tl.constexpr, RULES: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Backward BODY over one key tile: dQ in the carry; dK, dV of the tile's rows added to the fp32
    buffers with atomics. ctx (dO tile, base-2 LSE as hi + lo, delta, q tile, dK / dV planes, Lk, scale)."""
    do, hi, lo, delta, q, DK, DV, Lk, sm_scale = ctx
    p = tl.math.exp2((s - hi[:, None]) - lo[:, None])
    dp = tl.dot(do, v_t, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=PRECISION)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)                      # [N, DV]
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * sm_scale            # [N, D]
    ok = offs_n < Lk
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.atomic_add(DK.ptr + offs_n[:, None].to(tl.int64) * DK.sr + offs_d[None, :] * DK.sc, dk,
                  mask=ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.atomic_add(DV.ptr + offs_n[:, None].to(tl.int64) * DV.sr + offs_dv[None, :] * DV.sc, dv,
                  mask=ok[:, None] & (offs_dv < HEAD_DV)[None, :])
    return dq, p


@triton.jit
def _hip_attention_bwd_kernel(Q, K, V, DO, DQ, DK, DV, LSE, DELTA, QPOS, qpos_sb, IDX, CNT, args, sm_scale, H, GROUP,
                              NQ, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr,
                              BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BQ: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, RULES: tl.constexpr,
                              PRECISION: tl.constexpr, LOG=None, KPM=None, KOFF=None):
    """dQ of one query tile; its share of dK / dV (fp32 DK, DV) by atomics (padded keys get none)."""
    Lq = args.Lq
    b, h, hk, blk, offs_m = program_tile(Lq, H, GROUP, BLOCK_M, BQ)
    q = load_rows(plane(Q, b, h), offs_m, Lq, True, HEAD_DIM, BLOCK_D)
    do = load_rows(plane(DO, b, h), offs_m, Lq, True, HEAD_DV, BLOCK_DV)
    pq, idx, count = _hip_rows(QPOS, qpos_sb, IDX, CNT, b, h, H, blk, NQ, offs_m, Lq, KB)
    hi, lo = lse2_split(LSE + (b * H + h) * Lq, offs_m, Lq, True)
    ctx = (do, hi, lo, load_vec(DELTA + (b * H + h) * Lq, offs_m, Lq, True),
           q, plane(DK, b, hk), plane(DV, b, hk), args.Lk, sm_scale)
    if KOFF is not None:                                   # key padding: the sequence's mask and offset
        kpm = KPM + b * args.Lk
        off = tl.load(KOFF + b)
    else:
        kpm = None
        off = 0
    dq = hip_walk(tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), ctx, q, pq, plane(K, b, hk), plane(V, b, hk), args,
                  idx, count, BLOCK_N, BK, _hip_bwd_tile, RULES, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, PRECISION,
                  LOG, b * H + h, kpm, off)
    store_rows(plane(DQ, b, h), offs_m, Lq, dq * sm_scale, HEAD_DIM, BLOCK_D)


def _attn_consts(kernel: str, q, v, hip, bq: int) -> dict:
    D, Dv = q.shape[3], v.shape[3]
    return dict(HEAD_DIM=D, BLOCK_D=block_d_of(D), HEAD_DV=Dv, BLOCK_DV=block_d_of(Dv), BQ=bq, BK=hip.block_size_k,
                KB=hip.k_blocks, RULES=NO_RULES, PRECISION="ieee", num_stages=2,
                **_tiles(kernel, q.element_size(), bq, q.shape[2]))


def _log_meta(consts, B: int, H: int, Hkv: int) -> dict:
    """What a counted launch records besides its log (``common.Launch.meta``)."""
    return dict(BLOCK_M=consts["BLOCK_M"], BLOCK_N=consts["BLOCK_N"], BQ=consts["BQ"], BK=consts["BK"], B=B, H=H,
                Hkv=Hkv)


def _qpos_sb(q_pos) -> int:
    return q_pos.stride(0) if q_pos.shape[0] > 1 else 0


def hip_attention_fwd(q, k, v, q_pos, indices, counts, hip, scale: float, bq: int, kpm=None, k_off=None):
    """Launch the forward: q [B, H, Lq, D], k / v [B, Hkv, Lk, D|Dv] (any strides), q_pos int32
    [B|1, Lq] (row stride 1), the mask's indices / counts (contiguous) for query blocks of ``bq``
    rows, key padding kpm uint8 [B, Lk] (contiguous) and k_off int32 [B], or None. Returns
    (out [B, H, Lq, Dv] in q's dtype, lse [B, H, Lq] float64, natural log)."""
    B, H, Lq, _ = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = empty(B, H, Lq, dtype=torch.float64, device=q.device)   # float64: see attention.fwd_epilogue
    consts = _attn_consts("fwd", q, v, hip, bq)
    args = HipArgs(Lq, Lk, hip.window, hip.sinks, scale * LOG2E)
    grid = (triton.cdiv(Lq, consts["BLOCK_M"]) * B * H,)
    if grid[0]:
        with on_device(q):
            log = tile_log(q.device)
            _hip_attention_fwd_kernel[grid](view(q), view(k), view(v), view(out), lse, q_pos, _qpos_sb(q_pos),
                                            indices, counts, args, H, H // Hkv, indices.shape[2], **consts, LOG=log,
                                            KPM=kpm, KOFF=k_off)
            save_tile_log(log, "hip_attention_fwd", grid[0], **_log_meta(consts, B, H, Hkv))
    return out, lse


def hip_attention_bwd(do, dlse, q, k, v, out, lse, q_pos, indices, counts, hip, scale: float, bq: int, kpm=None,
                      k_off=None):
    """Launch the backward (``do`` contiguous). Returns (dq, dk, dv) in the input dtypes; dK / dV
    are summed with fp32 atomics (not bitwise deterministic)."""
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq = empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    dk = torch.zeros(B, Hkv, Lk, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(B, Hkv, Lk, Dv, dtype=torch.float32, device=q.device)
    consts = _attn_consts("bwd", q, v, hip, bq)
    args = HipArgs(Lq, Lk, hip.window, hip.sinks, scale * LOG2E)
    grid = (triton.cdiv(Lq, consts["BLOCK_M"]) * B * H,)
    if grid[0]:
        with on_device(q):
            delta = bwd_delta(out.contiguous(), do, dlse, consts["PRECISION"])   # saturated rows: dP - delta = 0
            log = tile_log(q.device)
            _hip_attention_bwd_kernel[grid](view(q), view(k), view(v), view(do), view(dq), view(dk), view(dv), lse,
                                            delta, q_pos, _qpos_sb(q_pos), indices, counts, args, scale, H, H // Hkv,
                                            indices.shape[2], **consts, LOG=log, KPM=kpm, KOFF=k_off)
            save_tile_log(log, "hip_attention_bwd", grid[0], **_log_meta(consts, B, H, Hkv))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------- compile gate
def compile_specs(cc: int):
    """The mask, forward and backward kernels at HiP's defaults (mask_k 512, block_size_q 64,
    block_size_k 2) for bf16 D 128 (without key padding) and fp32 D 64 (with key padding: KPM,
    KOFF, ROUNDS), plus the forward at block_size_k 1 and the mask at block_size_k 64 (bf16 D 128),
    at the tiles :func:`_tiles` picks (kept few for CI's time)."""
    from ..ops.hip.config import HiP
    from .gate import Spec, signature

    cases = [("bf16", 128, HiP(), ("hip_mask", "hip_fwd", "hip_bwd")),
             ("fp32", 64, HiP(), ("hip_mask", "hip_fwd", "hip_bwd")),
             ("bf16", 128, HiP(block_size_k=1), ("hip_fwd",)),
             ("bf16", 128, HiP(block_size_k=64, block_stride_k=4), ("hip_mask",))]
    kernels = {"hip_mask": _hip_mask_kernel, "hip_fwd": _hip_attention_fwd_kernel, "hip_bwd": _hip_attention_bwd_kernel}
    for tname, d, hip, names in cases:
        ptr = "*" + tname
        elem = 4 if tname == "fp32" else 2
        types = {**{n: view_type(ptr) for n in ("Q", "K", "V", "O", "DO", "DQ")},
                 **{n: view_type("*fp32") for n in ("DK", "DV")}, "LSE": "*fp64", "DELTA": "*fp32",
                 "QPOS": "*i32", "IDX": "*i32", "CNT": "*i32", "SCR": "*i32", "SCORE": "*fp32",
                 "args": HipArgs("i32", "i32", "i32", "i32", "fp32"), "scale": "fp32", "sm_scale": "fp32",
                 "KPM": "*u8", "KOFF": "*i32", "ROUNDS": "*i32"}
        padded = tname == "fp32"                        # the key padding variant (the others: None)
        for name in names:
            kernel = kernels[name]
            tags = {"dtype": tname, "D": d, "bk": hip.block_size_k, "padded": padded}
            if name == "hip_mask":
                consts, warps, stages = _mask_consts(hip, 64, d), 4, 1
                if not padded:
                    consts.update(KPM=None, KOFF=None, ROUNDS=None)
            else:
                tiles = _tiles(name[4:], elem, 64, 1 << 20)
                warps, stages = tiles.pop("num_warps"), 2
                consts = dict(HEAD_DIM=d, BLOCK_D=block_d_of(d), HEAD_DV=d, BLOCK_DV=block_d_of(d), BQ=64,
                              BK=hip.block_size_k, KB=hip.k_blocks, RULES=NO_RULES, PRECISION="ieee", LOG=None, **tiles)
                if not padded:
                    consts.update(KPM=None, KOFF=None)
            yield Spec(name, kernel, signature(kernel, types), consts, warps, stages, tags=tags)
