"""Test set-up shared by every test module.

Without a GPU, Triton kernels run under the interpreter on CPU tensors; the
variable must be set before anything imports triton, hence here.
"""
import os
import subprocess

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TRITON = _has_triton()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the added markers must count there
def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped without one. Tests that take the
    `triton_device` fixture run on the GPU when there is one (on CPU under the
    interpreter otherwise): they get the `cuda` marker too, so `pytest -m cuda`
    (bench/gpu_check.sh) selects them, but they are not skipped on CPU."""
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        needs_cuda = item.get_closest_marker("cuda") is not None
        if not needs_cuda and "triton_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda)
        if needs_cuda and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture
def triton_device():
    """Device on which the Triton kernels run: the GPU, or the CPU under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs under tmp_path, for a real full disk (skips where mounting is not allowed)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)  # lazy: a traceback may hold a file


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny model (math tokenizer, one layer) for command-line tests."""
    from gapfix.data import math_task
    from gapfix.models import save_model, tiny_llama

    tokenizer = math_task.math_tokenizer()
    path = tmp_path_factory.mktemp("model")
    save_model(tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0), tokenizer, path)
    return str(path)
