"""Differential fuzzing of the attention ops against the float64 oracle.

``python -m sparseattn.fuzz --minutes N --seed S`` draws random cases (shapes, GQA, dtypes,
strides, patterns, masks, biases, the engine's score options: key padding, per-key bias, softcap,
ALiBi; the SDPA drop-in's routes: padding masks, per-key float masks, CausalBias, other ranks and
broadcast batches; packed varlen batches; HiP with its estimated mask; decode over ragged, paged or
strided caches with layouts, patterns and the score options), runs forward and backward (decode:
forward), compares output and gradients with
``sparseattn.reference`` under the oracle rule (:func:`sparseattn.reference.assert_close`), and
for a failure prints the case, shrunk to a smaller one that still fails, as a one-line
reproducer (``python -m sparseattn.fuzz --case '<json>'``). The tests run a bounded,
deterministic sample of the same cases (``tests/test_fuzz.py``).

A case is a plain dict (JSON), so a failure found anywhere can be replayed anywhere. Its
tensors are drawn on the CPU (the same numbers on every machine) and moved to the case's
``device`` (``--device``, default ``cpu``): ``--device cuda`` fuzzes the CUDA kernels on a GPU.
CPU tensors run the PyTorch CPU path, or with ``TRITON_INTERPRET=1`` the Triton kernels through
the interpreter.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from typing import Dict, Optional

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUT_PATTERNS = ("block_mask", "mask_mod", "sliding_window", "power", "per_head")
SDPA_PATTERNS = ("element_mask", "float_bias", "causal_sdpa", "padding_sdpa", "key_bias_sdpa", "lower_right_sdpa",
                 "rank3_sdpa", "broadcast_sdpa")
PATTERNS = LAYOUT_PATTERNS + SDPA_PATTERNS + ("varlen", "hip", "decode")
DECODE_LAYOUTS = ("dense", "block", "window", "power")
OPTIONS = ("key_padding", "key_bias", "softcap", "alibi")   # sparse_attention's score options
SDPA_OPTIONS = ("softcap", "alibi")                          # the drop-in's keyword extensions
STRIDES = ("contiguous", "transposed", "sliced", "expanded")
HEAD_DIMS = (16, 32, 64, 8, 24, 40, 72)


def draw_case(rng: random.Random, max_len: int = 300) -> Dict:
    """One random case: sizes from 1 to ``max_len``, a pattern and its parameters, a dtype, strides."""
    hkv = rng.choice((1, 2))
    length = lambda: rng.choice((1, rng.randint(2, 64), rng.randint(1, max_len)))  # noqa: E731
    case = {"B": rng.randint(1, 2), "Hkv": hkv, "group": rng.choice((1, 2)), "Lq": length(), "Lk": length(),
            "D": rng.choice(HEAD_DIMS), "dtype": rng.choice(tuple(DTYPES)), "strides": rng.choice(STRIDES),
            "pattern": rng.choice(PATTERNS), "seed": rng.randint(0, 2 ** 31 - 1)}
    p = case["pattern"]
    if p == "block_mask":
        case.update(block=rng.choice((16, 32, 64)), density=rng.choice((0.2, 0.5, 0.9)))
    elif p == "mask_mod":
        case.update(rules=sorted(rng.sample(("causal", "window", "document", "prefix"), rng.randint(1, 3))),
                    window=rng.randint(1, 80), block=rng.choice((16, 32, 64)))
    elif p == "sliding_window":
        case.update(window=rng.randint(1, 120), sinks=rng.choice((0, 0, 1, 4)))
    elif p == "power":
        case.update(block=rng.choice((16, 32, 64)), window_blocks=rng.randint(1, 2), sink_blocks=rng.randint(0, 1))
    elif p == "per_head":
        case.update(window=rng.randint(1, 120), sinks=rng.choice((0, 4)))
    elif p == "varlen":
        causal = rng.random() < 0.6      # a window needs the causal rule, sinks a window (varlen's contract)
        window = rng.choice((None, rng.randint(1, 60))) if causal else None
        case.update(lens=[[rng.randint(0, 70), rng.randint(1, 90)] for _ in range(rng.randint(1, 4))],
                    causal=causal, window=window, sinks=rng.choice((0, 0, 3)) if window else 0)
    elif p == "hip":
        bk = rng.choice((1, 2, 4, 8, 16))
        case.update(Lk=max(case["Lq"], case["Lk"]), block_size_q=rng.choice((16, 32)), block_size_k=bk,
                    mask_k=bk * rng.randint(1, 4), window=rng.randint(0, 40), sinks=rng.choice((0, 2, 8)))
    elif p == "decode":   # 1-16 new tokens against a cache (paged: whole pages of 16 or 32 rows)
        case.update(Lq=rng.randint(1, 16), layout=rng.choice(DECODE_LAYOUTS), block=rng.choice((16, 32, 64)),
                    window=rng.randint(1, 120), sinks=rng.choice((0, 4)), ragged=rng.random() < 0.6,
                    page=rng.choice((0, 0, 16, 32)))
    if p in LAYOUT_PATTERNS or p in ("varlen", "decode") or p in SDPA_PATTERNS[:3]:
        pool = OPTIONS if p in LAYOUT_PATTERNS or p == "decode" else SDPA_OPTIONS
        if rng.random() < 0.5:
            case["options"] = sorted(rng.sample(pool, rng.randint(1, len(pool))))
            if "softcap" in case["options"]:
                case["softcap"] = rng.choice((0.5, 5.0, 30.0))
    return case


def _device(case: Dict) -> torch.device:
    return torch.device(case.get("device", "cpu"))


def _inputs(case: Dict):
    g = torch.Generator().manual_seed(case["seed"])
    dev = _device(case)
    dtype = DTYPES[case["dtype"]]
    B, Hkv, Lq, Lk, D = case["B"], case["Hkv"], case["Lq"], case["Lk"], case["D"]
    Hq = Hkv * case["group"]

    def make(h, L):     # drawn contiguous on the CPU, moved, then given the case's strides
        shape = (B, h, L, D)
        kind = case["strides"]
        if kind == "transposed":      # [B, L, H, D] storage, as transformers' projections give
            return torch.randn(B, L, h, D, generator=g).to(dev, dtype).transpose(1, 2)
        if kind == "sliced":          # every other element of a wider head dim
            return torch.randn(B, h, L, 2 * D, generator=g).to(dev, dtype)[..., ::2]
        if kind == "expanded" and B > 1:     # one batch read with stride 0
            return torch.randn(1, h, L, D, generator=g).to(dev, dtype).expand(shape)
        return torch.randn(shape, generator=g).to(dev, dtype)
    return make(Hq, Lq), make(Hkv, Lk), make(Hkv, Lk)


def _doc_ids(L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (L,), generator=g).sort().values


def _pattern(case: Dict, Hq: int):
    """(pattern for sparse_attention, None) or (None, SDPA kwargs) for the drop-in."""
    import sparseattn as sa

    p, Lq, Lk, dev = case["pattern"], case["Lq"], case["Lk"], _device(case)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    if p == "block_mask":
        bs = case["block"]
        if Lq > Lk:   # the query axis of a BlockSparse indexes rows when it cannot index positions
            bm = torch.rand(1, Hq, math.ceil(Lq / bs), math.ceil(Lk / bs), generator=g) < case["density"]
        else:
            bm = torch.rand(1, Hq, math.ceil(Lk / bs), math.ceil(Lk / bs), generator=g) < case["density"]
        return sa.BlockSparse(bm.to(dev), bs), None
    if p == "mask_mod":
        doc_q = doc_k = _doc_ids(max(Lq, Lk), case["seed"]).to(dev)
        rules, window, off = case["rules"], case["window"], Lk - Lq

        def mask_mod(b, h, q_idx, kv_idx):
            pos = q_idx + off
            keep = torch.ones_like(pos >= kv_idx)
            if "causal" in rules:
                keep = keep & (kv_idx <= pos)
            if "window" in rules:
                keep = keep & ((pos - kv_idx).abs() < window)
            if "document" in rules:
                keep = keep & (doc_q[pos.clamp(0, len(doc_q) - 1)] == doc_k[kv_idx])
            if "prefix" in rules:
                keep = keep | (kv_idx < 8)
            return keep
        return sa.BlockSparse.from_mask_mod(mask_mod, None, None, Lq, Lk, case["block"], device=dev), None
    if p == "sliding_window":
        return sa.SlidingWindow(case["window"], sinks=case["sinks"]), None
    if p == "power":
        return sa.PowerAttention(case["block"], case["window_blocks"], case["sink_blocks"]), None
    if p == "per_head":
        heads = [sa.SlidingWindow(10 ** 9), sa.SlidingWindow(case["window"], sinks=case["sinks"])]
        return sa.PerHead([heads[h % 2] for h in range(Hq)]), None
    B = case["B"]
    if p == "element_mask":
        return None, {"attn_mask": (torch.rand(B, 1, Lq, Lk, generator=g) < 0.6).to(dev)}
    if p == "float_bias":
        return None, {"attn_mask": torch.randn(1, Hq, Lq, Lk, generator=g).to(dev)}
    if p == "padding_sdpa":     # Hugging Face's padding mask: the key padding route
        return None, {"attn_mask": (torch.rand(B, 1, 1, Lk, generator=g) < 0.7).to(dev)}
    if p == "key_bias_sdpa":    # a per-key float mask: the key bias route
        bias = torch.randn(rng_choice(g, (1, B)), rng_choice(g, (1, Hq)), 1, Lk, generator=g)
        return None, {"attn_mask": bias.masked_fill(torch.rand(bias.shape, generator=g) < 0.2, float("-inf")).to(dev)}
    if p == "lower_right_sdpa":
        from torch.nn.attention.bias import causal_lower_right
        return None, {"attn_mask": causal_lower_right(Lq, Lk)}
    return None, {"is_causal": True}


def rng_choice(g: torch.Generator, options):
    return options[int(torch.randint(len(options), (1,), generator=g))]


def _options(case: Dict, B: int, Hq: int, Lk: int) -> Dict:
    """The score options the case asks for (sparse_attention's keywords; SDPA's are softcap, alibi)."""
    g = torch.Generator().manual_seed(case["seed"] + 3)
    opts = {}
    for name in case.get("options", ()):
        if name == "key_padding":
            opts["key_padding_mask"] = torch.rand(B, Lk, generator=g) < 0.75
        elif name == "key_bias":
            kb = torch.randn(rng_choice(g, (1, B)), rng_choice(g, (1, Hq)), Lk, generator=g)
            opts["key_bias"] = kb.masked_fill(torch.rand(kb.shape, generator=g) < 0.15, float("-inf"))
        elif name == "softcap":
            opts["softcap"] = case["softcap"]
        elif name == "alibi":
            shape = (Hq,) if case["pattern"] == "varlen" else rng_choice(g, ((Hq,), (B, Hq)))  # varlen: [Hq]
            opts["alibi_slopes"] = torch.rand(shape, generator=g) * 0.5
    return {k: v.to(_device(case)) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}


def _varlen(case: Dict, q, k, v, opts):
    """Packed inputs ``[total, H, D]`` from the drawn ``[1, H, total, D]`` ones; the op and its oracle."""
    import sparseattn as sa

    lens = case["lens"]
    cu_q, cu_k = (torch.tensor([0] + [n[i] for n in lens]).cumsum(0).to(_device(case), torch.int32) for i in (0, 1))
    kw = dict(causal=case["causal"], window=case["window"], sinks=case["sinks"], **opts)

    def op(q, k, v):
        packed = [t[0].transpose(0, 1) for t in (q, k, v)]
        return sa.varlen_attention(*packed, cu_q, cu_k, max(a for a, _ in lens), max(b for _, b in lens), **kw)

    def ref(q, k, v, dtype):
        packed = [t[0].transpose(0, 1) for t in (q, k, v)]
        return sa.reference.varlen_attention(*packed, cu_q, cu_k, dtype=dtype, **kw)
    return op, ref


def _hip(case: Dict):
    import sparseattn as sa

    hip = sa.HiP(mask_k=case["mask_k"], block_size_q=case["block_size_q"], block_stride_q=1,
                 block_size_k=case["block_size_k"], window=case["window"], sinks=case["sinks"])
    state = {}

    def op(q, k, v):
        state["mask"] = sa.hip_mask(q.detach(), k.detach(), hip)     # the kernel's own estimate
        return sa.hip_attention(q, k, v, hip, state["mask"])

    def ref(q, k, v, dtype):
        return sa.reference.hip_attention(q.to(dtype), k.to(dtype), v.to(dtype), hip, state["mask"])
    return op, ref


def _op_and_oracle(case: Dict, q, k, v):
    """``op(q, k, v)`` (sparseattn) and ``ref(q, k, v, dtype)`` (the oracle) of the case."""
    import sparseattn as sa

    p = case["pattern"]
    B, Hq, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    opts = _options(case, B, Hq, Lk)
    if p == "varlen":
        return _varlen(case, q, k, v, opts)
    if p == "hip":
        return _hip(case)
    pattern, sdpa_kw = _pattern(case, Hq)
    if pattern is not None:
        mask = pattern.dense_mask(Lq, Lk).to(q.device) if hasattr(pattern, "dense_mask") else None

        def op(q, k, v):
            return sa.sparse_attention(q, k, v, pattern, **opts)

        def ref(q, k, v, dtype):
            return sa.reference.attention(q, k, v, mask=mask, dtype=dtype, **opts)
        return op, ref
    attn_mask, is_causal = sdpa_kw.get("attn_mask"), sdpa_kw.get("is_causal", False)
    ref_mask = attn_mask
    if p == "lower_right_sdpa":
        ref_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)

    def call(sdpa, q, k, v):
        if p == "rank3_sdpa":       # [H, L, D]: torch's SDPA takes any rank >= 2
            return sdpa(q[0], k[0], v[0], is_causal=True, enable_gqa=True)[None]
        if p == "broadcast_sdpa":   # K/V batch 1 for every query batch
            return sdpa(q, k[:1], v[:1], is_causal=True, enable_gqa=True)
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True, **opts)

    def op(q, k, v):
        return call(sa.scaled_dot_product_attention, q, k, v)

    def torch_op(q, k, v):
        from .ops.attention.sdpa import TORCH_SDPA
        return call(TORCH_SDPA, q, k, v)
    op.torch_op = torch_op   # the same call through torch itself, where the drop-in defers to it

    def ref(q, k, v, dtype):
        if p == "rank3_sdpa":
            q, k, v = q[:1], k[:1], v[:1]
        if p == "broadcast_sdpa":
            k, v = k[:1].expand_as(k), v[:1].expand_as(v)
        m = ref_mask if ref_mask is None or ref_mask.dtype == torch.bool else ref_mask.to(dtype)
        return sa.reference.attention(q, k, v, mask=m, is_causal=is_causal, dtype=dtype, **opts)
    return op, ref


def _run_decode(case: Dict) -> Optional[str]:
    """decode_attention (no autograd) against its oracle: the case's cache ``[B, Hkv, Lk, D]``
    (paged: rounded up to whole pages, read through a shuffled table), ``Lq`` new tokens, ragged
    lengths, a layout or pattern, the score options."""
    import sparseattn as sa
    from sparseattn.reference import assert_close

    ps = case["page"]
    if ps:
        case = dict(case, Lk=-(-case["Lk"] // ps) * ps)
    q, k, v = _inputs(case)
    B, Hq, Lq, _ = q.shape
    Hkv, Lk, dev = k.shape[1], k.shape[2], q.device
    g = torch.Generator().manual_seed(case["seed"] + 4)
    lens = torch.randint(0, Lk + 1, (B,), generator=g).to(dev, torch.int32) if case["ragged"] else None
    kind, bk = case["layout"], case["block"]
    layout = None
    if kind == "block":
        bm = torch.rand(rng_choice(g, (1, B)), rng_choice(g, (1, Hq)), 1, math.ceil(Lk / bk), generator=g) < 0.5
        layout = sa.BlockLayout.from_block_mask(bm.to(dev), (16, bk), (Lq, Lk))
    elif kind == "window":
        layout = sa.SlidingWindow(case["window"], sinks=case["sinks"])
    elif kind == "power":
        layout = sa.PowerAttention(bk, 1, 1)
    opts = _options(case, B, Hq, Lk)
    kc, vc, table = k, v, None
    if ps:   # page p of the table holds logical rows [p * ps, (p + 1) * ps) of one sequence
        pages = B * Lk // ps
        perm = torch.randperm(pages, generator=g)
        table = perm.view(B, Lk // ps).to(dev, torch.int32)
        kc, vc = (torch.empty(pages, ps, Hkv, t.shape[-1], dtype=t.dtype, device=dev) for t in (k, v))
        for t, c in ((k, kc), (v, vc)):
            c[perm.to(dev)] = t.permute(0, 2, 1, 3).reshape(pages, ps, Hkv, t.shape[-1])
    try:
        out = sa.decode_attention(q, kc, vc, layout, cache_seqlens=lens, block_table=table, **opts)
        want = sa.reference.decode_attention(q, k, v, layout, cache_seqlens=lens, **opts)
        base = sa.reference.decode_attention(q, k, v, layout, cache_seqlens=lens, dtype=q.dtype, **opts)
    except Exception as e:  # noqa: BLE001 - any crash of a valid case is a finding
        return f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    try:
        assert_close("decode out", out, want, base)
    except AssertionError as e:
        return str(e)
    return None


def run_case(case: Dict) -> Optional[str]:
    """Forward and gradients of one case against the float64 oracle; None, or what failed."""
    import sparseattn as sa
    from sparseattn.reference import assert_close

    if case["pattern"] == "decode":
        return _run_decode(case)
    if case["pattern"] == "varlen":
        case = dict(case, B=1, Lq=sum(a for a, _ in case["lens"]), Lk=sum(b for _, b in case["lens"]))
    if case["pattern"] == "rank3_sdpa":
        case = dict(case, B=1)
    q, k, v = _inputs(case)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]   # detach keeps the drawn strides
    q, k, v = leaves
    try:
        op, ref = _op_and_oracle(case, q, k, v)
        out = op(q, k, v)
        ran_torch = sa.last_backend() == "torch" and hasattr(op, "torch_op")
        g = torch.Generator().manual_seed(case["seed"] + 2)
        dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
        grads = torch.autograd.grad((out.float() * dout.float()).sum(), leaves, allow_unused=True)
    except Exception as e:  # noqa: BLE001 - any crash of a valid case is a finding
        return f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    results = {}
    for dt in (torch.float64, q.dtype):
        ls = [t.detach().to(dt).requires_grad_() for t in leaves]
        # Where the drop-in ran torch's own SDPA (CPU tensors without the interpreter), torch's
        # own call in the input dtype is the baseline: the drop-in promises torch's numbers there,
        # however torch's CPU kernels round (its fp16 flash backward on 4-D inputs: dV 10x the
        # oracle's same-dtype error on a 150-row sum; 3-D inputs take another kernel).
        o = op.torch_op(*ls) if ran_torch and dt != torch.float64 else ref(*ls, dt)
        gs = torch.autograd.grad((o.double() * dout.double()).sum(), ls, allow_unused=True)
        results[dt] = (o, *(torch.zeros_like(t) if gr is None else gr for t, gr in zip(ls, gs)))
    try:
        for name, got, want, base in zip(("out", "dq", "dk", "dv"), (out, *grads), results[torch.float64],
                                         results[q.dtype]):
            assert_close(name, got, want, base)
    except AssertionError as e:
        return str(e)
    return None


def shrink(case: Dict, failure: str, budget_s: float = 120.0) -> Dict:
    """A smaller case that still fails (halving sizes one at a time), within ``budget_s``."""
    t0 = time.time()
    improved = True
    while improved and time.time() - t0 < budget_s:
        improved = False
        if case["pattern"] == "varlen":      # fewer, then shorter sequences
            lens = case["lens"]
            for smaller in ([lens[:i] + lens[i + 1:] for i in range(len(lens))] if len(lens) > 1 else []) + \
                    [[[a // 2, max(1, b // 2)] for a, b in lens]]:
                if smaller != lens and run_case(dict(case, lens=smaller)) is not None:
                    case, improved = dict(case, lens=smaller), True
                    break
        for key in ("B", "group", "Hkv") if case["pattern"] == "varlen" else ("B", "group", "Lq", "Lk", "Hkv"):
            if case[key] > 1 and not (key == "Lk" and case["pattern"] == "hip" and case["Lk"] // 2 < case["Lq"]):
                smaller = dict(case, **{key: max(1, case[key] // 2)})
                if run_case(smaller) is not None:
                    case, improved = smaller, True
    return case


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparseattn.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="how long to draw cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=300)
    ap.add_argument("--case", help="replay one case (JSON, as printed for a failure)")
    ap.add_argument("--device", help="where the cases' tensors live (default: cpu, or the replayed case's)")
    args = ap.parse_args(argv)
    if args.device:
        torch.empty(0, device=args.device)   # an unusable device: torch's own error, before any case
    if args.case:
        case = json.loads(args.case)
        if args.device:
            case["device"] = args.device
        err = run_case(case)
        print("ok" if err is None else f"FAIL: {err}")
        return 0 if err is None else 1
    rng = random.Random(args.seed)
    end = time.time() + 60 * args.minutes
    n = failures = 0
    while time.time() < end:
        case = draw_case(rng, args.max_len)
        if args.device and torch.device(args.device).type != "cpu":
            case["device"] = args.device
        n += 1
        err = run_case(case)
        if err is not None:
            failures += 1
            small = shrink(case, err)
            print(f"FAIL ({err})\n  reproduce: python -m sparseattn.fuzz --case '{json.dumps(small)}'", flush=True)
        if n % 250 == 0:
            print(f"... {n} cases, {failures} failures", flush=True)
    print(f"{n} cases, {failures} failures (seed {args.seed}, {args.minutes} min, device {args.device or 'cpu'})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
