#!/usr/bin/env bash
# The GPU validation of issue 17 in one call of the device tool (a lease is 15 minutes of device
# time in all, the machine's start included: one call of ~9.5 minutes, then give the machine back).
#
#   OUT=dir benchmarks/gpu_suite.sh [STAGE[/SECONDS] ...]      (default: the lease plan below)
#
#   setup     env.txt (GPU, driver, versions, commit) and an editable install with the image's
#             torch (no deps, no build isolation: the image cannot download), which builds csrc/
#             for SPARSEATTN_CUDA_ARCHS (default here 90a: the H200 only, half the nvcc time);
#             installs the wheels under .whl/ first when that folder was carried (the image lacks
#             flash-linear-attention, the Lightning anchor: on the dev machine run
#             `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl
#             fla-core==0.6.0 flash-linear-attention==0.6.0` and call the device tool with carry
#             [".whl"]). Always runs first; when it fails the call ends there.
#   tests     pytest on CUDA over GPU_TESTS (default: the CUDA extension, then every op family,
#             layouts, patterns, visual, launch limits, work accounting, torch.compile, dispatch,
#             the fuzzer's cases; the kernel backend only: -k "not cpu_path and not gate");
#             PYTEST_ARGS adds to it. Interrupted at its limit, it still reports what ran.
#   sanitize  benchmarks/sanitize.sh (TOOLS, default here memcheck): compute-sanitizer over the
#             CUDA extension's GPU tests (decode kernels and the layout builder).
#   profile   benchmarks/profile_cases.py: wall time, host-device syncs (with the Python line) and
#             torch.profiler tables + traces of the cases NOTES.md calls host-bound (decode with a
#             layout at B 1, block-sparse fwd+bwd at 4K), in profile/ of the tarball.
#   fuzz      python -m sparseattn.fuzz --device cuda (FUZZ_DEVICE; the CUDA kernels against the oracle)
#             for the stage's limit less 20 s, seed FUZZ_SEED (default: random, printed); a
#             failure prints a shrunk reproducer (--case '<json>', which carries the device).
#   bench     python -m sparseattn.bench $BENCH_ARGS, every suite. bench:SUITE runs one suite, and
#             bench:SUITE@ARG@ARG passes it options, e.g. bench:attention@--head-dims=128@--quick;
#             each word is its own process and its own table.
#
# A stage may carry a cap in seconds, STAGE/SECONDS (e.g. tests/180): it gets at most that, and
# never more than what BUDGET has left. BUDGET (seconds, default 560) bounds the whole call: keep
# it under the call's timeout_s and under the session's device time left (the device tool's
# status), counting a minute or two for the machine's start. A stage that runs long is
# interrupted (SIGINT: pytest, the sanitizer script and the bench still write what they have).
# The device tool returns at most 8 files, so everything lands in a work folder packed into
# $OUT/gpu_suite.tgz after every stage, next to $OUT/summary.txt and $OUT/bench.md (every bench
# table of the call, one after the other).
#
# The default plan, in priority order (later stages get what is left), is the next lease's, from
# what the first one (2026-11-30, benchmarks/results/2026-11-30-h200.md) measured and missed: a
# start ~35 s, setup ~40 s; ~850 tests ran in 170 s on 14 workers (not all: failures there are
# fixed and the JIT specializations are compiled on the CPU now), attention 4K/16K took 126 s and
# decode 44 s (done), Lightning did not finish its first case in 40 s, patterns ran 2 of 30 cases
# in 55 s. So: setup, decode again at 32K and 128K (44 s on the first lease; its split kernel
# changed since, untimed and not yet run on a GPU: the bench checks it against the oracle before
# timing it), the benchmarks not yet measured (Lightning at 16K vs
# flash-linear-attention, PowerAttention and the other patterns at 32K, HiP at 32K, the engine's
# varlen / padding / paged decode, the statistics at 8K), then the tests for what is left, then
# the profiles of NOTES.md's host-bound cases, memcheck, then the fuzzer on CUDA tensors with
# what is left (at BUDGET 555 the last three run only if earlier stages finish before their caps:
# name the stages to run them first).

set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
BUDGET=${BUDGET:-560}
WORK=$(mktemp -d /tmp/gpu_suite.XXXX)
mkdir -p "$OUT"
START=$SECONDS
export PYTHONUNBUFFERED=1 PY
export SPARSEATTN_CUDA_ARCHS=${SPARSEATTN_CUDA_ARCHS:-90a} TOOLS=${TOOLS:-memcheck}

log() { echo "$*" | tee -a "$WORK/summary.txt"; }

pack() {  # after every stage too: what is under $OUT comes back even if the tool ends the call
  tar -C "$WORK" -czf "$OUT/gpu_suite.tgz.part" . 2>/dev/null && mv "$OUT/gpu_suite.tgz.part" "$OUT/gpu_suite.tgz"
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  if compgen -G "$WORK/bench*.md" > /dev/null; then cat "$WORK"/bench*.md > "$OUT/bench.md"; fi
}
trap 'pack; echo "== packed under $OUT: $(ls "$OUT" | tr "\n" " ")"' EXIT

left() { echo $(( BUDGET - (SECONDS - START) - 25 )); }

stage() {  # name, cap in seconds (0: none), command...
  local name=$1 cap=$2; shift 2
  local t0=$SECONDS limit
  limit=$(left)
  if [ "$cap" -gt 0 ] && [ "$cap" -lt "$limit" ]; then limit=$cap; fi
  if [ "$limit" -lt 30 ]; then log "== $name: skipped, budget spent"; return 0; fi
  log "== $name (limit ${limit}s)"
  # timeout signals the whole process group: pytest's workers and the bench get the SIGINT too.
  LIMIT=$limit timeout --signal=INT --kill-after=15 "$limit" bash -c '"$@"' _ "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  log "== $name: rc=$rc in $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (interrupted at its limit)')"
  { grep -E '^(FAILED|ERROR) ' "$WORK/$name.log" | head -40; tail -n "${TAIL:-6}" "$WORK/$name.log"; } \
    | sed 's/^/   /' | tee -a "$WORK/summary.txt"
  pack
  return $rc
}

setup() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$WORK/env.txt" 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> "$WORK/env.txt" 2>&1
  echo "commit $(git rev-parse HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')" >> "$WORK/env.txt"
  # Wheels carried from the dev machine (the image has no internet): the Lightning anchor, fla.
  if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || return 1
  fi
  $PY -m pip install --no-deps --no-build-isolation -e . || return 1
  $PY -c "import sparseattn as sa, sparseattn._C; print('sparseattn', sa.__version__, 'cuda:', sa.cuda_unavailable_reason() or 'ok')"
}

GPU_TESTS=${GPU_TESTS:-"tests/cuda tests/ops tests/layout tests/patterns tests/visual tests/triton_kernels/test_launch.py tests/triton_kernels/test_work_accounting.py tests/test_torch_compile.py tests/test_dispatch.py tests/test_fuzz.py"}
export GPU_TESTS

tests() {
  local extra=()
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
  # shellcheck disable=SC2086
  $PY -m pytest -q -rfE -n "${WORKERS:-14}" -p no:cacheprovider --durations=15 "${extra[@]}" $GPU_TESTS \
    -k "not cpu_path and not gate" ${PYTEST_ARGS:-}
}

bench() {  # stage name, "SUITE[@ARG@ARG...]" ("" = every suite); results in $WORK/<name>/ and <name>.md
  local name=$1 suite=${2%%@*} args=()
  [ -n "$suite" ] && args+=(--suite "$suite")
  [[ $2 == *@* ]] && IFS=@ read -r -a extra <<< "${2#*@}" && args+=("${extra[@]}")
  # shellcheck disable=SC2086
  $PY -m sparseattn.bench --out "$WORK/$name" "${args[@]}" ${BENCH_ARGS:-}
  local rc=$?
  for f in "$WORK/$name"/*.md; do [ -f "$f" ] && cp "$f" "$WORK/$name.md"; done
  return $rc
}
fuzz() {  # the fuzzer on CUDA tensors (the kernels) for the stage's limit less a margin
  $PY -m sparseattn.fuzz --device "${FUZZ_DEVICE:-cuda}" --seed "${FUZZ_SEED:-$RANDOM}" \
    --minutes "$(awk -v s="$LIMIT" 'BEGIN { printf "%.2f", (s - 20) / 60 }')"
}
export -f setup tests bench fuzz
export WORK

PLAN="bench:decode@--lengths=32768,131072/45 bench:lightning@--lengths=16384/100 bench:patterns@--lengths=32768/90 bench:hip@--lengths=32768/70 bench:engine@--quick/60 bench:stats@--lengths=8192/40 tests/120 profile/45 sanitize/45 fuzz/60"
log "gpu_suite: $(date -u +%FT%TZ) stages: ${*:-$PLAN}"
stage setup 150 setup
setup_rc=$?
[ -f "$WORK/env.txt" ] && sed 's/^/   /' "$WORK/env.txt" | tee -a "$WORK/summary.txt"
[ "$setup_rc" -eq 0 ] || { log "== setup failed: nothing else runs"; exit 1; }
for word in ${*:-$PLAN}; do
  s=$word cap=0
  if [[ $word =~ ^(.*)/([0-9]+)$ ]]; then s=${BASH_REMATCH[1]} cap=${BASH_REMATCH[2]}; fi
  case $s in
    setup) ;;
    tests) stage tests "$cap" tests ;;
    sanitize) stage sanitize "$cap" env OUT="$WORK" PY="$PY" benchmarks/sanitize.sh ;;
    fuzz) stage fuzz "$cap" fuzz ;;
    profile) stage profile "$cap" $PY benchmarks/profile_cases.py --out "$WORK/profile" ;;
    bench) stage bench "$cap" bench bench "" ;;
    bench:*) n=bench-${s#bench:}; n=${n//[^A-Za-z0-9_.-]/_}; stage "$n" "$cap" bench "$n" "${s#bench:}" ;;
    *) log "unknown stage: $s"; exit 2 ;;
  esac
done
exit 0
