"""`pytest bench -m cuda` (bench/gpu_check.sh's selection) on a machine without a GPU: every
benchmark it selects is skipped, none runs and fails. tests/conftest.py's hook that skips
`cuda`-marked tests does not reach bench/ (a conftest applies to its own folder), so each
cuda benchmark needs its own skipif."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_benchmarks_skip_without_a_cuda_device(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
         "--benchmark-disable", "--rootdir", str(ROOT)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    # bench_hf's two cuda steps among them (without a GPU they are skipped, never run)
    assert counts.get("skipped", 0) >= 2 and set(counts) <= {"skipped", "deselected"}, summary
    assert "test_bench_hf.py" in done.stdout, done.stdout[-3000:]
