"""The walk's extension point carries new per-tile work without a new walk: a TILE_HOOK that sums
probabilities over queries (column sums, recomputed from the saved LSE in a key-major walk) matches
the float64 softmax, with causal, window and sinks and GQA. (What issue 13's statistics build on.)"""
import pytest
import torch
import triton
import triton.language as tl

import sparseattn as sa
from sparseattn.triton_kernels.common import load_rows, plane, program_tile, view
from sparseattn.ops.common import ScoreOptions
from sparseattn.triton_kernels.walk import RuleFlags, layout_row, lists_of, lse2, rules_at, rules_of, walk

from utils import DEVICE


@triton.jit
def _p_tile(carry, ctx, s_t, dcap, q_t, y, offs_m, MASKED: tl.constexpr, RULES: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    LSE, Lq = ctx
    return carry, tl.math.exp2(s_t - lse2(LSE, offs_m, Lq, MASKED)[None, :])

@triton.jit
def colsum_hook(extra, p, offs_own, offs):
    return (extra[0] + tl.sum(p, 1),)

@triton.jit
def _colsum_kernel(Q, K, LSE, OUT, rules, lists, H, HKV, GROUP,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, RULES: tl.constexpr, PRECISION: tl.constexpr):
    Lq, Lk = rules.Lq, rules.Lk
    b, hk, hk1, blk, offs_n = program_tile(Lk, HKV, 1, BLOCK_N, LAYOUT_BK)
    k = load_rows(plane(K, b, hk), offs_n, Lk, True, HEAD_DIM, BLOCK_D)
    extra = (tl.zeros([BLOCK_N], dtype=tl.float32),)
    for g in range(GROUP):
        h = hk * GROUP + g
        extra = walk((), extra, (LSE + (b * H + h) * Lq, Lq), k, offs_n, plane(Q, b, h), None, rules_at(rules, b, h), lists,
                     layout_row(lists, b, h, blk), True, RULES, BLOCK_M, LAYOUT_BQ, LAYOUT_BK, HEAD_DIM, BLOCK_D,
                     HEAD_DIM, BLOCK_D, PRECISION, _p_tile, colsum_hook)[1]
    tl.store(OUT + (b * HKV + hk) * Lk + offs_n, extra[0], mask=offs_n < Lk)


def test_column_sum_hook_matches_float64():
    if DEVICE != "cpu":
        pytest.skip("CPU tensors through the interpreter (the kernel is a test fixture, not tuned)")
    torch.manual_seed(0)
    B, H, HKV, Lq, Lk, D = 2, 4, 2, 150, 200, 32
    q = torch.randn(B, H, Lq, D); k = torch.randn(B, HKV, Lk, D); v = torch.randn(B, HKV, Lk, D)
    layout = sa.BlockLayout.from_block_mask(torch.rand(1, 1, 3, 4) < 0.8, 64, (Lq, Lk), causal="bottom_right", window=90, sinks=3)
    out, lse = sa.sparse_attention(q, k, v, layout, return_lse=True)
    lists = layout.lists()
    scale = D ** -0.5
    rules = rules_of(Lq, Lk, None, None, None, lists[1], scale * 1.4426950408889634, layout.causal_offset, layout.window, layout.sinks,
                     ScoreOptions())
    res = torch.full((B, HKV, Lk), float("nan"))
    _colsum_kernel[(triton.cdiv(Lk, 64) * B * HKV,)](view(q), view(k), lse, res, rules, lists_of(*lists[5:]), H, HKV, H // HKV,
        HEAD_DIM=D, BLOCK_D=32, BLOCK_M=64, BLOCK_N=64, LAYOUT_BQ=64, LAYOUT_BK=64,
        RULES=RuleFlags(*([True, True] + [False] * (len(RuleFlags._fields) - 2))), PRECISION="ieee")
    dense = layout.to_dense_mask().expand(B, H, Lq, Lk)
    kk = k.repeat_interleave(H // HKV, 1).double()
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~dense, float("-inf")), -1).nan_to_num(0.0)
    ref = p.sum(2).view(B, HKV, H // HKV, Lk).sum(2)
    assert torch.isfinite(res).all()
    torch.testing.assert_close(res.double(), ref, rtol=1e-5, atol=1e-5)
