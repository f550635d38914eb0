#!/usr/bin/env bash
# Installs gapfix from this checkout, with its native extension built against
# the torch already installed (no build isolation: an isolated build would
# fetch a multi-GB CUDA torch just to compile).
#
#   bash scripts/install.sh          the package (runs `gapfix demo`)
#   bash scripts/install.sh test     the package and everything the tests need
#
# TORCH_SPEC picks the torch to install first (default: the CPU build, 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-base}"
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" "setuptools>=69" wheel ninja
case "$what" in
  base) python -m pip install -q --no-build-isolation -e . ;;
  test) python -m pip install -q --no-build-isolation -e ".[test]" ;;
  *) echo "usage: $0 [base|test]" >&2; exit 2 ;;
esac
