"""The offline phase split across ranks (two gloo processes under torchrun): each rank runs half
the model passes, and the rows built are byte-identical to those of one process, for SFT, BASH
and RAC (seeds come from the example, never from the rank)."""
import glob
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from gapfix.data.arrow import RowTable

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # torchrun processes: minutes of CPU
WORKER = os.path.join(os.path.dirname(__file__), "offline_worker.py")


def _run(folder, nproc, method, strategy="ddp"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               WORKER, str(folder), method, strategy]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    iteration = folder / "run" / "iterations" / "iter000"
    files = sorted(glob.glob(str(iteration / ("mix-*.arrow" if method.startswith("rac") else "part-*.arrow"))))
    assert len(files) == nproc  # every rank wrote a shard (RAC: its share of the mixed rows)
    if method.startswith("rac"):  # each rank wrote its share of the 16 RAC + 16 SFT rows
        assert [pa.ipc.open_file(file).read_all().num_rows for file in files] == [32 // nproc] * nproc
    canonical = RowTable.open(files).write_to(folder / "canonical.arrow")
    counts = [json.loads((folder / f"counts-{rank}.json").read_text()) for rank in range(nproc)]
    if method.startswith("rac"):  # the union is, byte for byte, mix_with_sft over all the rows in one process
        assert open(canonical, "rb").read() == (folder / "reference.arrow").read_bytes()
    return open(canonical, "rb").read(), counts


@pytest.mark.parametrize("method,strategy", [("sft", "ddp"), ("bash", "ddp"), ("rac", "ddp"),
                                             ("rac-per-prompt", "ddp"), ("bash", "fsdp"), ("rac", "fsdp")])
def test_two_ranks_build_the_rows_of_one_with_half_the_passes_each(tmp_path, method, strategy):
    """Under FSDP too: each rank runs its share of the passes on the gathered model (one process
    never shards: world 1 is the reference for both)."""
    one, (alone,) = _run(tmp_path / "one", 1, method)
    two, (first, second) = _run(tmp_path / "two", 2, method, strategy)
    assert one == two  # byte-identical rows
    if method == "bash":  # 32 rows in 4 chunks of 8: two forwards of 8 rows per rank
        assert alone["forwards"] == 4 and alone["forward_rows"] == 32
        assert first["forwards"] == second["forwards"] == 2
        assert first["forward_rows"] == second["forward_rows"] == 16
    elif method.startswith("rac"):  # 16 prompts: 8 per rank
        assert alone["generated_prompts"] == 16
        assert first["generated_prompts"] == second["generated_prompts"] == 8
    else:  # no model pass at all
        assert alone == first == second == {"forwards": 0, "forward_rows": 0, "generated_prompts": 0}


def _losses(tmp_path, nproc, *extra, name, method="bash"):
    """tests/distributed_worker.py (BASH, DDP, 2 iterations of 3 steps, a checkpoint every 2)."""
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GAPFIX_WORKER_METHOD": method}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(os.path.dirname(__file__), "distributed_worker.py"), str(out), "ddp", "2", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_bash_resumes_mid_iteration_at_another_world_size(tmp_path):
    """Killed after step 3 by two ranks (checkpoint at step 2, mid-iteration, its rows written by
    two ranks as two shards), resumed by one process: the losses of one process run straight."""
    straight = _losses(tmp_path, 1, name="straight")
    checkpoints = str(tmp_path / "ckpt")
    killed = _losses(tmp_path, 2, checkpoints, "3", name="killed")
    resumed = _losses(tmp_path, 1, checkpoints, name="resumed")
    assert len(straight) == 6 and len(killed) == 3 and len(resumed) == 4
    for a, b in zip(straight, killed[:2] + resumed):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (straight, killed, resumed)


def test_rac_resumes_mid_iteration_at_another_world_size(tmp_path):
    """RAC's mixed rows are written by every rank as its share (two shards at world size 2): the
    checkpoint taken mid-iteration refers to both, and one process resumed from it loses what one
    process run straight loses."""
    from gapfix.checkpoint import STATE_JSON

    straight = _losses(tmp_path, 1, name="straight", method="rac")
    checkpoints = tmp_path / "ckpt"
    killed = _losses(tmp_path, 2, str(checkpoints), "3", name="killed", method="rac")
    states = [json.loads(path.read_text())["state"]
              for path in (checkpoints / "checkpoints").glob(f"*/{STATE_JSON}")]
    mid_iteration = [state["rows"] for state in states if state["rows"] is not None]
    assert mid_iteration and all(
        sorted(rows["files"]) == [f"iterations/iter000/mix-{r:05d}-of-00002.arrow" for r in range(2)]
        for rows in mid_iteration), mid_iteration
    resumed = _losses(tmp_path, 1, str(checkpoints), name="resumed", method="rac")
    assert len(straight) == 6 and len(killed) == 3 and len(resumed) == 4
    for a, b in zip(straight, killed[:2] + resumed):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (straight, killed, resumed)
