import json

import pytest

pytest.importorskip("transformers")


def test_demo_quick_writes_table_results_and_plot(tmp_path, capsys):
    from gapfix.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for method in ("base", "sft", "bash", "rac", "bash_noise"):
        assert f"\n{method}" in printed
    assert "vs sft" in printed and "95% bootstrap intervals" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == {"base", "sft", "bash", "rac", "bash_noise"}
    for entry in results["summary"].values():
        for metric in ("test", "hard", "recovery", "carried", "teacher_forced", "free_running"):
            assert 0.0 <= entry[metric]["mean"] <= 1.0
    for method in ("bash", "rac", "bash_noise", "base"):
        interval = results["comparison"][f"{method} - sft"]["test"]
        assert interval["low"] <= interval["mean"] <= interval["high"]
        assert interval["verdict"] in ("no difference detected", "better than continued SFT",
                                       "worse than continued SFT")
    runs = {r["method"]: r for r in results["runs"]}
    assert runs["bash"]["seconds"]["offline"] > 0 and runs["rac"]["seconds"]["offline"] > 0
    assert "### test (%)" in (out / "results.md").read_text()
    assert (out / "data" / "math_train.jsonl").exists()
    try:
        import matplotlib  # noqa: F401  (the demo extra's plot library: optional)
    except ImportError:
        assert not (out / "results.png").exists()
        pytest.skip("matplotlib is not installed: the demo writes no results.png (the rest was checked)")
    assert (out / "results.png").stat().st_size > 1000


def test_demo_recipe_is_the_shared_named_recipe():
    """One set of values: the demo's training recipe is gapfix.recipes' "demo"
    (what gapfix train --recipe demo uses)."""
    from gapfix.demo import RECIPE
    from gapfix.recipes import RECIPES

    shared = RECIPES["demo"]
    assert RECIPE["extra_lr"] == shared["lr"] and RECIPE["iterations"] == shared["iterations"]
    for key in ("beta", "bash_mode", "bash_temperature", "bash_rows", "rac_mode", "rac_temperature",
                "rac_prompts", "rac_sft_ratio", "batch_size", "max_new_tokens"):
        assert RECIPE[key] == shared[key], key


@pytest.mark.slow
def test_demo_results_do_not_depend_on_the_loader(tmp_path, monkeypatch, capsys):
    """docs/demo-results.json stays reproducible: `gapfix demo --quick` on the memory-mapped
    loader gives every number (timings aside) that it gives on Python lists from load_examples."""
    import gapfix.demo as demo
    from gapfix.cli import main
    from gapfix.data import load_examples, read_jsonl

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if "seconds" not in k}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    assert main(["demo", "--quick", "--out", str(tmp_path / "arrow")]) == 0

    def lists(paths, tokenizer, out):  # the demo's loading before the memory-mapped loader
        return (*(load_examples(paths[name], tokenizer) for name in ("train", "test", "hard")),
                read_jsonl(paths["test"]))

    monkeypatch.setattr(demo, "load_splits", lists)
    assert main(["demo", "--quick", "--out", str(tmp_path / "lists")]) == 0
    capsys.readouterr()
    arrow, listed = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("arrow", "lists"))
    assert untimed(arrow) == untimed(listed)
