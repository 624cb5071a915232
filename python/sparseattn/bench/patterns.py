"""Static-pattern benchmark suite (``python -m sparseattn.bench --suite patterns``).

GPU: each pattern (SlidingWindow, PowerAttention, BlockSparse of a document mask, PerHead) at
L = 8K..128K, B = 1, H = 16, D = 128, bf16, forward and forward+backward, next to dense causal
torch SDPA (each backend) and FlexAttention with the same mask (its ``mask_mod``, 128-blocks),
plus one "layout build" row per pattern and length (the cost of ``pattern.layout``, to compare
with the attention time). CPU (``--quick`` or not): tiny sizes through the PyTorch CPU path.
Inputs and FlexAttention block masks are created when a case first runs, in the shared input
cache (:data:`.harness.INPUTS`); every pattern is checked against the float64 oracle
(``dense_mask`` at a small length) before it is timed. What each pattern attends, its density and
how it becomes a BlockLayout: docs/patterns.md.

Every pattern row carries its work floor, from the layout's list counts on the host: ``listed
tiles`` (partial + full tiles over the B x H planes), ``listed GFLOP`` (the kernels' matrix
products over those tiles: ``4 n bq bk D`` forward, ``18 n bq bk D`` forward+backward) and
``listed GB`` (each listed tile's K/V, or Q/dO in dK/dV, read once, plus one pass over each row
tensor); the formulas are :mod:`.attention`'s (its docstring). Set against the row's ms and the
run's matmul rate and copy bandwidth, they show how far each kernel is from its own floor.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from .attention import layout_work
from .harness import INPUTS, Case, flex_attention_fn, lazy, sdpa_backends

H_GPU, D_GPU = 16, 128


def _doc_ids(L: int, device, n_docs: int = 8):
    g = torch.Generator().manual_seed(L)
    cuts = torch.randperm(L - 1, generator=g)[: n_docs - 1] + 1
    doc = torch.zeros(L, dtype=torch.long)
    doc[cuts] = 1
    return doc.cumsum(0).to(device)


def _pattern_defs(device: str, H: int):
    """name -> (factory L -> pattern, factory L -> FlexAttention mask_mod (rows = positions, Lq = Lk))."""
    import sparseattn as sa

    W, S = 4096, 64
    pb = 256

    def window_mod(L):
        return lambda b, h, q, kv: (kv <= q) & ((q - kv < W) | (kv < S))

    def power_vis(q, kv, bs, wb, sb):
        d = q // bs - kv // bs
        return (kv <= q) & (((d & (d - 1)) == 0) | (d < wb) | (kv // bs < sb))

    def doc_mod(L):
        doc = _doc_ids(L, device)
        return lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q)

    def doc_pattern(L):
        doc = _doc_ids(L, device)
        return sa.BlockSparse.from_mask_mod(lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q), None, None, L, L,
                                            block_size=128, device=device)

    # half the heads dense causal, half PowerAttention: both plain bottom-right causal in-kernel,
    # so the layout carries no bitmask at all. (With heads whose windows differ, a head's own
    # window and sinks become bitmasks only on the tiles where they cut, its partial tiles:
    # PerHead([SlidingWindow(10**9)] * 2 + [SlidingWindow(256, sinks=4)] * 2) at L = 2048 lists
    # 388 tiles, 86 of them with bits. See docs/patterns.md, PerHead.)
    half = H // 2

    def per_head(L):
        return sa.PerHead([sa.SlidingWindow(10 ** 9)] * half + [sa.PowerAttention(128)] * (H - half))

    def per_head_mod(L):
        return lambda b, h, q, kv: (h < half) & (kv <= q) | (h >= half) & power_vis(q, kv, 128, 1, 1)

    return {
        f"sliding window {W}+{S}": (lambda L: sa.SlidingWindow(W, sinks=S), window_mod),
        "power attention b=64": (lambda L: sa.PowerAttention(64, 1, 1),
                                 lambda L: (lambda b, h, q, kv: power_vis(q, kv, 64, 1, 1))),
        f"power attention b={pb} w=4": (lambda L: sa.PowerAttention(pb, 4, 1),
                                       lambda L: (lambda b, h, q, kv: power_vis(q, kv, pb, 4, 1))),
        "block sparse documents": (doc_pattern, doc_mod),
        "per head causal/power": (per_head, per_head_mod),
    }


def patterns_suite(device: str, quick: bool, args=None) -> Iterable[Case]:
    """Cases of every static pattern, fwd and fwd+bwd, plus layout-build rows."""
    if device == "cuda":
        dtype, lengths, H, D = torch.bfloat16, [8192, 16384, 32768, 65536, 131072], H_GPU, D_GPU
        if quick:
            lengths = [8192, 131072]
    else:
        dtype, lengths, H, D = torch.float32, [512, 1024], 4, 64
        if quick:
            lengths = [512]
    lengths = getattr(args, "lengths", None) or lengths
    flex = flex_attention_fn(device)
    for name, (make_pattern, make_mod) in _pattern_defs(device, H).items():
        for L in lengths:
            pattern = lazy(lambda make_pattern=make_pattern, L=L: make_pattern(L))
            layout = lazy(lambda pattern=pattern, L=L: pattern().layout(L, L, device))
            yield _build_case(name, pattern, L, H, device)
            for direction in ("fwd", "fwd+bwd"):
                yield _pattern_case(name, pattern, layout, make_mod, make_pattern, device, dtype, H, L, D,
                                    direction, flex)


def _build_case(name, pattern, L, H, device) -> Case:
    def run():
        lay = pattern().layout(L, L, device)
        if device == "cuda":
            torch.cuda.synchronize()
        return lay
    return Case(op=f"layout build: {name}", params=dict(L=L, H=H), run=run, anchors={})


def _pattern_case(name, pattern, layout, make_mod, make_pattern, device, dtype, H, L, D, direction, flex) -> Case:
    import sparseattn as sa

    bwd = direction == "fwd+bwd"
    B = 1

    size = ("patterns", B, H, L, D, dtype, device)

    def make():
        return tuple(torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=bwd) for _ in range(3))

    def step(attn):
        q, k, v = INPUTS.get(size, f"qkv {direction}", make, device, rotate=True)
        out = attn(q, k, v)
        if bwd:
            out.backward(out)
        return out

    anchors: Dict[str, Optional[Callable[[], object]]] = {}
    for aname, ctx in sdpa_backends(device, include_math=False).items():
        label = f"dense causal {aname}"
        if ctx is None:
            anchors[label] = lambda: step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            continue

        def run_sdpa(ctx=ctx):
            with ctx():
                return step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        anchors[label] = run_sdpa
    if flex is not None:
        flex_fn, create_block_mask = flex
        heads = H if name.startswith("per head") else None      # the mask_mod depends on h only there

        def make_block_mask():
            try:   # compiled: never materialises the L x L mask (128K x 128K per head otherwise)
                return create_block_mask(make_mod(L), None, heads, L, L, device=device, BLOCK_SIZE=128,
                                         _compile=True)
            except TypeError:   # an older torch without _compile
                return create_block_mask(make_mod(L), None, heads, L, L, device=device, BLOCK_SIZE=128)
        def block_mask():
            return INPUTS.get(size, f"flex block mask {name}", make_block_mask, device)
        anchors["flex attention (same mask)"] = lambda: step(lambda q, k, v: flex_fn(q, k, v, block_mask=block_mask()))
    else:
        anchors["flex attention (same mask)"] = None

    def check():
        Lc = min(L, 1024)
        p = make_pattern(Lc)
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, H, Lc, 64, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        mask = p.dense_mask(Lc, Lc).to(device)
        got = sa.sparse_attention(q, k, v, p.layout(Lc, Lc, device))
        ref = sa.reference.attention(q, k, v, mask=mask)
        base = sa.reference.attention(q, k, v, mask=mask, dtype=dtype if device == "cuda" else torch.float32)
        sa.reference.assert_close(f"pattern {name}", got, ref, base)

    flops = 4.0 * B * H * D * layout().density * L * L * (3.5 if bwd else 1.0)   # lists only: small
    return Case(op=f"pattern {name}", params=dict(direction=direction, B=B, H=H, L=L, D=D,
                                                  dtype=str(dtype).replace("torch.", ""),
                                                  **layout_work(layout(), B, H, D, dtype, bwd)),
                run=lambda: step(lambda q, k, v: sa.sparse_attention(q, k, v, layout())), anchors=anchors,
                flops=flops, check=check)
