"""Run by tests/test_eval_ranks.py under torchrun: train_cli.evaluate_across_ranks of the seeded tiny
model on DATA.jsonl, written to OUT/rank-RANK.json. With more ranks than examples, a rank whose share
is empty must still take part in the one all_reduce (else the others wait in it forever).

    eval_ranks_worker.py OUT DATA.jsonl
"""
import json
import os
import sys

import torch

from gapfix.eval_cli import load_eval_examples
from gapfix.train_cli import evaluate_across_ranks, load_model_and_tokenizer
from gapfix.trainer import leave_process_group


def main(out, data):
    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo")
    model, tokenizer = load_model_and_tokenizer("tiny", data, tokenizer="word")
    if rank == 0:  # rank 0 tokenizes into the cache; the others read it
        examples = load_eval_examples(data, tokenizer, out=out)
    torch.distributed.barrier()
    if rank != 0:
        examples = load_eval_examples(data, tokenizer, out=out)
    result = evaluate_across_ranks(model, tokenizer, examples, max_new_tokens=4, answer_regex="(.)")
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(result, f)
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
