"""The stats suite (issue 13 "Tests, speed, done"): it registers, a quick CPU run writes a table with
its case families (attention_stats given an LSE and with its own LSE pass, var_attention on the
LLaVA-like prompt), every case's oracle check passes, a broken op gets its cases refused, and the
eager anchor and the prompt are what the module docstring says. No timing is asserted."""
import argparse
import json

import pytest
import torch

import sparseattn as sa
from sparseattn import bench
from sparseattn.bench import stats

FAMILIES = ("attention_stats column_sum (given lse)", "attention_stats column_sum (own lse pass)",
            "var_attention llava prompt", "var_attention multi-image prompt")


def _cases(device="cpu", quick=False, lengths=None):
    return list(stats.stats_suite(device, quick, argparse.Namespace(lengths=lengths, head_dims=None)))


def test_suite_is_registered():
    assert bench.SUITE_LIST["stats"] == ("stats", "stats_suite")
    assert bench.SUITES["stats"] is stats.stats_suite


def test_quick_cpu_run_writes_the_families(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")  # restored after the test (main sets it for CPU runs)
    assert bench.main(["--suite", "stats", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.load(open(next(tmp_path.glob("*stats.json"))))["rows"]
    md = next(tmp_path.glob("*stats.md")).read_text()
    assert {r["op"] for r in rows} == set(FAMILIES[:3])
    for r in rows:
        assert "refused" not in r and r["ms"] > 0, r
        assert all(a and a["ratio"] > 0 for a in r["anchors"].values()), r
        assert f"| {r['op']} |" in md
    for r in rows:
        if r["op"].startswith("attention_stats"):
            assert set(r["anchors"]) == {"forward attention (sa sdpa causal)", "eager probabilities .sum(2)"}
        else:
            assert set(r["anchors"]) == {"plain attention (sa sdpa causal)"}
            assert (r["L"], r["images"], r["image_tokens"], r["sinks"]) == (711, 1, 576, 4)


def test_every_case_has_a_check_that_passes(monkeypatch):
    """The oracle checks on the path a CPU bench run times (the PyTorch CPU path); the full (not
    quick) CPU case list, each family's check run once."""
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    cases = _cases()
    assert {c.op for c in cases} == set(FAMILIES)
    seen = set()
    for c in cases:
        assert c.check is not None, c.op
        if c.op not in seen:
            seen.add(c.op)
            c.check()


def _off(real, field=None):
    """``real`` with its result off by +0.05 (the column sums of an AttentionStats; the output of
    var_attention, also when it returns (out, selected))."""
    def broken(*a, **k):
        r = real(*a, **k)
        if field is not None:
            return r._replace(**{field: getattr(r, field) + 0.05})
        return (r[0] + 0.05, *r[1:]) if isinstance(r, tuple) else r + 0.05
    return broken


@pytest.mark.parametrize("name", ["attention_stats", "var_attention"])
def test_broken_op_is_refused(monkeypatch, name):
    """An op off by a small constant fails its check: every case of its family is refused (and
    run_cases refuses before timing anything)."""
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    if name == "attention_stats":
        monkeypatch.setattr(sa, name, _off(sa.attention_stats, "column_sum"))
    else:
        monkeypatch.setattr(sa.visual, name, _off(sa.visual.var_attention))
    cases = [c for c in _cases(quick=True) if c.op.startswith(name)]
    assert cases
    for c in cases:
        c.run = c.anchors = None                       # refused cases are never timed
    rows = bench.run_cases(cases, "cpu")
    assert rows and all(r["refused"].startswith("correctness check failed:") for r in rows), rows


def test_eager_anchor_computes_the_column_sums():
    """The eager anchor (materialised probabilities, summed over queries, head mean) is the op's
    own result: the float64 oracle's head-mean causal column sums."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 3, 150, 16, generator=g, dtype=torch.float64) for _ in range(2))
    masked = torch.ones(150, 150, dtype=torch.bool).triu(1)
    got = stats.eager_column_sum(q, k, masked)
    ref = sa.reference.attention_stats(q, k, stats.causal_layout(150, "cpu"), head_reduce="mean")["column_sum"]
    torch.testing.assert_close(got, ref[:, 0])


def test_gpu_sizes_and_eager_memory():
    """The GPU case list: the sizes of the docstring; the eager anchor is n/a exactly where its
    [B, H, L, L] matrices pass the limit (32K here)."""
    cases = _cases("cuda")      # builds no tensor: inputs are made when a case runs
    st = [c for c in cases if c.op.startswith("attention_stats")]
    assert sorted(c.params["L"] for c in st) == sorted(2 * stats.GPU_LENGTHS)
    assert all((c.params["B"], c.params["H"], c.params["D"], c.params["dtype"]) == (1, 32, 128, "bfloat16")
               for c in cases)
    for c in st:
        na = c.anchors["eager probabilities .sum(2)"] is None
        assert na == (c.params["L"] == 32768), (c.params["L"], c.params["eager GB"])
    var = [c for c in cases if c.op.startswith("var_attention multi-image")]
    assert [c.params["L"] for c in var] == stats.GPU_LENGTHS
    assert [c.params["images"] for c in var] == [6, 13, 28, 56]


def test_prompt_layout():
    image, sinks, n = stats.prompt(711, "cpu")
    assert n == 1 and image.sum() == 576 and image[0, 35] and not image[0, 34] and not image[0, 611]
    assert sinks.sum() == 4 and sinks[0, 0] and (sinks & image).sum() == 3
    image, _, n = stats.prompt(4096, "cpu")
    assert n == 6 and image.sum() == 6 * 576 and 4096 - 35 - 6 * 576 >= 100
    with pytest.raises(ValueError, match="L"):
        stats.prompt(700, "cpu")


@pytest.mark.gpu
def test_gpu_case_checks_pass():
    """The GPU sizes' checks (bf16, D = 128) through the real kernels; nothing is timed."""
    seen = set()
    for c in _cases("cuda", quick=True):
        if c.op not in seen:
            seen.add(c.op)
            c.check()
