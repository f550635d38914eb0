"""Run by tests/test_distributed.py under torchrun: a few training steps, losses to a JSON file.

    distributed_worker.py OUT STRATEGY [ITERATIONS [CHECKPOINT_DIR [STOP_AT_STEP]]]

With STOP_AT_STEP the job stops after that optimizer step, as if killed
(checkpoints are written every 2 steps). GAPFIX_WORKER_METHOD picks the method (default sft).
"""
import json
import os
import sys

import torch

from gapfix.data import encode_example, math_task
from gapfix.models import tiny_llama
from gapfix.trainer import train


class Stop(Exception):
    pass


def main(out_path, strategy, iterations="1", checkpoints="", stop_at="0"):
    tokenizer = math_task.math_tokenizer()
    examples = [encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 64, seed=7)]
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0).train()
    losses = []

    def on_step(record):
        losses.append(record["loss"])
        if record["step"] == int(stop_at):
            raise Stop

    try:
        # BASH: beta 0.5, sampled alternatives, so that mixing moves the loss
        method = os.environ.get("GAPFIX_WORKER_METHOD", "sft")
        train(model, tokenizer, examples, method=method, iterations=int(iterations), steps_per_iteration=3,
              batch_size=8, lr=1e-2, progress=False, distributed=strategy, out_dir=checkpoints or None,
              save_every=2, on_step=on_step, beta=0.5, bash_mode="sample", rac_prompts=16, max_new_tokens=12,
              generation_backend="hf")
    except Stop:
        pass
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(losses, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears down while another still has collectives in flight
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
