#!/usr/bin/env bash
# The GPU session of issue 6 in stages, each sized to fit one call of the device tool.
#
#   OUT=dir benchmarks/gpu_suite.sh [STAGE ...]      (default: setup tests sanitize bench)
#
#   setup     env.txt (GPU, driver, versions, commit) and an editable install with the image's
#             torch (no deps, no build isolation: the image cannot download), which builds csrc/;
#             installs the wheels under .whl/ first when that folder was carried (the image lacks
#             flash-linear-attention, the Lightning anchor: on the dev machine run
#             `pip download --no-deps -d .whl fla-core==0.6.0 flash-linear-attention==0.6.0`
#             and call the device tool with carry [".whl"]). Every call runs it first: ninja
#             rebuilds only what changed on a warm machine.
#   tests     the whole pytest suite on CUDA; PYTEST_ARGS adds to it (e.g. "-k decode -x").
#   sanitize  benchmarks/sanitize.sh: compute-sanitizer memcheck + racecheck on the CUDA extension.
#   bench     python -m sparseattn.bench $BENCH_ARGS, every suite. bench:SUITE runs one suite, and
#             bench:SUITE@ARG@ARG passes it options, e.g. bench:attention@--head-dims=128@--quick;
#             each word is its own process and its own table.
#
# BUDGET (seconds, default 540) bounds the whole call: keep it under the call's timeout_s and under
# the session's device time left (the device tool's status). Each stage gets what is left less a
# margin and is interrupted (SIGINT: pytest, the sanitizer script and the bench still write what
# they have) when it runs long. The device tool returns at most 8 files, so everything lands in a
# work folder packed into $OUT/gpu_suite.tgz after every stage, next to $OUT/summary.txt and
# $OUT/bench.md (every bench table of the call, one after the other).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
BUDGET=${BUDGET:-540}
WORK=$(mktemp -d /tmp/gpu_suite.XXXX)
mkdir -p "$OUT"
START=$SECONDS
export PYTHONUNBUFFERED=1 PY

log() { echo "$*" | tee -a "$WORK/summary.txt"; }

pack() {  # after every stage too: what is under $OUT comes back even if the tool ends the call
  tar -C "$WORK" -czf "$OUT/gpu_suite.tgz.part" . 2>/dev/null && mv "$OUT/gpu_suite.tgz.part" "$OUT/gpu_suite.tgz"
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  if compgen -G "$WORK/bench*.md" > /dev/null; then cat "$WORK"/bench*.md > "$OUT/bench.md"; fi
}
trap 'pack; echo "== packed under $OUT: $(ls "$OUT" | tr "\n" " ")"' EXIT

left() { echo $(( BUDGET - (SECONDS - START) - 25 )); }

stage() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS limit
  limit=$(left)
  if [ "$limit" -lt 30 ]; then log "== $name: skipped, budget spent"; return 0; fi
  log "== $name (limit ${limit}s)"
  # timeout signals the whole process group: pytest's workers and the bench get the SIGINT too.
  timeout --signal=INT --kill-after=15 "$limit" bash -c '"$@"' _ "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  log "== $name: rc=$rc in $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (interrupted at its limit)')"
  { grep -E '^(FAILED|ERROR) ' "$WORK/$name.log" | head -40; tail -n "${TAIL:-6}" "$WORK/$name.log"; } \
    | sed 's/^/   /' | tee -a "$WORK/summary.txt"
  pack
  return 0
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

tests() {
  local extra=()
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=300)
  # shellcheck disable=SC2086
  $PY -m pytest -q -rfE -n "${WORKERS:-8}" -p no:cacheprovider --durations=20 "${extra[@]}" tests ${PYTEST_ARGS:-}
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
export -f setup tests bench
export WORK

log "gpu_suite: $(date -u +%FT%TZ) stages: ${*:-setup tests sanitize bench}"
stage setup setup
[ -f "$WORK/env.txt" ] && sed 's/^/   /' "$WORK/env.txt" | tee -a "$WORK/summary.txt"
for s in ${*:-tests sanitize bench}; do
  case $s in
    setup) ;;
    tests) stage tests tests ;;
    sanitize) stage sanitize env OUT="$WORK" PY="$PY" benchmarks/sanitize.sh ;;
    bench) stage bench bench bench "" ;;
    bench:*) n=bench-${s#bench:}; n=${n//[^A-Za-z0-9_.-]/_}; stage "$n" bench "$n" "${s#bench:}" ;;
    *) log "unknown stage: $s"; exit 2 ;;
  esac
done
