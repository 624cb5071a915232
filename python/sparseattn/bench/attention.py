"""The attention suite: dense, causal and block-sparse prefill, forward and forward+backward,
against torch SDPA (each backend) and FlexAttention with the same block mask. Inputs, dense masks
and FlexAttention block masks live in the shared input cache (:data:`.harness.INPUTS`), one size
at a time.

Work floor of a sparse case (params ``listed tiles``, ``listed GFLOP``, ``listed GB``;
:func:`layout_work`, also used by the patterns and dynamic suites): the kernels visit exactly the
tiles the layout lists (``tests/triton_kernels/test_work_accounting.py``), so their work follows
from the list counts, summed on the host (no kernel runs). With ``n`` listed tiles of ``bq x bk``
over every (batch, head) plane, head dim ``D``, ``e`` bytes per element and ``R = B H Lq`` query
rows, ``C = B H Lk`` key rows:

* FLOPs (matrix products as the kernels run them, 2 per multiply-add): forward ``4 n bq bk D``
  (Q K^T, P V); forward+backward ``18 n bq bk D`` (the forward's 2 products, dK/dV's 4: Q K^T and
  dO V^T recomputed, P^T dO, dS^T Q, and dQ's 3: Q K^T, dO V^T, dS K). The TFLOP/s column counts
  attended pairs instead (and 3.5x the forward for forward+backward).
* bytes (each listed tile's operands read once per layout block, each row tensor once: the floor;
  a kernel tile smaller than the layout block reads the tile's operands again): forward
  ``n 2 bk D e`` (K, V) ``+ R (2 D e + 4)`` (Q read, O and LSE written); the backward adds
  ``R (2 D e + 4)`` (delta: O, dO), ``n (2 bq D e + 8 bq) + C 4 D e`` (dK/dV: Q, dO, LSE, delta
  per tile; K, V read, dK, dV written) and ``n 2 bk D e + R (3 D e + 8)`` (dQ: K, V per tile; Q,
  dO, LSE, delta read, dQ written). K/V counted per query head (no GQA sharing).

So a GPU row shows how far each kernel is from its own floor: ``max(listed GFLOP / matmul rate,
listed GB / copy bandwidth)`` against ``ms``, with the run's ``bf16 matmul TFLOP/s`` and ``copy
GB/s`` from the table's header.
"""
from __future__ import annotations

import math
from typing import Iterable, Tuple

import torch
import torch.nn.functional as F

from .harness import INPUTS, Case, flex_attention_fn, sdpa_backends


def listed_tiles(layout, B: int, H: int) -> int:
    """Tiles (partial + full) the layout lists over the ``B x H`` planes of a call (a broadcast
    list counts once per plane it serves): host sums of the list counts."""
    bl, hl = layout.shape
    per = int(layout.kv_num_blocks.sum()) + int(layout.full_kv_num_blocks.sum())
    return per * (B // bl) * (H // hl)


def tile_work(tiles: int, block_size: Tuple[int, int], seq_lens: Tuple[int, int], B: int, H: int, D: int,
              elem: int, bwd: bool) -> dict:
    """The params of a sparse case's work floor (module docstring) from its listed tiles."""
    bq, bk = block_size
    lq, lk = seq_lens
    rows_q, rows_k = B * H * lq, B * H * lk
    flops = (18 if bwd else 4) * tiles * bq * bk * D
    nbytes = tiles * 2 * bk * D * elem + rows_q * (2 * D * elem + 4)
    if bwd:
        nbytes += (rows_q * (2 * D * elem + 4) + tiles * (2 * bq * D * elem + 8 * bq) + rows_k * 4 * D * elem
                   + tiles * 2 * bk * D * elem + rows_q * (3 * D * elem + 8))
    return {"listed tiles": tiles, "listed GFLOP": float(f"{flops / 1e9:.4g}"),
            "listed GB": float(f"{nbytes / 1e9:.4g}")}


def layout_work(layout, B: int, H: int, D: int, dtype: torch.dtype, bwd: bool) -> dict:
    """:func:`tile_work` of a BlockLayout for q ``[B, H, Lq, D]`` in ``dtype``."""
    return tile_work(listed_tiles(layout, B, H), layout.block_size, layout.seq_lens, B, H, D,
                     torch.empty((), dtype=dtype).element_size(), bwd)


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
    work = {} if layout is None else layout_work(layout, B, H, D, dtype, bwd)
    return Case(op=f"attention {pattern}", params=dict(direction=direction, B=B, H=H, L=L, D=D,
                                                       dtype=str(dtype).replace("torch.", ""), **work),
                run=lambda: step(ours), anchors=anchors, flops=flops, check=check)
