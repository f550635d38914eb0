import json
import os

import pytest
import torch

from gapfix.data import encode_example, math_task
from gapfix.trainer import latest_checkpoint, train

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return math_task.math_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    return [encode_example(tokenizer, p["prompt"], p["response"], p)
            for p in math_task.make_split("train", 96, seed=5)]


def tiny_model(tokenizer, seed=0, **kwargs):
    from gapfix.models import tiny_llama

    return tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                      max_position_embeddings=128, seed=seed, **kwargs).train()


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(a, b, **tol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol, msg=lambda m: f"{key}: {m}")


FAST = dict(batch_size=8, lr=3e-3, progress=False, max_new_tokens=40, generation_backend="hf")


def test_sft_converges(tokenizer, examples):
    model = tiny_model(tokenizer)
    losses = []
    train(model, tokenizer, examples, method="sft", steps_per_iteration=60, batch_size=16, lr=1e-2,
          progress=False, on_step=lambda r: losses.append(r["loss"]))
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def losses_and_params(tokenizer, examples, **config):
    """A fresh tiny model trained with `config`: its per-step losses and final weights."""
    model = tiny_model(tokenizer)
    losses = []
    train(model, tokenizer, examples, on_step=lambda r: losses.append(r["loss"]), **{**FAST, **config})
    return losses, params(model)


def test_fused_and_reference_ops_train_alike(tokenizer, examples):
    fused = losses_and_params(tokenizer, examples, method="sft", steps_per_iteration=3, fused=True)
    reference = losses_and_params(tokenizer, examples, method="sft", steps_per_iteration=3, fused=False)
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-4, atol=1e-5)
    assert_same_params(fused[1], reference[1], rtol=1e-3, atol=1e-4)


def test_gradient_accumulation_matches_one_batch(tokenizer, examples):
    """Micro-batches of uneven token counts, normalised by the step's true count."""
    whole = losses_and_params(tokenizer, examples, method="sft", steps_per_iteration=2)
    micro = losses_and_params(tokenizer, examples, method="sft", steps_per_iteration=2, micro_batch_size=3)
    torch.testing.assert_close(whole[0], micro[0], rtol=1e-5, atol=1e-6)
    assert_same_params(whole[1], micro[1], rtol=1e-4, atol=1e-5)


class Killed(Exception):
    """Raised by an on_step hook: the run stops as if killed right after that optimizer step."""


def train_killed_after(step, *args, **kwargs):
    """train(*args, **kwargs), killed right after optimizer step `step` (its checkpoints stay)."""
    def kill(record):
        if record["step"] == step:
            raise Killed

    with pytest.raises(Killed):
        train(*args, on_step=kill, **kwargs)


@pytest.mark.parametrize("method", ["sft", "bash", "rac"])
def test_resume_is_exact(tokenizer, examples, tmp_path, method):
    """A run killed after a checkpoint and resumed ends with the weights of an uninterrupted run."""
    config = dict(method=method, iterations=2, steps_per_iteration=3, beta=0.5, rac_prompts=12,
                  rac_temperature=1.0, **FAST)
    reference = tiny_model(tokenizer)
    train(reference, tokenizer, examples, out_dir=str(tmp_path / "straight"), **config)

    train_killed_after(5, tiny_model(tokenizer), tokenizer, examples, out_dir=str(tmp_path / "resumed"),
                       save_every=2, **config)
    assert latest_checkpoint(str(tmp_path / "resumed")).endswith("step0000004")
    resumed = tiny_model(tokenizer, seed=123)  # weights come from the checkpoint
    train(resumed, tokenizer, examples, out_dir=str(tmp_path / "resumed"), save_every=2, **config)
    assert_same_params(params(reference), params(resumed), rtol=0, atol=0)


def test_bash_mixes_at_rate_beta_and_rac_logs_agreement(tokenizer, examples, tmp_path):
    model = tiny_model(tokenizer)
    records = []
    train(model, tokenizer, examples, method="bash", steps_per_iteration=6, beta=0.5,
          bash_mode="sample", on_step=records.append, **FAST)
    fractions = [r["mixed_fraction"] for r in records]
    assert 0.35 < sum(fractions) / len(fractions) < 0.65
    train(model, tokenizer, examples, method="rac", steps_per_iteration=2, rac_prompts=8,
          out_dir=str(tmp_path), **FAST)
    events = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    offline = [e for e in events if e["event"] == "rac_offline"]
    assert offline and 0.0 <= offline[0]["label_agreement"] <= 1.0
    assert os.path.exists(tmp_path / "final" / "config.json")


def test_bash_rows_predicts_a_subset_trained_for_several_epochs(tokenizer, examples, tmp_path):
    model = tiny_model(tokenizer)
    train(model, tokenizer, examples, method="bash", steps_per_iteration=4, bash_rows=16,
          out_dir=str(tmp_path), **FAST)
    events = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    offline = [e for e in events if e["event"] == "offline"]
    assert offline[0]["rows"] == 16  # 4 steps x 8 rows = 2 epochs over the 16 predicted rows


def test_rac_soft_targets_train(tokenizer, examples):
    model = tiny_model(tokenizer)
    losses = []
    train(model, tokenizer, examples, method="rac", rac_mode="all", steps_per_iteration=2,
          rac_prompts=8, on_step=lambda r: losses.append(r["loss"]), **FAST)
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)


@pytest.mark.parametrize("bad, match", [
    (dict(method="dpo"), "method"),
    (dict(beta=1.5), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(rac_mode="nearest"), "rac_mode"),
    (dict(batch_size=0), "batch_size"),
    (dict(bash_rows=0), "bash_rows"),
])
def test_bad_config(tokenizer, examples, bad, match):
    with pytest.raises(ValueError, match=match):
        train(tiny_model(tokenizer), tokenizer, examples, **{**FAST, **bad})


def test_packing_refused_where_attention_would_mix_examples(tokenizer, examples):
    """Packing is refused under an attention that does not keep packed examples apart (sdpa in
    transformers 5.x does, see tests/test_seams.py)."""
    model = tiny_model(tokenizer)
    model.config._attn_implementation = "an_attention_that_ignores_position_ids"
    with pytest.raises(ValueError, match="packing"):
        train(model, tokenizer, examples, **{**FAST, "packing": True})


def test_no_examples(tokenizer):
    with pytest.raises(ValueError, match="train_examples"):
        train(tiny_model(tokenizer), tokenizer, [], **FAST)


def test_checkpoint_from_another_model_is_refused(tokenizer, examples, tmp_path):
    train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=1,
          out_dir=str(tmp_path), **FAST)
    from gapfix.models import tiny_llama

    other = tiny_llama(tokenizer, hidden_size=64, num_layers=1, num_heads=2, seed=0)
    with pytest.raises(ValueError, match="another model"):
        train(other, tokenizer, examples, method="sft", iterations=2, steps_per_iteration=1,
              out_dir=str(tmp_path), **FAST)


def test_bash_predicts_only_the_rows_the_steps_draw(tokenizer, examples, monkeypatch):
    import gapfix.methods.bash as bash

    predicted = []
    real = bash.predict_alternatives

    def counting(model, input_ids, *args, **kwargs):
        predicted.append(input_ids.shape[0])
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(bash, "predict_alternatives", counting)
    train(tiny_model(tokenizer), tokenizer, examples, method="bash", steps_per_iteration=2, **FAST)
    assert 0 < sum(predicted) <= 2 * FAST["batch_size"] < len(examples)


def _mid_iteration_state(tokenizer, examples, out):
    """The trainer state of the checkpoint taken after step 1 of a 3-step iteration."""
    from gapfix.checkpoint import read_trainer_state

    train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=3, save_every=1,
          keep_checkpoints=10, out_dir=str(out), **FAST)
    path = out / "checkpoints" / "iter000-step0000001"
    return read_trainer_state(str(path)), os.path.getsize(path / "trainer_state.json")


def test_checkpoint_refers_to_the_rows_and_its_size_does_not_grow_with_the_data(tokenizer, examples,
                                                                                 tmp_path):
    small, small_size = _mid_iteration_state(tokenizer, examples[:24], tmp_path / "small")
    large, large_size = _mid_iteration_state(tokenizer, examples * 4, tmp_path / "large")
    assert small["rows"]["rows"] == 24 and large["rows"]["rows"] == 4 * len(examples)
    assert small["rows"]["files"] == ["iterations/iter000/part-00000-of-00001.arrow"]
    assert abs(large_size - small_size) < 16  # the row count's digits; no row inside


def test_resume_refuses_rows_that_changed_or_lead_outside_out(tokenizer, examples, tmp_path):
    from gapfix.checkpoint import CheckpointError, open_rows

    out = tmp_path / "run"
    state, _ = _mid_iteration_state(tokenizer, examples, out)
    (rows_file,) = state["rows"]["files"]
    assert len(open_rows(str(out), state["rows"])) == len(examples)
    with pytest.raises(CheckpointError, match="outside|not a path inside"):
        open_rows(str(out), {**state["rows"], "files": ["../" + os.path.basename(rows_file)]})
    with pytest.raises(CheckpointError, match="malformed"):
        open_rows(str(out), {"files": "x"})
    with open(out / rows_file, "r+b") as handle:  # one byte of the rows changed
        handle.seek(os.path.getsize(out / rows_file) // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 1]))
    # the newest checkpoint is the iteration's end (no rows): resume from the one after step 2
    (out / "checkpoints" / "latest").write_text("iter000-step0000002")
    with pytest.raises(CheckpointError, match="changed since the checkpoint"):
        train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=3, save_every=1,
              keep_checkpoints=10, out_dir=str(out), **FAST)


def test_without_out_dir_rows_go_to_a_temporary_folder_removed_after(tokenizer, examples, monkeypatch):
    import tempfile

    made = []
    real = tempfile.mkdtemp

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", recording)
    train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=1, **FAST)
    assert [os.path.basename(p).startswith("gapfix-rows-") for p in made] == [True]
    assert not os.path.exists(made[0])


def test_a_tokenized_dataset_trains_like_the_examples(tokenizer, examples):
    """train() takes a datasets.Dataset (load_tokenized's columns), read through an ExampleTable."""
    from gapfix.data.arrow import dataset_from_examples

    config = dict(method="bash", steps_per_iteration=2, beta=0.5, **FAST)
    listed = losses_and_params(tokenizer, examples, **config)
    dataset = losses_and_params(tokenizer, dataset_from_examples(examples), **config)
    assert listed[0] == dataset[0]
    assert_same_params(listed[1], dataset[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["parquet", "folder"])
def test_cli_trains_on_parquet_and_a_saved_dataset_folder(tmp_path, kind):
    """gapfix train --train takes a Parquet file or a save_to_disk folder (through load_tokenized);
    an example longer than the context is dropped and counted in summary.json as for JSONL."""
    import datasets

    from gapfix.cli import main

    records = [{"prompt": f"{a} + {a} =", "response": f"{2 * a}"} for a in range(7)]
    records.append({"prompt": " ".join(str(i % 10) for i in range(4000)), "response": "1"})
    dataset = datasets.Dataset.from_list(records)
    source = tmp_path / ("data.parquet" if kind == "parquet" else "data")
    dataset.to_parquet(str(source)) if kind == "parquet" else dataset.save_to_disk(str(source))
    out = tmp_path / "run"
    assert main(["train", "--train", str(source), "--out", str(out), "--model", "tiny", "--steps-per-iteration",
                 "2", "--batch-size", "2", "--progress", "false"]) == 0
    report = json.loads((out / "summary.json").read_text())
    assert report["steps"] == 2
    assert report["data"]["train"]["examples"] == 7 and report["data"]["train"]["too_long"] == 1


def test_finished_iterations_rows_are_removed_once_no_checkpoint_needs_them(tokenizer, examples, tmp_path):
    out = tmp_path / "run"
    train(tiny_model(tokenizer), tokenizer, examples, method="sft", iterations=2, steps_per_iteration=2,
          save_every=1, out_dir=str(out), **FAST)  # keep_checkpoints=1: the last, between iterations
    assert (out / "iterations").is_dir() and not os.listdir(out / "iterations")
    kept = tmp_path / "kept"
    train(tiny_model(tokenizer), tokenizer, examples, method="sft", iterations=2, steps_per_iteration=2,
          save_every=1, keep_checkpoints=3, out_dir=str(kept), **FAST)
    # kept: step 3 (iteration 1, mid), step 4 (end); iteration 0's rows are referenced by none
    assert sorted(os.listdir(kept / "iterations")) == ["iter001"]
