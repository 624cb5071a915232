"""Fused block-sparse flash attention: forward, and backward (delta preprocess, dK/dV, dQ).

Naming chain: ``_sparse_attention_fwd_kernel`` -> launcher ``sparse_attention_fwd`` -> custom op
``sparseattn::sparse_attention_fwd`` -> public ``sparseattn.sparse_attention`` -> oracle
``sparseattn.reference.sparse_attention`` (likewise ``_bwd_*`` / ``sparse_attention_bwd``).

Every kernel walks a BlockLayout with the one tile walk of ``walk.py``: for its query tile
(forward, dQ) or key tile (dK/dV) it visits first the partial blocks, with the in-block rules
(bounds, causal, sliding window with sinks, packed tile bitmasks, element mask), then the full
blocks with no mask arithmetic at all; each kernel gives the walk its per-tile work (``_fwd_tile``,
``_dq_tile``, ``_dkdv_tile``). Softmax is online, in base 2, in fp32; LSE is stored in natural
log. A row with no visible key gets output 0, LSE -inf and zero gradients. GQA: query head h
reads key/value head h // GROUP; dK/dV loops over the group's query heads, so repeated K/V are
never materialised and no atomics are needed. Offsets are 64-bit.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .._alloc import empty, on_device
from .common import (GATE_DTYPES, GATE_HEAD_DIMS, Tuner, attention_tile_fits, block_d_of, device_smem_limit,
                     load_rows, load_rows_at, load_vec, plane, program_tile, save_tile_log, store_rows,
                     tile_and_plane, tile_log, view, view_type)
from ..ops.common import ScoreOptions
from .walk import (RuleFlags, layout_row, lists_of, lists_type, lse2_split, no_hook, paged_rows, rule_flags, rules_at,
                   rules_of, rules_type, runtime_rules, walk)

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


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tile(carry, ctx, s, dcap, k, y, offs_n, MASKED: tl.constexpr, RULES: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Forward BODY: online softmax over one key tile and its P.V. carry (acc [M, DV], row sum,
    row max), ctx (V plane, Lk, the plane's Rules); p = exp2(s - row max so far)."""
    acc, l_i, m_i = carry
    V, Lk, rules = ctx
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED or RULES.bias or RULES.key_bias or RULES.group_bias:  # a row can still be all -inf here: keep exp2 away from inf - inf
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if RULES.paged:
        ok = offs_n < Lk
        v = load_rows_at(V, paged_rows(rules, offs_n, ok), ok, MASKED, HEAD_DV, BLOCK_DV)
    else:
        v = load_rows(V, offs_n, Lk, MASKED, HEAD_DV, BLOCK_DV)                              # [N, DV]
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return (acc, l_i, m_new), p


@triton.jit
def fwd_epilogue(carry):
    """(output rows, natural-log LSE in float64) from the forward BODY's carry; a row that saw no
    key gives 0 and LSE -inf. float64 so that the backward recovers the base-2 LSE ``m + log2(l)``
    exactly (:func:`lse2_split`); the ops hand users float32."""
    acc, l_i, m_i = carry
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse2 = m_i.to(tl.float64) + tl.math.log2(l_safe).to(tl.float64)
    lse = tl.where(empty, float("-inf"), lse2 * tl.full([], 0.6931471805599453, tl.float64))
    return acc / l_safe[:, None], lse


@triton.jit
def _sparse_attention_fwd_kernel(
        Q, K, V, O, LSE, rules, lists, H, GROUP,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr,
        RULES: tl.constexpr, PRECISION: tl.constexpr, LOG=None):
    """O and LSE [B, H, Lq] of one query tile. Q, K, V, O: Views; rules: Rules; lists: the layout's
    Lists by query block; LOG: the tile log (work accounting, ``walk.py``) or None."""
    Lq = rules.Lq
    b, h, hk, blk, offs_m = program_tile(Lq, H, GROUP, BLOCK_M, LAYOUT_BQ)
    q = load_rows(plane(Q, b, h), offs_m, Lq, True, HEAD_DIM, BLOCK_D)
    init = (tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32),
            tl.full([BLOCK_M], float("-inf"), dtype=tl.float32))
    rules = rules_at(rules, b, h)
    carry, _ = walk(init, (), (plane(V, b, hk), rules.Lk, rules), q, offs_m, plane(K, b, hk), None, rules,
                    lists, layout_row(lists, b, h, blk), False, RULES, BLOCK_N, LAYOUT_BQ, LAYOUT_BK, HEAD_DIM, BLOCK_D,
                    HEAD_DV, BLOCK_DV, PRECISION, _fwd_tile, no_hook, LOG, b * H + h)
    out, lse = fwd_epilogue(carry)
    store_rows(plane(O, b, h), offs_m, Lq, out, HEAD_DV, BLOCK_DV)
    tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=offs_m < Lq)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _sparse_attention_bwd_preprocess_kernel(O, DO, DLSE, DELTA, H, Lq, HEAD_DIM: tl.constexpr,
                                            BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                            HAS_DLSE: tl.constexpr, PRECISION: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE (O, dO contiguous [B, H, Lq, D]; DELTA, DLSE [B, H, Lq]).

    The row sums are the diagonal of ``tl.dot(dO, O^T)``: the same reduction, on the same operand
    types, as the dK/dV and dQ kernels' ``dP = dO . V``. Where a row's probabilities are one key
    (saturated softmax: huge logits), O is that key's V row exactly, so ``dP - delta`` is exactly
    0 there, as in torch's ``sum(P * dP)`` formulation; an elementwise sum would leave the
    difference of two orders of summation, ~u |dO| |V|, which dQ and dK multiply by |scale| |K|
    and |scale| |Q|. O is read as saved, in the input dtype: for fp16 / bf16 its rounding, up to
    u |dO_i|.|O_i|, shifts the whole row of dS (README, "Numerics of the backward")."""
    pid_m, bh = tile_and_plane(Lq, BLOCK_M)
    bh = bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    off = bh * Lq * HEAD_DIM + offs_m[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + off, mask=ok, other=0.0)
    do = tl.load(DO + off, mask=ok, other=0.0)
    dd = tl.dot(do, tl.trans(o), input_precision=PRECISION)                                    # [M, M]
    diag = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
    delta = tl.sum(tl.where(diag, dd, 0.0), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _dkdv_tile(carry, ctx, s_t, dcap, q_t, y, offs_m, MASKED: tl.constexpr, RULES: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
               PRECISION: tl.constexpr):
    """dK/dV BODY over one query tile (key-major: s_t, p_t are [N, M]). carry (dk [N, D], dv
    [N, DV]); ctx (v tile, dO plane, LSE and delta rows of the query head, Lq)."""
    dk, dv = carry
    v, DO, LSE, DELTA, Lq = ctx
    hi, lo = lse2_split(LSE, offs_m, Lq, MASKED)
    p_t = tl.math.exp2((s_t - hi[None, :]) - lo[None, :])
    do = load_rows(DO, offs_m, Lq, MASKED, HEAD_DV, BLOCK_DV)                               # [M, DV]
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)                                # [N, M]
    ds_t = p_t * (dp_t - load_vec(DELTA, offs_m, Lq, MASKED)[None, :])
    if RULES.softcap:
        ds_t = ds_t * dcap
    dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=PRECISION)
    return (dk, dv), p_t


@triton.jit
def _sparse_attention_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, rules, lists, H, HKV, GROUP, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr,
        RULES: tl.constexpr, PRECISION: tl.constexpr, LOG=None):
    """dK, dV of one key tile, summed over the query heads of its GQA group (no atomics). lists: the
    layout's transposed Lists, by key block."""
    Lq, Lk = rules.Lq, rules.Lk
    b, hk, _, blk, offs_n = program_tile(Lk, HKV, 1, BLOCK_N, LAYOUT_BK)
    k = load_rows(plane(K, b, hk), offs_n, Lk, True, HEAD_DIM, BLOCK_D)
    v = load_rows(plane(V, b, hk), offs_n, Lk, True, HEAD_DV, BLOCK_DV)
    carry = (tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32))
    rules = runtime_rules(rules)  # before the loop that calls rules_at (see runtime_rules)
    for g in range(GROUP):
        h = hk * GROUP + g
        ctx = (v, plane(DO, b, h), LSE + (b * H + h) * Lq, DELTA + (b * H + h) * Lq, Lq)
        # walk(...)[0]: `_` holds a tensor above, and a Triton loop may not rebind it to a tuple
        carry = walk(carry, (), ctx, k, offs_n, plane(Q, b, h), None, rules_at(rules, b, h), lists,
                     layout_row(lists, b, h, blk), True, RULES, BLOCK_M, LAYOUT_BQ, LAYOUT_BK, HEAD_DIM, BLOCK_D,
                     HEAD_DV, BLOCK_DV, PRECISION, _dkdv_tile, no_hook, LOG, b * H + h)[0]
    dk, dv = carry
    store_rows(plane(DK, b, hk), offs_n, Lk, dk * sm_scale, HEAD_DIM, BLOCK_D)
    store_rows(plane(DV, b, hk), offs_n, Lk, dv, HEAD_DV, BLOCK_DV)


@triton.jit
def _dq_tile(dq, ctx, s, dcap, k_t, v_t, offs_n, MASKED: tl.constexpr, RULES: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """dQ BODY over one key tile (the walk loads its V tile too, v_t [DV, N]). carry dq [M, D];
    ctx (dO tile, base-2 LSE as hi + lo, delta)."""
    do, hi, lo, delta = ctx
    p = tl.math.exp2((s - hi[:, None]) - lo[:, None])
    dp = tl.dot(do, v_t, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    if RULES.softcap:
        ds = ds * dcap
    return tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=PRECISION), p


@triton.jit
def _sparse_attention_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, rules, lists, H, GROUP, sm_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr,
        RULES: tl.constexpr, PRECISION: tl.constexpr, LOG=None):
    """dQ of one query tile (lists: the layout's Lists by query block)."""
    Lq = rules.Lq
    b, h, hk, blk, offs_m = program_tile(Lq, H, GROUP, BLOCK_M, LAYOUT_BQ)
    q = load_rows(plane(Q, b, h), offs_m, Lq, True, HEAD_DIM, BLOCK_D)
    do = load_rows(plane(DO, b, h), offs_m, Lq, True, HEAD_DV, BLOCK_DV)
    hi, lo = lse2_split(LSE + (b * H + h) * Lq, offs_m, Lq, True)
    ctx = (do, hi, lo, load_vec(DELTA + (b * H + h) * Lq, offs_m, Lq, True))
    dq, _ = walk(tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), (), ctx, q, offs_m, plane(K, b, hk), plane(V, b, hk),
                 rules_at(rules, b, h), lists, layout_row(lists, b, h, blk), False, RULES, BLOCK_N, LAYOUT_BQ,
                 LAYOUT_BK, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, PRECISION, _dq_tile, no_hook,
                 LOG, b * H + h)
    store_rows(plane(DQ, b, h), offs_m, Lq, dq * sm_scale, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- launchers
def problem(q: torch.Tensor, layout_bq: int, layout_bk: int, head_dim: int, value_dim: Optional[int] = None) -> dict:
    """What the prune of every attention kernel looks at (the wider of the key and value head dims)."""
    return dict(layout_bq=layout_bq, layout_bk=layout_bk, block_d=block_d_of(max(head_dim, value_dim or head_dim)),
                elem=q.element_size(), smem=device_smem_limit(q.device))


def _flags(mask, bias, bits, causal_offset, window, opts: ScoreOptions, layout_bq, layout_bk, head_dim, value_dim,
           paged: bool = False):
    rules = rule_flags(mask, bias, bits, causal_offset, window, opts, paged)
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d_of(head_dim), HEAD_DV=value_dim, BLOCK_DV=block_d_of(value_dim),
                LAYOUT_BQ=layout_bq, LAYOUT_BK=layout_bk, RULES=rules,
                PRECISION="ieee")  # fp32 inputs get true fp32 products, like torch


def _key(flags, q, lk: int):
    """What a timed choice is kept for: the kernel variant, plus the problem's size in power-of-two
    buckets (query tiles x planes up to 4096, about several waves of a 132-SM GPU; keys up to
    64K), so a config timed on a small first call is not reused for a large one."""
    B, H, Lq = q.shape[:3]
    tiles = min(triton.next_power_of_2(B * H * triton.cdiv(Lq, 128)), 4096)
    return {"dtype": str(q.dtype), "tiles": tiles, "keys": min(triton.next_power_of_2(lk), 65536),
            **{n: v for n, v in flags.items() if n not in ("LAYOUT_BQ", "LAYOUT_BK")}}


def _log_meta(cfg, key_major: bool, layout_bq: int, layout_bk: int, B: int, H: int, Hkv: int) -> dict:
    """What a counted launch records besides its log (``common.Launch.meta``): the kernel tiles, the
    layout block, the walk's direction and the heads."""
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], LAYOUT_BQ=layout_bq, LAYOUT_BK=layout_bk,
                key_major=key_major, B=B, H=H, Hkv=Hkv)


def sparse_attention_fwd(q, k, v, layout_lists: List[torch.Tensor], mask: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], bits: Optional[torch.Tensor], scale: float, layout_bq: int,
                         layout_bk: int, causal_offset: Optional[int], window: Optional[int], sinks: int,
                         key_mask: Optional[torch.Tensor] = None, key_bias: Optional[torch.Tensor] = None,
                         alibi: Optional[torch.Tensor] = None, q_pos: Optional[torch.Tensor] = None,
                         k_pos: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                         q_seg: Optional[torch.Tensor] = None, k_seg: Optional[torch.Tensor] = None,
                         key_group: Optional[torch.Tensor] = None, group_bias: Optional[torch.Tensor] = None,
                         block_table: Optional[torch.Tensor] = None):
    """Launch the forward over a layout given as ``BlockLayout.lists()`` plus its tile bitmasks,
    element mask and kinds, and the score options (:class:`ScoreOptions`; a key mask and positions
    only act in partial tiles, so the layout must list the tiles they cut as partial). With a
    ``block_table`` int32 ``[B, max_pages]``, k and v are paged caches ``[num_pages, page_size,
    Hkv, D]`` (pages of consecutive rows: ``stride(0) == page_size * stride(1)``) read through the
    table, of logical length ``max_pages * page_size``. Returns (out [B, Hq, Lq, Dv] like q's
    dtype, lse [B, Hq, Lq] float64, natural log)."""
    B, H, Lq, D = q.shape
    Dv = v.shape[3]
    if block_table is None:
        Hkv, Lk, kv_views, page_size = k.shape[1], k.shape[2], (view(k), view(v)), 0
    else:
        page_size = k.shape[1]
        Hkv, Lk = k.shape[2], block_table.shape[1] * page_size
        kv_views = tuple(view(t, (0, t.stride(2), t.stride(1), t.stride(3))) for t in (k, v))
    opts = ScoreOptions(key_mask, key_bias, alibi, q_pos, k_pos, softcap, q_seg, k_seg, key_group, group_bias)
    out = empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = empty(B, H, Lq, dtype=torch.float64, device=q.device)   # float64: see fwd_epilogue
    rules = rules_of(Lq, Lk, mask, bias, bits, layout_lists[1], scale * LOG2E, causal_offset, window, sinks, opts,
                     block_table, page_size)
    lists = lists_of(*layout_lists[:5])
    flags = _flags(mask, bias, bits, causal_offset, window, opts, layout_bq, layout_bk, D, Dv, block_table is not None)

    def launch(cfg, log=None):
        grid = (triton.cdiv(Lq, cfg["BLOCK_M"]) * B * H,)
        _sparse_attention_fwd_kernel[grid](view(q), *kv_views, view(out), lse, rules, lists, H, H // Hkv, **flags,
                                           **cfg, LOG=log)
        return grid[0]

    with on_device(q):
        cfg = FWD_TUNER.pick(launch, **problem(q, layout_bq, layout_bk, D, Dv), **_key(flags, q, Lk))
        log = tile_log(q.device)
        save_tile_log(log, "sparse_attention_fwd", launch(cfg, log), **_log_meta(cfg, False, layout_bq, layout_bk, B,
                                                                                 H, Hkv))
    return out, lse


def bwd_delta(out, do, dlse, precision: str) -> torch.Tensor:
    """delta ``[B, H, Lq]`` float32 ``= rowsum(dO * O) - dLSE`` by the preprocess kernel (its
    docstring says why a dot), for every softmax backward (this one, HiP's). ``out`` and ``do``
    contiguous ``[B, H, Lq, Dv]``, ``dlse`` contiguous float32 or None."""
    B, H, Lq, Dv = out.shape
    delta = empty(B, H, Lq, dtype=torch.float32, device=out.device)
    _sparse_attention_bwd_preprocess_kernel[(triton.cdiv(Lq, PREPROCESS_BLOCK_M) * B * H,)](
        out, do, dlse if dlse is not None else delta, delta, H, Lq, HEAD_DIM=Dv, BLOCK_D=block_d_of(Dv),
        BLOCK_M=PREPROCESS_BLOCK_M, HAS_DLSE=dlse is not None, PRECISION=precision)
    return delta


def sparse_attention_bwd(do, dlse, q, k, v, out, lse, layout_lists: List[torch.Tensor],
                         mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: Optional[torch.Tensor],
                         scale: float, layout_bq: int, layout_bk: int, causal_offset: Optional[int],
                         window: Optional[int], sinks: int, key_mask: Optional[torch.Tensor] = None,
                         key_bias: Optional[torch.Tensor] = None, alibi: Optional[torch.Tensor] = None,
                         q_pos: Optional[torch.Tensor] = None, k_pos: Optional[torch.Tensor] = None,
                         softcap: Optional[float] = None, q_seg: Optional[torch.Tensor] = None,
                         k_seg: Optional[torch.Tensor] = None, key_group: Optional[torch.Tensor] = None,
                         group_bias: Optional[torch.Tensor] = None):
    """Launch the backward: delta preprocess, dK/dV over the transposed lists, dQ over the lists.
    ``do`` and ``dlse`` (or None) must be contiguous. Returns (dq, dk, dv) in the input dtypes.
    Deterministic: no atomics, every gradient element is written by one program in a fixed order."""
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    opts = ScoreOptions(key_mask, key_bias, alibi, q_pos, k_pos, softcap, q_seg, k_seg, key_group, group_bias)
    dq = empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    dk = empty(B, Hkv, Lk, D, dtype=k.dtype, device=q.device)
    dv = empty(B, Hkv, Lk, Dv, dtype=v.dtype, device=q.device)
    rules = rules_of(Lq, Lk, mask, bias, bits, layout_lists[1], scale * LOG2E, causal_offset, window, sinks, opts)
    flags = _flags(mask, bias, bits, causal_offset, window, opts, layout_bq, layout_bk, D, Dv)
    prob = problem(q, layout_bq, layout_bk, D, Dv)
    qs, ks, vs, dos = view(q), view(k), view(v), view(do)

    def launch_dkdv(cfg, log=None):
        grid = (triton.cdiv(Lk, cfg["BLOCK_N"]) * B * Hkv,)
        _sparse_attention_bwd_dkdv_kernel[grid](qs, ks, vs, dos, view(dk), view(dv), lse, delta, rules,
                                                lists_of(*layout_lists[5:]), H, Hkv, H // Hkv, scale, **flags, **cfg,
                                                LOG=log)
        return grid[0]

    def launch_dq(cfg, log=None):
        grid = (triton.cdiv(Lq, cfg["BLOCK_M"]) * B * H,)
        _sparse_attention_bwd_dq_kernel[grid](qs, ks, vs, dos, view(dq), lse, delta, rules,
                                              lists_of(*layout_lists[:5]), H, H // Hkv, scale, **flags, **cfg, LOG=log)
        return grid[0]

    key = _key(flags, q, Lk)
    with on_device(q):
        delta = bwd_delta(out, do, dlse, flags["PRECISION"])
        for name, launch, tuner, key_major in (("sparse_attention_bwd_dkdv", launch_dkdv, DKDV_TUNER, True),
                                               ("sparse_attention_bwd_dq", launch_dq, DQ_TUNER, False)):
            cfg = tuner.pick(launch, **prob, **key)
            log = tile_log(q.device)
            save_tile_log(log, name, launch(cfg, log), **_log_meta(cfg, key_major, layout_bq, layout_bk, B, H, Hkv))
    return dq, dk, dv


# ----------------------------------------------------------------------------- compile gate
# The GPU fast paths (bf16, D 64 and 128, dense and causal) must keep their first config free of
# register spills on sm_90 (dK/dV at most this many bytes: see the configs' comment). The gate
# checks it with ptxas's report.
SPILL_BUDGET = {"fwd": 0, "dkdv": 128, "dq": 0}
_VARIANTS = {"all": RuleFlags._fields, "plain": (), "causal": ("causal",)}


def _gate_variants(tname: str, d: int):
    """Which rule sets the gate compiles at (dtype, head dim): every rule on ("all", the largest
    code and shared memory) for fp32 from D 32 and bf16 from D 64 up (and MLA's 192 / 128); the
    fast paths (rules off, causal only) too for bf16 at D 64 and 128; fp16 (its code equals bf16's
    but for the MMA type), D 16 and bf16 at D 32 (small tiles: fp32's staged score tiles are what
    come near the shared-memory limit, as dq fp32 D 32 did) with rules off, which is what their
    compile adds (kept to fit CI's 30 minutes on 2 cores: every "all"
    spec costs 4-21 s of ptxas)."""
    if tname == "bf16" and d in (64, 128):
        return ("all", "plain", "causal")
    if tname == "fp16" or d == 16 or (tname == "bf16" and d == 32):
        return ("plain",)
    return ("all",)


def compile_specs(cc: int):
    """Every attention kernel at every config its prune can select on sm_<cc>, for each head dim
    and dtype (fp16 at D 64 and 128 only), in the rule sets of :func:`_gate_variants`."""
    from .common import SMEM_LIMIT
    from .gate import Spec, signature

    for tname, dtype in GATE_DTYPES.items():
        ptr = "*" + tname
        types = {**{n: view_type(ptr) for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")},
                 "LSE": "*fp64", **{n: "*fp32" for n in ("DELTA", "DLSE")}, "rules": rules_type(ptr), "lists": lists_type(),
                 "sm_scale": "fp32"}
        pre_types = {**types, "O": ptr, "DO": ptr}  # the preprocess reads O and dO contiguous
        elem = torch.empty((), dtype=dtype).element_size()
        # (D, Dv): every head dim with Dv = D, plus a value head dim narrower than the key's (MLA's 192 / 128)
        dims = [(d, d) for d in GATE_HEAD_DIMS] + ([(192, 128)] if tname == "bf16" else [])
        for d, dv in dims:
            if tname == "fp16" and d not in (64, 128):
                continue  # fp16 tiles and code equal bf16's but for the MMA type: two head dims suffice
            prob = dict(layout_bq=128, layout_bk=128, block_d=block_d_of(max(d, dv)), elem=elem, smem=SMEM_LIMIT[cc])
            fast = tname == "bf16" and d in (64, 128)
            for variant in _gate_variants(tname, d):
                rules = RuleFlags(**{f: f in _VARIANTS[variant] for f in RuleFlags._fields})
                back = rules._replace(paged=False)  # paged caches: forward only
                flags = dict(HEAD_DIM=d, BLOCK_D=block_d_of(d), HEAD_DV=dv, BLOCK_DV=block_d_of(dv), LAYOUT_BQ=128,
                             LAYOUT_BK=128, RULES=rules, PRECISION="ieee")
                for name, kernel, tuner in (("fwd", _sparse_attention_fwd_kernel, FWD_TUNER),
                                            ("dkdv", _sparse_attention_bwd_dkdv_kernel, DKDV_TUNER),
                                            ("dq", _sparse_attention_bwd_dq_kernel, DQ_TUNER)):
                    for i, cfg in enumerate(tuner.candidates(**prob)):
                        tiles = {k: v for k, v in cfg.items() if k.isupper()}
                        tags = {"dtype": tname, "D": d, **({"Dv": dv} if dv != d else {}), "variant": variant, **cfg}
                        if fast and variant != "all" and i == 0 and cc == 90:
                            tags["max_spill"] = SPILL_BUDGET[name]
                        yield Spec(name, kernel, signature(kernel, types),
                                   {**flags, **tiles, **({} if name == "fwd" else {"RULES": back}), "LOG": None},
                                   cfg["num_warps"], cfg["num_stages"], tags=tags)
            yield Spec("preprocess", _sparse_attention_bwd_preprocess_kernel,
                       signature(_sparse_attention_bwd_preprocess_kernel, pre_types),
                       dict(HEAD_DIM=dv, BLOCK_D=block_d_of(dv), BLOCK_M=PREPROCESS_BLOCK_M, HAS_DLSE=True,
                            PRECISION="ieee"), 4, 1,
                       tags={"dtype": tname, "D": dv})
