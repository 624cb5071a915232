"""Bad input gets a clear ValueError/TypeError naming the argument, before any kernel runs."""
import pytest
import torch

import sparseattn as sa
from utils import DEVICE, randn


def qkv(B=1, Hq=2, Hkv=2, Lq=64, Lk=64, D=16, dtype=torch.float32):
    return randn(B, Hq, Lq, D, dtype=dtype), randn(B, Hkv, Lk, D, dtype=dtype), randn(B, Hkv, Lk, D, dtype=dtype)


def layout(Lq=64, Lk=64, shape=(1, 1)):
    return sa.BlockLayout.from_block_mask(torch.ones(*shape, (Lq + 63) // 64, (Lk + 63) // 64, dtype=torch.bool,
                                                     device=DEVICE), 64, (Lq, Lk))


SDPA_CASES = [
    ("rank", lambda: (randn(16), *qkv()[1:]), {}, ValueError, r"query: expected at least 2 dims"),
    ("batch", lambda: (qkv(B=2)[0], *qkv(B=3)[1:]), {}, ValueError, r"expected batch dims that broadcast"),
    ("head_dim", lambda: (qkv()[0], *qkv(D=32)[1:]), {}, ValueError, r"key: expected head dim 16"),
    ("kv_len", lambda: (*qkv()[:2], randn(1, 2, 70, 16)), {}, ValueError, r"the same heads and length"),
    ("gqa_off", lambda: qkv(Hq=4, Hkv=2), {}, ValueError, r"enable_gqa=True"),
    ("gqa_div", lambda: qkv(Hq=3, Hkv=2), {"enable_gqa": True}, ValueError, r"divisible"),
    ("no_kv_heads", lambda: qkv(Hq=2, Hkv=0), {"enable_gqa": True}, ValueError, r"key: expected at least one head"),
    ("no_heads", lambda: qkv(Hq=0, Hkv=0), {"enable_gqa": True}, ValueError, r"query: expected at least one head"),
    ("mixed", lambda: (qkv()[0].half(), *qkv()[1:]), {}, TypeError, r"expected one dtype"),
    ("int", lambda: tuple(t.to(torch.int32) for t in qkv()), {}, TypeError, r"floating point"),
    ("not_tensor", lambda: ([1.0], *qkv()[1:]), {}, TypeError, r"query: expected a torch.Tensor"),
    ("mask_shape", lambda: qkv(), {"attn_mask": torch.ones(3, 64, 64, dtype=torch.bool, device=DEVICE)},
     ValueError, r"attn_mask: expected a shape broadcastable to \[1, 2, 64, 64\]"),
    ("mask_rank", lambda: qkv(), {"attn_mask": torch.ones(1, 1, 1, 64, 64, dtype=torch.bool, device=DEVICE)},
     ValueError, r"attn_mask"),
    ("mask_dtype", lambda: qkv(), {"attn_mask": torch.ones(64, 64, dtype=torch.int64, device=DEVICE)},
     TypeError, r"attn_mask: expected dtype torch.bool or a float dtype"),
    ("mask_and_causal", lambda: qkv(), {"attn_mask": torch.ones(64, 64, dtype=torch.bool, device=DEVICE),
                                        "is_causal": True}, ValueError, r"is_causal"),
]


@pytest.mark.parametrize("name,make,kw,exc,words", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_rejects(name, make, kw, exc, words):
    with pytest.raises(exc, match=words):
        sa.scaled_dot_product_attention(*make(), **kw)


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="expected one device"):
        sa.scaled_dot_product_attention(q, k.to("meta"), v)


SPARSE_CASES = [
    ("lengths", lambda: (*qkv(Lk=100), layout(64, 64)), ValueError, r"layout: expected seq_lens \(64, 100\)"),
    ("batch", lambda: (*qkv(B=1), layout(shape=(3, 1))), ValueError, r"layout: expected lists of shape"),
    ("heads", lambda: (*qkv(Hq=2), layout(shape=(1, 3))), ValueError, r"layout: expected lists of shape"),
    ("type", lambda: (*qkv(), torch.ones(1, 1, 1, 1, dtype=torch.bool)), TypeError, r"layout: expected a sparseattn.BlockLayout"),
    ("float64", lambda: (*qkv(dtype=torch.float64), layout()), TypeError, r"float16, bfloat16 or float32"),
    ("head_dim", lambda: (*qkv(D=320), layout()), ValueError, r"head dim <= 256"),
    ("value_dim", lambda: (*qkv()[:2], randn(1, 2, 64, 320), layout()), ValueError, r"v: expected head dim <= 256"),
    ("gqa_div", lambda: (*qkv(Hq=3, Hkv=2), layout()), ValueError, r"divisible"),
]


@pytest.mark.parametrize("name,make,exc,words", SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
def test_sparse_attention_rejects(name, make, exc, words):
    with pytest.raises(exc, match=words):
        sa.sparse_attention(*make())
