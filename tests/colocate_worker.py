"""Run by tests/test_colocate.py under torchrun: RAC for ITERATIONS iterations with the
generation backend BACKEND ("vllm": the colocated engine of gapfix.generation.colocate), writing
the rows of iteration N to OUT/rows-N.arrow and this rank's count of generated prompts and the engine's
calls to OUT/counts-RANK.json.

    colocate_worker.py OUT BACKEND TEMPERATURE TP ITERATIONS [DISTRIBUTED]   (ddp or fsdp; default ddp)

RAC generates in chunks of 4 prompts here, so that 16 prompts make 4 chunks to share out. The
model has head_dim 32 (vLLM's CPU attention has no kernel for 16) and runs in float32.
"""
import json
import os
import sys

import gapfix.generation as generation
from gapfix.data import encode_example, math_task
from gapfix.data.arrow import RowTable
from gapfix.methods.rac import RAC
from gapfix.models import tiny_llama
from gapfix.trainer import leave_process_group, train


def main(out, backend, temperature, tp, iterations, distributed="ddp"):
    rank = int(os.environ.get("RANK", "0"))
    counts = {"generated_prompts": 0, "generate_calls": 0}
    generate = generation.generate

    def counting_generate(model, prompts, *args, **kwargs):
        counts["generated_prompts"] += len(prompts)
        counts["generate_calls"] += 1
        return generate(model, prompts, *args, **kwargs)

    generation.generate = counting_generate
    finish = RAC.finish

    def keeping_finish(self, ctx):  # the iteration's rows, kept (a run removes them as it goes)
        paths = finish(self, ctx)
        if rank == 0:
            RowTable.open(paths).write_to(os.path.join(out, f"rows-{ctx.iteration}.arrow"))
        return paths

    RAC.finish = keeping_finish
    RAC.generate_prompts = 4
    tokenizer = math_task.math_tokenizer()
    examples = [encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 48, seed=7)]
    model = tiny_llama(tokenizer, hidden_size=128, num_layers=1, num_heads=4, seed=0).train()
    train(model, tokenizer, examples, method="rac", iterations=int(iterations), steps_per_iteration=1,
          batch_size=8, lr=0.05, progress=False, out_dir=os.path.join(out, "run"), rac_prompts=16,
          rac_temperature=float(temperature), max_new_tokens=12, generation_backend=backend,
          vllm_tensor_parallel_size=int(tp), distributed=distributed, bf16=False)
    from gapfix.generation import colocate

    engine = colocate._ACTIVE.get("engine")
    counts["engine_calls"] = list(engine.calls) if engine is not None else None
    with open(os.path.join(out, f"counts-{rank}.json"), "w") as handle:
        json.dump(counts, handle)
    if backend != "vllm":  # else the colocated engine's shutdown at exit ends it (vLLM's cleanup)
        leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
