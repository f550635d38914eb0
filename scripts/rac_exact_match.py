"""Whether RAC's falling exact match on its own training prompts is the method: from one SFT
base, RAC (the demo recipe: answers sampled at temperature 1, path labels, 1:1 with SFT rows)
and continued SFT run the same iterations; after each, the same 256 training prompts are
answered greedily and sampled at temperature 1, and the exact-match rate of both, with the
mean log-probability of the reference answers, is printed per method and iteration.

    python scripts/rac_exact_match.py BASE_MODEL_FOLDER OUT
"""
import json
import os
import statistics
import sys

from gapfix.threads import apply_threads


def measure(model, tokenizer, examples):
    import torch

    from gapfix.generation import generate

    prompts = [ex.prompt_ids for ex in examples]
    eos = tokenizer.eos_token_id
    references = [[t for t in ex.answer_ids if t != eos] for ex in examples]
    greedy = generate(model, prompts, tokenizer=tokenizer, max_new_tokens=48, backend="hf")
    sampled = generate(model, prompts, tokenizer=tokenizer, max_new_tokens=48, backend="hf", temperature=1.0, seed=0)
    logps = []
    with torch.no_grad():
        model.eval()
        for ex in examples:
            ids = torch.tensor([ex.prompt_ids + ex.answer_ids])
            logits = model(input_ids=ids).logits[0, len(ex.prompt_ids) - 1:-1].float().log_softmax(-1)
            logps.append(logits.gather(-1, torch.tensor(ex.answer_ids)[:, None]).mean().item())
        model.train()
    return {"greedy_exact": statistics.fmean(float(g.finished and g.token_ids == r)
                                             for g, r in zip(greedy, references)),
            "sampled_exact": statistics.fmean(float(g.finished and g.token_ids == r)
                                              for g, r in zip(sampled, references)),
            "reference_logp_per_token": statistics.fmean(logps)}


def main() -> None:
    from gapfix.data import math_task
    from gapfix.data.arrow import ExampleTable
    from gapfix.data.loading import data_cache_dir, load_data
    from gapfix.models import load_model
    from gapfix.recipes import recipe
    from gapfix.trainer import TrainConfig, train

    base, out = sys.argv[1], sys.argv[2]
    apply_threads(1)
    tokenizer = math_task.math_tokenizer()
    paths = math_task.write_splits(os.path.join(out, "data"), train=4000, test=1, hard=1)
    train_set = load_data(paths["train"], tokenizer, cache_dir=data_cache_dir(out))[0]
    probe = list(ExampleTable(train_set)[:256])
    shared = dict(recipe("demo"), rac_prompts=512, bash_rows=512, iterations=3, steps_per_iteration=30,
                  progress=False, generation_backend="hf")
    for method in ("rac", "sft"):
        model = load_model(base)[0]
        rows = [dict(method=method, iteration=-1, **measure(model, tokenizer, probe))]

        def after(iteration, trained, method=method, rows=rows):
            rows.append(dict(method=method, iteration=iteration, **measure(trained, tokenizer, probe)))

        config = TrainConfig(**dict(shared, method=method, out_dir=os.path.join(out, method)))
        train(model, tokenizer, train_set, config, resume=False, on_iteration_end=after)
        offline = [json.loads(line) for line in open(os.path.join(out, method, "metrics.jsonl"))]
        for row in rows:
            stats = next((e for e in offline if e.get("event") == "rac_offline"
                          and e["iteration"] == row["iteration"] + 1), {})
            row["rac_own_exact_match_next_iteration"] = stats.get("exact_match")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
