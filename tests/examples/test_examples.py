"""Every script in examples/ runs (as a user would run it), in a subprocess."""
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[2] / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, tmp_path):
    env = dict(os.environ, SPARSEATTN_CPU_PATH="1")   # the user's CPU path, not the interpreter
    proc = subprocess.run([sys.executable, str(path), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(tmp_path.iterdir()), "the example wrote nothing"
