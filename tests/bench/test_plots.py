"""``python -m sparseattn.bench --plot DIR``: PNGs of time (and TFLOP/s, GB/s) against L per op and
the density plots of the sparse suites, from a synthetic results dict and from a toy run; the
device named as the results say (CPU here); a clear ImportError without matplotlib."""
import json
import os
import sys

import pytest

from sparseattn import bench
from sparseattn.bench import plots

CPU_ENV = {"date": "2026-01-01 00:00 UTC", "device": "cpu", "torch": "2.13.0", "commit": "abc1234", "cpu": "x86_64",
           "threads": 2}
PNG = b"\x89PNG\r\n\x1a\n"


def _row(op, L, ms, density=None, direction="fwd", anchors=None, gbps=None, B=1, H=2, D=64):
    flops = 4.0 * B * H * D * L * L * (density or 0) * (3.5 if direction == "fwd+bwd" else 1.0)
    return {"op": op, "direction": direction, "B": B, "H": H, "L": L, "D": D, "dtype": "float32", "ms": ms,
            "ms_min": ms, "ms_max": ms, "repeats": 7, "tflops": flops / ms / 1e9 if flops else None, "gbps": gbps,
            "anchors": anchors or {}}


def _results():
    rows = []
    for L in (256, 512, 1024):
        t = L / 256
        sdpa = {"torch sdpa (cpu)": {"ms": 1.1 * t, "min": 1.0, "max": 1.2, "ratio": 1.1},
                "flex attention": None, "sdpa cudnn": {"error": "RuntimeError: no"}}
        rows.append(_row("attention causal", L, t, density=(L + 1) / (2 * L), anchors=sdpa))
        rows.append(_row("attention block 10%", L, 0.3 * t, density=0.1, anchors=sdpa))
        rows.append(_row("pattern power attention b=64", L, 0.2 * t, density=0.08,
                         anchors={"dense causal torch sdpa (cpu)": {"ms": 1.1 * t, "ratio": 5.5}}))
        rows.append({"op": "layout build: power attention b=64", "L": L, "H": 2, "ms": 0.01, "ms_min": 0.01,
                     "ms_max": 0.01, "anchors": {}})
        rows.append({"op": "decode dense", "B": 2, "Hq": 8, "Hkv": 2, "L": 64 * L, "D": 64, "Lq": 1, "dtype": "float32",
                     "ms": 0.05 * t, "ms_min": 0.05, "ms_max": 0.05, "tflops": 0.01, "gbps": 100.0, "anchors": {}})
    rows.append({"op": "attention dense", "direction": "fwd", "L": 2048, "refused": "correctness check failed: x"})
    rows.append({"op": "copy bandwidth", "bytes": 1 << 20, "ms": 0.1, "anchors": {}})   # no length: not plotted
    return {"environment": CPU_ENV, "rows": rows}


def test_density_is_read_back_from_the_flop_count():
    assert plots.row_density(_row("attention causal", 512, 2.0, density=0.25)) == pytest.approx(0.25)
    assert plots.row_density(_row("attention causal", 512, 2.0, density=0.25, direction="fwd+bwd", B=3, H=5)) == \
        pytest.approx(0.25)
    assert plots.row_density({"op": "x", "density": 0.4}) == 0.4
    assert plots.row_density({"op": "layout build: x", "L": 512, "ms": 1.0}) is None


def test_device_label_says_cpu_for_a_cpu_run():
    assert plots.device_label(CPU_ENV).startswith("CPU (x86_64, 2 threads")
    assert "GPU kernels not timed" in plots.device_label(CPU_ENV)
    assert plots.device_label({"gpu": "NVIDIA H200", "device": "cuda"}) == "NVIDIA H200"


def test_plots_of_a_results_dict(tmp_path):
    pytest.importorskip("matplotlib")
    paths = plots.plot_results(_results(), str(tmp_path), stem="run")
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(["run-attention_causal.png", "run-attention_block_10.png",
                            "run-pattern_power_attention_b_64.png", "run-layout_build.png", "run-decode_dense.png",
                            "run-density-attention.png", "run-density-patterns.png"])
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == PNG
        assert os.path.getsize(p) > 10_000


def test_bench_main_writes_plots_beside_the_tables(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")

    def suite(device, quick, args):
        for L in (128, 256):
            yield bench.Case(op="attention causal", params=dict(direction="fwd", B=1, H=2, L=L, D=16, dtype="float32"),
                             run=lambda: None, anchors={"torch sdpa (cpu)": lambda: None},
                             flops=4.0 * 2 * 16 * L * (L + 1) / 2)

    monkeypatch.setitem(bench.SUITES, "toy", suite)
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    assert bench.main(["--suite", "toy", "--device", "cpu", "--out", str(tmp_path), "--plot", str(tmp_path)]) == 0
    files = sorted(os.listdir(tmp_path))
    stem = next(f for f in files if f.endswith(".json"))[:-len(".json")]
    assert set(files) == {f"{stem}.json", f"{stem}.md", f"{stem}-attention_causal.png", f"{stem}-density-attention.png"}
    assert f"saved {tmp_path / stem}-density-attention.png" in capsys.readouterr().out
    # the same plots from the saved JSON
    out = tmp_path / "again"
    assert plots.main([str(tmp_path / f"{stem}.json"), "--out", str(out)]) == 0
    assert len(os.listdir(out)) == 2
    assert json.load(open(tmp_path / f"{stem}.json"))["environment"]["device"] == "cpu"


def test_without_matplotlib_a_clear_error_before_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots.plot_results(_results(), str(tmp_path))

    def suite(device, quick, args):
        raise AssertionError("the benchmark ran although --plot cannot work")

    monkeypatch.setitem(bench.SUITES, "toy", suite)
    assert bench.main(["--suite", "toy", "--device", "cpu", "--out", str(tmp_path), "--plot", str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
