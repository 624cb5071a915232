"""The CUDA extension sparseattn._C: it is built and imports wherever nvcc was present at install
time (CI's compile gate for csrc/), the package works without it or without a GPU, and, on a GPU,
its decode kernels match the float64 oracle and the CPU path, and its layout builder gives
exactly the lists of the PyTorch builder.

GPU tests are skipped only when no usable CUDA device is present; benchmarks/sanitize.sh runs
them under compute-sanitizer memcheck and racecheck."""
import importlib
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import sparseattn as sa
from sparseattn import _cuda, reference

from utils import assert_oracle

GPU = sa.cuda_available()
gpu = pytest.mark.skipif(not GPU, reason=f"no usable CUDA device: {sa.cuda_unavailable_reason()}")
no_gpu = pytest.mark.skipif(GPU, reason="a usable CUDA device is present")


# ----------------------------------------------------------------------------- build and import
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_extension_usable_where_torch_sees_a_gpu():
    """Where torch runs on a GPU and the extension was built, it must run too: otherwise every
    GPU test below would skip and the run would look green."""
    if not _cuda.extension_built():
        pytest.skip("extension not built (Triton-only install)")
    assert GPU, f"sparseattn._C cannot use the GPU torch uses: {sa.cuda_unavailable_reason()}"


def test_extension_built_where_nvcc_was_present():
    if os.environ.get("SPARSEATTN_BUILD_CUDA", "auto") == "0":
        pytest.skip("SPARSEATTN_BUILD_CUDA=0: the extension is not built on purpose")
    if shutil.which("nvcc") is None and os.environ.get("SPARSEATTN_BUILD_CUDA") != "1":
        pytest.skip("nvcc not on PATH: a Triton-only install is expected")
    C = importlib.import_module("sparseattn._C")
    assert _cuda.extension_built()
    archs = C.cuda_archs.split(",")
    assert archs and all(a[:2].isdigit() for a in archs), C.cuda_archs
    assert C.decode_max_lq == 16
    # Argument checks in C++ raise ValueError (std::invalid_argument), never abort.
    with pytest.raises(ValueError, match="decode_num_splits"):
        C.decode_num_splits(0, 1, 1, 1, 1, 1)
    assert 1 <= C.decode_num_splits(132, 1, 32, 8, 1, 1 << 18) <= 128
    assert C.decode_num_splits(132, 1, 32, 8, 1, 64) == 1


def test_import_without_extension():
    """A Triton-only install: sparseattn imports, reports why CUDA is unavailable, and decode
    still runs on CPU."""
    code = (
        "import sys; sys.modules['sparseattn._C'] = None\n"  # makes `from . import _C` fail
        "import torch, sparseattn as sa\n"
        "assert not sa.cuda_available()\n"
        "r = sa.cuda_unavailable_reason(); assert 'not built' in r, r\n"
        "q = torch.randn(1, 2, 1, 16); k = v = torch.randn(1, 2, 40, 16)\n"
        "out = sa.decode_attention(q, k, v); assert sa.last_backend() == 'cpu'\n"
        "from sparseattn import _cuda\n"
        "try:\n"
        "    _cuda.require('cuda')\n"
        "except RuntimeError as e:\n"
        "    assert str(e).startswith('no usable CUDA device: extension not built'), e\n"
        "else:\n"
        "    raise SystemExit('require() did not raise')\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@no_gpu
def test_no_gpu_raises_clear_error():
    reason = sa.cuda_unavailable_reason()
    assert isinstance(reason, str) and reason and "\n" not in reason
    assert reason.split(":")[0] in ("extension not built", "no usable NVIDIA driver", "no GPU", "no GPU for torch",
                                    "GPU not supported by this build", "CUDA unavailable"), reason
    assert sa.cuda_available() is False
    q = torch.randn(1, 4, 1, 64, dtype=torch.float16)
    k = v = torch.randn(1, 4, 128, 64, dtype=torch.float16)
    lens = torch.full((1,), 128, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="^no usable CUDA device: "):
        _cuda.decode_attention_fwd(q, k, v, lens, None, None, 64, None, 0.125)
    with pytest.raises(RuntimeError, match="^no usable CUDA device: "):
        _cuda.mask_to_lists([torch.ones(1, 1, 2, 2, dtype=torch.bool)])
    with pytest.raises(RuntimeError, match="^no usable CUDA device: "):
        _cuda.require()


@no_gpu
def test_raw_extension_without_gpu_raises_not_crashes():
    """Called directly (bypassing the Python checks), the C++ code reports the CUDA error as a
    RuntimeError instead of crashing the process."""
    if not _cuda.extension_built():
        pytest.skip("extension not built")
    C = _cuda._C
    p = C.DecodeParams()
    p.q = p.k = p.v = p.out = p.lse = p.o_part = p.lse_part = p.seqlens = 256
    p.B = p.Hq = p.Hkv = p.Lq = p.Lmax = 1
    p.D = 64
    with pytest.raises(RuntimeError, match="CUDA error"):
        C.decode_attention(p, 0, 0)
    job = (256, 1, 1, 1, 1, 0, 0, 0, 0, 256, 256, 1)
    with pytest.raises(RuntimeError, match="CUDA error"):
        C.build_lists_count([job], 256, 0, 0)
    assert C.device_unavailable_reason(0) != ""


# ----------------------------------------------------------------------------- Python -> C++ contract (CPU)
def _capture_launch(monkeypatch):
    """Runs _cuda.decode_attention_fwd on CPU tensors with the launch replaced by a capture of the
    DecodeParams: what Python hands the C++ code, checked without a GPU."""
    if not _cuda.extension_built():
        pytest.skip("extension not built")
    C = _cuda._C
    seen = []
    fake = types.SimpleNamespace(DecodeParams=C.DecodeParams, DType=C.DType, decode_num_splits=C.decode_num_splits,
                                 decode_attention=lambda p, device, stream: seen.append(p))
    monkeypatch.setattr(_cuda, "_C", fake)
    monkeypatch.setattr(_cuda, "require", lambda device=None: 0)
    monkeypatch.setattr(_cuda, "_stream", lambda index: 0)
    monkeypatch.setattr(_cuda, "num_sms", lambda index: 132)
    return seen


def _at_offset(shape, off, dtype=torch.float16, device="cpu"):
    """A contiguous tensor whose data starts `off` elements into its storage (contiguous() keeps it)."""
    return torch.randn(math.prod(shape) + off, device=device).to(dtype)[off:].view(shape)


def test_decode_operands_meet_the_kernel_alignment(monkeypatch):
    """q rows must be 4-byte and K/V rows 16-byte aligned (C++ rejects anything else): misaligned
    storage offsets are copied (contiguous() alone keeps them), size-1 dims with any stride and
    aligned strided or broadcast views are read in place."""
    seen = _capture_launch(monkeypatch)
    B, Hq, Hkv, Lq, Lmax, D = 1, 4, 2, 1, 40, 64
    lens = torch.full((B,), Lmax, dtype=torch.int32)
    kb = torch.randn(Hkv * Lmax * D + 8).half()
    cases = {
        "storage offsets": (_at_offset((B, Hq, Lq, D), 1), _at_offset((B, Hkv, Lmax, D), 4),
                            _at_offset((B, Hkv, Lmax, D), 2)),
        "size-1 dims, odd strides": (torch.randn(Hq * D).half().as_strided((B, Hq, Lq, D), (7, D, 3, 1)),
                                     kb.as_strided((B, Hkv, Lmax, D), (5, Lmax * D, D, 1)),
                                     kb.as_strided((B, Hkv, Lmax, D), (3, Lmax * D, D, 1))),
        "strided and broadcast": (torch.randn(B, Lq, Hq, D).half().transpose(1, 2),
                                  torch.randn(B, Lmax, Hkv, D).half().transpose(1, 2),
                                  torch.randn(1, 1, Lmax, D).half().expand(B, Hkv, Lmax, D)),
    }
    for name, (q, k, v) in cases.items():
        seen.clear()
        _cuda.decode_attention_fwd(q, k, v, lens, None, None, 64, None, 0.125)
        (p,) = seen
        assert p.q % 4 == 0 and all(s % 2 == 0 for s in (p.q_sb, p.q_sh, p.q_sl)), name
        for t, ptr, st in ((k, p.k, (p.k_sb, p.k_sh, p.k_sl)), (v, p.v, (p.v_sb, p.v_sh, p.v_sl))):
            assert ptr % 16 == 0 and all(s % 8 == 0 for s in st), (name, ptr, st)
        if name != "storage offsets":  # aligned already: no copy
            assert (p.q, p.k, p.v) == (q.data_ptr(), k.data_ptr(), v.data_ptr()), name
    for t, elems in ((_at_offset((2, 3, 5, 64), 3), 8), (kb.as_strided((1, 2, 3, 64), (5, 192, 64, 1)), 8)):
        got, st = _cuda._vector_operand(t, elems)
        assert torch.equal(got, t) and torch.equal(got.as_strided(got.shape, st), t)


def test_decode_empty_problems_do_not_launch(monkeypatch):
    """B = 0 or an empty cache (Lmax = 0): outputs of the right shapes, rows 0 and LSE -inf, as the
    CPU path gives, and no launch (the C++ code rejects empty sizes)."""
    seen = _capture_launch(monkeypatch)
    for B, Lmax in ((0, 16), (2, 0)):
        q = torch.randn(B, 4, 3, 64).half()
        k = v = torch.randn(B, 2, Lmax, 64).half()
        out, lse = _cuda.decode_attention_fwd(q, k, v, torch.zeros(B, dtype=torch.int32), None, None, 64, None, 0.125)
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3] and lse.dtype == torch.float32
        assert (out == 0).all() and torch.isneginf(lse).all()
        ref_out, ref_lse = sa.decode_attention(q.float(), k.float(), v.float(), return_lse=True)
        assert torch.equal(out.float(), ref_out) and torch.equal(lse, ref_lse)
    assert seen == []


def test_decode_paged_and_options_params(monkeypatch):
    """A paged cache [num_pages, page_size, Hkv, D]: k_sb/v_sb step a page, k_sl/v_sl a row, k_sh/v_sh
    a head; the table, Lmax = max_pages x page_size; the score options' pointers and strides
    (broadcast dims stride 0, fp32/uint8 copies of what came)."""
    seen = _capture_launch(monkeypatch)
    B, Hq, Hkv, Lq, D, P, ps, mp = 2, 4, 2, 3, 64, 7, 32, 3
    q = torch.randn(B, Hq, Lq, D).half()
    k, v = torch.randn(P, ps, Hkv, D).half(), torch.randn(P, ps, Hkv, D).half()
    table = torch.randint(0, P, (B, mp), dtype=torch.int32)
    lens = torch.tensor([96, 40], dtype=torch.int32)
    slopes = torch.rand(B, Hq)
    kpm = torch.rand(B, mp * ps) < 0.5
    kb = torch.randn(1, Hq, mp * ps).half()
    _cuda.decode_attention_fwd(q, k, v, lens, None, None, 64, None, 0.125, block_table=table, softcap=30.0,
                               alibi_slopes=slopes, key_padding_mask=kpm, key_bias=kb)
    (p,) = seen
    assert (p.k_sb, p.k_sl, p.k_sh) == (ps * Hkv * D, Hkv * D, D)
    assert (p.v_sb, p.v_sl, p.v_sh) == (p.k_sb, p.k_sl, p.k_sh)
    assert (p.block_table, p.bt_sb, p.max_pages, p.page_size, p.num_pages) == (table.data_ptr(), mp, mp, ps, P)
    assert (p.Hkv, p.Lmax) == (Hkv, mp * ps)
    assert p.softcap == 30.0 and p.alibi == slopes.data_ptr() and p.alibi_sb == Hq
    assert p.key_padding != 0 and p.kpm_sb == mp * ps
    assert p.key_bias != 0 and (p.kb_sb, p.kb_sh) == (0, mp * ps)
    seen.clear()
    _cuda.decode_attention_fwd(q, k, v, lens, None, None, 64, None, 0.125, block_table=table,
                               alibi_slopes=slopes[0], key_bias=torch.randn(B, 1, mp * ps))
    (p,) = seen
    assert p.softcap == 0.0 and p.alibi_sb == 0 and (p.kb_sb, p.kb_sh) == (mp * ps, 0) and p.key_padding == 0


@gpu
def test_decode_cxx_rejects_bad_paged_params():
    """The C++ re-check of the paged fields and softcap (ValueError, before any launch; the device
    guard runs first, so this needs a driver)."""
    C = _cuda._C

    def params(**kw):
        p = C.DecodeParams()
        p.q = p.k = p.v = p.out = p.lse = p.o_part = p.lse_part = p.seqlens = 256
        p.B = p.Hq = p.Hkv = p.Lq = 1
        p.D, p.Lmax = 64, 32
        p.block_table, p.max_pages, p.page_size, p.num_pages = 256, 2, 16, 2
        for name, val in kw.items():
            setattr(p, name, val)
        return p

    for kw, words in (({"page_size": 24, "Lmax": 48}, "page_size"), ({"num_pages": 0}, "num_pages"),
                      ({"max_pages": 3}, "max_pages"), ({"softcap": -1.0}, "softcap")):
        with pytest.raises(ValueError, match=words):
            C.decode_attention(params(**kw), 0, 0)


# ----------------------------------------------------------------------------- GPU: decode kernels
def _inputs(B, Hq, Hkv, Lq, Lmax, D, dtype):
    q = torch.randn(B, Hq, Lq, D, device="cuda").to(dtype)
    k = torch.randn(B, Hkv, Lmax, D, device="cuda").to(dtype)
    v = torch.randn(B, Hkv, Lmax, D, device="cuda").to(dtype)
    return q, k, v


def _check_cuda(name, q, k, v, layout, lens, scale=None):
    out, lse = sa.decode_attention(q, k, v, layout, cache_seqlens=lens, scale=scale, return_lse=True)
    assert sa.last_backend() == "cuda", sa.last_backend()
    ref, ref_lse = reference.decode_attention(q, k, v, layout, cache_seqlens=lens, scale=scale, return_lse=True)
    base = reference.decode_attention(q, k, v, layout, cache_seqlens=lens, scale=scale, dtype=q.dtype)
    assert_oracle(name, out, ref, base)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{name}: -inf rows of lse differ"
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse[fin].double(), ref_lse[fin], atol=2e-3, rtol=2e-3), f"{name}: lse"
    assert (out[torch.isneginf(ref_lse)] == 0).all()
    # The CPU path on the same inputs agrees too.
    cpu_layout = None if layout is None else layout.to("cpu")
    cpu = sa.decode_attention(q.cpu(), k.cpu(), v.cpu(), cpu_layout, cache_seqlens=None if lens is None else lens.cpu())
    assert_oracle(name + " vs cpu path", out.cpu(), ref.cpu(), cpu)
    return out


def _lens(B, Lmax, Lq):
    lens = torch.randint(0, Lmax + 1, (B,))
    lens[0] = Lmax
    if B > 2:
        lens[1] = torch.randint(0, Lq + 1, ()).item()
    return lens.to(torch.int32).cuda()


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("Lq", [1, 3, 16])
@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (16, 1), (8, 4)])
def test_gpu_decode_dense_matches_oracle(dtype, D, Lq, heads):
    """Group rows G x Lq of 1, 2, 3, 4, 6, 12, 16, 32, 48, 64, 256: every rows-per-CTA variant of
    the split kernel (1, 2, 4, 8, 16) and several row chunks."""
    Hq, Hkv = heads
    B, Lmax = 3, 777
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, dtype)
    _check_cuda("cuda dense", q, k, v, None, _lens(B, Lmax, Lq))
    _check_cuda("cuda dense full length", q, k, v, None, None)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("bk", [16, 64, 128])
@pytest.mark.parametrize("shape", ["shared", "per batch", "per head"])
def test_gpu_decode_layout_matches_oracle(dtype, D, bk, shape):
    B, Hq, Hkv, Lq, Lmax = 3, 8, 2, 4, 1000
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, dtype)
    nk = math.ceil(Lmax / bk)
    bm = torch.rand(B if shape == "per batch" else 1, Hq if shape == "per head" else 1, 1, nk, device="cuda") < 0.3
    layout = sa.BlockLayout.from_block_mask(bm, (16, bk), (Lq, Lmax))
    _check_cuda(f"cuda layout {shape}", q, k, v, layout, _lens(B, Lmax, Lq))


@gpu
def test_gpu_decode_long_cache_many_splits_strided_inputs():
    B, Hq, Hkv, Lq, Lmax, D = 2, 32, 8, 2, 40000, 128
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, torch.bfloat16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)                      # [B, L, H, D] memory
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    lens = torch.tensor([Lmax, 31337], dtype=torch.int32, device="cuda")
    _check_cuda("cuda long", q, k, v, None, lens, scale=0.07)
    # A cache whose rows are not 16-byte aligned is copied, not misread.
    k_odd = torch.randn(B, Hkv, Lmax * D + 4, device="cuda").to(torch.bfloat16)[..., 4:].view(B, Hkv, Lmax, D)
    _check_cuda("cuda unaligned", q, k_odd, v, None, lens)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 256])
@pytest.mark.parametrize("sparse", [False, True])
def test_gpu_decode_edge_lengths_partial_row_chunks(dtype, D, sparse):
    """cache_seqlens at 0, 1, Lq - 1, Lq, tile edges and Lmax; 3 query heads per KV head x Lq = 7
    = 21 rows, i.e. two row chunks per KV head, the second partial. Sparse: per batch and per head
    lists with a sequence and a whole KV group that list no block (empty work, every split)."""
    Hq, Hkv, Lq, Lmax = 12, 4, 7, 200
    lens = torch.tensor([0, 1, Lq - 1, Lq, 31, 32, 33, 64, Lmax - 1, Lmax], dtype=torch.int32, device="cuda")
    B = lens.numel()
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, dtype)
    layout = None
    if sparse:
        bm = torch.rand(B, Hq, 1, math.ceil(Lmax / 32), device="cuda") < 0.5
        bm[-2] = False
        bm[-1, :3] = False  # query heads 0..2 = all of KV head 0's group
        layout = sa.BlockLayout.from_block_mask(bm, (16, 32), (Lq, Lmax))
    _check_cuda(f"cuda edge lengths sparse={sparse}", q, k, v, layout, lens)


@gpu
def test_gpu_decode_layout_many_splits():
    """Sparse lists long enough for many splits (~78), with a ragged length cutting a block."""
    B, Hq, Hkv, Lq, Lmax, D, bk = 2, 8, 2, 3, 20011, 128, 64
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, torch.float16)
    bm = torch.rand(B, Hq, 1, math.ceil(Lmax / bk), device="cuda") < 0.6
    layout = sa.BlockLayout.from_block_mask(bm, (16, bk), (Lq, Lmax))
    lens = torch.tensor([Lmax, 12345], dtype=torch.int32, device="cuda")
    _check_cuda("cuda layout many splits", q, k, v, layout, lens)


@gpu
def test_gpu_decode_misaligned_offsets_and_size1_strides():
    """Contiguous views at misaligned storage offsets, and size-1 dims with odd strides, run on the
    CUDA kernels (copied or read in place) instead of failing the C++ alignment check."""
    B, Hq, Hkv, Lq, Lmax, D = 1, 4, 2, 1, 300, 64
    q = _at_offset((B, Hq, Lq, D), 1, device="cuda")
    k = _at_offset((B, Hkv, Lmax, D), 4, device="cuda")
    v = _at_offset((B, Hkv, Lmax, D), 2, device="cuda")
    assert q.is_contiguous() and q.data_ptr() % 4 and k.data_ptr() % 16 and v.data_ptr() % 16
    _check_cuda("cuda storage offsets", q, k, v, None, None)
    qs = torch.randn(Hq * D, device="cuda").half().as_strided((B, Hq, Lq, D), (7, D, 3, 1))
    ks = torch.randn(Hkv * Lmax * D, device="cuda").half().as_strided((B, Hkv, Lmax, D), (5, Lmax * D, D, 1))
    _check_cuda("cuda size-1 strides", qs, ks, v, None, torch.tensor([Lmax - 7], dtype=torch.int32, device="cuda"))


@gpu
def test_gpu_decode_raw_lengths_out_of_range_are_clamped():
    """Lengths outside [0, Lmax] (not validated under torch.compile) read nothing past the cache:
    the kernel clamps them (compute-sanitizer memcheck shows any stray read)."""
    B, Hq, Hkv, Lq, Lmax, D = 2, 4, 2, 2, 100, 64
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, torch.float16)
    bad = torch.tensor([-5, Lmax + 1000], dtype=torch.int32, device="cuda")
    good = torch.tensor([0, Lmax], dtype=torch.int32, device="cuda")
    out, lse = _cuda.decode_attention_fwd(q, k, v, bad, None, None, 64, None, 0.125)
    want, want_lse = _cuda.decode_attention_fwd(q, k, v, good, None, None, 64, None, 0.125)
    torch.cuda.synchronize()
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@gpu
def test_gpu_decode_batch_beyond_grid_z_limit():
    """B > 65535 (gridDim.y/z stop there): the batch rides on gridDim.x."""
    B, Lmax, D = 65536 + 7, 33, 64
    q, k, v = _inputs(B, 1, 1, 1, Lmax, D, torch.float16)
    lens = torch.randint(0, Lmax + 1, (B,), dtype=torch.int32, device="cuda")
    out, lse = sa.decode_attention(q, k, v, cache_seqlens=lens, return_lse=True)
    assert sa.last_backend() == "cuda"
    tail = slice(B - 300, B)
    ref = reference.decode_attention(q[tail], k[tail], v[tail], cache_seqlens=lens[tail])
    base = reference.decode_attention(q[tail], k[tail], v[tail], cache_seqlens=lens[tail], dtype=q.dtype)
    assert_oracle("cuda B > 65535 (tail)", out[tail], ref, base)
    # One split per row at this size: the tail computed on its own is bit-identical.
    assert torch.equal(out[tail], sa.decode_attention(q[tail], k[tail], v[tail], cache_seqlens=lens[tail]))


@gpu
def test_gpu_decode_and_builder_empty_problems():
    """B = 0 and an empty cache on CUDA, and a layout of batch 0 (GPU builder falls back)."""
    for B, Lmax in ((0, 64), (2, 0)):
        q, k, v = _inputs(B, 4, 2, 3, Lmax, 64, torch.float16)
        out, lse = sa.decode_attention(q, k, v, return_lse=True)
        assert out.shape == q.shape and (out == 0).all() and torch.isneginf(lse).all()
    bm = torch.ones(0, 1, 1, 4, dtype=torch.bool, device="cuda")
    got = sa.BlockLayout.from_block_mask(bm, (16, 64), (1, 256))
    cpu = sa.BlockLayout.from_block_mask(bm.cpu(), (16, 64), (1, 256))
    assert all(torch.equal(g.cpu(), c) for g, c in zip(got.lists(), cpu.lists()))


@gpu
def test_gpu_decode_side_stream_and_device_restored():
    q, k, v = _inputs(2, 4, 2, 1, 300, 64, torch.float16)
    before = torch.cuda.current_device()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = sa.decode_attention(q, k, v)
    s.synchronize()
    assert torch.cuda.current_device() == before
    ref = reference.decode_attention(q, k, v)
    assert_oracle("cuda side stream", out, ref, reference.decode_attention(q, k, v, dtype=q.dtype))
    if torch.cuda.device_count() > 1:
        q1, k1, v1 = (t.to("cuda:1") for t in (q, k, v))
        out1 = sa.decode_attention(q1, k1, v1)
        assert torch.cuda.current_device() == before and out1.device == q1.device
        assert_oracle("cuda:1", out1.cpu(), ref.cpu(), out.cpu())


@gpu
def test_gpu_decode_and_builder_run_on_the_current_stream():
    """Inputs written on a side stream after a ~sleep: a launch on any other stream would read them
    before they exist (torch's side streams do not sync with the default stream)."""
    q, k, v = _inputs(2, 4, 2, 1, 300, 64, torch.float16)
    base = torch.rand(2, 3, 5, 70, device="cuda")
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(100_000_000)
        k2 = k * 2
        out = sa.decode_attention(q, k2, v)
        assert sa.last_backend() == "cuda"
        torch.cuda._sleep(100_000_000)
        bm = base < 0.3
        got = sa.BlockLayout.from_block_mask(bm, (64, 32), (5 * 64, 70 * 32))
    s.synchronize()
    assert_oracle("cuda on side stream", out, reference.decode_attention(q, k2, v),
                  reference.decode_attention(q, k2, v, dtype=q.dtype))
    want = sa.BlockLayout.from_block_mask(bm.cpu(), (64, 32), (5 * 64, 70 * 32))
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got.lists(), want.lists()))


@gpu
def test_gpu_decode_bad_input_before_launch():
    q, k, v = _inputs(2, 4, 2, 1, 64, 64, torch.float16)
    with pytest.raises(ValueError, match="cache_seqlens"):
        sa.decode_attention(q, k, v, cache_seqlens=torch.tensor([1, 65], dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="cache_seqlens"):
        sa.decode_attention(q, k, v, cache_seqlens=torch.tensor([1, 5], dtype=torch.int32))


@gpu
def test_gpu_decode_fallback_paths():
    """fp32 and unsupported head dims take the Triton path on CUDA, and say so."""
    q, k, v = _inputs(2, 4, 2, 2, 200, 32, torch.float16)
    out = sa.decode_attention(q, k, v)
    assert sa.last_backend() == "triton"
    assert_oracle("cuda fallback", out, reference.decode_attention(q, k, v),
                  reference.decode_attention(q, k, v, dtype=q.dtype))


@gpu
@pytest.mark.parametrize("kind", ["dense cuda", "layout cuda", "fp32 triton"])
def test_gpu_decode_captured_in_a_cuda_graph(kind):
    """Serving captures the decode step in a CUDA graph: dense decode and plain block layouts must
    capture (no host read) and replay with new cache contents and lengths written in place."""
    dtype = torch.float32 if kind == "fp32 triton" else torch.float16
    B, Lmax = 3, 700
    q, k, v = _inputs(B, 8, 2, 2, Lmax, 64, dtype)
    lens = _lens(B, Lmax, 2)
    layout = None
    if kind == "layout cuda":
        layout = sa.BlockLayout.from_block_mask(torch.rand(1, 1, 1, 11, device="cuda") < 0.5, (16, 64), (2, Lmax))
    sa.decode_attention(q, k, v, layout, cache_seqlens=lens)  # warm-up outside the capture (compiles, tunes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sa.decode_attention(q, k, v, layout, cache_seqlens=lens)
    assert sa.last_backend() == kind.split()[1]
    for _ in range(2):  # new inputs in the captured buffers, then replay
        for t in (q, k, v):
            t.copy_(torch.randn_like(t, dtype=torch.float32))
        lens.copy_(_lens(B, Lmax, 2))
        graph.replay()
        torch.cuda.synchronize()
        assert_oracle(f"graph replay {kind}", out, reference.decode_attention(q, k, v, layout, cache_seqlens=lens),
                      reference.decode_attention(q, k, v, layout, cache_seqlens=lens, dtype=q.dtype))


# ----------------------------------------------------------------------------- GPU: layout builder
def _lists(layout):
    return [t.cpu() for t in layout.lists()]


@gpu
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("shape", [(1, 1, 7, 9), (2, 3, 16, 5), (1, 4, 33, 70)])
@pytest.mark.parametrize("sync_free", [False, True])
def test_gpu_layout_builder_identical_to_torch(causal, shape, sync_free):
    bl, hl, nq, nk = shape
    bq, bk = 64, 32
    seq_lens = (nq * bq - 13, nk * bk - 5)
    for density in (0.0, 0.3, 1.0):
        bm = torch.rand(*shape, device="cuda") < density
        kw = dict(causal=causal, sync_free=sync_free)
        os.environ["SPARSEATTN_GPU_LAYOUT"] = "0"
        try:
            want = sa.BlockLayout.from_block_mask(bm, (bq, bk), seq_lens, **kw)
        finally:
            del os.environ["SPARSEATTN_GPU_LAYOUT"]
        got = sa.BlockLayout.from_block_mask(bm, (bq, bk), seq_lens, **kw)
        cpu = sa.BlockLayout.from_block_mask(bm.cpu(), (bq, bk), seq_lens, **kw)
        for g, w, c in zip(_lists(got), _lists(want), _lists(cpu)):
            assert g.dtype == torch.int32 and g.shape == w.shape and torch.equal(g, w) and torch.equal(g, c)


@gpu
@pytest.mark.parametrize("mask", [None, "bool"])
def test_gpu_sdpa_never_waits_on_the_gpu(mask):
    """The SDPA drop-in (layout build included, bool masks too) issues no host synchronisation:
    a training step keeps the CPU ahead of the GPU."""
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    attn_mask = None if mask is None else torch.rand(2, 1, 300, 300, device="cuda") < 0.5
    sa.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # compiles the kernels, caches layouts
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sa.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sa.last_backend() == "triton"


@gpu
def test_gpu_layout_builder_broadcast_views():
    """Expanded (stride-0) masks and transposed views are read in place."""
    from sparseattn.layout import mask_to_lists as _mask_to_lists

    base = torch.rand(1, 1, 40, 300, device="cuda") < 0.2
    masks = [base.expand(3, 2, 40, 300), base.transpose(-1, -2), base[..., ::3]]
    for m, (cnt, idx) in zip(masks, _cuda.mask_to_lists(masks)):
        wc, wi = _mask_to_lists(m)
        assert torch.equal(cnt, wc) and torch.equal(idx, wi)


# ----------------------------------------------------------------------------- GPU: paged cache and options
def _paged_cuda(B, Hkv, Lmax, D, dtype, ps, spare=5):
    from sparseattn.ops.decode.naive import logical_cache
    pages = B * (Lmax // ps)
    k = torch.randn(pages + spare, ps, Hkv, D, device="cuda").to(dtype)
    v = torch.randn(pages + spare, ps, Hkv, D, device="cuda").to(dtype)
    table = torch.randperm(pages + spare, device="cuda")[:pages].to(torch.int32).view(B, Lmax // ps)
    return k, v, table, logical_cache(k, table), logical_cache(v, table)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("ps", [16, 48, 256])
@pytest.mark.parametrize("sparse", [False, True])
def test_gpu_decode_paged_is_the_contiguous_cache(dtype, D, ps, sparse):
    """The split kernel reads pages through the table: bitwise the same cache stored contiguously
    (same rows, same splits, same arithmetic), and the oracle."""
    B, Hq, Hkv, Lq = 3, 8, 2, 4
    Lmax = ps * math.ceil(1000 / ps)
    k, v, table, kc, vc = _paged_cuda(B, Hkv, Lmax, D, dtype, ps)
    q = torch.randn(B, Hq, Lq, D, device="cuda").to(dtype)
    lens = _lens(B, Lmax, Lq)
    layout = None
    if sparse:
        bm = torch.rand(B, Hq, 1, math.ceil(Lmax / 32), device="cuda") < 0.4
        layout = sa.BlockLayout.from_block_mask(bm, (16, 32), (Lq, Lmax))
    out, lse = sa.decode_attention(q, k, v, layout, lens, return_lse=True, block_table=table)
    assert sa.last_backend() == "cuda"
    out_c, lse_c = sa.decode_attention(q, kc, vc, layout, lens, return_lse=True)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    _check_cuda(f"cuda paged sparse={sparse}", q, kc, vc, layout, lens)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("which", ["softcap", "alibi", "alibi_b", "padding", "bias", "all"])
def test_gpu_decode_options_match_oracle(dtype, D, which):
    B, Hq, Hkv, Lq, Lmax = 3, 8, 2, 5, 700
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lmax, D, dtype)
    lens = _lens(B, Lmax, Lq)
    kw = {}
    if which in ("softcap", "all"):
        kw["softcap"] = 2.0
    if which in ("alibi", "all"):
        kw["alibi_slopes"] = torch.rand(Hq, device="cuda") * 0.1
    if which == "alibi_b":
        kw["alibi_slopes"] = torch.rand(B, Hq, device="cuda") * 0.1
    if which in ("padding", "all"):
        kw["key_padding_mask"] = torch.rand(B, Lmax, device="cuda") < 0.7
    if which in ("bias", "all"):
        kb = torch.randn(B, 1 if which == "all" else Hq, Lmax, device="cuda")
        kb[torch.rand_like(kb) < 0.1] = float("-inf")
        kw["key_bias"] = kb
    bm = torch.rand(1, Hq, 1, math.ceil(Lmax / 64), device="cuda") < 0.5
    for layout in (None, sa.BlockLayout.from_block_mask(bm, (16, 64), (Lq, Lmax))):
        out, lse = sa.decode_attention(q, k, v, layout, lens, return_lse=True, **kw)
        assert sa.last_backend() == "cuda"
        ref, ref_lse = reference.decode_attention(q, k, v, layout, lens, return_lse=True, **kw)
        base = reference.decode_attention(q, k, v, layout, lens, dtype=q.dtype, **kw)
        assert_oracle(f"cuda {which}", out, ref, base)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{which}: -inf rows of lse differ"
        fin = torch.isfinite(ref_lse)
        assert torch.allclose(lse[fin].double(), ref_lse[fin], atol=2e-3, rtol=2e-3), f"{which}: lse"
        assert (out[torch.isneginf(ref_lse)] == 0).all()


@gpu
def test_gpu_decode_paged_bad_entries_are_clamped():
    """Table entries outside [0, num_pages) (not validated under torch.compile or a capture) read
    inside the cache: the kernel clamps the page index (compute-sanitizer shows any stray read)."""
    B, Hq, Hkv, Lq, D, ps = 2, 4, 2, 2, 64, 16
    k, v = torch.randn(4, ps, Hkv, D, device="cuda").half(), torch.randn(4, ps, Hkv, D, device="cuda").half()
    q = torch.randn(B, Hq, Lq, D, device="cuda").half()
    lens = torch.tensor([32, 20], dtype=torch.int32, device="cuda")
    bad = torch.tensor([[-7, 1], [3, 1 << 30]], dtype=torch.int32, device="cuda")
    out, lse = _cuda.decode_attention_fwd(q, k, v, lens, None, None, 64, None, 0.125, block_table=bad)
    want, want_lse = _cuda.decode_attention_fwd(q, k, v, lens, None, None, 64, None, 0.125,
                                                block_table=bad.clamp(0, 3))
    torch.cuda.synchronize()
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
