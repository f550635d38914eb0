"""`gapfix bench`: the benchmark suite (bench/ of a source checkout) on this machine.

    gapfix bench                       every CPU benchmark, with its baseline in the same run
    gapfix bench -k align              the alignment ones
    gapfix bench --gpu                 the CUDA ones (what bench/gpu_check.sh runs)
    gapfix bench --json out.json       pytest-benchmark's JSON as well

The benchmarks live in the repository, not the installed package: run from a
checkout (`pip install -e .` keeps them beside the code).
"""
import os
import subprocess
import sys


def bench_dir():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(os.getcwd(), "bench"), os.path.join(here, "bench")):
        if os.path.isfile(os.path.join(candidate, "test_bench_align.py")):
            return candidate
    return None


def configure(parser):
    parser.add_argument("-k", dest="select", help="only benchmarks matching this pytest -k expression")
    parser.add_argument("--gpu", action="store_true", help="the CUDA benchmarks instead of the CPU ones")
    parser.add_argument("--json", help="also write pytest-benchmark's JSON here")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for the run (default 1: steadier on shared machines)")


def run(args) -> int:
    folder = bench_dir()
    if folder is None:
        raise ValueError("bench/ not found: run `gapfix bench` from a gapfix source checkout")
    command = [sys.executable, "-m", "pytest", folder, "--benchmark-only", "-q",
               "-m", "cuda" if args.gpu else "not cuda"]
    if args.select:
        command += ["-k", args.select]
    if args.json:
        command += [f"--benchmark-json={args.json}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return subprocess.call(command, env=env)
