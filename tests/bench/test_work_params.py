"""The work floor of the sparse bench cases (issue 16, part 4): the tiles counted on the host from a
layout's lists are the tiles the forward kernel visits (``count_tiles``, kernel tile = layout
block), routing's formula is its cluster layout's count, the FLOPs and bytes follow the documented
formulas, and the sparse cases of the attention, patterns and dynamic suites carry them."""
import argparse
import math

import torch

import sparseattn as sa
from sparseattn.bench import attention, dynamic, patterns
from sparseattn.triton_kernels.common import count_tiles

from utils import DEVICE

KEYS = {"listed tiles", "listed GFLOP", "listed GB"}


def _visits(fn):
    with count_tiles() as log:
        fn()
    return len(log.of("sparse_attention_fwd")[0].entries)


def test_listed_tiles_are_the_visited_tiles():
    """Broadcast lists (one per plane served), per-head lists, per-batch lists: the host count
    equals the forward's logged visits when the kernel tile is the layout block (64 x 64)."""
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 2, 128, 16
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DEVICE) for _ in range(3))
    layouts = [sa.BlockLayout.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE), 64, (L, L),
                                              causal="top_left"),
               sa.PerHead([sa.SlidingWindow(40, sinks=3), sa.PowerAttention(64)]).layout(L, L, DEVICE),
               sa.BlockLayout.from_block_mask(torch.rand(B, 1, 2, 2, generator=g).lt(0.6).to(DEVICE), 64, (L, L))]
    for layout in layouts:
        assert _visits(lambda: sa.sparse_attention(q, k, v, layout)) == attention.listed_tiles(layout, B, H)


def test_routing_formula_is_its_cluster_layout():
    g = torch.Generator().manual_seed(1)
    H, L, D, C, w = 2, 128, 16, 2, 100
    q, v = (torch.randn(1, H, L, D, generator=g).to(DEVICE) for _ in range(2))
    cen = torch.randn(H, C, D, generator=g).to(DEVICE)
    m = math.ceil(w / dynamic.ROUTING_TILE)
    assert _visits(lambda: sa.routing_attention(q, None, v, cen, w, share_qk=True)) == H * C * m * (m + 1) // 2


def test_flops_and_bytes_formulas():
    n, bq, bk, D, e, B, H, L = 10, 64, 32, 128, 2, 1, 4, 1000
    fwd = attention.tile_work(n, (bq, bk), (L, L), B, H, D, e, False)
    both = attention.tile_work(n, (bq, bk), (L, L), B, H, D, e, True)
    R = B * H * L
    assert fwd["listed tiles"] == both["listed tiles"] == n
    assert math.isclose(fwd["listed GFLOP"] * 1e9, 4 * n * bq * bk * D, rel_tol=1e-3)
    assert math.isclose(both["listed GFLOP"] * 1e9, 18 * n * bq * bk * D, rel_tol=1e-3)
    fwd_bytes = n * 2 * bk * D * e + R * (2 * D * e + 4)
    bwd_bytes = R * (2 * D * e + 4) + n * (2 * bq * D * e + 8 * bq) + R * 4 * D * e + n * 2 * bk * D * e \
        + R * (3 * D * e + 8)
    assert math.isclose(fwd["listed GB"] * 1e9, fwd_bytes, rel_tol=1e-3)
    assert math.isclose(both["listed GB"] * 1e9, fwd_bytes + bwd_bytes, rel_tol=1e-3)


def test_sparse_cases_carry_the_work_params(monkeypatch):
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")   # the dynamic estimates on the CPU path, as a CPU bench run
    args = argparse.Namespace(lengths=None, head_dims=None)
    cases = list(attention.attention_suite("cpu", True, args)) + list(patterns.patterns_suite("cpu", True, args)) \
        + list(dynamic.dynamic_suite("cpu", True, args))
    for c in cases:
        sparse = c.op == "attention block 10%" or c.op.startswith("pattern ") or c.op.endswith(
            ("(estimate + attention)", "(attention on the cached layout)", "(routing + attention)"))
        assert (KEYS <= set(c.params)) == sparse, (c.op, c.params)
        if sparse:
            assert c.params["listed tiles"] > 0 and c.params["listed GFLOP"] > 0 and c.params["listed GB"] > 0
    block = [c for c in cases if c.op == "attention block 10%"]
    fwd, both = block[0].params, block[1].params
    assert (fwd["direction"], both["direction"]) == ("fwd", "fwd+bwd")
    assert math.isclose(both["listed GFLOP"] / fwd["listed GFLOP"], 4.5, rel_tol=1e-3)
