"""Runs a script that lowers Triton kernels for an H100 (sm_90) ahead of time, without a GPU.

In a fresh process, since the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)
patches triton.language. The script exits 77 when this Triton cannot compile for NVIDIA
(no NVIDIA backend, no ptxas): the test is skipped then, and fails on any other error.
"""
import os
import subprocess
import sys

import pytest


def run_lowering_script(source: str) -> str:
    """-> the script's stdout; skips the calling test on exit status 77."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 77:
        pytest.skip("this Triton cannot compile for NVIDIA ahead of time")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
