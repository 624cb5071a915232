"""The main job's harness: a quick CPU run writes its tables; a failing check refuses a case; the
suites share one input cache; a suite that fails to import is an error naming it."""
import argparse
import json
import os
import sys

import pytest
import torch

from sparseattn import bench


def test_quick_cpu_run_writes_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")  # restored after the test (main sets it for CPU runs)
    rc = bench.main(["--suite", "attention", "--quick", "--lengths", "128", "--device", "cpu",
                     "--out", str(tmp_path)])
    assert rc == 0
    files = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md"]
    data = json.load(open(tmp_path / files[0]))
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"attention causal", "attention dense", "attention block 10%"}
    for r in rows:
        assert "refused" not in r and r["ms"] > 0
        assert r["anchors"]["torch sdpa (cpu)"]["ratio"] > 0
    assert "GPU kernels were not timed" in capsys.readouterr().out
    assert "not timed" in data["environment"]["note"]


def test_failed_check_refuses_case():
    def wrong():
        raise AssertionError("max error 1 > 0.01")

    ok = bench.Case(op="good", params={"L": 1}, run=lambda: None, anchors={"a": lambda: None}, flops=1.0)
    bad = bench.Case(op="bad", params={"L": 1}, run=lambda: None, check=wrong)
    rows = bench.run_cases([ok, bad], "cpu")
    assert "refused" not in rows[0] and rows[0]["anchors"]["a"]["ratio"] > 0
    assert rows[1]["refused"].startswith("correctness check failed: max error")
    assert "refused" in bench.to_markdown({"device": "cpu"}, rows)


def test_interrupted_main_writes_and_marks_its_table(tmp_path, monkeypatch):
    def stop():
        raise KeyboardInterrupt

    def suite(device, quick, args):
        yield bench.Case(op="first", params={"L": 1}, run=lambda: None, flops=1.0)
        yield bench.Case(op="second", params={"L": 2}, run=stop)

    monkeypatch.setitem(bench.SUITES, "toy", suite)
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    assert bench.main(["--suite", "toy", "--device", "cpu", "--out", str(tmp_path)]) == 0
    md = next(tmp_path.glob("*.md")).read_text()
    assert "| first |" in md and "| second |" not in md
    assert "interrupted: only the first 1 of 2 cases ran" in md


def test_interrupt_keeps_rows_measured_so_far():
    def stop():
        raise KeyboardInterrupt

    first = bench.Case(op="first", params={"L": 1}, run=lambda: None, flops=1.0)
    rows = bench.run_cases([first, bench.Case(op="second", params={"L": 2}, run=stop),
                            bench.Case(op="third", params={"L": 3}, run=lambda: None)], "cpu")
    assert [r["op"] for r in rows] == ["first"]


def test_flex_settings_raise_recompile_limit_and_fail_instead_of_eager():
    """Past dynamo's recompile limit, flex_attention silently runs its unfused eager path; the
    bench raises the limit and makes hitting it an error (the anchor then shows unsupported)."""
    import torch._dynamo.config as dc

    # Saved and restored by hand: pytest's monkeypatch would delattr these on undo (they are not
    # in the config module's __dict__), which hides them from dynamo for the rest of the run.
    names = ("recompile_limit", "accumulated_recompile_limit", "fail_on_recompile_limit_hit")
    saved = {name: getattr(dc, name) for name in names}
    try:
        bench.harness.flex_compile_settings()
        assert dc.recompile_limit >= 1024 and dc.accumulated_recompile_limit >= 1024
        assert dc.fail_on_recompile_limit_hit
    finally:
        for name, value in saved.items():
            setattr(dc, name, value)
    assert dc.recompile_limit == saved["recompile_limit"]


def test_input_cache_same_key_same_tensors_new_key_new_tensors(monkeypatch):
    """One cache for every suite: the same (size, name) gives the same tensors (rotated copies: one
    on a CPU); another size gives new ones, after the old ones were dropped and memory freed."""
    freed = []
    monkeypatch.setattr(bench.harness, "free_device_memory", lambda: freed.append(1))
    made = []

    def make(n):
        def f():
            made.append(n)
            return (torch.randn(n), torch.randn(n))
        return f

    cache = bench.InputCache()
    a = cache.get(("toy", 4, torch.float32, "cpu"), "qkv", make(4), "cpu", rotate=True)
    b = cache.get(("toy", 4, torch.float32, "cpu"), "qkv", make(4), "cpu", rotate=True)
    assert all(x is y for x, y in zip(a, b)) and made == [4]
    mask = cache.get(("toy", 4, torch.float32, "cpu"), "mask", lambda: torch.ones(4, dtype=torch.bool), "cpu")
    assert cache.get(("toy", 4, torch.float32, "cpu"), "mask", lambda: None, "cpu") is mask
    assert freed == []
    c = cache.get(("toy", 8, torch.float32, "cpu"), "qkv", make(8), "cpu", rotate=True)
    assert made == [4, 8] and c[0].shape == (8,) and not any(x is y for x, y in zip(a, c))
    assert freed == [1] and set(cache.values) == {"qkv"}        # the old size's values are gone
    cache.clear()
    assert cache.values == {} and freed == [1, 1]


def test_rotating_cycles_copies_on_cuda_only():
    made = []

    def make():
        made.append(1)
        return (torch.zeros(4),)
    rot = bench.Rotating(make, "cuda", min_bytes=40, max_copies=3)   # 16 bytes a set: 3 copies
    sets = [rot() for _ in range(4)]
    assert len(made) == 3 and sets[0] is not sets[1] and sets[0] is sets[3]
    cpu = bench.Rotating(make, "cpu")
    assert cpu() is cpu()


def test_every_suite_uses_the_shared_input_cache(monkeypatch):
    """Each suite's first timed case takes its inputs from bench.INPUTS (no per-suite copy)."""
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    args = argparse.Namespace(lengths=[128], head_dims=None)
    try:
        for name in bench.SUITE_LIST:
            cases = bench.SUITES[name]("cpu", True, args)
            case = next(c for c in cases if not c.op.startswith("layout build"))
            bench.INPUTS.clear()
            case.run()
            assert bench.INPUTS.size is not None and bench.INPUTS.size[0] == name, (name, bench.INPUTS.size)
    finally:
        bench.INPUTS.clear()


def test_suite_failing_to_import_is_an_error_naming_it(monkeypatch):
    monkeypatch.setattr(bench, "SUITE_LIST", {"broken": ("broken_suite", "broken_suite")})
    monkeypatch.setitem(sys.modules, "sparseattn.bench.broken_suite", None)   # its import fails
    with pytest.raises(ImportError, match=r"benchmark suite 'broken' \(sparseattn\.bench\.broken_suite\)"):
        bench._register()
    assert "broken" not in bench.SUITES


def test_cuda_without_gpu_is_one_line_and_exit_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main(["--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch sees no CUDA device" in err


def test_plot_without_matplotlib_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    import builtins

    from sparseattn import plot

    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot.main(["--out", str(tmp_path / "p"), "--no-table"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err
    assert not (tmp_path / "p").exists()


def test_runs_keep_their_files_and_flag_noisy_timings(tmp_path, monkeypatch):
    """Suites run one after another keep their own files; a timing whose spread is too wide is flagged."""
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    calls = {"n": 0}

    def fake_stats(fn, device, repeats=7):   # ours steady, the anchor's max 3x its median
        calls["n"] += 1
        hi = 1.0 if calls["n"] == 1 else 3.0
        return {"ms": 1.0, "min": 1.0, "max": hi, "n": repeats}

    monkeypatch.setattr(bench.harness, "time_stats", fake_stats)

    def suite_a(device, quick, args):
        yield bench.Case(op="a", params={"L": 1}, run=lambda: None, anchors={"x": lambda: None}, flops=1.0)

    def suite_b(device, quick, args):
        yield bench.Case(op="b", params={"L": 1}, run=lambda: None, flops=1.0)

    monkeypatch.setitem(bench.SUITES, "toy_a", suite_a)
    monkeypatch.setitem(bench.SUITES, "toy_b", suite_b)
    assert bench.main(["--suite", "toy_a", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert bench.main(["--suite", "toy_b", "--device", "cpu", "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 4 and any("toy_a" in n for n in names) and any("toy_b" in n for n in names)
    md_a = next(tmp_path.glob("*toy_a.md")).read_text()
    assert "noisy: x" in md_a and "1.000 [1.000-1.000]" in md_a
    rows_a = json.load(open(next(tmp_path.glob("*toy_a.json"))))["rows"]
    assert rows_a[0]["noisy"] == ["x"] and rows_a[0]["ms_max"] == 1.0
