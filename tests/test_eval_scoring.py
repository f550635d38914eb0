"""gapfix eval's scoring and inputs: the user's scorer, answer regexes that match nothing or
backtrack, over-long examples, the backend choice and --threads, and the module layering."""
import json
import os
import subprocess
import sys
import time

import pytest

from gapfix.evaluation import answers_match, extract_answer

pytest.importorskip("transformers")


def test_a_regex_that_can_match_the_empty_string_does_not_score_every_answer_right():
    empty_ok = r"(-?\d*\.?\d*)"
    assert not answers_match("I do not know", "the answer is 12", empty_ok)
    assert not answers_match("", "", empty_ok)
    assert extract_answer("so the answer is 12 then", empty_ok) == "12"  # its last non-empty match
    assert answers_match("answer 12", "we get 12", empty_ok)


def test_a_backtracking_regex_is_a_named_error_in_bounded_time():
    started = time.perf_counter()
    with pytest.raises(ValueError, match="backtracks"):
        extract_answer("a" * 60 + "!", r"(a|aa)+$", timeout=0.2)
    assert time.perf_counter() - started < 10


def _tiny_saved_model(tmp_path, context=48):
    from gapfix.models import save_model, tiny_llama, train_tokenizer

    texts = ["abc=abc", "a-b-d", "a-c-d", "x to y"]
    tokenizer = train_tokenizer(texts, kind="char", add_bos=True)
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=context,
                       seed=0)
    return save_model(model, tokenizer, tmp_path / "model")


def test_eval_drops_and_counts_an_over_long_example_instead_of_failing(tmp_path, capsys):
    from gapfix.cli import main

    folder = _tiny_saved_model(tmp_path, context=48)
    data = tmp_path / "data.jsonl"
    records = [{"prompt": "abc=", "response": "abc"}] * 3
    records.insert(1, {"prompt": "a" * 80 + "=", "response": "abc"})  # longer than the model's context
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--data", str(data), "--max-new-tokens", "4", "--out", str(out),
                 "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert f"{data}: dropped 1 example(s) longer than 48 tokens" in err
    report = json.loads((out / "report.json").read_text())
    assert report["count"] == 3 and report["data_report"]["too_long"] == 1


def test_eval_with_a_scorer_writes_generations_with_backend_and_settings(tmp_path, capsys):
    from gapfix.cli import main

    folder = _tiny_saved_model(tmp_path)
    scorer = tmp_path / "anything.py"
    scorer.write_text("def score(record, text):\n    return 0.5\n")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a to d", "response": "a-b-d"}) + "\n" for _ in range(3)))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--data", str(data), "--max-new-tokens", "4", "--out", str(out),
                 "--scorer", f"{scorer}:score", "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"] == 0.5 and report["scorer"] == f"{scorer}:score"
    assert report["generation"]["backend"] == "hf"
    assert "recovery_distance" not in report["per_example"]
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["example"] for g in lines] == [0, 1, 2]
    assert all(g["score"] == 0.5 and g["backend"] == "hf" and g["max_new_tokens"] == 4 for g in lines)
    assert main(["eval", "--model", str(folder), "--data", str(data), "--out", str(out),
                 "--scorer", f"{scorer}:score", "--answer-regex", "x"]) == 2
    assert "--scorer and --answer-regex" in capsys.readouterr().err


def test_auto_generates_with_vllm_only_on_a_gpu(monkeypatch):
    import types

    import torch

    from gapfix.generation import runner

    monkeypatch.setattr(runner, "vllm_available", lambda: True)
    on_cpu = torch.nn.Linear(2, 2)
    assert runner._resolve_backend("auto", on_cpu) == "hf"
    on_gpu = types.SimpleNamespace(parameters=lambda: iter([types.SimpleNamespace(device=torch.device("meta"))]))
    on_gpu.parameters = lambda: iter([types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"))])
    assert runner._resolve_backend("auto", on_gpu) == "vllm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runner, "_is_model_path", lambda model: True)
    assert runner._resolve_backend("auto", "some/folder") == "hf"


def test_threads_hold_for_processes_a_backend_starts(monkeypatch):
    import torch

    from gapfix.threads import apply_threads

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        apply_threads(1)
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1" and len(os.environ["VLLM_CPU_OMP_THREADS_BIND"].split(",")) == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="--threads"):
        apply_threads(0)


def test_evaluation_and_the_cli_modules_import_no_task_and_no_circle():
    code = ("import sys, gapfix.evaluation, gapfix.eval_cli; "
            "print(sorted(m for m in sys.modules if m in ('gapfix.data.math_task', 'gapfix.train_cli', "
            "'gapfix.methods.rac')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_eval_scores_with_the_users_scorer(tmp_path):
    """gapfix train --eval --scorer: evaluate_across_ranks averages the scorer's grades (not counts)."""
    from gapfix.data.loading import load_eval_examples
    from gapfix.models import load_model
    from gapfix.train_cli import evaluate_across_ranks

    folder = _tiny_saved_model(tmp_path)
    model, tokenizer = load_model(folder)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a to d", "response": "a-b-d"}) + "\n" for _ in range(4)))
    examples = load_eval_examples(str(data), tokenizer, out=str(tmp_path / "out"))
    result = evaluate_across_ranks(model, tokenizer, examples, max_new_tokens=3, scorer=lambda record, text: 0.25)
    assert result == {"accuracy": 0.25, "count": 4, "backend": "hf"}
