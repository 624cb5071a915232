"""decode_attention: the CPU path (and the Triton fallback, through the interpreter) against the
float64 oracle, and every input check. The CUDA kernels are tested in test_cuda_extension.py."""
import math

import pytest
import torch

import sparseattn as sa
from sparseattn import reference
from sparseattn.ops.decode.cpu import decode_attention_cpu as _decode_cpu
from sparseattn.ops.decode.op import _decode_triton

from utils import assert_oracle, randn

CPU_DTYPES = [torch.float16, torch.float32]


def _inputs(B, Hq, Hkv, Lq, Lmax, D, dtype, device="cpu"):
    q = torch.randn(B, Hq, Lq, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, Lmax, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, Lmax, D, device=device).to(dtype)
    return q, k, v


def _ragged(B, Lmax, Lq, device="cpu"):
    """Fresh lengths in [0, Lmax], always including Lmax and one shorter than Lq when B allows."""
    lens = torch.randint(Lq, Lmax + 1, (B,))
    lens[0] = Lmax
    if B > 2:
        lens[-1] = torch.randint(0, Lq, ()).item()  # rows before the sequence start see nothing
    return lens.to(torch.int32).to(device)


def _random_layout(B, Hq, Lq, Lmax, bk, per_batch, per_head, density=0.4):
    nk = math.ceil(Lmax / bk)
    bm = torch.rand(B if per_batch else 1, Hq if per_head else 1, 1, nk) < density
    return sa.BlockLayout.from_block_mask(bm, (16, bk), (Lq, Lmax))


def _check(name, q, k, v, layout, lens, out, lse):
    ref, ref_lse = reference.decode_attention(q, k, v, layout, cache_seqlens=lens, return_lse=True)
    base = reference.decode_attention(q, k, v, layout, cache_seqlens=lens, dtype=q.dtype)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_oracle(name, out, ref, base)
    # LSE: same -inf rows, close elsewhere (it is computed in fp32 from fp32 scores).
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{name}: -inf rows of lse differ"
    fin = torch.isfinite(ref_lse)
    tol = 2e-3 if q.dtype != torch.float32 else 1e-4
    assert torch.allclose(lse[fin].double(), ref_lse[fin], atol=tol, rtol=tol), f"{name}: lse"
    empty = torch.isneginf(ref_lse)
    assert (out[empty] == 0).all(), f"{name}: rows that see no key must be 0"


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("Lq", [1, 5, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("kind", ["dense", "full-length", "layout", "per-head layout"])
def test_decode_cpu_matches_oracle(dtype, Lq, heads, kind):
    Hq, Hkv = heads
    B, Lmax, D = 3, 200, 32
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, dtype)
    lens = None if kind == "full-length" else _ragged(B, Lmax, Lq)
    layout = None
    if kind == "layout":
        layout = _random_layout(B, Hq, Lq, Lmax, 64, per_batch=True, per_head=False)
    elif kind == "per-head layout":
        layout = _random_layout(B, Hq, Lq, Lmax, 16, per_batch=False, per_head=True)
    out, lse = sa.decode_attention(q, k, v, layout, cache_seqlens=lens, return_lse=True)
    assert sa.last_backend() == "cpu"
    _check(f"decode cpu {kind}", q, k, v, layout, lens, out, lse)


def test_decode_cpu_long_cache_chunks_and_scale():
    """More keys than one CPU chunk, a custom scale, a strided q."""
    B, Hq, Hkv, Lq, Lmax, D = 2, 4, 2, 2, 20000, 16
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, torch.float32)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    lens = torch.tensor([Lmax, 12345], dtype=torch.int32)
    layout = _random_layout(B, Hq, Lq, Lmax, 128, per_batch=True, per_head=True, density=0.7)
    for lay in (None, layout):
        out, lse = sa.decode_attention(q, k, v, lay, cache_seqlens=lens, scale=0.3, return_lse=True)
        ref, ref_lse = reference.decode_attention(q, k, v, lay, cache_seqlens=lens, scale=0.3, return_lse=True)
        base = reference.decode_attention(q, k, v, lay, cache_seqlens=lens, scale=0.3, dtype=torch.float32)
        assert_oracle("decode long", out, ref, base)
        assert torch.allclose(lse.double(), ref_lse, atol=1e-4)


def test_decode_oracle_is_sdpa_on_the_prefix():
    """The oracle itself: one query token at the end of each sequence == torch SDPA over its prefix."""
    B, H, Lmax, D = 3, 2, 50, 8
    q, k, v = _inputs(B, H, H, 1, Lmax, D, torch.float64)
    lens = torch.tensor([50, 17, 1], dtype=torch.int32)
    ref = reference.decode_attention(q, k, v, cache_seqlens=lens)
    for b, n in enumerate(lens.tolist()):
        want = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        assert torch.allclose(ref[b:b + 1], want)


def test_decode_pattern_object_and_defaults():
    class Pattern:
        def decode_layout(self, lq, lk, device):
            bm = torch.zeros(1, 1, 1, math.ceil(lk / 32), dtype=torch.bool)
            bm[..., ::2] = True
            return sa.BlockLayout.from_block_mask(bm, (16, 32), (lq, lk))

    q, k, v = _inputs(2, 4, 2, 3, 100, 16, torch.float32)
    out = sa.decode_attention(q, k, v, Pattern())
    layout = Pattern().decode_layout(3, 100, "cpu")
    ref = reference.decode_attention(q, k, v, layout)
    assert_oracle("decode pattern", out, ref, reference.decode_attention(q, k, v, layout, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "ragged", "layout bk16"])
def test_decode_triton_fallback_matches_oracle(kind, dtype):
    """The path CUDA tensors take without the extension, run here through the Triton interpreter."""
    if not sa._dispatch.interpreter_on():
        pytest.skip("needs the Triton interpreter (CPU) or a GPU")
    B, Hq, Hkv, Lq, Lmax, D = 2, 4, 2, 4, 150, 16
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, dtype)
    lens = None if kind == "dense" else torch.tensor([150, 3], dtype=torch.int32)
    layout = _random_layout(B, Hq, Lq, Lmax, 16, True, True, 0.5) if kind == "layout bk16" else None
    out, lse = _decode_triton(q, k, v, lens, layout, 1 / math.sqrt(D))
    _check(f"decode triton {kind}", q, k, v, layout, lens, out, lse)


def test_decode_cpu_internal_matches_public():
    """_decode_cpu with no block list and with the all-blocks list agree (the gather is exact)."""
    B, Hq, Hkv, Lq, Lmax, D = 2, 2, 1, 2, 130, 8
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, torch.float32)
    lens = torch.tensor([130, 64], dtype=torch.int32)
    o1, l1 = _decode_cpu(q, k, v, lens, None, 64, None, 0.5)
    nk = 3
    blocks = (torch.tensor([[3], [1]], dtype=torch.int32), torch.arange(nk, dtype=torch.int32).expand(2, 1, nk))
    o2, l2 = _decode_cpu(q, k, v, lens, blocks, 64, None, 0.5)
    assert torch.allclose(o1, o2, atol=1e-6) and torch.allclose(l1, l2, atol=1e-6)


# ----------------------------------------------------------------------------- bad input
def _ok(B=2, Hq=4, Hkv=2, Lq=2, Lmax=64, D=16, dtype=torch.float32):
    return _inputs(B, Hq, Hkv, Lq, Lmax, D, dtype)


@pytest.mark.parametrize("case, exc, words", [
    ("int q", TypeError, ["q", "floating point"]),
    ("float64", TypeError, ["q", "float16, bfloat16 or float32", "float64"]),
    ("mixed dtypes", TypeError, ["k_cache", "one dtype"]),
    ("device", ValueError, ["one device"]),
    ("3-D q", ValueError, ["q", "4 dims"]),
    ("Lq 17", ValueError, ["Lq", "16", "17"]),
    ("batch", ValueError, ["batch size"]),
    ("gqa", ValueError, ["divisible"]),
    ("head dim", ValueError, ["head dim"]),
    ("seqlens int64", TypeError, ["cache_seqlens", "int32", "int64"]),
    ("seqlens list", TypeError, ["cache_seqlens", "list"]),
    ("seqlens shape", ValueError, ["cache_seqlens", "[2]"]),
    ("seqlens > Lmax", ValueError, ["cache_seqlens", "[0, 64]", "65"]),
    ("seqlens < 0", ValueError, ["cache_seqlens", "-1"]),
    ("seqlens device", ValueError, ["cache_seqlens", "device"]),
    ("layout lengths", ValueError, ["layout_or_pattern", "(2, 64)", "(2, 128)"]),
    ("layout full-length", ValueError, ["layout_or_pattern", "(2, 64)", "(64, 64)"]),
    ("layout batch", ValueError, ["layout_or_pattern", "[1|2, 1|4"]),
    ("layout mask", ValueError, ["layout_or_pattern", "element mask"]),
    ("layout type", TypeError, ["layout_or_pattern", "str"]),
])
def test_decode_bad_input(case, exc, words):
    q, k, v = _ok()
    kw = {}
    layout = None
    if case == "int q":
        q = q.to(torch.int32)
    elif case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "mixed dtypes":
        k = k.half()
    elif case == "device":
        k = k.to("meta")
    elif case == "3-D q":
        q = q[0]
    elif case == "Lq 17":
        q = torch.randn(2, 4, 17, 16)
    elif case == "batch":
        q = torch.randn(3, 4, 2, 16)
    elif case == "gqa":
        q = torch.randn(2, 3, 2, 16)
    elif case == "head dim":
        q, k, v = _ok(D=264)
    elif case == "seqlens int64":
        kw["cache_seqlens"] = torch.tensor([3, 4])
    elif case == "seqlens list":
        kw["cache_seqlens"] = [3, 4]
    elif case == "seqlens shape":
        kw["cache_seqlens"] = torch.tensor([3, 4, 5], dtype=torch.int32)
    elif case == "seqlens > Lmax":
        kw["cache_seqlens"] = torch.tensor([3, 65], dtype=torch.int32)
    elif case == "seqlens < 0":
        kw["cache_seqlens"] = torch.tensor([-1, 5], dtype=torch.int32)
    elif case == "seqlens device":
        kw["cache_seqlens"] = torch.tensor([3, 4], dtype=torch.int32, device="meta")
    elif case == "layout lengths":
        layout = sa.BlockLayout.from_block_mask(torch.ones(1, 1, 1, 2, dtype=torch.bool), (16, 64), (2, 128))
    elif case == "layout full-length":
        layout = sa.BlockLayout.from_block_mask(torch.ones(1, 1, 4, 1, dtype=torch.bool), (16, 64), (64, 64))
    elif case == "layout batch":
        layout = sa.BlockLayout.from_block_mask(torch.ones(3, 1, 1, 1, dtype=torch.bool), (16, 64), (2, 64))
    elif case == "layout mask":
        layout = sa.BlockLayout.from_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), (16, 64), (2, 64),
                                                mask=torch.rand(1, 1, 2, 64) < 0.5)
    elif case == "layout type":
        layout = "causal"
    with pytest.raises(exc) as info:
        sa.decode_attention(q, k, v, layout, **kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{case}: {w!r} not in {msg!r}"


@pytest.mark.parametrize("name", ["window_sinks", "power"])
def test_reference_takes_pattern_objects(name):
    """The oracle takes what the op takes: pattern objects, with ragged lengths."""
    B, Hq, Hkv, Lq, Lmax, D = 3, 2, 1, 2, 200, 32
    p = {"window_sinks": sa.SlidingWindow(37, sinks=5), "power": sa.PowerAttention(64)}[name]
    q = randn(B, Hq, Lq, D, device="cpu")
    k, v = randn(B, Hkv, Lmax, D, device="cpu"), randn(B, Hkv, Lmax, D, device="cpu")
    lens = torch.tensor([200, 130, 1], dtype=torch.int32)
    out = sa.decode_attention(q, k, v, p, cache_seqlens=lens)
    ref = reference.decode_attention(q, k, v, p, cache_seqlens=lens)
    base = reference.decode_attention(q, k, v, p, cache_seqlens=lens, dtype=q.dtype)
    assert_oracle(f"decode {p}", out, ref, base)
    # a token-exact pattern moves with the length: its definition, written out for one sequence
    n = 130
    rows = p.dense_mask(Lq, n)[0].expand(Hq, Lq, n)
    mask = torch.zeros(Hq, Lq, Lmax, dtype=torch.bool)
    mask[..., :n] = rows & torch.ones(Lq, n, dtype=torch.bool).tril(n - Lq)
    assert torch.equal(reference.decode_mask(Lq, Lmax, lens, p, B)[1].expand(Hq, Lq, Lmax), mask)


def _families(Hq, Lq, Lmax, bs):
    torch.manual_seed(1)
    mm = sa.BlockSparse.from_mask_mod(lambda b, h, qi, ki: (ki % 3) != 0, None, None, Lq, Lmax, bs)
    return {"block mask": sa.BlockSparse(torch.rand(1, Hq, math.ceil(Lmax / bs), math.ceil(Lmax / bs)) < 0.5, bs),
            "mask_mod": mm, "mask_mod layout": mm.decode_layout(Lq, Lmax),
            "power": sa.PowerAttention(bs, 1, 1), "window": sa.SlidingWindow(40, sinks=4),
            "per head": sa.PerHead([sa.SlidingWindow(30), sa.PowerAttention(bs, 1, 1)])}


@pytest.mark.parametrize("lens", [None, [288, 288], [288, 134], [200, 3]])
@pytest.mark.parametrize("name", ["block mask", "mask_mod", "mask_mod layout", "power", "window", "per head"])
def test_pattern_families_with_ragged_lengths(name, lens):
    """Every pattern family at a block-aligned Lmax (288 = 4.5 blocks of 64 is not; 4 rows of the
    last block are), equal and ragged lengths, against the oracle. Found by the decode fuzzer:
    PowerAttention with ragged lengths read other blocks than its oracle (0.19 off) once the Lmax
    layout had no tile bitmasks, a BlockSparse pattern with ragged lengths raised, and a layout with
    tile bitmasks was evaluated exactly by the op but as whole tiles by the oracle (0.22 off)."""
    B, Hq, Hkv, Lq, Lmax, D = 2, 2, 2, 4, 288, 16
    p = _families(Hq, Lq, Lmax, 64)[name]
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, torch.float32)
    lens_t = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    if name == "mask_mod layout" and lens and lens[1] != Lmax:   # a layout is built for one length
        with pytest.raises(ValueError, match="pass the pattern object itself"):
            sa.decode_attention(q, k, v, p, cache_seqlens=lens_t)
        return
    out, lse = sa.decode_attention(q, k, v, p, cache_seqlens=lens_t, return_lse=True)
    _check(f"decode {name} {lens}", q, k, v, p, lens_t, out, lse)


def test_which_patterns_move_with_the_length():
    """The oracle's definition per family, written out for a sequence of 134 keys in a cache of
    288: a position-relative pattern is its own definition at 134 keys; a fixed block table is
    its layout for 288 keys, cut at 134 (bottom-right causal at each sequence's own length)."""
    Lq, Lmax, n = 4, 288, 134
    lens = torch.tensor([n], dtype=torch.int32)
    causal = torch.zeros(Lq, Lmax, dtype=torch.bool)
    causal[:, :n] = torch.ones(Lq, n, dtype=torch.bool).tril(n - Lq)
    fam = _families(1, Lq, Lmax, 64)
    for name in ("power", "window"):
        rows = torch.nn.functional.pad(fam[name].dense_mask(Lq, n)[0, 0], (0, Lmax - n))
        assert torch.equal(reference.decode_mask(Lq, Lmax, lens, fam[name])[0, 0], rows & causal), name
    blocks = fam["block mask"].decode_layout(Lq, Lmax).tile_masks()
    whole = (blocks[0] | blocks[1])[0, 0, 0].repeat_interleave(64)[:Lmax]
    assert torch.equal(reference.decode_mask(Lq, Lmax, lens, fam["block mask"])[0, 0], whole & causal)
    assert not fam["block mask"].moves_with_length and fam["power"].moves_with_length
    assert fam["per head"].moves_with_length and not fam["mask_mod"].moves_with_length


def test_block_sets_are_built_once_per_layout_and_lengths(monkeypatch, cpu_route):
    """A decode loop reusing one layout builds its block sets once per (B, heads, lengths) where
    the lengths need no device read: no cache_seqlens (every block, on any device) or CPU lengths;
    each cached result is the one the layout and lengths give (fresh lengths: a new entry). The C++
    kernel cuts the lists at each length itself: once per layout, whatever the lengths."""
    from sparseattn.ops.decode import op as dop
    built = []
    real = dop._block_sets
    monkeypatch.setattr(dop, "_block_sets", lambda *a: built.append(a[-1] if a[-1] is None else a[-1].tolist())
                        or real(*a))
    q, k, v = _inputs(2, 4, 2, 1, 200, 16, torch.float32)
    layout = _random_layout(2, 4, 1, 200, 32, True, True)
    lens = torch.tensor([200, 77], dtype=torch.int32)
    for _ in range(3):
        for cache_seqlens in (None, lens):
            out, lse = sa.decode_attention(q, k, v, layout, cache_seqlens=cache_seqlens, return_lse=True)
            _check("cached block sets", q, k, v, layout, cache_seqlens, out, lse)
    fresh = torch.tensor([5, 77], dtype=torch.int32)
    out, lse = sa.decode_attention(q, k, v, layout, cache_seqlens=fresh, return_lse=True)
    _check("cached block sets", q, k, v, layout, fresh, out, lse)
    if cpu_route == "kernel":
        assert built == [None]
    else:
        assert built == [None, [200, 77], [5, 77]]


def test_block_sets_cached_on_the_cuda_backend_without_lengths(monkeypatch):
    """The CUDA decode backend's call (stubbed here: no GPU) reuses the block sets when there are
    no cache_seqlens (the layout decode case the first GPU run measured as host-bound); before,
    only the CPU path cached them."""
    from sparseattn.ops.decode import op as dop
    built, launched = [], []
    real = dop._block_sets
    monkeypatch.setattr(dop, "_block_sets", lambda *a: built.append(1) or real(*a))
    monkeypatch.setattr(dop, "decode_backend", lambda q: "cuda")
    monkeypatch.setattr(dop, "decode_attention_cuda", lambda q, k, v, seqlens, blk_num, blk_idx, *a: launched.append(
        (blk_num, blk_idx)) or (torch.zeros_like(q), torch.zeros(q.shape[:3])))
    q, k, v = _inputs(1, 4, 2, 1, 256, 64, torch.float16)
    layout = _random_layout(1, 4, 1, 256, 64, False, False)
    for _ in range(3):
        sa.decode_attention(q, k, v, layout)
    assert len(built) == 1 and len(launched) == 3
    assert all(n is launched[0][0] and i is launched[0][1] for n, i in launched)
