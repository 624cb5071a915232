"""PNG plots of a benchmark run: ``python -m sparseattn.bench ... --plot DIR`` (after the run), or
``python -m sparseattn.bench.plots RESULTS.json [...] --out DIR`` (from saved results).

* One PNG per op (``<stem>-<op>.png``): time against sequence length (``L``; the cache length for
  decode rows), one line per backend (sparseattn and each anchor measured in the same run), log
  axes; beside it TFLOP/s and/or GB/s where the rows have them (an anchor's rate counts the same
  useful work as sparseattn's row). One row of panels per configuration (direction, D, dtype,
  heads, ...). The ``layout build: ...`` rows share one figure, one line per pattern.
* For the sparse suites (attention, patterns, dynamic) a density plot
  (``<stem>-density-<suite>.png``): time against density (fraction of the ``L x L`` score square
  attended), one panel per configuration and length, and the ideal proportional line
  ``t = t_ref * density / density_ref`` through the fastest dense measurement of that panel
  (dense causal at density ~0.5, or dense at 1); the densest sparseattn point when there is none.
  Density is the row's ``density`` when it has one, otherwise the suite's own FLOP count read
  back: ``flops / (4 B H D L^2)`` (x 3.5 for fwd+bwd).

Titles name the device from the results' environment: the GPU's name, or "CPU" for a CPU run
(there the GPU kernels were not timed). matplotlib is needed only here (``pip install
matplotlib``); importing this module does not import it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from typing import Dict, List, Optional

# Params that tell configurations apart in a time-against-L figure; the others (B, payloads,
# memory estimates, ...) follow L within one configuration.
CONFIG_KEYS = ("direction", "D", "dtype", "H", "Hq", "Hkv", "Lq", "page_size", "head_reduce")
OURS = "sparseattn"
# Anchors doing dense work whatever the row's pattern: the reference of the ideal line, not points.
DENSE_PREFIXES = ("dense ",)
# op -> suite of the density plot
DENSITY_SUITES = (("attention", lambda op: op.startswith("attention ")),
                  ("patterns", lambda op: op.startswith("pattern ")),
                  ("dynamic", lambda op: op.endswith("(estimate + attention)")
                   or op.endswith("(attention on the cached layout)")))


def require_matplotlib():
    """matplotlib.pyplot with the Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("sparseattn.bench --plot needs matplotlib, an optional dependency of the benchmark: "
                          "pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def device_label(env: dict) -> str:
    """"GPU name" or "CPU (...)" as the results' environment says; a run without a GPU is CPU."""
    if env.get("gpu"):
        return str(env["gpu"])
    cpu = env.get("cpu") or "cpu"
    threads = f", {env['threads']} threads" if env.get("threads") else ""
    return f"CPU ({cpu}{threads}; GPU kernels not timed)"


def _footer(env: dict) -> str:
    return " · ".join(str(x) for x in (device_label(env), env.get("date"),
                                        f"torch {env['torch']}" if env.get("torch") else None,
                                        f"commit {env['commit']}" if env.get("commit") else None) if x)


def slug(text: str) -> str:
    """A file-name piece of an op name."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()[:60] or "op"


def _x(row) -> Optional[int]:
    for key in ("L", "cache"):
        if isinstance(row.get(key), (int, float)):
            return row[key]
    return None


def _config(row) -> tuple:
    return tuple((k, row[k]) for k in CONFIG_KEYS if k in row)


def _config_text(config: tuple) -> str:
    return " ".join(f"{k}={v}" if k not in ("direction", "dtype") else str(v) for k, v in config)


def backends(row) -> Dict[str, dict]:
    """name -> {"ms", "tflops", "gbps"} of a timed row: sparseattn and each anchor that ran (an
    anchor's rates count the row's useful work over the anchor's time)."""
    if "refused" in row or not row.get("ms"):
        return {}
    ms = row["ms"]
    out = {OURS: {"ms": ms, "tflops": row.get("tflops"), "gbps": row.get("gbps")}}
    for name, a in (row.get("anchors") or {}).items():
        if a and a.get("ms"):
            out[name] = {"ms": a["ms"], "tflops": row["tflops"] * ms / a["ms"] if row.get("tflops") else None,
                         "gbps": row["gbps"] * ms / a["ms"] if row.get("gbps") else None}
    return out


def row_density(row) -> Optional[float]:
    """The row's density, or the attention FLOP count of the row read back as one."""
    if isinstance(row.get("density"), (int, float)):
        return float(row["density"])
    need = ("B", "H", "L", "D")
    if not row.get("tflops") or not row.get("ms") or any(not isinstance(row.get(k), (int, float)) for k in need):
        return None
    flops = row["tflops"] * row["ms"] * 1e9
    full = 4.0 * row["B"] * row["H"] * row["D"] * row["L"] ** 2 * (3.5 if row.get("direction") == "fwd+bwd" else 1.0)
    return flops / full


def _colors(names) -> Dict[str, object]:
    """One colour per backend name, stable across the figures of a run; sparseattn black."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    others = sorted(n for n in names if n != OURS)
    colors = {n: cmap(i % 10) for i, n in enumerate(others)}
    colors[OURS] = "black"
    return colors


def _length_text(x) -> str:
    """1024 -> 1K, 131072 -> 128K, 1048576 -> 1M; other lengths as they are."""
    x = int(x)
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if x >= size and x % size == 0:
            return f"{x // size}{unit}"
    return str(x)


def _log_axes(ax, xs=None) -> None:
    """Log axes with plain-number labels (decimals, not 1.2 x 10^1); x ticks at the lengths run."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, NullLocator

    class Plain(LogFormatter):     # matplotlib's choice of ticks to label, written as 0.02, 12.5, 300
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:.0f}" if x >= 1000 else f"{x:.3g}"

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(Plain(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    if xs:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(xs)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _length_text(v)))
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(Plain(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    ax.grid(True, which="major", alpha=0.3)


def _save(fig, title: str, path: str) -> None:
    """Title, fixed margins in inches (matplotlib's tight_layout costs more than the drawing), PNG."""
    w, h = fig.get_size_inches()
    nrows, ncols = fig.axes[0].get_gridspec().get_geometry()
    left, right, bottom, top, gap_w, gap_h = 0.85, 0.25, 0.6, 0.95, 0.9, 0.85
    axes_w = (w - left - right - gap_w * (ncols - 1)) / ncols
    axes_h = (h - bottom - top - gap_h * (nrows - 1)) / nrows
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / h)
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                        wspace=gap_w / axes_w, hspace=gap_h / axes_h)
    fig.savefig(path, dpi=100)


def _time_figure(plt, title: str, panels: Dict[tuple, Dict[str, Dict[int, dict]]], env: dict, colors, path: str):
    """panels: config -> line name -> x -> metrics. Columns: time, then TFLOP/s / GB/s if present."""
    metrics = [("ms", "time (ms)")]
    for key, label in (("tflops", "TFLOP/s (the row's useful FLOPs)"), ("gbps", "GB/s (the row's bytes)")):
        if any(m.get(key) for lines in panels.values() for pts in lines.values() for m in pts.values()):
            metrics.append((key, label))
    rows = sorted(panels, key=str)
    fig, axes = plt.subplots(len(rows), len(metrics), figsize=(max(9.0, 5.2 * len(metrics)), 3.4 * len(rows) + 0.6),
                             squeeze=False)
    for r, config in enumerate(rows):
        for c, (key, label) in enumerate(metrics):
            ax = axes[r][c]
            every_x = set()
            for name, pts in sorted(panels[config].items(), key=lambda kv: (kv[0] != OURS, kv[0])):
                xs = sorted(x for x in pts if pts[x].get(key))
                every_x.update(xs)
                if xs:
                    ax.plot(xs, [pts[x][key] for x in xs], "-o", ms=4, color=colors.get(name),
                            lw=2.2 if name == OURS else 1.2, label=name)
            _log_axes(ax, every_x)
            ax.set_xlabel("sequence length (cache length for decode)")
            ax.set_ylabel(label)
            ax.set_title(_config_text(config) or "all rows", fontsize=9)
            if c == 0:
                ax.legend(fontsize=7)
    _save(fig, f"{title}\n{_footer(env)}", path)
    plt.close(fig)


def _density_figure(plt, suite: str, rows: List[dict], env: dict, colors, path: str) -> bool:
    """Time against density, one panel per (config, B, H, L); False when no row has a density."""
    panels = defaultdict(list)
    for row in rows:
        d = row_density(row)
        if d is None or d <= 0 or _x(row) is None:
            continue
        panels[(_config(row), row.get("B"), row.get("L"))].append((d, row))
    if not panels:
        return False
    keys = sorted(panels, key=lambda k: (str(k[0]), k[2], str(k[1])))
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(9.0, 5.6 * ncol), 4.2 * nrow + 0.6), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        config, B, L = key
        series = defaultdict(list)
        refs = []
        for d, row in sorted(panels[key], key=lambda p: p[0]):
            for name, m in backends(row).items():
                if name.startswith(DENSE_PREFIXES):
                    refs.append((m["ms"] / (1.0 if "non-causal" in name else (L + 1) / (2 * L)), name))
                    continue
                series[name].append((d, m["ms"]))
                if d >= 0.45:   # a dense or causal measurement: a reference of the ideal line too
                    refs.append((m["ms"] / d, name if name != OURS else f"{OURS} {row['op']}"))
                if name == OURS:
                    ax.annotate(row["op"].split(" (")[0].replace("attention ", "").replace("pattern ", ""),
                                (d, m["ms"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for name, pts in sorted(series.items(), key=lambda kv: (kv[0] != OURS, kv[0])):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o" if name == OURS else "s", ms=6 if name == OURS else 4,
                    color=colors.get(name), label=name)
        if refs:
            per_density, ref_name = min(refs)
        elif series.get(OURS):
            d_max, t_max = max(series[OURS])
            per_density, ref_name = t_max / d_max, f"densest {OURS} point"
        else:
            per_density = None
        if per_density:
            lo = min(p[0] for pts in series.values() for p in pts) if series else 0.01
            ds = [lo * 0.8, 1.0]
            ax.plot(ds, [per_density * d for d in ds], ":", color="grey", lw=1.5,
                    label=f"ideal: time ∝ density (via {ref_name})")
        _log_axes(ax)
        ax.set_xlabel("density (fraction of the L x L scores attended)")
        ax.set_ylabel("time (ms)")
        ax.set_title(f"L={_length_text(L)} B={B} {_config_text(config)}", fontsize=9)
        ax.legend(fontsize=6)
    _save(fig, f"{suite}: time against density\n{_footer(env)}", path)
    plt.close(fig)
    return True


def plot_results(results: dict, out_dir: str, stem: str = "bench") -> List[str]:
    """Write the PNGs of one run (``{"environment": ..., "rows": [...]}``, the harness's JSON) to
    ``out_dir`` as ``<stem>-<op>.png`` and ``<stem>-density-<suite>.png``; returns their paths.
    Raises ImportError (saying ``pip install matplotlib``) without matplotlib."""
    plt = require_matplotlib()
    env, rows = results.get("environment", {}), results.get("rows", [])
    os.makedirs(out_dir, exist_ok=True)
    colors = _colors({n for r in rows for n in backends(r)})
    figures: Dict[str, Dict[tuple, Dict[str, Dict[int, dict]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict)))
    for row in rows:
        x = _x(row)
        if x is None:
            continue
        if row["op"].startswith("layout build: ") and "refused" not in row and row.get("ms"):
            figures["layout build"][_config(row)][row["op"][len("layout build: "):]][x] = {"ms": row["ms"]}
            continue
        for name, m in backends(row).items():
            figures[row["op"]][_config(row)][name][x] = m
    paths = []
    for op, panels in figures.items():
        path = os.path.join(out_dir, f"{stem}-{slug(op)}.png")
        _time_figure(plt, op, panels, env, colors, path)
        paths.append(path)
    for suite, member in DENSITY_SUITES:
        path = os.path.join(out_dir, f"{stem}-density-{suite}.png")
        if _density_figure(plt, suite, [r for r in rows if member(r["op"])], env, colors, path):
            paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparseattn.bench.plots",
                                 description="PNG plots of saved sparseattn.bench results (needs matplotlib).")
    ap.add_argument("results", nargs="+", help="JSON files written by python -m sparseattn.bench")
    ap.add_argument("--out", help="folder for the PNGs (default: beside each JSON)")
    args = ap.parse_args(argv)
    try:
        require_matplotlib()
    except ImportError as e:
        print(e, file=sys.stderr)
        return 2
    for path in args.results:
        with open(path) as f:
            results = json.load(f)
        stem = os.path.splitext(os.path.basename(path))[0]
        for written in plot_results(results, args.out or os.path.dirname(os.path.abspath(path)), stem):
            print(f"saved {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
