"""bench/gpu_check.sh on the device image's terms, without the device.

A virtual environment built from bench/device-image.txt (the image's packages, pinned; CPU
torch and a numpy for Python 3.11 stand in where this machine cannot follow the image, see
scripts/image_venv.sh) plus bench/device-requirements.txt (what the run carries) must collect
the GPU run's whole selection with zero errors, pass the dry run, and run the Triton kernels
under the image's Triton (3.6) in the interpreter. With the carried packages hidden (a carry
that failed), the selection must still collect: every optional import is guarded.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="bash scripts")]


def _env(venv: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "OUT")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # python3 is the venv's
    env["VIRTUAL_ENV"] = str(venv)
    env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _run(command, env, timeout):
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    return done, f"$ {' '.join(map(str, command))}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory):
    """The image stand-in with the carried packages; kept between runs while its lists are unchanged."""
    venv = Path(os.environ.get("GAPFIX_IMAGE_VENV") or Path(os.environ.get("TMPDIR", "/tmp")) / "gapfix-image-venv")
    done, text = _run(["bash", str(ROOT / "scripts" / "image_venv.sh"), str(venv)],
                      os.environ.copy(), timeout=1800)
    assert done.returncode == 0, text
    return venv


def _versions(venv, env, *names):
    code = ("import json, sys\nfrom importlib import metadata\n"
            "print(json.dumps({n: metadata.version(n) for n in sys.argv[1:]}))")
    done, text = _run([str(venv / "bin" / "python"), "-c", code, *names], env, timeout=120)
    assert done.returncode == 0, text
    return json.loads(done.stdout)


def test_the_venv_follows_the_image_pins(image_venv):
    versions = _versions(image_venv, _env(image_venv), "triton", "transformers", "pytest-timeout",
                         "pytest-xdist", "datasets", "trl")
    assert versions["triton"] == "3.6.0" and versions["transformers"] == "5.17.0"
    assert versions["datasets"] == "5.2.0" and versions["trl"] == "1.16.0"


def test_the_whole_gpu_selection_collects_without_errors(image_venv):
    done, text = _run([str(image_venv / "bin" / "python"), "-m", "pytest", "--collect-only", "-q",
                       "-p", "no:cacheprovider", "-m", "cuda", "tests", "bench"], _env(image_venv), timeout=600)
    assert done.returncode == 0, text
    assert "error" not in done.stdout.lower().split("\n")[-2], text
    assert " selected" in done.stdout or "tests collected" in done.stdout, text


def test_the_selection_collects_with_the_carried_packages_missing(image_venv):
    """The image as it is, before (or after a failed) carry step."""
    env = _env(image_venv, GAPFIX_HIDE_CARRIED="1")
    for module in ("datasets", "trl", "liger_kernel", "rapidfuzz"):
        done, text = _run([str(image_venv / "bin" / "python"), "-c", f"import {module}"], env, timeout=300)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, text
    done, text = _run([str(image_venv / "bin" / "python"), "-m", "pytest", "--collect-only", "-q",
                       "-p", "no:cacheprovider", "-m", "cuda", "tests", "bench"], env, timeout=600)
    assert done.returncode == 0, text


def test_the_dry_run_passes_in_the_image_venv(image_venv, tmp_path):
    out = tmp_path / "out"
    done, text = _run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out)], _env(image_venv),
                      timeout=900)
    assert done.returncode == 0, text
    table = json.loads((out / "gpu_results.json").read_text())
    assert table["status"] == "ok", text
    steps = {s["step"]: s["rc"] for s in table["steps"]}
    assert steps["collect"] == 0 and steps["carry"] == 0, steps
    assert all(row["installed"] for row in table["carried"]["packages"]), table["carried"]
    assert table["env"]["triton"] == "3.6.0"


def test_triton_kernels_run_under_the_images_triton_in_the_interpreter(image_venv):
    """The tests that take the triton_device fixture, in the interpreter under Triton 3.6: a
    kernel that needs a newer Triton's language fails here, not on the device."""
    done, text = _run([str(image_venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       "-n", "2", "-m", "cuda", "tests/test_rac_labels.py", "tests/test_mix_embedding.py",
                       "tests/test_cross_entropy.py", "tests/test_ops_common.py", "tests/test_rac.py"],
                      _env(image_venv), timeout=1500)
    assert done.returncode == 0, text
    assert " passed" in done.stdout and " failed" not in done.stdout, text


_CHOOSE = """
import json, sys
sys.path.insert(0, "bench")
import gpu_check_tools as tools
wheels, pyarrow = sys.argv[1], sys.argv[2]
image = tools._image_version if pyarrow == "-" else (lambda n: pyarrow if n == "pyarrow" else tools._image_version(n))
pins, fallbacks = tools.read_pins(tools.REQUIREMENTS), tools.read_pins(tools.FALLBACKS)
chosen, changes = tools.choose_pins(pins, fallbacks, wheels, image)
print(json.dumps({"chosen": chosen, "changes": changes}))
"""


def test_the_carry_step_chooses_a_datasets_the_images_pyarrow_can_take(image_venv, tmp_path):
    """The carried folder as scripts/download_device_wheels.sh makes it, read with the image's other
    versions: its pyarrow (26.0.1 here) takes datasets 5.2.0; a pyarrow of 22 takes the fallback 5.0.0."""
    wheels = tmp_path / "wheels"
    done, text = _run(["bash", str(ROOT / "scripts" / "download_device_wheels.sh"), str(wheels)], os.environ.copy(),
                      timeout=600)
    assert done.returncode == 0, text
    picked = {}
    for pyarrow in ("-", "22.0.0"):
        done, text = _run([str(image_venv / "bin" / "python"), "-c", _CHOOSE, str(wheels), pyarrow],
                          _env(image_venv), timeout=300)
        assert done.returncode == 0, text
        picked[pyarrow] = json.loads(done.stdout)
    assert "datasets==5.2.0" in picked["-"]["chosen"] and picked["-"]["changes"] == {}
    assert "datasets==5.0.0" in picked["22.0.0"]["chosen"]
    assert picked["22.0.0"]["changes"]["datasets==5.2.0"]["instead"] == "datasets==5.0.0"
