"""Compile gate: every Triton kernel, at every config its prune can select, compiles for sm_90
and sm_80 and fits their shared memory. Runs without a GPU, in a subprocess where the Triton
interpreter is off (interpreted kernels cannot be compiled)."""
import json
import os
import subprocess
import sys

import pytest

SHARDS = 2
pytestmark = pytest.mark.gate


@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("cc", [90, 80])
def test_kernels_compile_for_gpu(cc, shard):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPARSEATTN_CONFIG")}
    proc = subprocess.run(
        [sys.executable, "-m", "sparseattn.triton_kernels.gate", "--cc", str(cc), "--shard", str(shard),
         "--num-shards", str(SHARDS)], env=env, capture_output=True, text=True, timeout=1500)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert lines, f"gate printed no result (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    res = json.loads(lines[-1])
    assert res["compiled"] > 0, "gate compiled nothing"
    assert not res["failures"], "\n".join(res["failures"])
    assert proc.returncode == 0, proc.stderr[-3000:]
