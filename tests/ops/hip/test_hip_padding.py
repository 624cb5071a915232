"""HiP with a key padding mask (``key_padding_mask`` bool [B, Lk], True = the key exists) on the
kernels (interpreter on CPU) and the CPU path: the mask against the float64 oracle (identical
selections away from near-ties), the attention forward, LSE and gradients against the masked
softmax over the oracle's attended set, padded keys never attended and without gradient, rows that
see nothing giving 0 (never NaN); a left-padded sequence behaving exactly as the same sequence
unpadded (positions counted from its first real key), in prefill and decode; torch.compile; bad
input."""
import pytest
import torch

import sparseattn as sa
from sparseattn.ops.hip import naive
from sparseattn.ops.hip.config import PAD_INDEX, query_positions
from utils import assert_oracle

SMALL = sa.HiP(mask_k=16, block_size_q=16, block_stride_q=2, block_size_k=2, block_stride_k=1, window=16, sinks=4)


def _inputs(B, H, Hkv, Lq, Lk, D, seed, device):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(B, H, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g), \
        torch.randn(B, Hkv, Lk, D, generator=g)
    return (t.to(device) for t in (q, k, v))


def _pad(B, Lk, left=(), right=(), holes=(), empty=(), device="cpu"):
    kpm = torch.ones(B, Lk, dtype=torch.bool)
    for b, n in left:
        kpm[b, :n] = False
    for b, n in right:
        kpm[b, Lk - n:] = False
    for b, lo, hi in holes:
        kpm[b, lo:hi] = False
    for b in empty:
        kpm[b] = False
    return kpm.to(device)


@pytest.mark.parametrize("case", [
    dict(B=2, Lq=80, Lk=80, left=[(0, 13)], right=[(1, 7)], holes=[(1, 30, 33)], empty=[]),
    dict(B=3, Lq=37, Lk=120, left=[(0, 21), (1, 3)], right=[(1, 9)], holes=[], empty=[2]),
])
def test_padding_matches_oracle(backend, case):
    device, name = backend
    B, Lq, Lk = case["B"], case["Lq"], case["Lk"]
    q, k, v = _inputs(B, 2, 1, Lq, Lk, 16, seed=Lq + Lk, device=device)
    kpm = _pad(B, Lk, case["left"], case["right"], case["holes"], case["empty"], device)
    k = torch.where(kpm[:, None, :, None], k, 10 * k)        # padded keys that would win if they were scored
    mask = sa.hip_mask(q, k, SMALL, key_padding_mask=kpm)
    assert sa.last_backend() == name
    ref = naive.hip_mask_scores(q.cpu(), k.cpu(), SMALL, key_padding_mask=kpm.cpu())
    clear = ref.margin > 1e-4
    assert clear.float().mean() > 0.5
    same = (mask.indices.cpu() == ref.mask.indices).all(-1) & (mask.counts.cpu() == ref.mask.counts)
    assert not (clear & ~same).any(), "selection differs from the oracle in clear blocks"
    assert torch.equal(mask.counts.cpu(), ref.mask.counts)
    assert int(ref.mask.counts.max()) == SMALL.k_blocks, "no block searched: the test says nothing"

    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = sa.hip_attention(q, k, v, SMALL, mask, return_lse=True, key_padding_mask=kpm)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad((out * dout).sum(), (q, k, v))
    keep = naive.attended(mask, SMALL, Lq, Lk, key_padding_mask=kpm)
    assert not (keep & ~kpm[:, None, None, :]).any()                       # padding never attended
    results = {}
    for dt in (torch.float64, torch.float32):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, l = sa.reference.attention(*leaves, mask=keep, return_lse=True, dtype=dt)
        results[dt] = (o, l, *torch.autograd.grad((o.double() * dout.double()).sum(), leaves))
    r, b = results[torch.float64], results[torch.float32]
    assert torch.allclose(r[0], naive.hip_attention(q, k, v, SMALL, mask, key_padding_mask=kpm), atol=1e-12)
    assert_oracle("out", out, r[0], b[0])
    fin = torch.isfinite(r[1])
    assert torch.equal(torch.isfinite(lse), fin)
    assert_oracle("lse", torch.where(fin, lse, 0.0), torch.where(fin, r[1], 0.0).float(),
                  torch.where(fin, b[1].float(), 0.0))
    for n, g_, rr, bb in zip(("dq", "dk", "dv"), (dq, dk, dv), r[2:], b[2:]):
        assert_oracle(n, g_, rr, bb)
        assert not torch.isnan(g_).any()
    assert not out.isnan().any() and (out[~fin] == 0).all() and (~fin).any()   # rows that see nothing: 0
    padded = ~kpm[:, None, :, None]
    assert (dk.masked_select(padded) == 0).all() and (dv.masked_select(padded) == 0).all()


def test_left_padding_is_the_unpadded_sequence(backend):
    """A sequence of n tokens behind o padding keys gets the mask of the same sequence unpadded
    (offsets shifted by o) and the same outputs and gradients at its real rows (o a multiple of
    block_size_q: the query blocks group the same rows); the padding rows give 0."""
    device, _ = backend
    n, o = 70, 16
    q, k, v = _inputs(1, 2, 1, n, n, 16, seed=11, device=device)
    zeros = lambda t: torch.cat((torch.randn(1, t.shape[1], o, 16).to(device), t), 2)   # noqa: E731
    qp, kp, vp = zeros(q), zeros(k), zeros(v)
    kpm = _pad(1, n + o, left=[(0, o)], device=device)
    m = sa.hip_mask(q, k, SMALL)
    mp = sa.hip_mask(qp, kp, SMALL, key_padding_mask=kpm)
    assert int(m.counts.max()) == SMALL.k_blocks
    assert torch.equal(mp.counts[:, :, o // 16:], m.counts) and int(mp.counts[:, :, :o // 16].max()) == 0
    assert torch.equal(mp.indices[:, :, o // 16:], torch.where(m.indices == PAD_INDEX, PAD_INDEX, m.indices + o))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves_p = [t.clone().requires_grad_() for t in (qp, kp, vp)]
    out = sa.hip_attention(*leaves, SMALL, m)
    outp = sa.hip_attention(*leaves_p, SMALL, mp, key_padding_mask=kpm)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), leaves)
    grads_p = torch.autograd.grad((outp * torch.cat((torch.randn_like(outp[:, :, :o]), dout), 2)).sum(), leaves_p)
    assert (outp[:, :, :o] == 0).all()
    torch.testing.assert_close(outp[:, :, o:], out, atol=1e-6, rtol=1e-5)
    for g, gp in zip(grads, grads_p):
        torch.testing.assert_close(gp[:, :, o:], g, atol=1e-5, rtol=1e-5)
    assert (grads_p[1][:, :, :o] == 0).all() and (grads_p[2][:, :, :o] == 0).all()


def test_decode_left_padded_is_the_unpadded_sequence(backend):
    """hip_decode on a left-padded ragged cache (any padding: one query block per step) equals the
    unpadded sequence's decode step by step (outputs, refreshed masks shifted by the padding), and
    the oracle with the step's mask."""
    device, name = backend
    hip = sa.HiP(mask_k=8, block_size_q=16, block_stride_q=1, block_size_k=2, window=8, sinks=2, refresh_interval=2)
    g = torch.Generator().manual_seed(12)
    n, o, Lmax = 60, 5, 80
    kc, vc = torch.randn(1, 1, n + 4, 16, generator=g).to(device), torch.randn(1, 1, n + 4, 16, generator=g).to(device)
    junk = torch.full((1, 1, o, 16), 1e4, device=device)              # padding: never read into a result
    tail = torch.zeros(1, 1, Lmax - n - 4 - o, 16, device=device)
    kcp, vcp = torch.cat((junk, kc, tail), 2), torch.cat((junk, vc, tail), 2)
    kpm = _pad(1, Lmax, left=[(0, o)], device=device)
    lens, st, stp = n, None, None
    for step in range(3):
        q = torch.randn(1, 2, 1, 16, generator=g).to(device)
        out, st = sa.hip_decode(q, kc, vc, hip, torch.tensor([lens], dtype=torch.int32, device=device), state=st)
        outp, stp = sa.hip_decode(q, kcp, vcp, hip, torch.tensor([lens + o], dtype=torch.int32, device=device),
                                  state=stp, key_padding_mask=kpm)
        assert sa.last_backend() == name and stp.refreshed == (step % 2 == 0)
        assert torch.equal(stp.counts, st.counts)
        assert torch.equal(stp.indices, torch.where(st.indices == PAD_INDEX, PAD_INDEX, st.indices + o))
        torch.testing.assert_close(outp, out, atol=1e-6, rtol=1e-5)
        mask = sa.HiPMask(stp.indices.cpu(), stp.counts.cpu(), hip, (1, Lmax))
        qpos = query_positions(1, 1, Lmax, torch.tensor([lens + o]), "cpu")
        ref = naive.hip_attention(q.cpu(), kcp.cpu(), vcp.cpu(), hip, mask, q_pos=qpos, key_padding_mask=kpm.cpu())
        keep = naive.attended(mask, hip, 1, Lmax, qpos, kpm.cpu())
        base = sa.reference.attention(q.cpu(), kcp.cpu(), vcp.cpu(), mask=keep, dtype=torch.float32)
        assert_oracle("decode out", outp, ref, base)
        lens += 1


def test_padding_compile_fullgraph():
    """The padding path has no host read: torch.compile(fullgraph=True), forward and backward."""
    torch._dynamo.reset()
    q, k, v = _inputs(2, 2, 1, 20, 90, 16, seed=13, device="cpu")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kpm = _pad(2, 90, left=[(0, 7)], right=[(1, 4)])

    def f(q, k, v, kpm):
        return sa.hip_attention(q, k, v, SMALL, key_padding_mask=kpm)

    def grads(fn):
        out = fn(q, k, v, kpm)
        return (out, *torch.autograd.grad(out.pow(2).sum(), (q, k, v)))

    for a, b in zip(grads(f), grads(torch.compile(f, fullgraph=True, backend="aot_eager"))):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_padding_bad_input():
    q, k, v = _inputs(2, 1, 1, 16, 64, 16, seed=14, device="cpu")
    with pytest.raises(TypeError, match="key_padding_mask: expected dtype torch.bool"):
        sa.hip_attention(q, k, v, SMALL, key_padding_mask=torch.ones(2, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \[2, 64\]"):
        sa.hip_mask(q, k, SMALL, key_padding_mask=torch.ones(2, 63, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        sa.hip_decode(q[:, :, :1], k, v, SMALL, key_padding_mask=[[True] * 64] * 2)
