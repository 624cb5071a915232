"""SparseD (issue 14): block importances against the float64 oracle, both top-k passes with a
margin for near ties, chunking invisible, a planted key block found, attention (fwd + bwd) on the
estimated layout against the float64 oracle, the step schedule, torch.compile(fullgraph=True),
bad input."""

import pytest
import torch

import sparseattn as sa
from sparseattn.patterns import sparsed as sparsed_module

from checks import attention_inputs, check_attention
from utils import DEVICE, randn


def _check(q, k, sd, gs, tol=None):
    """Importances to fp32 accuracy (tol 1e-5 per 64-token block edge: a block's importance sums
    more fp32 terms as blocks grow); each pass's kept set equal to the oracle's wherever its k-th
    and (k+1)-th float64 importances differ by more than tol; returns the block mask."""
    tol = 1e-5 * max(1, sd.block_size // 64) if tol is None else tol
    imp, gen = sd.block_importance(q, k, gs)
    ref, rimp, rgen = sa.reference.sparsed_blocks(q.cpu(), k.cpu(), sd, gs, return_importance=True)
    assert imp.dtype == torch.float32
    assert (imp.cpu().double() - rimp).abs().max() < tol and (gen.cpu().double() - rgen).abs().max() < tol
    got = sd.block_mask(q, k, gs).cpu()
    nb = rimp.shape[-1]
    g = nb - rgen.shape[-1]
    for vals, cols, n in ((rimp, slice(0, g), min(nb, max(1, int(nb * sd.select) + 1))),
                          (rgen, slice(g, nb), min(nb - g, max(1, int((nb - g) * sd.select) + 1)))):
        srt = vals.sort(-1, descending=True).values
        if n < vals.shape[-1]:
            clear = (srt[..., n - 1] - srt[..., n]).abs() > tol
        else:
            clear = torch.ones_like(srt[..., 0], dtype=torch.bool)
        assert torch.equal(got[..., cols][clear], ref[..., cols][clear])
    return got


@pytest.mark.parametrize("B,Hq,Hkv,L,bs,gs,select,dtype", [
    (1, 2, 2, 600, 64, 400, 0.3, torch.float32),
    (2, 4, 2, 256, 64, 100, 0.5, torch.float16),   # GQA, generation start inside a block
    (1, 2, 2, 500, 128, 500, 0.3, torch.float32),  # no generation tokens: the last block is g
    (1, 2, 2, 300, 64, 0, 0.3, torch.float32),     # all generation: pass 1 keeps nothing
    (1, 1, 1, 97, 64, 50, 1.0, torch.float32),     # keep ratio 1, partial block
    (1, 2, 2, 700, 256, 300, 0.3, torch.float32),  # blocks of 256 -> 128 tiles
])
def test_importance_and_selection_match_oracle(B, Hq, Hkv, L, bs, gs, select, dtype):
    q, k = randn(B, Hq, L, 32, dtype=dtype), randn(B, Hkv, L, 32, dtype=dtype)
    sd = sa.SparseD(bs, select=select)
    got = _check(q, k, sd, gs)
    lay = sd.estimate(q, k, gs)
    assert lay.causal_offset is None and lay.shape == (B, Hq)
    dense = got.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :L, :L]
    assert torch.equal(lay.to_dense_mask().cpu(), dense)


def test_chunking_is_invisible(monkeypatch):
    q, k = randn(1, 2, 640, 32), randn(1, 2, 640, 32)
    sd = sa.SparseD(64, select=0.3)
    whole = sd.block_importance(q, k, 400), sd.select_blocks(q, k, 400)
    monkeypatch.setattr(sparsed_module, "_CHUNK", 1)  # one query block per chunk
    parts = sd.block_importance(q, k, 400), sd.select_blocks(q, k, 400)
    assert torch.allclose(whole[0][0], parts[0][0], atol=1e-6) and torch.allclose(whole[0][1], parts[0][1], atol=1e-6)
    assert torch.equal(whole[1], parts[1])


def test_planted_prompt_block_is_found():
    """Keys of prompt block 2 are planted along query block 6's mean: block 6 must attend it."""
    torch.manual_seed(0)
    L, bs = 512, 64
    q, k = randn(1, 1, L, 32), randn(1, 1, L, 32) * 0.2
    d = randn(32)
    q[:, :, 6 * bs:7 * bs] += 2 * d
    k[:, :, 2 * bs:3 * bs] += 2 * d
    sd = sa.SparseD(bs, select=0.1)  # 1 + int(0.8) = 1 prompt block among 8
    keep = _check(q, k, sd, 384)
    assert keep[0, 0, 6, 2]


@pytest.mark.parametrize("B,Hq,Hkv,L,gs", [(1, 2, 2, 256, 150), (1, 4, 2, 200, 64)])
def test_attention_on_the_estimate_matches_oracle(B, Hq, Hkv, L, gs):
    q, k, v = attention_inputs(B, Hq, Hkv, L, L, 32, torch.float32, DEVICE)
    lay = sa.SparseD(64, select=0.3).estimate(q, k, gs)
    check_attention(q, k, v, lay, "triton")


def test_schedule():
    sd = sa.SparseD(64, select=0.3, skip=0.2)
    sched = sa.SparseDSchedule(sd, total_steps=10)
    assert sched.estimate_step == 3 and [sched.use_sparse(s) for s in (2, 3, 4)] == [False, False, True]
    q, k, v = (randn(1, 2, 192, 16) for _ in range(3))
    full = sa.reference.attention(q, k, v)
    for step in range(4):
        out = sched.attention("l0", q, k, v, step, generation_start=128)
        assert torch.allclose(out.double(), full, atol=1e-5), step
    lay = sched.layout("l0")
    assert torch.equal(lay.to_dense_mask(), sd.estimate(q, k, 128).to_dense_mask())
    q2 = randn(1, 2, 192, 16)  # later steps reuse the cached pattern, whatever q is
    out = sched.attention("l0", q2, k, v, 5, generation_start=128)
    ref = sa.reference.sparse_attention(q2, k, v, lay)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    with pytest.raises(RuntimeError, match="layer key 'l1'"):
        sched.attention("l1", q, k, v, 5, generation_start=128)
    sched.attention("l0", q, k, v, 0, generation_start=128)  # a new generation
    assert sched.layout("l0") is None


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = attention_inputs(1, 2, 1, 192, 192, 16, torch.float32, DEVICE)
    sd = sa.SparseD(64, select=0.3)

    def fn(q, k, v):
        return sa.sparse_attention(q, k, v, sd.estimate(q, k, 128))

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.allclose(out, fn(q, k, v), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(select=0.0), ValueError, "select"),
    (dict(select=1.5), ValueError, "select"),
    (dict(select="0.3"), TypeError, "select"),
    (dict(skip=1.0), ValueError, "skip"),
    (dict(skip=-0.1), ValueError, "skip"),
    (dict(block_size=32), ValueError, "block_size"),
    (dict(scale=-1.0), ValueError, "scale"),
])
def test_rejects_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        sa.SparseD(**kwargs)


def test_rejects_bad_inputs():
    sd = sa.SparseD(64)
    q = torch.randn(1, 2, 128, 16)
    with pytest.raises(ValueError, match="generation_start"):
        sd.estimate(q, q, 129)
    with pytest.raises(ValueError, match="generation_start"):
        sd.estimate(q, q, -1)
    with pytest.raises(ValueError, match="Lq == Lk"):
        sd.estimate(q, torch.randn(1, 2, 64, 16), 10)
    with pytest.raises(ValueError, match="total_steps"):
        sa.SparseDSchedule(sd, total_steps=0)
    with pytest.raises(TypeError, match="sparsed"):
        sa.SparseDSchedule(sa.TopKBlocks(), total_steps=10)
