"""sparse_attention against the float64 oracle: random layouts, GQA, awkward sizes, strides,
head dims, LSE, gradients; on the Triton kernels and on the PyTorch CPU path."""
import math

import pytest
import torch

import sparseattn as sa
from utils import DEVICE, DTYPES, assert_oracle, randn
from checks import attention_inputs as _inputs, check_attention as check


def _random_layout(B, H, Lq, Lk, bs, density=0.5, empty_row=True, device=DEVICE, shape=None):
    nq, nk = math.ceil(Lq / bs[0]), math.ceil(Lk / bs[1])
    bm = torch.rand(*(shape or (B, H)), nq, nk, device=device) < density
    if empty_row:
        bm[..., nq // 2, :] = False
    return sa.BlockLayout.from_block_mask(bm, bs, (Lq, Lk))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", [(1, 63), (63, 97), (200, 200), (97, 200), (200, 63)])
def test_random_layout(backend, dtype, Lq, Lk):
    device, name = backend
    q, k, v = _inputs(2, 4, 2, Lq, Lk, 32, dtype, device)
    layout = _random_layout(2, 4, Lq, Lk, (64, 64), device=device)
    check(q, k, v, layout, name)


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (1, 4)])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_gqa_and_layout_broadcast(backend, shape, Hkv):
    device, name = backend
    q, k, v = _inputs(2, 4, Hkv, 130, 150, 16, torch.float32, device)
    layout = _random_layout(2, 4, 130, 150, (32, 64), density=0.6, device=device, shape=shape)
    check(q, k, v, layout, name)


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("Lq,Lk", [(97, 200), (200, 97)])
def test_causal_kinds(backend, causal, Lq, Lk):
    device, name = backend
    q, k, v = _inputs(1, 2, 1, Lq, Lk, 32, torch.float16, device)
    nq, nk = math.ceil(Lq / 64), math.ceil(Lk / 64)
    layout = sa.BlockLayout.from_block_mask(torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device), 64,
                                            (Lq, Lk), causal=causal)
    out, lse, grads = check(q, k, v, layout, name)
    if causal == "bottom_right" and Lq > Lk:  # the first Lq - Lk rows see no key
        assert torch.all(out[:, :, : Lq - Lk] == 0) and torch.all(lse[:, :, : Lq - Lk] == float("-inf"))
        assert torch.all(grads[0][:, :, : Lq - Lk] == 0)


def test_empty_layout_gives_zeros(backend):
    device, name = backend
    q, k, v = _inputs(2, 2, 2, 100, 70, 32, torch.float32, device)
    layout = sa.BlockLayout.from_block_mask(torch.zeros(1, 1, 2, 2, dtype=torch.bool, device=device), 64, (100, 70))
    out, lse = sa.sparse_attention(q, k, v, layout, return_lse=True)
    assert sa.last_backend() == name
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    grads = torch.autograd.grad(out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum(), (q, k, v))
    for g in grads:
        assert torch.all(g == 0)


@pytest.mark.parametrize("D", [16, 40, 128, 256])
def test_head_dims(backend, D):
    device, name = backend
    q, k, v = _inputs(1, 2, 1, 70, 90, D, torch.float16, device)
    check(q, k, v, _random_layout(1, 2, 70, 90, (64, 64), density=0.7, empty_row=False, device=device), name,
          scale=0.3 / math.sqrt(D))


def test_non_contiguous_inputs(backend):
    device, name = backend
    q, k, v = _inputs(2, 4, 2, 97, 120, 32, torch.float16, device, non_contiguous=True)
    assert not q.is_contiguous()
    check(q, k, v, _random_layout(2, 4, 97, 120, (64, 32), device=device), name)


def test_layout_blocks_split_into_kernel_tiles(backend):
    """A 128-wide layout block runs as several kernel tiles when the config tile is smaller."""
    device, name = backend
    q, k, v = _inputs(1, 2, 2, 250, 300, 32, torch.float32, device)
    check(q, k, v, _random_layout(1, 2, 250, 300, (128, 128), density=0.7, device=device), name)


def test_element_mask_layout(backend):
    device, name = backend
    q, k, v = _inputs(2, 2, 1, 100, 90, 32, torch.float32, device)
    mask = torch.rand(2, 1, 100, 90, device=device) < 0.4
    mask[:, :, :, :32] = True
    mask[0, :, 5] = False  # a fully masked row
    layout = sa.BlockLayout.from_block_mask(torch.ones(1, 1, 4, 3, dtype=torch.bool, device=device), 32,
                                            (100, 90), mask=mask)
    out, lse, _ = check(q, k, v, layout, name)
    assert torch.all(out[0, :, 5] == 0)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs > 2^31-element tensors: a GPU with >= 40 GB")
def test_64bit_offsets():
    """q, k, v of 2^31 + 12800 elements each: element offsets pass int32; only the last query
    block attends (key blocks 0 and last), so the work stays small."""
    L, D, bs = (1 << 24) + 100, 128, 64
    n = math.ceil(L / bs)
    q, k, v = (randn(1, 1, L, D, dtype=torch.float16, requires_grad=True) for _ in range(3))
    counts = torch.zeros(1, 1, n, dtype=torch.int32, device=DEVICE)
    counts[..., -1] = 2
    idx = torch.zeros(1, 1, n, 2, dtype=torch.int32, device=DEVICE)
    idx[..., -1, 1] = n - 1
    layout = sa.BlockLayout.from_indices(counts, idx, bs, (L, L))
    out = sa.sparse_attention(q, k, v, layout)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad((out * dout).sum(), (q, k, v))
    rows = slice((n - 1) * bs, L)
    keys = torch.cat([torch.arange(bs), torch.arange((n - 1) * bs, L)]).to(DEVICE)
    assert torch.all(out[:, :, : (n - 1) * bs] == 0)
    res = {}
    for dt in (torch.float64, torch.float16):
        leaves = [q[:, :, rows].detach().to(dt).requires_grad_(), k[:, :, keys].detach().to(dt).requires_grad_(),
                  v[:, :, keys].detach().to(dt).requires_grad_()]
        o = sa.reference.attention(*leaves, dtype=dt)
        res[dt] = (o, *torch.autograd.grad((o.double() * dout[:, :, rows].double()).sum(), leaves))
    got = (out[:, :, rows], dq[:, :, rows], dk[:, :, keys], dv[:, :, keys])
    for name, g, r, b in zip(("out", "dq", "dk", "dv"), got, res[torch.float64], res[torch.float16]):
        assert_oracle(name, g, r, b)


@pytest.mark.parametrize("window,sinks", [(1, 0), (50, 4), (500, 0)])
def test_sliding_window_with_sinks(backend, window, sinks):
    device, name = backend
    Lq, Lk = 150, 200
    q, k, v = _inputs(2, 4, 2, Lq, Lk, 32, torch.float32, device)
    layout = sa.BlockLayout.from_block_mask(torch.ones(1, 1, 3, 4, dtype=torch.bool, device=device), 64, (Lq, Lk),
                                            causal="bottom_right", window=window, sinks=sinks)
    check(q, k, v, layout, name)


def test_tile_bitmasks(backend):
    """Mixed tiles carry packed bitmasks that the kernels apply (forward and both backward passes),
    with per-(batch, head) lists and 128-wide layout blocks split into kernel tiles."""
    device, name = backend
    Lq, Lk, bs = 200, 230, (128, 64)
    q, k, v = _inputs(2, 4, 2, Lq, Lk, 16, torch.float16, device)
    nq, nk = 2, 4
    b, h, r, c = (t.to(device) for t in torch.ones(2, 4, nq, nk, dtype=torch.bool).nonzero(as_tuple=True))
    keep = torch.rand(b.numel(), device=device) < 0.8
    bits = torch.rand(int(keep.sum()), *bs, device=device) < 0.3
    bits[0] = True
    layout = sa.BlockLayout.from_entries(b[keep], h[keep], r[keep], c[keep], shape=(2, 4), block_size=bs,
                                         seq_lens=(Lq, Lk), causal="bottom_right", bits=bits)
    assert layout.bits is not None
    check(q, k, v, layout, name)
