"""`gapfix demo`: `gapfix compare` on the bundled math task and a tiny model, on a CPU.

1. Writes the task's train/test/hard splits (gapfix.data.math_task) into --out.
2. Builds a tiny Llama (RoPE) and a word-level tokenizer locally, and trains it
   with SFT until its loss has flattened: the base every method continues from.
3. Continues from that base with equal extra training steps as
   (a) more SFT, (b) BASH, (c) RAC, and the BASH noise control (random tokens
   mixed in at the same beta); each method's offline phase (prediction pass,
   generation) is extra wall time, reported per phase. The recipe is
   gapfix.recipes' "demo" (`gapfix train --recipe demo` trains with it).
4. Evaluates each by greedy generation: accuracy on test and on the harder
   split (more steps than training), recovery after an injected error (the
   first step's result made wrong; does the model still reach the right final
   answer?), teacher-forced vs free-running agreement, and embedding distances
   to the references where a local sentence-embedding model is installed.

Prints the table and each method's difference to continued SFT with its 95%
bootstrap interval (gapfix.compare), writes results.json, results.md and
results.png into --out. --seeds N repeats everything with N seeds.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from gapfix.recipes import RECIPES

if TYPE_CHECKING:  # annotations only: torch loads where it is used
    import torch

_SHARED = RECIPES["demo"]
# The demo's recipe: the task and model sizes here, the training values shared with
# `gapfix train --recipe demo` (gapfix.recipes). Each method gets the same extra steps.
RECIPE = dict(
    train_problems=20000, test_problems=500, hard_problems=500,
    hidden_size=128, num_layers=2, num_heads=4,
    batch_size=_SHARED["batch_size"], base_steps=2000, base_lr=3e-3,
    extra_steps=300, iterations=_SHARED["iterations"], extra_lr=_SHARED["lr"],
    beta=_SHARED["beta"], bash_mode=_SHARED["bash_mode"], bash_temperature=_SHARED["bash_temperature"],
    bash_rows=_SHARED["bash_rows"],
    rac_mode=_SHARED["rac_mode"], rac_temperature=_SHARED["rac_temperature"],
    rac_prompts=_SHARED["rac_prompts"], rac_sft_ratio=_SHARED["rac_sft_ratio"],
    max_new_tokens=_SHARED["max_new_tokens"],
)
QUICK = dict(train_problems=400, test_problems=24, hard_problems=12, base_steps=12,
             extra_steps=4, iterations=2, rac_prompts=16, bash_rows=16, batch_size=16, hidden_size=32,
             num_heads=2)
METHODS = ("sft", "bash", "rac")
ROWS = ("base",) + METHODS + ("bash_noise",)
ANSWER_REGEX = r"answer (\d+)\s*$"


# `gapfix demo --recipe smollm2`: `gapfix compare` on the pretrained SmolLM2-135M-Instruct
# (gapfix[real]) with a LoRA adapter, on the math task as chat turns. Sized to finish one seed well
# inside half an hour on a 2-core CPU (12 minutes measured; docs/real-model.md has the costs): 192 training
# chats seen per method, 48 test chats, vLLM generation where vllm is installed (2.4x faster than
# transformers' generate on 64 prompts here).
SMOLLM2_RECIPE = dict(
    train_problems=2000, test_problems=48, extra_steps=24, iterations=2, batch_size=8, lr=1e-3,
    lora_r=16, beta=0.2, bash_rows=96, rac_prompts=64, rac_sft_ratio=1.0, max_new_tokens=64,
)
SMOLLM2_QUICK = dict(train_problems=64, test_problems=4, extra_steps=2, iterations=1, batch_size=2,
                     bash_rows=4, rac_prompts=4, max_new_tokens=40)
SMOLLM2_INSTRUCTION = ("Work out the arithmetic step by step, one operation per step written as "
                       "'a + b = c ;', and end with 'answer' and the final value.")


def chat_record(problem: dict) -> dict:
    """A math-task problem as one user turn and one assistant turn (its `final` kept for scoring)."""
    return {"messages": [{"role": "user", "content": f"{SMOLLM2_INSTRUCTION}\n{problem['prompt']}"},
                         {"role": "assistant", "content": problem["response"]}],
            "final": problem["final"]}


def write_chat_splits(folder: str, *, train: int, test: int) -> dict:
    """The math task's train and test splits as chat JSONL files in folder: {split: path}."""
    from gapfix.data.math_task import make_split

    os.makedirs(folder, exist_ok=True)
    train_problems = make_split("train", train)
    splits = {"train": train_problems,
              "test": make_split("test", test, exclude=[p["prompt"] for p in train_problems])}
    paths = {}
    for name, problems in splits.items():
        paths[name] = os.path.join(folder, f"{name}.chat.jsonl")
        with open(paths[name] + ".tmp", "w") as f:
            for problem in problems:
                f.write(json.dumps(chat_record(problem)) + "\n")
        os.replace(paths[name] + ".tmp", paths[name])
    return paths


def smollm2_compare_argv(out: str, recipe: dict, seeds: int, backend: str, threads: int) -> list:
    """The `gapfix compare` command line of the smollm2 recipe."""
    paths = write_chat_splits(os.path.join(out, "data"), train=recipe["train_problems"],
                              test=recipe["test_problems"])
    return ["compare", "--model", "smollm2-135m-instruct", "--train", paths["train"], "--eval", paths["test"],
            "--methods", "sft,bash,rac", "--seeds", str(seeds), "--extra-steps", str(recipe["extra_steps"]),
            "--iterations", str(recipe["iterations"]), "--batch-size", str(recipe["batch_size"]),
            "--lr", str(recipe["lr"]), "--warmup-steps", "0", "--lora-r", str(recipe["lora_r"]),
            "--beta", str(recipe["beta"]), "--bash-rows", str(recipe["bash_rows"]),
            "--rac-prompts", str(recipe["rac_prompts"]), "--rac-sft-ratio", str(recipe["rac_sft_ratio"]),
            "--max-new-tokens", str(recipe["max_new_tokens"]), "--generation-backend", backend,
            "--eval-backend", backend, "--scorer", "gapfix.data.math_task:score", "--threads", str(threads),
            "--out", out]


def run_smollm2(args: argparse.Namespace) -> int:
    from gapfix.cli import main

    recipe = dict(SMOLLM2_RECIPE)
    if args.quick:
        recipe.update(SMOLLM2_QUICK)
    backend = args.backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")
    argv = smollm2_compare_argv(args.out, recipe, args.seeds, backend, args.threads)
    print("gapfix " + " ".join(argv))
    started = time.perf_counter()
    code = main(argv)
    print(f"demo finished in {time.perf_counter() - started:.0f} s; results in {args.out}")
    return code


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="tiny", choices=["tiny", "smollm2"],
                        help="tiny: a tiny Llama trained here (default); smollm2: the pretrained "
                             "SmolLM2-135M-Instruct with LoRA, the math task as chat turns (gapfix[real])")
    parser.add_argument("--out", default="gapfix-demo", help="output folder")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests use it)")
    parser.add_argument("--fused", type=lambda s: s.lower() != "false", default=True,
                        help="false: every op's PyTorch reference")
    parser.add_argument("--backend", default=None,
                        help="generation backend: hf, vllm or auto (default hf for the tiny recipe; for "
                             "smollm2 vllm where installed, else hf)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 for the tiny recipe: its model is too small to "
                             "gain from more, and extra threads only contend; 2 for smollm2)")
    for key, value in RECIPE.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                            help=f"default {value}")


def recipe_from_args(args: argparse.Namespace) -> dict:
    recipe = dict(RECIPE)
    if args.quick:
        recipe.update(QUICK)
    for key in RECIPE:
        if getattr(args, key, None) is not None:
            recipe[key] = getattr(args, key)
    return recipe


def run_demo(out: str, *, recipe: dict = RECIPE, seeds: int = 1, fused: bool = True, backend: str = "hf",
             log: Callable[[str], Any] = print, draws: int = 2000, methods: Sequence[str] = METHODS) -> dict:
    import dataclasses

    from gapfix.compare import run_compare, write_results
    from gapfix.data import math_task
    from gapfix.data.math_task import math_tokenizer, write_splits
    from gapfix.evaluation import embedding_model, evaluate, evaluate_model, evaluate_recovery
    from gapfix.models import tiny_llama
    from gapfix.trainer import TrainConfig

    os.makedirs(out, exist_ok=True)
    paths = write_splits(os.path.join(out, "data"), train=recipe["train_problems"],
                         test=recipe["test_problems"], hard=recipe["hard_problems"])
    tokenizer = math_tokenizer()
    train_examples, test_examples, hard_examples, test_problems = load_splits(paths, tokenizer, out)
    embed = embedding_model()
    budget = recipe["max_new_tokens"]

    def evaluate_all(model: torch.nn.Module) -> dict[str, list]:
        report = evaluate_model(model, tokenizer, test_examples, answer_regex=ANSWER_REGEX,
                                max_new_tokens=budget,
                                backend=backend, embed=embed, recovery=False, labels=False)
        hard = evaluate(model, tokenizer, hard_examples, max_new_tokens=budget, backend=backend,
                        return_answers=True, scorer=math_task.score)
        recovery = evaluate_recovery(model, tokenizer, test_problems, corrupt=math_task.corrupt_prefix,
                                     outcome=math_task.recovery_outcome, max_new_tokens=budget, backend=backend,
                                     return_per_example=True)
        per = report["per_example"]
        scores = {"test": per["accuracy"], "hard": [float(c) for c in hard["correct"]],
                  "recovery": recovery["per_example"]["recovery"],
                  "carried": recovery["per_example"]["carried"],
                  "teacher_forced": per["teacher_forced"], "free_running": per["free_running"]}
        if "embedding_distance" in per:
            scores["embedding_distance"] = per["embedding_distance"]
        return scores

    config = TrainConfig(
        method="sft", iterations=recipe["iterations"], lr=recipe["extra_lr"], warmup_steps=0,
        batch_size=recipe["batch_size"], max_new_tokens=budget, beta=recipe["beta"],
        bash_mode=recipe["bash_mode"], bash_temperature=recipe["bash_temperature"],
        bash_rows=recipe["bash_rows"],
        rac_mode=recipe["rac_mode"], rac_temperature=recipe["rac_temperature"],
        rac_prompts=recipe["rac_prompts"], rac_sft_ratio=recipe["rac_sft_ratio"],
        fused=fused, progress=False, generation_backend=backend, log_every=20)
    base_config = dataclasses.replace(config, lr=recipe["base_lr"],
                                      warmup_steps=min(100, recipe["base_steps"] // 10))

    def make_base(seed: int) -> torch.nn.Module:
        return tiny_llama(tokenizer, hidden_size=recipe["hidden_size"], num_layers=recipe["num_layers"],
                          num_heads=recipe["num_heads"], max_position_embeddings=256, seed=seed)

    analysis = run_compare(make_base, tokenizer, train_examples, evaluate=evaluate_all, methods=methods,
                           seeds=seeds, extra_steps=recipe["extra_steps"], config=config,
                           base_steps=recipe["base_steps"], base_config=base_config, out=out, log=log,
                           draws=draws)
    summary = summarize(analysis)
    runs = [{"seed": r["seed"], "method": r["method"], "seconds": r["seconds"],
             **{k: _mean(v) for k, v in r["per_example"].items()}} for r in analysis["runs"]]
    write_results(analysis, out, {"recipe": recipe, "seeds": seeds, "fused": fused})
    # results.json in the demo's own form: summary[method][metric] = {mean, std}, runs with means
    from gapfix.evaluation import _finite

    path = os.path.join(out, "results.json")
    with open(path) as f:
        document = json.load(f)
    document.update(summary=_finite(summary), runs=_finite(runs), comparison=document.pop("differences"))
    with open(path + ".tmp", "w") as f:
        json.dump(document, f, indent=2)
    os.replace(path + ".tmp", path)
    log(table(summary))
    log("")
    log(difference_table(analysis))
    return {"recipe": recipe, "seeds": seeds, "fused": fused, "summary": summary, "runs": runs,
            "comparison": analysis["differences"]}


def load_splits(paths: dict, tokenizer: Any, out: str) -> tuple:
    """(train set as a memory-mapped datasets.Dataset, test and hard sets as ExampleTables, the test
    records): the splits tokenized by `gapfix train`'s loader into <out>/data_cache. The same
    examples, in the same order, as gapfix.data.load_examples gives (tests/test_demo.py checks it),
    so the recorded results stay reproducible."""
    from gapfix.data.arrow import ExampleTable
    from gapfix.data.loading import data_cache_dir, load_data

    cache = data_cache_dir(out)
    train, test, hard = (load_data(paths[name], tokenizer, cache_dir=cache)[0] for name in ("train", "test", "hard"))
    test_examples = ExampleTable(test)
    return train, test_examples, ExampleTable(hard), [example.record for example in test_examples]


_METRICS = ("test", "hard", "recovery", "carried", "teacher_forced", "free_running", "embedding_distance")


def _mean(values: Sequence[float]) -> float | None:
    import math
    import statistics

    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def summarize(analysis: dict) -> dict:
    """summary[method] = {metric: {mean, std}, offline_seconds, train_seconds} (the demo's form)."""
    summary = {}
    for method, entry in analysis["summary"].items():
        summary[method] = {m: entry["metrics"][m] for m in _METRICS if m in entry["metrics"]}
        summary[method]["offline_seconds"] = entry["offline_seconds"]
        summary[method]["train_seconds"] = entry["train_seconds"]
    return summary


def difference_table(analysis: dict) -> str:
    """Each run's difference to continued SFT (points), with its 95% interval, per task metric."""
    metrics = ("test", "hard", "recovery", "carried")
    header = f"{'vs sft':<12}" + "".join(f"{m:>26}" for m in metrics)
    lines = [header, "-" * len(header)]
    for method in analysis["summary"]:
        diffs = analysis["differences"].get(f"{method} - sft")
        if not diffs:
            continue
        cells = []
        for metric in metrics:
            d = diffs.get(metric)
            cells.append("-" if d is None else
                         f"{100 * d['mean']:+5.1f} [{100 * d['low']:+5.1f},{100 * d['high']:+5.1f}]"
                         + ("  " if d["verdict"] == "no difference detected" else " *"))
        lines.append(f"{method:<12}" + "".join(f"{c:>26}" for c in cells))
    lines.append("95% bootstrap intervals over seeds and test problems; * the interval excludes 0")
    return "\n".join(lines)


def table(summary: dict) -> str:
    header = (f"{'method':<12}{'test':>14}{'hard':>14}{'recovery':>14}{'carried':>14}"
              f"{'offline s':>11}{'train s':>9}")
    lines = [header, "-" * len(header)]
    for method, entry in summary.items():
        cells = []
        for metric in ("test", "hard", "recovery", "carried"):
            m = entry.get(metric)
            cells.append(f"{100 * m['mean']:7.1f} ±{100 * m['std']:4.1f}" if m else f"{'-':>12}")
        lines.append(f"{method:<12}" + "".join(f"{c:>14}" for c in cells)
                     + f"{entry['offline_seconds']:>11.1f}{entry['train_seconds']:>9.1f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.threads is None:
        args.threads = 2 if args.recipe == "smollm2" else 1
    for flag, value in (("--threads", args.threads), ("--seeds", args.seeds)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    from gapfix.threads import apply_threads, quiet_third_party

    if args.recipe == "smollm2":
        return run_smollm2(args)
    quiet_third_party()  # the demo prints its own progress
    apply_threads(args.threads)
    recipe = recipe_from_args(args)
    started = time.perf_counter()
    run_demo(args.out, recipe=recipe, seeds=args.seeds, fused=args.fused, backend=args.backend or "hf")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; results in {args.out}")
    return 0
