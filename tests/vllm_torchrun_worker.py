"""Run by tests/test_vllm_torchrun.py under torchrun (gloo, as a trainer sets it up): gapfix.generate
with BACKEND ("auto" or "vllm") from a process of a 2-process job, by every rank (CALLERS "all": a
user's script) or by rank 0 alone while the other waits at a barrier (CALLERS "rank0": evaluation
during training). Writes OUT/result-RANK.json: the token ids generated (or null), the error
raised (type and message, or null), the warnings' messages, transformers' greedy answers, and for
BACKEND "vllm" those of the process's colocated engine, made and used afterwards by both ranks; and
whether in_distributed_job tells the job from its process group alone (WORLD_SIZE unset).

    vllm_torchrun_worker.py OUT BACKEND CALLERS

The model has hidden size 128 and 4 heads (head_dim 32: vLLM's CPU attention has no kernel for 16)
and runs in float32, where vLLM's greedy answers are transformers'.
"""
import json
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist


def main(out, backend, callers):
    from gapfix import generate
    from gapfix.data import math_task
    from gapfix.generation import runner
    from gapfix.models import tiny_llama

    # "auto" picks vLLM for a model on a GPU: this CPU model stands for one, so that the guard
    # that keeps an ordinary engine out of a torchrun job is what sends "auto" to transformers
    runner._on_gpu = lambda model: True
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    tokenizer = math_task.math_tokenizer()
    model = tiny_llama(tokenizer, hidden_size=128, num_layers=1, num_heads=4, seed=0).eval()
    prompts = [tokenizer.encode(text) for text in ("1+2=", "7*3=", "9-4=")]
    options = dict(tokenizer=False, max_new_tokens=6, temperature=0.0)
    from gapfix.generation.vllm_backend import in_distributed_job

    world_size = os.environ.pop("WORLD_SIZE")  # the process group alone tells the job
    told_by_group = in_distributed_job()
    os.environ["WORLD_SIZE"] = world_size
    result = {"tokens": None, "error": None, "warnings": [], "told_by_group": told_by_group,
              "hf": [g.token_ids for g in generate(model, prompts, backend="hf", **options)]}
    if callers == "all" or rank == 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result["tokens"] = [g.token_ids for g in generate(model, prompts, backend=backend, **options)]
                result["tokens_again"] = [g.token_ids for g in generate(model, prompts, backend=backend,
                                                                        **options)]
            except ValueError as err:
                result["error"] = [type(err).__name__, str(err)]
        result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    dist.barrier()  # the job goes on together afterwards (the trainer's next step)
    if backend == "vllm":  # the way the refusal points to: the colocated engine, on every rank together
        from gapfix.generation.colocate import colocated_engine

        engine = colocated_engine(model)
        engine.begin(model)
        result["colocated"] = [g.token_ids for g in generate(model, prompts, backend=engine, **options)]
    with open(os.path.join(out, f"result-{rank}.json"), "w") as handle:
        json.dump(result, handle)
    if backend != "vllm":  # else the colocated engine's shutdown at exit ends it (vLLM's cleanup)
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
