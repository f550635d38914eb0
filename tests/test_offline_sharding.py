"""The offline phase split across ranks (two gloo processes under torchrun): each rank runs half
the model passes, and the rows built are byte-identical to those of one process, for SFT, BASH
and RAC (seeds come from the example, never from the rank)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from gapfix.data.arrow import RowTable

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # torchrun processes: minutes of CPU
WORKER = os.path.join(os.path.dirname(__file__), "offline_worker.py")


def _run(folder, nproc, method):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               WORKER, str(folder), method]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    iteration = folder / "run" / "iterations" / "iter000"
    files = glob.glob(str(iteration / "rows.arrow")) or sorted(glob.glob(str(iteration / "part-*.arrow")))
    assert len(files) == (1 if method == "rac" else nproc)
    canonical = RowTable.open(files).write_to(folder / "canonical.arrow")
    counts = [json.loads((folder / f"counts-{rank}.json").read_text()) for rank in range(nproc)]
    return open(canonical, "rb").read(), counts


@pytest.mark.parametrize("method", ["sft", "bash", "rac"])
def test_two_ranks_build_the_rows_of_one_with_half_the_passes_each(tmp_path, method):
    one, (alone,) = _run(tmp_path / "one", 1, method)
    two, (first, second) = _run(tmp_path / "two", 2, method)
    assert one == two  # byte-identical rows
    if method == "bash":  # 32 rows in 4 chunks of 8: two forwards of 8 rows per rank
        assert alone["forwards"] == 4 and alone["forward_rows"] == 32
        assert first["forwards"] == second["forwards"] == 2
        assert first["forward_rows"] == second["forward_rows"] == 16
    elif method == "rac":  # 16 prompts: 8 per rank
        assert alone["generated_prompts"] == 16
        assert first["generated_prompts"] == second["generated_prompts"] == 8
    else:  # no model pass at all
        assert alone == first == second == {"forwards": 0, "forward_rows": 0, "generated_prompts": 0}
