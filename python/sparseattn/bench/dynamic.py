"""Content-based patterns (``python -m sparseattn.bench --suite dynamic``): TopKBlocks, SparseD and
routing attention, each as estimate + attention, with the estimate alone as a "layout build" row
(its share of the time).

GPU (bf16, B = 1, H = 16, D = 128):

* TopKBlocks (mean_pool, 128-blocks, window 1 + sink 1, top-k = 6% of the blocks, causal) at
  32K / 128K, forward and forward+backward, against dense causal torch SDPA (each backend),
  FlexAttention given the same block mask (``BlockMask.from_kv_blocks`` of our lists) and our own
  attention on the precomputed layout ("attention only": the target is estimate + attention
  <= 1.2x of it, and <= 0.15x dense at 128K);
* SparseD (128-blocks, select 0.3, generation = the last quarter) at 16K / 64K, bidirectional:
  the estimate, then attention on the cached layout (what every later step runs) against dense
  non-causal SDPA and FlexAttention with the same mask;
* routing attention (shared q/k, the paper's language-model setting; causal; C ~ sqrt(L / 32)
  clusters of w = 2 L / C items) at 8K / 32K against dense causal SDPA.

CPU (``--quick`` or not): tiny sizes through the PyTorch CPU path, in seconds; no GPU number is
implied. Every case is checked against its float64 oracle at a small size before it is timed.

Every attention row carries the work floor of its attention part (the estimate has its own
"layout build" row), from list counts on the host: ``listed tiles``, ``listed GFLOP`` and ``listed
GB`` as defined in :mod:`.attention`'s docstring (``4 n bq bk D`` FLOPs forward, ``18 n bq bk D``
forward+backward; each listed tile's operands read once plus one pass over each row tensor). For
TopKBlocks and SparseD, ``n`` counts the estimated layout of the case's first inputs (computed when
the case runs); for routing, the causal cluster layout: ``H C m (m + 1) / 2`` tiles of 64 x 64 with
``m = ceil(w / 64)``, over ``H C`` sequences of ``w`` items.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from .attention import layout_work, tile_work
from .harness import INPUTS, Case, flex_attention_fn, lazy, sdpa_backends

H_GPU, D_GPU = 16, 128
ROUTING_TILE = 64     # the layout tile of routing's cluster sequences (sparseattn/ops/routing/op.py)


def dynamic_suite(device: str, quick: bool, args=None) -> Iterable[Case]:
    """TopKBlocks, SparseD and routing cases (see the module docstring)."""
    if device == "cuda":
        dtype, H, D = torch.bfloat16, H_GPU, D_GPU
        sizes = {"topk": [32768, 131072], "sparsed": [16384, 65536], "routing": [8192, 32768]}
        directions = ["fwd", "fwd+bwd"]
    else:
        dtype, H, D = torch.float32, 2, 64
        sizes = {"topk": [1024], "sparsed": [1024], "routing": [1024]}
        directions = ["fwd"] if quick else ["fwd", "fwd+bwd"]
    if quick and device != "cuda":
        sizes = {k: [512] for k in sizes}
    lengths = getattr(args, "lengths", None)
    if lengths:
        sizes = {k: list(lengths) for k in sizes}
    flex = flex_attention_fn(device)
    for L in sizes["topk"]:
        yield from _topk_cases(device, dtype, H, L, D, directions, flex)
    for L in sizes["sparsed"]:
        yield from _sparsed_cases(device, dtype, H, L, D, flex)
    for L in sizes["routing"]:
        yield from _routing_cases(device, dtype, H, L, D, directions)


# ----------------------------------------------------------------------------- shared pieces
def _inputs(device, dtype, H, L, D, bwd):
    size = ("dynamic", 1, H, L, D, dtype, device)

    def make():
        return tuple(torch.randn(1, H, L, D, device=device, dtype=dtype, requires_grad=bwd) for _ in range(3))
    return lambda: INPUTS.get(size, f"qkv {'fwd+bwd' if bwd else 'fwd'}", make, device, rotate=True)


def _step(qkv, attn, bwd):
    q, k, v = qkv()
    out = attn(q, k, v)
    if bwd:
        out.backward(out)
    return out


def _sdpa_anchors(device, qkv, bwd, causal) -> Dict[str, Optional[Callable[[], object]]]:
    anchors = {}
    kind = "causal" if causal else "non-causal"
    for name, ctx in sdpa_backends(device, include_math=False).items():
        def run(ctx=ctx):
            if ctx is None:
                return _step(qkv, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), bwd)
            with ctx():
                return _step(qkv, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), bwd)
        anchors[f"dense {kind} {name}"] = run
    return anchors


def _flex_anchor(flex, layout, qkv, bwd, causal):
    """FlexAttention given our lists as its block mask (None where FlexAttention is not available)."""
    if flex is None:
        return None
    flex_fn, _ = flex

    def block_mask():
        from torch.nn.attention.flex_attention import BlockMask
        lay = layout()
        mod = (lambda b, h, q, kv: kv <= q) if causal else None
        return BlockMask.from_kv_blocks(lay.kv_num_blocks, lay.kv_indices, lay.full_kv_num_blocks,
                                        lay.full_kv_indices, BLOCK_SIZE=lay.block_size, mask_mod=mod)
    bm = lazy(block_mask)
    return lambda: _step(qkv, lambda q, k, v: flex_fn(q, k, v, block_mask=bm()), bwd)


def _check_layout_attention(make_layout, device, dtype, H, causal):
    """Small-size oracle check of estimate + attention: the kernels against float64 attention
    under the estimated layout's mask."""
    import sparseattn as sa

    def check():
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, H, 512, 64, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        lay = make_layout(q, k)
        got = sa.sparse_attention(q, k, v, lay)
        mask = lay.to_dense_mask()
        ref = sa.reference.attention(q, k, v, mask=mask)
        base = sa.reference.attention(q, k, v, mask=mask, dtype=dtype if device == "cuda" else torch.float32)
        sa.reference.assert_close("estimated layout", got, ref, base)
    return check


def _params(direction, H, L, D, dtype, **extra):
    return dict(direction=direction, B=1, H=H, L=L, D=D, dtype=str(dtype).replace("torch.", ""), **extra)


# ----------------------------------------------------------------------------- TopKBlocks
def _topk_cases(device, dtype, H, L, D, directions, flex):
    import sparseattn as sa

    bs = 128 if device == "cuda" else 64
    nk = math.ceil(L / bs)
    pat = sa.TopKBlocks(bs, topk=max(1, round(0.06 * nk)), estimate="mean_pool", window_blocks=1, sink_blocks=1)
    name = f"topk blocks mean_pool top{pat.topk}/{nk}"
    fwd_qkv = _inputs(device, dtype, H, L, D, False)
    layout = lazy(lambda: pat.layout_for(*fwd_qkv()[:2]))

    def build():
        lay = pat.layout_for(*fwd_qkv()[:2])
        if device == "cuda":
            torch.cuda.synchronize()
        return lay
    yield Case(op=f"layout build: {name} (estimate)", params=_params("fwd", H, L, D, dtype), run=build)
    check = _check_layout_attention(lambda q, k: sa.TopKBlocks(64, 2).layout_for(q, k), device, dtype, H, True)
    for direction in directions:
        bwd = direction == "fwd+bwd"
        qkv = _inputs(device, dtype, H, L, D, bwd)
        anchors = _sdpa_anchors(device, qkv, bwd, causal=True)
        anchors["attention only (same layout)"] = lambda qkv=qkv, bwd=bwd: _step(
            qkv, lambda q, k, v: sa.sparse_attention(q, k, v, layout()), bwd)
        anchors["flex attention (same block mask)"] = _flex_anchor(flex, layout, qkv, bwd, causal=True)
        flops = lambda bwd=bwd: 4.0 * H * D * layout().density * L * L * (3.5 if bwd else 1.0)  # noqa: E731
        yield _LazyFlopsCase(op=f"{name} (estimate + attention)", params=_params(direction, H, L, D, dtype),
                             run=lambda qkv=qkv, bwd=bwd: _step(qkv, lambda q, k, v: sa.sparse_attention(q, k, v, pat),
                                                                bwd),
                             anchors=anchors, check=check, flops_fn=flops,
                             work_fn=lambda bwd=bwd: layout_work(layout(), 1, H, D, dtype, bwd))


class _LazyFlopsCase(Case):
    """A Case whose FLOPs and work params depend on the estimated layout: computed when the harness
    first reads them (when the case runs: its inputs exist then)."""

    def __init__(self, *, flops_fn, work_fn=None, **kw):
        self._flops_fn, self._work_fn, self._work = flops_fn, work_fn, None
        super().__init__(**kw)

    @property
    def flops(self):
        return self._flops_fn()

    @flops.setter
    def flops(self, value):
        pass

    @property
    def params(self):
        if self._work is None and self._work_fn is not None:
            self._work = self._work_fn()
        return {**self._params, **(self._work or {})}

    @params.setter
    def params(self, value):
        self._params = value


# ----------------------------------------------------------------------------- SparseD
def _sparsed_cases(device, dtype, H, L, D, flex):
    import sparseattn as sa

    bs = 128 if device == "cuda" else 64
    sd = sa.SparseD(bs, select=0.3)
    gen = L - L // 4
    name = f"sparsed select {sd.select} bs {bs}"
    qkv = _inputs(device, dtype, H, L, D, False)
    layout = lazy(lambda: sd.estimate(*qkv()[:2], gen))

    def build():
        lay = sd.estimate(*qkv()[:2], gen)
        if device == "cuda":
            torch.cuda.synchronize()
        return lay
    yield Case(op=f"layout build: {name} (estimate, once per layer)", params=_params("fwd", H, L, D, dtype), run=build)
    anchors = _sdpa_anchors(device, qkv, False, causal=False)
    anchors["flex attention (same block mask)"] = _flex_anchor(flex, layout, qkv, False, causal=False)
    check = _check_layout_attention(lambda q, k: sa.SparseD(64, 0.3).estimate(q, k, 384), device, dtype, H, False)
    yield _LazyFlopsCase(op=f"{name} (attention on the cached layout)", params=_params("fwd", H, L, D, dtype),
                         run=lambda: _step(qkv, lambda q, k, v: sa.sparse_attention(q, k, v, layout()), False),
                         anchors=anchors, check=check, flops_fn=lambda: 4.0 * H * D * layout().density * L * L,
                         work_fn=lambda: layout_work(layout(), 1, H, D, dtype, False))


# ----------------------------------------------------------------------------- routing
def _routing_cases(device, dtype, H, L, D, directions):
    import sparseattn as sa

    C = max(2, round(math.sqrt(L / 32)))
    w = min(L, 2 * L // C)
    mu = lazy(lambda: F.layer_norm(torch.randn(H, C, D, device=device), (D,)))
    name = f"routing C={C} w={w}"

    def check():
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, H, 256, 64, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        cen = F.layer_norm(torch.randn(H, 4, 64, generator=g), (64,)).to(device)
        got, (qc, kc) = sa.routing_attention(q, None, v, cen, 96, share_qk=True, return_clusters=True)
        ref = sa.reference.routing_attention(q.cpu(), None, v.cpu(), qc.cpu(), kc.cpu(), share_qk=True)
        base = sa.reference.routing_attention(q.cpu(), None, v.cpu(), qc.cpu(), kc.cpu(), share_qk=True,
                                              dtype=dtype if device == "cuda" else torch.float32)
        sa.reference.assert_close("routing", got.cpu(), ref, base)

    for direction in directions:
        bwd = direction == "fwd+bwd"
        qkv = _inputs(device, dtype, H, L, D, bwd)
        flops = 4.0 * H * D * C * w * (w + 1) / 2 * (3.5 if bwd else 1.0)
        m = math.ceil(w / ROUTING_TILE)
        work = tile_work(H * C * m * (m + 1) // 2, (ROUTING_TILE, ROUTING_TILE), (w, w), 1, H * C, D,
                         torch.empty((), dtype=dtype).element_size(), bwd)
        yield Case(op=f"{name} (routing + attention)", params=_params(direction, H, L, D, dtype, **work),
                   run=lambda qkv=qkv, bwd=bwd: _step(
                       qkv, lambda q, k, v: sa.routing_attention(q, None, v, mu(), w, share_qk=True), bwd),
                   anchors=_sdpa_anchors(device, qkv, bwd, causal=True), flops=flops, check=check)
