"""Named training recipes: TrainConfig values shared by `gapfix train`, `gapfix compare`
and `gapfix demo`, documented once here.

"default" is TrainConfig's own defaults. "demo" is the recipe of the bundled demo
(gapfix demo), tuned on its math task:

- BASH predictions sampled at temperature 2 with beta 0.3: at temperature 1 a
  converged model's samples are almost always the reference token and nothing
  is mixed in; 4096 predicted examples per iteration, trained for as many epochs
  as the steps take, keep the prediction pass near a fifth of an iteration;
- RAC answers sampled at temperature 1 for 1500 prompts per iteration (greedy
  answers of a converged model equal the references: the iteration would be
  SFT), path labels, mixed 1:1 with SFT rows;
- batch 64, lr 1e-3 without warm-up (a continuation from a trained base), 2
  iterations, answers of at most 48 new tokens.
"""

RECIPES = {
    "default": {},
    "demo": dict(
        iterations=2, batch_size=64, lr=1e-3, warmup_steps=0,
        beta=0.3, bash_mode="sample", bash_temperature=2.0, bash_rows=4096,
        rac_mode="path", rac_temperature=1.0, rac_prompts=1500, rac_sft_ratio=1.0,
        max_new_tokens=48,
    ),
}


def recipe(name: str) -> dict:
    """The TrainConfig values of recipe `name` (a copy)."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return dict(RECIPES[name])
