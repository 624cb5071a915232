"""TopKBlocks (issue 14): the selection against the float64 oracle with a margin for near ties,
ties towards the lower block index, planted key blocks found, attention (fwd + bwd) against the
float64 oracle of the selected layout, awkward lengths, Lq != Lk, GQA, blocks above 128,
torch.compile(fullgraph=True), bad input."""
import math

import pytest
import torch

import sparseattn as sa

from checks import attention_inputs, check_attention
from utils import DEVICE, randn


def _check_selection(q, k, pat, rel_tol=1e-4):
    """Forced blocks exactly; among candidates the same number kept, and no dropped candidate
    scoring more than tol above a kept one (float64 scores); where the k-th and (k+1)-th scores
    differ by more than tol the sets are equal."""
    got = pat.block_mask(q, k).cpu()
    ref, s, cand = sa.reference.topk_blocks(q.cpu(), k.cpu(), pat, return_scores=True)
    tol = rel_tol * max(1.0, s.abs().max().item())
    assert torch.equal(got & ~cand, ref & ~cand), "window / sink blocks differ"
    gc, rc = got & cand, ref & cand
    assert torch.equal(gc.sum(-1), rc.sum(-1)), "number of top-k blocks differs"
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    min_kept = torch.where(gc, s, inf).amin(-1)
    max_dropped = torch.where(cand & ~gc, s, -inf).amax(-1)
    assert (min_kept >= max_dropped - tol).all(), "a dropped candidate scores above a kept one"
    kth = torch.where(rc, s, inf).amin(-1)
    nxt = torch.where(cand & ~rc, s, -inf).amax(-1)
    clear = (kth - nxt) > tol
    assert torch.equal(gc[clear], rc[clear])
    return got


def _expected_dense(keep, bs, lq, lk, causal):
    """Token mask of kept pattern blocks (bottom-right causal rule on top)."""
    m = keep.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :lq, :lk]
    if causal:
        pos = torch.arange(lq)[:, None] + (lk - lq)
        m = m & (torch.arange(lk)[None, :] <= pos)
    return m


@pytest.mark.parametrize("estimate", ["mean_pool", "max_pool"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,Hq,Hkv,lq,lk,bs,topk,win,sinks,dtype", [
    (2, 2, 2, 512, 512, 64, 2, 1, 1, torch.float32),
    (1, 4, 2, 300, 300, 64, 3, 1, 0, torch.float16),     # GQA, partial last block
    (1, 2, 1, 200, 457, 64, 2, 2, 1, torch.float32),     # Lq < Lk: misaligned diagonal
    (1, 2, 2, 457, 200, 64, 1, 1, 1, torch.float32),     # Lq > Lk: early rows see nothing (causal)
    (1, 1, 1, 1, 97, 64, 1, 1, 1, torch.float32),        # one query row
    (1, 2, 2, 63, 63, 64, 4, 0, 0, torch.float32),       # one block, topk > blocks
    (1, 2, 2, 1000, 1000, 128, 2, 1, 1, torch.float32),
    (1, 2, 2, 900, 700, 256, 1, 1, 0, torch.float32),    # blocks of 256 -> 128 tiles
])
def test_selection_matches_oracle(estimate, causal, B, Hq, Hkv, lq, lk, bs, topk, win, sinks, dtype):
    q, k = randn(B, Hq, lq, 32, dtype=dtype), randn(B, Hkv, lk, 32, dtype=dtype)
    pat = sa.TopKBlocks(bs, topk=topk, estimate=estimate, window_blocks=win, sink_blocks=sinks, causal=causal)
    got = _check_selection(q, k, pat)
    ids = pat.select_blocks(q, k)
    assert ids.dtype == torch.int32 and ids.shape[:3] == (B, Hq, math.ceil(lq / bs))
    # the layout holds exactly the selected blocks (under the causal rule)
    lay = pat.layout_for(q, k)
    assert lay.shape == (B, Hq) and lay.device == q.device
    assert torch.equal(lay.to_dense_mask().cpu(), _expected_dense(got, bs, lq, lk, causal))


def test_ties_go_to_the_lower_block():
    """Identical key blocks score exactly the same: the lowest candidates are kept."""
    blk = randn(1, 2, 64, 32)
    k = blk.repeat(1, 1, 8, 1)
    q = randn(1, 2, 512, 32)
    for est in ("mean_pool", "max_pool"):
        pat = sa.TopKBlocks(64, topk=2, estimate=est, window_blocks=1, sink_blocks=1, causal=False)
        keep = pat.block_mask(q, k)
        for I in range(8):
            cands = [J for J in range(8) if J not in (0, I)]
            want = {0, I, *cands[:2]}
            assert set(torch.nonzero(keep[0, 0, I]).flatten().tolist()) == want, (est, I)
        assert torch.equal(keep.cpu(), sa.reference.topk_blocks(q.cpu(), k.cpu(), pat))


@pytest.mark.parametrize("estimate", ["mean_pool", "max_pool"])
def test_planted_key_blocks_are_found(estimate):
    """Per query block I >= 2, key block J = I // 2 (never window or sink) is planted to match the
    block's mean query: it must be selected, for every head."""
    torch.manual_seed(0)
    L, bs, H = 512, 64, 2
    q, k = randn(1, H, L, 32), randn(1, H, L, 32) * 0.3
    q = q + 2 * randn(1, H, L // bs, 32).repeat_interleave(bs, 2)  # a direction per query block
    qm = q.unflatten(2, (L // bs, bs)).mean(3)
    targets = {}
    for I in range(3, L // bs, 2):  # distinct key blocks: 1, 2, 3
        J = I // 2
        k[:, :, J * bs:(J + 1) * bs] += 3 * qm[:, :, I, None] / qm[:, :, I, None].norm(dim=-1, keepdim=True)
        targets[I] = J
    pat = sa.TopKBlocks(bs, topk=1, estimate=estimate, window_blocks=1, sink_blocks=1, causal=True)
    keep = pat.block_mask(q, k)
    for I, J in targets.items():
        assert keep[0, :, I, J].all(), (I, J)
    _check_selection(q, k, pat)


@pytest.mark.parametrize("B,Hq,Hkv,lq,lk,kw", [
    (1, 2, 2, 256, 256, dict(estimate="mean_pool")),
    (1, 4, 2, 200, 330, dict(estimate="max_pool")),                    # GQA, Lq != Lk
    (2, 2, 1, 97, 97, dict(estimate="mean_pool", causal=False, sink_blocks=0)),
    (1, 2, 2, 330, 200, dict(estimate="mean_pool", window_blocks=0)),  # rows that see nothing
])
def test_attention_matches_oracle(B, Hq, Hkv, lq, lk, kw):
    q, k, v = attention_inputs(B, Hq, Hkv, lq, lk, 32, torch.float32, DEVICE)
    pat = sa.TopKBlocks(64, topk=1, **kw)
    lay = pat.layout_for(q, k)
    keep = sa.reference.topk_blocks(q.cpu(), k.cpu(), pat)  # no near ties at these sizes (checked above)
    assert torch.equal(lay.to_dense_mask().cpu(), _expected_dense(keep, 64, lq, lk, pat.causal))
    out = check_attention(q, k, v, lay, "triton")[0]
    assert torch.equal(sa.sparse_attention(q, k, v, pat), out)  # the pattern itself is accepted


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = attention_inputs(1, 2, 1, 128, 192, 16, torch.float32, DEVICE)
    pat = sa.TopKBlocks(64, topk=1, estimate="max_pool")  # GQA, Lq != Lk

    def fn(q, k, v):
        return sa.sparse_attention(q, k, v, pat)

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    eager = fn(q, k, v)
    assert torch.allclose(out, eager, atol=1e-6, rtol=1e-5)
    dout = randn(*out.shape)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(eager, (q, k, v), dout)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(topk=0), ValueError, "topk"),
    (dict(topk=1.5), TypeError, "topk"),
    (dict(block_size=32), ValueError, "block_size"),
    (dict(block_size=96), ValueError, "block_size"),
    (dict(estimate="sum"), ValueError, "estimate"),
    (dict(window_blocks=-1), ValueError, "window_blocks"),
    (dict(sink_blocks=-1), ValueError, "sink_blocks"),
    (dict(causal="yes"), TypeError, "causal"),
])
def test_rejects_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        sa.TopKBlocks(**kwargs)


@pytest.mark.parametrize("q_shape,k_shape,words", [
    ((1, 2, 64), (1, 2, 64, 16), "q"),             # 3 dims
    ((1, 3, 64, 16), (1, 2, 64, 16), "q"),          # heads not divisible
    ((1, 2, 64, 16), (1, 2, 64, 32), "k"),          # head dims differ
    ((2, 2, 64, 16), (1, 2, 64, 16), "k"),          # batch differs
])
def test_rejects_bad_inputs(q_shape, k_shape, words):
    with pytest.raises(ValueError, match=words):
        sa.TopKBlocks(64, topk=1).layout_for(torch.randn(*q_shape), torch.randn(*k_shape))
