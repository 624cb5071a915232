"""VAR and ACT attention redistribution against their float64 oracles: fed the kernel's own
selection decisions (near-threshold rows are legitimate either way), and checked away from the
thresholds for the decisions themselves; GQA, awkward lengths, query masks, empty cases, bad input;
on the kernels and the CPU path."""
import pytest
import torch

import sparseattn as sa
from utils import DEVICE, assert_oracle, randn


def _inputs(B, H, Hkv, Lq, Lk, D, device, dtype=torch.float32):
    q, k, v = randn(B, H, Lq, D, device=device, dtype=dtype), randn(B, Hkv, Lk, D, device=device, dtype=dtype), \
        randn(B, Hkv, Lk, D, device=device, dtype=dtype)
    k[:, :, 0] *= 4   # a strong first-token sink, as in LLMs
    return q, k, v


def _image_and_sinks(B, Lk, device):
    image = ((torch.arange(Lk, device=device) >= 8) & (torch.arange(Lk, device=device) < Lk - 30))[None].repeat(B, 1)
    sinks = torch.zeros(B, Lk, dtype=torch.bool, device=device)
    sinks[:, [0, 12, 13]] = True
    return image, sinks


@pytest.mark.parametrize("Lq,Lk", [(130, 130), (1, 97), (63, 200)])
def test_var_matches_oracle(backend, Lq, Lk):
    device, name = backend
    q, k, v = _inputs(2, 4, 2, Lq, Lk, 32, device)
    image, sinks = _image_and_sinks(2, Lk, device)
    sinks[1, 12:14] = False                          # batch element 1: no visual sink -> nothing selected
    qmask = torch.rand(2, Lq, device=device) < 0.8
    out, sel = sa.visual.var_attention(q, k, v, image, sinks, summ=0.1, query_mask=qmask, return_selected=True)
    assert sa.last_backend() == name
    assert not sel[1].any() and not (sel & ~qmask[:, None]).any()
    ref, _ = sa.reference.var_attention(q, k, v, image, sinks, summ=0.1, selected=sel)
    base, _ = sa.reference.var_attention(q, k, v, image, sinks, summ=0.1, selected=sel, dtype=torch.float32)
    assert_oracle("var out", out, ref, base)
    # the decisions themselves, away from the thresholds: recompute them in float64
    _, sel64 = sa.reference.var_attention(q, k, v, image, sinks, summ=0.1, query_mask=qmask)
    disagree = sel != sel64
    assert disagree.float().mean() < 0.01, "selections differ beyond near-threshold rows"


def test_var_decode_form_ragged(backend):
    """Lq = 3 new tokens against a cache with ragged lengths (one sequence shorter than Lq)."""
    device, name = backend
    q, k, v = _inputs(3, 4, 2, 3, 160, 16, device)
    image, sinks = _image_and_sinks(3, 160, device)
    lens = torch.tensor([160, 100, 2], dtype=torch.int32, device=device)
    out, sel = sa.visual.var_attention(q, k, v, image, sinks, summ=0.05, cache_seqlens=lens, return_selected=True)
    assert sa.last_backend() == name
    ref, _ = sa.reference.var_attention(q, k, v, image, sinks, summ=0.05, cache_seqlens=lens, selected=sel)
    base, _ = sa.reference.var_attention(q, k, v, image, sinks, summ=0.05, cache_seqlens=lens, selected=sel,
                                         dtype=torch.float32)
    assert_oracle("var decode", out, ref, base)
    assert (out[2, :, 0] == 0).all()    # row 0 of the length-2 sequence sits at position -1: sees nothing


def test_var_redistributes_mass(backend):
    """Selected rows: the sinks' weights shrink to p, and the output moves toward the non-sink image
    values; rows not selected equal plain attention."""
    device, name = backend
    q, k, v = _inputs(1, 2, 2, 100, 100, 16, device)
    image, sinks = _image_and_sinks(1, 100, device)
    out, sel = sa.visual.var_attention(q, k, v, image, sinks, summ=0.0, rho=1.0, return_selected=True)
    plain = sa.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(100, 100, dtype=torch.bool,
                                                                          device=device).tril())
    rows = ~sel
    torch.testing.assert_close(out[rows], plain[rows], atol=1e-5, rtol=1e-5)
    assert sel.any() and (out[sel] - plain[sel]).abs().max() > 1e-3


@pytest.mark.parametrize("is_causal", [True, False])
def test_act_matches_oracle(backend, is_causal):
    device, name = backend
    q, k, v = _inputs(2, 4, 2, 130, 130, 32, device)
    k[:, :, 40] *= 3   # a second sink, the one ACT calibrates
    out, sinks = sa.visual.act_attention(q, k, v, alpha=0.05, is_causal=is_causal, return_sinks=True)
    assert sa.last_backend() == name
    ref, _ = sa.reference.act_attention(q, k, v, alpha=0.05, is_causal=is_causal, sinks=sinks)
    base, _ = sa.reference.act_attention(q, k, v, alpha=0.05, is_causal=is_causal, sinks=sinks, dtype=torch.float32)
    assert_oracle("act out", out, ref, base)
    _, sinks64 = sa.reference.act_attention(q, k, v, alpha=0.05, is_causal=is_causal)
    assert (sinks != sinks64).sum() <= 2, "sink sets differ beyond near-threshold columns"
    # the first detected sink (token 0 here) is dropped, as the reference code does
    assert not sinks[..., 0].any()


def test_act_row_zero_and_half_precision(backend):
    device, name = backend
    q, k, v = _inputs(1, 2, 1, 97, 97, 16, device, dtype=torch.float16)
    out, sinks = sa.visual.act_attention(q, k, v, alpha=0.02, return_sinks=True)
    ref, _ = sa.reference.act_attention(q, k, v, alpha=0.02, sinks=sinks)
    base, _ = sa.reference.act_attention(q, k, v, alpha=0.02, sinks=sinks, dtype=torch.float16)
    assert_oracle("act fp16", out, ref, base)
    torch.testing.assert_close(out[:, :, 0].float(), v[:, :, 0].float().expand(1, 2, 16), atol=2e-3, rtol=2e-3)


def test_bad_input():
    q, k, v = _inputs(1, 2, 2, 40, 40, 16, DEVICE)
    image, sinks = _image_and_sinks(1, 40, DEVICE)
    with pytest.raises(TypeError, match="image_mask"):
        sa.visual.var_attention(q, k, v, image.int(), sinks)
    with pytest.raises(ValueError, match="sink_mask"):
        sa.visual.var_attention(q, k, v, image, sinks[:, :39])
    with pytest.raises(ValueError, match="query_mask"):
        sa.visual.var_attention(q, k, v, image, sinks, query_mask=torch.ones(1, 41, dtype=torch.bool))
    with pytest.raises(ValueError, match="rho"):
        sa.visual.var_attention(q, k, v, image, sinks, rho=1.5)
    with pytest.raises(ValueError, match="beta"):
        sa.visual.act_attention(q, k, v, beta=0.0)
    with pytest.raises(ValueError, match="square"):
        sa.visual.act_attention(q, k[:, :, :30], v[:, :, :30])
