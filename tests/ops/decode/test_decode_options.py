"""decode_attention's options: a paged KV cache (block_table), key padding, key bias, softcap and
ALiBi. The CPU path against the float64 oracle and against the same cache stored contiguously
(bitwise: both read the same rows and run the same arithmetic), the Triton path through the
interpreter (when sparse_attention / paged_sparse_attention take the options), and every input
check. The CUDA kernels are tested in tests/cuda/test_cuda_extension.py."""
import inspect
import math

import pytest
import torch

import sparseattn as sa
from sparseattn import reference
from sparseattn.ops.decode.naive import logical_cache
from sparseattn.ops.decode.op import _decode_triton

from utils import assert_oracle


def _paged(B, Hkv, Lmax, D, dtype, page_size, spare=3):
    """A paged cache of Lmax logical keys per sequence, pages shuffled with `spare` unused ones, and
    the same cache stored contiguously ``[B, Hkv, Lmax, D]``."""
    pages = B * (Lmax // page_size)
    num_pages = pages + spare
    k = torch.randn(num_pages, page_size, Hkv, D).to(dtype)
    v = torch.randn(num_pages, page_size, Hkv, D).to(dtype)
    table = torch.randperm(num_pages)[:pages].to(torch.int32).view(B, Lmax // page_size)
    return k, v, table, logical_cache(k, table), logical_cache(v, table)


def _lens(B, Lmax, Lq):
    lens = torch.randint(Lq, Lmax + 1, (B,))
    lens[0] = Lmax
    if B > 2:
        lens[-1] = torch.randint(0, Lq, ()).item()  # rows before the sequence start see nothing
    return lens.to(torch.int32)


def _options(B, Hq, Lmax, which, generator_dtype=torch.float32):
    """Fresh option tensors: softcap, ALiBi ([Hq] or [B, Hq]), key padding, key bias (with -inf)."""
    kw = {}
    if "softcap" in which:
        kw["softcap"] = 1.5  # small: tanh bends most scores
    if "alibi" in which:
        kw["alibi_slopes"] = torch.rand(Hq) * 0.3
    if "alibi_b" in which:
        kw["alibi_slopes"] = torch.rand(B, Hq) * 0.3
    if "padding" in which:
        kw["key_padding_mask"] = torch.rand(B, Lmax) < 0.8
    if "bias" in which:
        kb = torch.randn(B, Hq, Lmax, dtype=generator_dtype)
        kb[torch.rand(B, Hq, Lmax) < 0.1] = float("-inf")
        kw["key_bias"] = kb
    if "bias_shared" in which:
        kw["key_bias"] = torch.randn(1, 1, Lmax)
    return kw


def _check(name, q, k, v, layout, lens, out, lse, **kw):
    ref, ref_lse = reference.decode_attention(q, k, v, layout, cache_seqlens=lens, return_lse=True, **kw)
    base = reference.decode_attention(q, k, v, layout, cache_seqlens=lens, dtype=q.dtype, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_oracle(name, out, ref, base)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{name}: -inf rows of lse differ"
    fin = torch.isfinite(ref_lse)
    tol = 2e-3 if q.dtype != torch.float32 else 1e-4
    assert torch.allclose(lse[fin].double(), ref_lse[fin], atol=tol, rtol=tol), f"{name}: lse"
    assert (out[torch.isneginf(ref_lse)] == 0).all(), f"{name}: rows that see no key must be 0"


def _layout(B, Hq, Lq, Lmax, bk, density=0.5):
    bm = torch.rand(B, Hq, 1, math.ceil(Lmax / bk)) < density
    return sa.BlockLayout.from_block_mask(bm, (16, bk), (Lq, Lmax))


# ----------------------------------------------------------------------------- paged == contiguous
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("Lq", [1, 16])
@pytest.mark.parametrize("kind", ["dense", "layout", "window", "power", "options"])
def test_paged_cpu_is_the_contiguous_cache_bitwise(page_size, Lq, kind):
    """The CPU path reads a paged cache through its table: the same rows as the contiguous cache
    and the same arithmetic, so out and lse are bitwise equal; and both match the oracle."""
    B, Hq, Hkv, Lmax, D = 3, 4, 2, 192, 16
    k, v, table, kc, vc = _paged(B, Hkv, Lmax, D, torch.float16, page_size)
    q = torch.randn(B, Hq, Lq, D).half()
    lens = _lens(B, Lmax, Lq)
    lay = {"layout": _layout(B, Hq, Lq, Lmax, 32), "window": sa.SlidingWindow(37, sinks=5),
           "power": sa.PowerAttention(32)}.get(kind)
    kw = _options(B, Hq, Lmax, ("softcap", "alibi_b", "padding", "bias")) if kind == "options" else {}
    out, lse = sa.decode_attention(q, k, v, lay, cache_seqlens=lens, return_lse=True, block_table=table, **kw)
    assert sa.last_backend() == "cpu"
    out_c, lse_c = sa.decode_attention(q, kc, vc, lay, cache_seqlens=lens, return_lse=True, **kw)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c), f"paged {kind}: not bitwise the contiguous cache"
    _check(f"paged {kind}", q, k, v, lay, lens, out, lse, block_table=table, **kw)


def test_paged_unused_table_entries_and_pages_are_never_read():
    """Pages past a sequence's length (and spare pages) may hold anything: NaN there changes nothing."""
    B, Hq, Hkv, Lq, Lmax, D, ps = 2, 2, 1, 3, 96, 16, 16
    k, v, table, _, _ = _paged(B, Hkv, Lmax, D, torch.float32, ps, spare=2)
    q = torch.randn(B, Hq, Lq, D)
    lens = torch.tensor([96, 20], dtype=torch.int32)
    out = sa.decode_attention(q, k, v, cache_seqlens=lens, block_table=table)
    used = {int(p) for p in table[0]} | {int(p) for p in table[1, :2]}
    k2, v2 = k.clone(), v.clone()
    for p in range(k.shape[0]):
        if p not in used:
            k2[p], v2[p] = float("nan"), float("nan")
    k2[table[1, 1], 20 - 16:], v2[table[1, 1], 20 - 16:] = float("nan"), float("nan")  # rows past length 20
    assert torch.equal(sa.decode_attention(q, k2, v2, cache_seqlens=lens, block_table=table), out)


# ----------------------------------------------------------------------------- options vs the oracle
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("Lq", [1, 5, 16])
@pytest.mark.parametrize("which", [("softcap",), ("alibi",), ("alibi_b",), ("padding",), ("bias",),
                                   ("bias_shared",), ("softcap", "alibi", "padding", "bias")])
def test_options_cpu_match_oracle(dtype, Lq, which):
    B, Hq, Hkv, Lmax, D = 3, 6, 2, 200, 32
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    k, v = torch.randn(B, Hkv, Lmax, D).to(dtype), torch.randn(B, Hkv, Lmax, D).to(dtype)
    lens = _lens(B, Lmax, Lq)
    kw = _options(B, Hq, Lmax, which)
    for lay in (None, _layout(B, Hq, Lq, Lmax, 16)):
        out, lse = sa.decode_attention(q, k, v, lay, cache_seqlens=lens, return_lse=True, **kw)
        _check(f"decode {which} layout={lay is not None}", q, k, v, lay, lens, out, lse, **kw)


@pytest.mark.parametrize("pattern", ["window", "power"])
def test_options_with_pattern_ragged_paged(pattern):
    """Paged + pattern + ragged lengths + every option: the exact path (window) and the decode
    kernels' path (power), vs the oracle."""
    B, Hq, Hkv, Lq, Lmax, D, ps = 3, 4, 1, 4, 160, 16, 32
    k, v, table, _, _ = _paged(B, Hkv, Lmax, D, torch.float32, ps)
    q = torch.randn(B, Hq, Lq, D)
    lens = torch.tensor([160, 77, 2], dtype=torch.int32)
    p = sa.SlidingWindow(29, sinks=3) if pattern == "window" else sa.PowerAttention(32)
    kw = _options(B, Hq, Lmax, ("softcap", "alibi", "padding", "bias"))
    out, lse = sa.decode_attention(q, k, v, p, lens, None, True, table, **kw)
    _check(f"paged {pattern} options", q, k, v, p, lens, out, lse, block_table=table, **kw)


def test_key_padding_removing_every_key_gives_zero_and_neg_inf():
    B, Hq, Hkv, Lq, Lmax, D = 2, 4, 2, 3, 64, 16
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hkv, Lmax, D), torch.randn(B, Hkv, Lmax, D)
    kpm = torch.rand(B, Lmax) < 0.5
    kpm[1] = False
    bias = torch.zeros(B, 1, Lmax)
    bias[0, :, :] = float("-inf")  # sequence 0: every key knocked out by its bias instead
    for kw in ({"key_padding_mask": kpm}, {"key_bias": bias}):
        out, lse = sa.decode_attention(q, k, v, return_lse=True, **kw)
        b = 1 if "key_padding_mask" in kw else 0
        assert (out[b] == 0).all() and torch.isneginf(lse[b]).all()
        assert torch.isfinite(lse[1 - b]).all()
        _check("no key", q, k, v, None, None, out, lse, **kw)


def test_oracle_options_written_out():
    """The oracle's score for one sequence, written out: softcap, ALiBi at the row's own position
    (|n - Lq + i - j|), key bias, key padding."""
    B, H, Lq, Lmax, D = 2, 2, 3, 40, 8
    q = torch.randn(B, H, Lq, D).double()
    k, v = torch.randn(B, H, Lmax, D).double(), torch.randn(B, H, Lmax, D).double()
    lens = torch.tensor([40, 25], dtype=torch.int32)
    slopes, kb, kpm = torch.rand(H), torch.randn(B, H, Lmax).double(), torch.rand(B, Lmax) < 0.7
    out = reference.decode_attention(q, k, v, cache_seqlens=lens, softcap=2.0, alibi_slopes=slopes,
                                     key_padding_mask=kpm, key_bias=kb)
    b, n = 1, 25
    pos = n - Lq + torch.arange(Lq).double()[:, None]
    j = torch.arange(n).double()
    s = 2.0 * torch.tanh(q[b] @ k[b, :, :n].transpose(-1, -2) / math.sqrt(D) / 2.0)
    s = s - slopes.double()[:, None, None] * (pos - j).abs() + kb[b, :, None, :n]
    s = s.masked_fill(~((j <= pos) & kpm[b, :n]), float("-inf"))
    assert torch.allclose(out[b], torch.softmax(s, -1) @ v[b, :, :n])


# ----------------------------------------------------------------------------- Triton path
def _triton_takes_options():
    return "softcap" in inspect.signature(sa.sparse_attention).parameters


def _paged_triton():
    from sparseattn.ops.attention import op
    return getattr(op, "paged_sparse_attention", None)


@pytest.mark.parametrize("Lq", [1, 4])
@pytest.mark.parametrize("kind", ["dense", "ragged", "layout bk16"])
def test_decode_triton_options_match_oracle(kind, Lq):
    """The path CUDA tensors take without the extension, through the interpreter: options,
    ragged lengths (a key padding mask when Lq = 1, an element mask otherwise; ALiBi's LSE shifted
    back to each sequence's own positions)."""
    if not sa._dispatch.interpreter_on():
        pytest.skip("needs the Triton interpreter (CPU) or a GPU")
    if not _triton_takes_options():
        pytest.skip("sparse_attention does not take softcap/alibi_slopes/key_padding_mask/key_bias yet")
    B, Hq, Hkv, Lmax, D = 2, 4, 2, 150, 16
    q = torch.randn(B, Hq, Lq, D).half()
    k, v = torch.randn(B, Hkv, Lmax, D).half(), torch.randn(B, Hkv, Lmax, D).half()
    lens = None if kind == "dense" else torch.tensor([150, 70], dtype=torch.int32)
    lay = _layout(B, Hq, Lq, Lmax, 16) if kind == "layout bk16" else None
    kw = _options(B, Hq, Lmax, ("softcap", "alibi_b", "padding", "bias"))
    out, lse = _decode_triton(q, k, v, lens, lay, 1 / math.sqrt(D), **kw)
    _check(f"decode triton {kind}", q, k, v, lay, lens, out, lse, **kw)


@pytest.mark.parametrize("Lq", [1, 4])
@pytest.mark.parametrize("page_size", [16, 32])
def test_decode_triton_paged_matches_contiguous(Lq, page_size):
    """The Triton path with a block table (paged_sparse_attention) == the same cache contiguous."""
    if not sa._dispatch.interpreter_on():
        pytest.skip("needs the Triton interpreter (CPU) or a GPU")
    if _paged_triton() is None or not _triton_takes_options():
        pytest.skip("sparseattn.ops.attention.op.paged_sparse_attention (with options) not there yet")
    B, Hq, Hkv, Lmax, D = 2, 4, 2, 128, 16
    k, v, table, kc, vc = _paged(B, Hkv, Lmax, D, torch.float16, page_size)
    q = torch.randn(B, Hq, Lq, D).half()
    lens = torch.tensor([128, 45], dtype=torch.int32)
    lay = _layout(1, Hq, Lq, Lmax, 32)
    kw = _options(B, Hq, Lmax, ("softcap", "alibi", "padding", "bias"))
    out, lse = _decode_triton(q, k, v, lens, lay, 0.25, block_table=table, **kw)
    out_c, lse_c = _decode_triton(q, kc, vc, lens, lay, 0.25, **kw)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    _check("decode triton paged", q, k, v, lay, lens, out, lse, block_table=table, **kw)


@pytest.mark.parametrize("pattern", ["window", "window equal lengths", "power"])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_public_triton_flow_pattern_ragged_options(monkeypatch, pattern, paged):
    """decode_attention as CUDA tensors without the extension run it (the backend forced to
    "triton", kernels interpreted): the exact masked path (window, ragged), the layout path (window,
    equal lengths) and the decode path (power), paged or not, every option, vs the oracle."""
    if not sa._dispatch.interpreter_on():
        pytest.skip("needs the Triton interpreter (CPU) or a GPU")
    if not _triton_takes_options() or (paged and _paged_triton() is None):
        pytest.skip("sparse_attention / paged_sparse_attention do not take the options yet")
    from sparseattn.ops.decode import op
    monkeypatch.setattr(op, "decode_backend", lambda q: "triton")
    monkeypatch.delenv("SPARSEATTN_CPU_PATH", raising=False)   # the Triton flow, even where a run forces the CPU path
    B, Hq, Hkv, Lq, Lmax, D, ps = 3, 4, 2, 3, 128, 16, 32
    k, v, table, kc, vc = _paged(B, Hkv, Lmax, D, torch.float32, ps)
    q = torch.randn(B, Hq, Lq, D)
    lens = None if pattern == "window equal lengths" else torch.tensor([128, 50, 1], dtype=torch.int32)
    p = sa.PowerAttention(32) if pattern == "power" else sa.SlidingWindow(29, sinks=3)
    kw = _options(B, Hq, Lmax, ("softcap", "alibi_b", "padding", "bias"))
    if paged:
        out, lse = sa.decode_attention(q, k, v, p, lens, None, True, table, **kw)
    else:
        out, lse = sa.decode_attention(q, kc, vc, p, lens, None, True, **kw)
    assert sa.last_backend() == "triton"
    _check(f"decode triton flow {pattern} paged={paged}", q, kc, vc, p, lens, out, lse, **kw)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case, exc, words", [
    ("table int64", TypeError, ["block_table", "int32", "int64"]),
    ("table list", TypeError, ["block_table", "list"]),
    ("table 1-D", ValueError, ["block_table", "2 dims", "(4,)"]),
    ("table batch", ValueError, ["block_table", "[2, max_pages]", "(3, 2)"]),
    ("table device", ValueError, ["block_table", "device"]),
    ("table entry high", ValueError, ["block_table", "[0, 5)", "max 5"]),
    ("table entry negative", ValueError, ["block_table", "[0, 5)", "min -1"]),
    ("page size", ValueError, ["k_cache", "multiple of 16", "24"]),
    ("paged 3-D", ValueError, ["k_cache", "[num_pages, page_size, Hkv, D]"]),
    ("paged shapes differ", ValueError, ["k_cache, v_cache", "same shape"]),
    ("paged head dim", ValueError, ["k_cache", "head dim 16", "8"]),
    ("paged gqa", ValueError, ["divisible"]),
    ("paged seqlens > Lmax", ValueError, ["cache_seqlens", "[0, 32]", "33"]),
    ("softcap 0", ValueError, ["softcap", "> 0", "0"]),
    ("softcap negative", ValueError, ["softcap", "> 0", "-2"]),
    ("softcap str", TypeError, ["softcap", "str"]),
    ("alibi shape", ValueError, ["alibi_slopes", "[4] or [2, 4]", "(2,)"]),
    ("alibi dtype", TypeError, ["alibi_slopes", "float32", "float64"]),
    ("alibi device", ValueError, ["alibi_slopes", "device"]),
    ("padding dtype", TypeError, ["key_padding_mask", "bool", "int64"]),
    ("padding shape", ValueError, ["key_padding_mask", "[2, 64]", "(2, 63)"]),
    ("bias grad", ValueError, ["key_bias", "requires_grad"]),
    ("bias shape", ValueError, ["key_bias", "[1|2, 1|4, 64]", "(2, 3, 64)"]),
    ("bias dtype", TypeError, ["key_bias", "floating point", "int64"]),
])
def test_decode_options_bad_input(case, exc, words):
    B, Hq, Hkv, Lq, Lmax, D = 2, 4, 2, 2, 64, 16
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hkv, Lmax, D), torch.randn(B, Hkv, Lmax, D)
    pk, pv = torch.randn(5, 16, Hkv, D), torch.randn(5, 16, Hkv, D)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    args, kw = (q, k, v), {}
    paged = {"block_table": table}
    if case == "table int64":
        args, kw = (q, pk, pv), {"block_table": table.long()}
    elif case == "table list":
        args, kw = (q, pk, pv), {"block_table": [[0, 1], [2, 3]]}
    elif case == "table 1-D":
        args, kw = (q, pk, pv), {"block_table": table.view(4)}
    elif case == "table batch":
        args, kw = (q, pk, pv), {"block_table": torch.zeros(3, 2, dtype=torch.int32)}
    elif case == "table device":
        args, kw = (q, pk, pv), {"block_table": table.to("meta")}
    elif case == "table entry high":
        args, kw = (q, pk, pv), {"block_table": torch.tensor([[0, 1], [2, 5]], dtype=torch.int32)}
    elif case == "table entry negative":
        args, kw = (q, pk, pv), {"block_table": torch.tensor([[0, -1], [2, 3]], dtype=torch.int32)}
    elif case == "page size":
        args, kw = (q, torch.randn(5, 24, Hkv, D), torch.randn(5, 24, Hkv, D)), paged
    elif case == "paged 3-D":
        args, kw = (q, pk[0], pv[0]), paged
    elif case == "paged shapes differ":
        args, kw = (q, pk, pv[:4]), paged
    elif case == "paged head dim":
        args, kw = (q, pk[..., :8], pv[..., :8]), paged
    elif case == "paged gqa":
        args, kw = (torch.randn(B, 3, Lq, D), pk, pv), paged
    elif case == "paged seqlens > Lmax":
        args, kw = (q, pk, pv), {**paged, "cache_seqlens": torch.tensor([3, 33], dtype=torch.int32)}
    elif case == "softcap 0":
        kw = {"softcap": 0.0}
    elif case == "softcap negative":
        kw = {"softcap": -2}
    elif case == "softcap str":
        kw = {"softcap": "30"}
    elif case == "alibi shape":
        kw = {"alibi_slopes": torch.rand(2)}
    elif case == "alibi dtype":
        kw = {"alibi_slopes": torch.rand(Hq).double()}
    elif case == "alibi device":
        kw = {"alibi_slopes": torch.rand(Hq, device="meta")}
    elif case == "padding dtype":
        kw = {"key_padding_mask": torch.ones(B, Lmax, dtype=torch.long)}
    elif case == "padding shape":
        kw = {"key_padding_mask": torch.ones(B, Lmax - 1, dtype=torch.bool)}
    elif case == "bias grad":
        kw = {"key_bias": torch.zeros(B, Hq, Lmax, requires_grad=True)}
    elif case == "bias shape":
        kw = {"key_bias": torch.zeros(B, 3, Lmax)}
    elif case == "bias dtype":
        kw = {"key_bias": torch.zeros(B, Hq, Lmax, dtype=torch.long)}
    with pytest.raises(exc) as info:
        sa.decode_attention(*args, **kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{case}: {w!r} not in {msg!r}"


def test_block_table_entries_unchecked_under_compile(monkeypatch):
    """Where the host read is skipped (torch.compile, CUDA graph capture) a bad entry is not an
    error: the paths clamp page indices into the cache instead of reading out of bounds."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    B, Hq, Hkv, Lq, D = 2, 2, 1, 1, 16
    pk, pv = torch.randn(3, 16, Hkv, D), torch.randn(3, 16, Hkv, D)
    q = torch.randn(B, Hq, Lq, D)
    bad = torch.tensor([[0, 7], [-4, 2]], dtype=torch.int32)
    out = sa.decode_attention(q, pk, pv, block_table=bad)
    clamped = bad.clamp(0, 2)
    assert torch.equal(out, sa.decode_attention(q, pk, pv, block_table=clamped))
