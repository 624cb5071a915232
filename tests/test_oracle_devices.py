"""The float64 oracles make every tensor on their inputs' device. On a GPU, an oracle that builds a
helper tensor on the CPU fails (or compares on the wrong device); the first GPU run found two
(routing, statistics). This machine has one device, so the oracles run on the meta device here:
any tensor made without a device is a CPU tensor, and mixing it with meta inputs raises. The
oracles that need a layout's data (its lists) cannot run on meta and are not covered here."""
import pytest
import torch

import sparseattn as sa

R = sa.reference
B, H, L, D = 2, 2, 24, 8


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def flags(*shape):
    return meta(*shape, dtype=torch.bool)


def clusters(C=3, w=8):
    """Routing's memberships: positions [B, H, C, w] of each cluster's members."""
    return meta(B, H, C, w, dtype=torch.int64)


CASES = {
    "attention": lambda q, k, v: R.attention(q, k, v, is_causal=True, key_padding_mask=flags(B, L),
                                             alibi_slopes=meta(H), key_bias=meta(B, H, L), softcap=5.0),
    "attention-mask": lambda q, k, v: R.attention(q, k, v, mask=flags(B, 1, L, L), return_lse=True),
    "decode": lambda q, k, v: R.decode_attention(q[:, :, :3], k, v, cache_seqlens=meta(B, dtype=torch.int32),
                                                 alibi_slopes=meta(H), key_padding_mask=flags(B, L),
                                                 return_lse=True),
    "decode-dense": lambda q, k, v: R.decode_attention(q[:, :, :1], k, v),
    "lightning": lambda q, k, v: R.lightning_attention(q, k, v, slopes=meta(H)),
    "routing": lambda q, k, v: R.routing_attention(q, k, v, clusters(), clusters()),
    "routing-shared": lambda q, k, v: R.routing_attention(q, None, v, clusters(), clusters(), share_qk=True),
    "act": lambda q, k, v: R.act_attention(q, k, v),
    "var": lambda q, k, v: R.var_attention(q, k, v, flags(B, L), flags(B, L)),
}


@pytest.mark.parametrize("name", CASES)
def test_oracle_stays_on_its_inputs_device(name):
    q, k, v = (meta(B, H, L, D) for _ in range(3))
    out = CASES[name](q, k, v)
    outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
    assert outs and all(t.device.type == "meta" for t in outs), [t.device for t in outs]
