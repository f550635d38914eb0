"""Builders shared by tests/test_hf_*.py, and their torchrun worker.

    hf_worker.py OUT KIND         (under torchrun: KIND in patch, bash, rac, rac-vllm, rac-vllm-tp2, rac-hf)

trains a tiny Llama with the gapfix.hf integration of KIND through a real
transformers Trainer (gloo under torchrun) and writes, from every rank,
a checksum of each parameter to OUT.rank<r>.json. rac-vllm and rac-hf: RAC greedy over two
iterations on a Llama vLLM's CPU attention runs (head_dim 32, float32), generating with the
colocated vLLM engine (rac-vllm-tp2: one engine both ranks share,
tensor-parallel) / with transformers.
"""
from __future__ import annotations

import json
import os
import sys

from gapfix.data import math_task
from gapfix.models import tiny_llama
from gapfix.trainer import leave_process_group


def tokenizer():
    return math_task.math_tokenizer()


def model(tok, *, seed: int = 0, **kwargs):
    options = dict(hidden_size=32, num_layers=1, num_heads=2, seed=seed)
    options.update(kwargs)
    return tiny_llama(tok, **options).train()


def rows(tok, count: int, *, seed: int = 7) -> list[dict]:
    """Tokenized prompt + answer rows, labels in the Hugging Face convention (-100 on the prompt)."""
    out = []
    for problem in math_task.make_split("train", count, seed=seed):
        prompt = tok(problem["prompt"] + " =", add_special_tokens=True)["input_ids"]
        answer = tok(problem["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def dataset(tok, count: int = 24, *, seed: int = 7):
    import datasets

    return datasets.Dataset.from_list(rows(tok, count, seed=seed))


def prompt_completion_dataset(count: int = 24, *, seed: int = 7):
    """TRL's prompt-completion format (text), for the SFT trainers."""
    import datasets

    problems = math_task.make_split("train", count, seed=seed)
    return datasets.Dataset.from_list([{"prompt": p["prompt"] + " =", "completion": " " + p["response"]}
                                       for p in problems])


def collator(tok):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)


def args(out_dir, **overrides):
    from transformers import TrainingArguments

    options = dict(output_dir=str(out_dir), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                   max_steps=4, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                   use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, remove_unused_columns=True,
                   dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0)
    options.update(overrides)
    return TrainingArguments(**options)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def checksums(module) -> dict:
    return {name: float(p.detach().double().sum()) for name, p in module.named_parameters()}


def torchrun(tmp_path, kind: str, nproc: int = 2, timeout: float = 600) -> list:
    """Run this file under torchrun with `nproc` gloo processes; the per-rank results."""
    import subprocess

    out = tmp_path / f"{kind}-{nproc}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, str(out), kind]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"{kind}-{nproc}.rank{r}.json").read_text()) for r in range(nproc)]


def bash_config():
    import gapfix.hf as hf

    return hf.BashConfig(beta=0.5, mode="sample", temperature=2.0, refresh=2, prediction_batch_size=3)


def rac_config(**overrides):
    import gapfix.hf as hf

    options = dict(samples=2, max_new_tokens=8, prompts_per_iteration=5, backend="hf", sft_ratio=1.0,
                   refresh=2, generation_batch_size=2)
    options.update(overrides)
    return hf.RacConfig(**options)


def _train(kind: str, out_dir: str):
    from transformers import Trainer

    from gapfix import hf

    tok = tokenizer()
    net = model(tok)
    train_set = dataset(tok, 16)
    common = dict(args=args(out_dir, max_steps=3, per_device_train_batch_size=2), train_dataset=train_set,
                  data_collator=collator(tok))
    first = {}  # what the first window / iteration produced, from the initial weights
    if kind == "patch":
        trainer = Trainer(model=hf.patch(net), **common)
    elif kind == "bash":
        trainer = hf.BashTrainer(model=net, bash_config=bash_config(), **common)
        refresh = trainer._bash_refresh

        def recording(window):
            refresh(window)
            first.setdefault("alt_ids", trainer._bash_alt_ids.tolist())

        trainer._bash_refresh = recording
    elif kind.startswith("rac"):
        config = rac_config()
        if kind != "rac":  # rac-vllm / rac-hf: greedy, two iterations of 2 steps, head_dim 32
            net = model(tok, hidden_size=128, num_heads=4)
            common["args"] = args(out_dir, max_steps=4, per_device_train_batch_size=2)
            tp = 2 if kind.endswith("-tp2") else 1  # rac-vllm-tp2: both ranks share one engine
            config = rac_config(backend=kind.split("-")[1], temperature=0.0, vllm_tensor_parallel_size=tp)
        trainer = hf.RacTrainer(model=net, processing_class=tok, rac_config=config, **common)
        rows_for = trainer._rac_rows_for

        def recording(iteration):
            rows = rows_for(iteration)
            first.setdefault("rows", rows)
            first.setdefault("iterations", {}).setdefault(str(iteration), rows)
            return rows

        trainer._rac_rows_for = recording
    else:
        raise ValueError(f"KIND must be patch, bash, rac, rac-vllm, rac-vllm-tp2 or rac-hf, got {kind!r}")
    trainer.train()
    if kind.startswith("rac"):
        first["history"] = trainer.rac_history
        from gapfix.generation import colocate

        engine = colocate._ACTIVE.get("engine")
        first["engine_calls"] = list(engine.calls) if engine is not None else None
        first["engine_tp"] = engine.tensor_parallel_size if engine is not None else None
    return {"weights": checksums(net), "first": first, "losses": losses(trainer), "world": trainer.args.world_size,
            "wrapper": type(trainer.model_wrapped).__name__}


def main(out_path: str, kind: str) -> None:
    result = _train(kind, os.path.dirname(out_path) + f"/run-{kind}")
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out_path}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
