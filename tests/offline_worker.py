"""Run by tests/test_offline_sharding.py under torchrun: one iteration of METHOD, writing its
rows under OUT/run/iterations/ and this rank's count of model passes to OUT/counts-RANK.json.

    offline_worker.py OUT METHOD [STRATEGY]   (METHOD "rac-per-prompt": RAC seeding each prompt alone;
                                               STRATEGY ddp (default) or fsdp)

BASH predicts in chunks of 8 rows and RAC generates in chunks of 4 prompts here, so that a
small set still has several chunks to share out.
"""
import json
import os
import sys

import gapfix.generation as generation
import gapfix.methods.bash as bash
from gapfix.data import encode_example, math_task
from gapfix.methods.rac import RAC
from gapfix.models import tiny_llama
from gapfix.trainer import leave_process_group, train


def main(out, method, strategy="ddp"):
    rank = int(os.environ.get("RANK", "0"))
    counts = {"forwards": 0, "forward_rows": 0, "generated_prompts": 0}
    predict, generate = bash.predict_alternatives, generation.generate

    def counting_predict(model, input_ids, *args, **kwargs):
        counts["forwards"] += 1
        counts["forward_rows"] += int(input_ids.shape[0])
        return predict(model, input_ids, *args, **kwargs)

    def counting_generate(model, prompts, *args, **kwargs):
        counts["generated_prompts"] += len(prompts)
        return generate(model, prompts, *args, **kwargs)

    bash.predict_alternatives, generation.generate = counting_predict, counting_generate
    RAC.generate_prompts = 4
    if method == "rac-per-prompt":
        method, RAC.seed_per_prompt = "rac", True
    tokenizer = math_task.math_tokenizer()
    examples = [encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 48, seed=7)]
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0).train()
    train(model, tokenizer, examples, method=method, iterations=1, steps_per_iteration=1, batch_size=8,
          progress=False, out_dir=os.path.join(out, "run"), bash_rows=32, bash_mode="sample",
          bash_prediction_batch_size=8, bash_temperature=2.0, rac_prompts=16, rac_temperature=1.0, max_new_tokens=12,
          generation_backend="hf", distributed=strategy,
          save_every=1, keep_checkpoints=2)  # a kept checkpoint keeps the rows
    with open(os.path.join(out, f"counts-{rank}.json"), "w") as handle:
        json.dump(counts, handle)
    if method == "rac" and rank == 0:  # the mixed rows as one list, as one file: the pre-sharding path
        write_mixed_reference(out, examples)
    leave_process_group()


def write_mixed_reference(out, examples):
    """OUT/reference.arrow: mix_with_sft over the whole lists of RAC rows (from the iteration's RAC
    shards) and SFT rows, written as one file: what rank 0 alone wrote before every rank wrote
    its share of the mixed order."""
    import glob

    from gapfix.data import sft_row
    from gapfix.data.arrow import RowTable, write_rows
    from gapfix.methods.base import row_seed
    from gapfix.methods.rac import mix_with_sft

    folder = os.path.join(out, "run", "iterations", "iter000")
    rac = RowTable.open(sorted(glob.glob(os.path.join(folder, "rac-*.arrow"))))
    mixed = mix_with_sft(rac.gather(range(len(rac))), [sft_row(ex) for ex in examples], 1.0,
                         seed=row_seed(0, 0, "mix", 0, 0))
    write_rows(os.path.join(out, "reference.arrow"), mixed)


if __name__ == "__main__":
    main(*sys.argv[1:])
