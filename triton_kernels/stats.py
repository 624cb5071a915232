"""Attention statistics without the attention matrix: column sums / maxima of P (key-major walk),
probability mass per key group and per layout tile (query-major walk).

Naming chain: ``_attention_stats_columns_kernel`` / ``_attention_stats_rows_kernel`` -> launchers
``attention_stats_columns`` / ``attention_stats_rows`` -> custom ops
``sparseattn::attention_stats_columns`` / ``_rows`` -> public ``sparseattn.attention_stats`` ->
oracle ``sparseattn.reference.attention_stats``.

Both kernels walk the same BlockLayout as the attention kernels through ``walk.py`` (same rules,
same tiles skipped) and recompute the normalised probabilities ``P = exp2(s - lse)`` from the
saved LSE of the attention call (``_p_keys`` / ``_p_queries`` are the walks' BODY). The
statistics are TILE_HOOKs:

* ``_column_hook`` (key-major, one program per key tile): ``sum_i w_i P_ij`` and
  ``max_{i: w_i != 0} P_ij`` over the visited query tiles, in the fixed order of the lists (no
  atomics: deterministic). With a head reduction the program walks every query head of the batch
  element in order and sums the per-head statistics;
* ``_row_hook`` (query-major, one program per query tile): ``sum_{j in group g} P_ij`` as one
  small matrix product with the one-hot key groups, and the sum of P over each visited (query
  tile, key tile) pair, stored into a zero-initialised partial grid that the op layer sums to
  layout tiles.

Nothing of size Lq x Lk exists; fp32 outputs.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .._alloc import empty, on_device
from ..ops.common import ScoreOptions
from .common import (GATE_DTYPES, GATE_HEAD_DIMS, block_d_of, load_rows, plane, program_tile,
                     save_tile_log, tile_log, view, view_type)
from .walk import (RuleFlags, layout_row, lists_of, lists_type, lse2, rule_flags, rules_at, rules_of, rules_type,
                   runtime_rules, walk)

LOG2E = 1.4426950408889634
# Tiles of the statistics walks: small enough for the interpreter and for any layout block >= 32.
BLOCK_M, BLOCK_N = 32, 32
NUM_WARPS = 4


@triton.jit
def _p_keys(carry, ctx, s_t, dcap, q_t, y, offs_m, MASKED: tl.constexpr, RULES: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """BODY of the key-major walk: P^T of the tile [N, M] from the query rows' saved LSE."""
    LSE, Lq = ctx
    return carry, tl.math.exp2(s_t - lse2(LSE, offs_m, Lq, MASKED)[None, :])


@triton.jit
def _p_queries(carry, ctx, s, dcap, k_t, y, offs_n, MASKED: tl.constexpr, RULES: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
               PRECISION: tl.constexpr):
    """BODY of the query-major walk: P of the tile [M, N] (ctx: the own rows' base-2 LSE)."""
    return carry, tl.math.exp2(s - ctx[:, None])


@triton.jit
def _column_hook(extra, p_t, offs_n, offs_m):
    """extra (sum [N], max [N], weights Plane, Lq): weighted column sums and maxima of P."""
    csum, cmax, W, Lq = extra
    w = tl.load(W.ptr + offs_m.to(tl.int64) * W.sc, mask=offs_m < Lq, other=0.0).to(tl.float32)
    csum += tl.sum(p_t * w[None, :], 1)
    cmax = tl.maximum(cmax, tl.max(tl.where(w[None, :] != 0.0, p_t, 0.0), 1))
    return csum, cmax, W, Lq


@triton.jit
def _row_hook(extra, p, offs_m, offs_n):
    """extra (mass [M, G], key groups Plane, Lk, tile-sum pointer, key tiles per row): P summed per
    key group and over the (query tile, key tile) pair."""
    mass, KG, Lk, TS, n_tiles = extra
    G: tl.constexpr = mass.shape[1]
    grp = tl.load(KG.ptr + offs_n.to(tl.int64) * KG.sc, mask=offs_n < Lk, other=-1)
    onehot = (grp[:, None] == tl.arange(0, G)[None, :]).to(tl.float32)                  # [N, G]
    mass = tl.dot(p, onehot, mass, input_precision="ieee")
    row_tile = tl.min(offs_m, 0) // p.shape[0]
    col_tile = tl.min(offs_n, 0) // p.shape[1]
    tl.store(TS + row_tile.to(tl.int64) * n_tiles + col_tile, tl.sum(tl.sum(p, 1), 0))
    return mass, KG, Lk, TS, n_tiles


@triton.jit
def _attention_stats_columns_kernel(
        Q, K, LSE, W, CSUM, CMAX, rules, lists, H, GROUP, HEADS_PER_PROGRAM,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, RULES: tl.constexpr, PRECISION: tl.constexpr, LOG=None):
    """Column sums and maxima of P for one key tile, over HEADS_PER_PROGRAM query heads (1: per
    head; H: the head reduction, per-head maxima summed). Outputs [B, H / HEADS_PER_PROGRAM, Lk].
    LOG: the tile log (work accounting, ``walk.py``) or None."""
    Lq, Lk = rules.Lq, rules.Lk
    b, hp, _, blk, offs_n = program_tile(Lk, H // HEADS_PER_PROGRAM, 1, BLOCK_N, LAYOUT_BK)
    csum = tl.zeros([BLOCK_N], dtype=tl.float32)
    cmax_total = tl.zeros([BLOCK_N], dtype=tl.float32)
    rules = runtime_rules(rules)  # before the loop that calls rules_at (see runtime_rules)
    for g in range(HEADS_PER_PROGRAM):
        h = hp * HEADS_PER_PROGRAM + g
        k = load_rows(plane(K, b, h // GROUP), offs_n, Lk, True, HEAD_DIM, BLOCK_D)
        extra = (csum, tl.zeros([BLOCK_N], dtype=tl.float32), plane(W, b, h), Lq)
        extra = walk((), extra, (LSE + (b * H + h) * Lq, Lq), k, offs_n, plane(Q, b, h), None, rules_at(rules, b, h),
                     lists, layout_row(lists, b, h, blk), True, RULES, BLOCK_M, LAYOUT_BQ, LAYOUT_BK, HEAD_DIM,
                     BLOCK_D, HEAD_DIM, BLOCK_D, PRECISION, _p_keys, _column_hook, LOG, b * H + h)[1]
        csum = extra[0]
        cmax_total += extra[1]
    n_out = H // HEADS_PER_PROGRAM
    tl.store(CSUM + (b * n_out + hp) * Lk + offs_n, csum, mask=offs_n < Lk)
    tl.store(CMAX + (b * n_out + hp) * Lk + offs_n, cmax_total, mask=offs_n < Lk)


@triton.jit
def _attention_stats_rows_kernel(
        Q, K, LSE, KG, MASS, TSUM, rules, lists, H, GROUP, n_row_tiles, n_col_tiles,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        G_PAD: tl.constexpr, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, RULES: tl.constexpr,
        PRECISION: tl.constexpr, LOG=None):
    """Group masses [B, H, Lq, G_PAD] and tile sums [B, H, n_row_tiles, n_col_tiles] of one query tile."""
    Lq, Lk = rules.Lq, rules.Lk
    b, h, hk, blk, offs_m = program_tile(Lq, H, GROUP, BLOCK_M, LAYOUT_BQ)
    q = load_rows(plane(Q, b, h), offs_m, Lq, True, HEAD_DIM, BLOCK_D)
    lse = lse2(LSE + (b * H + h) * Lq, offs_m, Lq, True)
    tiles = TSUM + (b * H + h).to(tl.int64) * n_row_tiles * n_col_tiles
    extra = (tl.zeros([BLOCK_M, G_PAD], dtype=tl.float32), plane(KG, b, h), Lk, tiles, n_col_tiles)
    extra = walk((), extra, lse, q, offs_m, plane(K, b, hk), None, rules_at(rules, b, h), lists,
                 layout_row(lists, b, h, blk), False, RULES, BLOCK_N, LAYOUT_BQ, LAYOUT_BK, HEAD_DIM, BLOCK_D,
                 HEAD_DIM, BLOCK_D, PRECISION, _p_queries, _row_hook, LOG, b * H + h)[1]
    offs_g = tl.arange(0, G_PAD)
    ptrs = MASS + ((b * H + h) * Lq + offs_m[:, None]).to(tl.int64) * G_PAD + offs_g[None, :]
    tl.store(ptrs, extra[0], mask=(offs_m < Lq)[:, None])


# ----------------------------------------------------------------------------- launchers
def _setup(q, k, layout_lists, mask, bits, scale, bq, bk, causal_offset, window, sinks, key_mask, q_pos, k_pos,
           q_seg, k_seg):
    opts = ScoreOptions(key_mask=key_mask, q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg)
    rules = rules_of(q.shape[2], k.shape[2], mask, None, bits, layout_lists[1], scale * LOG2E, causal_offset, window,
                     sinks, opts)
    D = q.shape[3]
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d_of(D), BLOCK_M=min(BLOCK_M, bq), BLOCK_N=min(BLOCK_N, bk),
                 LAYOUT_BQ=bq, LAYOUT_BK=bk, RULES=rule_flags(mask, None, bits, causal_offset, window, opts),
                 PRECISION="ieee")
    return rules, flags


def _log_meta(flags, key_major: bool, B: int, H: int, Hkv: int) -> dict:
    """What a counted launch records besides its log (as ``attention.py``'s)."""
    return dict(BLOCK_M=flags["BLOCK_M"], BLOCK_N=flags["BLOCK_N"], LAYOUT_BQ=flags["LAYOUT_BQ"],
                LAYOUT_BK=flags["LAYOUT_BK"], key_major=key_major, B=B, H=H, Hkv=Hkv)


def attention_stats_columns(q, k, lse, weights, layout_lists: List[torch.Tensor], mask: Optional[torch.Tensor],
                            bits: Optional[torch.Tensor], scale: float, bq: int, bk: int, causal_offset: Optional[int],
                            window: Optional[int], sinks: int, key_mask, q_pos, k_pos, q_seg, k_seg,
                            reduce_heads: bool):
    """Column sums and maxima of P: ``[B, Hq, Lk]`` each, or ``[B, 1, Lk]`` summed over heads
    (``reduce_heads``). ``weights`` ``[B|1, Hq|1, Lq]`` fp32 (query weights)."""
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    rules, flags = _setup(q, k, layout_lists, mask, bits, scale, bq, bk, causal_offset, window, sinks, key_mask,
                          q_pos, k_pos, q_seg, k_seg)
    per = H if reduce_heads else 1
    csum = empty(B, H // per, Lk, dtype=torch.float32, device=q.device)
    cmax = empty(B, H // per, Lk, dtype=torch.float32, device=q.device)
    w = view(weights[:, :, None, :], tuple(0 if weights.shape[i] == 1 else weights.stride(i) for i in (0, 1))
             + (0, weights.stride(2)))
    grid = (triton.cdiv(Lk, flags["BLOCK_N"]) * B * (H // per),)
    with on_device(q):
        log = tile_log(q.device)
        _attention_stats_columns_kernel[grid](view(q), view(k), lse, w, csum, cmax, rules, lists_of(*layout_lists[5:]),
                                              H, H // Hkv, per, num_warps=NUM_WARPS, **flags, LOG=log)
        save_tile_log(log, "attention_stats_columns", grid[0], **_log_meta(flags, True, B, H, Hkv),
                      heads_per_program=per)
    return csum, cmax


def attention_stats_rows(q, k, lse, key_groups, num_groups: int, layout_lists: List[torch.Tensor],
                         mask: Optional[torch.Tensor], bits: Optional[torch.Tensor], scale: float, bq: int, bk: int,
                         causal_offset: Optional[int], window: Optional[int], sinks: int, key_mask, q_pos, k_pos,
                         q_seg, k_seg):
    """(group mass ``[B, Hq, Lq, num_groups]``, tile sums ``[B, Hq, nQ, nK]`` over the layout's tiles).
    ``key_groups`` int32 ``[B|1, H|1, Lk]`` (or None: one group of every key)."""
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    rules, flags = _setup(q, k, layout_lists, mask, bits, scale, bq, bk, causal_offset, window, sinks, key_mask,
                          q_pos, k_pos, q_seg, k_seg)
    bm, bn = flags["BLOCK_M"], flags["BLOCK_N"]
    g_pad = max(16, triton.next_power_of_2(max(1, num_groups)))
    if key_groups is None:
        key_groups = torch.zeros(1, 1, Lk, dtype=torch.int32, device=q.device)
    kg = view(key_groups[:, :, None, :], tuple(0 if key_groups.shape[i] == 1 else key_groups.stride(i) for i in (0, 1))
              + (0, key_groups.stride(2)))
    mass = empty(B, H, Lq, g_pad, dtype=torch.float32, device=q.device)
    # the partial grid covers every kernel tile of every layout block (sub-tiles past Lk included:
    # the walk visits them, masked), zero where no tile is visited
    nq, nk = triton.cdiv(Lq, bq), triton.cdiv(Lk, bk)
    n_rt, n_ct = nq * (bq // bm), nk * (bk // bn)
    tsum = torch.zeros(B, H, n_rt, n_ct, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Lq, bm) * B * H,)
    with on_device(q):
        log = tile_log(q.device)
        _attention_stats_rows_kernel[grid](view(q), view(k), lse, kg, mass, tsum, rules, lists_of(*layout_lists[:5]),
                                           H, H // Hkv, n_rt, n_ct, G_PAD=g_pad, num_warps=NUM_WARPS, **flags, LOG=log)
        save_tile_log(log, "attention_stats_rows", grid[0], **_log_meta(flags, False, B, H, Hkv))
    blocks = tsum.view(B, H, nq, bq // bm, nk, bk // bn).sum((3, 5))
    return mass[..., :num_groups], blocks


# ----------------------------------------------------------------------------- compile gate
def compile_specs(cc: int):
    """Both statistics kernels, every head dim and dtype, every rule on (the largest code)."""
    from .gate import Spec, signature

    for tname in GATE_DTYPES:
        ptr = "*" + tname
        types = {"Q": view_type(ptr), "K": view_type(ptr), "LSE": "*fp32", "W": view_type("*fp32"),
                 "CSUM": "*fp32", "CMAX": "*fp32", "KG": view_type("*i32"), "MASS": "*fp32", "TSUM": "*fp32",
                 "rules": rules_type(ptr), "lists": lists_type()}
        for d in GATE_HEAD_DIMS:
            if tname == "fp16" and d not in (64, 128):
                continue  # fp16 code equals bf16's but for the MMA type (as the attention kernels' gate)
            rules = RuleFlags(**{f: f not in ("paged", "softcap", "alibi", "key_bias", "bias")
                                 for f in RuleFlags._fields})
            flags = dict(HEAD_DIM=d, BLOCK_D=block_d_of(d), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, LAYOUT_BQ=128,
                         LAYOUT_BK=128, RULES=rules, PRECISION="ieee")
            tags = {"dtype": tname, "D": d}
            yield Spec("stats_columns", _attention_stats_columns_kernel,
                       signature(_attention_stats_columns_kernel, types), {**flags, "LOG": None}, NUM_WARPS, 1,
                       tags=tags)
            yield Spec("stats_rows", _attention_stats_rows_kernel, signature(_attention_stats_rows_kernel, types),
                       {**flags, "G_PAD": 16, "LOG": None}, NUM_WARPS, 1, tags=tags)
