"""The measurement behind the demo recipe's BASH settings (gapfix/recipes.py, docs/compare.md):
`gapfix compare`'s protocol on the bundled math task, at a size that runs in minutes on one CPU
thread, with BASH swept over its modes, temperatures and betas next to continued SFT and the
noise control. Every variant continues from the same SFT base with the same extra steps.

    python scripts/recipe_sweep.py OUT [--seeds 1] [--base FOLDER]

The base is trained by SFT (BASE_STEPS) unless --base names a model folder of an earlier run
(OUT/seed0/base/final). Writes OUT/results.md (the compare table, with the multiple-comparison
note) and results.json.
"""
import argparse
import os

from gapfix.compare import markdown, run_compare, write_results
from gapfix.recipes import recipe
from gapfix.threads import apply_threads

SIZE = dict(train_problems=4000, test_problems=200, hidden_size=64, num_layers=2, num_heads=2, base_steps=800,
            base_lr=3e-3)
EXTRA = dict(extra_steps=80, bash_rows=1024, rac_prompts=256)
VARIANTS = ("sft", "bash", "bash[bash_mode=argmax]", "bash[bash_temperature=1.0]", "bash[beta=0.1]")


def main() -> None:
    import torch

    from gapfix.data import math_task
    from gapfix.data.arrow import ExampleTable
    from gapfix.data.loading import data_cache_dir, load_data
    from gapfix.evaluation import evaluate_model, evaluate_recovery
    from gapfix.models import load_model, tiny_llama
    from gapfix.trainer import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--base", default=None)
    args = parser.parse_args()
    apply_threads(1)
    paths = math_task.write_splits(os.path.join(args.out, "data"), train=SIZE["train_problems"],
                                   test=SIZE["test_problems"], hard=1)
    tokenizer = math_task.math_tokenizer()
    cache = data_cache_dir(args.out)
    train = load_data(paths["train"], tokenizer, cache_dir=cache)[0]
    test = ExampleTable(load_data(paths["test"], tokenizer, cache_dir=cache)[0])
    problems = [ex.record for ex in test]
    shared = recipe("demo")
    config = TrainConfig(**{**shared, **{k: EXTRA[k] for k in ("bash_rows", "rac_prompts")}},
                         progress=False, generation_backend="hf", log_every=20)

    def evaluate(model: torch.nn.Module) -> dict:
        report = evaluate_model(model, tokenizer, test, scorer=math_task.score, max_new_tokens=config.max_new_tokens,
                                backend="hf", embed=None, recovery=False, labels=False)
        probe = evaluate_recovery(model, tokenizer, problems, corrupt=math_task.corrupt_prefix,
                                  outcome=math_task.recovery_outcome, max_new_tokens=config.max_new_tokens,
                                  backend="hf", return_per_example=True)
        return {"test": report["per_example"]["accuracy"], **probe["per_example"]}

    def make_base(seed: int) -> torch.nn.Module:
        if args.base:
            return load_model(args.base)[0]
        return tiny_llama(tokenizer, hidden_size=SIZE["hidden_size"], num_layers=SIZE["num_layers"],
                          num_heads=SIZE["num_heads"], max_position_embeddings=256, seed=seed)

    import dataclasses

    analysis = run_compare(make_base, tokenizer, train, evaluate=evaluate, methods=VARIANTS, seeds=args.seeds,
                           extra_steps=EXTRA["extra_steps"], config=config,
                           base_steps=0 if args.base else SIZE["base_steps"],
                           base_config=dataclasses.replace(config, lr=SIZE["base_lr"], warmup_steps=80),
                           out=args.out, draws=500)
    write_results(analysis, args.out, {"size": SIZE, "extra": EXTRA, "variants": VARIANTS})
    print(markdown(analysis))


if __name__ == "__main__":
    main()
