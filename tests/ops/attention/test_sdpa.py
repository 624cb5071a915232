"""scaled_dot_product_attention drop-in: torch's semantics, against the float64 oracle."""

import pytest
import torch
import torch.nn.functional as F

import sparseattn as sa
from sparseattn import reference
from utils import DEVICE, DTYPES, assert_oracle, randn, strided

KERNEL = "triton"


def _qkv(B, Hq, Hkv, Lq, Lk, D, dtype, Dv=None):
    return (randn(B, Hq, Lq, D, dtype=dtype, requires_grad=True),
            randn(B, Hkv, Lk, D, dtype=dtype, requires_grad=True),
            randn(B, Hkv, Lk, Dv or D, dtype=dtype, requires_grad=True))


def check_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, backend=KERNEL):
    out = sa.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)
    assert sa.last_backend() == backend
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), (q, k, v))
    res = {}
    for dt in (torch.float64, q.dtype):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        m = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(dt)
        o = sa.reference.attention(*leaves, mask=m, scale=scale, is_causal=is_causal, dtype=dt)
        res[dt] = (o, *torch.autograd.grad((o.double() * dout.double()).sum(), leaves))
    for name, got, ref, base in zip(("out", "dq", "dk", "dv"), (out, *grads), res[torch.float64], res[q.dtype]):
        assert_oracle(name, got, ref, base)
    return out, grads


def test_oracle_matches_torch_float64():
    """The oracle itself agrees with torch's function (rows that see at least one key)."""
    q, k, v = (torch.randn(2, 4, 33, 16, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    for kw in (dict(is_causal=True), dict(attn_mask=torch.randn(33, 33, dtype=torch.float64)),
               dict(attn_mask=torch.rand(2, 1, 33, 33) < 0.9)):
        mask = kw.get("attn_mask")
        ours = sa.reference.attention(q, k, v, mask=mask, is_causal=kw.get("is_causal", False), scale=0.2)
        theirs = F.scaled_dot_product_attention(q, k, v, scale=0.2, enable_gqa=True, **kw)
        fine = ~torch.isnan(theirs)
        assert torch.allclose(ours[fine], theirs[fine], atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (63, 97), (200, 200), (200, 63)])
def test_dense_and_causal(dtype, is_causal, Lq, Lk):
    """is_causal is top-left aligned when Lq != Lk, as torch's ones(L, S).tril()."""
    check_sdpa(*_qkv(2, 2, 2, Lq, Lk, 32, dtype), is_causal=is_causal)


@pytest.mark.parametrize("mask_shape", [(97, 130), (130,), (1, 130), (2, 1, 97, 130), (1, 3, 97, 130),
                                        (2, 3, 1, 130), (2, 3, 97, 130), (97, 1)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_broadcast_shapes(mask_shape, kind):
    q, k, v = _qkv(2, 3, 3, 97, 130, 16, torch.float32)
    if kind == "bool":
        mask = torch.rand(*mask_shape, device=DEVICE) < 0.7
    else:
        mask = torch.randn(*mask_shape, device=DEVICE)
    check_sdpa(q, k, v, attn_mask=mask)


def test_bool_mask_skips_tiles_and_handles_fully_masked_rows():
    q, k, v = _qkv(1, 2, 2, 300, 280, 32, torch.float16)
    mask = torch.rand(300, 280, device=DEVICE) < 0.5
    mask[:, 128:256] = False   # a whole tile column: skipped
    mask[:128, :128] = True    # a full tile
    mask[7] = False            # a fully masked row: zeros, never NaN
    out, grads = check_sdpa(q, k, v, attn_mask=mask)
    assert torch.all(out[:, :, 7] == 0)
    assert torch.all(grads[0][:, :, 7] == 0)


def test_float_mask_with_neg_inf_rows():
    q, k, v = _qkv(2, 2, 1, 70, 90, 32, torch.float32)
    bias = torch.randn(2, 1, 70, 90, device=DEVICE)
    bias[:, :, 3] = float("-inf")
    out, grads = check_sdpa(q, k, v, attn_mask=bias, enable_gqa=True)
    assert torch.all(out[:, :, 3] == 0)


@pytest.mark.parametrize("Hkv", [1, 2])
def test_enable_gqa_and_scale(Hkv):
    check_sdpa(*_qkv(2, 4, Hkv, 97, 97, 64, torch.float16), is_causal=True, enable_gqa=True, scale=0.05)


def test_non_contiguous_hf_layout():
    q, k, v = (strided(t) for t in _qkv(2, 4, 4, 90, 90, 32, torch.float16))
    check_sdpa(q, k, v, is_causal=True)


def test_head_dim_padding():
    check_sdpa(*_qkv(1, 2, 2, 65, 65, 72, torch.float16), is_causal=True)


def test_value_head_dim_differs():
    """Dv != D runs on the kernels (MLA-style), not torch's fallback."""
    check_sdpa(*_qkv(1, 2, 2, 65, 70, 32, torch.float32, Dv=48), is_causal=True)


@pytest.mark.parametrize("case", ["dropout", "float64", "head_dim", "value_dim", "mask_grad"])
def test_fallbacks_to_torch(case):
    dtype = torch.float64 if case == "float64" else torch.float32
    D = 288 if case == "head_dim" else 16
    q, k, v = _qkv(1, 2, 2, 40, 40, D, dtype, Dv=288 if case == "value_dim" else None)   # Dv > 256
    kw = {}
    if case == "dropout":
        kw["dropout_p"] = 0.5
    if case == "mask_grad":
        kw["attn_mask"] = torch.randn(40, 40, device=DEVICE, requires_grad=True)
    out = sa.scaled_dot_product_attention(q, k, v, **kw)
    assert sa.last_backend() == "torch"
    if case == "dropout":
        return  # random: only the path is checked
    expected = F.scaled_dot_product_attention(q, k, v, **kw)
    assert torch.allclose(out, expected)
    if case == "mask_grad":
        out.sum().backward()
        assert kw["attn_mask"].grad is not None


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_cpu_tensors_run_torch_with_empty_rows_zero(monkeypatch, mask):
    """Outside the interpreter (SPARSEATTN_CPU_PATH=1 stands for it), CPU tensors run torch's own
    CPU SDPA; rows with no visible key still give 0 and no NaN gradient, even from a torch backend
    that gives NaN there (simulated: torch 2.13's CPU kernel happens to give 0)."""
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    torch_sdpa = F.scaled_dot_product_attention

    def nan_in_empty_rows(q, k, v, attn_mask=None, **kw):
        out = torch_sdpa(q, k, v, attn_mask=attn_mask, **kw)
        if attn_mask is None:
            return out
        sees = attn_mask if attn_mask.dtype == torch.bool else ~torch.isneginf(attn_mask)
        return out.masked_fill(~sees.any(-1, keepdim=True), float("nan"))

    monkeypatch.setattr(F, "scaled_dot_product_attention", nan_in_empty_rows)
    q, k, v = (t.detach().cpu().requires_grad_() for t in _qkv(2, 4, 2, 50, 70, 16, torch.float32))
    attn_mask = None
    if mask is not None:
        attn_mask = torch.rand(2, 1, 50, 70) < 0.3
        attn_mask[:, :, 7] = False
        if mask == "float":
            attn_mask = torch.where(attn_mask, torch.randn(2, 1, 50, 70), float("-inf"))
    out, grads = check_sdpa(q, k, v, attn_mask=attn_mask, is_causal=mask is None, enable_gqa=True, backend="torch")
    if mask is not None:
        assert torch.equal(out[:, :, 7], torch.zeros_like(out[:, :, 7]))
    assert all(torch.isfinite(g).all() for g in grads)


def test_bf16_on_cpu_runs_the_kernels():
    """With a right bf16 dot in the interpreter (the tests' shim), bf16 takes the kernels."""
    q, k, v = _qkv(1, 2, 2, 50, 50, 16, torch.bfloat16)
    check_sdpa(q, k, v, is_causal=True, backend="triton")


@pytest.mark.parametrize("lq,lk", [(64, 100), (100, 64), (70, 70)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_is_the_causal_rule(lq, lk, variant):
    """torch's CausalBias tensor subclass is a causal mask with its alignment, never read as data."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    bias = (causal_upper_left if variant == "upper_left" else causal_lower_right)(lq, lk)
    q, k, v = (randn(2, 2, L, 32) for L in (lq, lk, lk))
    out = sa.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(0 if variant == "upper_left" else lk - lq)
    assert_oracle(f"CausalBias {variant}", out, reference.attention(q, k, v, mask=mask),
                  reference.attention(q, k, v, mask=mask, dtype=q.dtype))
    with pytest.raises(ValueError, match="CausalBias for"):
        sa.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(lq + 1, lk))


def test_any_rank_and_broadcast_batch_like_torch():
    cases = [((5, 40, 16), (5, 50, 16), (5, 50, 16), None),          # [N, L, E]
             ((40, 16), (50, 16), (50, 16), None),                    # [L, E]
             ((2, 3, 4, 40, 16), (2, 1, 4, 50, 16), (1, 3, 4, 50, 16), None),   # two batch dims, broadcast
             ((3, 2, 40, 16), (1, 2, 50, 16), (1, 2, 50, 16), (40, 50))]       # K/V batch 1, a 2-D mask
    for qs, ks, vs, ms in cases:
        q, k, v = randn(*qs), randn(*ks), randn(*vs)
        mask = None if ms is None else torch.rand(ms, device=q.device) < 0.7
        out = sa.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                             is_causal=mask is None)
        base = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        assert out.shape == base.shape
        assert_oracle(f"rank {qs}", out, ref, base)
    q, k = randn(3, 2, 40, 16, requires_grad=True), randn(1, 2, 50, 16, requires_grad=True)
    out = sa.sparse_attention(q, k, k, sa.SlidingWindow(16))     # K/V batch 1, as FlexAttention
    out.sum().backward()
    assert k.grad.shape == k.shape and torch.isfinite(k.grad).all()
