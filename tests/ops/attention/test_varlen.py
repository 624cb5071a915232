"""varlen_attention against the float64 oracle (one dense attention per sequence): length mixes with
empty and one-token sequences, causal / window / sinks per sequence, GQA, Dv != D, softcap and
ALiBi, strided packed inputs, gradients; bad cu_seqlens; on the kernels and the CPU path."""
import itertools

import pytest
import torch

import sparseattn as sa
from utils import DEVICE, assert_oracle, randn


def _cu(lens, device):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def _check(lq, lk, Hq, Hkv, D, Dv, dtype, device, expected, **kw):
    cq, ck = _cu(lq, device), _cu(lk, device)
    q = randn(sum(lq), Hq, D, dtype=dtype, device=device, requires_grad=True)
    k = randn(sum(lk), Hkv, D, dtype=dtype, device=device, requires_grad=True)
    v = randn(sum(lk), Hkv, Dv, dtype=dtype, device=device, requires_grad=True)
    out, lse = sa.varlen_attention(q, k, v, cq, ck, max(lq), max(lk), return_lse=True, **kw)
    assert sa.last_backend() == expected
    assert out.shape == (sum(lq), Hq, Dv) and lse.shape == (Hq, sum(lq))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), (q, k, v))
    results = {}
    for dt in (torch.float64, dtype):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, l = sa.reference.varlen_attention(*leaves, cq, ck, return_lse=True, dtype=dt, **kw)
        results[dt] = (o, l, *torch.autograd.grad((o.double() * dout.double()).sum(), leaves))
    ref, base = results[torch.float64], results[dtype]
    assert_oracle("out", out, ref[0], base[0])
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(lse).cpu(), fin.cpu()), "lse must be -inf exactly where a row sees nothing"
    assert_oracle("lse", torch.where(fin, lse, 0.0), torch.where(fin, ref[1], 0.0).float(),
                  torch.where(fin, base[1].float(), 0.0))
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref[2:], base[2:]):
        assert_oracle(name, g, r, b)
    return out, lse


@pytest.mark.parametrize("causal,window,sinks", [(False, None, 0), (True, None, 0), (True, 40, 3)])
def test_length_mix(backend, causal, window, sinks):
    device, name = backend
    # empty and one-token sequences, a sequence shorter than its keys (bottom-right), awkward lengths
    lq, lk = [63, 0, 1, 97, 200], [63, 5, 1, 120, 200]
    _check(lq, lk, 4, 2, 32, 32, torch.float32, device, name, causal=causal, window=window, sinks=sinks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_softcap_alibi(backend, dtype):
    device, name = backend
    slopes = torch.rand(4, device=device) * 0.2
    _check([40, 130, 1], [40, 130, 9], 4, 4, 16, 16, dtype, device, name, causal=True, softcap=8.0,
           alibi_slopes=slopes)


def test_value_head_dim_and_gqa(backend):
    device, name = backend
    _check([70, 30], [50, 90], 6, 2, 32, 48, torch.float32, device, name, causal=False)


def test_rows_that_see_nothing(backend):
    """A causal sequence with more queries than keys: its first rows see no key (0, LSE -inf)."""
    device, name = backend
    out, lse = _check([20, 10], [4, 10], 2, 2, 16, 16, torch.float32, device, name, causal=True)
    assert (out[:16] == 0).all() and torch.isneginf(lse[:, :16]).all()


def test_strided_packed_inputs(backend):
    """q, k, v sliced out of one packed qkv tensor (non-contiguous), as fused projections give them."""
    device, name = backend
    lens = [33, 77]
    cu = _cu(lens, device)
    qkv = randn(sum(lens), 3, 2, 16, device=device)
    q, k, v = qkv.unbind(1)
    out = sa.varlen_attention(q, k, v, cu, cu, 77, 77, causal=True)
    assert sa.last_backend() == name
    ref = sa.reference.varlen_attention(q, k, v, cu, cu, causal=True)
    base = sa.reference.varlen_attention(q, k, v, cu, cu, causal=True, dtype=q.dtype)
    assert_oracle("out", out, ref, base)


def test_no_key_of_another_sequence(backend):
    """Keys of the other sequences are made huge: they would dominate any row that saw them."""
    device, name = backend
    lens = [50, 60, 70]
    cu = _cu(lens, device)
    q, k, v = (randn(sum(lens), 2, 16, device=device) for _ in range(3))
    alone = torch.cat([sa.varlen_attention(q[a:b], k[a:b], v[a:b], _cu([b - a], device), _cu([b - a], device),
                                           b - a, b - a) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    out = sa.varlen_attention(q, k, v, cu, cu, 70, 70)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


def test_bad_cu_seqlens():
    q = k = v = torch.randn(10, 2, 16, device=DEVICE)
    good = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    cases = [
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), "cu_seqlens_q", ValueError),    # not increasing
        (torch.tensor([0, 4, 9], dtype=torch.int32), "cu_seqlens_q", ValueError),        # wrong last value
        (torch.tensor([0, 4, 10], dtype=torch.int64), "cu_seqlens_q", TypeError),        # wrong dtype
        (torch.tensor([1, 4, 10], dtype=torch.int32), "cu_seqlens_q", ValueError),       # not from 0
    ]
    for cu, name, err in cases:
        with pytest.raises(err, match=name):
            sa.varlen_attention(q, k, v, cu.to(DEVICE), good, 10, 10)
    with pytest.raises(ValueError, match="cu_seqlens_k"):      # another number of sequences
        sa.varlen_attention(q, k, v, good, torch.tensor([0, 10], dtype=torch.int32, device=DEVICE), 10, 10)
    with pytest.raises(ValueError, match="max_seqlen_q"):      # shorter than the longest sequence
        sa.varlen_attention(q, k, v, good, good, 5, 10)
    with pytest.raises(TypeError, match="max_seqlen_k"):
        sa.varlen_attention(q, k, v, good, good, 10, 10.0)
    with pytest.raises(ValueError, match="q: expected 3 dims"):
        sa.varlen_attention(q[None], k, v, good, good, 10, 10)
    with pytest.raises(ValueError, match="alibi_slopes"):
        sa.varlen_attention(q, k, v, good, good, 10, 10, alibi_slopes=torch.rand(3, device=DEVICE))
