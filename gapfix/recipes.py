"""Named training recipes: TrainConfig values shared by `gapfix train`, `gapfix compare`
and `gapfix demo`, documented once here.

"default" is TrainConfig's own defaults. "demo" is the recipe of the bundled demo
(gapfix demo), tuned on its math task:

- BASH with the model's argmax predictions at beta 0.3. Measured on the bundled task
  (scripts/recipe_sweep.py; docs/compare.md): predictions sampled at temperature 2 were
  10.5 points worse than continued SFT on test and not told apart from the noise control
  (random tokens), so what they mixed in acted as noise. Argmax was within noise of SFT
  (+1.0 [-4.8, +6.3]), and so was sampling at temperature 1 (-1.5). 4096 predicted examples
  per iteration, trained for as many epochs as the steps take, keep the prediction pass near
  a fifth of an iteration;
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
        beta=0.3, bash_mode="argmax", bash_temperature=1.0, bash_rows=4096,
        rac_mode="path", rac_temperature=1.0, rac_prompts=1500, rac_sft_ratio=1.0,
        max_new_tokens=48,
    ),
}


def recipe(name: str) -> dict:
    """The TrainConfig values of recipe `name` (a copy)."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return dict(RECIPES[name])
