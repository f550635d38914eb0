"""A trl.SFTTrainer step on a gapfix-patched model (TRL's fused head on gapfix's kernel) against
SFTTrainer with TRL's own fused head, same model and data.

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_trl.py -k cpu --benchmark-only    (CPU)
    python -m pytest bench/test_bench_trl.py -m cuda --benchmark-only                     (GPU, gpu_check.sh)

Each configuration trains in a fresh process (`python bench/test_bench_trl.py DEVICE VOCAB HEAD`)
so that its memory is its own: a 2-layer Llama, STEPS optimizer steps of a real SFTTrainer
on pre-tokenized random rows whose first quarter is the prompt (completion-only loss).
HEAD: "trl" (TRL's head on the unpatched model), "gapfix" (gapfix.hf.patch(model)), and on
CUDA "liger" (SFTConfig(use_liger_kernel=True): Liger's layer kernels, TRL's head).
extra_info: median step seconds and process CPU seconds per step (first step excluded),
peak memory growth during training (CPU: max RSS minus RSS at the start of training; GPU:
max allocated minus allocated at the start), and for gapfix the ratios to TRL's head run
of the same device and vocabulary (goals: CPU time and memory growth at most 0.5x).
"""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

STEPS = 4
SHAPES = {  # device -> (hidden, layers, rows per step, tokens per row, bf16)
    "cpu": (256, 2, 8, 128, False),
    "cuda": (1024, 4, 8, 1024, True),
}
VOCABS = (32000, 128000)
_results = {}


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(device, vocab, head):
    import resource

    import datasets
    import trl
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    import gapfix.hf as gh
    from gapfix.data.math_task import math_tokenizer
    from gapfix.models import tiny_llama

    hf_logging.disable_progress_bar()
    hidden, layers, rows, width, bf16 = SHAPES[device]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (rows * (STEPS + 1), width), generator=generator)
    mask = torch.ones_like(ids)
    mask[:, : width // 4] = 0
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "completion_mask": mask.tolist()})
    model = tiny_llama(vocab, hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 128), seed=0)
    model.train()
    if head == "gapfix":
        gh.patch(model)
    seconds, cpu_seconds, start = [], [], {}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start["memory"] = torch.cuda.memory_allocated() / 2**20
            else:
                start["memory"] = _rss_mib()

        def on_step_begin(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - self.start[0])
            cpu_seconds.append(time.process_time() - self.start[1])

    tok = math_tokenizer()
    args = trl.SFTConfig(output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-trl-{head}-{vocab}"),
                         per_device_train_batch_size=rows, max_steps=STEPS, learning_rate=1e-4,
                         logging_steps=STEPS, save_strategy="no", report_to=[], use_cpu=device == "cpu", bf16=bf16,
                         disable_tqdm=True, dataloader_num_workers=0, seed=0, max_length=width,
                         completion_only_loss=True, use_liger_kernel=head == "liger")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logged = [e for e in trainer.state.log_history if "mean_token_accuracy" in e]
    print(json.dumps({"step_s": statistics.median(seconds[1:]), "cpu_s": statistics.median(cpu_seconds[1:]),
                      "growth_MiB": peak - start["memory"], "peak_MiB": peak,
                      "loss": logged[-1].get("loss"), "mean_token_accuracy": logged[-1].get("mean_token_accuracy"),
                      "entropy": logged[-1].get("entropy"), "threads": torch.get_num_threads()}))


def _run_child(device, vocab, head):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, __file__, device, str(vocab), head], capture_output=True, text=True,
                          env=env, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bench(benchmark, device, vocab, head):
    measured = benchmark.pedantic(_run_child, args=(device, vocab, head), rounds=1, iterations=1)
    _results[(device, vocab, head)] = measured
    hidden, layers, rows, width, bf16 = SHAPES[device]
    info = {k: round(v, 4) if isinstance(v, float) else v for k, v in measured.items()}
    info.update(case=f"{device} V={vocab} H={hidden} L={layers} {rows}x{width}{' bf16' if bf16 else ''} {head}",
                throughput=rows * width / measured["step_s"], throughput_unit="tokens/s",
                baseline="SFTTrainer with TRL's fused head")
    base = _results.get((device, vocab, "trl"))
    if head != "trl" and base:
        info["cpu_time_ratio"] = round(measured["cpu_s"] / base["cpu_s"], 3)
        info["step_time_ratio"] = round(measured["step_s"] / base["step_s"], 3)
        info["memory_growth_ratio"] = round(measured["growth_MiB"] / max(base["growth_MiB"], 1e-9), 3)
    benchmark.extra_info.update(info)


# "trl" first in each vocabulary: the others report their ratios to it
@pytest.mark.parametrize("head", ["trl", "gapfix"])
@pytest.mark.parametrize("vocab", VOCABS)
def test_bench_sft_step_cpu(benchmark, vocab, head):
    pytest.importorskip("trl")
    _bench(benchmark, "cpu", vocab, head)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")  # tests/conftest.py's hook is not bench's
@pytest.mark.parametrize("head", ["trl", "gapfix", "liger"])
@pytest.mark.parametrize("vocab", VOCABS)
def test_bench_sft_step_cuda(benchmark, vocab, head):
    pytest.importorskip("trl")
    if head == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed (pip install liger-kernel)")
    _bench(benchmark, "cuda", vocab, head)


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
