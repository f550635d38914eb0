"""`gapfix bench`: the benchmark suite (bench/ of a source checkout) on this machine.

    gapfix bench                       every CPU benchmark, with its baseline in the same run
    gapfix bench -k align              the alignment ones
    gapfix bench --gpu                 the CUDA ones (what bench/gpu_check.sh runs)
    gapfix bench --json out.json       pytest-benchmark's JSON as well

The benchmarks live in the repository, not the installed package: install from a
checkout (`pip install -e .` keeps them beside the code). The suite run is always the
one beside the installed gapfix, by absolute path and from the checkout's root, never
a `bench/` (or a module) of the current directory, which could be anyone's code.
"""
import argparse
import os
import subprocess
import sys


def bench_dir() -> str | None:
    """The absolute path of the installed checkout's bench/, or None (installed from a wheel)."""
    checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    candidate = os.path.join(checkout, "bench")
    if os.path.isfile(os.path.join(candidate, "test_bench_align.py")):
        return candidate
    return None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-k", dest="select", help="only benchmarks matching this pytest -k expression")
    parser.add_argument("--gpu", action="store_true", help="the CUDA benchmarks instead of the CPU ones")
    parser.add_argument("--json", help="also write pytest-benchmark's JSON here")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for the run (default 1: steadier on shared machines)")


def run(args: argparse.Namespace) -> int:
    folder = bench_dir()
    if folder is None:
        raise ValueError("the benchmark suite is not installed: `gapfix bench` needs gapfix installed "
                         "from a source checkout (pip install -e .)")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    # run from the checkout's root, and with -P (3.11+) off sys.path altogether: a module in
    # the user's current directory never shadows pytest or gapfix
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    command = [sys.executable, *safe_path, "-m", "pytest", folder, "--benchmark-only", "-q",
               "-p", "no:cacheprovider", "--rootdir", os.path.dirname(folder),
               "-m", "cuda" if args.gpu else "not cuda"]
    if args.select:
        command += ["-k", args.select]
    if args.json:
        command += [f"--benchmark-json={os.path.abspath(args.json)}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return subprocess.call(command, env=env, cwd=os.path.dirname(folder))
