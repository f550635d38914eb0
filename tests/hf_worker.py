"""Builders shared by tests/test_hf_*.py, and their torchrun worker.

    hf_worker.py OUT KIND         (under torchrun: KIND in patch, bash, rac)

trains a tiny Llama with the gapfix.hf integration of KIND through a real
transformers Trainer (gloo under torchrun) and writes, from every rank,
a checksum of each parameter to OUT.rank<r>.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from gapfix.data import math_task
from gapfix.models import tiny_llama


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


def _train(kind: str, out_dir: str):
    from transformers import Trainer

    from gapfix import hf

    tok = tokenizer()
    net = model(tok)
    train_set = dataset(tok, 16)
    common = dict(args=args(out_dir, max_steps=3, per_device_train_batch_size=2), train_dataset=train_set,
                  data_collator=collator(tok))
    if kind == "patch":
        trainer = Trainer(model=hf.patch(net), **common)
    elif kind == "bash":
        trainer = hf.BashTrainer(model=net, bash_config=hf.BashConfig(beta=0.5, refresh=2), **common)
    elif kind == "rac":
        trainer = hf.RacTrainer(model=net, processing_class=tok, **common,
                                rac_config=hf.RacConfig(samples=1, max_new_tokens=12, prompts_per_iteration=4,
                                                        backend="hf", sft_ratio=1.0, refresh=2))
    else:
        raise ValueError(f"KIND must be patch, bash or rac, got {kind!r}")
    trainer.train()
    return checksums(net)


def main(out_path: str, kind: str) -> None:
    result = _train(kind, os.path.dirname(out_path) + f"/run-{kind}")
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out_path}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
