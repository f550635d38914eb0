"""`gapfix demo`: the methods compared on the bundled math task, on a CPU, in minutes.

1. Writes the task's train/test/hard splits (gapfix.data.math_task) into --out.
2. Builds a tiny Llama (RoPE) and a word-level tokenizer locally, and trains it
   with SFT until its loss has flattened: the base every method continues from.
3. Continues from that base with equal extra training steps as
   (a) more SFT, (b) BASH, (c) RAC; each method's offline phase (prediction
   pass, generation) is extra wall time, reported per phase.
4. Evaluates each by greedy generation: accuracy on test and on the harder
   split (more steps than training), and recovery after an injected error
   (the first step's result made wrong; does the model still reach the right
   final answer?). Embedding distances to the references where a local
   sentence-embedding model is installed.

Prints a table, writes results.json and results.png into --out. --seeds N
repeats everything with N seeds and reports mean and standard deviation.
"""
import copy
import json
import os
import statistics
import time

# The demo's recipe. Each method gets the same number of extra optimizer steps.
RECIPE = dict(
    train_problems=20000, test_problems=500, hard_problems=500,
    hidden_size=128, num_layers=2, num_heads=4,
    batch_size=64, base_steps=2000, base_lr=3e-3,
    extra_steps=300, iterations=2, extra_lr=1e-3,
    # BASH: predictions sampled at temperature 2, so that a mixed-in token is often a
    # plausible wrong value (at temperature 1 the converged model's samples are
    # almost always the reference token and nothing changes)
    beta=0.3, bash_mode="sample", bash_temperature=2.0,
    # BASH predicts 4096 examples per iteration and trains ~2.3 epochs on them (fresh masks
    # every step): the prediction pass stays near a fifth of the iteration
    bash_rows=4096,
    rac_mode="path", rac_temperature=1.0, rac_prompts=1500, rac_sft_ratio=1.0,
    max_new_tokens=48,
)
QUICK = dict(train_problems=400, test_problems=24, hard_problems=12, base_steps=12,
             extra_steps=4, iterations=2, rac_prompts=16, bash_rows=16, batch_size=16, hidden_size=32,
             num_heads=2)
METHODS = ("sft", "bash", "rac")


def configure(parser):
    parser.add_argument("--out", default="gapfix-demo", help="output folder")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests use it)")
    parser.add_argument("--fused", type=lambda s: s.lower() != "false", default=True,
                        help="false: every op's PyTorch reference")
    parser.add_argument("--backend", default="hf", help="generation backend: hf, vllm or auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the demo's model is too small to gain "
                             "from more, and extra threads only contend)")
    for key, value in RECIPE.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                            help=f"default {value}")


def recipe_from_args(args) -> dict:
    recipe = dict(RECIPE)
    if args.quick:
        recipe.update(QUICK)
    for key in RECIPE:
        if getattr(args, key, None) is not None:
            recipe[key] = getattr(args, key)
    return recipe


def run_demo(out, *, recipe=RECIPE, seeds=1, fused=True, backend="hf", log=print) -> dict:
    from gapfix.data import load_examples, read_jsonl
    from gapfix.data.math_task import math_tokenizer, write_splits
    from gapfix.evaluation import embedding_model, evaluate, evaluate_recovery
    from gapfix.models import tiny_llama
    from gapfix.trainer import TrainConfig, train

    os.makedirs(out, exist_ok=True)
    paths = write_splits(os.path.join(out, "data"), train=recipe["train_problems"],
                         test=recipe["test_problems"], hard=recipe["hard_problems"])
    tokenizer = math_tokenizer()
    train_examples = load_examples(paths["train"], tokenizer)
    test_examples = load_examples(paths["test"], tokenizer)
    hard_examples = load_examples(paths["hard"], tokenizer)
    test_problems = read_jsonl(paths["test"])
    embed = embedding_model()

    def evaluate_all(model):
        test = evaluate(model, tokenizer, test_examples, max_new_tokens=recipe["max_new_tokens"],
                        backend=backend, return_answers=True)
        hard = evaluate(model, tokenizer, hard_examples, max_new_tokens=recipe["max_new_tokens"],
                        backend=backend)
        recovery = evaluate_recovery(model, tokenizer, test_problems,
                                     max_new_tokens=recipe["max_new_tokens"], backend=backend)
        scores = {"test": test["accuracy"], "hard": hard["accuracy"],
                  "recovery": recovery["recovery"], "carried": recovery["carried"]}
        if embed is not None:
            from gapfix.evaluation import embedding_distances

            distances = embedding_distances(test["answers"], [p["response"] for p in test_problems], embed)
            scores["embedding_distance"] = statistics.fmean(distances)
            scores["_distances"] = distances
        return scores

    common = dict(batch_size=recipe["batch_size"], max_new_tokens=recipe["max_new_tokens"],
                  fused=fused, progress=False, generation_backend=backend, log_every=20)
    runs = []
    for seed in range(seeds):
        seed_dir = os.path.join(out, f"seed{seed}")
        model = tiny_llama(tokenizer, hidden_size=recipe["hidden_size"], num_layers=recipe["num_layers"],
                           num_heads=recipe["num_heads"], max_position_embeddings=256, seed=seed)
        started = time.perf_counter()
        train(model, tokenizer, train_examples, TrainConfig(
            method="sft", steps_per_iteration=recipe["base_steps"], lr=recipe["base_lr"],
            warmup_steps=min(100, recipe["base_steps"] // 10), seed=seed,
            out_dir=os.path.join(seed_dir, "base"), **common), resume=False)
        base_seconds = time.perf_counter() - started
        base_scores = evaluate_all(model)
        log(f"seed {seed}: SFT base in {base_seconds:.0f} s: " + _format(base_scores))
        runs.append({"seed": seed, "method": "base", "seconds": {"train": base_seconds}, **base_scores})
        base_state = copy.deepcopy(model.state_dict())
        for method in METHODS:
            model.load_state_dict(base_state)
            config = TrainConfig(
                method=method, iterations=recipe["iterations"],
                steps_per_iteration=max(1, recipe["extra_steps"] // recipe["iterations"]),
                lr=recipe["extra_lr"], warmup_steps=0, seed=seed,
                beta=recipe["beta"], bash_mode=recipe["bash_mode"],
                bash_temperature=recipe["bash_temperature"], bash_rows=recipe["bash_rows"],
                rac_mode=recipe["rac_mode"],
                rac_temperature=recipe["rac_temperature"], rac_prompts=recipe["rac_prompts"],
                rac_sft_ratio=recipe["rac_sft_ratio"], out_dir=os.path.join(seed_dir, method), **common)
            result = train(model, tokenizer, train_examples, config, resume=False)
            scores = evaluate_all(model)
            log(f"seed {seed}: {method:<4} offline {result.phase_seconds['offline']:5.1f} s, "
                f"train {result.phase_seconds['train']:5.1f} s: " + _format(scores))
            runs.append({"seed": seed, "method": method, "seconds": dict(result.phase_seconds), **scores})
    summary = summarize(runs)
    results = {"recipe": recipe, "seeds": seeds, "fused": fused, "summary": summary,
               "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    log(table(summary))
    plot(runs, os.path.join(out, "results.png"))
    return results


_METRICS = ("test", "hard", "recovery", "carried", "embedding_distance")


def summarize(runs) -> dict:
    summary = {}
    for method in ("base",) + METHODS:
        mine = [r for r in runs if r["method"] == method]
        entry = {}
        for metric in _METRICS:
            values = [r[metric] for r in mine if metric in r]
            if values:
                entry[metric] = {"mean": statistics.fmean(values),
                                 "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        for phase in ("offline", "train"):
            values = [r["seconds"].get(phase, 0.0) for r in mine]
            entry[f"{phase}_seconds"] = statistics.fmean(values)
        summary[method] = entry
    return summary


def _format(scores):
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if not k.startswith("_"))


def table(summary) -> str:
    header = f"{'method':<8}{'test':>14}{'hard':>14}{'recovery':>14}{'carried':>14}{'offline s':>11}{'train s':>9}"
    lines = [header, "-" * len(header)]
    for method, entry in summary.items():
        cells = []
        for metric in ("test", "hard", "recovery", "carried"):
            m = entry.get(metric)
            cells.append(f"{100 * m['mean']:7.1f} ±{100 * m['std']:4.1f}" if m else f"{'-':>12}")
        lines.append(f"{method:<8}" + "".join(f"{c:>14}" for c in cells)
                     + f"{entry['offline_seconds']:>11.1f}{entry['train_seconds']:>9.1f}")
    return "\n".join(lines)


def plot(runs, path):
    """Accuracy bars per method and, where embeddings exist, the violin of distances."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = ("base",) + METHODS
    with_distances = any("_distances" in r for r in runs)
    fig, axes = plt.subplots(1, 2 if with_distances else 1, figsize=(11 if with_distances else 6, 4))
    axes = axes if with_distances else [axes]
    width = 0.2
    for i, metric in enumerate(("test", "hard", "recovery")):
        means = [statistics.fmean([r[metric] for r in runs if r["method"] == m]) for m in methods]
        axes[0].bar([x + (i - 1) * width for x in range(len(methods))], [100 * v for v in means],
                    width, label=metric)
    axes[0].set_xticks(range(len(methods)), methods)
    axes[0].set_ylabel("% correct")
    axes[0].set_title("greedy accuracy (mean over seeds)")
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    if with_distances:
        data = [sum((r["_distances"] for r in runs if r["method"] == m), []) for m in methods]
        axes[1].violinplot(data, showmedians=True)
        axes[1].set_xticks(range(1, len(methods) + 1), methods)
        axes[1].set_title("embedding distance to the reference answer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args) -> int:
    for flag, value in (("--threads", args.threads), ("--seeds", args.seeds)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo prints its own progress
    import torch

    torch.set_num_threads(args.threads)
    recipe = recipe_from_args(args)
    started = time.perf_counter()
    run_demo(args.out, recipe=recipe, seeds=args.seeds, fused=args.fused, backend=args.backend)
    print(f"demo finished in {time.perf_counter() - started:.0f} s; results in {args.out}")
    return 0
