"""Compile for sm_90 exactly what Triton's JIT would compile on a GPU for real calls.

The compile gate (test_compile_gate.py) compiles every kernel from hand-written signatures, where
every stride is a run-time i32. On a GPU the JIT specializes the actual arguments: a stride or
length of 1 becomes a constexpr, values divisible by 16 get attributes. The first GPU run
(2026-11-30, H200) failed 61 tests on one such specialization that no CPU test compiled: a stride
of 1 two tuples deep (the key mask's column stride inside the Rules) read as None inside the dK/dV
kernel's GQA loop (fixed by ``walk.runtime_rules``). Here a handful of tests that cover every
kernel family and the score options run in the interpreter with ``SPARSEATTN_CAPTURE_LAUNCHES``
(conftest.py records the JIT's specialization of every launch), and the gate compiles each record
for sm_90 (``python -m sparseattn.triton_kernels.gate --captured FILE --cc 90``)."""
import json
import os
import subprocess
import sys

import pytest

from sparseattn.triton_kernels.common import INTERPRET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# Calls that the first GPU run failed to compile, and one call of every other kernel family.
CASES = [
    "tests/ops/attention/test_score_options.py::test_key_padding_mask[kernel-1-63-dtype1]",
    "tests/ops/attention/test_score_options.py::test_everything_gqa_non_contiguous[kernel]",
    "tests/ops/attention/test_sdpa.py::test_mask_broadcast_shapes[bool-mask_shape7]",
    "tests/ops/attention/test_sdpa.py::test_mask_broadcast_shapes[float-mask_shape0]",
    "tests/ops/attention/test_varlen.py::test_half_precision_softcap_alibi[kernel-dtype0]",
    "tests/ops/stats/test_attention_stats.py::test_head_reduction_window_sinks[kernel-sum]",
    "tests/ops/redistribution/test_redistribution.py::test_var_matches_oracle[kernel-1-97]",
    "tests/ops/hip/test_hip_padding.py::test_padding_matches_oracle[kernel-case0]",
    "tests/ops/lightning/test_lightning.py::test_bf16_forward_backward[63]",
]


@pytest.mark.gate
@pytest.mark.skipif(not INTERPRET, reason="captures launches through the interpreter (a GPU compiles them itself)")
def test_captured_launches_compile_for_sm90(tmp_path):
    path = tmp_path / "launches.pkl"
    env = dict(os.environ, SPARSEATTN_CAPTURE_LAUNCHES=str(path), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          *CASES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"the captured tests failed:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
    env = dict(os.environ, TRITON_INTERPRET="0")
    gate = subprocess.run([sys.executable, "-m", "sparseattn.triton_kernels.gate", "--captured", str(path),
                           "--cc", "90"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = gate.stdout.strip().splitlines()
    assert lines, f"the gate printed nothing:\n{gate.stderr[-3000:]}"
    res = json.loads(lines[-1])
    kernels = {}
    assert res["compiled"] >= 12, f"premise: too few launches captured ({res})"
    for f in res["failures"]:
        kernels.setdefault(f["kernel"], f)
    assert not res["failures"], "\n\n".join(f"{k} ({f['case']}): {f['cause']}\n{f['error']}"
                                           for k, f in kernels.items())
