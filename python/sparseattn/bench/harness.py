"""``python -m sparseattn.bench`` (also ``sparseattn-bench``): sparseattn's main job.

On a GPU it times every op against its anchors measured in the same run (torch SDPA with each
backend available, FlexAttention with the same block mask, ...), and prints and saves a table
(JSON + Markdown) of ms, TFLOP/s (counted on the non-masked work) and the ratio of each anchor's
time to ours (> 1: sparseattn is faster). Every op is checked against its float64 oracle first;
an op that fails the check is refused, not reported.

On a CPU it runs the same table at small sizes with what a CPU user gets (the drop-in runs torch's
CPU SDPA; block layouts run sparseattn's PyTorch CPU path) against torch SDPA on CPU, and says that
the GPU kernels were not timed.

Suites register in :data:`SUITES`; a suite is ``fn(device, quick, args) -> iterable of Case``.
Cases build their inputs when they first run, through the one shared cache :data:`INPUTS`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch


@dataclass
class Case:
    """One row of the table.

    ``run`` calls sparseattn; ``anchors`` maps an anchor's name to a callable doing the same work
    (None: not available here, shown as n/a). ``flops``: useful FLOPs of one call (0: not a FLOP
    op); ``bytes``: bytes that must move (0: not reported). ``check`` raises AssertionError when
    sparseattn's result is wrong: the case is then refused.
    """
    op: str
    params: Dict[str, object]
    run: Callable[[], object]
    anchors: Dict[str, Optional[Callable[[], object]]] = field(default_factory=dict)
    flops: float = 0.0
    bytes: float = 0.0
    check: Optional[Callable[[], None]] = None


# ----------------------------------------------------------------------------- timing
# A case whose (max - min) / median over its repeats passes this is flagged: its ratios are noise.
NOISY_SPREAD = 0.25


# CPU: a call under CPU_BUDGET_S / repeats is repeated until the samples take about CPU_BUDGET_S (at
# most CPU_MAX_REPEATS): 7 samples of a 0.1 ms decode call gave medians 30-50% apart run to run.
CPU_BUDGET_S, CPU_MAX_REPEATS = 0.2, 201


def time_stats(fn: Callable[[], object], device: str, repeats: int = 7) -> Dict[str, float]:
    """Median, min and max time of one call in ms over repeats, and the 10th / 90th percentiles:
    CUDA events via triton.testing.do_bench on a GPU (it warms up and flushes L2 between calls; its
    samples are the repeats), wall clock after one warm-up on a CPU, over ``repeats`` calls or, for
    fast calls, as many as fit in about ``CPU_BUDGET_S`` (up to ``CPU_MAX_REPEATS``)."""
    if device == "cuda":
        import triton.testing

        times = [float(t) for t in triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")]
    else:
        fn()
        times = []
        n = repeats
        while len(times) < n:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if len(times) == 1:
                n = max(repeats, min(CPU_MAX_REPEATS, int(CPU_BUDGET_S * 1e3 / max(times[0], 1e-6))))
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"ms": statistics.median(times), "min": min(times), "max": max(times), "p10": q[0], "p90": q[-1],
            "n": len(times)}


def time_ms(fn: Callable[[], object], device: str) -> float:
    """Median time of one call in ms (:func:`time_stats`)."""
    return time_stats(fn, device)["ms"]


def spread(stats: Dict[str, float]) -> float:
    """(max - min) / median of a timing; with 20 samples or more (fast CPU calls) (p90 - p10) /
    median, as one stray sample (a garbage collection, a host hiccup) is then sure to be among them."""
    lo, hi = (stats["p10"], stats["p90"]) if stats.get("n", 0) >= 20 and "p10" in stats else (stats["min"],
                                                                                                stats["max"])
    return (hi - lo) / stats["ms"] if stats["ms"] > 0 else 0.0


class Rotating:
    """Cycle through copies of a case's inputs, so that no call finds them in L2 (GPU): as many
    copies (at most ``max_copies``) as make ``min_bytes`` together; one copy on a CPU.
    Created on the first call: a case holds no memory until it runs."""

    def __init__(self, make: Callable[[], tuple], device: str, min_bytes: int = 256 << 20, max_copies: int = 4):
        self.make, self.device, self.min_bytes, self.max_copies = make, device, min_bytes, max_copies
        self.sets: List[tuple] = []
        self.i = 0

    def __call__(self) -> tuple:
        if not self.sets:
            first = self.make()
            size = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
            n = 1 if self.device != "cuda" else max(1, min(self.max_copies, math.ceil(self.min_bytes / max(size, 1))))
            self.sets = [first] + [self.make() for _ in range(n - 1)]
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def lazy(make: Callable[[], object]) -> Callable[[], object]:
    """A value of one case built on first use (a pattern, its layout)."""
    box = []

    def get():
        if not box:
            box.append(make())
        return box[0]
    return get


def free_device_memory() -> None:
    """Hand the CUDA caching allocator's free blocks back to the device (no-op without CUDA), so
    that the next size starts from an empty device rather than from the previous size's blocks."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class InputCache:
    """The inputs of the case being timed, shared by every suite.

    ``get(size, name, make, device)`` returns the value ``make()`` built for ``(size, name)``,
    building it on first use. ``size`` is a hashable key of the problem's shapes, dtype and device
    (``("attention", B, H, L, D, dtype, device)``); ``name`` tells apart the values of one size
    (``"qkv fwd"``, ``"flex block mask causal"``), so the cases of one size (a forward and a
    forward+backward row, a dense and a sparse row, and their anchors) share them. The cache holds
    one size at a time: asking for another size drops every value of the previous one and frees
    its GPU memory (:func:`free_device_memory`) before building the new one, so a 256K-token case
    never sits next to the previous size's tensors.

    ``rotate=True`` (input tensors): ``make`` returns a tuple of tensors and each call returns the
    next of a few copies of it (:class:`Rotating`), so that repeated timed calls do not find their
    inputs in L2; ``rotate=False`` (masks, layouts, anything read-only): one value.
    """

    def __init__(self):
        self.size = None
        self.values: Dict[str, object] = {}

    def get(self, size, name: str, make: Callable[[], object], device: str, rotate: bool = False):
        if size != self.size:
            self.clear()
            self.size = size
        if name not in self.values:
            self.values[name] = Rotating(make, device) if rotate else make()
        value = self.values[name]
        return value() if rotate else value

    def clear(self) -> None:
        """Drop every value and free the GPU memory they held."""
        had = bool(self.values)
        self.size, self.values = None, {}
        if had:
            free_device_memory()


# The one cache of the suites' inputs (emptied by run_cases when a run ends).
INPUTS = InputCache()


# ----------------------------------------------------------------------------- attention suite
def sdpa_backends(device: str, include_math: bool = True) -> Dict[str, Optional[Callable[[], object]]]:
    """torch SDPA anchors: name -> a context manager factory pinning one backend (CUDA: flash,
    efficient, cudnn, and math when asked); on a CPU one anchor with torch's default choice (None)."""
    if device != "cuda":
        return {"torch sdpa (cpu)": None}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa cudnn": SDPBackend.CUDNN_ATTENTION}
    if include_math:
        backends["sdpa math"] = SDPBackend.MATH
    return {name: (lambda b=b: sdpa_kernel(b)) for name, b in backends.items()}


FLEX_RECOMPILE_LIMIT = 1024


def flex_attention_fn(device: str):
    """(compiled flex_attention, create_block_mask) on CUDA, else None.

    Every shape and mask of a suite compiles its own FlexAttention kernel. Dynamo's default limit
    of 8 recompiles per function would silently send the 9th onwards to flex_attention's unfused
    eager path (the full score matrix): a far slower anchor than FlexAttention really is. So the
    limit is raised for the run, and hitting it raises instead (the anchor then shows as
    unsupported rather than as a wrong time)."""
    if device != "cuda":
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    flex_compile_settings()
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def flex_compile_settings() -> None:
    """Dynamo settings of the FlexAttention anchor (see flex_attention_fn)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                    FLEX_RECOMPILE_LIMIT)
    dynamo_config.fail_on_recompile_limit_hit = True


# Suites by name, filled by the package (``sparseattn/bench/__init__.py``) from an explicit list.
SUITES: Dict[str, Callable[..., Iterable[Case]]] = {}


# ----------------------------------------------------------------------------- harness
class _Progress:
    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", file=sys.stderr)
        except ImportError:
            self.bar = None
        self.total, self.done = total, 0

    def step(self, label: str):
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(label[:40])
            self.bar.update(1)
        else:
            filled = int(30 * self.done / max(1, self.total))
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label[:50]:<50}",
                  end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def device_ceilings() -> dict:
    """The two ceilings every row is read against, measured in this run: device-to-device copy
    bandwidth (bytes read + written) and the bf16 matrix-product rate on random data."""
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), "cuda")
    del src, dst
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = time_ms(lambda: a @ b, "cuda")
    return {"copy GB/s": round(2 * (1 << 28) * 2 / copy_ms / 1e6),
            "bf16 matmul TFLOP/s": round(2 * n ** 3 / mm_ms / 1e9)}


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def _environment(device: str) -> dict:
    import sparseattn

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
           "torch": torch.__version__, "triton": triton_version, "sparseattn": sparseattn.__version__,
           "commit": commit, "python": platform.python_version()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm=f"{props.major}{props.minor}", sms=props.multi_processor_count,
                   cuda=torch.version.cuda, driver=_driver_version(), **device_ceilings())
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                   note="no GPU: what a CPU user gets was timed against torch SDPA on CPU (the drop-in runs "
                        "torch's CPU SDPA for dense and causal rows, block layouts run sparseattn's PyTorch "
                        "CPU path); the GPU kernels were not timed")
    return env


# Params derived from a case's size (listed work, quality at that size): shown in the Markdown
# table, not part of what makes two cases share one correctness check.
_DERIVED = ("listed ", "recall ", "best ")


def run_cases(cases: List[Case], device: str) -> List[dict]:
    rows, checked = [], {}
    progress = _Progress(len(cases))
    try:
        _run_cases(cases, device, rows, checked, progress)
    except KeyboardInterrupt:  # keep what was measured: the table is written with the rows so far
        print(f"\ninterrupted: {len(rows)} of {len(cases)} cases ran", file=sys.stderr)
    finally:
        INPUTS.clear()
    progress.close()
    return rows


def _run_cases(cases: List[Case], device: str, rows: List[dict], checked: dict, progress) -> None:
    for i, case in enumerate(cases):
        cases[i] = None  # the case's inputs are freed once it has run
        label = f"{case.op} {case.params.get('direction', '')} L={case.params.get('L', '')}"
        row = {"op": case.op, **case.params}
        key = (case.op, tuple(sorted((k, v) for k, v in case.params.items()
                                     if k not in ("L", "B", "direction") and not k.startswith(_DERIVED))))
        if case.check is not None and key not in checked:
            try:
                case.check()
                checked[key] = None
            except AssertionError as e:
                checked[key] = str(e)
        if checked.get(key):
            row["refused"] = f"correctness check failed: {checked[key]}"
            rows.append(row)
            progress.step(label)
            continue
        try:
            stats = time_stats(case.run, device)
        except torch.cuda.OutOfMemoryError:
            row["refused"] = "out of memory"
            rows.append(row)
            progress.step(label)
            continue
        ms = stats["ms"]
        row.update(ms=ms, ms_min=stats["min"], ms_max=stats["max"], ms_p10=stats.get("p10"), ms_p90=stats.get("p90"),
                   repeats=stats["n"],
                   tflops=case.flops / ms / 1e9 if case.flops else None,
                   gbps=case.bytes / ms / 1e6 if case.bytes else None, anchors={})
        for name, fn in case.anchors.items():
            if fn is None:
                row["anchors"][name] = None
                continue
            try:
                a = time_stats(fn, device)
                row["anchors"][name] = dict(a, ratio=a["ms"] / ms)
            except Exception as e:  # noqa: BLE001 - an anchor that cannot run this case is n/a, with why
                row["anchors"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
        noisy = [n for n, st in [("sparseattn", stats)] + [(k, v) for k, v in row["anchors"].items()
                                                            if v and "max" in v] if spread(st) > NOISY_SPREAD]
        if noisy:
            row["noisy"] = noisy
        rows.append(row)
        progress.step(label)
        del case


def to_markdown(env: dict, rows: List[dict]) -> str:
    lines = ["# sparseattn benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if v is not None]
    lines += ["", "Ratio = anchor time / sparseattn time (> 1: sparseattn is faster), medians over repeats; "
                  "ms is median [min-max]. TFLOP/s counts only attended (query, key) pairs; fwd+bwd counts 3.5x "
                  f"the forward FLOPs. `noisy`: (max - min) / median > {NOISY_SPREAD} for the timing named (with 20 "
                  "repeats or more, fast CPU calls, (p90 - p10) / median), so its ratios are not comparable.", ""]
    anchor_names = sorted({a for r in rows for a in r.get("anchors", {})})
    param_names = [k for k in ("direction", "B", "H", "L", "D", "dtype", "Lq", "cache", "density")
                   if any(k in r for r in rows)]
    # the work the layout lists, and quality numbers (HiP's recall), where the suite gives them
    param_names += sorted({k for r in rows for k in r if k.startswith(_DERIVED)})
    header = ["op", *param_names, "ms", "TFLOP/s", "GB/s", *[f"{a} (ms / ratio)" for a in anchor_names]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in rows:
        cells = [r["op"], *[str(r.get(k, "")) for k in param_names]]
        if "refused" in r:
            cells += [f"refused: {r['refused'][:80]}", "", ""] + [""] * len(anchor_names)
        else:
            noisy = f" noisy: {', '.join(r['noisy'])}" if r.get("noisy") else ""
            cells += [f"{r['ms']:.3f} [{r['ms_min']:.3f}-{r['ms_max']:.3f}]{noisy}",
                      f"{r['tflops']:.3g}" if r.get("tflops") else "",
                      f"{r['gbps']:.0f}" if r.get("gbps") else ""]
            for a in anchor_names:
                info = r["anchors"].get(a)
                if info is None:
                    cells.append("n/a")
                elif "error" in info:
                    cells.append("unsupported")
                else:
                    cells.append(f"{info['ms']:.3f} / {info['ratio']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparseattn.bench", description=__doc__.split("\n\n")[1])
    ap.add_argument("--suite", action="append", choices=sorted(SUITES), help="suites to run (default: all)")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 1024,4096")
    ap.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 64,128")
    ap.add_argument("--quick", action="store_true", help="a few sizes only")
    ap.add_argument("--out", default="bench_out", help="folder for the JSON and Markdown results")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    ap.add_argument("--plot", metavar="DIR", help="also write PNG plots of the results to DIR (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.plot:
        from .plots import plot_results, require_matplotlib
        try:
            require_matplotlib()   # before the run, not after an hour of it
        except ImportError as e:
            print(f"python -m sparseattn.bench: {e}", file=sys.stderr)
            return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(f"python -m sparseattn.bench: --device cuda, but torch sees no CUDA device (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda}); use --device cpu", file=sys.stderr)
        return 2
    if device == "cpu":
        os.environ["SPARSEATTN_CPU_PATH"] = "1"  # time the CPU path, never the Triton interpreter
    env = _environment(device)
    suites = args.suite or sorted(SUITES)
    cases = [c for name in suites for c in SUITES[name](device, args.quick, args)]
    rows = run_cases(cases, device)
    if len(rows) < len(cases):
        env["interrupted"] = f"only the first {len(rows)} of {len(cases)} cases ran"
    md = to_markdown(env, rows)
    os.makedirs(args.out, exist_ok=True)
    # one file per run: date and time, device and suites (runs one after another keep their rows)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
    stem = f"{stamp}-{(env.get('gpu') or 'cpu').replace(' ', '_')}-{'+'.join(suites)}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md)
    print(md)
    if device == "cpu":
        print("No GPU here: the GPU kernels were not timed; the table times what a CPU user gets.")
    print(f"saved {os.path.join(args.out, stem)}.json and .md")
    if args.plot:
        for path in plot_results({"environment": env, "rows": rows}, args.plot, stem):
            print(f"saved {path}")
    return 1 if any("refused" in r and r["refused"].startswith("correctness") for r in rows) else 0
