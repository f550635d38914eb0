"""CPU threads of the computing commands: the `--threads` flag and the one function that applies it
to torch and to the processes a generation backend starts (vLLM's engine on CPU runs in a child
process, which reads OMP_NUM_THREADS, not torch's setting)."""
from __future__ import annotations

import argparse
import os


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and for every generation backend "
                             "(default: torch's own choice)")


def apply_threads(threads: int | None) -> None:
    """torch.set_num_threads(threads), and the same count for child processes (OMP_NUM_THREADS,
    MKL_NUM_THREADS) and for vLLM's CPU engine (VLLM_CPU_OMP_THREADS_BIND: the first `threads`
    cores the process may run on). None leaves everything as it is."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be an int >= 1, got {threads!r}")
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(threads))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores[:threads])


def quiet_third_party() -> None:
    """No third-party progress bars (transformers' loading and saving bars, datasets' tokenizing)."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
