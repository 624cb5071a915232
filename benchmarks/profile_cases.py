"""Profiles of the cases benchmarks/NOTES.md calls host-bound (issue 17, for the next GPU lease):
decode with a 10% block layout at B 1 on a 32K cache (1.1 ms where dense decode takes 0.14 ms),
dense decode beside it, and block-sparse 10% forward+backward at L 4K (a fixed ~2.5 ms). The
sizes are the bench suites' (decode: Hq 32, Hkv 8, D 128; attention: B 4, H 16, D 128; bf16).

    python benchmarks/profile_cases.py --out DIR [--device cuda] [--cases a,b] [--iters N]

Per case, after warm-up calls (compiles, autotuning, caches): the wall time per call over
``--iters`` calls (synchronized at both ends only), then one call under
``torch.cuda.set_sync_debug_mode("warn")`` listing every host-device synchronization with the
Python line that caused it (on CUDA), then ``--iters`` calls under torch.profiler (CPU and, on
CUDA, CUDA activities). Writes ``DIR/<case>.txt`` (all of the above, the op tables sorted by
self CPU time and by device time) and ``DIR/<case>.trace.json.gz`` (a Chrome / Perfetto trace).
On the CPU it runs the same code on the CPU paths: a dry run of this script, not a measurement.
"""
import argparse
import gzip
import os
import shutil
import time
import traceback
import warnings

import torch

import sparseattn as sa


def decode_case(device, dtype, layout: bool):
    L, hq, hkv, d, bk = 32768, 32, 8, 128, 64
    g = torch.Generator().manual_seed(L)
    table = torch.rand(L // bk, generator=g) < 0.1
    table[-1] = True
    q = torch.randn(1, hq, 1, d, device=device, dtype=dtype)
    k, v = (torch.randn(1, hkv, L, d, device=device, dtype=dtype) for _ in range(2))
    lay = sa.BlockLayout.from_block_mask(table.to(device)[None, None, None], (16, bk), (1, L)) if layout else None
    return lambda: sa.decode_attention(q, k, v, lay)


def sparse_fwd_bwd_case(device, dtype):
    B, H, L, D, bs = 4, 16, 4096, 128, 128
    n = L // bs
    g = torch.Generator().manual_seed(L)
    table = (torch.rand(n, n, generator=g) < 0.1) | torch.eye(n, dtype=torch.bool)
    layout = sa.BlockLayout.from_block_mask(table.to(device)[None, None], bs, (L, L))
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        out = sa.sparse_attention(q, k, v, layout)
        out.backward(out)
    return step


CASES = {
    "decode-block10-B1-32K": lambda dev, dt: decode_case(dev, dt, True),
    "decode-dense-B1-32K": lambda dev, dt: decode_case(dev, dt, False),
    "sparse10-fwdbwd-4K": sparse_fwd_bwd_case,
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def profile(name, fn, device, iters, out_dir):
    lines = [f"case {name} on {device}"]
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    lines.append(f"wall per call: {(time.perf_counter() - t0) / iters * 1e3:.4f} ms over {iters} calls "
                 f"(backend {sa.last_backend()})")
    if device == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sync(device)
        lines.append(f"host-device synchronizations in one call: {len(caught)}")
        lines += [f"  {w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught]
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=True, with_stack=False) as prof:
        for _ in range(iters):
            fn()
        sync(device)
    table = prof.key_averages()
    lines += ["", f"== by self CPU time ({iters} calls)", table.table(sort_by="self_cpu_time_total", row_limit=30)]
    if device == "cuda":
        try:
            by_device = table.table(sort_by="self_device_time_total", row_limit=20)
        except (KeyError, AttributeError, ValueError):   # older torch: the CUDA-named column
            by_device = table.table(sort_by="self_cuda_time_total", row_limit=20)
        lines += [f"== by device time ({iters} calls)", by_device]
    trace = os.path.join(out_dir, f"{name}.trace.json")
    prof.export_chrome_trace(trace)
    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(trace)
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:2]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    # bf16 on CUDA; float32 on the CPU (the dry run: one profiled call per case, not a measurement)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    failed = 0
    for name in args.cases.split(","):
        try:
            fn = CASES[name](args.device, dtype)
            profile(name, fn, args.device, args.iters if args.device == "cuda" else 1, args.out)
        except Exception:  # noqa: BLE001 - one case's failure must not lose the others
            failed += 1
            print(f"case {name} failed:\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
