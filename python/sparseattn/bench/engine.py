"""Engine options (``python -m sparseattn.bench --suite engine``, issue 11 "Speed"): packed
variable-length batches, paged KV caches and key-padding masks, each against what users do
without them, measured in the same run.

GPU (bf16, D = 128; ``--quick`` runs the same sizes, forward rows only for varlen and padding):

* **varlen** -- ``sa.varlen_attention`` causal (bottom-right per sequence) on a packed batch of
  lengths drawn log-uniformly from 128..8192 with a fixed seed until ~64K tokens (``total`` =
  65536 minus at most 127), H = 16 query heads, Hkv = 16 and 8, forward and forward+backward.
  Anchors: the same sequences padded to the longest one, ``[N, H, Lmax, D]``, through torch SDPA
  (flash, efficient, cudnn; ``is_causal=True``, which with right padding is exact for every real
  row: the padded computation users run today; the pad / unpad copies are *not* timed, so the
  anchor is flattered), and FlexAttention on ``[1, H, total, D]`` with a document mask
  (``create_block_mask`` over per-token document ids, causal within each document).
  The case params carry ``padding ratio`` = N x Lmax / total (padded tokens per real token;
  3.65 for this mix: 31 sequences of 164..7718 tokens) and ``padded pairs ratio`` (padded
  causal pairs / real causal pairs).
  **Target: faster than padded SDPA by at least the padding ratio** (ratio column >= padding ratio).
* **paged decode** -- ``sa.decode_attention(q, pages, pages, cache_seqlens=lens,
  block_table=table)`` with B = 16, Hq = 32, Hkv = 8, Lq = 1, a 32K cache in pages of 64 and 16
  tokens, the page table a random permutation of the pages (fixed seed), every sequence full.
  Anchors: the same cache stored contiguously ``[B, Hkv, Lmax, D]`` through ``sa.decode_attention``
  (same ``cache_seqlens``), and torch SDPA (each backend) on that contiguous cache. GB/s counts the
  K/V bytes read. **Target: paged >= 0.95x contiguous** (ratio column >= 0.95).
* **padding mask sdpa** -- ``sa.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :])``
  (the key-padding route: one bit per key, padding-only tiles skipped) with B = 4, H = 16,
  L = 8K, right padding of 0 / 10 / 30 / 40% of the keys (20% on average), non-causal, forward and
  forward+backward. Anchors: the same call with the mask materialised as a dense bool
  ``[B, 1, Lq, Lk]`` (the element-mask route: what such a mask became before issue 11), the same
  call unmasked, and torch SDPA (each backend but math) with the ``[B, 1, 1, Lk]`` mask.
  **Target: no slower than unmasked + 5%** (the unmasked ratio column >= 1 / 1.05 = 0.952).

Targets are stated here, never asserted: no test times anything. TFLOP/s counts attended pairs
only (fwd+bwd = 3.5x forward).

CPU (``--device cpu``, ``--quick`` or not): tiny float32 sizes through what a CPU user gets (the
PyTorch CPU path, torch's CPU SDPA for the drop-in), in seconds; FlexAttention is n/a there. No GPU
number is implied. ``--lengths`` sets L of the padding-mask case and the cache of the decode cases.

Every case is first checked against its float64 oracle at a small size (forward, and the
gradients where the case times a backward); a failing op is refused, not timed.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from .harness import INPUTS, Case, flex_attention_fn, sdpa_backends

VARLEN_TOTAL, VARLEN_RANGE, VARLEN_SEED = 65536, (128, 8192), 11
DECODE_B, DECODE_HQ, DECODE_HKV, DECODE_CACHE, PAGE_SIZES = 16, 32, 8, 32768, (64, 16)
PAD_B, PAD_H, PAD_L, PAD_FRACTIONS = 4, 16, 8192, (0.0, 0.1, 0.3, 0.4)


def engine_suite(device: str, quick: bool, args=None) -> Iterable[Case]:
    """varlen, paged decode and padding-mask cases (see the module docstring)."""
    if device == "cuda":
        dtype, D = torch.bfloat16, 128
        varlen = dict(total=VARLEN_TOTAL, lo=VARLEN_RANGE[0], hi=VARLEN_RANGE[1], H=16, hkvs=(16, 8))
        decode = dict(B=DECODE_B, hq=DECODE_HQ, hkv=DECODE_HKV, caches=[DECODE_CACHE])
        pad = dict(B=PAD_B, H=PAD_H, lengths=[PAD_L])
        directions = ["fwd"] if quick else ["fwd", "fwd+bwd"]
    else:
        dtype, D = torch.float32, 64
        varlen = dict(total=512, lo=16, hi=128, H=2, hkvs=(2, 1))
        decode = dict(B=2, hq=4, hkv=2, caches=[1024])
        pad = dict(B=PAD_B, H=2, lengths=[256 if quick else 512])
        directions = ["fwd"] if quick else ["fwd", "fwd+bwd"]
    lengths = getattr(args, "lengths", None)
    if lengths:
        decode["caches"] = pad["lengths"] = list(lengths)
    flex = flex_attention_fn(device)
    lens = length_mix(varlen["total"], varlen["lo"], varlen["hi"], VARLEN_SEED)
    for hkv in varlen["hkvs"]:
        for direction in directions:
            yield _varlen_case(device, dtype, lens, varlen["H"], hkv, D, direction, flex)
    for L in pad["lengths"]:
        for direction in directions:
            yield _padding_case(device, dtype, pad["B"], pad["H"], L, D, direction)
    for L in decode["caches"]:
        for ps in PAGE_SIZES:
            yield _paged_case(device, dtype, decode["B"], decode["hq"], decode["hkv"], L, D, ps)


# ----------------------------------------------------------------------------- shared pieces
def length_mix(total: int, lo: int, hi: int, seed: int) -> List[int]:
    """Sequence lengths drawn log-uniformly from [lo, hi] (many short sequences, a few long ones)
    with a fixed seed, until the next one would pass ``total``; the remainder is a last sequence
    when it is at least ``lo``. The sum is ``total`` minus less than ``lo``."""
    g = torch.Generator().manual_seed(seed)
    lens: List[int] = []
    while True:
        n = int(round(math.exp(math.log(lo) + torch.rand((), generator=g).item() * math.log(hi / lo))))
        if sum(lens) + n > total:
            break
        lens.append(n)
    if total - sum(lens) >= lo:
        lens.append(total - sum(lens))
    return lens


def pad_packed(x: torch.Tensor, lens: List[int], lmax: int) -> torch.Tensor:
    """Packed ``[total, H, D]`` -> right-padded ``[N, H, lmax, D]`` (zeros after each sequence)."""
    out = x.new_zeros(len(lens), lmax, *x.shape[1:])
    start = 0
    for i, n in enumerate(lens):
        out[i, :n] = x[start:start + n]
        start += n
    return out.transpose(1, 2).contiguous()


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _step(fn: Callable, inputs: tuple, bwd: bool):
    out = fn(*inputs)
    if bwd:
        out.backward(out)  # any gradient of the right shape
    return out


def _in_ctx(ctx, fn: Callable):
    """Run fn under the SDPA backend context ``ctx`` (None: torch's default choice)."""
    if ctx is None:
        return fn()
    with ctx():
        return fn()


def _oracle(name: str, ours: Callable, ref: Callable, leaves: List[torch.Tensor], dtype, grads: bool) -> None:
    """ours(*leaves) against ref(*leaves64, dtype=float64), with ref(..., dtype=dtype) as the
    same-precision baseline (:func:`sparseattn.reference.assert_close`); the gradients of all
    leaves too when ``grads``."""
    import sparseattn as sa

    leaves = [t.detach().requires_grad_(grads) for t in leaves]
    out = ours(*leaves)
    g = torch.Generator(device="cpu").manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(out.device)
    got = (out, *torch.autograd.grad((out.double() * dout.double()).sum(), leaves)) if grads else (out,)
    results = {}
    for dt in (torch.float64, dtype):
        ls = [t.detach().to(dt).requires_grad_(grads) for t in leaves]
        o = ref(*ls, dtype=dt)
        results[dt] = (o, *torch.autograd.grad((o.double() * dout.double()).sum(), ls)) if grads else (o,)
    for part, a, r, b in zip(("out", "dq", "dk", "dv"), got, results[torch.float64], results[dtype]):
        sa.reference.assert_close(f"{name} {part}", a, r, b)


def _randn(*shape, g, device, dtype):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- varlen
def _varlen_case(device, dtype, lens, H, hkv, D, direction, flex) -> Case:
    import sparseattn as sa

    bwd = direction == "fwd+bwd"
    total, n, lmax = sum(lens), len(lens), max(lens)
    size = ("engine", "varlen", H, hkv, total, D, dtype, direction, device)
    cu_list = [0]
    for x in lens:
        cu_list.append(cu_list[-1] + x)

    def packed():
        """(q, k, v, cu_seqlens): FlashAttention's packed layout."""
        def make():
            q = torch.randn(total, H, D, device=device, dtype=dtype, requires_grad=bwd)
            k, v = (torch.randn(total, hkv, D, device=device, dtype=dtype, requires_grad=bwd) for _ in range(2))
            return q, k, v, torch.tensor(cu_list, dtype=torch.int32, device=device)
        return INPUTS.get(size, "packed", make, device, rotate=True)

    def padded():
        def make():
            q, k, v = (pad_packed(torch.randn(total, h, D, device=device, dtype=dtype), lens, lmax)
                       .requires_grad_(bwd) for h in (H, hkv, hkv))
            return q, k, v
        return INPUTS.get(size, "padded", make, device, rotate=True)

    def ours():
        q, k, v, cu = packed()
        return _step(lambda q, k, v: sa.varlen_attention(q, k, v, cu, cu, lmax, lmax, causal=True), (q, k, v), bwd)

    anchors: Dict[str, Optional[Callable[[], object]]] = {}
    gqa = hkv != H
    for name, ctx in sdpa_backends(device, include_math=False).items():
        anchors[f"padded {name}"] = lambda ctx=ctx: _in_ctx(ctx, lambda: _step(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), padded(), bwd))
    if flex is not None:
        flex_fn, create_block_mask = flex
        doc = torch.repeat_interleave(torch.arange(n), torch.tensor(lens)).to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

        def run_flex():
            bm = INPUTS.get(size, "flex document mask", lambda: create_block_mask(
                mask_mod, None, None, total, total, device=device, BLOCK_SIZE=128), device)
            q, k, v = INPUTS.get(size, "flex qkv", lambda: tuple(
                torch.randn(1, h, total, D, device=device, dtype=dtype, requires_grad=bwd) for h in (H, hkv, hkv)),
                device, rotate=True)
            return _step(lambda q, k, v: flex_fn(q, k, v, block_mask=bm, enable_gqa=gqa), (q, k, v), bwd)
        anchors["flex attention (document mask)"] = run_flex
    else:
        anchors["flex attention (document mask)"] = None

    def check():
        small = [63, 1, 97, 200, 130]
        cu = torch.tensor([0, *torch.tensor(small).cumsum(0).tolist()], dtype=torch.int32, device=device)
        g = torch.Generator(device="cpu").manual_seed(0)
        hq, hk = 4, 4 * hkv // H
        leaves = [_randn(sum(small), h, D, g=g, device=device, dtype=dtype) for h in (hq, hk, hk)]
        _oracle("varlen causal",
                lambda q, k, v: sa.varlen_attention(q, k, v, cu, cu, max(small), max(small), causal=True),
                lambda q, k, v, dtype: sa.reference.varlen_attention(q, k, v, cu, cu, causal=True, dtype=dtype),
                leaves, dtype, grads=True)

    pairs = sum(x * (x + 1) / 2 for x in lens)
    padding_ratio = round(n * lmax / total, 2)
    params = dict(direction=direction, B=n, H=H, Hkv=hkv, L=total, D=D, dtype=_dtype_name(dtype),
                  max_seqlen=lmax, **{"padding ratio": padding_ratio,
                                      "padded pairs ratio": round(n * lmax * (lmax + 1) / 2 / pairs, 2)})
    return Case(op=f"varlen causal Hkv={hkv} ({n} seqs, padding ratio {padding_ratio})", params=params, run=ours,
                anchors=anchors, flops=4.0 * H * D * pairs * (3.5 if bwd else 1.0), check=check)


# ----------------------------------------------------------------------------- padding mask
def _padding_case(device, dtype, B, H, L, D, direction) -> Case:
    import sparseattn as sa

    bwd = direction == "fwd+bwd"
    size = ("engine", "padding", B, H, L, D, dtype, direction, device)
    fractions = [PAD_FRACTIONS[i % len(PAD_FRACTIONS)] for i in range(B)]
    kept = [max(1, L - round(f * L)) for f in fractions]

    def inputs():
        q, k, v = INPUTS.get(size, "qkv", lambda: tuple(
            torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=bwd) for _ in range(3)),
            device, rotate=True)
        pad = INPUTS.get(size, "key padding", lambda: torch.arange(L, device=device)[None, :] < torch.tensor(
            kept, device=device)[:, None], device)
        return q, k, v, pad

    def dense_mask():
        return INPUTS.get(size, "dense mask", lambda: inputs()[3][:, None, None, :].expand(B, 1, L, L).contiguous(),
                          device)

    def run_with(mask_of):
        q, k, v, pad = inputs()
        return _step(lambda q, k, v: sa.scaled_dot_product_attention(q, k, v, attn_mask=mask_of(pad)), (q, k, v), bwd)

    anchors: Dict[str, Optional[Callable[[], object]]] = {
        "dense [B,1,Lq,Lk] mask (sparseattn)": lambda: run_with(lambda pad: dense_mask()),
        "unmasked (sparseattn)": lambda: run_with(lambda pad: None),
    }
    for name, ctx in sdpa_backends(device, include_math=False).items():
        def run_sdpa(ctx=ctx):
            q, k, v, pad = inputs()
            return _in_ctx(ctx, lambda: _step(lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=pad[:, None, None, :]), (q, k, v), bwd))
        anchors[f"padding mask {name}"] = run_sdpa

    def check():
        Lc = 300
        g = torch.Generator(device="cpu").manual_seed(0)
        pad = torch.arange(Lc)[None, :] < torch.tensor([Lc, 170, 63, 1])[:, None]
        pad = pad.to(device)
        leaves = [_randn(4, 2, Lc, D, g=g, device=device, dtype=dtype) for _ in range(3)]
        _oracle("padding mask sdpa",
                lambda q, k, v: sa.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :]),
                lambda q, k, v, dtype: sa.reference.attention(q, k, v, key_padding_mask=pad, dtype=dtype),
                leaves, dtype, grads=True)

    pairs = L * sum(kept)
    params = dict(direction=direction, B=B, H=H, L=L, D=D, dtype=_dtype_name(dtype),
                  padding=round(1 - sum(kept) / (B * L), 3))
    return Case(op="padding mask sdpa (key padding route)", params=params, run=lambda: run_with(
        lambda pad: pad[:, None, None, :]), anchors=anchors, flops=4.0 * H * D * pairs * (3.5 if bwd else 1.0),
        check=check)


# ----------------------------------------------------------------------------- paged decode
def paged_cache(k: torch.Tensor, page_size: int, g: torch.Generator):
    """Contiguous ``[B, Hkv, L, D]`` -> (pages ``[num_pages, page_size, Hkv, D]``, int32 block table
    ``[B, L / page_size]``): the pages of all sequences in a random order."""
    B, hkv, L, D = k.shape
    per = L // page_size
    perm = torch.randperm(B * per, generator=g).to(k.device)
    table = perm.view(B, per).to(torch.int32)
    pages = torch.empty(B * per, page_size, hkv, D, device=k.device, dtype=k.dtype)
    pages[perm] = k.permute(0, 2, 1, 3).reshape(B * per, page_size, hkv, D)
    return pages, table


def _paged_case(device, dtype, B, hq, hkv, L, D, ps) -> Case:
    import sparseattn as sa

    size = ("engine", "paged decode", B, hq, hkv, L, D, ps, dtype, device)

    def inputs():
        """(q, k pages, v pages, block table, cache_seqlens, contiguous k, contiguous v)."""
        def make():
            g = torch.Generator(device="cpu").manual_seed(ps)
            q = torch.randn(B, hq, 1, D, device=device, dtype=dtype)
            kc, vc = (torch.randn(B, hkv, L, D, device=device, dtype=dtype) for _ in range(2))
            kp, table = paged_cache(kc, ps, g)
            vp, _ = paged_cache(vc, ps, torch.Generator(device="cpu").manual_seed(ps))  # the same table
            lens = torch.full((B,), L, dtype=torch.int32, device=device)
            return q, kp, vp, table, lens, kc, vc
        return INPUTS.get(size, "q, paged and contiguous caches", make, device, rotate=True)

    def ours():
        q, kp, vp, table, lens, _, _ = inputs()
        return sa.decode_attention(q, kp, vp, cache_seqlens=lens, block_table=table)

    def contiguous():
        q, _, _, _, lens, kc, vc = inputs()
        return sa.decode_attention(q, kc, vc, cache_seqlens=lens)

    anchors: Dict[str, Optional[Callable[[], object]]] = {"contiguous decode (sparseattn)": contiguous}
    for name, ctx in sdpa_backends(device).items():
        def run_sdpa(ctx=ctx):
            q, _, _, _, _, kc, vc = inputs()
            return _in_ctx(ctx, lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True))
        anchors[f"contiguous {name}"] = run_sdpa

    def check():
        Lc = min(L, 512)
        g = torch.Generator(device="cpu").manual_seed(2)
        q = _randn(2, hq, 1, D, g=g, device=device, dtype=dtype)
        kc, vc = (_randn(2, hkv, Lc, D, g=g, device=device, dtype=dtype) for _ in range(2))
        kp, table = paged_cache(kc, ps, torch.Generator(device="cpu").manual_seed(3))
        vp, _ = paged_cache(vc, ps, torch.Generator(device="cpu").manual_seed(3))
        lens = torch.tensor([Lc, Lc // 3 + 5], dtype=torch.int32, device=device)
        _oracle(f"paged decode page {ps}",
                lambda q, k, v: sa.decode_attention(q, k, v, cache_seqlens=lens, block_table=table),
                lambda q, k, v, dtype: sa.reference.decode_attention(q, k, v, cache_seqlens=lens, block_table=table,
                                                                     dtype=dtype),
                [q, kp, vp], dtype, grads=False)

    elem = torch.tensor([], dtype=dtype).element_size()
    params = dict(B=B, Hq=hq, Hkv=hkv, Lq=1, cache=L, D=D, dtype=_dtype_name(dtype), page_size=ps)
    return Case(op=f"paged decode page {ps}", params=params, run=ours, anchors=anchors,
                flops=4.0 * B * hq * L * D, bytes=2.0 * B * hkv * L * D * elem, check=check)
