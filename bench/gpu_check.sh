#!/usr/bin/env bash
# One short GPU run for a CUDA machine without network: builds gapfix with its
# CUDA kernels, runs every test marked `cuda` and every benchmark marked `cuda`
# (any file under tests/ and bench/: new ones are picked up as they are added),
# and writes under the output folder:
#   gpu_check.log      everything, step by step, with each step's exit status
#   tests_cuda.xml     junit report of `pytest tests -m cuda`
#   bench_cuda.json    pytest-benchmark JSON of `pytest bench -m cuda`
#   gpu_results.json   the table: op, case, time_s, throughput, baseline, ratio
#
#   bash bench/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu_check_out)
#
# Budget: under 8 minutes in all (each step has its own timeout). Reads the GPU
# model only; never changes GPU settings. Expects torch (CUDA build), triton,
# pytest and pytest-benchmark already installed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
cd "$ROOT"

BUILD_TIMEOUT="${GAPFIX_BUILD_TIMEOUT:-240}"
TEST_TIMEOUT="${GAPFIX_TEST_TIMEOUT:-110}"
BENCH_TIMEOUT="${GAPFIX_BENCH_TIMEOUT:-110}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")"; do
    if [ -x "$candidate/bin/nvcc" ]; then export CUDA_HOME="$candidate"; break; fi
  done
fi

STATUS=0
step() {  # step NAME TIMEOUT CMD...: runs CMD under a timeout, logs it, records the status
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  echo "=== $name (timeout ${limit}s): $*" >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s" >>"$LOG"
  [ "$rc" -ne 0 ] && STATUS=1
  return 0
}

{
  echo "gapfix gpu_check $(date -u +%FT%TZ)"
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
  python -c "import triton; print('triton', triton.__version__)" 2>&1 || true
} >>"$LOG"

step build "$BUILD_TIMEOUT" python -m pip install --no-build-isolation --no-deps -e .
step build_info 60 python -c "import gapfix._native as n; print(n.build_info())"
step tests_cuda "$TEST_TIMEOUT" python -m pytest tests -m cuda -q -ra -p no:cacheprovider \
  --junitxml="$OUT_DIR/tests_cuda.xml"
step bench_cuda "$BENCH_TIMEOUT" python -m pytest bench -m cuda -q -ra -p no:cacheprovider \
  --benchmark-json="$OUT_DIR/bench_cuda.json"

python - "$OUT_DIR" >>"$LOG" 2>&1 <<'EOF' || STATUS=1
# The benchmark JSON as one table: a row per benchmark, the fields every
# gapfix benchmark records in extra_info (throughput, baseline, ratio), the
# rest of extra_info kept alongside.
import json, os, sys
out_dir = sys.argv[1]
source = os.path.join(out_dir, "bench_cuda.json")
rows = []
try:
    with open(source) as f:
        data = json.load(f)
except (OSError, ValueError) as exc:  # no benchmark ran: pytest-benchmark leaves it empty
    print(f"no benchmark results in {source}: {exc}")
    data = {}
if data:
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info") or {})
        name = bench.get("name", "")
        rows.append({
            "op": name.split("[")[0].removeprefix("test_bench_"),
            "file": bench.get("fullname", "").split("::")[0],
            "case": info.pop("case", bench.get("param")),
            "time_s": (bench.get("stats") or {}).get("median"),
            "throughput": info.pop("throughput", None),
            "throughput_unit": info.pop("throughput_unit", None),
            "baseline": info.pop("baseline", None),
            "ratio": info.pop("ratio", info.pop("speedup", None)),
            "extra": info,
        })
with open(os.path.join(out_dir, "gpu_results.json"), "w") as f:
    json.dump({"source": "bench_cuda.json", "rows": rows}, f, indent=2)
print(f"gpu_results.json: {len(rows)} rows")
for row in rows:
    print(f"  {row['op']:<40} {str(row['case'])[:50]:<50} time={row['time_s']} "
          f"throughput={row['throughput']} {row['throughput_unit'] or ''} ratio={row['ratio']}")
EOF

echo "=== done, status $STATUS" >>"$LOG"
tail -n 40 "$LOG"
exit "$STATUS"
