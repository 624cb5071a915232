"""Oracle checks shared by several test modules (attention and Lightning), so that no test module
imports another."""
import torch

import sparseattn as sa
from sparseattn import reference

from utils import DEVICE, assert_oracle, randn, strided


def attention_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, device, non_contiguous=False):
    q = randn(B, Hq, Lq, D, dtype=dtype, device=device, requires_grad=True)
    k = randn(B, Hkv, Lk, D, dtype=dtype, device=device, requires_grad=True)
    v = randn(B, Hkv, Lk, D, dtype=dtype, device=device, requires_grad=True)
    if non_contiguous:
        q, k, v = (strided(t.detach()).requires_grad_() for t in (q, k, v))
    return q, k, v


def check_attention(q, k, v, layout, expected_backend, scale=None, use_lse=True):
    """Output, LSE and gradients of q, k, v against float64, with the same-dtype baseline."""
    out, lse = sa.sparse_attention(q, k, v, layout, scale=scale, return_lse=True)
    assert sa.last_backend() == expected_backend
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if use_lse else None
    loss = (out.float() * dout.float()).sum()
    if use_lse:
        loss = loss + (torch.where(torch.isinf(lse), 0.0, lse) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))

    mask = layout.to_dense_mask()
    results = {}
    for dt in (torch.float64, q.dtype):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, l = sa.reference.attention(*leaves, mask=mask, scale=scale, return_lse=True, dtype=dt)
        rl = (o.double() * dout.double()).sum()
        if use_lse:
            rl = rl + (torch.where(torch.isinf(l), 0.0, l).double() * dlse.double()).sum()
        results[dt] = (o, l, *torch.autograd.grad(rl, leaves))
    ref, base = results[torch.float64], results[q.dtype]
    assert_oracle("out", out, ref[0], base[0])
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(lse).cpu(), fin.cpu()), "lse must be -inf exactly where a row sees nothing"
    assert_oracle("lse", torch.where(fin, lse, 0.0), torch.where(fin, ref[1], 0.0).to(torch.float32),
                  torch.where(fin, base[1].float(), 0.0))
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref[2:], base[2:]):
        assert_oracle(name, g, r, b)
    return out, lse, grads


def lightning_inputs(B, H, L, Dk, Dv, dtype, decay, s0, grad=False, stride=False):
    q, k, v = (randn(B, H, L, d, dtype=dtype, requires_grad=grad) for d in (Dk, Dk, Dv))
    if stride:
        q, k, v = strided(q), strided(k), strided(v)
    slopes = (torch.rand(H, device=DEVICE) * 2 + 0.01) if decay else None
    state = randn(B, H, Dk, Dv, requires_grad=grad) if s0 else None
    return q, k, v, slopes, state


def check_lightning_fwd(q, k, v, slopes, s0, scale=None, tag=""):
    o, sf = sa.lightning_attention(q, k, v, slopes, scale=scale, initial_state=s0, output_final_state=True)
    ref_o, ref_s = reference.lightning_attention(q, k, v, slopes, scale, s0)
    base_o, base_s = reference.lightning_attention(q, k, v, slopes, scale, s0, dtype=q.dtype)
    assert o.dtype == q.dtype and sf.dtype == torch.float32
    assert_oracle(f"o {tag}", o, ref_o, base_o)
    assert_oracle(f"final state {tag}", sf, ref_s, base_s.float())
    return o, sf




def check_lightning_bwd(q, k, v, slopes, s0, with_dsf, tag):
    o, sf = sa.lightning_attention(q, k, v, slopes, initial_state=s0, output_final_state=True)
    do = randn(*o.shape, dtype=o.dtype)
    dsf = randn(*sf.shape) if with_dsf else None
    leaves = [q, k, v] + ([s0] if s0 is not None else [])

    def grads(o, sf):
        outs, gs = [o], [do.to(o.dtype)]
        if dsf is not None:
            outs.append(sf)
            gs.append(dsf.to(sf.dtype))
        return torch.autograd.grad(outs, leaves, gs)

    got = grads(o, sf)
    ref = grads(*reference.lightning_attention(q, k, v, slopes, None, s0))
    base = grads(*reference.lightning_attention(q, k, v, slopes, None, s0, dtype=q.dtype))
    for name, g, r, b in zip(("dq", "dk", "dv", "ds0"), got, ref, base):
        assert g.dtype == leaves[0].dtype or name == "ds0"
        assert_oracle(f"{name} {tag}", g, r, b)
