"""kernels/ imports nothing from gapfix: what a kernel needs lives with the kernels
(kernels/common.py, importable without Triton, is what gapfix.ops shares with them)."""
import ast
import subprocess
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def test_kernels_import_nothing_from_gapfix():
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n == "gapfix" or n.startswith("gapfix.") for n in names), f"{path.name} imports {names}"


def test_shared_constants_load_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from gapfix.kernels.common import MASK_BITS, next_pow2\n"
            "from gapfix.ops.mix_embedding import mix_embedding_reference\n"
            "print(MASK_BITS, next_pow2(5))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["24", "8"]
