#!/usr/bin/env bash
# One short GPU run for a CUDA machine without network, made so that a run cut
# short still leaves every finished result:
#
#   bash bench/gpu_check.sh [OUT_DIR]             (default: $OUT, else ./gpu_check_out)
#   bash bench/gpu_check.sh --dry-run [OUT_DIR]   on CPU: every step, tiny selection
#
# Steps (each under `timeout`, each recorded in OUT/steps.jsonl when it ends):
#   carry        installs what the image lacks (bench/device-requirements.txt) from the
#                carried wheels, $GAPFIX_DEVICE_WHEELS (default .device-wheels, made by
#                scripts/download_device_wheels.sh), no index; lists what it installed
#                (OUT/carried.json). The dry run installs nothing and lists what is there.
#   build_check  torch present; with a GPU visible: CUDA_HOME/nvcc found and the
#                toolkit's major version equal to torch.version.cuda's. Else stop.
#   build        pip install --no-build-isolation --no-deps -e . (CUDA extension)
#   build_verify with a GPU visible, gapfix._C must report cuda=yes. Else stop.
#   env          card name (torch and nvidia-smi, read only), versions -> OUT/env.json
#   collect      pytest --collect-only of the whole selection (tests -m cuda, bench -m cuda),
#                the dry run included: any collection error fails the run. The later steps
#                pass --continue-on-collection-errors, so a module that fails to import
#                costs its own tests, never the whole step.
#   warm         compiles every kernel the tests and benchmarks launch by running
#                them once (Triton and inductor on-disk caches): the tests under
#                pytest-xdist (-n $GAPFIX_CHECK_TEST_WORKERS, default 6), the benchmarks
#                beside them in one process; counts and times every Triton compilation
#   tests        pytest tests -m cuda   (explicit `cuda` marks and every test using
#                the triton_device fixture), against the warm caches; pytest-timeout
#                ends a test stuck in Python after GAPFIX_CHECK_TEST_TIMEOUT seconds
#   bench        pytest bench -m cuda   (every benchmark marked cuda, new files too)
#   table        OUT/gpu_results.json: steps, card, compilations, each test's
#                outcome, each benchmark's row, and the tests that never finished
# The tests and bench limits are sized from what the warm step measured for the
# same tests (run time without compile time, kernels to load, torch.compile
# graphs, tests not finished warm), capped by what is left of the budget; a test
# the warm step started and never finished runs last in its step, so a second
# hang cannot cost the results of the tests after it.
# GAPFIX_CHECK_BUDGET seconds in all (default 455: with the kill grace periods and
# the table, under 8 minutes). Every step before warm is capped so that the tests, bench
# and table reserves stay whole; warm gets what is left above them, and a warm step cut
# at its limit leaves the tests step TESTS_RESERVE less 5 s of kill grace.
#
# While it runs, bench/stream_results.py (a pytest plugin) writes one JSON line
# per test, benchmark and Triton compilation to OUT/stream/<step>.jsonl and
# flushes it: a step killed by its limit leaves its finished results, and the
# test it was running is the one with a "start" line and no "result".
# Never changes the card's settings. Expects python3 with torch (a CUDA build), triton,
# pytest, pytest-benchmark, pytest-timeout and pytest-xdist (the device image has them); installs
# only the carried wheels. docs/gpu.md: how to prepare and read a run.
set -uo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
for old in stream logs steps.jsonl gpu_results.json env.json tests_cuda.xml bench_cuda.json; do
  rm -rf "${OUT_DIR:?}/$old"
done
mkdir -p "$OUT_DIR/stream" "$OUT_DIR/logs"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
cd "$ROOT"

export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"   # for `-p stream_results`
export GAPFIX_GPU_CHECK_DRY_RUN="$DRY_RUN"
TOOLS=(python3 "$ROOT/bench/gpu_check_tools.py")
WHEELS="${GAPFIX_DEVICE_WHEELS:-$ROOT/.device-wheels}"
CORES="$(nproc 2>/dev/null || echo 4)"

if [ "$DRY_RUN" = 1 ]; then
  # CPU: Triton under the interpreter, a tiny selection (a few tests that take the
  # triton_device fixture, one CPU benchmark), small budget
  export TRITON_INTERPRET=1
  # a cap: the dry run takes 2-5 minutes on a shared 2-core CPU (each step imports torch)
  BUDGET="${GAPFIX_CHECK_BUDGET:-900}" COLLECT_LIMIT=300  # collecting everything: 1-3 minutes here
  TEST_WORKERS=2 TESTS_RESERVE=120 BENCH_RESERVE=120 TABLE_RESERVE=15
  if [ "${GAPFIX_CHECK_DRY_FULL:-0}" = 1 ]; then  # every test of the GPU run, under the interpreter
    BUDGET="${GAPFIX_CHECK_BUDGET:-2400}" TESTS_RESERVE=900 BENCH_RESERVE=300
    TEST_SEL=(tests -m cuda)
    BENCH_SEL=(bench -m cuda)
  else  # the collect step still checks the whole selection
    TEST_SEL=(tests/test_rac_labels.py -m cuda -k "test_triton_empty or test_paper_examples_given_alignment")
    BENCH_SEL=(bench/test_bench_rac_labels.py -k "batched_vs_per_pair and path"
               --benchmark-max-time=0.02 --benchmark-min-rounds=1 --benchmark-warmup=off)
  fi
else
  BUDGET="${GAPFIX_CHECK_BUDGET:-455}" COLLECT_LIMIT=120  # + 3 x 5 s of kill grace + the table: < 8 minutes
  TEST_WORKERS="${GAPFIX_CHECK_TEST_WORKERS:-6}"
  # what the tests step needs even when warm uses all of its limit (then 120 - 5 s of warm's
  # kill grace = 115 s): start-up and collection plus the tests' own run time, a cache load per
  # kernel (bench/gpu_check_tools.py). The dry run of the whole selection in the image stand-in
  # measured at most 34 s of the first and 49 s of the second on a loaded 2-core CPU under the
  # interpreter (docs/gpu.md); the 24 CUDA-only tests it skips are not in that figure.
  TESTS_RESERVE=120 BENCH_RESERVE=100 TABLE_RESERVE=15
  TEST_SEL=(tests -m cuda)
  BENCH_SEL=(bench -m cuda)
fi
BUILD_LIMIT="${GAPFIX_CHECK_BUILD_LIMIT:-180}"
PYTEST=(python3 -m pytest -q -ra -p no:cacheprovider -p stream_results)
# the steps that run tests: a module that fails to import costs its own tests only (the
# collect step has already failed the run for it)
RUN_OPTS=(--continue-on-collection-errors)
if python3 -c "import pytest_timeout" 2>/dev/null; then
  # a test stuck in Python ends with its stack in the log, and the step goes on; a hang
  # inside a CUDA call is not interruptible this way, and the step's own limit stays for it
  RUN_OPTS+=(--timeout="${GAPFIX_CHECK_TEST_TIMEOUT:-120}" --timeout-method=signal)
else
  echo "gpu_check: pytest-timeout is not installed: no per-test timeout" >>"$LOG"
fi
if [ "$DRY_RUN" = 1 ]; then  # plugins no test here uses, ~2 s of start-up each on a busy CPU
  PYTEST+=(-p no:hypothesispytest -p no:anyio)
fi
# the warm pass times nothing: one round of what pytest-benchmark calibrates
WARM_BENCH_OPTS=(--benchmark-min-rounds=1 --benchmark-max-time=0 --benchmark-warmup=off)
WARM_TEST_OPTS=()
if python3 -c "import xdist" 2>/dev/null; then
  WARM_TEST_OPTS=(-n "$TEST_WORKERS")
else
  echo "gpu_check: pytest-xdist is not installed: the warm step runs the tests in one process" >>"$LOG"
fi

if [ -z "${CUDA_HOME:-}" ]; then
  NVCC_PATH="$(command -v nvcc 2>/dev/null || echo /x/x/x)"
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$NVCC_PATH")")"; do
    if [ -x "$candidate/bin/nvcc" ]; then export CUDA_HOME="$candidate"; break; fi
  done
fi

STATUS=0
left() { echo $((BUDGET - SECONDS)); }
# the limit of a step before warm: its own, but never eating what tests, bench and table need
# (a hang there cuts the run's results, not its 8 minutes)
before_warm() {
  local room=$(($(left) - TESTS_RESERVE - BENCH_RESERVE - TABLE_RESERVE))
  if [ "$room" -lt 10 ]; then room=10; fi
  if [ "$1" -lt "$room" ]; then echo "$1"; else echo "$room"; fi
}
say() { echo "$*" | tee -a "$LOG"; }  # progress on stdout too: a caller cut short still sees it
record() {  # record STEP RC SECONDS LIMIT: one line of OUT/steps.jsonl (with $NOTE, if set)
  local timed_out=false
  if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then timed_out=true; fi
  python3 - "$OUT_DIR/steps.jsonl" "$1" "$2" "$3" "$4" "$timed_out" "${NOTE:-}" <<'EOF'
import json, sys
path, step, rc, seconds, limit, timed_out, note = sys.argv[1:]
with open(path, "a") as f:
    f.write(json.dumps({"step": step, "rc": int(rc), "seconds": int(seconds), "limit_s": int(limit),
                        "timed_out": timed_out == "true", "note": note}) + "\n")
EOF
}
step() {  # step NAME LIMIT CMD...: runs CMD under LIMIT seconds, logs and records it; returns its status
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS rc
  say "=== $name (limit ${limit}s, $(left)s of the budget left): $*"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  say "=== $name: exit $rc after $((SECONDS - start))s"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then say "=== $name: KILLED AT ITS LIMIT"; fi
  record "$name" "$rc" "$((SECONDS - start))" "$limit"
  [ "$rc" -ne 0 ] && STATUS=1
  return "$rc"
}
finish() {  # the table from whatever was recorded, then the log's tail
  "${TOOLS[@]}" table "$OUT_DIR" 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
  say "=== done after ${SECONDS}s, status $STATUS (log: $LOG, table: $OUT_DIR/gpu_results.json)"
  exit "$STATUS"
}
stop() {  # a step that makes the rest meaningless: say why, write the table, stop
  say "=== STOPPED: $1"
  tail -n 30 "$LOG"
  STATUS=1
  finish
}

{
  echo "gapfix gpu_check $(date -u +%FT%TZ) dry_run=$DRY_RUN budget=${BUDGET}s cores=$CORES"
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
} >>"$LOG"

# ---------------------------------------------------------------- carry
if [ "$DRY_RUN" = 1 ]; then
  NOTE="dry run: nothing installed, what the environment has" step carry 120 "${TOOLS[@]}" carry - "$OUT_DIR"
else
  # PIP_NO_INDEX is set above: nothing is fetched, only the carried folder is read
  NOTE="from $WHEELS" step carry "$(before_warm 120)" "${TOOLS[@]}" carry "$WHEELS" "$OUT_DIR"
fi
grep '^carried: \|^carry: \|^CARRY FAILED\|^pip check' "$LOG" | tail -n 20

# ---------------------------------------------------------------- build
step build_check "$(before_warm 60)" "${TOOLS[@]}" build-check before ||
  stop "the CUDA build cannot work here (see BUILD CHECK FAILED above)"
if [ "$DRY_RUN" = 1 ]; then
  # the dry run builds nothing: build_verify and the steps after it import gapfix from this
  # checkout (its extension as built there), installed or not
  export PYTHONPATH="$ROOT:$PYTHONPATH"
  NOTE="dry run: no build, gapfix from the checkout" step build 60 echo "dry run: no build" ||
    stop "the dry run's build step failed"
else
  python3 -c "import torch" >>"$LOG" 2>&1 || stop "torch is not installed"
  MAX_JOBS="${MAX_JOBS:-$CORES}" step build "$(before_warm "$BUILD_LIMIT")" \
    python3 -m pip install --no-build-isolation --no-deps -e . || stop "the build failed"
fi
step build_verify "$(before_warm 60)" "${TOOLS[@]}" build-check after ||
  stop "gapfix._C cannot serve the GPU (see BUILD CHECK FAILED above)"
step env "$(before_warm 60)" "${TOOLS[@]}" env "$OUT_DIR"
# every test and benchmark the GPU run selects must import: the dry run checks the same list
step collect "$(before_warm "$COLLECT_LIMIT")" "${PYTEST[@]}" --collect-only -m cuda tests bench ||
  grep -E '^ERROR |^E  ' "$LOG" | tail -n 20

# ---------------------------------------------------------------- warm the caches
# Two pytest sessions at once, each under the warm limit (timeout ends a session's whole process
# group, xdist's workers included):
#  - the tests under pytest-xdist, -n TEST_WORKERS: each worker streams its own tests, kernels
#    and unfinished test to OUT/stream/warm_tests_gw<i>.jsonl (bench/stream_results.py);
#  - the benchmarks serially, in one process, one calibrated round each: pytest-benchmark turns
#    itself off under xdist, and a benchmark off leaves `benchmark.stats` None, which
#    test_bench_rac_labels.py and test_bench_real_model.py read after the timed call.
# Their wall times and exits go to OUT/stream/warm_<tests|bench>.wall (the limit step reads them).
warm_session() {  # warm_session NAME LIMIT CMD...
  local name="$1" limit="$2" start=$SECONDS r
  shift 2
  timeout --kill-after=5 "$limit" "$@" >"$OUT_DIR/logs/$name.log" 2>&1
  r=$?
  echo "{\"seconds\": $((SECONDS - start)), \"rc\": $r}" >"$OUT_DIR/stream/$name.wall"
  return "$r"
}
warm() {
  local limit="$1" rc=0 r pid pid_tests pid_bench
  warm_session warm_tests "$limit" "${PYTEST[@]}" "${RUN_OPTS[@]}" "${WARM_TEST_OPTS[@]}" "${TEST_SEL[@]}" \
    --stream-step warm --stream-jsonl "$OUT_DIR/stream/warm_tests.jsonl" &
  pid_tests=$!
  warm_session warm_bench "$limit" "${PYTEST[@]}" "${RUN_OPTS[@]}" "${BENCH_SEL[@]}" "${WARM_BENCH_OPTS[@]}" \
    --stream-step warm --stream-jsonl "$OUT_DIR/stream/warm_bench.jsonl" &
  pid_bench=$!
  for pid in "$pid_tests" "$pid_bench"; do
    wait "$pid"
    r=$?
    echo "warm session $pid: exit $r"
    # failing tests (1) or an empty selection (5) do not stop the warming; a kill at the limit does
    if [ "$r" -eq 124 ] || [ "$r" -eq 137 ]; then
      rc=124
    elif [ "$r" -ne 0 ] && [ "$r" -ne 1 ] && [ "$r" -ne 5 ] && [ "$rc" -eq 0 ]; then
      rc="$r"
    fi
  done
  tail -n 3 "$OUT_DIR"/logs/warm_*.log
  return "$rc"
}
WARM_LIMIT=$(( $(left) - TESTS_RESERVE - BENCH_RESERVE - TABLE_RESERVE ))
if [ "$WARM_LIMIT" -lt 10 ]; then WARM_LIMIT=10; fi
# each session has the limit itself (timeout), so the wait ends by WARM_LIMIT + 5 s
say "=== warm (limit ${WARM_LIMIT}s, $(left)s of the budget left): tests ${WARM_TEST_OPTS[*]:-serially}," \
  "benchmarks serially"
WARM_START=$SECONDS
warm "$WARM_LIMIT" >>"$LOG" 2>&1
RC=$?
say "=== warm: exit $RC after $((SECONDS - WARM_START))s"
NOTE="tests: ${WARM_TEST_OPTS[*]:-one process}; benchmarks: one process" \
  record warm "$RC" "$((SECONDS - WARM_START))" "$WARM_LIMIT"
[ "$RC" -ne 0 ] && STATUS=1

# ---------------------------------------------------------------- tests and benchmarks, warm
TESTS_LIMIT=$("${TOOLS[@]}" limit "$OUT_DIR" tests $(( $(left) - BENCH_RESERVE - TABLE_RESERVE )) 2>>"$LOG")
step tests "${TESTS_LIMIT:-$TESTS_RESERVE}" "${PYTEST[@]}" "${RUN_OPTS[@]}" "${TEST_SEL[@]}" --stream-step tests \
  --stream-jsonl "$OUT_DIR/stream/tests.jsonl" --stream-last "$OUT_DIR/stream/tests.last" \
  --junitxml="$OUT_DIR/tests_cuda.xml"
BENCH_LIMIT=$("${TOOLS[@]}" limit "$OUT_DIR" bench $(( $(left) - TABLE_RESERVE )) 2>>"$LOG")
step bench "${BENCH_LIMIT:-$BENCH_RESERVE}" "${PYTEST[@]}" "${RUN_OPTS[@]}" "${BENCH_SEL[@]}" --stream-step bench \
  --stream-jsonl "$OUT_DIR/stream/bench.jsonl" --stream-last "$OUT_DIR/stream/bench.last" \
  --benchmark-json="$OUT_DIR/bench_cuda.json"

finish
