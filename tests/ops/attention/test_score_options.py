"""Score options of sparse attention (issue 11): key padding mask, per-key bias, softcap, ALiBi,
position-id causal layouts and a value head dim Dv != D. Each against the float64 oracle (error
<= 3x the same computation in the inputs' dtype + floor), forward and gradients, on the Triton
kernels and on the PyTorch CPU path; plus self-checks of the oracle and of the CPU path alone."""
import math

import pytest
import torch

import sparseattn as sa
from sparseattn.ops.attention import cpu
from utils import assert_oracle, randn, strided


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, device, Dv=None, non_contiguous=False):
    q = randn(B, Hq, Lq, D, dtype=dtype, device=device)
    k = randn(B, Hkv, Lk, D, dtype=dtype, device=device)
    v = randn(B, Hkv, Lk, D if Dv is None else Dv, dtype=dtype, device=device)
    if non_contiguous:
        q, k, v = (strided(t) for t in (q, k, v))
    return tuple(t.requires_grad_() for t in (q, k, v))


def _dense(Lq, Lk, device, causal=None, window=None, sinks=0, bs=64):
    bm = torch.ones(1, 1, math.ceil(Lq / bs), math.ceil(Lk / bs), dtype=torch.bool, device=device)
    return sa.BlockLayout.from_block_mask(bm, bs, (Lq, Lk), causal=causal, window=window, sinks=sinks)


def _random_layout(B, H, Lq, Lk, device, density=0.7, bs=64):
    bm = torch.rand(B, H, math.ceil(Lq / bs), math.ceil(Lk / bs), device=device) < density
    bm[..., 0] = True  # every query block sees some key block: the empty rows come from the options
    return sa.BlockLayout.from_block_mask(bm, bs, (Lq, Lk))


def _key_mask(B, Lk, device, p=0.7, empty_batch=None):
    kpm = torch.rand(B, Lk, device=device) < p
    kpm[:, 0] = True
    if empty_batch is not None:
        kpm[empty_batch] = False
    return kpm


def _compare(got_fn, ref_fn, leaves, use_lse=True):
    """Run ``got_fn(q, k, v)`` (out, or (out, lse) when ``use_lse``) and ``ref_fn(q, k, v, dtype)``
    in float64 and in the inputs' dtype; compare out, lse and the gradients of q, k, v under the
    oracle rule. Returns (out, lse, grads)."""
    res = got_fn(*leaves)
    out, lse = res if use_lse else (res, None)
    q = leaves[0]
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], leaves[2].shape[-1])
    assert not torch.isnan(out).any()
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if use_lse else None

    def loss(o, l):
        x = (o.double() * dout.double()).sum()
        if l is not None:
            x = x + (torch.where(torch.isinf(l), 0.0, l).double() * dlse.double()).sum()
        return x

    grads = torch.autograd.grad(loss(out, lse), leaves)
    results = {}
    for dt in (torch.float64, q.dtype):
        ref_leaves = [t.detach().to(dt).requires_grad_() for t in leaves]
        o, l = ref_fn(*ref_leaves, dt)
        results[dt] = (o, l, *torch.autograd.grad(loss(o, l if use_lse else None), ref_leaves))
    ref, base = results[torch.float64], results[q.dtype]
    assert_oracle("out", out, ref[0], base[0])
    if use_lse:
        assert lse.dtype == torch.float32
        fin = torch.isfinite(ref[1])
        assert torch.equal(torch.isfinite(lse).cpu(), fin.cpu()), "lse must be -inf exactly where a row sees nothing"
        assert not torch.isnan(lse).any()
        assert_oracle("lse", torch.where(fin, lse, 0.0), torch.where(fin, ref[1], 0.0).float(),
                      torch.where(fin, base[1].float(), 0.0))
    for name, g, r, b, t in zip(("dq", "dk", "dv"), grads, ref[2:], base[2:], leaves):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_oracle(name, g, r, b)
    return out, lse, grads


def _check(q, k, v, layout, expected_backend, scale=None, **options):
    """sa.sparse_attention with score options against sa.reference.sparse_attention (``layout``:
    a BlockLayout or a static pattern)."""
    dense = layout if isinstance(layout, sa.BlockLayout) else layout.layout(q.shape[2], k.shape[2], q.device)

    def got(q, k, v):
        res = sa.sparse_attention(q, k, v, layout, scale=scale, return_lse=True, **options)
        assert sa.last_backend() == expected_backend
        return res

    def ref(q, k, v, dt):
        return sa.reference.sparse_attention(q, k, v, dense, scale=scale, return_lse=True, dtype=dt, **options)

    return _compare(got, ref, (q, k, v))


# --------------------------------------------------------------------------- each option alone

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("Lq,Lk", [(1, 63), (97, 200), (200, 97)])
def test_key_padding_mask(backend, dtype, Lq, Lk):
    """Random key padding; batch element 1 has no key at all: zeros, LSE -inf, zero gradients."""
    device, name = backend
    q, k, v = _inputs(2, 4, 2, Lq, Lk, 32, dtype, device)
    kpm = _key_mask(2, Lk, device, empty_batch=1)
    out, lse, (dq, dk, dv) = _check(q, k, v, _random_layout(2, 4, Lq, Lk, device), name, key_padding_mask=kpm)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
    assert torch.all(dk[0][:, ~kpm[0]] == 0) and torch.all(dv[0][:, ~kpm[0]] == 0)


@pytest.mark.parametrize("shape", ["bh", "1h", "b1"])
def test_key_bias_with_inf(backend, shape):
    """A per-key bias [B|1, H|1, Lk] with -inf entries; one plane where every key is -inf."""
    device, name = backend
    B, H, Lq, Lk = 2, 4, 97, 130
    q, k, v = _inputs(B, H, 2, Lq, Lk, 32, torch.float32, device)
    kb = randn(B if shape[0] == "b" else 1, H if shape[1] == "h" else 1, Lk, device=device)
    kb[torch.rand(kb.shape, device=device) < 0.2] = float("-inf")
    kb[0, 0] = float("-inf")
    out, lse, (dq, _, _) = _check(q, k, v, _random_layout(B, H, Lq, Lk, device), name, key_bias=kb)
    plane = (0, slice(None)) if shape == "b1" else (slice(None) if shape == "1h" else 0, 0)
    assert torch.all(out[plane] == 0) and torch.all(lse[plane] == float("-inf")) and torch.all(dq[plane] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("softcap", [1.0, 20.0])
def test_softcap(backend, dtype, softcap):
    """Large scores (scale 1) so that the cap bites; exact gradients through tanh."""
    device, name = backend
    q, k, v = _inputs(2, 2, 2, 63, 200, 32, dtype, device)
    _check(q, k, v, _random_layout(2, 2, 63, 200, device), name, scale=1.0, softcap=softcap)


@pytest.mark.parametrize("causal,Lq,Lk,per_batch", [(None, 97, 200, True), ("top_left", 200, 97, False),
                                                     ("bottom_right", 97, 200, True)])
def test_alibi(backend, per_batch, causal, Lq, Lk):
    """ALiBi slopes [Hq] or [B, Hq] (fp32), index-based whatever the causal alignment."""
    device, name = backend
    q, k, v = _inputs(2, 4, 2, Lq, Lk, 16, torch.float16, device)
    slopes = torch.rand(*((2, 4) if per_batch else (4,)), device=device) * 0.5
    _check(q, k, v, _dense(Lq, Lk, device, causal=causal), name, alibi_slopes=slopes)


# --------------------------------------------------------------------------- position-id causal

@pytest.mark.parametrize("Lq,Lk", [(97, 200), (130, 63)])
def test_position_ids_with_padding(backend, Lq, Lk):
    """from_positions with random unsorted positions with repeats (one query that sees nothing),
    plus a key padding mask."""
    device, name = backend
    B = 2
    q_pos = torch.randint(0, 40, (B, Lq), dtype=torch.int32, device=device)
    k_pos = torch.randint(0, 40, (B, Lk), dtype=torch.int32, device=device)
    q_pos[0, 5] = -1  # sees no key
    layout = sa.BlockLayout.from_positions(q_pos, k_pos, 64)
    assert tuple(layout.seq_lens) == (Lq, Lk)
    assert torch.equal(layout.to_dense_mask().expand(B, 1, Lq, Lk).cpu(),
                       (k_pos[:, None, None, :] <= q_pos[:, None, :, None]).cpu())
    q, k, v = _inputs(B, 4, 2, Lq, Lk, 32, torch.float32, device)
    out, lse, _ = _check(q, k, v, layout, name, key_padding_mask=_key_mask(B, Lk, device))
    assert torch.all(out[0, :, 5] == 0) and torch.all(lse[0, :, 5] == float("-inf"))


# --------------------------------------------------------------------------- combinations

def test_padding_softcap_window(backend):
    device, name = backend
    Lq, Lk = 150, 200
    q, k, v = _inputs(2, 4, 2, Lq, Lk, 32, torch.float16, device)
    layout = _dense(Lq, Lk, device, causal="bottom_right", window=50, sinks=4)
    _check(q, k, v, layout, name, scale=0.5, key_padding_mask=_key_mask(2, Lk, device), softcap=5.0)


def test_sliding_window_pattern_with_options(backend):
    device, name = backend
    q, k, v = _inputs(1, 2, 1, 200, 200, 32, torch.float32, device)
    kb = randn(1, 2, 200, device=device)
    _check(q, k, v, sa.SlidingWindow(64, sinks=2), name, key_bias=kb, key_padding_mask=_key_mask(1, 200, device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softcap_alibi_causal(backend, dtype):
    device, name = backend
    q, k, v = _inputs(2, 4, 4, 97, 97, 32, dtype, device)
    slopes = 2.0 ** -torch.arange(1, 5, dtype=torch.float32, device=device)
    _check(q, k, v, _dense(97, 97, device, causal="top_left"), name, scale=0.5, softcap=8.0, alibi_slopes=slopes)


def test_everything_gqa_non_contiguous(backend):
    """All options at once, GQA (Hq=4, Hkv=2), strided inputs, a random layout."""
    device, name = backend
    B, Lq, Lk = 2, 97, 200
    q, k, v = _inputs(B, 4, 2, Lq, Lk, 32, torch.float32, device, non_contiguous=True)
    assert not q.is_contiguous()
    kb = randn(B, 1, Lk, device=device)
    kb[:, :, 7] = float("-inf")
    _check(q, k, v, _random_layout(B, 4, Lq, Lk, device), name, key_padding_mask=_key_mask(B, Lk, device),
           key_bias=kb, softcap=10.0, alibi_slopes=torch.rand(B, 4, device=device) * 0.2)


@pytest.mark.parametrize("D,Dv", [(32, 16), (16, 48)])
def test_value_head_dim(backend, D, Dv):
    """v with its own head dim: out [B, Hq, Lq, Dv], dv like v; with and without options."""
    device, name = backend
    q, k, v = _inputs(2, 4, 2, 97, 130, D, torch.float16, device, Dv=Dv)
    layout = _random_layout(2, 4, 97, 130, device)
    _check(q, k, v, layout, name)
    _check(q, k, v, layout, name, key_padding_mask=_key_mask(2, 130, device), softcap=5.0)


def test_deterministic_backward(backend):
    device, name = backend
    q, k, v = _inputs(2, 2, 1, 200, 200, 32, torch.float16, device)
    layout = _dense(200, 200, device, causal="top_left")
    opts = dict(key_padding_mask=_key_mask(2, 200, device), softcap=5.0,
                alibi_slopes=torch.rand(2, device=device) * 0.1, key_bias=randn(2, 2, 200, device=device))
    out = sa.sparse_attention(q, k, v, layout, **opts)
    assert sa.last_backend() == name
    dout = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    g2 = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- scaled_dot_product_attention routes

def _check_sdpa(q, k, v, expected_backend, attn_mask=None, is_causal=False, scale=None, **options):
    if expected_backend == "cpu" and not options:
        expected_backend = "torch"  # CPU tensors off the interpreter: torch's own SDPA, unless an option needs ours

    def got(q, k, v):
        out = sa.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              **options)
        assert sa.last_backend() == expected_backend
        return out

    def ref(q, k, v, dt):
        return sa.reference.attention(q, k, v, mask=attn_mask, is_causal=is_causal, scale=scale, dtype=dt,
                                      return_lse=True, **options)

    return _compare(got, ref, (q, k, v), use_lse=False)


def test_sdpa_bool_key_mask_is_key_padding(backend):
    """A bool attn_mask [B, 1, 1, Lk] runs as the in-kernel key padding rule (no dense mask, no
    fallback); batch element 1 sees no key."""
    device, name = backend
    q, k, v = _inputs(2, 2, 2, 97, 200, 32, torch.float16, device)
    kpm = _key_mask(2, 200, device, empty_batch=1)
    out, _, _ = _check_sdpa(q, k, v, name, attn_mask=kpm[:, None, None, :])
    if name == "triton":
        assert sa.last_fallback_reason() is None
    assert torch.all(out[1] == 0)
    ref = sa.reference.attention(q, k, v, key_padding_mask=kpm)  # the same oracle through the option
    assert torch.allclose(ref, sa.reference.attention(q, k, v, mask=kpm[:, None, None, :]))


@pytest.mark.parametrize("shape", [(2, 2, 1, 130), (1, 2, 1, 130), (2, 1, 1, 130)])
def test_sdpa_float_key_mask_is_key_bias(backend, shape):
    device, name = backend
    q, k, v = _inputs(2, 2, 2, 63, 130, 32, torch.float32, device)
    bias = randn(*shape, device=device)
    bias[..., 3] = float("-inf")
    _check_sdpa(q, k, v, name, attn_mask=bias)


def test_sdpa_softcap_alibi_causal(backend):
    device, name = backend
    q, k, v = _inputs(1, 4, 4, 200, 130, 32, torch.float16, device)
    _check_sdpa(q, k, v, name, is_causal=True, scale=0.5, softcap=6.0,
                alibi_slopes=torch.rand(4, device=device) * 0.2)


def test_sdpa_dense_bias_adds_after_softcap(backend):
    """A full float attn_mask is the element bias: it adds after the softcap (and ALiBi)."""
    device, name = backend
    q, k, v = _inputs(1, 2, 2, 97, 97, 16, torch.float32, device)
    bias = randn(1, 2, 97, 97, device=device)
    _check_sdpa(q, k, v, name, attn_mask=bias, scale=1.0, softcap=2.0,
                alibi_slopes=torch.rand(1, 2, device=device) * 0.2)


# --------------------------------------------------------------------------- errors

def test_errors(backend):
    device, _ = backend
    q, k, v = _inputs(2, 4, 2, 70, 90, 16, torch.float32, device)
    layout = _dense(70, 90, device)
    call = lambda **kw: sa.sparse_attention(q, k, v, layout, **kw)  # noqa: E731
    for c in (0.0, -1.0):
        with pytest.raises(ValueError, match="softcap"):
            call(softcap=c)
        with pytest.raises(ValueError, match="softcap"):
            sa.scaled_dot_product_attention(q, k, v, softcap=c, enable_gqa=True)
    for bad in (torch.rand(5, device=device), torch.rand(2, 4, 1, device=device), torch.rand(3, 4, device=device),
                torch.rand(4, device=device, dtype=torch.float64), torch.rand(4, device=device).half()):
        with pytest.raises((ValueError, TypeError), match="alibi_slopes"):
            call(alibi_slopes=bad)
    with pytest.raises(ValueError, match="key_bias"):
        call(key_bias=torch.zeros(2, 4, 90, device=device, requires_grad=True))
    for bad in (torch.ones(2, 90, device=device), torch.ones(2, 89, dtype=torch.bool, device=device),
                torch.ones(3, 90, dtype=torch.bool, device=device)):
        with pytest.raises((ValueError, TypeError), match="key_padding_mask"):
            call(key_padding_mask=bad)


# --------------------------------------------------------------------------- self-checks of the oracle

def _o(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def test_oracle_softcap_limits():
    q, k, v = _o(2, 2, 50, 16), _o(2, 2, 70, 16), _o(2, 2, 70, 24)
    ref = sa.reference.attention(q, k, v, scale=1.0)
    assert torch.allclose(sa.reference.attention(q, k, v, scale=1.0, softcap=1e6), ref, atol=1e-8)
    # a tiny cap flattens the scores: near-uniform weights
    flat = sa.reference.attention(q, k, v, scale=1.0, softcap=1e-6)
    assert torch.allclose(flat, v.mean(2, keepdim=True).expand_as(flat), atol=1e-5)
    # the cap equals an explicit c * tanh(s / c) as a float mask added to zero scores... via q scaled to 0
    c = 3.0
    s = (q @ k.transpose(-1, -2))
    explicit = sa.reference.attention(q * 0, k, v, mask=c * torch.tanh(s / c))
    assert torch.allclose(sa.reference.attention(q, k, v, scale=1.0, softcap=c), explicit, atol=1e-12)


def test_oracle_alibi_is_a_bias_matrix():
    Lq, Lk = 30, 50
    q, k, v = _o(2, 3, Lq, 16), _o(2, 3, Lk, 16), _o(2, 3, Lk, 16)
    slopes = torch.rand(2, 3)
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    bias = -slopes.double()[:, :, None, None] * (i + Lk - Lq - j).abs().double()
    for causal in (False, True):
        got = sa.reference.attention(q, k, v, is_causal=causal, alibi_slopes=slopes)
        assert torch.allclose(got, sa.reference.attention(q, k, v, mask=bias, is_causal=causal), atol=1e-12)
    one = sa.reference.attention(q, k, v, alibi_slopes=slopes[0])
    assert torch.allclose(one, sa.reference.attention(q, k, v, mask=bias[:1]), atol=1e-12)


def test_oracle_key_padding_and_key_bias_are_masks():
    q, k, v = _o(2, 2, 20, 8), _o(2, 2, 40, 8), _o(2, 2, 40, 8)
    kpm = torch.rand(2, 40) < 0.5
    kpm[1] = False
    out, lse = sa.reference.attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    ref, rlse = sa.reference.attention(q, k, v, mask=kpm[:, None, None, :], return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, rlse)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    kb = torch.randn(2, 1, 40)
    kb[:, :, :3] = float("-inf")
    got = sa.reference.attention(q, k, v, key_bias=kb)
    assert torch.allclose(got, sa.reference.attention(q, k, v, mask=kb[:, :, None, :]), atol=1e-12)


def test_oracle_gradients_and_empty_rows():
    """gradcheck through softcap + ALiBi + key bias; all -inf rows give zero gradients, never NaN."""
    q, k, v = (_o(1, 2, 6, 4).requires_grad_() for _ in range(3))
    kb = torch.randn(1, 2, 6, dtype=torch.float64)
    kb[0, 0, 2] = float("-inf")
    slopes = torch.tensor([0.3, 0.1])
    f = lambda q, k, v: sa.reference.attention(q, k, v, key_bias=kb, softcap=2.0, alibi_slopes=slopes,  # noqa: E731
                                               is_causal=True, return_lse=True)[0]
    assert torch.autograd.gradcheck(f, (q, k, v))
    kb[0, 1] = float("-inf")  # head 1 sees nothing
    out, lse = sa.reference.attention(q, k, v, key_bias=kb, softcap=2.0, return_lse=True)
    grads = torch.autograd.grad(out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum(), (q, k, v))
    assert torch.all(out[0, 1] == 0) and torch.all(lse[0, 1] == float("-inf"))
    assert all(not torch.isnan(g).any() for g in grads) and torch.all(grads[0][0, 1] == 0)


# --------------------------------------------------------------------------- the CPU path on its own

@pytest.mark.parametrize("Dv", [16, 48])
def test_cpu_path_functions_vs_oracle(Dv):
    """sparse_attention_fwd_cpu / _bwd_cpu called directly with every option (key mask, key bias,
    ALiBi [1, Hq], softcap, positions of a from_positions layout, segments) against the oracle in
    float64 (positions and segments as a bool mask)."""
    torch.manual_seed(0)
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 97, 130, 32
    q, k, v = _o(B, Hq, Lq, D).requires_grad_(), _o(B, Hkv, Lk, D).requires_grad_(), _o(B, Hkv, Lk, Dv).requires_grad_()
    q_pos = torch.randint(0, 30, (B, Lq), dtype=torch.int32)
    k_pos = torch.randint(0, 30, (B, Lk), dtype=torch.int32)
    q_pos[1, :3] = -1
    layout = sa.BlockLayout.from_positions(q_pos, k_pos, 32)
    q_seg, k_seg = torch.randint(0, 2, (1, Lq), dtype=torch.int32), torch.randint(0, 2, (1, Lk), dtype=torch.int32)
    kpm = _key_mask(B, Lk, "cpu")
    kb = torch.randn(1, Hq, Lk)
    kb[0, :, 5:9] = float("-inf")
    alibi = torch.rand(1, Hq) * 0.2
    opts = (kpm, kb, alibi, layout.q_pos, layout.k_pos, 4.0, q_seg, k_seg)
    args = (layout.lists(), layout.mask, None, layout.bits, 0.3, *layout.block_size, layout.causal_offset,
            layout.window, layout.sinks)
    out, lse = cpu.sparse_attention_fwd_cpu(q.detach(), k.detach(), v.detach(), *args, *opts)
    mask = (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
    # with positions, ALiBi's distance is q_pos - k_pos (BlockLayout.alibi_distance)
    ro, rl = sa.reference.attention(q, k, v, mask=mask, scale=0.3, return_lse=True, key_padding_mask=kpm,
                                    key_bias=kb, softcap=4.0, alibi_slopes=alibi[0],
                                    alibi_dist=q_pos[:, None, :, None] - k_pos[:, None, None, :])
    assert out.shape == (B, Hq, Lq, Dv) and torch.allclose(out, ro, atol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)) and torch.all(out[1, :, :3] == 0)
    fin = torch.isfinite(rl)
    assert torch.allclose(lse[fin].double(), rl[fin], atol=1e-5)
    do, dl = torch.randn_like(ro), torch.randn_like(rl)
    ref = torch.autograd.grad((ro * do).sum() + (torch.where(fin, rl, 0.0) * dl).sum(), (q, k, v))
    got = cpu.sparse_attention_bwd_cpu(do, dl, q.detach(), k.detach(), v.detach(), out, lse, *args, *opts)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and torch.allclose(g, r, atol=1e-5)  # p from the fp32 LSE
