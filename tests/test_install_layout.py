"""The repository's layout against the packages installed beside it.

kernels/ is installed as gapfix.kernels. Hugging Face's `kernels` package (which
transformers >= 5.25 requires and imports from `transformers.Trainer`) owns the
top-level name, and Python puts the working directory first on sys.path for
`python -m pytest` and `python -c`: our folder must never win that name.
"""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_kernels_folder_is_not_a_regular_package():
    # A folder without __init__.py is at most a namespace portion, which the import
    # system ranks below a regular package found anywhere on sys.path.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "gapfix" / "kernels").resolve() == (ROOT / "kernels").resolve()


def test_transformers_trainer_imports_from_the_repository_root_with_hf_kernels():
    pytest.importorskip("transformers")
    try:  # by its distribution: finding the module could find our folder, the defect itself
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` package is not installed")
    proc = _run_in_root(
        "import sys\n"
        "from transformers import Trainer\n"
        "import kernels\n"
        "print(kernels.__file__)\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    origin = Path(proc.stdout.strip()).resolve()
    assert ROOT not in origin.parents, f"`kernels` resolved to the repository's folder: {origin}"


def test_gapfix_kernels_resolves_to_the_repository_folder_from_the_root():
    pytest.importorskip("triton")
    proc = _run_in_root("import gapfix.kernels.rac_labels as m; print(m.__file__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()).resolve().parent == ROOT / "kernels"
