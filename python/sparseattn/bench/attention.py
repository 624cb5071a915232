"""The attention suite: dense, causal and block-sparse prefill, forward and forward+backward,
against torch SDPA (each backend) and FlexAttention with the same block mask. Inputs, dense masks
and FlexAttention block masks live in the shared input cache (:data:`.harness.INPUTS`), one size
at a time."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from .harness import INPUTS, Case, flex_attention_fn, sdpa_backends


def attention_suite(device: str, quick: bool, args) -> Iterable[Case]:
    """Dense causal, dense non-causal and a 10%-density block layout; forward and forward+backward."""
    import sparseattn as sa

    if device == "cuda":
        dtype, lengths, dims = torch.bfloat16, [1024, 2048, 4096, 8192, 16384, 32768], [64, 128]
        tokens = 16384
    else:
        dtype, lengths, dims = torch.float32, [256, 512, 1024], [64]
        tokens = 1024
    if quick:
        lengths, dims = lengths[:2], dims[-1:]
    lengths = args.lengths or lengths
    dims = args.head_dims or dims
    flex = flex_attention_fn(device)
    bs = 128
    for D in dims:
        H = 2048 // D if device == "cuda" else 4
        for L in lengths:
            B = max(1, tokens // L)
            n = math.ceil(L / bs)
            gen = torch.Generator(device="cpu").manual_seed(L)
            table = torch.rand(n, n, generator=gen) < 0.1
            table |= torch.eye(n, dtype=torch.bool)  # every query block sees at least its diagonal
            table = table.to(device)
            for pattern in ("causal", "dense", "block 10%"):
                if pattern == "block 10%":
                    layout = sa.BlockLayout.from_block_mask(table[None, None], bs, (L, L))
                    pairs = layout.density * L * L
                else:
                    layout = None
                    pairs = L * (L + 1) / 2 if pattern == "causal" else L * L
                for direction in ("fwd", "fwd+bwd"):
                    yield _attention_case(sa, device, dtype, B, H, L, D, pattern, direction, layout, table, bs,
                                          pairs, flex)


def _attention_case(sa, device, dtype, B, H, L, D, pattern, direction, layout, table, bs, pairs, flex):
    bwd = direction == "fwd+bwd"
    causal = pattern == "causal"

    size = ("attention", B, H, L, D, dtype, device)

    def make():
        return tuple(torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=bwd) for _ in range(3))

    def dense_mask():
        if layout is None:
            return None
        return INPUTS.get(size, f"dense mask {pattern}", layout.to_dense_mask, device)

    def step(attn):
        q, k, v = INPUTS.get(size, f"qkv {direction}", make, device, rotate=True)
        out = attn(q, k, v)
        if bwd:
            out.backward(out)  # any gradient of the right shape
        return out

    def ours(q, k, v):
        if layout is not None:
            return sa.sparse_attention(q, k, v, layout)
        return sa.scaled_dot_product_attention(q, k, v, is_causal=causal)

    anchors = {}
    for name, ctx in sdpa_backends(device, include_math=L <= 4096).items():
        if ctx is None:
            anchors[name] = lambda: step(lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=dense_mask(), is_causal=causal))
            continue

        def run_sdpa(ctx=ctx):
            with ctx():
                return step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(),
                                                                           is_causal=causal))
        anchors[name] = run_sdpa
    if flex is not None:
        flex_fn, create_block_mask = flex
        if pattern == "causal":
            def mask_mod(b, h, q, kv):
                return q >= kv
        elif pattern == "dense":
            def mask_mod(b, h, q, kv):
                return q >= 0
        else:
            def mask_mod(b, h, q, kv):
                return table[q // bs, kv // bs]
        def block_mask():
            return INPUTS.get(size, f"flex block mask {pattern}", lambda: create_block_mask(
                mask_mod, None, None, L, L, device=device, BLOCK_SIZE=bs), device)
        anchors["flex attention"] = lambda: step(lambda q, k, v: flex_fn(q, k, v, block_mask=block_mask()))
    else:
        anchors["flex attention"] = None

    def check():
        Lc = min(L, 1024)
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, 2, Lc, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        if layout is not None:
            nc = math.ceil(Lc / bs)
            lay = sa.BlockLayout.from_block_mask(table[None, None, :nc, :nc].contiguous(), bs, (Lc, Lc))
            got = sa.sparse_attention(q, k, v, lay)
            mask = lay.to_dense_mask()
        else:
            got = sa.scaled_dot_product_attention(q, k, v, is_causal=causal)
            mask = None
        ref = sa.reference.attention(q, k, v, mask=mask, is_causal=causal)
        base = sa.reference.attention(q, k, v, mask=mask, is_causal=causal, dtype=dtype if device == "cuda" else torch.float32)
        sa.reference.assert_close(f"attention {pattern}", got, ref, base)

    flops = 4.0 * B * H * D * pairs * (3.5 if bwd else 1.0)
    return Case(op=f"attention {pattern}", params=dict(direction=direction, B=B, H=H, L=L, D=D,
                                                       dtype=str(dtype).replace("torch.", "")),
                run=lambda: step(ours), anchors=anchors, flops=flops, check=check)
