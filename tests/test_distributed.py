"""DDP and FSDP2 through torchrun (gloo, two CPU processes) give the losses and the trained
parameters of one process on the same global batch, for SFT, BASH (whose mixing is seeded per
row, never by the rank) and RAC (answers sampled by the transformers backend, seeded per
chunk of prompts). Under FSDP the offline phase (BASH's prediction pass, RAC's generation)
runs split across the ranks, as under DDP."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # torchrun processes: minutes of CPU
WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def _run(tmp_path, nproc, strategy, *extra, method="sft", lora_dropout=None):
    """lora_dropout: train a LoRA adapter (with that dropout) whose init differs per rank."""
    kind = method if lora_dropout is None else f"{method}-lora"
    out = tmp_path / f"{kind}-{strategy}-{nproc}-{len(extra)}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GAPFIX_WORKER_METHOD": method}
    env.pop("GAPFIX_WORKER_LORA", None)
    if lora_dropout is not None:
        env["GAPFIX_WORKER_LORA"] = str(lora_dropout)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", WORKER, str(out), strategy, *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _parameters(tmp_path, nproc, strategy, method="sft"):
    """The trained parameters the last _run with these arguments saved (whole, gathered under FSDP);
    method "<method>-lora" for a LoRA run."""
    from safetensors.torch import load_file

    return load_file(str(tmp_path / f"{method}-{strategy}-{nproc}-0.json.safetensors"))


def _assert_same_training(single, double, one, two):
    """Losses (one per step) and trained parameters of a one- and a two-process job agree."""
    assert len(single) == len(double) == 3
    for a, b in zip(single, double):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (single, double)
    assert single[-1] < single[0]  # the steps trained
    assert one.keys() == two.keys() and one
    for name in one:
        gap = (one[name] - two[name]).abs().max().item()
        assert gap <= 1e-4 * max(1.0, one[name].abs().max().item()), (name, gap)


@pytest.mark.parametrize("strategy,method", [("ddp", "sft"), ("fsdp", "sft"), ("ddp", "bash"),
                                             ("fsdp", "bash"), ("fsdp", "rac")])
def test_two_processes_match_one(tmp_path, strategy, method):
    """BASH predicts the 24 rows the steps draw in one chunk and RAC answers 16 prompts in one
    chunk, so at world 2 rank 1 runs no offline forward at all: under FSDP the ranks' offline
    phases are uneven, and the training that follows must still pair its collectives."""
    single = _run(tmp_path, 1, strategy, method=method)
    double = _run(tmp_path, 2, strategy, method=method)
    _assert_same_training(single, double, _parameters(tmp_path, 1, strategy, method),
                          _parameters(tmp_path, 2, strategy, method))


@pytest.mark.parametrize("strategy,method", [("ddp", "sft"), ("fsdp", "sft"), ("fsdp", "bash"),
                                             ("fsdp", "rac")])
def test_lora_two_processes_match_one(tmp_path, strategy, method):
    """A PEFT LoRA model whose adapter init (lora_A is random) differs between the ranks, as in a
    job whose ranks did not seed alike, trains as rank 0's model does in one process: DDP
    broadcasts rank 0's weights when it wraps, and gapfix does so before fully_shard, which on
    its own would train a model stitched from the ranks' slices of their different inits."""
    single = _run(tmp_path, 1, strategy, method=method, lora_dropout=0.0)
    double = _run(tmp_path, 2, strategy, method=method, lora_dropout=0.0)
    one = _parameters(tmp_path, 1, strategy, f"{method}-lora")
    two = _parameters(tmp_path, 2, strategy, f"{method}-lora")
    assert any("lora_A" in name for name in one)
    # B starts at zero: the adapter moved from there (trained)
    assert any("lora_B" in name and one[name].abs().max() > 0 for name in one)
    _assert_same_training(single, double, one, two)


def test_fsdp_checkpoint_resumes_across_processes(tmp_path):
    """Two FSDP2 ranks save gathered checkpoints every 2 steps; the job stops after step 3
    and a new job resumes from step 2: the losses are those of one process run straight."""
    straight = _run(tmp_path, 1, "fsdp", "2")
    checkpoints = str(tmp_path / "ckpt")
    killed = _run(tmp_path, 2, "fsdp", "2", checkpoints, "3")
    resumed = _run(tmp_path, 2, "fsdp", "2", checkpoints)
    assert len(straight) == 6 and len(killed) == 3 and len(resumed) == 4
    for a, b in zip(straight, killed[:2] + resumed):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (straight, killed, resumed)
