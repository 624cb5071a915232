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

import pytest
import torch

import sparseattn as sa
from sparseattn import _cuda, reference

from utils import assert_oracle

GPU = sa.cuda_available()
gpu = pytest.mark.skipif(not GPU, reason=f"no usable CUDA device: {sa.cuda_unavailable_reason()}")
no_gpu = pytest.mark.skipif(GPU, reason="a usable CUDA device is present")


# ----------------------------------------------------------------------------- build and import
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
        "    assert str(e).startswith('no usable CUDA device: the CUDA extension'), e\n"
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
@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (16, 1)])
def test_gpu_decode_dense_matches_oracle(dtype, D, Lq, heads):
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


# ----------------------------------------------------------------------------- GPU: layout builder
def _lists(layout):
    return [t.cpu() for t in layout.lists()]


@gpu
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("shape", [(1, 1, 7, 9), (2, 3, 16, 5), (1, 4, 33, 70)])
def test_gpu_layout_builder_identical_to_torch(causal, shape):
    bl, hl, nq, nk = shape
    bq, bk = 64, 32
    seq_lens = (nq * bq - 13, nk * bk - 5)
    for density in (0.0, 0.3, 1.0):
        bm = torch.rand(*shape, device="cuda") < density
        os.environ["SPARSEATTN_GPU_LAYOUT"] = "0"
        try:
            want = sa.BlockLayout.from_block_mask(bm, (bq, bk), seq_lens, causal=causal)
        finally:
            del os.environ["SPARSEATTN_GPU_LAYOUT"]
        got = sa.BlockLayout.from_block_mask(bm, (bq, bk), seq_lens, causal=causal)
        cpu = sa.BlockLayout.from_block_mask(bm.cpu(), (bq, bk), seq_lens, causal=causal)
        for g, w, c in zip(_lists(got), _lists(want), _lists(cpu)):
            assert g.dtype == torch.int32 and g.shape == w.shape and torch.equal(g, w) and torch.equal(g, c)


@gpu
def test_gpu_layout_builder_broadcast_views():
    """Expanded (stride-0) masks and transposed views are read in place."""
    from sparseattn.layout import _mask_to_lists

    base = torch.rand(1, 1, 40, 300, device="cuda") < 0.2
    masks = [base.expand(3, 2, 40, 300), base.transpose(-1, -2), base[..., ::3]]
    for m, (cnt, idx) in zip(masks, _cuda.mask_to_lists(masks)):
        wc, wi = _mask_to_lists(m)
        assert torch.equal(cnt, wc) and torch.equal(idx, wi)
