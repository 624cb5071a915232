"""The grouped CPU path (ops/attention/cpu.py, ops/decode/cpu.py) on awkward layouts against the
float64 oracle: every way a layout's lists map onto q / k / v (per batch, per head, broadcast,
GQA), padded rows and keys, Dv != D, diagonal tiles run as the fused op's causal rule, tile
bitmasks, strided views and gathers, many chunks per group, the matmul fallback, and the thread
policy (restored thread count, results independent of it); each with the C++ kernel and with the
gather path. No timing here: the speed is in the bench's CPU table."""
import math

import pytest
import torch

import sparseattn as sa
from checks import attention_inputs, check_attention
from sparseattn.ops.attention import cpu, cpu_kernel


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch, cpu_route):
    """Every test twice (conftest's ``cpu_route``): with the C++ kernel and with the gather path."""
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    return cpu_route


def _layout(shape, Lq, Lk, bs, density=0.6, **kw):
    nq, nk = math.ceil(Lq / bs), math.ceil(Lk / bs)
    bm = torch.rand(*shape, nq, nk) < density
    bm[..., 0, :] = False  # a query block that sees nothing
    return sa.BlockLayout.from_block_mask(bm, bs, (Lq, Lk), **kw)


# (B, Hq, Hkv, list shape, Lq, Lk, block, kinds)
CASES = {
    "per batch and head, GQA, bottom-right": (2, 4, 2, (2, 4), 200, 300, 64, dict(causal="bottom_right")),
    "per batch, broadcast heads": (2, 4, 2, (2, 1), 97, 130, 32, {}),
    "per head, broadcast batch": (2, 4, 1, (1, 4), 130, 97, 32, dict(causal="top_left")),
    "broadcast, GQA rows, window+sinks": (1, 6, 2, (1, 1), 256, 320, 64,
                                          dict(causal="bottom_right", window=100, sinks=5)),
    "diagonal tiles": (1, 2, 2, (1, 1), 256, 256, 64, dict(causal="top_left")),
    "diagonal tiles, Lq > Lk": (1, 2, 1, (1, 2), 320, 192, 64, dict(causal="bottom_right")),
}


@pytest.mark.parametrize("use_lse", [False, True], ids=["fused bwd", "lse grad"])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_path_vs_oracle(case, use_lse):
    torch.manual_seed(0)
    B, Hq, Hkv, shape, Lq, Lk, bs, kinds = CASES[case]
    q, k, v = attention_inputs(B, Hq, Hkv, Lq, Lk, 32, torch.float32, "cpu")
    check_attention(q, k, v, _layout(shape, Lq, Lk, bs, **kinds), "cpu", use_lse=use_lse)


def test_diagonal_kind_is_used_and_exact():
    """Causal diagonal tiles go to the fused op's causal rule (no mask), the others keep theirs."""
    lay = sa.BlockLayout.from_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 64, (256, 256),
                                         causal="top_left")
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    plan = cpu._Plan(q, k, v, lay, None, (None,) * 5)
    assert plan.lists("diagonal")[0].tolist() == [1, 1, 1, 1] and plan.lists("partial")[0].tolist() == [0] * 4
    windowed = sa.BlockLayout.from_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 64, (256, 256),
                                              causal="top_left", window=32)
    assert cpu._Plan(q, k, v, windowed, None, (None,) * 5).lists("diagonal")[0].sum() == 0  # the window cuts


@pytest.mark.parametrize("Dv", [16, 48])
def test_value_dim_differs(Dv):
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 150, 32, requires_grad=True), torch.randn(2, 2, 170, 32, requires_grad=True)
    v = torch.randn(2, 2, 170, Dv, requires_grad=True)
    lay = _layout((2, 1), 150, 170, 64, causal="bottom_right")
    out = sa.sparse_attention(q, k, v, lay)
    ref = sa.reference.attention(q.double(), k.double(), v.double(), mask=lay.to_dense_mask())
    assert out.shape == (2, 4, 150, Dv) and torch.allclose(out.double(), ref, atol=1e-5)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(sa.reference.attention(q, k, v, mask=lay.to_dense_mask()), (q, k, v), do)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.is_contiguous() and torch.allclose(g, w.float(), atol=1e-5)


def test_tile_bitmasks_and_fully_masked_rows():
    """Partial tiles with bitmasks (from_entries), a key padding mask that empties a sequence."""
    torch.manual_seed(2)
    b, h, r, c = (torch.tensor(x) for x in ([0, 0, 0, 1, 1], [0, 1, 1, 0, 1], [0, 0, 1, 1, 2], [0, 1, 1, 2, 0]))
    bits = torch.rand(5, 64, 64) < 0.5
    lay = sa.BlockLayout.from_entries(b, h, r, c, shape=(2, 2), block_size=64, seq_lens=(150, 150), bits=bits)
    q, k, v = attention_inputs(2, 2, 1, 150, 150, 16, torch.float32, "cpu")
    check_attention(q, k, v, lay, "cpu", use_lse=False)
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[1] = False
    out, lse = sa.sparse_attention(q, k, v, lay, key_padding_mask=pad, return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf")) and not out.isnan().any()


def test_views_chunks_and_gathers_agree(monkeypatch):
    """Strided views vs index_select gathers, one chunk vs many per group: the same numbers."""
    torch.manual_seed(3)
    q, k, v = attention_inputs(1, 4, 2, 512, 512, 32, torch.float32, "cpu")
    lay = sa.SlidingWindow(150, sinks=4).layout(512, 512, "cpu")

    def run():
        out = sa.sparse_attention(q, k, v, lay)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    first = run()
    monkeypatch.setattr(cpu, "_step", lambda t: None)      # every group gathered, no view
    monkeypatch.setattr(cpu, "_CHUNK_ELEMS", 1)            # one entry per chunk
    for a, b in zip(first, run()):
        assert torch.allclose(a, b, atol=1e-6)


def test_matmul_fallback_equals_fused(monkeypatch):
    """A torch without the fused op (or a softcap) runs the same groups through matmuls (compared
    with the kernel, and with the fused op on gathered blocks)."""
    torch.manual_seed(4)
    q, k, v = attention_inputs(2, 4, 2, 200, 260, 32, torch.float32, "cpu")
    lay = _layout((2, 1), 200, 260, 64, causal="bottom_right", window=90)

    def run():
        out, lse = sa.sparse_attention(q, k, v, lay, return_lse=True)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    fused = run()
    monkeypatch.setitem(cpu._PROBED, "fused", False)
    monkeypatch.setenv("SPARSEATTN_CPU_KERNEL", "0")
    for a, b in zip(fused, run()):
        assert torch.allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_kv_plane_backward_any_thread_count(threads):
    """B=1 with one KV head: the kernel's backward has one (batch, KV head) job, so with 2+ threads it
    splits by query block, each thread adding dK/dV into its own copy (summed at the end); with one
    thread, not. Both against the oracle (use_lse: gradients through the LSE too)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(8)
        q, k, v = attention_inputs(1, 4, 1, 200, 230, 32, torch.float32, "cpu")
        check_attention(q, k, v, _layout((1, 4), 200, 230, 64, causal="bottom_right", window=150), "cpu")
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("softcap", [0.7, 30.0])
def test_softcap(softcap):
    """Softcap (not additive): in the kernel (tanh after the scores, its derivative in the backward)
    and on the gather path (matmuls); output, LSE and gradients against the oracle."""
    torch.manual_seed(9)
    q, k, v = (torch.randn(1, 4, n, 32, requires_grad=True) for n in (150, 190, 190))
    q.data *= 3   # scores of up to ~30: both branches of the kernel's tanh
    lay = _layout((1, 4), 150, 190, 32, causal="bottom_right")
    out, lse = sa.sparse_attention(q, k, v, lay, softcap=softcap, return_lse=True)
    ref, rl = sa.reference.attention(q.double(), k.double(), v.double(), mask=lay.to_dense_mask(), softcap=softcap,
                                     return_lse=True)
    assert torch.allclose(out.double(), ref, atol=2e-5)
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin) and torch.allclose(lse[fin].double(), rl[fin], atol=2e-5)
    do = torch.randn_like(out)
    got = torch.autograd.grad((out * do).sum() + lse.nan_to_num(neginf=0).sum(), (q, k, v))
    want = torch.autograd.grad((ref * do.double()).sum() + rl.nan_to_num(neginf=0).sum(), (q, k, v))
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w.double(), atol=1e-4, rtol=1e-4), (g.double() - w.double()).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """fp16 / bf16 inputs compute in fp32 (converted once per call), GQA, non-contiguous inputs."""
    torch.manual_seed(7)
    q, k, v = attention_inputs(1, 4, 2, 150, 190, 32, dtype, "cpu", non_contiguous=True)
    check_attention(q, k, v, _layout((1, 4), 150, 190, 32, causal="bottom_right", window=70), "cpu")


def test_kernel_is_built_and_used(_cpu_path, monkeypatch):
    """The kernel is built (the fixture fails the test where a C++ compiler exists and the build did
    not work), and sparse_attention's CPU path calls it forward and backward."""
    if _cpu_path == "gather":
        assert cpu_kernel.ops() is None and cpu_kernel.unavailable_reason() == "SPARSEATTN_CPU_KERNEL=0"
        return
    assert cpu_kernel.unavailable_reason() is None
    ops, calls = cpu_kernel.ops(), []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    monkeypatch.setattr(cpu_kernel, "ops", lambda: Spy())
    q, k, v = attention_inputs(1, 2, 2, 128, 128, 16, torch.float32, "cpu")
    out = sa.sparse_attention(q, k, v, _layout((1, 2), 128, 128, 32, causal="top_left"))
    out.sum().backward()
    assert "fwd" in calls and "bwd" in calls


def test_kernel_rejects_bad_lists(_cpu_path):
    """The kernel checks every listed block and entry before reading: an error, no stray read."""
    if _cpu_path == "gather":
        return
    ops = cpu_kernel.ops()
    q, k, v = torch.randn(1, 3, 16, 8), torch.randn(1, 4, 16, 8), torch.randn(1, 4, 16, 8)
    out, lse = torch.empty(1, 3, 16, 8), torch.empty(1, 3, 16)
    ent, cnt = torch.tensor([0, 2]), torch.tensor([1, 1])
    for blocks, e in ((torch.tensor([[1], [4]]), ent), (torch.tensor([[1], [-1]]), ent),
                      (torch.tensor([[1], [2]]), torch.tensor([0, 3]))):
        with pytest.raises(RuntimeError, match="out of range"):
            ops.fwd(q, k, v, e, cnt, blocks, None, False, 1.0, 0.0, False, out, lse)
    ops.fwd(q, k, v, ent, cnt, torch.tensor([[1], [3]]), None, False, 1.0, 0.0, False, out, lse)   # in range: runs


@pytest.mark.parametrize("layout", [False, True])
def test_decode_batched_ignores_rows_past_lengths(layout):
    """Decode of ragged lengths, GQA and Lq > 1 on an unpaged cache: rows past each length are
    never used (NaN there changes nothing), also where the dense cache is read as a view."""
    torch.manual_seed(6)
    B, Hq, Hkv, Lq, Lmax, D = 3, 6, 2, 3, 300, 32
    q = torch.randn(B, Hq, Lq, D)
    k, v = torch.randn(B, Hkv, Lmax, D), torch.randn(B, Hkv, Lmax, D)
    lens = torch.tensor([300, 77, 150], dtype=torch.int32)
    lay = None
    if layout:
        bm = torch.rand(1, Hq, 1, math.ceil(Lmax / 64)) < 0.6
        bm[..., -1] = True
        lay = sa.BlockLayout.from_block_mask(bm, (16, 64), (Lq, Lmax))
    out, lse = sa.decode_attention(q, k, v, lay, cache_seqlens=lens, return_lse=True)
    ref, rl = sa.reference.decode_attention(q, k, v, lay, cache_seqlens=lens, return_lse=True)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin) and torch.allclose(lse[fin].double(), rl[fin], atol=1e-5)
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):
        k2[b, :, n:], v2[b, :, n:] = float("nan"), float("nan")
    assert torch.equal(sa.decode_attention(q, k2, v2, lay, cache_seqlens=lens), out)
