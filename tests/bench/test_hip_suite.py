"""The hip suite (issue 12 "Speed"): it registers, a quick CPU run writes its three families with
the recall columns, the cases' oracle check passes, and the GPU case list has the issue's sizes.
No timing is asserted."""
import argparse
import json

import torch

from sparseattn import bench
from sparseattn.bench import hip

FAMILIES = {"hip prefill (mask + attention)", "hip mask estimation", "hip decode (8 steps, amortised)"}


def test_registered_and_quick_cpu_run(tmp_path, monkeypatch):
    assert bench.SUITES["hip"] is hip.hip_suite
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    assert bench.main(["--suite", "hip", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.load(open(next(tmp_path.glob("*hip.json"))))["rows"]
    assert {r["op"] for r in rows} == FAMILIES
    for r in rows:
        assert "refused" not in r and r["ms"] > 0, r
        assert 0 < r["recall min @1024"] <= r["recall mean @1024"] <= 1.0 + 1e-9, r
        assert r["best mean @1024"] >= r["recall mean @1024"] - 1e-6, r   # no K-block mask beats the best


def test_gpu_case_list():
    cases = list(hip.hip_suite("cuda", False, argparse.Namespace(lengths=None, quality=False)))
    assert sorted({c.params["L"] for c in cases}) == hip.GPU_LENGTHS
    assert all((c.params["B"], c.params["H"], c.params["Hkv"], c.params["D"], c.params["dtype"])
               == (1, 32, 8, 128, "bfloat16") for c in cases)
    assert {c.op for c in cases} == FAMILIES


def test_structured_inputs_have_heavy_hitters():
    q, k = hip.structured_qk(1, 2, 1, 512, 32, torch.Generator().manual_seed(0))
    assert k[0, 0, :, 0].max() > 4.0 and q.shape == (1, 2, 512, 32)
