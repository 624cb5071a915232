"""Differential fuzzing of the attention ops against the float64 oracle.

``python -m sparseattn.fuzz --minutes N --seed S`` draws random cases (shapes, GQA, dtypes,
strides, patterns, masks, biases), runs forward and backward, compares output and gradients with
``sparseattn.reference`` under the oracle rule (:func:`sparseattn.reference.assert_close`), and
for a failure prints the case, shrunk to a smaller one that still fails, as a one-line
reproducer (``python -m sparseattn.fuzz --case '<json>'``). The tests run a bounded,
deterministic sample of the same cases (``tests/test_fuzz.py``).

A case is a plain dict (JSON), so a failure found anywhere can be replayed anywhere. Without a
GPU run it with ``TRITON_INTERPRET=1`` to fuzz the Triton kernels through the interpreter.
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
PATTERNS = ("block_mask", "mask_mod", "sliding_window", "power", "per_head", "element_mask", "float_bias",
            "causal_sdpa")
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
    return case


def _inputs(case: Dict):
    g = torch.Generator().manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    B, Hkv, Lq, Lk, D = case["B"], case["Hkv"], case["Lq"], case["Lk"], case["D"]
    Hq = Hkv * case["group"]

    def make(h, L):
        shape = (B, h, L, D)
        kind = case["strides"]
        if kind == "transposed":      # [B, L, H, D] storage, as transformers' projections give
            t = torch.randn(B, L, h, D, generator=g).transpose(1, 2)
        elif kind == "sliced":        # every other element of a wider head dim
            t = torch.randn(B, h, L, 2 * D, generator=g)[..., ::2]
        elif kind == "expanded" and B > 1:   # one batch read with stride 0
            t = torch.randn(1, h, L, D, generator=g).expand(shape)
        else:
            t = torch.randn(shape, generator=g)
        return t.to(dtype)
    return make(Hq, Lq), make(Hkv, Lk), make(Hkv, Lk)


def _doc_ids(L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (L,), generator=g).sort().values


def _pattern(case: Dict, Hq: int):
    """(pattern or layout for sparse_attention, None) or (None, SDPA kwargs) for the drop-in."""
    import sparseattn as sa

    p, Lq, Lk = case["pattern"], case["Lq"], case["Lk"]
    g = torch.Generator().manual_seed(case["seed"] + 1)
    if p == "block_mask":
        bs = case["block"]
        if Lq > Lk:   # the query axis of a BlockSparse indexes rows when it cannot index positions
            bm = torch.rand(1, Hq, math.ceil(Lq / bs), math.ceil(Lk / bs), generator=g) < case["density"]
        else:
            bm = torch.rand(1, Hq, math.ceil(Lk / bs), math.ceil(Lk / bs), generator=g) < case["density"]
        return sa.BlockSparse(bm, bs), None
    if p == "mask_mod":
        doc_q, doc_k = _doc_ids(max(Lq, Lk), case["seed"]), _doc_ids(max(Lq, Lk), case["seed"])
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
        return sa.BlockSparse.from_mask_mod(mask_mod, None, None, Lq, Lk, case["block"]), None
    if p == "sliding_window":
        return sa.SlidingWindow(case["window"], sinks=case["sinks"]), None
    if p == "power":
        return sa.PowerAttention(case["block"], case["window_blocks"], case["sink_blocks"]), None
    if p == "per_head":
        heads = [sa.SlidingWindow(10 ** 9), sa.SlidingWindow(case["window"], sinks=case["sinks"])]
        return sa.PerHead([heads[h % 2] for h in range(Hq)]), None
    if p == "element_mask":
        return None, {"attn_mask": torch.rand(case["B"], 1, Lq, Lk, generator=g) < 0.6}
    if p == "float_bias":
        return None, {"attn_mask": torch.randn(1, Hq, Lq, Lk, generator=g)}
    return None, {"is_causal": True}


def run_case(case: Dict) -> Optional[str]:
    """Forward and gradients of one case against the float64 oracle; None, or what failed."""
    import sparseattn as sa
    from sparseattn.reference import assert_close

    q, k, v = _inputs(case)
    Hq = q.shape[1]
    pattern, sdpa_kw = _pattern(case, Hq)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]   # detach keeps the drawn strides
    q, k, v = leaves
    try:
        if pattern is not None:
            out = sa.sparse_attention(q, k, v, pattern)
            mask = pattern.dense_mask(case["Lq"], case["Lk"]) if hasattr(pattern, "dense_mask") else None
            ref_kw = {"mask": mask}
        else:
            out = sa.scaled_dot_product_attention(q, k, v, enable_gqa=True, **sdpa_kw)
            ref_kw = {"mask": sdpa_kw.get("attn_mask"), "is_causal": sdpa_kw.get("is_causal", False)}
        g = torch.Generator().manual_seed(case["seed"] + 2)
        dout = torch.randn(out.shape, generator=g).to(out.dtype)
        grads = torch.autograd.grad((out.float() * dout.float()).sum(), leaves)
    except Exception as e:  # noqa: BLE001 - any crash of a valid case is a finding
        return f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    results = {}
    for dt in (torch.float64, q.dtype):
        ls = [t.detach().to(dt).requires_grad_() for t in leaves]
        m = ref_kw.get("mask")
        m = m if m is None or m.dtype == torch.bool else m.to(dt)
        o = sa.reference.attention(*ls, mask=m, is_causal=ref_kw.get("is_causal", False), dtype=dt)
        results[dt] = (o, *torch.autograd.grad((o.double() * dout.double()).sum(), ls))
    try:
        for name, got, ref, base in zip(("out", "dq", "dk", "dv"), (out, *grads), results[torch.float64],
                                        results[q.dtype]):
            assert_close(name, got, ref, base)
    except AssertionError as e:
        return str(e)
    return None


def shrink(case: Dict, failure: str, budget_s: float = 120.0) -> Dict:
    """A smaller case that still fails (halving sizes one at a time), within ``budget_s``."""
    t0 = time.time()
    improved = True
    while improved and time.time() - t0 < budget_s:
        improved = False
        for key in ("B", "group", "Lq", "Lk", "Hkv"):
            if case[key] > 1:
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
    args = ap.parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        err = run_case(case)
        print("ok" if err is None else f"FAIL: {err}")
        return 0 if err is None else 1
    rng = random.Random(args.seed)
    end = time.time() + 60 * args.minutes
    n = failures = 0
    while time.time() < end:
        case = draw_case(rng, args.max_len)
        n += 1
        err = run_case(case)
        if err is not None:
            failures += 1
            small = shrink(case, err)
            print(f"FAIL ({err})\n  reproduce: python -m sparseattn.fuzz --case '{json.dumps(small)}'", flush=True)
    print(f"{n} cases, {failures} failures (seed {args.seed}, {args.minutes} min)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
