"""Static sparse patterns (issue 4): dense_mask against element-by-element definitions written
here, layouts against dense_mask, sparse_attention / decode_attention against the float64 oracle,
from_flex against flex_attention, layout build cost at 128K, bad input."""
import math

import pytest
import torch

import sparseattn as sa
from sparseattn.ops.decode import op as decode_module
from sparseattn import reference

from utils import DEVICE, DTYPES, assert_oracle, randn


# ----------------------------------------------------------------------------- independent definitions
def _is_pow2_or_zero(d):
    return d == 0 or d in {2 ** k for k in range(40)}


def _loop_mask(Lq, Lk, visible):
    """bool [Lq, Lk] from visible(query position i, key j) with queries the last Lq positions."""
    m = torch.zeros(Lq, Lk, dtype=torch.bool)
    for r in range(Lq):
        i = Lk - Lq + r
        for j in range(Lk):
            m[r, j] = bool(visible(i, j))
    return m


def _sliding(window, sinks):
    return lambda i, j: j <= i and (i - j < window or j < sinks)


def _power(b, wb, sb):
    def vis(i, j):
        if j > i:
            return False
        I, J = i // b, j // b
        return _is_pow2_or_zero(I - J) or I - J < wb or J < sb
    return vis


LENS = [(1, 1), (63, 63), (97, 200), (200, 97), (130, 130), (1, 150)]


@pytest.mark.parametrize("Lq,Lk", LENS)
@pytest.mark.parametrize("window,sinks", [(1, 0), (1, 3), (17, 0), (40, 5), (10 ** 6, 0), (300, 64)])
def test_sliding_window_dense_mask_definition(Lq, Lk, window, sinks):
    p = sa.SlidingWindow(window, sinks=sinks)
    assert torch.equal(p.dense_mask(Lq, Lk)[0, 0], _loop_mask(Lq, Lk, _sliding(window, sinks)))


@pytest.mark.parametrize("Lq,Lk", LENS)
@pytest.mark.parametrize("b,wb,sb", [(16, 1, 1), (16, 3, 0), (32, 2, 2), (64, 1, 1)])
def test_power_attention_dense_mask_definition(Lq, Lk, b, wb, sb):
    p = sa.PowerAttention(block_size=b, window_blocks=wb, sink_blocks=sb)
    assert torch.equal(p.dense_mask(Lq, Lk)[0, 0], _loop_mask(Lq, Lk, _power(b, wb, sb)))


def test_block_sparse_dense_mask_definition():
    bs = 16
    for Lq, Lk in [(100, 100), (40, 100), (100, 40)]:
        nk = math.ceil(Lk / bs)
        positions = Lq <= Lk
        nq = nk if positions else math.ceil(Lq / bs)
        bm = torch.rand(2, 3, nq, nk) < 0.4
        dm = sa.BlockSparse(bm, bs).dense_mask(Lq, Lk)
        assert dm.shape == (2, 3, Lq, Lk)
        for b in range(2):
            for h in range(3):
                off = Lk - Lq if positions else 0
                want = _loop_mask(Lq, Lk, lambda i, j: bool(bm[b, h, (i - (Lk - Lq) + off) // bs, j // bs]))
                assert torch.equal(dm[b, h], want)


def _doc_mask_mod(B, L, causal=True):
    doc = torch.randint(0, 4, (B, L)).sort(-1).values

    def mask_mod(b, h, q, kv):
        m = doc[b, q] == doc[b, kv]
        return m & (kv <= q) if causal else m
    return mask_mod, lambda b, h, r, j: bool(doc[b, r] == doc[b, j]) and (not causal or j <= r)


def _prefix_lm(prefix):
    return (lambda b, h, q, kv: (kv <= q) | (kv < prefix)), (lambda b, h, r, j: j <= r or j < prefix)


def _random_blocks(H, L, bs=32):
    tbl = torch.rand(H, math.ceil(L / bs), math.ceil(L / bs)) < 0.3
    return (lambda b, h, q, kv: tbl[h, q // bs, kv // bs]), (lambda b, h, r, j: bool(tbl[h, r // bs, j // bs]))


def test_mask_mod_dense_mask_definition():
    L = 90
    for mm, ref in (_doc_mask_mod(2, L), _prefix_lm(20), _random_blocks(3, L)):
        p = sa.BlockSparse.from_mask_mod(mm, 2, 3, L, L, block_size=16)
        dm = p.dense_mask(L, L).expand(2, 3, L, L)
        for b in range(2):
            for h in range(3):
                want = torch.tensor([[ref(b, h, r, j) for j in range(L)] for r in range(L)])
                assert torch.equal(dm[b, h], want)


# ----------------------------------------------------------------------------- layouts vs dense_mask
def _patterns_for(Lq, Lk):
    doc, _ = _doc_mask_mod(2, max(Lq, Lk))
    prefix, _ = _prefix_lm(Lk // 3)
    rnd, _ = _random_blocks(4, max(Lq, Lk))
    nk = math.ceil(Lk / 64)
    pats = [sa.SlidingWindow(1), sa.SlidingWindow(2), sa.SlidingWindow(129, sinks=1), sa.SlidingWindow(33, sinks=5),
            sa.SlidingWindow(10 ** 5, sinks=1),
            sa.SlidingWindow(130), sa.PowerAttention(), sa.PowerAttention(16, 3, 2), sa.PowerAttention(32, 1, 0),
            sa.PowerAttention(256, 2, 1),
            sa.BlockSparse(torch.rand(2, 4, nk, nk) < 0.4, 64) if Lq <= Lk else
            sa.BlockSparse(torch.rand(1, 4, math.ceil(Lq / 64), nk) < 0.4, 64),
            sa.BlockSparse(torch.rand(1, 1, math.ceil(Lk / 16), math.ceil(Lk / 16)) < 0.3, 16) if Lq <= Lk else None,
            sa.BlockSparse(torch.rand(1, 4, math.ceil(Lk / 256), math.ceil(Lk / 256)) < 0.6, 256) if Lq <= Lk else None,
            sa.BlockSparse.from_mask_mod(doc, 2, None, Lq, Lk, block_size=64) if Lq == Lk else None,
            sa.BlockSparse.from_mask_mod(prefix, None, None, Lq, Lk, block_size=32),
            sa.BlockSparse.from_mask_mod(rnd, None, 4, Lq, Lk, block_size=128),
            sa.PerHead([sa.SlidingWindow(20, 2), sa.PowerAttention(32), sa.SlidingWindow(10 ** 5),
                        sa.SlidingWindow(20, 2)]),
            sa.PerHead([sa.SlidingWindow(50, 4), sa.BlockSparse.from_mask_mod(prefix, None, None, Lq, Lk),
                        sa.PowerAttention(64, 2), sa.SlidingWindow(50, 4)]),
            sa.PerHead([sa.BlockSparse.from_mask_mod(doc, 2, None, Lq, Lk), sa.SlidingWindow(10 ** 6),
                        sa.PowerAttention(16)]) if Lq == Lk else None]
    return [p for p in pats if p is not None]


@pytest.mark.parametrize("Lq,Lk", [(200, 200), (77, 300), (300, 77), (1, 333), (256, 256)])
def test_layout_matches_dense_mask(Lq, Lk):
    for p in _patterns_for(Lq, Lk):
        lay = p.layout(Lq, Lk, "cpu")
        dm = p.dense_mask(Lq, Lk)
        got = lay.to_dense_mask()
        assert lay.block_size[0] in (64, 128) and lay.block_size[1] in (64, 128), p
        assert torch.equal(dm.expand_as(got), got), f"{p} at {(Lq, Lk)}"
        assert abs(lay.density - got.double().mean().item()) < 1e-9, p


def _nbits(layout):
    return 0 if layout.bits is None else layout.bits.shape[0]


def test_structured_layouts_use_in_kernel_kinds():
    """Window edges and sinks are in-kernel bounds, not bitmasks; aligned PowerAttention has no bits."""
    lay = sa.SlidingWindow(100, sinks=7).layout(500, 500)
    assert lay.window == 100 and lay.sinks == 7 and _nbits(lay) == 0 and lay.causal_offset == 0
    lay = sa.PowerAttention(64).layout(320, 512)      # query positions start at 192 = 3 blocks
    assert _nbits(lay) == 0 and lay.causal_offset == 192
    lay = sa.PowerAttention(64).layout(300, 500)      # rows straddle pattern blocks: bits, exact
    assert _nbits(lay) > 0
    lay = sa.PowerAttention(256, 2, 1).layout(1000, 1000)
    assert _nbits(lay) == 0 and lay.block_size == (128, 128)


# ----------------------------------------------------------------------------- kernels vs oracle
def _check_attention(p, B, Hq, Hkv, Lq, Lk, D, dtype, grad=True):
    q = randn(B, Hq, Lq, D, dtype=dtype, requires_grad=grad)
    k = randn(B, Hkv, Lk, D, dtype=dtype, requires_grad=grad)
    v = randn(B, Hkv, Lk, D, dtype=dtype, requires_grad=grad)
    mask = p.dense_mask(Lq, Lk).to(DEVICE)
    out = sa.sparse_attention(q, k, v, p.layout(Lq, Lk, q.device))
    ref = reference.attention(q, k, v, mask=mask)
    base = reference.attention(q, k, v, mask=mask, dtype=dtype)
    assert_oracle(f"{p} fwd", out, ref, base)
    if not grad:
        return
    do = randn(*out.shape, dtype=dtype)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, (q, k, v), do.double())
    same = torch.autograd.grad(base, (q, k, v), do)
    for name, g, w, s in zip("qkv", got, want, same):
        assert_oracle(f"{p} d{name}", g, w, s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["window", "window1", "sinks_big_window", "power", "power_ragged"])
def test_structured_patterns_vs_oracle(case, dtype):
    p, B, Hq, Hkv, Lq, Lk = {
        "window": (sa.SlidingWindow(70, sinks=3), 2, 4, 2, 200, 200),
        "window1": (sa.SlidingWindow(1), 1, 2, 1, 100, 163),
        "sinks_big_window": (sa.SlidingWindow(10 ** 4, sinks=9), 1, 2, 2, 97, 97),
        "power": (sa.PowerAttention(64), 1, 2, 1, 320, 320),
        "power_ragged": (sa.PowerAttention(32, window_blocks=2, sink_blocks=1), 2, 2, 1, 150, 233),
    }[case]
    _check_attention(p, B, Hq, Hkv, Lq, Lk, 32, dtype)


@pytest.mark.parametrize("case", ["doc", "prefix", "random_blocks", "block_mask", "per_head"])
def test_block_sparse_and_per_head_vs_oracle(case):
    Lq = Lk = 192
    if case == "doc":
        p = sa.BlockSparse.from_mask_mod(_doc_mask_mod(2, Lq)[0], 2, None, Lq, Lk)
    elif case == "prefix":
        p = sa.BlockSparse.from_mask_mod(_prefix_lm(50)[0], None, None, 120, Lk, block_size=16)
        Lq = 120
    elif case == "random_blocks":
        p = sa.BlockSparse.from_mask_mod(_random_blocks(4, Lq)[0], None, 4, Lq, Lk, block_size=32)
    elif case == "block_mask":
        p = sa.BlockSparse(torch.rand(2, 4, 3, 3) < 0.5, 64)
        Lq = 100    # queries are the last 100 of 192 positions
    else:
        p = sa.PerHead([sa.SlidingWindow(40, 2), sa.PowerAttention(32), sa.SlidingWindow(10 ** 6),
                        sa.BlockSparse.from_mask_mod(_prefix_lm(30)[0], None, None, Lq, Lk)])
    _check_attention(p, 2, 4, 2, Lq, Lk, 16, torch.float32)


def test_sparse_attention_accepts_pattern():
    """sa.sparse_attention(q, k, v, pattern) builds pattern.layout(Lq, Lk, q.device) itself."""
    p = sa.PerHead([sa.SlidingWindow(30, sinks=2), sa.PowerAttention(16), sa.SlidingWindow(10 ** 6),
                    sa.SlidingWindow(1)])
    q, k, v = randn(2, 4, 90, 16), randn(2, 2, 130, 16), randn(2, 2, 130, 16)
    out = sa.sparse_attention(q, k, v, p)
    mask = p.dense_mask(90, 130).to(DEVICE)
    assert_oracle("pattern", out, reference.attention(q, k, v, mask=mask),
                  reference.attention(q, k, v, mask=mask, dtype=q.dtype))
    with pytest.raises(ValueError, match="layout"):
        sa.sparse_attention(randn(1, 2, 90, 16), k[:1], v[:1], p)     # 4 heads of patterns, 2 query heads


# ----------------------------------------------------------------------------- FlexAttention
def test_from_flex_matches_flex_attention():
    """flex_attention (forward, compiled, CPU) against sparse_attention with from_flex."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    B, H, L, D = 2, 2, 200, 16
    mm, _ = _doc_mask_mod(B, L)
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    flex = torch.compile(fa.flex_attention)
    for bs in (64, (128, 64), 32):
        bm = fa.create_block_mask(mm, B, None, L, L, device="cpu", BLOCK_SIZE=bs)
        p = sa.BlockSparse.from_flex(bm)
        want = flex(q, k, v, block_mask=bm)
        got = sa.sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), p.layout(L, L, DEVICE)).cpu()
        assert (got - want).abs().max() < 1e-4, f"BLOCK_SIZE={bs}"
    # dense_mask of from_flex: the mask_mod inside listed blocks
    ref = torch.stack([torch.stack([
        torch.tensor([[bool(mm(torch.tensor(b), None, torch.tensor(r), torch.tensor(j))) for j in range(L)]
                      for r in range(L)])]) for b in range(B)])
    assert torch.equal(p.dense_mask(L, L), ref)


def test_from_flex_lengths_must_match():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    bm = fa.create_block_mask(lambda b, h, q, kv: kv <= q, None, None, 128, 256, device="cpu", BLOCK_SIZE=64)
    p = sa.BlockSparse.from_flex(bm)
    p.layout(128, 256)
    with pytest.raises(ValueError, match=r"\(128, 256\)"):
        p.layout(128, 200)
    with pytest.raises(ValueError, match="seq_lens"):
        sa.sparse_attention(*(torch.randn(1, 1, 64, 16) for _ in range(3)), p.layout(128, 256))


# ----------------------------------------------------------------------------- decode
@pytest.mark.parametrize("Lq", [1, 5])
@pytest.mark.parametrize("name", ["window", "window_sinks", "power", "block_mask", "per_head", "documents"])
def test_decode_with_patterns_vs_oracle(name, Lq, monkeypatch):
    masked = []
    monkeypatch.setattr(decode_module, "_decode_masked",
                        lambda *a, _f=decode_module._decode_masked: masked.append(1) or _f(*a))
    B, Hq, Hkv, Lmax, D = 2, 4, 2, 300, 32
    p = {"window": sa.SlidingWindow(64),
         "window_sinks": sa.SlidingWindow(37, sinks=5),
         "power": sa.PowerAttention(64, window_blocks=1, sink_blocks=1),
         "block_mask": sa.BlockSparse(torch.rand(1, Hq, 5, 5) < 0.5, 64),
         "per_head": sa.PerHead([sa.SlidingWindow(64), sa.PowerAttention(64)] * 2),
         "documents": sa.BlockSparse.from_mask_mod(_doc_mask_mod(B, Lmax)[0], B, None, Lmax, Lmax)}[name]
    q = randn(B, Hq, Lq, D, device="cpu")
    k, v = randn(B, Hkv, Lmax, D, device="cpu"), randn(B, Hkv, Lmax, D, device="cpu")
    # decode is always bottom-right causal on top of the pattern
    rows = p.dense_mask(Lmax, Lmax)[..., Lmax - Lq:, :] if name == "documents" else p.dense_mask(Lq, Lmax)
    mask = rows & torch.ones(Lq, Lmax, dtype=torch.bool).tril(Lmax - Lq)
    out = sa.decode_attention(q, k, v, p)
    ref = reference.attention(q, k, v, mask=mask)
    base = reference.attention(q, k, v, mask=mask, dtype=q.dtype)
    assert_oracle(f"decode {p}", out, ref, base)
    # One length for all sequences: a window runs the fused kernels on the pattern's own
    # bottom-right causal layout; only a non-causal layout with tile bitmasks needs the mask path.
    if name.startswith("window"):
        assert not masked, "a sliding window with one cache length took the element-mask path"
    if name == "documents":
        assert masked


@pytest.mark.parametrize("name", ["window_sinks", "power", "per_head"])
def test_decode_with_patterns_ragged_lengths(name):
    """Each sequence gets its pattern at its own length: row i of sequence b sits at position
    n_b - Lq + i (the blocks of a pattern move with each sequence's length)."""
    B, Hq, Hkv, Lq, Lmax, D = 3, 4, 2, 4, 300, 32
    p = {"window_sinks": sa.SlidingWindow(37, sinks=5), "power": sa.PowerAttention(32, window_blocks=1, sink_blocks=1),
         "per_head": sa.PerHead([sa.SlidingWindow(50), sa.PowerAttention(32)] * 2)}[name]
    lens = torch.tensor([300, 171, 2], dtype=torch.int32)
    q = randn(B, Hq, Lq, D, device="cpu")
    k, v = randn(B, Hkv, Lmax, D, device="cpu"), randn(B, Hkv, Lmax, D, device="cpu")
    mask = torch.zeros(B, Hq, Lq, Lmax, dtype=torch.bool)
    for b, n in enumerate(lens.tolist()):
        rows = torch.arange(n - Lq, n)  # absolute positions of the decode rows
        full = p.dense_mask(Lmax, Lmax).expand(1, Hq, Lmax, Lmax)[0]
        for i, pos in enumerate(rows.tolist()):
            if pos >= 0:
                mask[b, :, i, :n] = full[:, pos, :n]
    out = sa.decode_attention(q, k, v, p, cache_seqlens=lens)
    ref = reference.attention(q, k, v, mask=mask)
    base = reference.attention(q, k, v, mask=mask, dtype=q.dtype)
    assert_oracle(f"ragged decode {p}", out, ref, base)


def test_decode_rejects_windowed_layout_with_ragged_lengths():
    lay = sa.SlidingWindow(16).decode_layout(2, 64, "cpu")
    q, k = randn(2, 2, 2, 16, device="cpu"), randn(2, 2, 64, 16, device="cpu")
    with pytest.raises(ValueError, match="pass the pattern object"):
        sa.decode_attention(q, k, k, lay, cache_seqlens=torch.tensor([64, 30], dtype=torch.int32))


# ----------------------------------------------------------------------------- cost at 128K
@pytest.mark.parametrize("p", [sa.SlidingWindow(4096, sinks=4), sa.PowerAttention(64),
                               sa.PowerAttention(256, window_blocks=4, sink_blocks=1),
                               sa.PerHead([sa.SlidingWindow(2048, 64)] * 4),
                               sa.PerHead([sa.SlidingWindow(10 ** 9)] * 2 + [sa.PowerAttention(128)] * 2)])
def test_layout_build_128k(p):
    L = 128 * 1024
    lay = p.layout(L, L, "cpu")
    nq, nk = lay.num_blocks
    # lists proportional to the listed tiles: no dense nQ x nK (or L x L) tensor in the layout
    widest = max(lay.kv_indices.shape[-1], lay.full_kv_indices.shape[-1])
    assert widest <= 64 or isinstance(p, sa.PerHead), widest   # a dense causal head lists nQ blocks
    assert _nbits(lay) == 0 and lay.mask is None
    if not isinstance(p, sa.PerHead) or all(isinstance(s, sa.SlidingWindow) and s.window < L for s in p.patterns):
        assert int(lay.full_kv_num_blocks.sum() + lay.kv_num_blocks.sum()) < 64 * nq * lay.shape[1]
    # (no timing assert: the list widths and counts above are the O(listed tiles) guard)


def test_per_head_mixed_windows_128k():
    """Heads with different windows need bitmasks only on the tiles a head's own window cuts: the
    bits stay O(edge tiles), not O(listed tiles x 128 x 128)."""
    L = 128 * 1024
    p = sa.PerHead([sa.SlidingWindow(2048, sinks=64), sa.SlidingWindow(512, sinks=4)] * 2)
    lay = p.layout(L, L, "cpu")
    listed = int(lay.full_kv_num_blocks.sum() + lay.kv_num_blocks.sum())
    # At most 3 tiles per query row and head carry bits (the window's start straddles up to two
    # tiles, plus the sink tile), against ~18 listed tiles per row and head.
    assert 0 < _nbits(lay) <= 3 * lay.num_blocks[0] * 4, _nbits(lay)
    assert listed < 24 * lay.num_blocks[0] * 4   # (no timing assert: the bounds above are the O(.) guard)


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    with pytest.raises(ValueError, match="window"):
        sa.SlidingWindow(0)
    with pytest.raises(TypeError, match="window"):
        sa.SlidingWindow(2.5)
    with pytest.raises(ValueError, match="sinks"):
        sa.SlidingWindow(8, sinks=-1)
    for bad in (0, 8, 48, 100):
        with pytest.raises(ValueError, match="block_size"):
            sa.PowerAttention(block_size=bad)
        with pytest.raises(ValueError, match="block_size"):
            sa.BlockSparse(torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=bad)
    with pytest.raises(ValueError, match="window_blocks"):
        sa.PowerAttention(window_blocks=0)
    with pytest.raises(ValueError, match="sink_blocks"):
        sa.PowerAttention(sink_blocks=-1)
    with pytest.raises(TypeError, match="block_mask"):
        sa.BlockSparse(torch.ones(1, 1, 2, 2), 64)
    with pytest.raises(ValueError, match="block_mask"):
        sa.BlockSparse(torch.ones(2, 2, dtype=torch.bool), 64)
    with pytest.raises(ValueError, match="key blocks"):
        sa.BlockSparse(torch.ones(1, 1, 2, 2, dtype=torch.bool), 64).layout(128, 300)
    with pytest.raises(TypeError, match="mask_mod.*bool"):
        sa.BlockSparse.from_mask_mod(lambda b, h, q, kv: (q - kv).float(), None, None, 64, 64)
    with pytest.raises(TypeError, match="mask_mod"):
        sa.BlockSparse.from_mask_mod(lambda b, h, q, kv: True, None, None, 64, 64)
    with pytest.raises(ValueError, match=r"mask_mod.*broadcastable to \[1, 1, 64, 64\]"):
        sa.BlockSparse.from_mask_mod(lambda b, h, q, kv: torch.ones(3, 5, dtype=torch.bool), None, None, 64, 64)
    with pytest.raises(ValueError, match="seq_lens"):
        sa.BlockSparse.from_mask_mod(lambda b, h, q, kv: kv <= q, None, None, 64, 64).layout(64, 65)
    with pytest.raises(TypeError, match="flex_block_mask"):
        sa.BlockSparse.from_flex(torch.ones(3))
    with pytest.raises(TypeError, match="patterns"):
        sa.PerHead([])
    with pytest.raises(TypeError, match=r"patterns\[1\]"):
        sa.PerHead([sa.SlidingWindow(3), "x"])
    with pytest.raises(ValueError, match="one head"):
        sa.PerHead([sa.BlockSparse(torch.ones(1, 2, 1, 1, dtype=torch.bool), 64)]).layout(64, 64)


def test_per_head_count_mismatch_names_the_pattern():
    q = k = v = randn(1, 4, 64, 16)
    with pytest.raises(ValueError, match="PerHead has 3 patterns .* q has 4 heads"):
        sa.sparse_attention(q, k, v, sa.PerHead([sa.SlidingWindow(8)] * 3))


def test_layout_built_once_per_lengths(monkeypatch):
    """A pattern passed every step builds its layout once per (Lq, Lk, device), bounded."""
    p = sa.SlidingWindow(32, sinks=2)
    calls = []
    build = type(p)._new_layout
    monkeypatch.setattr(type(p), "_new_layout", lambda self, *a: calls.append(a) or build(self, *a))
    q = k = v = randn(1, 2, 96, 16)
    first = sa.sparse_attention(q, k, v, p)
    assert torch.equal(sa.sparse_attention(q, k, v, p), first)
    assert p.layout(96, 96, q.device) is p.layout(96, 96, q.device)
    assert len(calls) == 1
    for L in range(1, 2 * p.LAYOUT_CACHE):
        p.layout(L, L)
    assert len(p._layouts) == p.LAYOUT_CACHE
