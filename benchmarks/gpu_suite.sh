#!/usr/bin/env bash
# The whole GPU session in one call (issue 6): build, test on CUDA, sanitize, benchmark.
# Runs on the lent GPU image (torch 2.11+cu130, triton 3.6.0, nvcc, pytest, pytest-xdist, tqdm,
# pybind11; no internet) from the repository root; everything lands under $OUT (default ./gpu_out).
# Not yet run on a GPU: no GPU has been lent to this project so far.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
# No build isolation: the image has setuptools and cannot download; keep its torch.
$PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
# 1. The whole test suite on CUDA.
$PY -m pytest -q -n 4 tests -p no:cacheprovider > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/summary.txt"
tail -3 "$OUT/tests.log" >> "$OUT/summary.txt"
# 2. compute-sanitizer over the CUDA extension's GPU tests (when that script exists).
if [ -x benchmarks/sanitize.sh ]; then
  OUT="$OUT" benchmarks/sanitize.sh > "$OUT/sanitize.log" 2>&1; echo "sanitize rc=$?" >> "$OUT/summary.txt"
fi
# 3. The benchmark: every suite, anchors in the same run.
$PY -m sparseattn.bench --out "$OUT" > "$OUT/bench.log" 2>&1; echo "bench rc=$?" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
tail -40 "$OUT/bench.log"
