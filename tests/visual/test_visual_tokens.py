"""Visual-token helpers (issue 13 section 2): FasterVLM / FastV / DAMRO scores against float64
(values exactly, up to fp32 rounding), top-k decisions with margins, keep masks, KV compaction
(exact gather; decode after compaction equals decode with the dropped keys masked), key keep masks
that skip fully dropped tiles, VAR's massive-activation sinks, bad input."""
import pytest
import torch

import sparseattn as sa
from sparseattn.visual import naive
from utils import DEVICE, assert_oracle, randn

TOL = dict(rtol=2e-5, atol=1e-7)   # fp32 computation of one probability row vs float64


def _close(got, ref):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), ref.cpu().double(), **TOL)


def _assert_topk(idx, ref_scores, keep, margin=1e-6):
    """A top-k decision with a margin: the kept set holds ``keep`` distinct tokens, and none is worse
    than a dropped one by more than ``margin`` (in the float64 scores)."""
    assert idx.shape[-1] == keep
    for b in range(ref_scores.shape[0]):
        kept = torch.zeros(ref_scores.shape[-1], dtype=torch.bool)
        kept[idx[b].cpu()] = True
        assert int(kept.sum()) == keep
        if 0 < keep < ref_scores.shape[-1]:
            assert ref_scores[b][kept].min() >= ref_scores[b][~kept].max() - margin


# ----------------------------------------------------------------------------- scores
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,L", [(2, 4, 2, 37), (1, 3, 1, 1 + 63), (3, 2, 2, 2)])
def test_cls_importance(dtype, B, Hq, Hkv, L):
    q, k = randn(B, Hq, L, 16, dtype=dtype), randn(B, Hkv, L, 16, dtype=dtype)
    a = sa.visual.cls_importance(q, k)
    assert a.shape == (B, L - 1)
    _close(a, naive.cls_importance(q, k))
    assert torch.all(a.sum(-1) < 1)
    # another [CLS] row, other patch columns, a scale
    a = sa.visual.cls_importance(q, k, cls_index=L - 1, patch_slice=slice(0, L - 1), scale=0.3)
    _close(a, naive.cls_importance(q, k, L - 1, slice(0, L - 1), 0.3))


def test_cls_importance_topk():
    q, k = randn(2, 4, 1 + 100, 32, scale=2.0), randn(2, 4, 1 + 100, 32)
    a = sa.visual.cls_importance(q, k)
    ref = naive.cls_importance(q, k)
    for keep in (0, 1, 29, 58, 100):
        idx = sa.visual.select_tokens(a, keep)
        assert torch.all(idx[:, 1:] > idx[:, :-1])                  # raster order
        _assert_topk(idx, ref, keep)


@pytest.mark.parametrize("Lq,Lk", [(97, 97), (40, 97), (130, 97), (1, 63)])
@pytest.mark.parametrize("is_causal", [True, False])
def test_last_query_importance(Lq, Lk, is_causal):
    q, k = randn(2, 4, Lq, 16), randn(2, 2, Lk, 16)
    cols = slice(5, 5 + 50)
    a = sa.visual.last_query_importance(q, k, cols, is_causal)
    assert a.shape == (2, 50)
    _close(a, naive.last_query_importance(q, k, cols, is_causal))
    if is_causal and Lq < 55:   # SDPA's top-left rule: row Lq-1 sees keys j <= Lq - 1 only
        assert torch.all(a[:, max(Lq - 5, 0):] == 0)


def test_last_query_importance_columns_and_padding():
    q, k = randn(3, 4, 80, 16), randn(3, 1, 80, 16)
    kpm = torch.rand(3, 80, device=DEVICE) < 0.6
    kpm[2] = False                                                   # batch 2: the last row sees nothing
    idx1 = torch.randperm(80, device=DEVICE)[:30]
    idx2 = torch.stack([torch.randperm(80, device=DEVICE)[:30] for _ in range(3)])
    for cols in (idx1, idx2, slice(10, 70)):
        a = sa.visual.last_query_importance(q, k, cols, key_padding_mask=kpm)
        _close(a, naive.last_query_importance(q, k, cols, True, None, kpm))
        assert torch.all(a[2] == 0) and not torch.isnan(a).any()


def test_damro_outliers():
    B, N, C = 2, 1 + 64, 128
    qm, km = randn(B, N, C, scale=2.0), randn(B, N, C)
    idx, scores = sa.visual.damro_outliers(qm, km, k=10)
    ref = naive.damro_scores(qm, km)
    _close(scores, ref)
    assert idx.shape == (B, 10) and idx.dtype == torch.int64
    _assert_topk(idx, ref, 10)
    s = ref.gather(1, idx.to(ref.device))
    assert torch.all(s[:, :-1] >= s[:, 1:] - 1e-6)                   # descending score, as topk
    # one merged head with scale 1/sqrt(C): not the per-head softmax of the same projections
    per_head = naive.cls_importance(qm.view(B, N, 8, 16).transpose(1, 2), km.view(B, N, 8, 16).transpose(1, 2))
    assert (per_head - ref).abs().max() > 1e-4


def test_select_tokens_orders_and_ties():
    s = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.5], [1.0, 0.0, 3.0, 2.0, -1.0]])
    assert sa.visual.select_tokens(s[1:], 3).tolist() == [[0, 2, 3]]
    assert sa.visual.select_tokens(s[1:], 3, order="score").tolist() == [[2, 3, 0]]
    tie = sa.visual.select_tokens(s[:1], 2)[0].tolist()              # 0.9 and one of the two 0.5s
    assert 3 in tie and (1 in tie or 4 in tie)
    x = torch.randn(2, 3, 40)                                        # any leading dims
    idx = sa.visual.select_tokens(x, 7)
    assert idx.shape == (2, 3, 7)
    _assert_topk(idx.view(6, 7), x.view(6, 40).double(), 7, margin=0)
    assert sa.visual.select_tokens(x, 0).shape == (2, 3, 0)


def test_keep_mask():
    idx = torch.tensor([[0, 3, -1], [1, 1, 2]], device=DEVICE)
    m = sa.visual.keep_mask(idx, 10, start=2, span=5)
    want = torch.ones(2, 10, dtype=torch.bool)
    want[:, 2:7] = False
    want[0, [2, 5]] = True
    want[1, [3, 4]] = True
    assert torch.equal(m.cpu(), want)
    assert sa.visual.keep_mask(torch.tensor([4, 40]), 10, start=5).int().tolist() == [[1] * 5 + [0] * 4 + [1]]


# ----------------------------------------------------------------------------- keep masks skip dropped tiles
@pytest.mark.parametrize("backend", ["kernel", "cpu_path"])
def test_pruned_keys_run_at_the_cost_of_the_kept(backend, monkeypatch):
    """FastV's in-place pruning: a keep mask of pruned image tokens as key_padding_mask. Image
    tokens 40..231 of 256; of the image key tiles, tile 2 (128..191) loses every token. After
    with_key_padding the dropped tile is listed for no query block, mixed tiles are partial, and
    the output equals the float64 oracle (forward and gradients)."""
    if backend == "cpu_path":
        monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    name = "cpu" if backend == "cpu_path" else "triton"
    device = "cpu" if backend == "cpu_path" else DEVICE
    L, s, n = 256, 40, 192
    q = randn(2, 4, L, 16, device=device, requires_grad=True)
    k, v = (randn(2, 2, L, 16, device=device, requires_grad=True) for _ in range(2))
    scores = sa.visual.last_query_importance(q.detach(), k, slice(s, s + n))
    scores[:, 128 - s:192 - s] = -1.0                                 # force tile 2 out
    keep = sa.visual.select_tokens(scores, 48)
    kpm = sa.visual.keep_mask(keep, L, start=s, span=n)
    assert not kpm[:, 128:192].any() and int(kpm.sum(-1)[0]) == L - n + 48
    base = sa.BlockLayout.from_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool, device=device), 64, (L, L),
                                          causal="top_left")
    lay = base.with_key_padding(kpm)
    partial, full = lay.tile_masks()
    listed = partial | full                                            # [B, 1, nQ, nK]
    assert not listed[..., 2].any()                                    # the dropped tile: never read
    assert listed[:, :, 3, :2].all() and listed[:, :, 3, 3].all()
    assert int(listed.sum()) == 2 * (10 - 2)                           # causal 10 tiles per batch, minus tile 2's two
    assert lay.density < base.density
    out = sa.sparse_attention(q, k, v, base, key_padding_mask=kpm)
    assert sa.last_backend() == name
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    res = {}
    for dt in (torch.float64, torch.float32):                          # the oracle and the same-dtype baseline
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = sa.reference.attention(*leaves, is_causal=True, key_padding_mask=kpm, dtype=dt)
        res[dt] = (o, *torch.autograd.grad((o * dout.to(dt)).sum(), leaves))
    for nm, g, r, b in zip(("out", "dq", "dk", "dv"), (out, *grads), res[torch.float64], res[torch.float32]):
        assert_oracle(nm, g, r, b)
    assert torch.all(grads[1][:, :, 128:192] == 0) and torch.all(grads[2][:, :, 128:192] == 0)


# ----------------------------------------------------------------------------- KV compaction
def _check_compaction(kc, vc, flags, lens, got, width):
    k2, v2, new_len, pos = got
    B = kc.shape[0]
    assert new_len.dtype == torch.int32 and pos.dtype == torch.int32 and pos.shape == (B, width)
    assert k2.shape == (B, kc.shape[1], width, kc.shape[3]) and v2.shape[-1] == vc.shape[-1]
    for b, (kb, vb, p) in enumerate(naive.compact_kv(kc, vc, flags, lens)):
        m = min(len(p), width)
        assert int(new_len[b]) == m and pos[b, :m].tolist() == p[:m] and torch.all(pos[b, m:] == -1)
        assert torch.equal(k2[b, :, :m], kb[:, :m]) and torch.equal(v2[b, :, :m], vb[:, :m])   # an exact gather
        assert torch.all(k2[b, :, m:] == 0) and torch.all(v2[b, :, m:] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compact_kv_bool(dtype):
    B, Hkv, Lmax = 3, 2, 97
    kc, vc = randn(B, Hkv, Lmax, 16, dtype=dtype), randn(B, Hkv, Lmax, 8, dtype=dtype)   # Dv != D
    keep = torch.rand(B, Lmax, device=DEVICE) < 0.4
    keep[2] = False                                                       # a sequence loses everything
    lens = torch.tensor([97, 60, 1], dtype=torch.int32, device=DEVICE)
    _check_compaction(kc, vc, keep, None, sa.visual.compact_kv(kc, vc, keep), Lmax)
    _check_compaction(kc, vc, keep, lens, sa.visual.compact_kv(kc, vc, keep, lens), Lmax)
    _check_compaction(kc, vc, keep, lens, sa.visual.compact_kv(kc, vc, keep, lens, max_len=20), 20)


def test_compact_kv_indices():
    B, Lmax = 2, 63
    kc, vc = randn(B, 1, Lmax, 16), randn(B, 1, Lmax, 16)
    idx = torch.tensor([[5, 1, 1, 62, -1], [0, 7, 3, 100, 2]], device=DEVICE)   # duplicates, padding, out of range
    flags = torch.zeros(B, Lmax, dtype=torch.bool)
    flags[0, [1, 5, 62]] = True
    flags[1, [0, 2, 3, 7]] = True
    _check_compaction(kc, vc, flags, None, sa.visual.compact_kv(kc, vc, idx), 5)
    lens = torch.tensor([10, 63], dtype=torch.int32, device=DEVICE)
    _check_compaction(kc, vc, flags, lens, sa.visual.compact_kv(kc, vc, idx.int(), lens), 5)


@pytest.mark.parametrize("Lq", [1, 3])
def test_decode_after_compaction(Lq):
    """Decode over the compacted cache (new lengths) == decode over the old cache with the dropped
    keys masked by key_padding_mask (the new tokens' own keys kept), and both == float64."""
    B, Hq, Hkv, Lmax, D = 3, 4, 2, 150, 32
    kc, vc = randn(B, Hkv, Lmax, D), randn(B, Hkv, Lmax, D)
    lens = torch.tensor([150, 97, 40], dtype=torch.int32, device=DEVICE)
    image = torch.zeros(B, Lmax, dtype=torch.bool, device=DEVICE)
    image[:, 10:10 + 64] = True
    t = torch.arange(Lmax, device=DEVICE)
    newest = (t >= lens[:, None] - Lq) & (t < lens[:, None])           # the new tokens' own keys stay
    drop = image & (torch.rand(B, Lmax, device=DEVICE) < 0.6) & ~newest
    keep = ~drop
    q = randn(B, Hq, Lq, D)
    k2, v2, new_len, pos = sa.visual.compact_kv(kc, vc, keep, lens)
    got = sa.decode_attention(q, k2, v2, cache_seqlens=new_len)
    want = sa.decode_attention(q, kc, vc, cache_seqlens=lens, key_padding_mask=keep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ref = sa.reference.decode_attention(q, kc, vc, cache_seqlens=lens, key_padding_mask=keep)
    base = sa.reference.decode_attention(q, kc, vc, cache_seqlens=lens, key_padding_mask=keep, dtype=torch.float32)
    assert_oracle("decode after compaction", got, ref, base)
    assert int(new_len[0]) == 150 - int(drop[0].sum())
    # the kept tokens' original positions continue RoPE: the newest token keeps position len - 1
    assert [int(pos[b, int(new_len[b]) - 1]) for b in range(B)] == [149, 96, 39]


def test_compact_kv_compiles():
    """No host read: runs under torch.compile(fullgraph=True)."""
    kc, vc = randn(2, 2, 64, 16), randn(2, 2, 64, 16)
    keep = torch.rand(2, 64, device=DEVICE) < 0.5
    lens = torch.tensor([64, 30], dtype=torch.int32, device=DEVICE)
    fn = torch.compile(sa.visual.compact_kv, fullgraph=True, backend="eager")
    for a, b in zip(fn(kc, vc, keep, lens), sa.visual.compact_kv(kc, vc, keep, lens)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- massive activations
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_massive_activation_sinks(dtype):
    B, L, C = 2, 50, 1024
    h = randn(B, L, C, dtype=torch.float32)
    dims = (700, 13)
    big = torch.rand(B, L, device=DEVICE) < 0.2
    h[..., 700] = torch.where(big, 300.0 + 600.0 * torch.rand(B, L, device=DEVICE), h[..., 700])
    h[0, 3, 13] = -900.0                                                    # negative: |.| counts
    h[1, 4, 5] = 5000.0                                                     # massive, but not in dims
    h = h.to(dtype)
    got = sa.visual.massive_activation_sinks(h, dims)
    ratio = naive.massive_activation_ratio(h, dims)
    ref = ratio > 20.0
    clear = (ratio - 20.0).abs() > 1e-3 * 20.0                              # decisions away from tau
    assert got.shape == (B, L) and got.dtype == torch.bool
    assert torch.equal(got[clear].cpu(), ref[clear].cpu())
    assert bool(got[0, 3]) and not bool(got[1, 4])
    one = naive.massive_activation_sinks(h[0], [700]).to(got.device)           # [L, C] input, one dim
    assert torch.equal(sa.visual.massive_activation_sinks(h[0], 700), one)
    low = sa.visual.massive_activation_sinks(h, torch.tensor(dims), tau=5.0).cpu()       # dims as a tensor
    clear = (ratio - 5.0).abs() > 1e-3 * 5.0
    assert torch.equal(low[clear.cpu()], (ratio > 5.0)[clear].cpu())


# ----------------------------------------------------------------------------- errors
def test_errors():
    q, k = randn(1, 4, 10, 16), randn(1, 2, 10, 16)
    with pytest.raises(TypeError, match="q"):
        sa.visual.cls_importance(q.cpu().numpy(), k)
    with pytest.raises(ValueError, match="k"):
        sa.visual.cls_importance(q, randn(1, 3, 10, 16))
    with pytest.raises(ValueError, match="k"):
        sa.visual.cls_importance(q, randn(1, 2, 10, 8))
    with pytest.raises(ValueError, match="cls_index"):
        sa.visual.cls_importance(q, k, cls_index=10)
    with pytest.raises(TypeError, match="patch_slice"):
        sa.visual.cls_importance(q, k, patch_slice=[1, 2])
    with pytest.raises(ValueError, match="scale"):
        sa.visual.cls_importance(q, k, scale=-1.0)
    with pytest.raises(TypeError, match="key_slice"):
        sa.visual.last_query_importance(q, k, (1, 5))
    with pytest.raises(TypeError, match="key_slice"):
        sa.visual.last_query_importance(q, k, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="key_padding_mask"):
        sa.visual.last_query_importance(q, k, slice(0, 5), key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="is_causal"):
        sa.visual.last_query_importance(q, k, slice(0, 5), is_causal=1)
    with pytest.raises(TypeError, match="q_merged"):
        sa.visual.damro_outliers(torch.ones(2, 5, 4, dtype=torch.int64), torch.ones(2, 5, 4))
    with pytest.raises(ValueError, match="k_merged"):
        sa.visual.damro_outliers(torch.ones(2, 5, 4), torch.ones(2, 6, 4))
    with pytest.raises(ValueError, match="k"):
        sa.visual.damro_outliers(torch.ones(2, 5, 4), torch.ones(2, 5, 4), k=5)
    with pytest.raises(ValueError, match="keep"):
        sa.visual.select_tokens(torch.rand(3, 5), 6)
    with pytest.raises(TypeError, match="keep"):
        sa.visual.select_tokens(torch.rand(3, 5), 2.0)
    with pytest.raises(ValueError, match="order"):
        sa.visual.select_tokens(torch.rand(3, 5), 2, order="rank")
    with pytest.raises(TypeError, match="scores"):
        sa.visual.select_tokens(torch.arange(5), 2)
    with pytest.raises(TypeError, match="indices"):
        sa.visual.keep_mask(torch.rand(2, 3), 10)
    with pytest.raises(ValueError, match="span"):
        sa.visual.keep_mask(torch.tensor([1]), 10, start=5, span=6)
    kc = randn(2, 2, 20, 16)
    with pytest.raises(ValueError, match="v_cache"):
        sa.visual.compact_kv(kc, randn(2, 2, 19, 16), torch.ones(2, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep"):
        sa.visual.compact_kv(kc, kc, torch.ones(2, 21, dtype=torch.bool))
    with pytest.raises(TypeError, match="keep"):
        sa.visual.compact_kv(kc, kc, torch.ones(2, 20))
    with pytest.raises(ValueError, match="keep"):
        sa.visual.compact_kv(kc, kc, torch.ones(2, 0, dtype=torch.int64))
    with pytest.raises(TypeError, match="cache_seqlens"):
        sa.visual.compact_kv(kc, kc, torch.ones(2, 20, dtype=torch.bool), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="max_len"):
        sa.visual.compact_kv(kc, kc, torch.ones(2, 20, dtype=torch.bool), max_len=21)
    h = randn(1, 5, 32)
    with pytest.raises(ValueError, match="dims"):
        sa.visual.massive_activation_sinks(h, [32])
    with pytest.raises(TypeError, match="dims"):
        sa.visual.massive_activation_sinks(h, [1.5])
    with pytest.raises(TypeError, match="hidden"):
        sa.visual.massive_activation_sinks(h.long(), [1])
    with pytest.raises(ValueError, match="hidden"):
        sa.visual.massive_activation_sinks(h[0, 0], [1])
