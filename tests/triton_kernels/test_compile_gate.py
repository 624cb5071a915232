"""Compile gate: every Triton kernel, at every config its prune can select, compiles for sm_90
and sm_80 and fits their shared memory. Runs without a GPU, in subprocesses where the Triton
interpreter is off (interpreted kernels cannot be compiled): two shards per architecture at once,
so the gate's wall time does not depend on how pytest-xdist schedules the tests (tests/conftest.py
also starts the gate first: it is the longest test)."""
import json
import os
import subprocess
import sys

import pytest

SHARDS = 2
pytestmark = pytest.mark.gate


@pytest.mark.parametrize("cc", [90, 80])
def test_kernels_compile_for_gpu(cc):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPARSEATTN_CONFIG")}
    procs = [subprocess.Popen([sys.executable, "-m", "sparseattn.triton_kernels.gate", "--cc", str(cc), "--shard",
                               str(shard), "--num-shards", str(SHARDS)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for shard in range(SHARDS)]
    for shard, proc in enumerate(procs):
        stdout, stderr = proc.communicate(timeout=1500)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        assert lines, f"gate shard {shard} printed no result (rc={proc.returncode}):\n{stderr[-3000:]}"
        res = json.loads(lines[-1])
        assert res["compiled"] > 0, f"gate shard {shard} compiled nothing"
        assert not res["failures"], "\n".join(res["failures"])
        assert proc.returncode == 0, stderr[-3000:]
