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

The report gives each metric's mean ± sd over seeds, and for every run the
paired difference to continued SFT (same seed, same eval example) with a 95%
bootstrap interval: eval examples and seeds are resampled with replacement
(see paired_bootstrap), the interval is the 2.5 and 97.5 percentiles of the
resampled mean difference. An interval that covers 0 is "no difference detected"; it does
not show the methods equal, only that this many seeds and examples cannot tell
them apart. With one seed the interval covers example noise only.

--base-steps N first trains the base by SFT for N steps (per seed; needed for
--model tiny or a config.json); --val then picks, among --base-checkpoints
equally spaced points of that run, the one with the best validation accuracy.
With a trained --model folder, --val picks the best of its saved checkpoints
(a gapfix train --out folder: checkpoints/*/model and final).

Writes results.json, results.png and results.md into --out.
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
    """Mean and bootstrap interval of paired differences d[seed][example].

    The design is crossed (every seed is scored on the same eval examples), so
    d = mean + seed effect + example effect + residual. Each draw resamples the
    example effects (column means, which carry the residual noise too) and the
    seed effects (row means) with replacement; the seed effects are shrunk by the
    share of their spread that is residual noise already counted in the columns,
    so that noise is not counted twice (resampling rows and columns of the raw
    table would be about twice too wide where the seeds agree). With one seed
    only examples are resampled. NaN entries (an example without a probe) are
    left out of the means.
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
    if d.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
    seeds, examples = d.shape
    mean = float(np.nanmean(d))
    rows = np.nanmean(d, axis=1) - mean
    cols = np.nanmean(d, axis=0) - mean
    shrink = 0.0
    if seeds > 1:
        row_var = float(rows.var(ddof=1))
        resid = d - mean - rows[:, None] - cols[None, :]
        n_resid = int(np.isfinite(resid).sum())
        dof = max(1, (seeds - 1) * (examples - 1)) * n_resid / d.size
        resid_var = float(np.nansum(resid ** 2)) / dof if examples > 1 else 0.0
        if row_var > 0:
            shrink = math.sqrt(max(0.0, 1.0 - resid_var / examples / row_var))
    rng = np.random.default_rng(seed)
    means = (mean + cols[rng.integers(0, examples, size=(draws, examples))].mean(axis=1)
             + shrink * rows[rng.integers(0, seeds, size=(draws, seeds))].mean(axis=1))
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"mean": mean, "low": float(low), "high": float(high)}


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


def analyse(runs: List[dict], *, reference: str = "sft", draws: int = 2000) -> dict:
    """Per method and metric: mean ± sd over seeds; differences to `reference` with intervals.

    runs: {"seed", "method", "per_example": {metric: [value per eval example]}, "seconds"}.
    Also compares bash with bash_noise and every method with the base where both ran.
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
        for phase in ("offline", "train"):
            entry[f"{phase}_seconds"] = statistics.fmean([r["seconds"].get(phase, 0.0) for r in mine] or [0.0])
        summary[method] = entry
    pairs = [(m, reference) for m in methods if m != reference]
    if "bash" in methods and "bash_noise" in methods:
        pairs.append(("bash", "bash_noise"))
    pairs += [(m, "base") for m in methods if m not in ("base", reference) and "base" in methods]
    differences = {}
    for method, against in pairs:
        if against not in methods:
            continue
        common = [s for s in seeds if (method, s) in by and (against, s) in by]
        result = {}
        for metric in metrics:
            table = []
            for s in common:
                a = by[(method, s)]["per_example"].get(metric)
                b = by[(against, s)]["per_example"].get(metric)
                if a is None or b is None or len(a) != len(b):
                    table = None
                    break
                table.append([x - y for x, y in zip(a, b)])
            if not table:
                continue
            interval = paired_bootstrap(table, draws=draws, seed=len(differences))
            interval["verdict"] = verdict(interval, DIRECTION.get(metric, 1),
                                          "continued SFT" if against == "sft" else against)
            result[metric] = interval
        differences[f"{method} - {against}"] = result
    failed = [{"seed": r["seed"], "method": r["method"], "why": r["failed"]} for r in runs if r.get("failed")]
    for method in methods:
        summary[method]["failed_seeds"] = [f["seed"] for f in failed if f["method"] == method]
    return {"summary": summary, "differences": differences, "metrics": metrics, "seeds": seeds,
            "reference": reference, "failed": failed}


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
    for method in methods:
        if method not in ("sft", "bash", "rac"):
            raise ValueError(f"methods: {method!r} is not one of sft, bash, rac")
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
    runs_to_do = [("base", None)] + [(m, m) for m in methods]
    if "bash" in methods:
        runs_to_do.append(("bash_noise", "bash"))
    runs = []
    for seed in range(seeds):
        seed_dir = os.path.join(out, f"seed{seed}") if out else None
        model = make_base(seed)
        base_seconds, picked = 0.0, None
        if base_steps:
            base_seconds, picked = _train_base(model, tokenizer, train_examples, base_steps, base_config,
                                               seed, select_base, base_checkpoints, seed_dir, log)
        base_state = copy.deepcopy(model.state_dict())
        for name, method in runs_to_do:
            model.load_state_dict(base_state)
            seconds = {"offline": 0.0, "train": base_seconds if name == "base" else 0.0}
            if method is not None:
                run_config = dataclasses.replace(
                    config, method=method, steps_per_iteration=extra_steps // config.iterations,
                    seed=seed, out_dir=os.path.join(seed_dir, name) if seed_dir else None)
                if name == "bash_noise":
                    run_config.bash_mode = "random"
                try:
                    result = train(model, tokenizer, train_examples, run_config, resume=False)
                except NonFiniteTrainingError as err:  # a diverged run is reported failed, never scored
                    runs.append(failed_run(seed, name, err, log))
                    continue
                seconds = dict(result.phase_seconds)
            started = time.perf_counter()
            per_example = evaluate(model)
            seconds["eval"] = time.perf_counter() - started
            run = {"seed": seed, "method": name, "seconds": seconds, "per_example": per_example}
            if name == "base" and picked is not None:
                run["base_checkpoint"] = picked
            runs.append(run)
            means = ", ".join(f"{k} {_nanmean(v):.3f}" for k, v in per_example.items())
            log(f"seed {seed}: {name:<10} offline {seconds['offline']:6.1f} s, "
                f"train {seconds['train']:6.1f} s: "
                + means)
    analysis = analyse(runs, draws=draws)
    analysis["runs"] = runs
    return analysis


def failed_run(seed: int, method: str, error: Exception, log: Callable[[str], Any]) -> dict:
    """The record of a run whose training failed (diverged): no metrics, so that it is left out
    of every mean and difference, and `failed` saying why (analyse lists it, markdown marks it)."""
    log(f"seed {seed}: {method:<10} FAILED: {error}")
    return {"seed": seed, "method": method, "seconds": {}, "per_example": {}, "failed": str(error)}


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


def _cell(stats: Optional[Dict[str, float]], percent: bool) -> str:
    if stats is None:
        return "-"
    scale = 100 if percent else 1
    digits = 1 if percent else 3
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


_PERCENT = {"accuracy", "test", "hard", "teacher_forced", "free_running", "recovery_ends_right", "recovery",
            "carried"}


def markdown(analysis: dict) -> str:
    """One table per metric: mean ± sd over seeds, the difference to continued SFT with its
    95% interval, and the verdict; then the time per phase."""
    lines = []
    reference = analysis["reference"]
    for metric in analysis["metrics"]:
        percent = metric in _PERCENT
        unit = " (%)" if percent else ""
        better = "higher" if DIRECTION.get(metric, 1) > 0 else "lower"
        lines += [f"### {metric}{unit} ({better} is better)", "",
                  f"| method | mean ± sd | difference to {reference} (95% CI) | verdict |",
                  "| --- | --- | --- | --- |"]
        for method, entry in analysis["summary"].items():
            diff = analysis["differences"].get(f"{method} - {reference}", {}).get(metric)
            if diff is None:
                cells = ("reference", "") if method == reference else ("-", "")
            else:
                scale = 100 if percent else 1
                cells = (f"{scale * diff['mean']:+.2f} "
                         f"[{scale * diff['low']:+.2f}, {scale * diff['high']:+.2f}]",
                         diff["verdict"])
            failed = entry.get("failed_seeds")
            name = _label(method) + (f" (FAILED: seed {', '.join(map(str, failed))})" if failed else "")
            lines.append(f"| {name} | {_cell(entry['metrics'].get(metric), percent)} | "
                         f"{cells[0]} | {cells[1]} |")
        lines.append("")
    lines += ["| method | offline s | train s |", "| --- | --- | --- |"]
    for method, entry in analysis["summary"].items():
        lines.append(f"| {_label(method)} | {entry['offline_seconds']:.1f} | {entry['train_seconds']:.1f} |")
    seeds = len(analysis["seeds"])
    lines += ["", f"{seeds} seed(s); intervals: paired bootstrap over seeds and eval examples."]
    for failure in analysis.get("failed", []):
        lines.append(f"FAILED: {failure['method']} seed {failure['seed']}, left out of every row above: "
                     f"{failure['why']}")
    return "\n".join(lines)


def plot(analysis: dict, path: str) -> Optional[str]:
    """Per metric, each run's difference to continued SFT with its 95% interval."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    reference = analysis["reference"]
    metrics = analysis["metrics"]
    methods = [m for m in analysis["summary"] if m != reference]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for y, method in enumerate(methods):
            diff = analysis["differences"].get(f"{method} - {reference}", {}).get(metric)
            if diff is None or not math.isfinite(diff["low"]):
                continue
            color = "tab:gray" if diff["verdict"] == "no difference detected" else "tab:blue"
            error = [[diff["mean"] - diff["low"]], [diff["high"] - diff["mean"]]]
            ax.errorbar([diff["mean"]], [y], xerr=error,
                        fmt="o", color=color, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_title(f"{metric} - {reference}", fontsize=9)
    fig.suptitle("difference to continued SFT, 95% bootstrap interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(analysis: dict, out: str, extra: Optional[dict] = None) -> dict:
    """results.json, results.md and results.png (where matplotlib is installed) into out."""
    from gapfix.evaluation import _finite

    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "results.json"), "md": os.path.join(out, "results.md")}
    png = plot(analysis, os.path.join(out, "results.png"))
    notes = [] if png else ["results.png skipped: matplotlib is not installed"]
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

    from gapfix.eval_cli import add_threads_flag
    from gapfix.recipes import RECIPES
    from gapfix.train_cli import add_config_flags

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 2)[2]
    parser.add_argument("--model", required=True,
                        help='the base: a local model folder (or a gapfix train --out folder with --val), '
                             'a config.json, or "tiny" (these two need --base-steps)')
    parser.add_argument("--train", required=True,
                        help="prompt/response or chat records (JSONL, Parquet or a saved datasets folder, "
                             "as gapfix train --train takes; tokenized into a cache under --out/data_cache)")
    parser.add_argument("--eval", required=True, help="held-out records every run is evaluated on")
    parser.add_argument("--val", default=None, help="validation records: picks the base's best checkpoint")
    parser.add_argument("--methods", default="sft,bash,rac",
                        help="comma-separated, must include sft (default %(default)s)")
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
    parser.add_argument("--out", default="gapfix-compare", help="output folder (default %(default)s)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N eval examples")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws (default %(default)s)")
    parser.add_argument("--tokenizer", default="bpe", choices=["bpe", "word", "char"],
                        help="for --model tiny / config.json: the tokenizer trained on --train (default bpe)")
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary cap (default 512)")
    parser.add_argument("--max-length", type=int, default=None, help="drop --train examples longer than this")
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                        help="malformed data lines: stop, or skip them with a warning (default %(default)s)")
    add_threads_flag(parser)
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
    from gapfix.data.arrow import ExampleTable
    from gapfix.eval_cli import apply_threads, quiet_third_party
    from gapfix.evaluation import compile_answer_regex, evaluate, evaluate_model
    from gapfix.models import load_model, tiny_llama
    from gapfix.train_cli import (
        _is_table_source,
        config_values,
        data_cache_dir,
        load_data,
        load_model_and_tokenizer,
    )
    from gapfix.trainer import TrainConfig

    apply_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    regex = compile_answer_regex(args.answer_regex)
    values = config_values(args)
    values.update(method="sft", out_dir=None)
    config = TrainConfig(**values)
    config.validate()
    if not config.progress:
        quiet_third_party()
    built = args.model == "tiny" or (os.path.isfile(args.model) and args.model.endswith(".json"))
    if built and not args.base_steps:
        raise ValueError(f"--model {args.model}: a randomly initialised base needs --base-steps N "
                         "(SFT first)")

    for flag, path in (("--train", args.train), ("--eval", args.eval), ("--val", args.val)):
        if path is not None and not _is_table_source(path):
            check_input_file(path, flag)
    picked_path = None
    is_run_folder = os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "config.json"))
    if not built and is_run_folder:
        candidates = _checkpoint_candidates(args.model)
        if not candidates:
            raise ValueError(f"--model {args.model!r} holds neither config.json nor gapfix train checkpoints")
        picked_path = candidates[-1]
    else:
        candidates = []
    model, tokenizer = load_model_and_tokenizer(picked_path or args.model, args.train, "sdpa", 0,
                                                args.tokenizer, args.vocab_size, on_error=args.on_error)
    # memory-mapped under <out>/data_cache: training reads the train set a batch at a time, and the
    # evaluations read theirs through ExampleTables (a batch of rows decoded at a time)
    cache = dict(cache_dir=data_cache_dir(args.out), on_error=args.on_error)
    train_examples, _ = load_data(args.train, tokenizer, max_length=args.max_length, **cache)
    eval_examples = ExampleTable(load_data(args.eval, tokenizer, limit=args.eval_limit, **cache)[0])
    val_examples = ExampleTable(load_data(args.val, tokenizer, **cache)[0]) if args.val else None

    def val_score(candidate: torch.nn.Module) -> float:
        return evaluate(candidate, tokenizer, val_examples, max_new_tokens=config.max_new_tokens,
                        backend="hf", answer_regex=regex)["accuracy"]

    if val_examples is not None and len(candidates) > 1 and not args.base_steps:
        scored = []
        for path in candidates:
            candidate, _ = load_model(path)
            scored.append((val_score(candidate), path))
            print(f"base candidate {path}: validation accuracy {scored[-1][0]:.3f}")
        picked_path = max(scored)[1]
        model, _ = load_model(picked_path)
        print(f"base: {picked_path}")
    initial_state = copy.deepcopy(model.state_dict())

    def make_base(seed: int) -> torch.nn.Module:
        if built and args.model == "tiny":
            return tiny_llama(tokenizer, seed=seed)
        if built:
            fresh, _ = load_model_and_tokenizer(args.model, args.train, "sdpa", seed, args.tokenizer,
                                                args.vocab_size)
            return fresh
        model.load_state_dict(initial_state)
        return model

    def evaluate_run(trained: torch.nn.Module) -> Dict[str, list]:
        report = evaluate_model(trained, tokenizer, eval_examples, answer_regex=regex,
                                max_new_tokens=config.max_new_tokens, backend="hf")
        keep = ("accuracy", "teacher_forced", "free_running", "recovery_ends_right", "recovery_distance",
                "embedding_distance")
        return {k: v for k, v in report["per_example"].items() if k in keep}

    base_config = dataclasses.replace(config, lr=args.base_lr or config.lr)
    analysis = run_compare(
        make_base, tokenizer, train_examples, evaluate=evaluate_run, methods=methods, seeds=args.seeds,
        extra_steps=args.extra_steps, config=config, base_steps=args.base_steps, base_config=base_config,
        select_base=val_score if (val_examples is not None and args.base_steps) else None,
        base_checkpoints=args.base_checkpoints, out=args.out, draws=args.bootstrap)
    extra = {"command": {k: v for k, v in vars(args).items() if not k.startswith("_")},
             "config": dataclasses.asdict(config), "base": picked_path or args.model}
    paths = write_results(analysis, args.out, extra)
    print(markdown(analysis))
    print("wrote", ", ".join(paths.values()))
    return 0
