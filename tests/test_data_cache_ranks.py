"""Under torchrun, rank 0 tokenizes the data into <out>/data_cache first; the other ranks wait at a
barrier, then read its cache (datasets' cache hit) and tokenize nothing (two gloo processes)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # torchrun processes
WORKER = os.path.join(os.path.dirname(__file__), "data_cache_worker.py")


def test_rank_zero_tokenizes_and_the_other_rank_reads_its_cache(tmp_path):
    from gapfix.data import math_task

    problems = math_task.make_split("train", 300, seed=2)
    lines = [json.dumps(p) for p in problems]
    lines.insert(10, "{broken")
    lines.insert(20, json.dumps({"prompt": "1 + 1 " * 30, "response": "2"}))  # longer than max_length 60
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
               str(out), str(data)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1))
    assert first["encoded"] == 301  # every usable record, on rank 0 only
    assert second["encoded"] == 0  # rank 1 read rank 0's cache: no map ran there
    assert first["rows"] == second["rows"] == 300
    assert first["sha256"] == second["sha256"] and first["fingerprint"] == second["fingerprint"]
    assert first["cache_files"] == second["cache_files"]  # the same memory-mapped files
    assert all(name.startswith(str(out / "data_cache")) for name in first["cache_files"])
    for report in (first["report"], second["report"]):  # both report what was dropped
        assert report["skipped_lines"] == [11] and report["too_long"] == 1


def test_train_command_under_torchrun_loads_on_rank_zero_first(tmp_path):
    """`gapfix train` under torchrun: the process group joined before the data is loaded is the
    one the trainer then uses (no second init, no unmatched barrier), and both ranks train."""
    from gapfix.data import math_task

    paths = math_task.write_splits(str(tmp_path / "data"), train=48, test=4, hard=4)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "gapfix.cli", "train", "--model", "tiny", "--tokenizer", "word", "--train", paths["train"],
               "--method", "sft", "--iterations", "1", "--steps-per-iteration", "2", "--batch-size", "4",
               "--progress", "false", "--threads", "1", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["data"]["train"]["examples"] == 48
    assert done.stdout.count('"phase_seconds"') == 1  # rank 0 alone writes and prints the summary
    assert list((out / "data_cache").rglob("*.arrow"))  # the memory-mapped tables
