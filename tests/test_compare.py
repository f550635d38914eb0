"""gapfix.compare: bootstrap intervals, verdicts, the analysis of runs, and the command end to end."""
import json
import random

import numpy as np
import pytest

from gapfix.compare import analyse, markdown, paired_bootstrap, verdict


def test_bootstrap_interval_covers_zero_about_95_percent_when_there_is_no_difference():
    rng = np.random.default_rng(0)
    covered, trials = 0, 200
    for trial in range(trials):
        # 3 seeds x 60 examples; both methods right with probability 0.7: the true difference is 0
        a = (rng.random((3, 60)) < 0.7).astype(float)
        b = (rng.random((3, 60)) < 0.7).astype(float)
        interval = paired_bootstrap(a - b, draws=400, seed=trial)
        covered += interval["low"] <= 0 <= interval["high"]
    assert 0.88 <= covered / trials <= 0.995, covered / trials


def test_bootstrap_interval_excludes_zero_for_a_large_difference():
    rng = np.random.default_rng(1)
    a = (rng.random((3, 200)) < 0.9).astype(float)
    b = (rng.random((3, 200)) < 0.5).astype(float)
    interval = paired_bootstrap(a - b, draws=500)
    assert 0.3 < interval["low"] < interval["mean"] < interval["high"] < 0.5
    assert verdict(interval, +1) == "better than SFT" and verdict(interval, -1) == "worse than SFT"
    assert verdict({"mean": 0.01, "low": -0.02, "high": 0.03}) == "no difference detected"


def test_bootstrap_leaves_out_missing_values_and_checks_its_input():
    d = [[1.0, float("nan"), 1.0], [1.0, 1.0, float("nan")]]
    interval = paired_bootstrap(d, draws=50)
    assert interval["mean"] == interval["low"] == interval["high"] == 1.0
    with pytest.raises(ValueError, match="differences"):
        paired_bootstrap([1.0, 2.0])
    with pytest.raises(ValueError, match="draws"):
        paired_bootstrap([[1.0]], draws=0)


def test_bootstrap_resamples_seeds_too():
    """A difference that flips sign between seeds is not 'detected', however many examples."""
    d = np.concatenate([np.full((1, 500), 0.5), np.full((1, 500), -0.4), np.full((1, 500), 0.45)])
    interval = paired_bootstrap(d, draws=500)
    assert interval["low"] < 0 < interval["high"]


def _runs(effect, seeds=3, examples=80):
    rng = random.Random(0)
    runs = []
    for seed in range(seeds):
        for method, p in (("base", 0.6), ("sft", 0.6), ("bash", 0.6 + effect), ("bash_noise", 0.6)):
            runs.append({"seed": seed, "method": method, "seconds": {"offline": 1.0, "train": 2.0},
                         "per_example": {"accuracy": [float(rng.random() < p) for _ in range(examples)],
                                         "recovery_distance": [float(rng.randint(0, 3))
                                                               for _ in range(examples)]}})
    return runs


def test_analyse_reports_means_differences_and_controls():
    analysis = analyse(_runs(0.35), draws=300)
    assert set(analysis["summary"]) == {"base", "sft", "bash", "bash_noise"}
    acc = analysis["differences"]["bash - sft"]["accuracy"]
    assert acc["verdict"] == "better than continued SFT" and acc["low"] > 0
    assert "bash - bash_noise" in analysis["differences"] and "bash - base" in analysis["differences"]
    noise = analysis["differences"]["bash_noise - sft"]
    assert noise["recovery_distance"]["verdict"] == "no difference detected"
    table = markdown(analysis)
    assert "| bash | " in table and "base (no extra steps)" in table and "bash_noise (random tokens)" in table
    assert "(lower is better)" in table and "better than continued SFT" in table


def _copy_files(tmp_path):
    rng = random.Random(0)

    def record():
        s = "".join(rng.choice("abcd") for _ in range(3))
        return {"prompt": s + "=", "response": s + "#" + s[0]}

    paths = {}
    for name, count in (("train", 96), ("eval", 10), ("val", 8)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(record()) + "\n" for _ in range(count)))
    return paths


def test_compare_command_end_to_end(tmp_path, capsys):
    pytest.importorskip("transformers")
    from gapfix.cli import main

    files = _copy_files(tmp_path)
    out = tmp_path / "cmp"
    assert main(["compare", "--model", "tiny", "--tokenizer", "char", "--train", str(files["train"]),
                 "--eval", str(files["eval"]), "--val", str(files["val"]), "--methods", "sft,bash,rac",
                 "--seeds", "2", "--base-steps", "4", "--base-checkpoints", "2", "--extra-steps", "2",
                 "--batch-size", "8", "--max-new-tokens", "8", "--bash-rows", "8", "--rac-prompts", "8",
                 "--rac-temperature", "1", "--answer-regex", "#(\\w)", "--bootstrap", "200",
                 "--progress", "false", "--threads", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == {"base", "sft", "bash", "rac", "bash_noise"}
    runs = results["runs"]
    assert len(runs) == 2 * 5
    for method in ("sft", "bash", "rac", "bash_noise"):
        assert {r["seed"] for r in runs if r["method"] == method} == {0, 1}
        assert "accuracy" in results["differences"][f"{method} - sft"] if method != "sft" else True
    assert all("base_checkpoint" in r for r in runs if r["method"] == "base")
    for method in ("bash", "rac"):
        assert all(r["seconds"]["offline"] > 0 for r in runs if r["method"] == method)
    # equal extra steps: every continued run trained exactly --extra-steps
    for method in ("sft", "bash", "rac", "bash_noise"):
        lines = (out / "seed0" / method / "metrics.jsonl").read_text().splitlines()
        events = [json.loads(line) for line in lines]
        assert next(e for e in events if e["event"] == "summary")["steps"] == 2
    assert (out / "results.png").stat().st_size > 1000
    assert "### accuracy (%)" in (out / "results.md").read_text()
    assert "difference to sft" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["--methods", "bash,rac"], "include sft"),
    (["--methods", "sft,dpo"], "dpo"),
    (["--extra-steps", "3", "--iterations", "2"], "multiple of iterations"),
    (["--base-steps", "0"], "base-steps"),
    (["--answer-regex", "("], "answer_regex"),
])
def test_compare_command_bad_input(tmp_path, args, match):
    pytest.importorskip("transformers")
    from gapfix.cli import main

    files = _copy_files(tmp_path)
    base = {"--model": "tiny", "--train": str(files["train"]), "--eval": str(files["eval"]),
            "--extra-steps": "2", "--base-steps": "2", "--out": str(tmp_path / "x"), "--tokenizer": "char"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    with pytest.raises(ValueError, match=match):
        main(["--debug", "compare"] + [item for pair in base.items() for item in pair])


# ----------------------------------------------------------------------------- CLI flags


def test_every_computing_command_takes_threads():
    from gapfix.cli import build_parser

    parser = build_parser()
    for argv in (["train", "--model", "tiny", "--train", "t", "--out", "o"],
                 ["eval", "--model", "m", "--data", "d"],
                 ["compare", "--model", "m", "--train", "t", "--eval", "e", "--extra-steps", "2"], ["demo"],
                 ["generate", "--model", "m", "--prompts", "p", "--out", "o"], ["bench"]):
        assert parser.parse_args(argv + ["--threads", "3"]).threads == 3, argv[0]


def test_train_help_shows_every_flag_with_a_meaning_and_default(capsys):
    import dataclasses

    from gapfix.cli import build_parser
    from gapfix.trainer import TrainConfig

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    raw = capsys.readouterr().out
    entries = {}  # flag -> its help entry (argparse starts each with two spaces and the flag)
    for chunk in raw.split("\n  --")[1:]:
        entries["--" + chunk.split()[0]] = " ".join(chunk.split())
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("method", "out_dir"):
            continue
        flag = "--" + field.name.replace("_", "-")
        assert "(default" in entries[flag] and len(entries[flag].split()) > 4, flag
    text = " ".join(raw.split())
    # beta, and bash mode: the demo recipe mixes argmax predictions (sampling at temperature 2, its
    # earlier setting, measured as noise: docs/compare.md)
    assert "demo recipe 0.3" in text and "demo recipe argmax" in text


def test_train_recipe_demo_and_explicit_flags():
    from gapfix.cli import build_parser
    from gapfix.recipes import RECIPES
    from gapfix.train_cli import config_from_args

    parser = build_parser()
    base = ["train", "--model", "tiny", "--train", "t", "--out", "o"]
    plain = config_from_args(parser.parse_args(base))
    # rac_temperature's default is 1.0 (was 0.0): one set of defaults for gapfix train and gapfix.hf
    assert plain.beta == 0.2 and plain.rac_temperature == 1.0 and plain.iterations == 1
    demo = config_from_args(parser.parse_args(base + ["--recipe", "demo"]))
    for key, value in RECIPES["demo"].items():
        assert getattr(demo, key) == value, key
    override = config_from_args(parser.parse_args(base + ["--recipe", "demo", "--beta", "0.1",
                                                          "--iterations", "5", "--fused", "false"]))
    assert override.beta == 0.1 and override.iterations == 5 and override.fused is False
    assert override.bash_temperature == RECIPES["demo"]["bash_temperature"]


@pytest.mark.parametrize("kind, expected", [("word", ["12", " ", "+", " ", "7"]),
                                            ("char", ["1", "2", " ", "+"])])
def test_train_tokenizer_flag_for_a_tiny_model(tmp_path, kind, expected):
    pytest.importorskip("transformers")
    from gapfix.train_cli import load_model_and_tokenizer

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "12 + 7", "response": "19"}) + "\n")
    model, tokenizer = load_model_and_tokenizer("tiny", str(data), tokenizer=kind)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("12 + 7", add_special_tokens=False)["input_ids"])
    assert pieces[:len(expected)] == expected
    assert model.config.vocab_size == len(tokenizer)


def test_train_progress_false_prints_no_third_party_bars(tmp_path, capfd):
    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    from gapfix.cli import main

    files = _copy_files(tmp_path)
    hf_logging.enable_progress_bar()  # as in a fresh process
    try:
        assert main(["train", "--model", "tiny", "--tokenizer", "char", "--train", str(files["train"]),
                     "--steps-per-iteration", "1", "--batch-size", "4", "--progress", "false",
                     "--out", str(tmp_path / "run")]) == 0
        err = capfd.readouterr().err
        assert "Writing model shards" not in err and "it/s]" not in err, err[-500:]
    finally:
        hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- intervals with few seeds


def _coverage(seed_sd, *, seeds=3, examples=300, example_sd=0.15, trials=300):
    """How often the interval covers the true zero: two methods right with the same probability per
    example (example effects shared by both), each seed shifting the difference by N(0, seed_sd)."""
    rng = np.random.default_rng(7)
    covered, widths = 0, []
    for trial in range(trials):
        shift = rng.normal(0, seed_sd, seeds)[:, None]
        p = np.clip(0.7 + rng.normal(0, example_sd, examples), 0.05, 0.95)[None, :]
        a = (rng.random((seeds, examples)) < np.clip(p + shift / 2, 0, 1)).astype(float)
        b = (rng.random((seeds, examples)) < np.clip(p - shift / 2, 0, 1)).astype(float)
        interval = paired_bootstrap(a - b, draws=100, seed=trial)
        covered += interval["low"] <= 0 <= interval["high"]
        widths.append(interval["high"] - interval["low"])
    return covered / trials, float(np.mean(widths))


def test_interval_covers_a_true_zero_when_three_seeds_agree():
    coverage, width = _coverage(0.0)
    assert 0.9 <= coverage <= 0.995, coverage
    assert width < 0.2  # not so wide as to tell nothing: about 1.5x a normal interval's


def test_interval_covers_a_true_zero_when_three_seeds_disagree_by_several_points():
    """The reviewer's simulation: seed effects with sd 6 points, 300 examples, true mean 0 (the
    seed-resampling bootstrap covered 0 only 85% of the time)."""
    coverage, _ = _coverage(0.06)
    assert coverage >= 0.9, coverage
    coverage, _ = _coverage(0.12, examples=100)
    assert coverage >= 0.9, coverage


def test_interval_of_three_disagreeing_seeds_is_the_seed_level_t_interval():
    """Per-seed differences -10.7, -3.0, -18.3 points: a t-interval over the three seeds is about
    [-29.7, +8.4], and the interval is no narrower (the tool printed [-18.55, -3.17], 'worse')."""
    rng = np.random.default_rng(3)
    rows = []
    for mean in (-0.107, -0.030, -0.183):
        row = (rng.random(300) < 0.5).astype(float) - (rng.random(300) < 0.5).astype(float)
        rows.append(row - row.mean() + mean)
    interval = paired_bootstrap(rows)
    assert interval["low"] < -0.29 and interval["high"] > 0.08
    assert verdict(interval) == "no difference detected"
    assert interval["seed_share"] > 0.5


def test_t_quantile_matches_the_tables():
    from gapfix.compare import t_quantile

    for dof, expected in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042), (1e9, 1.960)):
        assert t_quantile(0.975, dof) == pytest.approx(expected, abs=1e-3)


# ----------------------------------------------------------------------------- the table states the finding


def test_table_states_every_comparison_a_summary_and_each_metric_at_its_precision():
    runs = _runs(0.0, seeds=3, examples=200)
    for run in runs:  # a metric of small values: its intervals must not print as +0.00 [+0.00, +0.00]
        draw = random.Random(f"{run['method']}/{run['seed']}")
        run["per_example"]["embedding_distance"] = [0.001 * draw.random() for _ in range(200)]
        if run["method"] == "base":
            run["per_example"]["accuracy"] = [1.0 if i % 2 else 0.0 for i in range(200)]
    analysis = analyse(runs, draws=200)
    table = markdown(analysis)
    assert "| bash - bash_noise |" in table and "| bash - base |" in table and "| base (no extra steps) | " in table
    assert "**accuracy** against continued SFT:" in table and "**embedding_distance** against" in table
    assert "[+0.000, +0.000]" not in table and "[+0.00, +0.00]" not in table
    assert "sd 0 for base" in table  # the same model on every seed, explained


def test_table_recommends_more_seeds_where_seeds_disagree():
    runs = _runs(0.0, seeds=3, examples=200)
    for run in runs:
        if run["method"] == "bash":
            shift = {0: 0.3, 1: -0.3, 2: 0.0}[run["seed"]]
            run["per_example"]["accuracy"] = [min(1.0, max(0.0, v + shift)) for v in run["per_example"]["accuracy"]]
    table = markdown(analyse(runs, draws=200))
    assert "seeds disagree beyond their example noise in bash - sft" in table and "--seeds" in table


def test_a_sweep_runs_variants_and_the_table_warns_of_multiple_comparisons():
    from gapfix.compare import parse_variant, sweep_variants

    assert sweep_variants("bash:beta=0.1, 0.3") == ["bash[beta=0.1]", "bash[beta=0.3]"]
    assert parse_variant("bash[beta=0.1]") == ("bash", {"beta": 0.1})
    assert parse_variant("bash[bash_mode=argmax]") == ("bash", {"bash_mode": "argmax"})
    for bad, match in (("bash[beta=2]", "beta"), ("bash[nope=1]", "nope"), ("dpo", "dpo"),
                       ("bash[beta=x]", "beta")):
        with pytest.raises(ValueError, match=match):
            parse_variant(bad)
    with pytest.raises(ValueError, match="--sweep"):
        sweep_variants("beta=0.1")
    runs = _runs(0.3)
    runs += [dict(r, method="bash[beta=0.1]") for r in runs if r["method"] == "bash"]
    analysis = analyse(runs, draws=200)
    assert analysis["comparisons"] == 2  # bash and its variant; the controls are not counted
    assert "adjusted" in analysis["differences"]["bash[beta=0.1] - sft"]["accuracy"]
    assert "Multiple comparisons: 2 runs" in markdown(analysis)


def test_plot_is_drawn_in_the_table_units_with_a_legend(tmp_path):
    pytest.importorskip("matplotlib")
    from gapfix.compare import plot

    runs = _runs(0.3)
    for run in runs:
        if run["method"] == "bash_noise":  # a control far off: it must not set the scale
            run["per_example"]["accuracy"] = [0.0] * len(run["per_example"]["accuracy"])
    path = plot(analyse(runs, draws=100), str(tmp_path / "r.png"))
    assert path and (tmp_path / "r.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- the user's scorer


def _path_task(tmp_path):
    """Shortest paths in a small graph with several valid answers: any shortest route counts."""
    scorer = tmp_path / "graph_scorer.py"
    scorer.write_text(
        "EDGES = {('a','b'), ('b','d'), ('a','c'), ('c','d')}\n"
        "def valid_path(record, text):\n"
        "    nodes = text.split('-')\n"
        "    ok = nodes[0] == record['start'] and nodes[-1] == record['end'] and len(nodes) == 3\n"
        "    return float(ok and all((x, y) in EDGES for x, y in zip(nodes, nodes[1:])))\n")
    return f"{scorer}:valid_path"


def test_a_task_with_several_valid_answers_is_scored_by_the_users_scorer(tmp_path):
    from gapfix.evaluation import load_scorer, run_scorer

    scorer = load_scorer(_path_task(tmp_path))
    record = {"prompt": "a to d", "response": "a-b-d", "start": "a", "end": "d"}
    assert run_scorer(scorer, record, "a-c-d", 0) == 1.0  # another valid answer: right
    assert run_scorer(scorer, record, "a-b-c", 0) == 0.0
    for spec, match in (("nocolon", "module:function"), ("no_such_module_xyz:f", "importing"),
                        (f"{tmp_path / 'graph_scorer.py'}:missing", "no function"),
                        (str(tmp_path / "absent.py") + ":f", "no file")):
        with pytest.raises(ValueError, match=match):
            load_scorer(spec)
    with pytest.raises(ValueError, match="example 5"):
        run_scorer(lambda record, text: "yes", record, "x", 5)


def test_compare_with_a_scorer_saves_generations_and_records_the_backend(tmp_path):
    pytest.importorskip("transformers")
    from gapfix.cli import main

    files = _copy_files(tmp_path)
    (tmp_path / "first_letter.py").write_text(
        "def score(record, text):\n    return float(text[-1:] == record['response'][-1:])\n")
    out = tmp_path / "cmp"
    assert main(["compare", "--model", "tiny", "--tokenizer", "char", "--train", str(files["train"]),
                 "--eval", str(files["eval"]), "--methods", "sft", "--seeds", "2", "--base-steps", "2",
                 "--extra-steps", "2", "--batch-size", "8", "--max-new-tokens", "6",
                 "--scorer", f"{tmp_path / 'first_letter.py'}:score", "--progress", "false", "--threads", "1",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "recovery_distance" not in results["metrics"]
    assert any("recovery_distance left out" in n for n in results["notes"])
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2 * 10  # seeds x (base, sft) x eval examples
    assert {(g["seed"], g["method"]) for g in lines} == {(s, m) for s in (0, 1) for m in ("base", "sft")}
    assert all(g["backend"] == "hf" and g["max_new_tokens"] == 6 and "text" in g and "score" in g for g in lines)
    by_run = {(r["seed"], r["method"]): r for r in results["runs"]}
    assert by_run[(0, "sft")]["per_example"]["accuracy"] == [g["score"] for g in lines
                                                             if g["seed"] == 0 and g["method"] == "sft"]
