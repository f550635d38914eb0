#!/usr/bin/env bash
# Builds a CPU stand-in of the GPU device's image in a virtual environment, so that what
# bench/gpu_check.sh meets there (which packages exist, at which versions) is tried here:
#
#   bash scripts/image_venv.sh VENV
#
# VENV gets bench/device-image.txt's pins, except where this machine cannot follow them
# (the stand-in lines below), from the package index. bench/device-requirements.txt (what
# gpu_check.sh installs from the carried wheels) goes into VENV/carried, on sys.path through
# a .pth hook unless GAPFIX_HIDE_CARRIED=1: so one venv is both the image as it is and the
# image after the carry step. gapfix itself is not installed: run from the repository root,
# which puts it on sys.path. A VENV whose stamp matches the lists and this script is kept;
# one whose stamp differs is brought to the lists in place (pip skips what already matches).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:?usage: scripts/image_venv.sh VENV}"
# Stand-ins, with why:
#   torch==2.13.0  the image's torch 2.11.0+cu130 is a multi-GB CUDA build for Python 3.12;
#                  this machine has Python 3.11 and the CPU build 2.13.0 on local disk
#   numpy==2.3.5   numpy 2.5 needs Python >= 3.12; and Triton 3.6's interpreter turns
#                  one-element arrays into Python ints, which numpy >= 2.4 refuses (TypeError
#                  "only 0-dimensional arrays ..."); the device runs compiled kernels, where
#                  the image's numpy 2.5.2 never meets the interpreter
STAND_INS=("torch==2.13.0" "numpy==2.3.5")
stamp_text="$(cat "$0" "$ROOT/bench/device-image.txt" "$ROOT/bench/device-requirements.txt")"
stamp="$(printf '%s' "$stamp_text" | sha256sum | cut -c1-16)"
if [ -f "$VENV/.image-stamp" ] && [ "$(cat "$VENV/.image-stamp")" = "$stamp" ]; then
  echo "image_venv: $VENV is up to date ($stamp)"
  exit 0
fi
if ! "$VENV/bin/python" -c "" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "${STAND_INS[@]}"
image_pins="$(mktemp)"
trap 'rm -f "$image_pins"' EXIT
grep -Ev '^[[:space:]]*(#|$)|^(torch|numpy)==' "$ROOT/bench/device-image.txt" | sed 's/[[:space:]]*#.*//' >"$image_pins"
# the stand-ins stay: a requirement that would replace them fails here, as it would there
"${PIP[@]}" -r "$image_pins" "${STAND_INS[@]}"
# the carried packages exactly as listed (their needs that the image has come from the image)
"${PIP[@]}" --no-deps --upgrade --target "$VENV/carried" -r "$ROOT/bench/device-requirements.txt"
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n' "import os, sys; os.environ.get('GAPFIX_HIDE_CARRIED') == '1' or sys.path.append('$VENV/carried')" \
  >"$site/gapfix_image_carried.pth"
if ! "$VENV/bin/python" -m pip check; then
  echo "image_venv: the image's pins and the carried requirements conflict (pip check above)" >&2
  exit 1
fi
printf '%s\n' "$stamp" >"$VENV/.image-stamp"
"$VENV/bin/python" -m pip freeze --quiet | sed 's/^/image_venv: /'
