import json

import pytest

pytest.importorskip("transformers")


def test_demo_quick_writes_table_results_and_plot(tmp_path, capsys):
    from gapfix.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for method in ("base", "sft", "bash", "rac"):
        assert f"\n{method}" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == {"base", "sft", "bash", "rac"}
    for entry in results["summary"].values():
        for metric in ("test", "hard", "recovery", "carried"):
            assert 0.0 <= entry[metric]["mean"] <= 1.0
    runs = {r["method"]: r for r in results["runs"]}
    assert runs["bash"]["seconds"]["offline"] > 0 and runs["rac"]["seconds"]["offline"] > 0
    assert (out / "data" / "math_train.jsonl").exists()
    try:
        import matplotlib  # noqa: F401  (the demo extra's plot library: optional)
    except ImportError:
        assert not (out / "results.png").exists()
        pytest.skip("matplotlib is not installed: the demo writes no results.png (the rest was checked)")
    assert (out / "results.png").stat().st_size > 1000
