"""Decode's C++ kernel route (cpu_kernel.cpp's ``decode`` op) where its own code decides: split-KV
parts merged by their LSE (one sequence and KV head, 1 to 4 threads), keys read in place from
strided caches, fp16 / bf16 and paged caches, lists cut at each length with the lists kept across
lengths, the options' mask falling back to the PyTorch path when too big, empty inputs, and the
op's own checks. Every test also runs on
the gather route (tests/ops/decode/conftest.py); there it checks the same results."""
import math

import pytest
import torch

import sparseattn as sa
from sparseattn.ops.attention import cpu_kernel
from sparseattn.ops.decode import cpu as dcpu

from test_decode import _check, _inputs, _random_layout


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["dense", "layout"])
def test_one_sequence_splits_its_keys_over_threads(threads, kind):
    """B = 1, one KV head, 5000 keys: with more threads than (sequence, KV head) jobs the kernel
    splits the keys into parts (at least 1024 keys each) merged by LSE; the result is the oracle's
    at every thread count, Lq = 3 rows included (the causal rule falls in the last part)."""
    B, Hq, Hkv, Lq, Lmax, D = 1, 4, 1, 3, 5000, 32
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, torch.float32)
    lens = torch.tensor([4321], dtype=torch.int32)
    layout = _random_layout(B, Hq, Lq, Lmax, 64, True, False, density=0.7) if kind == "layout" else None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, lse = sa.decode_attention(q, k, v, layout, cache_seqlens=lens, return_lse=True)
    finally:
        torch.set_num_threads(before)
    _check(f"split {kind} {threads} threads", q, k, v, layout, lens, out, lse)


@pytest.mark.parametrize("view", ["token-major", "sliced head dim", "one key"])
def test_strided_caches(view):
    """Caches that are views: [B, Lmax, Hkv, D] transposed (rows Hkv * D apart, read in place),
    the first D of a wider head dim (row stride 2D), and a one-key cache."""
    B, Hq, Hkv, Lq, D = 2, 4, 2, 2, 16
    Lmax = 1 if view == "one key" else 300
    if view == "token-major":
        k, v = (torch.randn(B, Lmax, Hkv, D).transpose(1, 2) for _ in range(2))
    elif view == "sliced head dim":
        k, v = (torch.randn(B, Hkv, Lmax, 2 * D)[..., :D] for _ in range(2))
    else:
        k, v = (torch.randn(B, Hkv, 1, D) for _ in range(2))
    q = torch.randn(B, Hq, Lq, D)
    lens = torch.tensor([Lmax, max(Lmax // 3, 1)], dtype=torch.int32)
    for layout in (None, _random_layout(B, Hq, Lq, Lmax, 32, True, True, density=0.6)):
        out, lse = sa.decode_attention(q, k, v, layout, cache_seqlens=lens, return_lse=True)
        _check(f"strided cache {view}", q, k, v, layout, lens, out, lse)


def test_lists_cut_at_each_length_and_kept(cpu_route):
    """One layout over decode steps whose lengths grow: each step equals the oracle (the kernel cuts
    the shared lists at each length; a block past the length is never read: NaN there changes
    nothing), and on the kernel route the lists are built once."""
    from sparseattn.ops.decode import op as dop

    B, Hq, Hkv, Lq, Lmax, D = 2, 4, 2, 1, 256, 16
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, torch.float32)
    layout = _random_layout(B, Hq, Lq, Lmax, 32, True, False, density=0.8)
    before = len(layout.__dict__.get("_decode_block_sets", {}))
    for n in (40, 41, 97, 200):
        lens = torch.tensor([n, n + 17], dtype=torch.int32)
        k2, v2 = k.clone(), v.clone()
        k2[0, :, n:], v2[0, :, n:] = float("nan"), float("nan")
        k2[1, :, n + 17:], v2[1, :, n + 17:] = float("nan"), float("nan")
        out, lse = sa.decode_attention(q, k2, v2, layout, cache_seqlens=lens, return_lse=True)
        _check(f"growing length {n}", q, k, v, layout, lens, out, lse)
    built = len(layout.__dict__["_decode_block_sets"]) - before
    assert built == (1 if cpu_route == "kernel" else 4)
    assert dop.decode_backend(q) == "cpu"


def test_big_options_mask_takes_the_pytorch_path(monkeypatch, cpu_route):
    """The options' mask is one tensor for the kernel; over _CHUNK_ELEMS elements the PyTorch path
    (which walks it in chunks) runs instead, with the same result."""
    B, Hq, Hkv, Lq, Lmax, D = 2, 4, 2, 2, 200, 16
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, torch.float32)
    lens = torch.tensor([200, 150], dtype=torch.int32)
    bias = torch.randn(B, Hq, Lmax)
    calls = []
    real = dcpu._decode
    monkeypatch.setattr(dcpu, "_decode", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dcpu, "_CHUNK_ELEMS", 1 << 20)
    small = sa.decode_attention(q, k, v, cache_seqlens=lens, key_bias=bias)
    assert len(calls) == (0 if cpu_route == "kernel" else 1)
    monkeypatch.setattr(dcpu, "_CHUNK_ELEMS", 64)
    big = sa.decode_attention(q, k, v, cache_seqlens=lens, key_bias=bias)
    assert len(calls) == (1 if cpu_route == "kernel" else 2)
    ref = sa.reference.decode_attention(q, k, v, cache_seqlens=lens, key_bias=bias)
    for got in (small, big):
        assert torch.allclose(got.double(), ref, atol=2e-5)


def test_kernel_runs_every_dtype_and_paged_caches(monkeypatch, cpu_route):
    """The kernel's decode op runs fp32, fp16 and bf16 caches and paged ones (one call each); the
    gather route runs none."""
    ops, calls = cpu_kernel.ops(), []
    if cpu_route == "gather":
        assert ops is None
        return

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    monkeypatch.setattr(cpu_kernel, "ops", lambda: Spy())
    q, k, v = _inputs(1, 2, 1, 1, 64, 16, torch.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        sa.decode_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    table = torch.arange(4, dtype=torch.int32)[None]                        # 4 pages of 16 keys
    sa.decode_attention(q, k.view(4, 16, 1, 16), v.view(4, 16, 1, 16), block_table=table)
    assert calls == ["decode"] * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
def test_half_caches_and_pages(dtype, paged):
    """fp16 / bf16 caches (rows converted to float32 as they are read) and paged caches (rows
    read through a shuffled table), ragged, with a layout of scattered blocks, against the oracle;
    paged equals the same cache stored contiguously."""
    B, Hq, Hkv, Lq, Lmax, D, ps = 2, 4, 2, 3, 256, 32, 32
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, dtype)
    lens = torch.tensor([256, 97], dtype=torch.int32)
    layout = _random_layout(B, Hq, Lq, Lmax, 64, True, False, density=0.6)
    out, lse = sa.decode_attention(q, k, v, layout, cache_seqlens=lens, return_lse=True)
    _check(f"{dtype} cache", q, k, v, layout, lens, out, lse)
    if paged:
        pages = B * Lmax // ps
        perm = torch.randperm(pages)
        kp, vp = (torch.empty(pages, ps, Hkv, D, dtype=dtype) for _ in range(2))
        for t, c in ((k, kp), (v, vp)):
            c[perm] = t.permute(0, 2, 1, 3).reshape(pages, ps, Hkv, D)
        table = perm.view(B, Lmax // ps).to(torch.int32)
        out_p, lse_p = sa.decode_attention(q, kp, vp, layout, cache_seqlens=lens, return_lse=True, block_table=table)
        assert torch.equal(out_p, out) and torch.equal(lse_p, lse)


@pytest.mark.parametrize("bad", ["block id", "negative block id", "count", "mask width", "heads"])
def test_op_rejects_bad_lists(bad):
    """The op checks every list entry, the mask's reach and the head grouping before reading anything."""
    ops = cpu_kernel.ops()
    if ops is None:  # the gather route: SPARSEATTN_CPU_KERNEL=0
        assert cpu_kernel.unavailable_reason() == "SPARSEATTN_CPU_KERNEL=0"
        return
    B, Hq, H, L, D, bk = 1, 2, 1, 128, 8, 32
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    num = torch.tensor([[2]], dtype=torch.int32)
    idx = torch.tensor([[[0, 3]]], dtype=torch.int32)
    mask = None
    if bad == "block id":
        idx[0, 0, 1] = math.ceil(L / bk)
    elif bad == "negative block id":
        idx[0, 0, 0] = -1
    elif bad == "count":
        num[0, 0] = 3
    elif bad == "mask width":
        mask = torch.zeros(1, 1, 1, 2 * bk - 1)
    else:
        q = torch.randn(B, 3, 1, D)
        k, v = torch.randn(B, 2, L, D), torch.randn(B, 2, L, D)
        num, idx = num.expand(1, 2), idx.expand(1, 2, 2)
    with pytest.raises(RuntimeError, match="sparseattn cpu decode"):
        ops.decode(q, k, v, torch.tensor([L], dtype=torch.int32), num, idx, bk, mask, 1.0, 0.0)


@pytest.mark.parametrize("B, Lmax", [(0, 64), (2, 0), (0, 0)])
def test_empty_batch_and_empty_cache(B, Lmax):
    """An empty batch (the op divided by B * Hkv: a floating point exception that killed the process)
    and an empty cache (every row sees nothing: 0 and -inf), as the oracle says."""
    q, k, v = _inputs(B, 4, 2, 2, Lmax, 16, torch.float32)
    layout = _random_layout(1, 4, 2, Lmax, 16, False, False) if Lmax else None
    out, lse = sa.decode_attention(q, k, v, layout, return_lse=True)
    ref, ref_lse = sa.reference.decode_attention(q, k, v, layout, return_lse=True)
    assert out.shape == (B, 4, 2, 16) and torch.equal(out, ref.float()) and torch.equal(lse, ref_lse.float())


def test_torch_compile(cpu_route):
    """decode_attention on CPU tensors under torch.compile equals eager: on the kernel route the
    op has a fake (shape) implementation and the whole call is one graph (fullgraph, a plain layout
    with ragged lengths: no host read); the gather route reads lengths on the host (graph breaks)."""
    B, Hq, Hkv, Lq, Lmax, D = 2, 4, 2, 2, 200, 16
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, torch.float32)
    bm = torch.rand(1, Hq, 1, math.ceil(Lmax / 32)) < 0.6
    bm[..., 0] = True
    layout = sa.BlockLayout.from_block_mask(bm, (16, 32), (Lq, Lmax))
    lens = torch.tensor([200, 77], dtype=torch.int32)

    def f(q, k, v):
        return sa.decode_attention(q, k, v, layout, cache_seqlens=lens, return_lse=True)
    torch._dynamo.reset()
    out, lse = torch.compile(f, backend="aot_eager", fullgraph=cpu_route == "kernel")(q, k, v)
    torch._dynamo.reset()
    eager = f(q, k, v)
    assert torch.equal(out, eager[0]) and torch.equal(lse, eager[1])
    _check("compiled decode", q, k, v, layout, lens, out, lse)


def test_backward_raises_on_the_kernel_route(cpu_route):
    """decode_attention is inference only: through the kernel's op a backward raises (as through
    the CUDA decode op), never torch's default of a warning and no gradient."""
    q, k, v = _inputs(1, 2, 1, 1, 64, 16, torch.float32)
    out = sa.decode_attention(q.requires_grad_(), k, v)
    if cpu_route == "kernel":
        with pytest.raises(RuntimeError, match="not differentiable"):
            out.sum().backward()
    else:   # the gather path is made of differentiable torch ops
        out.sum().backward()
        assert q.grad is not None
