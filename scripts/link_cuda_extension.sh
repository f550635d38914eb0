#!/usr/bin/env bash
# Builds and links gapfix._C with its CUDA sources against a CUDA build of torch, on a
# machine without a GPU, so that compile errors, link errors and unresolved symbols show
# here rather than on a lent GPU device:
#
#   bash scripts/link_cuda_extension.sh [WORK]     (default: ${TMPDIR:-/tmp}/gapfix-cuda-link)
#
# WORK/venv gets TORCH_SPEC (default torch==2.14.1: a CUDA 13 build that pip takes from
# this machine's disk for Python 3.11) and the build tools; the extension is built out of
# tree into WORK/lib (nothing lands in the checkout) with nvcc from CUDA_HOME (default: the
# toolkit of the nvcc on PATH) for TORCH_CUDA_ARCH_LIST (default 9.0, the device's H100/H200).
# Then, in a fresh process with LD_BIND_NOW=1 (every symbol resolved at load, not at first
# call), it loads the library into torch, checks build_info says cuda=yes, that
# gapfix::align has a CUDA kernel registered, that the cubin holds the asked architecture,
# and runs the CPU kernel of the same library on a known pair. Exit 0 only when all hold.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-${TMPDIR:-/tmp}/gapfix-cuda-link}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [ -z "${CUDA_HOME:-}" ]; then
  # the toolkit's folder, with its headers: /usr/local/bin/nvcc may be a wrapper script
  nvcc_path="$(command -v nvcc || echo /nonexistent/bin/nvcc)"
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")"; do
    if [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime_api.h" ]; then
      CUDA_HOME="$candidate"
      break
    fi
  done
fi
if [ -z "${CUDA_HOME:-}" ]; then
  echo "link_cuda_extension: no CUDA toolkit (bin/nvcc and include/cuda_runtime_api.h) found; set CUDA_HOME" >&2
  exit 1
fi
export CUDA_HOME
echo "link_cuda_extension: CUDA_HOME=$CUDA_HOME"
mkdir -p "$WORK"
VENV="$WORK/venv"
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${TORCH_SPEC#torch==}')" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" "setuptools>=69" wheel ninja numpy
fi
PY="$VENV/bin/python"
"$PY" -c "import torch; print('link_cuda_extension: torch', torch.__version__, 'cuda', torch.version.cuda)"
"$CUDA_HOME/bin/nvcc" --version | tail -n 2
rm -rf "$WORK/lib"  # WORK/tmp stays: ninja rebuilds what changed, flags included
start=$SECONDS
# from the checkout (setup.py names its sources relative to it), into WORK only
(cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-1}" "$PY" setup.py -q build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp")
echo "link_cuda_extension: built in $((SECONDS - start))s"
LIB="$(find "$WORK/lib" -name '_C*.so' | head -n 1)"
if [ -z "$LIB" ]; then
  echo "link_cuda_extension: the build made no _C*.so under $WORK/lib" >&2
  exit 1
fi
echo "link_cuda_extension: $LIB"
arch="sm_${TORCH_CUDA_ARCH_LIST//./}"
arch="${arch%%[ ;]*}"
# (listings read whole before grep: grep -q closing the pipe early fails it under pipefail)
if [ -x "$CUDA_HOME/bin/cuobjdump" ]; then
  if ! grep -q "$arch" <<<"$("$CUDA_HOME/bin/cuobjdump" --list-elf "$LIB")"; then
    echo "link_cuda_extension: no $arch cubin in $LIB:" >&2
    "$CUDA_HOME/bin/cuobjdump" --list-elf "$LIB" >&2
    exit 1
  fi
  echo "link_cuda_extension: cubin for $arch present"
elif grep -q "\.nv_fatbin" <<<"$(objdump -h "$LIB")"; then  # this toolkit has no cuobjdump: the fatbin at least
  echo "link_cuda_extension: no cuobjdump in $CUDA_HOME: the .nv_fatbin section is present, its architectures unchecked"
else
  echo "link_cuda_extension: $LIB has no .nv_fatbin section: no GPU code was linked in" >&2
  exit 1
fi
LD_BIND_NOW=1 "$PY" - "$LIB" <<'PY'
import sys

import torch

library = sys.argv[1]
torch.ops.load_library(library)  # dlopen with LD_BIND_NOW=1: an unresolved symbol fails here
info = torch.ops.gapfix.build_info()
print("link_cuda_extension: build_info", info)
problems = []
if "cuda=yes" not in info:
    problems.append(f"build_info says {info!r}: the CUDA sources were not compiled in")
for key in ("CPU", "CUDA"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("gapfix::align", key):
        problems.append(f"gapfix::align has no {key} kernel registered")
# "abXc" against "abc": distance 1, path 0 1 2 2 3 (docs/design.md's worked example)
gen = torch.tensor([[0, 1, 9, 2]], dtype=torch.int32)
ref = torch.tensor([[0, 1, 2]], dtype=torch.int32)
distance, path, *_ = torch.ops.gapfix.align(gen, ref, torch.tensor([4], dtype=torch.int64),
                                            torch.tensor([3], dtype=torch.int64), 0)
if distance.tolist() != [1] or path.tolist() != [[0, 1, 2, 2, 3]]:
    problems.append(f"the CPU kernel of this build gave distance {distance.tolist()} path {path.tolist()}")
for problem in problems:
    print(f"link_cuda_extension: FAILED: {problem}", file=sys.stderr)
if problems:
    sys.exit(1)
print("link_cuda_extension: OK: loads with every symbol resolved, CPU and CUDA kernels registered")
PY
