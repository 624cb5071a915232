"""BlockLayout.from_topk: device-built layouts from key-block ids (fixed widths, no host read),
checked against from_block_mask of the same tiles, the float64 oracle, torch.compile(fullgraph=True)
and (with a GPU) a CUDA graph capture."""
import math

import pytest
import torch

import sparseattn as sa
from checks import attention_inputs, check_attention
from utils import DEVICE, randn


def _random_ids(shape, nq, nk, k, dtype=torch.int32):
    """Ids in [-1, nK) with -1 slots and duplicates in every row, in random order."""
    ids = torch.randint(-1, nk, (*shape, nq, k), dtype=dtype, device=DEVICE)
    if k >= 3:
        ids[..., 1] = ids[..., 0]  # a duplicate
        ids[..., 2] = -1           # an unused slot
    return ids


def _block_mask(ids, nk):
    """The tiles the ids name, written independently of the builder (loops)."""
    bm = torch.zeros(*ids.shape[:3], nk, dtype=torch.bool)
    for (b, h, r, _), c in zip(torch.cartesian_prod(*(torch.arange(s) for s in ids.shape)).tolist(),
                               ids.flatten().tolist()):
        if 0 <= c < nk:
            bm[b, h, r, c] = True
    return bm.to(ids.device)


def _assert_same_layout(got, ref, k):
    """got (from_topk, kv lists k wide) against ref (from_block_mask, sync_free: grid wide)."""
    nq, nk = ref.num_blocks
    bl, hl = ref.shape
    assert got.shape == ref.shape and got.num_blocks == ref.num_blocks
    assert (got.causal_offset, got.window, got.sinks) == (ref.causal_offset, ref.window, ref.sinks)
    assert torch.equal(got.to_dense_mask(), ref.to_dense_mask())
    for a, b in zip(got.tile_masks(), ref.tile_masks()):  # the partial / full split
        assert torch.equal(a, b)
    w = max(k, 1)
    for name in ("kv", "full_kv", "q", "full_q"):
        num, idx = getattr(got, name + "_num_blocks"), getattr(got, name + "_indices")
        assert num.dtype == idx.dtype == torch.int32
        width = w if "kv" in name else nq
        assert tuple(idx.shape) == (bl, hl, num.shape[-1], width), name  # fixed widths
        assert torch.equal(num, getattr(ref, name + "_num_blocks")), name
        rid = getattr(ref, name + "_indices")
        n = min(width, rid.shape[-1])
        assert torch.equal(idx[..., :n], rid[..., :n]), name  # sorted, padded with 0
        assert not idx[..., n:].any(), name
    assert torch.all(got.kv_bit_ids == -1) and torch.all(got.q_bit_ids == -1)
    assert got.kv_bit_ids.shape == got.kv_indices.shape and got.q_bit_ids.shape == got.q_indices.shape


@pytest.mark.parametrize("lens,bs,shape,k,kinds,dtype", [
    ((200, 97), (64, 64), (2, 3), 3, dict(), torch.int32),
    ((200, 97), (32, 16), (1, 1), 9, dict(causal="top_left"), torch.int64),   # k > nK: duplicates for sure
    ((97, 250), (32, 64), (1, 2), 4, dict(causal="bottom_right"), torch.int32),
    ((250, 97), (16, 32), (2, 1), 3, dict(causal="bottom_right"), torch.int32),  # bottom-right, Lq > Lk
    ((256, 256), (32, 32), (1, 2), 5, dict(causal="top_left", window=70, sinks=5), torch.int32),
    ((130, 300), (16, 64), (2, 2), 3, dict(causal="bottom_right", window=100), torch.int64),
    ((63, 63), (16, 16), (1, 1), 1, dict(causal="top_left"), torch.int32),
    ((200, 97), (64, 32), (1, 2), 0, dict(causal="top_left"), torch.int32),    # k = 0: nothing listed
])
def test_matches_from_block_mask(lens, bs, shape, k, kinds, dtype):
    lq, lk = lens
    nq, nk = math.ceil(lq / bs[0]), math.ceil(lk / bs[1])
    ids = _random_ids(shape, nq, nk, k, dtype)
    got = sa.BlockLayout.from_topk(ids, bs, lens, **kinds)
    ref = sa.BlockLayout.from_block_mask(_block_mask(ids, nk), bs, lens, sync_free=True, **kinds)
    _assert_same_layout(got, ref, k)


@pytest.mark.parametrize("lens,causal", [((128, 320), None), ((97, 300), "bottom_right")])
def test_every_slot_used(lens, causal):
    """No -1, no duplicate: without causal and bounds every tile is full and every slot of the full
    lists is used (the last one included)."""
    nq, nk = 4, 10
    ids = torch.stack([torch.randperm(nk, device=DEVICE)[:6] for _ in range(2 * nq)]).view(1, 2, nq, 6)
    got = sa.BlockLayout.from_topk(ids, 32, lens, causal=causal)
    ref = sa.BlockLayout.from_block_mask(_block_mask(ids, nk), 32, lens, causal=causal, sync_free=True)
    _assert_same_layout(got, ref, 6)
    if causal is None:
        assert torch.all(got.kv_num_blocks + got.full_kv_num_blocks == 6)


def test_rules_drop_empty_tiles_from_the_counts():
    """Every key block listed (with duplicates and -1): causal and the window leave some tiles
    empty; they are not counted, so no kernel visits them."""
    nq = nk = 4
    every = torch.arange(nk, dtype=torch.int32).flip(0).expand(1, 1, nq, nk)
    ids = torch.cat([every, every[..., :1], torch.full_like(every[..., :1], -1)], -1).to(DEVICE)
    lay = sa.BlockLayout.from_topk(ids, 64, (256, 256), causal="top_left")
    rows = torch.arange(nq, device=DEVICE)
    assert torch.equal(lay.kv_num_blocks[0, 0], torch.ones(nq, dtype=torch.int32, device=DEVICE))  # diagonal
    assert torch.equal(lay.kv_indices[0, 0, :, 0], rows.int())
    assert torch.equal(lay.full_kv_num_blocks[0, 0], rows.int())  # the blocks before it; none above
    win = sa.BlockLayout.from_topk(ids, 64, (256, 256), causal="top_left", window=64, sinks=1)
    # window 64 reaches the diagonal block and the one before; block 0 stays through the sink
    counts = (win.kv_num_blocks + win.full_kv_num_blocks)[0, 0].tolist()
    assert counts == [1, 2, 3, 3]
    assert win.kv_indices[0, 0, 3, :3].tolist() == [0, 2, 3]


def test_out_of_range_ids():
    lens, nk = (200, 97), 2
    ids = torch.tensor([[[[1, 0, 5], [-3, 1, 1], [2, -1, 0], [100, 0, -2]]]], dtype=torch.int32, device=DEVICE)
    clean = torch.where((ids >= 0) & (ids < nk), ids, -1)
    got = sa.BlockLayout.from_topk(ids, 64, lens, causal="top_left", validate=False)
    ref = sa.BlockLayout.from_topk(clean, 64, lens, causal="top_left")
    for a, b in zip(got.lists(), ref.lists()):
        assert torch.equal(a, b)  # dropped on the device, never listed
    # row 0's block 1 is above the diagonal; ids 5, -3, 100 and -2 are out of range
    assert got.kv_num_blocks.tolist() == [[[1, 1, 0, 1]]] and got.full_kv_num_blocks.tolist() == [[[0, 0, 1, 0]]]
    for validate in (None, True):
        with pytest.raises(ValueError, match=r"indices: expected key-block ids in \[0, 2\) or -1 .*"
                                             r"got values in \[-3, 100\]"):
            sa.BlockLayout.from_topk(ids, 64, lens, validate=validate)


@pytest.mark.parametrize("args,exc,words", [
    (dict(indices=[[[[0]]]]), TypeError, "indices: expected a torch.Tensor"),
    (dict(indices=torch.zeros(1, 1, 4, 2)), TypeError, "indices: expected dtype torch.int32 or torch.int64"),
    (dict(indices=torch.zeros(1, 1, 4, 2, dtype=torch.int16)), TypeError, "indices: expected dtype"),
    (dict(indices=torch.zeros(1, 4, 2, dtype=torch.int32)), ValueError,
     r"indices: expected shape \[B\|1, H\|1, 4, k\]"),
    (dict(indices=torch.zeros(1, 1, 3, 2, dtype=torch.int32)), ValueError, r"got \(1, 1, 3, 2\)"),
    (dict(seq_lens=(200,)), TypeError, "seq_lens"),
    (dict(block_size=48), ValueError, "block_size"),
    (dict(window=8), ValueError, "window"),
    (dict(causal="top_left", sinks=2), ValueError, "sinks"),
])
def test_rejects(args, exc, words):
    kw = dict(indices=torch.zeros(1, 1, 4, 2, dtype=torch.int32), block_size=64, seq_lens=(200, 97))
    kw.update(args)
    with pytest.raises(exc, match=words):
        sa.BlockLayout.from_topk(kw.pop("indices"), kw.pop("block_size"), kw.pop("seq_lens"), **kw)


@pytest.mark.parametrize("B,H,lens,shape,kinds", [
    (2, 2, (200, 97), (2, 2), dict()),                                   # per-[B, H] lists
    (1, 2, (97, 200), (1, 1), dict(causal="bottom_right")),              # broadcast
    (1, 2, (256, 256), (1, 2), dict(causal="top_left", window=70, sinks=8)),
])
def test_attention_matches_oracle(B, H, lens, shape, kinds):
    lq, lk = lens
    nq, nk = math.ceil(lq / 64), math.ceil(lk / 64)
    ids = _random_ids(shape, nq, nk, 3)
    ids[..., 0, :] = -1  # a query block that sees nothing: zero output, -inf lse, zero gradients
    lay = sa.BlockLayout.from_topk(ids, 64, lens, **kinds)
    ref = sa.BlockLayout.from_block_mask(_block_mask(ids, nk), 64, lens, sync_free=True, **kinds)
    assert torch.equal(lay.to_dense_mask(), ref.to_dense_mask())
    q, k, v = attention_inputs(B, H, H, lq, lk, 32, torch.float32, DEVICE)
    check_attention(q, k, v, lay, "triton")


def _build_and_attend(q, k, v):
    """Key blocks chosen from q and k on the device (top-2 of pooled scores, plus a duplicate, an
    unused slot and an out-of-range id), the layout built from them, then attention."""
    lq, lk = q.shape[2], k.shape[2]
    qp, kp = q.unflatten(2, (lq // 64, 64)).mean(3), k.unflatten(2, (lk // 64, 64)).mean(3)
    top = (qp @ kp.transpose(-1, -2)).topk(2, dim=-1).indices
    ids = torch.cat([top, top[..., :1], torch.full_like(top[..., :1], -1), torch.full_like(top[..., :1], 99)], -1)
    lay = sa.BlockLayout.from_topk(ids, 64, (lq, lk), causal="bottom_right")  # validate=None: no read when compiling
    return sa.sparse_attention(q, k, v, lay), lay.lists()


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = attention_inputs(1, 2, 2, 128, 192, 16, torch.float32, DEVICE)
    compiled = torch.compile(_build_and_attend, fullgraph=True, backend="aot_eager")
    out, lists = compiled(q, k, v)
    with pytest.raises(ValueError, match="indices"):  # eagerly, the id 99 is caught
        _build_and_attend(q, k, v)
    qp, kp = q.unflatten(2, (2, 64)).mean(3), k.unflatten(2, (3, 64)).mean(3)
    top = (qp @ kp.transpose(-1, -2)).topk(2, dim=-1).indices
    ref = sa.BlockLayout.from_block_mask(_block_mask(top, 3), 64, (128, 192), causal="bottom_right", sync_free=True)
    got = sa.BlockLayout.from_lists(lists, block_size=(64, 64), seq_lens=(128, 192), causal_offset=64)
    _assert_same_layout(got, ref, 5)
    eager = sa.sparse_attention(q, k, v, ref)
    assert torch.allclose(out, eager, atol=1e-6, rtol=1e-5)
    dout = randn(*out.shape)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(eager, (q, k, v), dout)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    lens, nq, nk = (500, 300), 8, 5
    static = _random_ids((2, 2), nq, nk, 4)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        sa.BlockLayout.from_topk(static, 64, lens, causal="top_left")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # validate=None: no host read while capturing
        lists = sa.BlockLayout.from_topk(static, 64, lens, causal="top_left").lists()
    for _ in range(2):
        static.copy_(_random_ids((2, 2), nq, nk, 4))
        graph.replay()
        torch.cuda.synchronize()
        ref = sa.BlockLayout.from_topk(static, 64, lens, causal="top_left")
        for a, b in zip(lists, ref.lists()):
            assert torch.equal(a, b)
