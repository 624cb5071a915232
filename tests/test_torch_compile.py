"""torch.compile(fullgraph=True) sees one custom op (no graph break), forward and backward;
torch.library.opcheck validates the op registration."""
import math

import pytest
import torch

import sparseattn as sa
from sparseattn.ops.attention import op as ops
from utils import DEVICE, randn


def _qkv(dtype=torch.float32):
    return [randn(1, 2, 70, 16, dtype=dtype, requires_grad=True) for _ in range(3)]


def _grads(fn, args):
    out = fn(*args)
    return (out, *torch.autograd.grad(out.float().pow(2).sum(), args))


@pytest.mark.parametrize("what", ["causal", "bool_mask", "float_mask", "layout", "padding_softcap_alibi", "varlen"])
def test_compile_fullgraph_forward_backward(what):
    torch._dynamo.reset()
    mask = torch.rand(70, 70, device=DEVICE) < 0.6
    bias = torch.randn(1, 2, 70, 70, device=DEVICE)
    lay = sa.BlockLayout.from_block_mask(torch.rand(1, 2, 2, 2, device=DEVICE) < 0.7, 64, (70, 70))
    pad = torch.arange(70, device=DEVICE)[None] < 50
    slopes = torch.rand(2, device=DEVICE)
    cu = torch.tensor([0, 20, 21, 70], dtype=torch.int32, device=DEVICE)

    def f(q, k, v):
        if what == "causal":
            return sa.scaled_dot_product_attention(q, k, v, is_causal=True)
        if what == "bool_mask":
            return sa.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if what == "float_mask":
            return sa.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if what == "padding_softcap_alibi":  # the key padding layout is built on the device in the graph
            return sa.sparse_attention(q, k, v, lay, key_padding_mask=pad, softcap=5.0, alibi_slopes=slopes)
        if what == "varlen":  # max_seqlen are ints: the cu_seqlens check (a host read) is skipped while compiling
            packed = [t[0].transpose(0, 1) for t in (q, k, v)]
            return sa.varlen_attention(*packed, cu, cu, 49, 49, causal=True)
        return sa.sparse_attention(q, k, v, lay)

    args = _qkv()
    eager = _grads(f, args)
    compiled = _grads(torch.compile(f, fullgraph=True, backend="aot_eager"), args)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert sa.last_backend() == "triton"


def test_compile_inductor():
    torch._dynamo.reset()

    def f(q, k, v):
        return sa.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    args = _qkv()
    eager = _grads(f, args)
    compiled = _grads(torch.compile(f, fullgraph=True), args)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_opcheck():
    q, k, v = _qkv()
    lay = sa.BlockLayout.from_block_mask(torch.rand(1, 1, 2, 2, device=DEVICE) < 0.7, 64, (70, 70), causal="top_left")
    none10 = (None,) * 10  # key_mask, key_bias, alibi, q_pos, k_pos, softcap, q_seg, k_seg, key_group, group_bias
    args = (q, k, v, lay.lists(), None, None, None, 1.0 / math.sqrt(16), 64, 64, lay.causal_offset, None, 0, *none10)
    torch.library.opcheck(ops.sparse_attention_fwd, args)
    bias = randn(1, 1, 70, 70)
    torch.library.opcheck(ops.sparse_attention_fwd,
                          (q, k, v, lay.lists(), None, bias, None, 0.5, 64, 64, None, None, 0, *none10))
    padded = lay.with_key_padding(torch.arange(70, device=DEVICE)[None] < 33)
    opts = (padded.key_mask, randn(1, 1, 70), torch.rand(1, 2, device=DEVICE), None, None, 3.0, None, None, None, None)
    torch.library.opcheck(ops.sparse_attention_fwd, (q, k, v, padded.lists(), None, None, None, 0.5, 64, 64,
                                                     padded.causal_offset, None, 0, *opts))
