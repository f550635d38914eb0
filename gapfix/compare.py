"""`gapfix compare`: do BASH and RAC help on my model and data?

    gapfix compare --model BASE --train train.jsonl --eval test.jsonl --methods sft,bash,rac \\
                   --seeds 3 --extra-steps 300 --answer-regex '#### (\\S+)' --out cmp/

Every method continues from the same base with the same number of extra
optimizer steps (the offline phase, BASH's prediction pass and RAC's generation,
is extra wall time, reported separately), and each result is scored by
gapfix.evaluation on the --eval set. Two controls are always run:

- "base": the base itself with no extra steps. Where continued SFT overfits, a
  method can beat SFT and still lose to stopping early;
- "bash_noise" (when bash is compared): BASH with uniform random tokens mixed
  in instead of the model's own predictions, at the same beta. A gain BASH
  shares with it is a regularisation effect, not a fix of exposure bias.

The report (results.md, printed) gives per metric a one-line summary, each run's mean ± sd
over seeds, and every comparison the protocol names (each run against continued SFT, bash
against bash_noise, each method against the base) as a paired difference (same seed, same eval
example) with a 95% interval: Student t over the seed means' spread and the example effects
(see paired_bootstrap; docs/compare.md argues the choice). An interval that covers 0 is "no
difference detected"; it does not show the methods equal, only that this many seeds and
examples cannot tell them apart. With one seed the interval covers example noise only.
--scorer module:function scores answers with the user's own function (tasks with several
valid answers); every generated answer is saved to generations.jsonl with the backend that
generated it. --sweep bash:beta=0.1,0.3 adds variants, with a multiple-comparison note.

--base-steps N first trains the base by SFT for N steps (per seed; needed for
--model tiny or a config.json); --val then picks, among --base-checkpoints
equally spaced points of that run, the one with the best validation accuracy.
With a trained --model folder, --val picks the best of its saved checkpoints
(a gapfix train --out folder: checkpoints/*/model and final).

Writes results.json, results.png, results.md and generations.jsonl into --out.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Union

if TYPE_CHECKING:  # annotations only: these load where they are used
    import argparse

    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase

    from gapfix.data import Example
    from gapfix.trainer import TrainConfig

CONTROLS = ("base", "bash_noise")
# which way is better, per metric: +1 higher, -1 lower
DIRECTION = {
    "accuracy": 1, "test": 1, "hard": 1, "teacher_forced": 1, "free_running": 1,
    "recovery_ends_right": 1, "recovery": 1,
    "recovery_distance": -1, "embedding_distance": -1, "carried": -1,
}


# ----------------------------------------------------------------------------- statistics


def paired_bootstrap(differences: Sequence[Sequence[float]], *, draws: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Mean and interval of paired differences d[seed][example] (method minus reference, the same
    seed and eval example).

    The design is crossed (every seed is scored on the same eval examples), so
    d = mean + seed effect + example effect + residual. With S seeds and E examples the
    interval is mean ± t * sqrt(seed term + example term): the seed term is the variance of the
    S seed means over S (the residual noise they carry included, estimated with them on S - 1
    degrees of freedom), the example term the example effects' variance over E (the spread of
    the example means less the residual noise in it: example effects are shared by every seed,
    so the seed means do not show them), and t is Student's quantile at Satterthwaite's degrees
    of freedom for the sum: S - 1 (4.30 for 3 seeds) where the seed term dominates, up to E - 1
    where example effects do. With 3 seeds this is about 1.5 times wider than a normal interval
    where the seeds agree, the price of estimating their spread from three values; resampling
    seeds, as a bootstrap does, cannot show that uncertainty (its interval covered a true zero
    85% of the time where three seeds differed by an sd of 6 points; this one covers it about
    95% of the time whether seeds agree or not: tests/test_compare.py and docs/compare.md).
    With one seed there is no seed level and the interval is the percentile bootstrap over
    examples (`draws` resamples drawn from `seed`), which covers the example noise only. NaN
    entries (an example without a probe) are left out of the means.

    Returns {"mean", "low", "high", "seed_share"}: seed_share is the part of the variance that is
    true seed-to-seed difference (the seed means' spread beyond the noise their examples explain;
    None with one seed); above one half the seed spread dominates, and more seeds narrow the
    interval most.
    """
    import numpy as np

    d = np.asarray(differences, dtype=float)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"differences must be a non-empty (seeds, examples) table, got shape {d.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    d = d[:, np.isfinite(d).any(axis=0)]  # examples never measured
    d = d[np.isfinite(d).any(axis=1)]  # seeds without a measured example
    if d.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "seed_share": None}
    seeds, examples = d.shape
    mean = float(np.nanmean(d))
    alpha = (1 - level) / 2
    if seeds == 1:
        rng = np.random.default_rng(seed)
        cols = d[0] - mean
        means = mean + cols[rng.integers(0, examples, size=(draws, examples))].mean(axis=1)
        low, high = np.quantile(means, [alpha, 1 - alpha])
        return {"mean": mean, "low": float(low), "high": float(high), "seed_share": None}
    seed_term, example_term, dof, seed_effects = _variance_terms(d)
    variance = seed_term + example_term
    if variance <= 0:
        return {"mean": mean, "low": mean, "high": mean, "seed_share": 0.0}
    half = t_quantile(1 - alpha, dof) * math.sqrt(variance)
    return {"mean": mean, "low": mean - half, "high": mean + half, "seed_share": seed_effects / variance}


def _variance_terms(d: Any) -> tuple[float, float, float, float]:
    """(seed term, example term, degrees of freedom, the seed term's true seed-effect part) of the
    grand mean's variance of a
    (seeds, examples) table, NaN cells left out (see paired_bootstrap). The seed term is the
    spread of the seed means over S (their residual noise included: it is estimated with them,
    on S - 1 degrees of freedom); the example term is the example effects' part, shared by all
    seeds and so absent from the seed means: the spread of the example means less the residual
    noise they carry, over E. Satterthwaite combines the two degrees of freedom."""
    import numpy as np

    seeds, examples = d.shape
    mean = float(np.nanmean(d))
    rows = np.nanmean(d, axis=1) - mean
    cols = np.nanmean(d, axis=0) - mean
    seed_term = float(rows.var(ddof=1)) / seeds
    if examples < 2:
        return seed_term, 0.0, float(seeds - 1), seed_term
    resid = d - mean - rows[:, None] - cols[None, :]
    measured = int(np.isfinite(resid).sum())
    resid_dof = max(1.0, (seeds - 1) * (examples - 1) * measured / d.size)
    resid_var = float(np.nansum(resid ** 2)) / resid_dof
    example_term = max(0.0, float(cols.var(ddof=1)) - resid_var * examples / measured) / examples
    parts = seed_term ** 2 / (seeds - 1) + example_term ** 2 / (examples - 1)
    dof = (seed_term + example_term) ** 2 / parts if parts > 0 else float(seeds - 1)
    seed_effects = max(0.0, seed_term - resid_var / (measured / seeds) / seeds)
    return seed_term, example_term, dof, seed_effects


def t_quantile(p: float, dof: float) -> float:
    """Student's t quantile at probability p (0.5 < p < 1) and real dof >= 1, by bisection on the
    distribution function (a regularized incomplete beta)."""
    if dof > 1e6:
        dof = 1e6
    low, high = 0.0, 1.0
    while _t_cdf(high, dof) < p:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_cdf(middle, dof) < p else (low, middle)
    return (low + high) / 2


def _t_cdf(t: float, dof: float) -> float:
    return 1 - 0.5 * _incomplete_beta(dof / (dof + t * t), dof / 2, 0.5)


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - _incomplete_beta(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                     + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, dd = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        dd = 1 + numerator * dd
        dd = 1 / (dd if abs(dd) > tiny else tiny)
        c = 1 + numerator / c
        c = c if abs(c) > tiny else tiny
        f *= c * dd
        if abs(1 - c * dd) < 1e-14:
            break
    return front * (f - 1)


def verdict(interval: dict, direction: int = 1, against: str = "SFT") -> str:
    if not (math.isfinite(interval["low"]) and math.isfinite(interval["high"])):
        return "not measured"
    if interval["low"] <= 0 <= interval["high"]:
        return "no difference detected"
    better = (interval["mean"] > 0) == (direction > 0)
    return f"{'better' if better else 'worse'} than {against}"


def _mean_sd(values: Sequence[Optional[float]]) -> Optional[Dict[str, float]]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _nanmean(values: Sequence[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else float("nan")


def _pairs(methods: List[str], reference: str) -> List[tuple]:
    """Every comparison the report states: each run against continued SFT (the base's row is
    base - sft), BASH against its noise control, each other method against the base."""
    pairs = [(m, reference) for m in methods if m != reference]
    if "bash" in methods and "bash_noise" in methods:
        pairs.append(("bash", "bash_noise"))
    if "base" in methods:
        pairs += [(m, "base") for m in methods if m not in ("base", "bash_noise", reference)]
    return pairs


def _difference_table(by: dict, method: str, against: str, seeds: List[int], metric: str) -> Optional[list]:
    table = []
    for s in seeds:
        if (method, s) not in by or (against, s) not in by:
            continue
        a = by[(method, s)]["per_example"].get(metric)
        b = by[(against, s)]["per_example"].get(metric)
        if a is None or b is None or len(a) != len(b):
            return None
        table.append([x - y for x, y in zip(a, b)])
    return table or None


def analyse(runs: List[dict], *, reference: str = "sft", draws: int = 2000, level: float = 0.95) -> dict:
    """Per method and metric: mean ± sd over seeds; differences with intervals (paired_bootstrap).

    runs: {"seed", "method", "per_example": {metric: [value per eval example]}, "seconds"}.
    Compares every run with `reference`, bash with bash_noise, and every method with the base
    where they ran. Where several variants of one method ran (a sweep), "comparisons" counts the
    comparisons with the reference, and each such interval also gets "adjusted": the interval at
    the Bonferroni level 1 - (1 - level) / comparisons with its verdict.
    """
    methods = list(dict.fromkeys(r["method"] for r in runs))
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    metrics = list(dict.fromkeys(m for r in runs for m in r["per_example"]))
    summary = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        entry = {"metrics": {}}
        for metric in metrics:
            per_seed = [_nanmean(r["per_example"][metric]) for r in mine if metric in r["per_example"]]
            stats = _mean_sd(per_seed)
            if stats is not None:
                entry["metrics"][metric] = stats
        for phase in ("offline", "train", "eval"):
            entry[f"{phase}_seconds"] = statistics.fmean([r["seconds"].get(phase, 0.0) for r in mine] or [0.0])
        summary[method] = entry
    swept = [m for m in methods if "[" in m]
    comparisons = len([m for m in methods if m not in (reference, "base", "bash_noise")]) if swept else 1
    differences = {}
    for method, against in _pairs(methods, reference):
        result = {}
        for metric in metrics:
            table = _difference_table(by, method, against, seeds, metric)
            if table is None:
                continue
            interval = paired_bootstrap(table, draws=draws, seed=len(differences), level=level)
            interval["verdict"] = verdict(interval, DIRECTION.get(metric, 1), _against_name(against))
            if comparisons > 1 and against == reference:
                adjusted = paired_bootstrap(table, draws=draws, seed=len(differences),
                                            level=1 - (1 - level) / comparisons)
                adjusted["verdict"] = verdict(adjusted, DIRECTION.get(metric, 1), _against_name(against))
                interval["adjusted"] = adjusted
            result[metric] = interval
        differences[f"{method} - {against}"] = result
    failed = [{"seed": r["seed"], "method": r["method"], "why": r["failed"]} for r in runs if r.get("failed")]
    for method in methods:
        summary[method]["failed_seeds"] = [f["seed"] for f in failed if f["method"] == method]
    return {"summary": summary, "differences": differences, "metrics": metrics, "seeds": seeds,
            "reference": reference, "level": level, "comparisons": comparisons, "failed": failed}


def _against_name(against: str) -> str:
    return "continued SFT" if against == "sft" else against


# ----------------------------------------------------------------------------- the runs


def run_compare(make_base: Callable[[int], object], tokenizer: PreTrainedTokenizerBase,
                train_examples: Union[Sequence[Example], datasets.Dataset], *,
                evaluate: Callable[[object], Dict[str, list]],
                methods: Sequence[str] = ("sft", "bash", "rac"),
                seeds: int = 3, extra_steps: int = 300, config: Optional[TrainConfig] = None,
                base_steps: int = 0, base_config: Optional[TrainConfig] = None,
                select_base: Optional[Callable[[object], float]] = None,
                base_checkpoints: int = 4, out: Optional[str] = None, log: Callable[[str], Any] = print,
                draws: int = 2000) -> dict:
    """Continues from the same base with equal extra steps per method; evaluates each run.

    make_base(seed): a fresh base model (the same weights for every method of a seed).
    train_examples: what gapfix.trainer.train takes: Examples, or a tokenized datasets.Dataset
    (load_tokenized's, read a batch at a time).
    evaluate(model): {metric: [value per eval example]} (see gapfix.evaluation.evaluate_model).
    config: the TrainConfig template of the extra steps (method, steps, seed, out_dir are
    set per run). base_steps > 0: the base is first trained by SFT with base_config;
    select_base(model) -> score (higher better) then picks the best of base_checkpoints
    equally spaced points of that run.
    """
    from gapfix.checkpoint import NonFiniteTrainingError
    from gapfix.trainer import TrainConfig, train

    config = config or TrainConfig()
    methods = list(dict.fromkeys(methods))
    variants = {name: parse_variant(name, config) for name in methods}
    if "sft" not in methods:
        raise ValueError("methods must include sft: every method is compared with continued SFT")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    if isinstance(extra_steps, bool) or not isinstance(extra_steps, int) or extra_steps < 1:
        raise ValueError(f"extra_steps must be an int >= 1, got {extra_steps!r}")
    if extra_steps % config.iterations:
        raise ValueError(f"extra_steps ({extra_steps}) must be a multiple of iterations "
                         f"({config.iterations}), "
                         "so that every method takes exactly the same number of optimizer steps")
    runs_to_do = [("base", None)] + [(m, variants[m]) for m in methods]
    if "bash" in methods:
        runs_to_do.append(("bash_noise", ("bash", {"bash_mode": "random"})))
    runs, generations = [], []
    for seed in range(seeds):
        seed_dir = os.path.join(out, f"seed{seed}") if out else None
        model = make_base(seed)
        base_seconds, picked = 0.0, None
        if base_steps:
            base_seconds, picked = _train_base(model, tokenizer, train_examples, base_steps, base_config,
                                               seed, select_base, base_checkpoints, seed_dir, log)
        base_state = copy.deepcopy(model.state_dict())
        for name, variant in runs_to_do:
            model.load_state_dict(base_state)
            seconds = {"offline": 0.0, "train": base_seconds if name == "base" else 0.0}
            run_config = None
            if variant is not None:
                method, overrides = variant
                run_config = dataclasses.replace(
                    config, method=method, steps_per_iteration=extra_steps // config.iterations,
                    seed=seed, out_dir=os.path.join(seed_dir, _folder_name(name)) if seed_dir else None,
                    **overrides)
                try:
                    result = train(model, tokenizer, train_examples, run_config, resume=False)
                except NonFiniteTrainingError as err:  # a diverged run is reported failed, never scored
                    runs.append(failed_run(seed, name, err, log))
                    continue
                seconds = dict(result.phase_seconds)
            started = time.perf_counter()
            evaluated = evaluate(model)
            seconds["eval"] = time.perf_counter() - started
            if evaluated.get("_phase_seconds"):  # what each diagnostic of the evaluation cost
                seconds["eval_phases"] = evaluated["_phase_seconds"]
            per_example = {k: v for k, v in evaluated.items() if not k.startswith("_")}
            run = {"seed": seed, "method": name, "seconds": seconds, "per_example": per_example,
                   "generation": evaluated.get("_generation")}
            if run_config is not None:
                run["settings"] = {k: getattr(run_config, k) for k in _RUN_SETTINGS if hasattr(run_config, k)}
            if name == "base" and picked is not None:
                run["base_checkpoint"] = picked
            runs.append(run)
            generations += [dict(g, seed=seed, method=name, **(evaluated.get("_generation") or {}))
                            for g in evaluated.get("_generations", ())]
            means = ", ".join(f"{k} {_nanmean(v):.3f}" for k, v in per_example.items())
            log(f"seed {seed}: {name:<10} offline {seconds['offline']:6.1f} s, "
                f"train {seconds['train']:6.1f} s: "
                + means)
    analysis = analyse(runs, draws=draws)
    analysis["runs"] = runs
    if out and generations:
        from gapfix.evaluation import write_generations

        analysis["generations_file"] = write_generations(generations, out)
    return analysis


def failed_run(seed: int, method: str, error: Exception, log: Callable[[str], Any]) -> dict:
    """The record of a run whose training failed (diverged): no metrics, so that it is left out
    of every mean and difference, and `failed` saying why (analyse lists it, markdown marks it)."""
    log(f"seed {seed}: {method:<10} FAILED: {error}")
    return {"seed": seed, "method": method, "seconds": {}, "per_example": {}, "failed": str(error)}


# the TrainConfig fields a run records beside its results (what a sweep varies, and the generation backend)
_RUN_SETTINGS = ("method", "beta", "bash_mode", "bash_temperature", "bash_top_k", "rac_mode", "rac_temperature",
                 "rac_sft_ratio", "generation_backend", "lr", "iterations", "steps_per_iteration")


def _folder_name(name: str) -> str:
    """A run's folder under seed<k>/: its name, a sweep's brackets and signs made plain."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("_")


def parse_variant(name: str, config: Optional[TrainConfig] = None) -> tuple[str, dict]:
    """(method, TrainConfig overrides) of a run name: "sft", "bash", "rac", or a swept variant
    "bash[beta=0.1]" / "bash[bash_mode=argmax]" (see sweep_variants); the overrides are checked
    by TrainConfig.validate."""
    from gapfix.trainer import TrainConfig

    method, _, rest = name.partition("[")
    if method not in ("sft", "bash", "rac"):
        raise ValueError(f"methods: {name!r} is not one of sft, bash, rac (or a variant such as bash[beta=0.1])")
    overrides = {}
    if rest:
        if not rest.endswith("]") or "=" not in rest:
            raise ValueError(f"methods: {name!r}: a variant is method[field=value]")
        field, _, text = rest[:-1].partition("=")
        overrides[field] = _field_value(field, text, name)
    checked = dataclasses.replace(config or TrainConfig(), method=method, **overrides)
    checked.validate()
    return method, overrides


def _field_value(field: str, text: str, name: str) -> Any:
    from gapfix.trainer import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if field not in fields:
        raise ValueError(f"methods: {name!r}: {field!r} is not a TrainConfig field")
    default = getattr(TrainConfig(), field)
    try:
        if isinstance(default, bool):
            raise ValueError("booleans are not swept")
        if isinstance(default, int) or (default is None and text.lstrip("-").isdigit()):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError as err:
        raise ValueError(f"methods: {name!r}: {text!r} is not a value of {field} ({err})") from None
    return text


def sweep_variants(spec: str) -> List[str]:
    """Run names of one --sweep METHOD:FIELD=V1,V2,...: ["bash[beta=0.1]", "bash[beta=0.3]"]."""
    method, sep, rest = spec.partition(":")
    field, eq, values = rest.partition("=")
    if not sep or not eq or not field or not values:
        raise ValueError(f"--sweep {spec!r}: expected METHOD:FIELD=V1,V2,... (e.g. bash:beta=0.1,0.3)")
    return [f"{method}[{field}={v.strip()}]" for v in values.split(",") if v.strip()]


def _train_base(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                train_examples: Union[Sequence[Example], datasets.Dataset],
                base_steps: int, base_config: Optional[TrainConfig], seed: int,
                select_base: Optional[Callable[[object], float]], checkpoints: int, seed_dir: Optional[str],
                log: Callable[[str], Any]) -> tuple[float, Optional[dict]]:
    """SFT for base_steps; with select_base, the best of `checkpoints` equally spaced points."""
    from gapfix.trainer import TrainConfig, train

    base_config = base_config or TrainConfig()
    points = max(1, min(checkpoints, base_steps)) if select_base else 1
    if base_steps % points:
        raise ValueError(f"base_steps ({base_steps}) must be a multiple of base_checkpoints ({points})")
    scores, best = [], None

    def on_iteration_end(iteration: int, trained: torch.nn.Module) -> None:
        nonlocal best
        score = select_base(trained)
        scores.append({"step": (iteration + 1) * (base_steps // points), "validation": score})
        if best is None or score > best[0]:
            best = (score, iteration, copy.deepcopy(trained.state_dict()))

    started = time.perf_counter()
    train(model, tokenizer, train_examples, dataclasses.replace(
        base_config, method="sft", iterations=points, steps_per_iteration=base_steps // points, seed=seed,
        out_dir=os.path.join(seed_dir, "base") if seed_dir else None),
        resume=False, on_iteration_end=on_iteration_end if select_base else None)
    seconds = time.perf_counter() - started
    if best is None:
        return seconds, None
    model.load_state_dict(best[2])
    listing = ", ".join(f"{s['validation']:.3f}" for s in scores)
    log(f"seed {seed}: base checkpoint at step {scores[best[1]]['step']} of {base_steps} "
        f"(validation {best[0]:.3f}; all: {listing})")
    return seconds, {"step": scores[best[1]]["step"], "scores": scores}


# ----------------------------------------------------------------------------- report


def _label(method: str) -> str:
    return {"base": "base (no extra steps)", "bash_noise": "bash_noise (random tokens)"}.get(method, method)


_PERCENT = {"accuracy", "test", "hard", "teacher_forced", "free_running", "recovery_ends_right", "recovery",
            "carried"}


def _scale(metric: str) -> float:
    return 100.0 if metric in _PERCENT else 1.0


def _digits(analysis: dict, metric: str) -> int:
    """Decimals for `metric`: two significant digits of its narrowest interval's half-width (in
    the table's units), so that no interval prints as [+0.00, +0.00]; where every interval has
    width 0, two significant digits of its smallest non-zero value; 1 to 6."""
    k = _scale(metric)
    diffs = [d for pair in analysis["differences"].values() for name, d in pair.items()
             if name == metric and math.isfinite(d["low"])]
    sizes = [(d["high"] - d["low"]) / 2 * k for d in diffs if d["high"] > d["low"]]
    if not sizes:
        sizes = [abs(v) * k for d in diffs for v in (d["mean"],) if v] + [
            abs(e["metrics"][metric]["mean"]) * k for e in analysis["summary"].values()
            if metric in e["metrics"] and e["metrics"][metric]["mean"]]
    if not sizes:
        return 1 if metric in _PERCENT else 3
    return max(1, min(6, 1 - math.floor(math.log10(min(sizes)))))


def _interval_text(diff: dict, metric: str, digits: int) -> str:
    k = _scale(metric)
    return f"{k * diff['mean']:+.{digits}f} [{k * diff['low']:+.{digits}f}, {k * diff['high']:+.{digits}f}]"


def summary_line(analysis: dict, metric: str) -> str:
    """One sentence: which runs are better, worse, or not told apart from continued SFT on `metric`."""
    reference, digits = analysis["reference"], _digits(analysis, metric)
    groups: Dict[str, List[str]] = {}
    for method in analysis["summary"]:
        diff = analysis["differences"].get(f"{method} - {reference}", {}).get(metric)
        if diff is None:
            continue
        kind = diff["verdict"].split(" than ")[0]
        groups.setdefault(kind, []).append(f"{method} {_interval_text(diff, metric, digits)}")
    parts = [f"{kind}: " + "; ".join(items) for kind, items in groups.items()]
    return f"**{metric}** against continued SFT: " + (" | ".join(parts) if parts else "nothing measured") + "."


def markdown(analysis: dict) -> str:
    """Per metric: a one-line summary, each method's mean ± sd over seeds, and every comparison
    (each run against continued SFT, bash against bash_noise, each method against the base) with
    its interval and verdict; notes on seed spread and multiple comparisons; time per phase."""
    lines, notes = [], []
    level = round(100 * analysis.get("level", 0.95))
    for metric in analysis["metrics"]:
        unit = " (%)" if metric in _PERCENT else ""
        better = "higher" if DIRECTION.get(metric, 1) > 0 else "lower"
        digits = _digits(analysis, metric)
        reference = analysis["reference"]
        lines += [f"### {metric}{unit} ({better} is better)", "", summary_line(analysis, metric), "",
                  f"| method | mean ± sd over seeds | difference to {reference} ({level}% CI) | verdict |",
                  "| --- | --- | --- | --- |"]
        for method, entry in analysis["summary"].items():
            diff = analysis["differences"].get(f"{method} - {reference}", {}).get(metric)
            cells = ("reference", "") if method == reference else ("-", "")
            if diff is not None:
                cells = (_interval_text(diff, metric, digits), _verdict_text(diff, analysis))
            failed = entry.get("failed_seeds")
            name = _label(method) + (f" (FAILED: seed {', '.join(map(str, failed))})" if failed else "")
            lines.append(f"| {name} | {_cell(entry['metrics'].get(metric), metric, digits)} | "
                         f"{cells[0]} | {cells[1]} |")
        others = [(pair, result[metric]) for pair, result in analysis["differences"].items()
                  if metric in result and not pair.endswith(f" - {reference}")]
        if others:
            lines += ["", f"| control comparison | difference ({level}% CI) | verdict |", "| --- | --- | --- |"]
            lines += [f"| {pair} | {_interval_text(diff, metric, digits)} | {_verdict_text(diff, analysis)} |"
                      for pair, diff in others]
        dominated = [pair for pair, result in analysis["differences"].items()
                     if ((result.get(metric) or {}).get("seed_share") or 0) > 0.5]
        if dominated:
            notes.append(f"{metric}: the seeds disagree beyond their example noise in {', '.join(dominated)} "
                         "(more than half of the interval's variance): the interval is wide because of it; "
                         "run more seeds (--seeds 5 or more) to narrow it")
        lines.append("")
    lines += ["| method | offline s | train s | eval s |", "| --- | --- | --- | --- |"]
    for method, entry in analysis["summary"].items():
        lines.append(f"| {_label(method)} | {entry['offline_seconds']:.1f} | {entry['train_seconds']:.1f} "
                     f"| {entry.get('eval_seconds', 0.0):.1f} |")
    lines += ["", *_footnotes(analysis, notes)]
    for failure in analysis.get("failed", []):
        lines.append(f"FAILED: {failure['method']} seed {failure['seed']}, left out of every row above: "
                     f"{failure['why']}")
    return "\n".join(lines)


def _verdict_text(diff: dict, analysis: dict) -> str:
    text = diff["verdict"]
    if "adjusted" in diff and diff["adjusted"]["verdict"] != text:
        text += f" (after Bonferroni over {analysis['comparisons']}: {diff['adjusted']['verdict']})"
    return text


def _footnotes(analysis: dict, notes: List[str]) -> List[str]:
    seeds = len(analysis["seeds"])
    out = [f"{seeds} seed(s). Intervals: " + (
        "Student t over seeds and examples (seed means' spread with S - 1 degrees of freedom, plus "
        "the example effects; docs/compare.md). An interval covering 0 is 'no difference detected': "
        "not shown equal, only not told apart." if seeds > 1 else
        "bootstrap over eval examples only (one seed: the seed-to-seed spread is not measured).")]
    constant = [m for m, e in analysis["summary"].items()
                if seeds > 1 and any(v["std"] == 0 for v in e["metrics"].values())]
    if constant:
        out.append(f"sd 0 for {', '.join(constant)}: the same result on every seed (a base given with no "
                   "--base-steps is the same model on every seed, and greedy evaluation is deterministic).")
    if analysis.get("comparisons", 1) > 1:
        out.append(f"Multiple comparisons: {analysis['comparisons']} runs are compared with continued SFT, so "
                   f"about {analysis['comparisons']} x {100 - round(100 * analysis.get('level', 0.95))}% of "
                   "'better'/'worse' verdicts are expected by chance where nothing differs; a verdict that "
                   "does not hold after Bonferroni says so in brackets.")
    out += [f"Note: {n}." for n in notes]
    out += [f"Note: {n}" for n in analysis.get("notes", [])]
    return out


def _cell(stats: Optional[Dict[str, float]], metric: str, digits: int) -> str:
    if stats is None:
        return "-"
    k = _scale(metric)
    return f"{k * stats['mean']:.{digits}f} ± {k * stats['std']:.{digits}f}"


_COLOURS = {"better": "tab:green", "worse": "tab:red", "no difference detected": "tab:gray"}


def plot(analysis: dict, path: str) -> Optional[str]:
    """Per metric, each run's difference to continued SFT with its interval, in the table's units;
    green better, red worse, grey not told apart; the controls (base, bash_noise) are drawn but do
    not set the scale: an interval past the axis is clipped and marked with an arrow."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return None
    reference, metrics = analysis["reference"], analysis["metrics"]
    methods = [m for m in analysis["summary"] if m != reference]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.8 * len(metrics), 0.9 + 0.45 * max(3, len(methods))),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        _plot_metric(ax, analysis, metric, methods)
    handles = [Line2D([], [], marker="o", color=c, ls="", label=k) for k, c in _COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    level = round(100 * analysis.get("level", 0.95))
    fig.suptitle(f"difference to continued SFT ({level}% interval; % points where the table shows %)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_metric(ax: Any, analysis: dict, metric: str, methods: List[str]) -> None:
    reference, k = analysis["reference"], _scale(metric)
    diffs = {m: analysis["differences"].get(f"{m} - {reference}", {}).get(metric) for m in methods}
    diffs = {m: d for m, d in diffs.items() if d is not None and math.isfinite(d["low"])}
    scale_from = [d for m, d in diffs.items() if m not in CONTROLS] or list(diffs.values())
    span = max([abs(k * v) for d in scale_from for v in (d["low"], d["high"])] + [1e-9]) * 1.15
    for y, method in enumerate(methods):
        d = diffs.get(method)
        if d is None:
            continue
        colour = _COLOURS[d["verdict"].split(" than ")[0]]
        low, high, mean = (max(-span, min(span, k * v)) for v in (d["low"], d["high"], d["mean"]))
        ax.plot([low, high], [y, y], color=colour, lw=2)
        ax.plot([mean], [y], "o", color=colour, mfc="white" if method in CONTROLS else colour)
        for value, edge in ((k * d["low"], -span), (k * d["high"], span)):
            if abs(value) > span:
                ax.annotate("", xy=(edge, y), xytext=(edge * 0.85, y), arrowprops=dict(arrowstyle="->", color=colour))
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlim(-span, span)
    ax.set_yticks(range(len(methods)), [_label(m) for m in methods], fontsize=8)
    better = "right" if DIRECTION.get(metric, 1) > 0 else "left"
    unit = " (% points)" if metric in _PERCENT else ""
    ax.set_xlabel(f"{metric} - {reference}{unit}; better to the {better}", fontsize=8)


def write_results(analysis: dict, out: str, extra: Optional[dict] = None) -> dict:
    """results.json, results.md and results.png (where matplotlib is installed) into out."""
    from gapfix.evaluation import _finite

    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "results.json"), "md": os.path.join(out, "results.md")}
    png = plot(analysis, os.path.join(out, "results.png"))
    notes = list(analysis.get("notes", [])) + ([] if png else ["results.png skipped: matplotlib is not installed"])
    if png:
        paths["png"] = png
    document = {**(extra or {}), **analysis, "notes": notes}
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(document), f, indent=1)
    os.replace(tmp, paths["json"])
    with open(paths["md"], "w") as f:
        f.write(markdown(analysis) + "\n")
    return paths


# ----------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    import argparse

    from gapfix.eval_cli import add_scorer_flag
    from gapfix.recipes import RECIPES
    from gapfix.threads import add_threads_flag
    from gapfix.train_cli import add_config_flags, add_lora_flags

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 2)[2]
    parser.add_argument("--model", required=True,
                        help='the base: a local model folder (or a gapfix train --out folder with --val), '
                             'a *.gguf file, "smollm2-135m-instruct", a config.json, or "tiny" (these two '
                             'need --base-steps)')
    parser.add_argument("--train", required=True,
                        help="prompt/response or chat records (JSONL, Parquet or a saved datasets folder, "
                             "as gapfix train --train takes; tokenized into a cache under --out/data_cache)")
    parser.add_argument("--eval", required=True, help="held-out records every run is evaluated on")
    parser.add_argument("--val", default=None, help="validation records: picks the base's best checkpoint")
    parser.add_argument("--methods", default="sft,bash,rac",
                        help="comma-separated, must include sft (default %(default)s)")
    parser.add_argument("--sweep", action="append", default=[], metavar="METHOD:FIELD=V1,V2",
                        help="also run METHOD with each value of a setting, e.g. bash:beta=0.1,0.3 or "
                             "bash:bash_mode=argmax,sample (repeatable; every variant is compared with "
                             "continued SFT, and the table notes the multiple comparisons)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default %(default)s)")
    parser.add_argument("--extra-steps", type=int, required=True,
                        help="optimizer steps every method takes from the base (a multiple of --iterations)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations the extra steps are "
                        f"split into (default 1; demo recipe {RECIPES['demo']['iterations']})")
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                        help="named TrainConfig defaults (gapfix.recipes; default %(default)s)")
    parser.add_argument("--base-steps", type=int, default=0,
                        help="first train the base by SFT for this many steps per seed (default 0)")
    parser.add_argument("--base-lr", type=float, default=None, help="lr of the base's SFT (default: --lr)")
    parser.add_argument("--base-checkpoints", type=int, default=4,
                        help="with --val and --base-steps: points of the base run to choose from (default 4)")
    parser.add_argument("--answer-regex", default=None,
                        help="score the answer this regex captures (default: exact match of the response)")
    add_scorer_flag(parser)
    parser.add_argument("--eval-backend", default="hf", choices=("auto", "vllm", "hf"),
                        help="generation backend of the evaluations: auto is vLLM for a model on a GPU, "
                             "else hf (default %(default)s)")
    parser.add_argument("--out", default="gapfix-compare", help="output folder (default %(default)s)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N eval examples")
    parser.add_argument("--bootstrap", type=int, default=2000,
                        help="bootstrap draws of a one-seed interval (several seeds: Student t, no draws; "
                             "default %(default)s)")
    parser.add_argument("--tokenizer", default="bpe", choices=["bpe", "word", "char"],
                        help="for --model tiny / config.json: the tokenizer trained on --train (default bpe)")
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary cap (default 512)")
    parser.add_argument("--max-length", type=int, default=None, help="drop --train examples longer than this")
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                        help="malformed data lines: stop, or skip them with a warning (default %(default)s)")
    add_threads_flag(parser)
    add_lora_flags(parser)
    add_config_flags(parser, skip=("steps_per_iteration", "epochs_per_iteration", "seed"))


def _checkpoint_candidates(folder: str) -> List[str]:
    """Model folders of a gapfix train --out folder: checkpoints/*/model, then final."""
    found = []
    root = os.path.join(folder, "checkpoints")
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            model_dir = os.path.join(root, name, "model")
            if name.startswith("iter") and not name.endswith(".tmp") and os.path.isdir(model_dir):
                found.append(model_dir)
    if os.path.isfile(os.path.join(folder, "final", "config.json")):
        found.append(os.path.join(folder, "final"))
    return found


def run(args: argparse.Namespace) -> int:
    from gapfix.data import check_input_file
    from gapfix.data.loading import is_table_source
    from gapfix.eval_cli import scoring_args
    from gapfix.threads import apply_threads, quiet_third_party
    from gapfix.train_cli import config_values
    from gapfix.trainer import TrainConfig

    apply_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods += [name for spec in args.sweep for name in sweep_variants(spec)]
    scoring = scoring_args(args)
    values = config_values(args)
    values.update(method="sft", out_dir=None)
    config = TrainConfig(**values)
    config.validate()
    for name in methods:
        parse_variant(name, config)
    if not config.progress:
        quiet_third_party()
    built = args.model == "tiny" or (os.path.isfile(args.model) and args.model.endswith(".json"))
    if built and not args.base_steps:
        raise ValueError(f"--model {args.model}: a randomly initialised base needs --base-steps N "
                         "(SFT first)")
    for flag, path in (("--train", args.train), ("--eval", args.eval), ("--val", args.val)):
        if path is not None and not is_table_source(path):
            check_input_file(path, flag)
    setup = _Setup(args, config, built, scoring)
    analysis = run_compare(
        setup.make_base, setup.tokenizer, setup.train_examples, evaluate=setup.evaluate_run, methods=methods,
        seeds=args.seeds, extra_steps=args.extra_steps, config=config, base_steps=args.base_steps,
        base_config=dataclasses.replace(config, lr=args.base_lr or config.lr),
        select_base=setup.val_score if (setup.val_examples is not None and args.base_steps) else None,
        base_checkpoints=args.base_checkpoints, out=args.out, draws=args.bootstrap)
    analysis["notes"] = setup.notes
    extra = {"command": {k: v for k, v in vars(args).items() if not k.startswith("_")},
             "config": dataclasses.asdict(config), "base": setup.picked_path or args.model,
             "data": setup.data_reports}
    paths = write_results(analysis, args.out, extra)
    print(markdown(analysis))
    print("wrote", ", ".join(paths.values()))
    return 0


class _Setup:
    """What `gapfix compare` evaluates with: the base model and tokenizer, the data (over-long
    eval examples dropped and counted, as training drops them), the scoring, the evaluation."""

    KEEP = ("accuracy", "teacher_forced", "free_running", "recovery_ends_right", "recovery_distance",
            "embedding_distance")

    def __init__(self, args: argparse.Namespace, config: TrainConfig, built: bool, scoring: dict):
        import copy

        from gapfix.data.loading import (
            data_cache_dir,
            length_limits,
            load_data,
            load_eval_examples,
            prompt_limit,
        )
        from gapfix.evaluation import RECOVERY_DISTANCE_LEFT_OUT
        from gapfix.models import load_model
        from gapfix.train_cli import load_model_and_tokenizer

        self.args, self.config, self.built, self.scoring = args, config, built, scoring
        self.notes = [RECOVERY_DISTANCE_LEFT_OUT] if scoring["scorer"] is not None else []
        self.picked_path, candidates = None, []
        is_run_folder = os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "config.json"))
        if not built and is_run_folder:
            candidates = _checkpoint_candidates(args.model)
            if not candidates:
                raise ValueError(f"--model {args.model!r} holds neither config.json nor gapfix train checkpoints")
            self.picked_path = candidates[-1]
        self.model, self.tokenizer = load_model_and_tokenizer(
            self.picked_path or args.model, args.train, "sdpa", 0, args.tokenizer, args.vocab_size,
            on_error=args.on_error)
        max_length, source, context = length_limits(self.model, args.max_length)
        prompt_max = prompt_limit(context, config.max_new_tokens)
        self.data_reports = {"train": {}, "eval": {}, "val": {}}
        self.train_examples, self.data_reports["train"] = load_data(
            args.train, self.tokenizer, cache_dir=data_cache_dir(args.out), max_length=max_length,
            max_length_source=source, max_prompt_length=prompt_max if "rac" in args.methods else None,
            on_error=args.on_error)
        held_out = dict(out=args.out, on_error=args.on_error, model=self.model, max_new_tokens=config.max_new_tokens)
        self.eval_examples = load_eval_examples(args.eval, self.tokenizer, limit=args.eval_limit,
                                                report=self.data_reports["eval"], **held_out)
        self.val_examples = (load_eval_examples(args.val, self.tokenizer, report=self.data_reports["val"], **held_out)
                             if args.val else None)
        if self.val_examples is not None and len(candidates) > 1 and not args.base_steps:
            scored = []
            for path in candidates:
                candidate, _ = load_model(path)
                scored.append((self.val_score(candidate), path))
                print(f"base candidate {path}: validation accuracy {scored[-1][0]:.3f}")
            self.picked_path = max(scored)[1]
            self.model, _ = load_model(self.picked_path)
            print(f"base: {self.picked_path}")
        if args.lora_r is not None and hasattr(self.model, "peft_config"):
            raise ValueError(f"--lora-r: --model {args.model!r} is already an adapter; it is trained as it is")
        self.initial_state = copy.deepcopy(self.model.state_dict())

    def val_score(self, candidate: torch.nn.Module) -> float:
        from gapfix.evaluation import evaluate

        return evaluate(candidate, self.tokenizer, self.val_examples, max_new_tokens=self.config.max_new_tokens,
                        backend=self.args.eval_backend, **self.scoring)["accuracy"]

    def make_base(self, seed: int) -> torch.nn.Module:
        from gapfix.models import tiny_llama
        from gapfix.train_cli import load_model_and_tokenizer

        args = self.args
        if self.built and args.model == "tiny":
            return self.with_lora(tiny_llama(self.tokenizer, seed=seed), seed)
        if self.built:
            fresh, _ = load_model_and_tokenizer(args.model, args.train, "sdpa", seed, args.tokenizer,
                                                args.vocab_size)
            return self.with_lora(fresh, seed)
        if args.lora_r is not None and hasattr(self.model, "peft_config"):
            self.model = self.model.unload()  # the previous seed's adapter removed: the plain base again
        self.model.load_state_dict(self.initial_state)
        return self.with_lora(self.model, seed)

    def with_lora(self, base: torch.nn.Module, seed: int) -> torch.nn.Module:
        """With --lora-r: `base` frozen under a fresh LoRA adapter, its initial weights drawn from seed
        (every method of a seed starts from the same adapter)."""
        args = self.args
        if args.lora_r is None:
            return base
        import torch

        from gapfix.models import apply_lora

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapted = apply_lora(base, r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets,
                                 dropout=args.lora_dropout)
        if base is self.model:
            self.model = adapted
        return adapted

    def evaluate_run(self, trained: torch.nn.Module) -> Dict[str, Any]:
        from gapfix.evaluation import evaluate_model

        report = evaluate_model(trained, self.tokenizer, self.eval_examples, **self.scoring,
                                max_new_tokens=self.config.max_new_tokens, backend=self.args.eval_backend)
        scores = {k: v for k, v in report["per_example"].items() if k in self.KEEP}
        scores["_generations"] = report["generations"]
        scores["_generation"] = report["generation"]
        scores["_phase_seconds"] = report["phase_seconds"]
        return scores
