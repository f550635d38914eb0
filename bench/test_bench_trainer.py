"""End-to-end training steps: SFT, BASH and RAC, with the fused ops and with their
PyTorch references, in the same run.

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_trainer.py --benchmark-only

Each configuration runs in a fresh process (`python bench/test_bench_trainer.py
METHOD OPS`) so that its peak RSS is its own; the child trains one iteration
(offline phase, then STEPS optimizer steps) of a small Llama with a 32k
vocabulary on the bundled math task and prints its measurements as JSON.
extra_info holds: median step seconds and tokens/s (first step excluded),
peak RSS, the offline phase's share of the iteration's wall time, and for the
fused run the ratios to the reference run of the same method.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import pytest

STEPS = 8
BATCH = 32
VOCAB = 32768
HIDDEN = 256
_results = {}


def child(method, ops):
    import resource

    import torch
    from transformers.utils import logging as hf_logging

    from gapfix.data import encode_example, math_task
    from gapfix.models import tiny_llama
    from gapfix.trainer import train

    hf_logging.disable_progress_bar()
    tokenizer = math_task.math_tokenizer()
    examples = [encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 2000, seed=1)]
    model = tiny_llama(VOCAB, hidden_size=HIDDEN, num_layers=2, num_heads=4, seed=0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    seconds, tokens = [], []

    def on_step(record):
        seconds.append(record["tokens"] / record["tokens_per_s"])
        tokens.append(record["tokens"])

    started = time.perf_counter()
    result = train(model, tokenizer, examples, method=method, steps_per_iteration=STEPS,
                   batch_size=BATCH, fused=ops == "fused", progress=False, rac_prompts=BATCH * STEPS // 2,
                   rac_temperature=1.0, max_new_tokens=48, generation_backend="hf", beta=0.3,
                   bash_mode="sample", on_step=on_step)
    wall = time.perf_counter() - started
    steady = seconds[1:]
    print(json.dumps({
        "step_s": statistics.median(steady),
        "tokens_per_s": sum(tokens[1:]) / sum(steady),
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "offline_s": result.phase_seconds["offline"],
        "train_s": result.phase_seconds["train"],
        "offline_fraction": result.phase_seconds["offline"] / wall,
        "threads": torch.get_num_threads(),
    }))


def _run_child(method, ops):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, __file__, method, ops], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("ops", ["reference", "fused"])  # reference first: fused reports ratios
@pytest.mark.parametrize("method", ["sft", "bash", "rac"])
def test_training_step(benchmark, method, ops):
    measured = benchmark.pedantic(_run_child, args=(method, ops), rounds=1, iterations=1)
    _results[(method, ops)] = measured
    info = {k: round(v, 4) if isinstance(v, float) else v for k, v in measured.items()}
    reference = _results.get((method, "reference"))
    if ops == "fused" and reference:
        info["speedup_vs_reference"] = round(reference["step_s"] / measured["step_s"], 3)
        info["peak_rss_ratio_vs_reference"] = round(measured["peak_rss_MiB"] / reference["peak_rss_MiB"], 3)
    benchmark.extra_info.update(info)


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
