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


def test_eager_calls_do_not_import_dynamo():
    """Issue 18 item 9: eager forward and backward never import torch._dynamo (~2 s on the first
    call, which torch.library.custom_op's kernel wrapper paid); a fresh interpreter checks it."""
    import subprocess
    import sys
    code = ("import sys, torch, sparseattn as sa\n"
            "q = torch.randn(1, 2, 70, 16, requires_grad=True)\n"
            "sa.sparse_attention(q, q, q, sa.SlidingWindow(20)).sum().backward()\n"
            "sa.lightning_attention(q, q, q).sum().backward()\n"
            "sa.decode_attention(q[:, :, :1].detach(), q.detach(), q.detach())\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_an_op_without_a_formula_raises_on_backward():
    """sparseattn.ops.library.custom_op keeps torch.library.custom_op's contract: a backward through
    an op without an autograd formula raises (no silent missing gradient); with one it is used."""
    from sparseattn.ops.library import custom_op

    @custom_op("sparseattn_test::double")
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @custom_op("sparseattn_test::triple", differentiable=True)
    def triple(x: torch.Tensor) -> torch.Tensor:
        return x * 3
    torch.library.register_autograd("sparseattn_test::triple", lambda ctx, g: g * 3)

    x = torch.randn(4, requires_grad=True)
    assert torch.equal(double(x.detach()), x.detach() * 2)
    with pytest.raises(RuntimeError, match="sparseattn_test::double: not differentiable"):
        double(x).sum().backward()
    triple(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    torch.library.opcheck(triple, (x,))
