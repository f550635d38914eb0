"""The measurement behind the demo recipe's BASH settings (gapfix/recipes.py, docs/compare.md):
`gapfix compare`'s protocol on the bundled math task, at a size that runs in minutes on one CPU
thread, with BASH swept over its modes and betas next to continued SFT and the noise control.

    python scripts/recipe_sweep.py OUT [--seeds 2]

Writes OUT/results.md (the compare table, with the multiple-comparison note) and results.json.
"""
import argparse

from gapfix.demo import RECIPE, run_demo
from gapfix.threads import apply_threads

SIZE = dict(train_problems=4000, test_problems=300, hard_problems=100, hidden_size=64, num_heads=2,
            base_steps=800, extra_steps=160, bash_rows=1024, rac_prompts=256)
VARIANTS = ("sft", "bash", "bash[bash_mode=argmax]", "bash[bash_temperature=1.0]", "bash[beta=0.1]",
            "bash[bash_mode=topk]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    apply_threads(1)
    run_demo(args.out, recipe={**RECIPE, **SIZE}, seeds=args.seeds, methods=VARIANTS, draws=500)


if __name__ == "__main__":
    main()
