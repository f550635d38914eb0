"""The repository passes ruff with the configuration in pyproject.toml ([tool.ruff]):
pyflakes, import order, bugbear and pycodestyle. Run by the suite, so CI lints too."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff_command():
    """ruff as a module of this interpreter (the `test` extra installs it), else on PATH."""
    try:
        import ruff  # noqa: F401
    except ImportError:
        executable = shutil.which("ruff")
        return [executable] if executable else None
    return [sys.executable, "-m", "ruff"]


def test_ruff_check_is_clean():
    command = _ruff_command()
    if command is None:
        pytest.skip("ruff is not installed (it is in the `test` extra: pip install -e '.[test]')")
    done = subprocess.run([*command, "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"ruff check found problems:\n{done.stdout[-6000:]}{done.stderr[-2000:]}"
