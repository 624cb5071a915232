"""HiP attention on the kernels (interpreter on CPU) and the CPU path against the float64 oracles
of sparseattn/ops/hip/naive.py: the mask estimation (identical selections away from near-ties,
the oracle's own margin decides; integer inputs with exact ties and zero products), planted heavy
key blocks always found at lengths with several rounds, the token-sparse attention forward and
gradients with a given mask (GQA, Lq != Lk, awkward lengths, all-dense and just-above-dense
lengths, block sizes 1 / 2 / 4 with key strides), decode with its refresh schedule and ragged
cache lengths, and bad input."""
import math

import pytest
import torch

import sparseattn as sa
from sparseattn.ops.hip import naive
from sparseattn.ops.hip.config import query_positions
from utils import assert_oracle

SMALL = sa.HiP(mask_k=16, block_size_q=16, block_stride_q=2, block_size_k=2, block_stride_k=1, window=16, sinks=4)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _qkv(B, H, Hkv, Lq, Lk, D, dtype, device, seed, integer=False, Dv=None):
    g = _gen(seed)
    if integer:   # small integers: exact float32 products, exact ties, zero products
        mk = lambda *s: torch.randint(-2, 3, s, generator=g).float()   # noqa: E731
    else:
        mk = lambda *s: torch.randn(*s, generator=g)                   # noqa: E731
    q, k, v = mk(B, H, Lq, D), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, Dv or D)
    return (t.to(dtype=dtype, device=device) for t in (q, k, v))


def _same_selection(mask, ref_scores, tol):
    """Blocks whose oracle margin (gap between the K-th and K+1-th child in any round) exceeds
    ``tol`` must select exactly the oracle's blocks; the others only the oracle's count."""
    ref = ref_scores.mask
    clear = ref_scores.margin > tol
    assert clear.float().mean() > 0.5, "test inputs too tie-prone to say anything"
    same = (mask.indices.cpu() == ref.indices.cpu()).all(-1) & (mask.counts.cpu() == ref.counts.cpu())
    bad = clear.cpu() & ~same
    assert not bad.any(), f"selection differs from the oracle in {int(bad.sum())} clear blocks: " \
        f"{mask.indices.cpu()[bad][:2].tolist()} vs {ref.indices.cpu()[bad][:2].tolist()}"
    assert torch.equal(mask.counts.cpu(), ref.counts.cpu())


@pytest.mark.parametrize("case", [
    dict(B=1, H=2, Hkv=1, Lq=37, Lk=300, hip=SMALL),
    dict(B=2, H=1, Hkv=1, Lq=16, Lk=150, hip=sa.HiP(mask_k=8, block_size_q=16, block_stride_q=4, block_size_k=1,
                                                       window=8, sinks=0)),
    dict(B=1, H=1, Hkv=1, Lq=20, Lk=260, hip=sa.HiP(mask_k=24, block_size_q=16, block_stride_q=1, block_size_k=4,
                                                       block_stride_k=2, window=12, sinks=3)),
])
def test_mask_matches_oracle(backend, case):
    device, name = backend
    hip = case["hip"]
    q, k, _ = _qkv(case["B"], case["H"], case["Hkv"], case["Lq"], case["Lk"], 16, torch.float32, device, seed=1)
    mask = sa.hip_mask(q, k, hip)
    assert sa.last_backend() == name
    assert mask.indices.shape == (case["B"], case["H"], math.ceil(case["Lq"] / hip.block_size_q), hip.k_blocks)
    _same_selection(mask, naive.hip_mask_scores(q.cpu(), k.cpu(), hip), 1e-4)


def test_mask_integer_inputs_exact(backend):
    """Integer inputs: every product exact in float32, so ties (-32000 and real) and the zero-product
    hack resolve as in the oracle: identical selections everywhere."""
    device, _ = backend
    q, k, _ = _qkv(1, 2, 2, 33, 240, 16, torch.float32, device, seed=2, integer=True)
    mask = sa.hip_mask(q, k, SMALL)
    ref = naive.hip_mask(q.cpu(), k.cpu(), SMALL)
    assert torch.equal(mask.indices.cpu(), ref.indices) and torch.equal(mask.counts.cpu(), ref.counts)


def test_planted_blocks_found(backend):
    """Key blocks made to score far above the rest, with the locality HiP's representatives rely on
    (the rest falls off with the distance to the nearest planted block), outside and inside the
    window, in a search of 3+ rounds: every planted key is attended (recall of the planted blocks
    1.0), the ones outside the window by selection."""
    device, _ = backend
    hip = SMALL
    Lq, Lk, D = 16, 400, 16
    g = _gen(3)
    q = torch.randn(1, 2, Lq, D, generator=g) * 0.01
    q[..., 0] = 1.0
    k = torch.randn(1, 1, Lk, D, generator=g) * 0.01
    planted = [40, 150, 300, 392]                 # 392: inside every row's window
    tok = torch.tensor([p + j for p in planted for j in range(2)])
    dist = (torch.arange(Lk)[:, None] - tok[None]).abs().min(1).values
    k[0, 0, :, 0] = torch.where(dist == 0, 30.0, 4.0 - 0.05 * dist)
    assert sa.ops.hip.config.num_rounds(hip, Lk - 1) >= 3
    mask = sa.hip_mask(q.to(device), k.to(device), hip)
    for h in range(2):
        sel = set(mask.indices[0, h, 0, :mask.counts[0, h, 0]].tolist())
        assert set(planted[:-1]) <= sel, f"planted {planted[:-1]} not all in {sorted(sel)}"
    keep = naive.attended(sa.HiPMask(mask.indices.cpu(), mask.counts.cpu(), hip, (Lq, Lk)), hip, Lq, Lk)
    assert keep[..., -1, tok].all()                          # the last row (position 399) sees them all
    assert int(mask.counts.min()) == hip.k_blocks


def _check_attention(q, k, v, hip, mask, name):
    out, lse = sa.hip_attention(q, k, v, hip, mask, return_lse=True)
    assert sa.last_backend() == name and out.dtype == q.dtype
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), (q, k, v))
    keep = naive.attended(mask, hip, q.shape[2], k.shape[2])
    results = {}
    for dt in (torch.float64, q.dtype):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, l = sa.reference.attention(*leaves, mask=keep, return_lse=True, dtype=dt)
        results[dt] = (o, l, *torch.autograd.grad((o.double() * dout.double()).sum(), leaves))
    ref, base = results[torch.float64], results[q.dtype]
    assert torch.allclose(ref[0], sa.reference.hip_attention(q, k, v, hip, mask), atol=1e-12)
    assert_oracle("out", out, ref[0], base[0])
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(lse).cpu(), fin.cpu())
    assert_oracle("lse", torch.where(fin, lse, 0.0), torch.where(fin, ref[1], 0.0).float(),
                  torch.where(fin, base[1].float(), 0.0))
    for n, g, r, b in zip(("dq", "dk", "dv"), grads, ref[2:], base[2:]):
        assert_oracle(n, g, r, b)


@pytest.mark.parametrize("Lq,Lk,hip,Hkv", [
    (37, 300, SMALL, 1),                                      # GQA, Lq != Lk, partial last block
    (45, 45, SMALL, 2),                                       # Lk <= mask_k + window + sinks: all dense
    (16, 16 + 16 + 4 + 3, SMALL, 2),                          # just above mask_k + window + sinks
    (20, 130, sa.HiP(mask_k=8, block_size_q=16, block_stride_q=2, block_size_k=1, window=5, sinks=0), 1),
    (17, 200, sa.HiP(mask_k=32, block_size_q=16, block_stride_q=1, block_size_k=8, block_stride_k=4, window=20,
                     sinks=7), 1),
])
def test_attention_matches_oracle(backend, Lq, Lk, hip, Hkv):
    device, name = backend
    q, k, v = _qkv(2, 2, Hkv, Lq, Lk, 16, torch.float32, device, seed=Lq + Lk)
    mask = sa.hip_mask(q, k, hip)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    _check_attention(q, k, v, hip, mask, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half_strided(backend, dtype):
    """16-bit inputs, non-contiguous q / k / v (HF's [B, L, H, D] transposed), Dv != D."""
    device, name = backend
    q, k, v = _qkv(1, 2, 1, 24, 180, 16, torch.float32, device, seed=5, Dv=32)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).to(dtype) for t in (q, k, v))
    mask = sa.hip_mask(q, k, SMALL)
    _check_attention(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), SMALL, mask, name)


def test_estimates_mask_when_none(backend):
    device, _ = backend
    q, k, v = _qkv(1, 1, 1, 20, 150, 16, torch.float32, device, seed=6)
    out = sa.hip_attention(q, k, v, SMALL)
    mask = sa.hip_mask(q, k, SMALL)
    assert torch.equal(out, sa.hip_attention(q, k, v, SMALL, mask))


def test_decode_refresh_schedule_and_ragged(backend):
    """Refresh on the first step and every refresh_interval steps, from the last
    refresh_interval - 1 decode rows plus the current one; between refreshes the cached blocks
    with a moving window; ragged cache lengths; outputs against the oracle with the same masks."""
    device, name = backend
    hip = sa.HiP(mask_k=8, block_size_q=16, block_stride_q=1, block_size_k=2, window=8, sinks=2, refresh_interval=3)
    B, H, Hkv, D, Lmax = 2, 2, 1, 16, 120
    g = _gen(7)
    kc, vc = torch.randn(B, Hkv, Lmax, D, generator=g).to(device), torch.randn(B, Hkv, Lmax, D, generator=g).to(device)
    lens = torch.tensor([70, 100], dtype=torch.int32, device=device)
    state, seen = None, []
    for step in range(5):
        q = torch.randn(B, H, 1, D, generator=g).to(device)
        out, new = sa.hip_decode(q, kc, vc, hip, lens, state=state)
        assert sa.last_backend() == name
        assert new.refreshed == (step % 3 == 0) and new.step == step + 1
        if not new.refreshed:
            assert torch.equal(new.indices, state.indices)
        else:   # the refresh block: the last refresh_interval - 1 rows plus the current one
            rows = torch.cat(seen[-2:] + [q], 2) if seen else q
            n = rows.shape[2]
            est = sa.HiP(**{**hip.__dict__, "block_size_q": 16})
            ref_mask = naive.hip_mask(rows.cpu(), kc.cpu(), est, q_pos=query_positions(B, n, Lmax, lens.cpu(), "cpu"))
            assert torch.equal(new.indices.cpu(), ref_mask.indices) and torch.equal(new.counts.cpu(), ref_mask.counts)
        assert new.recent_q.shape[2] == min(step + 1, 2)
        mask = sa.HiPMask(new.indices, new.counts, hip, (1, Lmax))
        qpos = query_positions(B, 1, Lmax, lens.cpu(), "cpu")
        ref = naive.hip_attention(q.cpu(), kc.cpu(), vc.cpu(), hip, mask.__class__(mask.indices.cpu(),
                                  mask.counts.cpu(), hip, (1, Lmax)), q_pos=qpos)
        base = sa.reference.attention(q.cpu(), kc.cpu(), vc.cpu(),
                                      mask=naive.attended(sa.HiPMask(mask.indices.cpu(), mask.counts.cpu(), hip,
                                                                     (1, Lmax)), hip, 1, Lmax, qpos),
                                      dtype=torch.float32)
        assert_oracle("decode out", out, ref, base)
        seen.append(q)
        state = new
        lens = lens + 1


def test_bad_input():
    with pytest.raises(ValueError, match="mask_k"):
        sa.HiP(mask_k=15, block_size_k=2)
    with pytest.raises(ValueError, match="block_size_k"):
        sa.HiP(block_size_k=3)
    with pytest.raises(ValueError, match="block_size_q"):
        sa.HiP(block_size_q=48)
    with pytest.raises(ValueError, match="block_stride_q"):
        sa.HiP(block_size_q=16, block_stride_q=3)
    with pytest.raises(ValueError, match="window"):
        sa.HiP(window=-1)
    with pytest.raises(ValueError, match="sinks"):
        sa.HiP(sinks=-2)
    with pytest.raises(TypeError, match="mask_k"):
        sa.HiP(mask_k=16.0)
    q, k, v = _qkv(1, 1, 1, 16, 64, 16, torch.float32, "cpu", seed=8)
    mask = naive.hip_mask(q, k, SMALL)
    with pytest.raises(ValueError, match="mask: expected a mask for seq_lens"):
        sa.hip_attention(q, k[:, :, :60], v[:, :, :60], SMALL, mask)
    with pytest.raises(ValueError, match="mask: expected a mask estimated with"):
        sa.hip_attention(q, k, v, sa.HiP(mask_k=32, block_size_q=16, window=16, sinks=4), mask)
    with pytest.raises(TypeError, match="hip"):
        sa.hip_attention(q, k, v, "hip")
    with pytest.raises(ValueError, match="q: expected 1 to 16"):
        sa.hip_decode(torch.randn(1, 1, 17, 16), k, v, SMALL)
    with pytest.raises(TypeError, match="cache_seqlens"):
        sa.hip_decode(q[:, :, :1], k, v, SMALL, cache_seqlens=torch.tensor([3]))


def test_decode_several_rows_full_cache(backend):
    """Lq = 3 rows per step against a full cache (cache_seqlens None): each step's rows are the last
    3 positions; the refresh block is the last refresh_interval - 1 rows plus the current ones."""
    device, _ = backend
    hip = sa.HiP(mask_k=8, block_size_q=16, block_stride_q=2, block_size_k=2, window=8, sinks=2, refresh_interval=2)
    g = _gen(9)
    kc, vc = torch.randn(1, 1, 150, 16, generator=g).to(device), torch.randn(1, 1, 150, 16, generator=g).to(device)
    q0, q1 = (torch.randn(1, 2, 3, 16, generator=g).to(device) for _ in range(2))
    _, st = sa.hip_decode(q0, kc, vc, hip)
    assert st.refreshed and st.recent_q.shape[2] == 1 and torch.equal(st.recent_q, q0[:, :, -1:])
    out, st = sa.hip_decode(q1, kc, vc, hip, state=st)
    assert not st.refreshed
    _, st2 = sa.hip_decode(q1, kc, vc, hip, state=st)
    assert st2.refreshed                                   # step 2 of interval 2
    rows = torch.cat((q1[:, :, -1:], q1), 2)               # the kept row of the last step + the current rows
    ref_mask = naive.hip_mask(rows.cpu(), kc.cpu(), hip, q_pos=query_positions(1, 4, 150, None, "cpu"))
    assert torch.equal(st2.indices.cpu(), ref_mask.indices)
    mask = sa.HiPMask(st.indices.cpu(), st.counts.cpu(), hip, (3, 150))
    ref = naive.hip_attention(q1.cpu(), kc.cpu(), vc.cpu(), hip, mask)
    base = sa.reference.attention(q1.cpu(), kc.cpu(), vc.cpu(), mask=naive.attended(mask, hip, 3, 150),
                                  dtype=torch.float32)
    assert_oracle("decode Lq=3", out, ref, base)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True): the mask estimation and the attention are custom ops with fake
    implementations (no graph break, no host read), forward and backward."""
    torch._dynamo.reset()
    q, k, v = _qkv(1, 2, 1, 20, 140, 16, torch.float32, "cpu", seed=10)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return sa.hip_attention(q, k, v, SMALL)

    def grads(fn):
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out.pow(2).sum(), (q, k, v)))

    for a, b in zip(grads(f), grads(torch.compile(f, fullgraph=True, backend="aot_eager"))):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
