import json
import subprocess
import sys

import pytest

from gapfix.cli import build_parser, main
from gapfix.data import math_task

pytest.importorskip("transformers")


def test_env_reports_native_extension(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] and "native_extension" in report and "native_build" in report


def test_building_the_parser_stays_light():
    """Every command module is imported to build the parser: none may load the heavy libraries."""
    code = ("import sys; from gapfix.cli import build_parser; build_parser(); heavy = [m for m in "
            "('triton', 'transformers', 'vllm', 'datasets', 'trl', 'peft') if m in sys.modules];"
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_import_gapfix_stays_light():
    code = ("import sys, gapfix; heavy = [m for m in ('triton', 'transformers', 'vllm') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_command_has_help():
    parser = build_parser()
    for command in ("train", "demo", "env", "generate", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0


@pytest.fixture
def data_files(tmp_path):
    paths = math_task.write_splits(str(tmp_path / "data"), train=64, test=8, hard=4)
    return paths


def test_train_command_runs_tiny_model(tmp_path, data_files, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "tiny", "--train", data_files["train"], "--eval", data_files["test"],
                 "--method", "bash", "--iterations", "1", "--steps-per-iteration", "2",
                 "--batch-size", "8", "--max-new-tokens", "16", "--progress", "false", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["evaluations"][0]["count"] == 8
    assert (out / "final" / "config.json").exists()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "step" and "mixed_fraction" in e for e in events)


@pytest.mark.parametrize("args, match", [
    (["--method", "dpo"], "method"),
    (["--beta", "2"], "beta"),
    (["--model", "/nonexistent/model"], "model"),
])
def test_train_command_bad_input(tmp_path, data_files, args, match, capsys):
    base = {"--model": "tiny", "--train": data_files["train"], "--out": str(tmp_path / "x")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["train"] + [item for pair in base.items() for item in pair]
    assert main(argv) == 2  # one line, no traceback (tests/test_failures.py)
    assert match in capsys.readouterr().err
    with pytest.raises(ValueError, match=match):
        main(["--debug"] + argv)


def test_bench_command_runs_a_selected_benchmark(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "-k", "build_rows_batched_vs_per_pair and path", "--json", str(out)]) == 0
    names = [b["name"] for b in json.loads(out.read_text())["benchmarks"]]
    assert names and all("path" in n for n in names)


def test_native_extension_loads_on_its_own():
    """gapfix._native imported first thing in a fresh process still finds torch's libraries."""
    code = "import gapfix._native as n; assert n.available(), n.LOAD_ERROR; print(n.build_info())"
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "cpu_features=" in out.stdout


def test_train_command_builds_a_model_from_a_config_file(tmp_path, data_files):
    config = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 128}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["train", "--model", str(path), "--train", data_files["train"], "--method", "sft",
                 "--steps-per-iteration", "2", "--batch-size", "4", "--progress", "false",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["hidden_size"] == 32 and saved["num_hidden_layers"] == 1
