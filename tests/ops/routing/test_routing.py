"""Routing attention (issue 14): output and gradients against the float64 oracle given the same
memberships (shared and separate q/k lists, causal or not, awkward lengths, window > L), the
routing itself against float64 dot products, planted keys found, tokens in no cluster, the
reference code's count_eps and scale, determinism, torch.compile(fullgraph=True), the EMA
k-means step, bad input."""
import pytest
import torch
import torch.nn.functional as F

import sparseattn as sa

from utils import assert_oracle, randn


def _centroids(H, C, D):
    return F.layer_norm(randn(H, C, D), (D,))


def _check(q, k, v, mu, window, **kw):
    share = kw.get("share_qk", False)
    out, (qc, kc) = sa.routing_attention(q, None if share else k, v, mu, window, return_clusters=True, **kw)
    assert sa.last_backend() == "triton" and out.dtype == q.dtype and out.shape == q.shape
    leaves = (q, v) if share else (q, k, v)
    dout = randn(*out.shape)
    got = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    res = {}
    for dt in (torch.float64, q.dtype):
        ls = [t.detach().to(dt).requires_grad_() for t in leaves]
        lq, lv = ls[0], ls[-1]
        lk = None if share else ls[1]
        o = sa.reference.routing_attention(lq, lk, lv, qc, kc, dtype=dt, **kw)
        res[dt] = (o, *torch.autograd.grad(o, ls, dout.to(dt)))
    ref, base = res[torch.float64], res[q.dtype]
    assert_oracle("out", out, ref[0], base[0])
    for name, g, r, b in zip(("dq", "dv") if share else ("dq", "dk", "dv"), got, ref[1:], base[1:]):
        assert_oracle(name, g, r, b)
    return out, qc, kc


@pytest.mark.parametrize("share_qk", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,H,L,D,C,window,dtype", [
    (1, 2, 200, 32, 3, 70, torch.float32),
    (2, 1, 97, 32, 2, 40, torch.float16),
    (1, 1, 63, 16, 2, 100, torch.float32),   # window > L: every cluster holds all tokens
])
def test_matches_oracle_with_gradients(share_qk, causal, B, H, L, D, C, window, dtype):
    q, k, v = (randn(B, H, L, D, dtype=dtype, requires_grad=True) for _ in range(3))
    out, qc, kc = _check(q, k, v, _centroids(H, C, D), window, share_qk=share_qk, causal=causal)
    w = min(window, L)
    assert qc.shape == (B, H, C, w) and qc.dtype == torch.int64
    assert (qc.diff(dim=-1) > 0).all() and (kc.diff(dim=-1) > 0).all()  # distinct, ascending
    if share_qk:
        assert kc is qc


def test_routing_is_the_top_window_by_dot_product():
    B, H, L, D, C, w = 2, 2, 300, 32, 4, 50
    q, k = randn(B, H, L, D), randn(B, H, L, D)
    mu = _centroids(H, C, D)
    _, (qc, kc) = sa.routing_attention(q, k, randn(B, H, L, D), mu, w, return_clusters=True)
    for x, got in ((q, qc), (k, kc)):
        d = torch.einsum("bhld,hcd->bhcl", F.layer_norm(x.double(), (D,), eps=1e-6), mu.double())
        srt = d.sort(-1, descending=True)
        clear = (srt.values[..., w - 1] - srt.values[..., w]) > 1e-5
        want = srt.indices[..., :w].sort(-1).values
        assert clear.float().mean() > 0.9 and torch.equal(got[clear], want[clear])


def test_planted_keys_are_routed_to_their_cluster():
    B, H, L, D, C = 1, 2, 256, 32, 4
    mu = _centroids(H, C, D)
    k = randn(B, H, L, D)
    planted = {0: [5, 77, 200], 3: [1, 130, 255]}
    for c, pos in planted.items():
        k[:, :, pos] = 4 * mu[:, c, None] + 0.1 * randn(B, H, len(pos), D)
    _, (_, kc) = sa.routing_attention(randn(B, H, L, D), k, randn(B, H, L, D), mu, 16, return_clusters=True)
    for c, pos in planted.items():
        for h in range(H):
            assert set(pos) <= set(kc[0, h, c].tolist()), (c, h)


def test_tokens_in_no_cluster_get_zero():
    q, k, v = (randn(1, 1, 150, 16, requires_grad=True) for _ in range(3))
    out, qc, _ = _check(q, k, v, _centroids(1, 1, 16), 20)
    outside = torch.ones(150, dtype=torch.bool)
    outside[qc[0, 0, 0]] = False
    assert (out[0, 0, outside] == 0).all()


def test_reference_code_options():
    """count_eps=0.01 (the reference's count + 1e-2) and scale=1.0 (its logits after layer norm)."""
    q, k, v = (randn(1, 2, 128, 32, requires_grad=True) for _ in range(3))
    _check(q, k, v, _centroids(2, 3, 32), 48, share_qk=True, count_eps=0.01, scale=1.0)


def test_deterministic():
    q, k, v = (randn(1, 2, 200, 32) for _ in range(3))
    mu = _centroids(2, 6, 32)  # tokens in several clusters
    a = sa.routing_attention(q, k, v, mu, 100)
    assert torch.equal(a, sa.routing_attention(q, k, v, mu, 100))


@pytest.mark.parametrize("share_qk", [False, True])
def test_torch_compile_fullgraph(share_qk):
    torch._dynamo.reset()
    q, k, v = (randn(1, 2, 96, 16, requires_grad=True) for _ in range(3))
    mu = _centroids(2, 2, 16)

    def fn(q, k, v):
        return sa.routing_attention(q, None if share_qk else k, v, mu, 40, share_qk=share_qk)

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    eager = fn(q, k, v)
    assert torch.allclose(out, eager, atol=1e-6, rtol=1e-5)
    dout = randn(*out.shape)
    for a, b in zip(torch.autograd.grad(out, (q, v), dout), torch.autograd.grad(eager, (q, v), dout)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def _kmeans_loop(mu, x, decay):
    """Float64 EMA k-means step written with loops."""
    xn = F.layer_norm(x.double(), (x.shape[-1],), eps=1e-6)
    mu = mu.double()
    new = mu.clone()
    H, C, _ = mu.shape
    for h in range(H):
        items = xn[:, h].reshape(-1, xn.shape[-1])
        a = (items @ mu[h].T).argmax(-1)
        for c in range(C):
            if (a == c).any():
                new[h, c] = decay * mu[h, c] + (1 - decay) * items[a == c].mean(0)
    return new


def test_kmeans_update():
    H, C, D = 2, 5, 16
    mu = _centroids(H, C, D)
    mu[1, 4] = -10 * mu[1, 3]  # far from everything: (likely) no items, unchanged
    x = randn(2, H, 100, D)
    new = sa.routing_kmeans_update(mu, x, decay=0.9)
    assert new.dtype == mu.dtype and new.shape == mu.shape and not new.requires_grad
    assert torch.allclose(new.double(), _kmeans_loop(mu, x, 0.9), atol=1e-5)
    assert not torch.equal(new, mu)


@pytest.mark.parametrize("change,exc,words", [
    (dict(window=0), ValueError, "window"),
    (dict(centroids=torch.randn(2, 16)), ValueError, "centroids"),
    (dict(centroids=torch.randn(3, 2, 16)), ValueError, "centroids"),
    (dict(centroids=torch.randn(2, 2, 8)), ValueError, "centroids"),
    (dict(k=None), ValueError, "k"),
    (dict(share_qk=True), ValueError, "k"),
    (dict(k=torch.randn(1, 2, 32, 16), v=torch.randn(1, 2, 32, 16)), ValueError, "length"),
    (dict(count_eps=-1.0), ValueError, "count_eps"),
    (dict(k=torch.randn(1, 1, 64, 16), v=torch.randn(1, 1, 64, 16)), ValueError, "no GQA"),
])
def test_rejects_bad_input(change, exc, words):
    args = dict(q=torch.randn(1, 2, 64, 16), k=torch.randn(1, 2, 64, 16), v=torch.randn(1, 2, 64, 16),
                centroids=torch.randn(2, 2, 16), window=8)
    args.update(change)
    with pytest.raises(exc, match=words):
        sa.routing_attention(**args)


def test_kmeans_rejects_bad_input():
    mu, x = torch.randn(2, 3, 16), torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="decay"):
        sa.routing_kmeans_update(mu, x, decay=1.0)
    with pytest.raises(ValueError, match="centroids"):
        sa.routing_kmeans_update(torch.randn(3, 3, 16), x)
    with pytest.raises(ValueError, match="x"):
        sa.routing_kmeans_update(mu, torch.randn(2, 10, 16))
