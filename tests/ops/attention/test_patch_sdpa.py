"""sa.patch_sdpa(): torch.nn.functional.scaled_dot_product_attention routed to the drop-in, restored
on exit (an exception too), nested blocks, the call form, and fallbacks that reach torch's
original function (never the patched name)."""
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparseattn as sa
from sparseattn import _dispatch
from sparseattn.ops.attention.patch import (is_sdpa_patched, patch_sdpa, patched_scaled_dot_product_attention,
                                           unpatch_sdpa)
from sparseattn.ops.attention.sdpa import TORCH_SDPA
from utils import DEVICE, assert_oracle, randn


@pytest.fixture(autouse=True)
def torch_function_back():
    """Every test starts and ends with torch's own function in place, and no recorded backend."""
    assert F.scaled_dot_product_attention is TORCH_SDPA
    _dispatch._state.__dict__.clear()
    yield
    unpatched = F.scaled_dot_product_attention is TORCH_SDPA
    F.scaled_dot_product_attention = TORCH_SDPA     # never leak a patch into other tests
    assert unpatched, "a test left torch.nn.functional patched"


class Block(torch.nn.Module):
    """A tiny attention block that calls torch's function by name, as user code does."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, **kw):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, **kw)
        return self.out(y.transpose(1, 2).reshape(B, L, C))


def _grads(block, x, dy, **kw):
    y = block(x, **kw)
    return (y, *torch.autograd.grad((y.double() * dy.double()).sum(), [x, *block.parameters()]))


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(attn_mask="pad")], ids=["causal", "padding mask"])
def test_module_gets_the_drop_in(kw):
    """A module calling F.scaled_dot_product_attention runs sparseattn's kernels under the patch,
    with the same output and gradients as torch's function (the package's oracle rule)."""
    torch.manual_seed(0)
    block = Block().to(DEVICE)
    x, dy = randn(2, 97, 32, requires_grad=True), randn(2, 97, 32)
    if kw.get("attn_mask") == "pad":
        lens = torch.tensor([[97], [60]], device=DEVICE)
        kw = dict(attn_mask=(torch.arange(97, device=DEVICE)[None] < lens)[:, None, None])   # [B, 1, 1, Lk]
    with sa.patch_sdpa():
        assert F.scaled_dot_product_attention is patched_scaled_dot_product_attention
        got = _grads(block, x, dy, **kw)
        assert sa.last_backend() == _dispatch.backend_for(x) == "triton"
        assert sa.last_fallback_reason() is None
    assert F.scaled_dot_product_attention is TORCH_SDPA
    base = _grads(block, x, dy, **kw)                                     # torch's function, fp32
    ref = _grads(block.double(), x.detach().double().requires_grad_(), dy, **kw)   # torch's, float64
    for i, (g, r, b) in enumerate(zip(got, ref, base)):
        assert_oracle(f"output / grad {i}", g, r, b)


def test_restored_after_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with sa.patch_sdpa():
            assert is_sdpa_patched()
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is TORCH_SDPA
    q = randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="attn_mask"):        # an error of the drop-in itself
        with sa.patch_sdpa():
            F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(16, 16, dtype=torch.bool, device=DEVICE),
                                           is_causal=True)
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_nesting_and_call_form():
    with sa.patch_sdpa():
        with sa.patch_sdpa():
            assert is_sdpa_patched()
        assert is_sdpa_patched()                       # only the outermost exit restores
    assert not is_sdpa_patched()

    sa.patch_sdpa(enable=True)
    sa.patch_sdpa()                                    # idempotent: one unpatch undoes both
    with sa.patch_sdpa():
        pass
    assert is_sdpa_patched()                           # a block inside the call form leaves it on
    unpatch_sdpa()
    assert not is_sdpa_patched()
    unpatch_sdpa()                                     # no-op when nothing is patched

    with sa.patch_sdpa(enable=False):
        assert not is_sdpa_patched()
    with sa.patch_sdpa():
        unpatch_sdpa()                                 # undoes calls only: the block holds the patch
        assert is_sdpa_patched()
    assert not is_sdpa_patched()
    with pytest.raises(TypeError, match="enable: expected a bool"):
        patch_sdpa(enable="yes")


def test_patch_is_process_wide_and_early_references_keep_torch():
    """The attribute is patched for every thread; a reference taken before patching is torch's."""
    from torch.nn.functional import scaled_dot_product_attention as early

    seen = []
    with sa.patch_sdpa():
        t = threading.Thread(target=lambda: seen.append(F.scaled_dot_product_attention))
        t.start()
        t.join()
        q = randn(1, 2, 16, 8)
        early(q, q, q)
        assert sa.last_backend() is None               # torch's own function: sparseattn never ran
    assert seen == [patched_scaled_dot_product_attention]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_fallbacks_reach_torch_original():
    """What the drop-in does not take runs torch's original function (a call of the patched name
    there would recurse): dropout, float64, nested tensors, tensor subclasses."""
    q = randn(1, 2, 40, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.FallbackWarning)
        with sa.patch_sdpa():
            torch.manual_seed(1)
            out = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
            assert (sa.last_backend(), sa.last_fallback_reason()) == ("torch", "dropout_p > 0")
            torch.manual_seed(1)
            assert torch.equal(out, TORCH_SDPA(q, q, q, dropout_p=0.5))

            q64 = q.double()
            out = F.scaled_dot_product_attention(q64, q64, q64, is_causal=True)
            assert sa.last_backend() == "torch" and "float64" in sa.last_fallback_reason()
            assert torch.equal(out, TORCH_SDPA(q64, q64, q64, is_causal=True))

            class Sub(torch.Tensor):
                pass

            qs = q.as_subclass(Sub)
            out = F.scaled_dot_product_attention(qs, qs, qs)
            assert type(out) is Sub and "tensor subclass Sub" in sa.last_fallback_reason()

            if DEVICE == "cpu":     # jagged nested tensors: torch's CPU math path takes them
                qn = torch.nested.nested_tensor([torch.randn(10, 2, 16), torch.randn(7, 2, 16)],
                                                layout=torch.jagged).transpose(1, 2)
                out = F.scaled_dot_product_attention(qn, qn, qn)
                assert out.is_nested and "nested tensor query" in sa.last_fallback_reason()
