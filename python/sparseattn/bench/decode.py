"""Decode benchmark suite (``python -m sparseattn.bench --suite decode``).

GPU: B in {1, 4, 16}, Hq=32, Hkv=8, D=128, bf16, one new token against caches of 4K..256K keys
(1M for B=1 where memory allows); dense decode and a 10%-of-blocks layout. ``bytes`` counts the
K/V bytes actually read, so the table's GB/s sits next to the "copy bandwidth" rows (a torch copy
moving the same bytes, measured in the same run). Anchors: torch SDPA (each backend) and
FlexAttention decode with the same block mask. Inputs are allocated when a case first runs, in
the shared input cache (:data:`.harness.INPUTS`): the dense and the sparse row of one size share
the K/V cache, and it is freed when the next size starts (a 256K x 16 cache is 16 GB).
``--lengths`` sets the cache lengths (no 1M row then).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from .harness import INPUTS, Case, flex_attention_fn, sdpa_backends

HQ, HKV, D = 32, 8, 128
BLOCK_K = 64


def decode_suite(device: str, quick: bool, args=None) -> Iterable[Case]:
    """Cases of dense and 10%-sparse decode, plus the copy-bandwidth rows."""
    import sparseattn as sa

    if device == "cuda":
        dtype = torch.bfloat16
        batches = [1, 4, 16]
        caches = [4096, 32768, 131072, 262144]
        if quick:
            batches, caches = [1, 16], [4096, 65536]
        hq, hkv, d = HQ, HKV, D
    else:
        dtype, batches, caches, hq, hkv, d = torch.float32, [1, 2], [1024, 4096], 4, 2, 64
        if quick:
            batches, caches = [1], [1024]
    if getattr(args, "lengths", None):  # --lengths sets the cache lengths (and drops the 1M row)
        caches = list(args.lengths)
    flex = flex_attention_fn(device)
    seen_bytes = set()
    for L in caches + ([1 << 20] if device == "cuda" and not quick and not getattr(args, "lengths", None) else []):
        for B in batches:
            if L == 1 << 20 and B > 1:
                continue
            kv_bytes = 2 * B * hkv * L * d * torch.tensor([], dtype=dtype).element_size()
            if kv_bytes not in seen_bytes and device == "cuda":
                seen_bytes.add(kv_bytes)
                yield _copy_case(kv_bytes, device)
            for pattern in ("dense", "block 10%"):
                yield _decode_case(sa, device, dtype, B, hq, hkv, L, d, pattern, flex)


def _copy_case(nbytes: int, device: str) -> Case:
    n = nbytes // 2

    def run():
        src, dst = INPUTS.get(("copy", nbytes, device), "src dst", lambda: (
            torch.empty(n, dtype=torch.bfloat16, device=device).normal_(),
            torch.empty(n, dtype=torch.bfloat16, device=device)), device)
        return dst.copy_(src)

    # A copy moves its bytes twice (read + write): GB/s is the device's copy bandwidth.
    return Case(op="copy bandwidth", params=dict(bytes=nbytes), run=run, anchors={}, flops=0.0, bytes=2.0 * nbytes)


def _decode_case(sa, device, dtype, B, hq, hkv, L, d, pattern, flex) -> Case:
    nk = math.ceil(L / BLOCK_K)
    gen = torch.Generator(device="cpu").manual_seed(L)
    table = torch.rand(nk, generator=gen) < 0.1
    table[-1] = True  # the newest block (the query's own) is always read
    size = ("decode", B, hq, hkv, L, d, dtype, device)

    def make():
        q = torch.randn(B, hq, 1, d, device=device, dtype=dtype)
        k = torch.randn(B, hkv, L, d, device=device, dtype=dtype)
        v = torch.randn(B, hkv, L, d, device=device, dtype=dtype)
        return q, k, v

    def inputs():
        """(q, k, v, layout): rotated inputs, and the layout of this pattern (None: dense)."""
        q, k, v = INPUTS.get(size, "qkv", make, device, rotate=True)
        layout = None
        if pattern != "dense":
            layout = INPUTS.get(size, f"layout {pattern}", lambda: sa.BlockLayout.from_block_mask(
                table.to(device)[None, None, None], (16, BLOCK_K), (1, L)), device)
        return q, k, v, layout

    def ours():
        q, k, v, layout = inputs()
        return sa.decode_attention(q, k, v, layout)

    keys = L if pattern == "dense" else min(L, int(table.sum()) * BLOCK_K)
    elem = torch.tensor([], dtype=dtype).element_size()
    anchors: Dict[str, Optional[Callable[[], object]]] = {}
    dense_mask = None
    if pattern != "dense":
        dense_mask = table.repeat_interleave(BLOCK_K)[:L].to(device)[None, :]  # [1, L]: broadcasts
    for name, ctx in sdpa_backends(device).items():
        def run_sdpa(ctx=ctx):
            q, k, v, _ = inputs()
            if ctx is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, enable_gqa=True)
            with ctx():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, enable_gqa=True)
        anchors[name] = run_sdpa
    if flex is not None:
        flex_fn, create_block_mask = flex
        tbl = table.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return tbl[kv_idx // BLOCK_K] if pattern != "dense" else kv_idx >= 0

        def run_flex():
            q, k, v, _ = inputs()
            bm = INPUTS.get(size, f"flex block mask {pattern}", lambda: create_block_mask(
                mask_mod, None, None, 1, L, device=device, BLOCK_SIZE=BLOCK_K), device)
            return flex_fn(q, k, v, block_mask=bm, enable_gqa=True)
        anchors["flex attention"] = run_flex
    else:
        anchors["flex attention"] = None

    def check():
        Lc = min(L, 2048)
        g = torch.Generator(device="cpu").manual_seed(1)
        q, k, v = (torch.randn(2, hq, s, d, generator=g).to(device=device, dtype=dtype) for s in (1, Lc, Lc))
        lens = torch.tensor([Lc, Lc // 3], dtype=torch.int32, device=device)
        layout = None
        if pattern != "dense":
            ncheck = math.ceil(Lc / BLOCK_K)
            layout = sa.BlockLayout.from_block_mask(table[:ncheck].to(device)[None, None, None], (16, BLOCK_K), (1, Lc))
        k, v = k[:, :hkv], v[:, :hkv]
        got = sa.decode_attention(q, k, v, layout, cache_seqlens=lens)
        ref = sa.reference.decode_attention(q, k, v, layout, cache_seqlens=lens)
        base = sa.reference.decode_attention(q, k, v, layout, cache_seqlens=lens,
                                             dtype=dtype if device == "cuda" else torch.float32)
        sa.reference.assert_close(f"decode {pattern}", got, ref, base)

    return Case(op=f"decode {pattern}", params=dict(B=B, Hq=hq, Hkv=hkv, L=L, D=d, Lq=1,
                                                     dtype=str(dtype).replace("torch.", "")),
                run=ours, anchors=anchors, flops=4.0 * B * hq * keys * d, bytes=2.0 * B * hkv * keys * d * elem,
                check=check)

