#!/usr/bin/env bash
# compute-sanitizer over the GPU tests of the CUDA extension (run on a lent GPU).
#
#   benchmarks/sanitize.sh            # memcheck + racecheck, log under benchmarks/results/
#   TOOLS=memcheck benchmarks/sanitize.sh
#   OUT=dir benchmarks/sanitize.sh     # where the log goes (default benchmarks/results/)
#
# memcheck runs every GPU test of tests/cuda/test_cuda_extension.py; racecheck (much slower) runs a
# representative subset. PyTorch's caching allocator is turned off so memcheck sees every
# allocation's real bounds. Exit status: non-zero when any tool reports an error.
set -uo pipefail
cd "$(dirname "$0")/.."
command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found (CUDA toolkit bin/ on PATH?)" >&2; exit 2; }
"${PY:-python3}" -c "import sparseattn as sa, sys; r = sa.cuda_unavailable_reason(); sys.exit(f'no usable CUDA device: {r}' if r else 0)" || exit 2

dest=${OUT:-benchmarks/results}
mkdir -p "$dest"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log="$dest/sanitizer-${stamp}.txt"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
unset TRITON_INTERPRET
{
  echo "# compute-sanitizer on sparseattn._C"
  echo "date: ${stamp}"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  compute-sanitizer --version | tail -1
  "${PY:-python3}" -c "import torch, sparseattn._C as C; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'archs', C.cuda_archs)"
} | tee "$log"

status=0
interrupted=
trap 'interrupted=1' INT  # an interrupted tool still gets its report's tail into the log; no next tool
run() {  # tool, pytest -k expression
  local tool=$1 expr=$2 out
  out=$(mktemp)
  echo "== ${tool} (-k '${expr}')" | tee -a "$log"
  compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
    "${PY:-python3}" -m pytest -q -p no:cacheprovider tests/cuda/test_cuda_extension.py -k "$expr" > "$out" 2>&1
  local rc=$?
  tail -40 "$out" | tee -a "$log"
  rm -f "$out"
  echo "== ${tool}: exit ${rc}${interrupted:+ (interrupted)}" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}
for tool in ${TOOLS:-memcheck racecheck}; do
  [ -n "$interrupted" ] && break
  case $tool in
    memcheck) run memcheck "gpu" ;;
    racecheck) run racecheck "gpu and (long_cache or side_stream or broadcast or builder_identical or (decode_dense and heads1) or (decode_layout and per))" ;;
    *) run "$tool" "gpu" ;;
  esac
done
echo "log: $log"
exit $status
