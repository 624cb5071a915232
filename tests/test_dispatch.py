"""Visible fallbacks: every path off the fused kernels records why (per thread) and warns once per
reason; the configuration table is the one reader of SPARSEATTN_* variables."""
import threading
import warnings

import pytest
import torch

import sparseattn as sa
from sparseattn import _config, _dispatch

from utils import DEVICE, randn


@pytest.fixture
def fresh_reasons(monkeypatch):
    """Forget which reasons were already reported, for this test only."""
    monkeypatch.setattr(_dispatch, "_reported", set())


def _qkv(dtype=torch.float32, L=64):
    return (randn(1, 2, L, 32, dtype=dtype) for _ in range(3))


def test_fused_call_has_no_reason():
    q, k, v = _qkv()
    sa.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert sa.last_fallback_reason() is not None
    sa.sparse_attention(q, k, v, sa.SlidingWindow(16))
    assert sa.last_backend() == "triton"
    assert sa.last_fallback_reason() is None  # the previous call's reason does not linger


def test_sdpa_fallback_reason_and_one_warning(fresh_reasons):
    q, k, v = _qkv()
    with pytest.warns(sa.FallbackWarning, match="dropout_p > 0"):
        sa.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    assert (sa.last_backend(), sa.last_fallback_reason()) == ("torch", "dropout_p > 0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.FallbackWarning)
        sa.scaled_dot_product_attention(q, k, v, dropout_p=0.1)   # the same reason: not warned again
        with pytest.raises(sa.FallbackWarning, match="head dim 320"):
            q2, k2, v2 = (randn(1, 1, 8, 320) for _ in range(3))
            sa.scaled_dot_product_attention(q2, k2, v2)            # a new reason: warned (an error here)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU routing")
def test_cpu_reasons(monkeypatch, fresh_reasons):
    from sparseattn.triton_kernels import probe

    monkeypatch.setattr(probe, "interpreter_bf16_dot_ok", lambda: False)   # an interpreter without the fix
    q, k, v = _qkv(torch.bfloat16)
    with pytest.warns(sa.FallbackWarning, match="bfloat16"):
        sa.sparse_attention(q, k, v, sa.SlidingWindow(16))
    assert sa.last_backend() == "cpu" and "bfloat16" in sa.last_fallback_reason()
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    q, k, v = _qkv()
    with pytest.warns(sa.FallbackWarning, match="SPARSEATTN_CPU_PATH=1"):
        sa.lightning_attention(q, k, v)
    assert sa.last_backend() == "cpu" and sa.last_fallback_reason() == "SPARSEATTN_CPU_PATH=1"
    sa.decode_attention(q[:, :, :1], k, v)
    assert sa.last_backend() == "cpu" and "decode" in sa.last_fallback_reason()


def test_backend_and_reason_are_per_thread():
    q, k, v = _qkv()
    sa.sparse_attention(q, k, v, sa.SlidingWindow(16))
    seen = {}

    def other():
        seen["before"] = (sa.last_backend(), sa.last_fallback_reason())
        sa.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
        seen["after"] = (sa.last_backend(), sa.last_fallback_reason())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["before"] == (None, None)
    assert seen["after"] == ("torch", "dropout_p > 0")
    assert (sa.last_backend(), sa.last_fallback_reason()) == ("triton", None)


def test_config_table(monkeypatch):
    assert set(_config.DEFAULTS) >= {"SPARSEATTN_CPU_PATH", "SPARSEATTN_CONFIG", "SPARSEATTN_AUTOTUNE",
                                     "SPARSEATTN_GPU_LAYOUT", "SPARSEATTN_NAN_FILL"}
    for name in _config.DEFAULTS:
        assert name in _config.__doc__, f"{name} missing from the documented table"
    monkeypatch.setenv("SPARSEATTN_GPU_LAYOUT", " 0 ")
    assert not _config.flag("SPARSEATTN_GPU_LAYOUT")
    monkeypatch.delenv("SPARSEATTN_GPU_LAYOUT")
    assert _config.flag("SPARSEATTN_GPU_LAYOUT")
    with pytest.raises(KeyError, match="SPARSEATTN_TYPO"):
        _config.get("SPARSEATTN_TYPO")
