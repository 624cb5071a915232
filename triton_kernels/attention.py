"""Fused block-sparse flash attention: forward, and backward (delta preprocess, dK/dV, dQ).

Naming chain: ``_sparse_attention_fwd_kernel`` -> launcher ``sparse_attention_fwd`` -> custom op
``sparseattn::sparse_attention_fwd`` -> public ``sparseattn.sparse_attention`` -> oracle
``sparseattn.reference.sparse_attention`` (likewise ``_bwd_*`` / ``sparse_attention_bwd``).

Every kernel walks a BlockLayout: for its query tile (forward, dQ) or key tile (dK/dV) it loops
first over the partial blocks, with the in-block masks (bounds, causal, sliding window with sinks,
packed tile bitmasks, element mask), then over the full blocks with no mask arithmetic at all. A layout block may be split into several kernel
tiles (the kernel tile divides the layout block). Softmax is online, in base 2, in fp32; LSE is
stored in natural log. A row with no visible key gets output 0, LSE -inf and zero gradients.
GQA: query head h reads key/value head h // GROUP; dK/dV loops over the group's query heads, so
repeated K/V are never materialised and no atomics are needed. Offsets are 64-bit.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import triton
import triton.language as tl

from .._alloc import empty, on_device
from .common import Tuner, attention_tile_fits, device_smem_limit, load_tile, tile_and_plane

LOG2E = 1.4426950408889634

# Autotune configs, beside the kernels; the prune is attention_tile_fits. Listed best guess first
# (SPARSEATTN_AUTOTUNE=0 runs the first that fits). Chosen from ptxas's register report for sm_90
# (bf16, D 64 and 128, dense and causal; `python -m sparseattn.triton_kernels.gate --cc 90
# --resources`): the first config of each list spills nothing there, except dK/dV at D = 128 where
# no tensor-core (wgmma) tile is spill-free and 32 x 128 spills ~70 bytes; 64 x 32 is spill-free
# but uses mma.sync. Configs that spilled kilobytes at D = 128 (dK/dV 64 x 64 x 4 warps, dQ 64 x 64
# x 4 warps) are gone; which of the rest is fastest is for the GPU timing to say (issue 6).
FWD_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
]
DKDV_CONFIGS = [
    {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
]
DQ_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
]
PREPROCESS_BLOCK_M = 64


def _fits(kernel):
    def fits(cfg, *, layout_bq, layout_bk, block_d, elem, smem, **_):
        return attention_tile_fits(cfg, kernel=kernel, layout_bq=layout_bq, layout_bk=layout_bk, block_d=block_d,
                                   elem=elem, smem=smem)
    return fits


FWD_TUNER = Tuner("sparse_attention_fwd", FWD_CONFIGS, _fits("fwd"))
DKDV_TUNER = Tuner("sparse_attention_bwd_dkdv", DKDV_CONFIGS, _fits("dkdv"))
DQ_TUNER = Tuner("sparse_attention_bwd_dq", DQ_CONFIGS, _fits("dq"))


# ----------------------------------------------------------------------------- shared pieces
@triton.jit
def _score_mods(s, qi, kj, Mask, smm, smn, Bias, sbm, sbn, Bits, bit_id, Lq, Lk, causal_off, window, sinks, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_BITS: tl.constexpr, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr):
    """Scale raw scores to base 2, add the float bias, and in partial tiles mask them to -inf.
    ``qi`` / ``kj`` are broadcastable query / key positions in the orientation of ``s``;
    ``bit_id`` is the tile's bitmask (-1: none)."""
    s = s * qk_scale
    if HAS_BIAS:
        b_ptrs = Bias + qi.to(tl.int64) * sbm + kj.to(tl.int64) * sbn
        if MASKED:
            b = tl.load(b_ptrs, mask=(qi < Lq) & (kj < Lk), other=0.0)
        else:
            b = tl.load(b_ptrs)
        s = s + b.to(tl.float32) * 1.4426950408889634
    if MASKED:
        keep = (qi < Lq) & (kj < Lk)
        if CAUSAL:
            keep = keep & (kj <= qi + causal_off)
        if HAS_WINDOW:
            keep = keep & ((qi + causal_off - kj < window) | (kj < sinks))
        if HAS_MASK:
            m = tl.load(Mask + qi.to(tl.int64) * smm + kj.to(tl.int64) * smn, mask=keep, other=0)
            keep = keep & (m != 0)
        if HAS_BITS:
            NW: tl.constexpr = (LAYOUT_BK + 31) // 32
            col_in = kj % LAYOUT_BK
            tile = Bits + tl.maximum(bit_id, 0).to(tl.int64) * (LAYOUT_BQ * NW)
            w = tl.load(tile + (qi % LAYOUT_BQ) * NW + col_in // 32, mask=keep & (bit_id >= 0), other=-1)
            keep = keep & (((w >> (col_in % 32)) & 1) != 0)
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _lse2(LSE_base, offs, Lq, MASKED: tl.constexpr):
    """LSE in base 2 with -inf (row sees nothing) turned into +inf so that exp2(s - lse) = 0."""
    if MASKED:
        lse = tl.load(LSE_base + offs, mask=offs < Lq, other=0.0)
    else:
        lse = tl.load(LSE_base + offs)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_loop(acc, l_i, m_i, q, K_base, skn, skd, V_base, svn, svd, Mask_base, smm, smn, Bias_base, sbm, sbn,
              Bits, idx_ptr, bid_ptr, count, offs_m, offs_d, d_ok, Lq, Lk, causal_off, window, sinks, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_BITS: tl.constexpr, BLOCK_N: tl.constexpr, LAYOUT_BQ: tl.constexpr,
              LAYOUT_BK: tl.constexpr, PAD_D: tl.constexpr, PRECISION: tl.constexpr):
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    for t in range(count * SUB):
        jb = tl.load(idx_ptr + t // SUB)
        if MASKED and HAS_BITS:
            bid = tl.load(bid_ptr + t // SUB)
        else:
            bid = -1
        offs_n = jb * LAYOUT_BK + (t % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = load_tile(K_base + offs_n[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                      offs_n[None, :] < Lk, d_ok[:, None], MASKED, PAD_D)                     # [D, N]
        s = tl.dot(q, k, input_precision=PRECISION)
        s = _score_mods(s, offs_m[:, None], offs_n[None, :], Mask_base, smm, smn, Bias_base, sbm, sbn, Bits, bid,
                        Lq, Lk, causal_off, window, sinks, qk_scale, MASKED, CAUSAL, HAS_WINDOW, HAS_MASK, HAS_BIAS,
                        HAS_BITS, LAYOUT_BQ, LAYOUT_BK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_BIAS:  # a row can still be all -inf here: keep exp2 away from inf - inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(V_base + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :] * svd,
                      offs_n[:, None] < Lk, d_ok[None, :], MASKED, PAD_D)                     # [N, D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _sparse_attention_fwd_kernel(
        Q, K, V, O, LSE, Mask, Bias, Bits, KVN, KVI, KVB, FKVN, FKVI,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        smb, smh, smm, smn, sbb, sbh, sbm, sbn,
        L_SB, L_SH, NQ, WP, WF,
        H, GROUP, Lq, Lk, causal_off, window, sinks, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BITS: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_bh = tile_and_plane(Lq, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    row_blk = start_m // LAYOUT_BQ
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D

    q = load_tile(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                  offs_m[:, None] < Lq, d_ok[None, :], True, PAD_D)
    K_base = K + b * skb + hk * skh
    V_base = V + b * svb + hk * svh
    Mask_base = Mask + b * smb + h * smh
    Bias_base = Bias + b * sbb + h * sbh
    row = (b * L_SB + h * L_SH) * NQ + row_blk

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, skn, skd, V_base, svn, svd, Mask_base, smm, smn,
                              Bias_base, sbm, sbn, Bits, KVI + row * WP, KVB + row * WP, tl.load(KVN + row),
                              offs_m, offs_d, d_ok, Lq, Lk, causal_off, window, sinks, qk_scale, True, CAUSAL,
                              HAS_WINDOW, HAS_MASK, HAS_BIAS, HAS_BITS, BLOCK_N, LAYOUT_BQ, LAYOUT_BK, PAD_D, PRECISION)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, skn, skd, V_base, svn, svd, Mask_base, smm, smn,
                              Bias_base, sbm, sbn, Bits, FKVI + row * WF, FKVI + row * WF, tl.load(FKVN + row),
                              offs_m, offs_d, d_ok, Lq, Lk, causal_off, window, sinks, qk_scale, False, CAUSAL,
                              HAS_WINDOW, HAS_MASK, HAS_BIAS, HAS_BITS, BLOCK_N, LAYOUT_BQ, LAYOUT_BK, PAD_D, PRECISION)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    row_ok = offs_m < Lq
    o_ptrs = O + b * sob + h * soh + offs_m[:, None].to(tl.int64) * som + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _sparse_attention_bwd_preprocess_kernel(O, DO, DLSE, DELTA, H, Lq, HEAD_DIM: tl.constexpr,
                                            BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                            HAS_DLSE: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE (O, dO contiguous [B, H, Lq, D]; DELTA, DLSE [B, H, Lq])."""
    pid_m, bh = tile_and_plane(Lq, BLOCK_M)
    bh = bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    off = bh * Lq * HEAD_DIM + offs_m[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + off, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _dkdv_loop(dk, dv, k, v, Q_base, sqm, sqd, DO_base, sdom, sdod, LSE_base, DELTA_base,
               Mask_base, smm, smn, Bias_base, sbm, sbn, Bits, idx_ptr, bid_ptr, count, offs_n, offs_d, d_ok,
               Lq, Lk, causal_off, window, sinks, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_BITS: tl.constexpr, BLOCK_M: tl.constexpr, LAYOUT_BQ: tl.constexpr,
               LAYOUT_BK: tl.constexpr, PAD_D: tl.constexpr, PRECISION: tl.constexpr):
    SUB: tl.constexpr = LAYOUT_BQ // BLOCK_M
    for t in range(count * SUB):
        ib = tl.load(idx_ptr + t // SUB)
        if MASKED and HAS_BITS:
            bid = tl.load(bid_ptr + t // SUB)
        else:
            bid = -1
        offs_m = ib * LAYOUT_BQ + (t % SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
        q_t = load_tile(Q_base + offs_m[None, :].to(tl.int64) * sqm + offs_d[:, None] * sqd,
                        offs_m[None, :] < Lq, d_ok[:, None], MASKED, PAD_D)                   # [D, M]
        s_t = tl.dot(k, q_t, input_precision=PRECISION)                                       # [N, M]
        s_t = _score_mods(s_t, offs_m[None, :], offs_n[:, None], Mask_base, smm, smn, Bias_base, sbm, sbn, Bits,
                          bid, Lq, Lk, causal_off, window, sinks, qk_scale, MASKED, CAUSAL, HAS_WINDOW, HAS_MASK,
                          HAS_BIAS, HAS_BITS, LAYOUT_BQ, LAYOUT_BK)
        p_t = tl.math.exp2(s_t - _lse2(LSE_base, offs_m, Lq, MASKED)[None, :])
        do = load_tile(DO_base + offs_m[:, None].to(tl.int64) * sdom + offs_d[None, :] * sdod,
                       offs_m[:, None] < Lq, d_ok[None, :], MASKED, PAD_D)                    # [M, D]
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)                            # [N, M]
        if MASKED:
            delta = tl.load(DELTA_base + offs_m, mask=offs_m < Lq, other=0.0)
        else:
            delta = tl.load(DELTA_base + offs_m)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _sparse_attention_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, Mask, Bias, Bits, QN, QI, QB, FQN, FQI,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
        sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
        smb, smh, smm, smn, sbb, sbh, sbm, sbn,
        L_SB, L_SH, NK, WP, WF,
        H, HKV, GROUP, Lq, Lk, causal_off, window, sinks, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BITS: tl.constexpr, PRECISION: tl.constexpr):
    pid_n, pid_bh = tile_and_plane(Lk, BLOCK_N)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    col_blk = start_n // LAYOUT_BK
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    n_ok = offs_n[:, None] < Lk
    k = load_tile(K + b * skb + hk * skh + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :] * skd,
                  n_ok, d_ok[None, :], True, PAD_D)
    v = load_tile(V + b * svb + hk * svh + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :] * svd,
                  n_ok, d_ok[None, :], True, PAD_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        Q_base = Q + b * sqb + h * sqh
        DO_base = DO + b * sdob + h * sdoh
        LSE_base = LSE + (b * H + h) * Lq
        DELTA_base = DELTA + (b * H + h) * Lq
        Mask_base = Mask + b * smb + h * smh
        Bias_base = Bias + b * sbb + h * sbh
        col = (b * L_SB + h * L_SH) * NK + col_blk
        dk, dv = _dkdv_loop(dk, dv, k, v, Q_base, sqm, sqd, DO_base, sdom, sdod, LSE_base, DELTA_base,
                            Mask_base, smm, smn, Bias_base, sbm, sbn, Bits, QI + col * WP, QB + col * WP,
                            tl.load(QN + col), offs_n, offs_d, d_ok, Lq, Lk, causal_off, window, sinks, qk_scale,
                            True, CAUSAL, HAS_WINDOW, HAS_MASK, HAS_BIAS, HAS_BITS, BLOCK_M, LAYOUT_BQ, LAYOUT_BK,
                            PAD_D, PRECISION)
        dk, dv = _dkdv_loop(dk, dv, k, v, Q_base, sqm, sqd, DO_base, sdom, sdod, LSE_base, DELTA_base,
                            Mask_base, smm, smn, Bias_base, sbm, sbn, Bits, FQI + col * WF, FQI + col * WF,
                            tl.load(FQN + col), offs_n, offs_d, d_ok, Lq, Lk, causal_off, window, sinks, qk_scale,
                            False, CAUSAL, HAS_WINDOW, HAS_MASK, HAS_BIAS, HAS_BITS, BLOCK_M, LAYOUT_BQ, LAYOUT_BK,
                            PAD_D, PRECISION)
    ok = n_ok & d_ok[None, :]
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None].to(tl.int64) * sdkn + offs_d[None, :] * sdkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None].to(tl.int64) * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _dq_loop(dq, q, do, lse2, delta, K_base, skn, skd, V_base, svn, svd, Mask_base, smm, smn,
             Bias_base, sbm, sbn, Bits, idx_ptr, bid_ptr, count, offs_m, offs_d, d_ok, Lq, Lk, causal_off, window,
             sinks, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
             LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, PAD_D: tl.constexpr, PRECISION: tl.constexpr):
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    for t in range(count * SUB):
        jb = tl.load(idx_ptr + t // SUB)
        if MASKED and HAS_BITS:
            bid = tl.load(bid_ptr + t // SUB)
        else:
            bid = -1
        offs_n = jb * LAYOUT_BK + (t % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_t = load_tile(K_base + offs_n[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                        offs_n[None, :] < Lk, d_ok[:, None], MASKED, PAD_D)                   # [D, N]
        v_t = load_tile(V_base + offs_n[None, :].to(tl.int64) * svn + offs_d[:, None] * svd,
                        offs_n[None, :] < Lk, d_ok[:, None], MASKED, PAD_D)                   # [D, N]
        s = tl.dot(q, k_t, input_precision=PRECISION)
        s = _score_mods(s, offs_m[:, None], offs_n[None, :], Mask_base, smm, smn, Bias_base, sbm, sbn, Bits, bid,
                        Lq, Lk, causal_off, window, sinks, qk_scale, MASKED, CAUSAL, HAS_WINDOW, HAS_MASK, HAS_BIAS,
                        HAS_BITS, LAYOUT_BQ, LAYOUT_BK)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _sparse_attention_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, Mask, Bias, Bits, KVN, KVI, KVB, FKVN, FKVI,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
        sdqb, sdqh, sdqm, sdqd,
        smb, smh, smm, smn, sbb, sbh, sbm, sbn,
        L_SB, L_SH, NQ, WP, WF,
        H, GROUP, Lq, Lk, causal_off, window, sinks, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BITS: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_bh = tile_and_plane(Lq, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    row_blk = start_m // LAYOUT_BQ
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    m_ok = offs_m[:, None] < Lq
    q = load_tile(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                  m_ok, d_ok[None, :], True, PAD_D)
    do = load_tile(DO + b * sdob + h * sdoh + offs_m[:, None].to(tl.int64) * sdom + offs_d[None, :] * sdod,
                   m_ok, d_ok[None, :], True, PAD_D)
    lse2 = _lse2(LSE + (b * H + h) * Lq, offs_m, Lq, True)
    delta = tl.load(DELTA + (b * H + h) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    K_base = K + b * skb + hk * skh
    V_base = V + b * svb + hk * svh
    Mask_base = Mask + b * smb + h * smh
    Bias_base = Bias + b * sbb + h * sbh
    row = (b * L_SB + h * L_SH) * NQ + row_blk
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_loop(dq, q, do, lse2, delta, K_base, skn, skd, V_base, svn, svd, Mask_base, smm, smn,
                  Bias_base, sbm, sbn, Bits, KVI + row * WP, KVB + row * WP, tl.load(KVN + row), offs_m, offs_d,
                  d_ok, Lq, Lk, causal_off, window, sinks, qk_scale, True, CAUSAL, HAS_WINDOW, HAS_MASK, HAS_BIAS,
                  HAS_BITS, BLOCK_N, LAYOUT_BQ, LAYOUT_BK, PAD_D, PRECISION)
    dq = _dq_loop(dq, q, do, lse2, delta, K_base, skn, skd, V_base, svn, svd, Mask_base, smm, smn,
                  Bias_base, sbm, sbn, Bits, FKVI + row * WF, FKVI + row * WF, tl.load(FKVN + row), offs_m, offs_d,
                  d_ok, Lq, Lk, causal_off, window, sinks, qk_scale, False, CAUSAL, HAS_WINDOW, HAS_MASK, HAS_BIAS,
                  HAS_BITS, BLOCK_N, LAYOUT_BQ, LAYOUT_BK, PAD_D, PRECISION)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None].to(tl.int64) * sdqm + offs_d[None, :] * sdqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok & d_ok[None, :])


# ----------------------------------------------------------------------------- launchers
def _bcast_strides(t: Optional[torch.Tensor], fallback: torch.Tensor):
    """(tensor, 4 strides) of an element mask / bias [B|1, H|1, Lq, Lk]; size-1 dims get stride 0."""
    if t is None:
        return fallback, (0, 0, 0, 0)
    return t, tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(4))


def _layout_strides(num: torch.Tensor):
    """(L_SB, L_SH): plane index of (b, h) in the contiguous lists is b * L_SB + h * L_SH."""
    bl, hl = num.shape[0], num.shape[1]
    return (hl if bl > 1 else 0), (1 if hl > 1 else 0)


def problem(q: torch.Tensor, layout_bq: int, layout_bk: int, head_dim: int) -> dict:
    """What the prune of every attention kernel looks at."""
    return dict(layout_bq=layout_bq, layout_bk=layout_bk, block_d=block_d_of(head_dim),
                elem=q.element_size(), smem=device_smem_limit(q.device))


def block_d_of(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _flags(q, mask, bias, bits, causal_offset, window, layout_bq, layout_bk, head_dim):
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d_of(head_dim), LAYOUT_BQ=layout_bq, LAYOUT_BK=layout_bk,
                CAUSAL=causal_offset is not None, HAS_WINDOW=window is not None, HAS_MASK=mask is not None,
                HAS_BIAS=bias is not None, HAS_BITS=bits is not None,
                PRECISION="ieee")  # fp32 inputs get true fp32 products, like torch


def _key(flags, q, k):
    """What a timed choice is kept for: the kernel variant, plus the problem's size in power-of-two
    buckets (query tiles x planes up to 4096, about several waves of a 132-SM GPU; keys up to
    64K), so a config timed on a small first call is not reused for a large one."""
    B, H, Lq = q.shape[:3]
    tiles = min(triton.next_power_of_2(B * H * triton.cdiv(Lq, 128)), 4096)
    return {"dtype": str(q.dtype), "tiles": tiles, "keys": min(triton.next_power_of_2(k.shape[2]), 65536),
            **{n: v for n, v in flags.items() if n not in ("LAYOUT_BQ", "LAYOUT_BK")}}


def sparse_attention_fwd(q, k, v, layout_lists: List[torch.Tensor], mask: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], bits: Optional[torch.Tensor], scale: float, layout_bq: int,
                         layout_bk: int, causal_offset: Optional[int], window: Optional[int], sinks: int):
    """Launch the forward over a layout given as ``BlockLayout.lists()`` plus its tile bitmasks,
    element mask and kinds. Returns (out [B, Hq, Lq, D] like q's dtype, lse [B, Hq, Lq] float32)."""
    kvn, kvi, kvb, fkvn, fkvi = layout_lists[:5]
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    lse = empty(B, H, Lq, dtype=torch.float32, device=q.device)
    mask_t, ms = _bcast_strides(None if mask is None else mask.view(torch.uint8), q)
    bias_t, bs = _bcast_strides(bias, q)
    l_sb, l_sh = _layout_strides(kvn)
    flags = _flags(q, mask, bias, bits, causal_offset, window, layout_bq, layout_bk, D)

    def launch(cfg):
        grid = (triton.cdiv(Lq, cfg["BLOCK_M"]) * B * H,)
        _sparse_attention_fwd_kernel[grid](
            q, k, v, out, lse, mask_t, bias_t, kvi if bits is None else bits, kvn, kvi, kvb, fkvn, fkvi,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ms, *bs,
            l_sb, l_sh, kvn.shape[-1], kvi.shape[-1], fkvi.shape[-1],
            H, H // Hkv, Lq, Lk, causal_offset or 0, window or 0, sinks, scale * LOG2E, **flags, **cfg)

    with on_device(q):
        launch(FWD_TUNER.pick(launch, **problem(q, layout_bq, layout_bk, D), **_key(flags, q, k)))
    return out, lse


def sparse_attention_bwd(do, dlse, q, k, v, out, lse, layout_lists: List[torch.Tensor],
                         mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: Optional[torch.Tensor],
                         scale: float, layout_bq: int, layout_bk: int, causal_offset: Optional[int],
                         window: Optional[int], sinks: int):
    """Launch the backward: delta preprocess, dK/dV over the transposed lists, dQ over the lists.
    ``do`` and ``dlse`` (or None) must be contiguous. Returns (dq, dk, dv) in the input dtypes."""
    kvn, kvi, kvb, fkvn, fkvi, qn, qi, qb, fqn, fqi = layout_lists
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    block_d = block_d_of(D)
    delta = empty(B, H, Lq, dtype=torch.float32, device=q.device)
    dq = empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    dk = empty(B, Hkv, Lk, D, dtype=k.dtype, device=q.device)
    dv = empty(B, Hkv, Lk, D, dtype=v.dtype, device=q.device)
    mask_t, ms = _bcast_strides(None if mask is None else mask.view(torch.uint8), q)
    bias_t, bs = _bcast_strides(bias, q)
    bits_t = kvi if bits is None else bits
    l_sb, l_sh = _layout_strides(kvn)
    flags = _flags(q, mask, bias, bits, causal_offset, window, layout_bq, layout_bk, D)
    prob = problem(q, layout_bq, layout_bk, D)
    kinds = (Lq, Lk, causal_offset or 0, window or 0, sinks, scale * LOG2E, scale)

    def launch_dkdv(cfg):
        grid = (triton.cdiv(Lk, cfg["BLOCK_N"]) * B * Hkv,)
        _sparse_attention_bwd_dkdv_kernel[grid](
            q, k, v, do, dk, dv, lse, delta, mask_t, bias_t, bits_t, qn, qi, qb, fqn, fqi,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *ms, *bs,
            l_sb, l_sh, qn.shape[-1], qi.shape[-1], fqi.shape[-1], H, Hkv, H // Hkv, *kinds, **flags, **cfg)

    def launch_dq(cfg):
        grid = (triton.cdiv(Lq, cfg["BLOCK_M"]) * B * H,)
        _sparse_attention_bwd_dq_kernel[grid](
            q, k, v, do, dq, lse, delta, mask_t, bias_t, bits_t, kvn, kvi, kvb, fkvn, fkvi,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *ms, *bs,
            l_sb, l_sh, kvn.shape[-1], kvi.shape[-1], fkvi.shape[-1], H, H // Hkv, *kinds, **flags, **cfg)

    key = _key(flags, q, k)
    with on_device(q):
        _sparse_attention_bwd_preprocess_kernel[(triton.cdiv(Lq, PREPROCESS_BLOCK_M) * B * H,)](
            out, do, dlse if dlse is not None else delta, delta, H, Lq, HEAD_DIM=D, BLOCK_D=block_d,
            BLOCK_M=PREPROCESS_BLOCK_M, HAS_DLSE=dlse is not None)
        launch_dkdv(DKDV_TUNER.pick(launch_dkdv, **prob, **key))
        launch_dq(DQ_TUNER.pick(launch_dq, **prob, **key))
    return dq, dk, dv


# ----------------------------------------------------------------------------- compile gate
GATE_HEAD_DIMS = (16, 32, 64, 128, 256)
GATE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# The GPU fast paths (bf16, D 64 and 128, dense and causal) must keep their first config free of
# register spills on sm_90 (dK/dV at most this many bytes: see the configs' comment). The gate
# checks it with ptxas's report.
SPILL_BUDGET = {"fwd": 0, "dkdv": 128, "dq": 0}
_FEATURES = ("CAUSAL", "HAS_WINDOW", "HAS_MASK", "HAS_BIAS", "HAS_BITS")
_VARIANTS = {"all": _FEATURES, "plain": (), "causal": ("CAUSAL",)}


def compile_specs(cc: int):
    """Every attention kernel at every config its prune can select on sm_<cc>, for each head dim
    and dtype (fp16 at D 64 and 128 only), with all in-kernel features on (the largest code); bf16
    at D 64 and 128 also compiles the fast paths: features off (dense) and causal only."""
    from .common import SMEM_LIMIT
    from .gate import Spec, signature

    for tname, dtype in GATE_DTYPES.items():
        ptr = "*" + tname
        tensors = {n: ptr for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "Bias")}
        tensors.update({n: "*fp32" for n in ("LSE", "DELTA", "DLSE")})
        tensors.update({n: "*i32" for n in ("KVN", "KVI", "KVB", "FKVN", "FKVI", "QN", "QI", "QB", "FQN", "FQI",
                                            "Bits")})
        tensors.update(Mask="*u8", qk_scale="fp32", sm_scale="fp32")
        elem = torch.empty((), dtype=dtype).element_size()
        for d in GATE_HEAD_DIMS:
            if tname == "fp16" and d not in (64, 128):
                continue  # fp16 tiles and code equal bf16's but for the MMA type: two head dims suffice
            prob = dict(layout_bq=128, layout_bk=128, block_d=block_d_of(d), elem=elem, smem=SMEM_LIMIT[cc])
            fast = tname == "bf16" and d in (64, 128)
            for variant in (("all", "plain", "causal") if fast else ("all",)):
                flags = dict(HEAD_DIM=d, BLOCK_D=block_d_of(d), LAYOUT_BQ=128, LAYOUT_BK=128, PRECISION="ieee",
                             **{f: f in _VARIANTS[variant] for f in _FEATURES})
                for name, kernel, tuner in (("fwd", _sparse_attention_fwd_kernel, FWD_TUNER),
                                            ("dkdv", _sparse_attention_bwd_dkdv_kernel, DKDV_TUNER),
                                            ("dq", _sparse_attention_bwd_dq_kernel, DQ_TUNER)):
                    for i, cfg in enumerate(tuner.candidates(**prob)):
                        tiles = {k: v for k, v in cfg.items() if k.isupper()}
                        tags = {"dtype": tname, "D": d, "variant": variant, **cfg}
                        if fast and variant != "all" and i == 0 and cc == 90:
                            tags["max_spill"] = SPILL_BUDGET[name]
                        yield Spec(name, kernel, signature(kernel, tensors), {**flags, **tiles},
                                   cfg["num_warps"], cfg["num_stages"], tags=tags)
            yield Spec("preprocess", _sparse_attention_bwd_preprocess_kernel,
                       signature(_sparse_attention_bwd_preprocess_kernel, tensors),
                       dict(HEAD_DIM=d, BLOCK_D=block_d_of(d), BLOCK_M=PREPROCESS_BLOCK_M, HAS_DLSE=True), 4, 1,
                       tags={"dtype": tname, "D": d})
