"""Checkpoints that do not grow with the dataset, and the offline phase split across ranks (CPU).

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_offline.py --benchmark-only            # 10M tokens
    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_offline.py --benchmark-only -m slow    # + 50M

- Checkpoint: SFT on synthetic tokenized examples (bench/test_bench_data.py's, 500 tokens each) of
  10M and 50M tokens, a checkpoint after every step; the save time and the trainer state's size
  (trainer_state.json + trainer_state.safetensors) of a mid-iteration checkpoint, next to the
  iteration's row file, which the trainer state embedded before (the baseline: at least that).
- Offline phase: one BASH iteration's predictions (256 rows of the math task, 8 chunks of 32, a
  32k-vocabulary model) by 1 and by 2 gloo processes under torchrun: forwards per rank counted,
  the rows compared byte for byte, the phase's wall time.
Each case runs in fresh processes.
"""
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 32000
_results = {}


def _bench_data():
    spec = importlib.util.spec_from_file_location("bench_data", os.path.join(HERE, "test_bench_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint_child(folder: str, out: str) -> None:
    import gapfix.checkpoint as ckpt
    from gapfix.data.arrow import load_tokenized
    from gapfix.models import tiny_llama
    from gapfix.trainer import train

    dataset = load_tokenized(folder)
    model = tiny_llama(VOCAB, hidden_size=64, num_layers=1, num_heads=2, max_position_embeddings=512, seed=0)
    seconds, real = [], ckpt.save_checkpoint

    def timed(*args, **kwargs):
        started = time.perf_counter()
        path = real(*args, **kwargs)
        seconds.append(time.perf_counter() - started)
        return path

    ckpt.save_checkpoint = timed
    started = time.perf_counter()
    result = train(model, None, dataset, method="sft", steps_per_iteration=3, batch_size=8, save_every=1,
                   keep_checkpoints=10, out_dir=out, progress=False)
    wall = time.perf_counter() - started
    middle = os.path.join(out, "checkpoints", "iter000-step0000001")
    state = sum(os.path.getsize(os.path.join(middle, name))
                for name in ("trainer_state.json", "trainer_state.safetensors"))
    rows = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "iterations", "iter000", "*.arrow")))
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"save_s": sorted(seconds)[len(seconds) // 2], "trainer_state_bytes": state,
                      "parameter_bytes": parameters,
                      "row_file_bytes": rows, "offline_s": result.phase_seconds["offline"], "wall_s": wall}))


def offline_child(out: str) -> None:
    """Under torchrun: one BASH offline phase; this rank's forwards and the phase's seconds."""
    import gapfix.methods.bash as bash
    from gapfix.data import encode_example, math_task
    from gapfix.models import tiny_llama
    from gapfix.trainer import train

    rank = int(os.environ.get("RANK", "0"))
    counts = {"forwards": 0, "forward_rows": 0}
    predict = bash.predict_alternatives

    def counting(model, input_ids, *args, **kwargs):
        counts["forwards"] += 1
        counts["forward_rows"] += int(input_ids.shape[0])
        return predict(model, input_ids, *args, **kwargs)

    bash.predict_alternatives = counting
    tokenizer = math_task.math_tokenizer()
    examples = [encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 256, seed=1)]
    model = tiny_llama(VOCAB, hidden_size=256, num_layers=2, num_heads=4, seed=0)
    result = train(model, tokenizer, examples, method="bash", steps_per_iteration=1, batch_size=8,
                   bash_rows=256, bash_prediction_batch_size=32, bash_mode="sample", progress=False,
                   out_dir=os.path.join(out, "run"),
                   save_every=1, keep_checkpoints=2)  # a kept checkpoint refers to the rows: they stay
    counts["offline_s"] = result.phase_seconds["offline"]
    with open(os.path.join(out, f"counts-{rank}.json"), "w") as handle:
        json.dump(counts, handle)


def _python(*args, timeout=1800, torchrun=None):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    launcher = [sys.executable] if torchrun is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    done = subprocess.run([*launcher, __file__, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


synthetic = _bench_data().synthetic  # the data benchmark's fixture: its examples, made once per size


def _checkpoint_case(benchmark, synthetic, tmp_path, num_tokens):
    folder = synthetic(num_tokens)
    measured = benchmark.pedantic(lambda: json.loads(_python("checkpoint", folder, str(tmp_path / "run"))),
                                  rounds=1, iterations=1)
    _results[num_tokens] = measured
    info = dict(measured, tokens=num_tokens, baseline_embedded_rows_bytes_at_least=measured["row_file_bytes"])
    smaller = _results.get(10_000_000)
    if num_tokens != 10_000_000 and smaller:
        info["state_size_ratio_vs_10m"] = round(
            measured["trainer_state_bytes"] / smaller["trainer_state_bytes"], 4)
        info["save_time_ratio_vs_10m"] = round(measured["save_s"] / smaller["save_s"], 3)
    benchmark.extra_info.update(info)
    # Adam's two moments and little else: nothing that grows with the dataset
    assert measured["trainer_state_bytes"] < 2.1 * measured["parameter_bytes"]
    if "state_size_ratio_vs_10m" in info:
        assert info["state_size_ratio_vs_10m"] < 1.001


def test_checkpoint_10m_tokens(benchmark, synthetic, tmp_path):
    _checkpoint_case(benchmark, synthetic, tmp_path, 10_000_000)


@pytest.mark.slow
def test_checkpoint_50m_tokens(benchmark, synthetic, tmp_path):
    _checkpoint_case(benchmark, synthetic, tmp_path, 50_000_000)


def _canonical_rows(out):
    from gapfix.data.arrow import RowTable

    files = sorted(glob.glob(os.path.join(out, "run", "iterations", "iter000", "part-*.arrow")))
    with open(RowTable.open(files).write_to(os.path.join(out, "canonical.arrow")), "rb") as handle:
        return handle.read()


@pytest.mark.parametrize("processes", [1, 2])
def test_offline_phase_split_across_processes(benchmark, tmp_path, processes):
    out = str(tmp_path)
    benchmark.pedantic(_python, args=("offline", out), kwargs={"torchrun": processes}, rounds=1, iterations=1)
    counts = [json.load(open(os.path.join(out, f"counts-{rank}.json"))) for rank in range(processes)]
    rows = _canonical_rows(out)
    _results[("offline", processes)] = rows
    info = {"forwards_per_rank": [c["forwards"] for c in counts],
            "rows_per_rank": [c["forward_rows"] for c in counts],
            "offline_s_per_rank": [round(c["offline_s"], 3) for c in counts]}
    assert sum(info["rows_per_rank"]) == 256 and len(set(info["forwards_per_rank"])) == 1
    if processes == 2 and ("offline", 1) in _results:
        info["rows_identical_to_1_process"] = rows == _results[("offline", 1)]
        assert info["rows_identical_to_1_process"]
    benchmark.extra_info.update(info)


if __name__ == "__main__":
    if sys.argv[1] == "checkpoint":
        checkpoint_child(sys.argv[2], sys.argv[3])
    else:
        offline_child(sys.argv[2])
