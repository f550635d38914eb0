#!/usr/bin/env bash
# Downloads what the GPU device's image lacks (bench/device-requirements.txt, plus the
# fallbacks of bench/device-fallback-wheels.txt) as wheels for the device's Python
# (CPython 3.12, x86-64 manylinux) into .device-wheels/, which git ignores. Run it here,
# where PyPI is reachable, then have the device tool carry the folder:
#
#   bash scripts/download_device_wheels.sh [DIR]     (default: .device-wheels)
#   device run: carry [".device-wheels"], command "bash bench/gpu_check.sh"
#
# bench/gpu_check.sh installs from that folder before anything else. The folder is made
# anew each time (a wheel of an earlier pin would stay beside the new one), and the script fails
# when the folder and the tracked tree together pass the device tool's 64 MiB carry limit.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$ROOT/.device-wheels}"
LIMIT_BYTES=$((64 * 1024 * 1024))
PLATFORMS=()
# pip matches a manylinux tag exactly: name every glibc level a wheel of these may carry
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
  manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
fresh="$(mktemp -d "${DIR%/}.partial.XXXXXX")"
trap 'rm -rf "$fresh"' EXIT
DOWNLOAD=(python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12
  --implementation cp "${PLATFORMS[@]}" -d "$fresh")
"${DOWNLOAD[@]}" -r "$ROOT/bench/device-requirements.txt"
# the fallbacks one at a time: they hold several versions of one package, which one pip call refuses
grep -Ev '^[[:space:]]*(#|$)' "$ROOT/bench/device-fallback-wheels.txt" | sed 's/[[:space:]]*#.*//' |
  while read -r pin; do "${DOWNLOAD[@]}" "$pin"; done
rm -rf "$DIR"
mv "$fresh" "$DIR"
trap - EXIT
wheels=$(du -cb "$DIR"/*.whl | tail -n 1 | cut -f1)
tracked=$(cd "$ROOT" && git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s + 0}')
ls -1 "$DIR"
echo "download_device_wheels: $(ls "$DIR" | wc -l) wheels, $((wheels / 1024)) KiB;" \
  "with the tracked tree ($((tracked / 1024)) KiB): $(((wheels + tracked) / 1024)) KiB of the" \
  "$((LIMIT_BYTES / 1024)) KiB carry limit"
if [ $((wheels + tracked)) -ge "$LIMIT_BYTES" ]; then
  echo "download_device_wheels: $DIR and the tracked tree pass the device tool's 64 MiB limit" >&2
  exit 1
fi
