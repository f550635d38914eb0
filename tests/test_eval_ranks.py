"""`gapfix train --eval` under torchrun: every rank evaluates its share of the eval set and one
all_reduce combines the counts; the accuracy equals one process's, under DDP and under FSDP (where
the evaluation runs on the trainer's whole copy of the sharded model)."""
import json
import os
import subprocess
import sys

import pytest

from gapfix.data import math_task
from gapfix.eval_cli import load_eval_examples
from gapfix.evaluation import evaluate
from gapfix.train_cli import evaluate_across_ranks, load_model_and_tokenizer

EVAL_EXAMPLES = 40
WORKER = os.path.join(os.path.dirname(__file__), "eval_ranks_worker.py")


def _eval_file(tmp_path):
    """The math test split with some references stripped of their "=": scored by --answer-regex "(=)",
    an answer is right where it has an "=" and its reference does too, so the accuracy is a fraction
    that a share counted twice, or left out, changes (the stripped records are spread unevenly)."""
    paths = math_task.write_splits(str(tmp_path / "data"), train=EVAL_EXAMPLES, test=EVAL_EXAMPLES, hard=4)
    records = [json.loads(line) for line in open(paths["test"])]
    for index in range(0, 30, 3):  # 10 of the first 30: rank 0 of 2 holds 7 of them, rank 1 three
        records[index] = {"prompt": records[index]["prompt"], "response": f"answer {records[index]['final']}"}
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths["test"], str(path)


def _train(out, train, evaluation, world, *extra):
    """`gapfix train --eval` on `world` processes (torchrun from 2 on); its summary.json."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                if world > 1 else [sys.executable])
    # the training set is the eval set's prompts: a few steps teach the tiny model the answers' form
    command = launcher + [
        "-m", "gapfix.cli", "train", "--model", "tiny", "--tokenizer", "word", "--train", train,
        "--eval", evaluation, "--answer-regex", "(=)", "--max-new-tokens", "6", "--method", "sft",
        "--iterations", "2", "--steps-per-iteration", "12", "--batch-size", "8", "--lr", "3e-3",
        "--progress", "false", "--threads", "1", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("eval accuracy") == 2  # printed once per iteration, by rank 0 alone
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow  # three runs, two of them under torchrun
def test_eval_split_across_ranks_equals_one_process_under_ddp_and_fsdp(tmp_path):
    train, evaluation = _eval_file(tmp_path)
    one = _train(tmp_path / "one", train, evaluation, 1)["evaluations"]
    assert [e["iteration"] for e in one] == [0, 1] and all(e["count"] == EVAL_EXAMPLES for e in one)
    # the scoring can tell shares apart: some answer right and some wrong
    assert any(0 < e["accuracy"] < 1 for e in one), one
    ddp = _train(tmp_path / "ddp", train, evaluation, 2)["evaluations"]
    assert ddp == one
    fsdp = _train(tmp_path / "fsdp", train, evaluation, 2, "--distributed", "fsdp")["evaluations"]
    assert fsdp == one


def test_evaluate_across_ranks_on_one_process_is_evaluate(tmp_path):
    """World 1: the same accuracy and count as gapfix.evaluation.evaluate (no process group)."""

    _, evaluation = _eval_file(tmp_path)
    model, tokenizer = load_model_and_tokenizer("tiny", evaluation, tokenizer="word")
    examples = load_eval_examples(evaluation, tokenizer, out=str(tmp_path / "out"), limit=7)
    expected = evaluate(model, tokenizer, examples, max_new_tokens=4, backend="hf", answer_regex="(.)")
    assert evaluate_across_ranks(model, tokenizer, examples, max_new_tokens=4, answer_regex="(.)") == expected


@pytest.mark.slow  # three torchrun processes
def test_more_ranks_than_examples_every_rank_joins_the_one_all_reduce(tmp_path):
    """3 ranks, 2 examples: rank 2's share is empty, yet it joins the all_reduce (a rank that skipped
    it would leave the others waiting until the timeout); every rank gets one process's result."""

    _, evaluation = _eval_file(tmp_path)
    data = tmp_path / "two.jsonl"
    data.write_text("".join(open(evaluation).readlines()[:2]))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", WORKER,
               str(out), str(data)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model, tokenizer = load_model_and_tokenizer("tiny", str(data), tokenizer="word")
    examples = load_eval_examples(str(data), tokenizer, out=str(tmp_path / "one"))
    expected = evaluate(model, tokenizer, examples, max_new_tokens=4, backend="hf", answer_regex="(.)")
    assert expected["count"] == 2
    assert [json.loads((out / f"rank-{r}.json").read_text()) for r in range(3)] == [expected] * 3


def test_a_finished_train_command_destroys_its_process_group(tmp_path, monkeypatch):
    """`gapfix train` leaves no process group for interpreter teardown, where gloo's threads can
    abort a run that succeeded (a one-process gloo group stands in for torchrun's)."""
    import torch.distributed as dist

    from gapfix.cli import main

    paths = math_task.write_splits(str(tmp_path / "data"), train=8, test=2, hard=1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert main(["train", "--model", "tiny", "--tokenizer", "word", "--train", paths["train"],
                     "--method", "sft", "--iterations", "1", "--steps-per-iteration", "1", "--batch-size", "2",
                     "--progress", "false", "--threads", "1", "--out", str(tmp_path / "out")]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
