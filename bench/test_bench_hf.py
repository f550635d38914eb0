"""A transformers Trainer step with gapfix.hf.patch(model) against the unpatched model.

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_hf.py --benchmark-only       (CPU)
    python -m pytest bench/test_bench_hf.py -m cuda --benchmark-only                  (GPU, gpu_check.sh)

Each configuration trains in a fresh process (`python bench/test_bench_hf.py DEVICE OPS`)
so that its peak memory is its own: a Llama-shaped model with a large vocabulary (the
regime where the (tokens x vocab) logits dominate memory), STEPS optimizer steps of a
real transformers.Trainer on random token rows (HF labels, a quarter of each row
masked as prompt). extra_info: median step seconds (first step excluded), tokens/s,
peak memory (CPU: process max RSS; GPU: torch.cuda.max_memory_allocated), and for the
patched run the ratios to the unpatched run of the same device.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

STEPS = 6
SHAPES = {  # device -> (vocab, hidden, layers, rows per step, tokens per row, bf16)
    "cpu": (32768, 256, 2, 8, 128, False),
    "cuda": (131072, 1024, 4, 8, 1024, True),
}
_results = {}


def child(device, ops):
    import resource

    import datasets
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    import gapfix.hf as gh
    from gapfix.models import tiny_llama

    hf_logging.disable_progress_bar()
    vocab, hidden, layers, rows, width, bf16 = SHAPES[device]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (rows * (STEPS + 1), width), generator=generator)
    labels = ids.clone()
    labels[:, : width // 4] = -100
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    model = tiny_llama(vocab, hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 128), seed=0)
    model.train()
    if ops == "patched":
        gh.patch(model)
    seconds = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - self.start)

    args = TrainingArguments(output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-hf-{ops}"),
                             per_device_train_batch_size=rows, max_steps=STEPS, learning_rate=1e-4,
                             logging_steps=STEPS, save_strategy="no", report_to=[], use_cpu=device == "cpu",
                             bf16=bf16, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Timer()])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steady = seconds[1:]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"step_s": statistics.median(steady), "tokens_per_s": rows * width / statistics.median(steady),
                      "peak_MiB": peak, "final_loss": trainer.state.log_history[-2].get("loss"),
                      "threads": torch.get_num_threads()}))


def _run_child(device, ops):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, __file__, device, ops], capture_output=True, text=True, env=env,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bench(benchmark, device, ops):
    pytest.importorskip("datasets", reason="the Trainer of the child process reads a datasets.Dataset")
    measured = benchmark.pedantic(_run_child, args=(device, ops), rounds=1, iterations=1)
    _results[(device, ops)] = measured
    vocab, hidden, layers, rows, width, bf16 = SHAPES[device]
    info = {k: round(v, 4) if isinstance(v, float) else v for k, v in measured.items()}
    info.update(case=f"{device} V={vocab} H={hidden} L={layers} {rows}x{width}{' bf16' if bf16 else ''} {ops}",
                throughput=info["tokens_per_s"], throughput_unit="tokens/s", baseline="unpatched Trainer")
    plain = _results.get((device, "plain"))
    if ops == "patched" and plain:
        info["ratio"] = round(plain["step_s"] / measured["step_s"], 3)  # speed-up
        info["peak_ratio_vs_plain"] = round(measured["peak_MiB"] / plain["peak_MiB"], 3)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("ops", ["plain", "patched"])  # plain first: patched reports ratios
def test_bench_trainer_step_cpu(benchmark, ops):
    _bench(benchmark, "cpu", ops)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")  # tests/conftest.py's hook is not bench's
@pytest.mark.parametrize("ops", ["plain", "patched"])
def test_bench_trainer_step_cuda(benchmark, ops):
    _bench(benchmark, "cuda", ops)


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
