"""Checkpoints: data only, inside --out, same settings on resume, clean metrics, disk full."""
# ruff: noqa: F811  (pytest fixtures imported from test_trainer are parameters here)
import errno
import json
import os
import pickle
import subprocess

import pytest
import torch
from test_trainer import (  # noqa: F401
    FAST,
    assert_same_params,
    examples,
    params,
    tiny_model,
    tokenizer,
    train_killed_after,
)

from gapfix import checkpoint as ckpt
from gapfix.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from gapfix.trainer import TrainConfig, train

pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def finished_run(tokenizer, examples, tmp_path_factory):
    """An out folder holding a one-step SFT run and its checkpoint."""
    out = str(tmp_path_factory.mktemp("finished"))
    train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=1,
          out_dir=out, **FAST)
    return out


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def copy_run(source, target):
    subprocess.run(["cp", "-a", source, str(target)], check=True)
    return str(target)


# ---------------------------------------------------------------- nothing unpickled


class RunsCode:
    """Unpickling this runs a shell command (what a hostile trainer_state.pt would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_trainer_state_is_refused_and_runs_nothing(tokenizer, examples, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    checkpoint = latest_checkpoint(out)
    for name in (ckpt.STATE_JSON, ckpt.STATE_TENSORS):
        os.remove(os.path.join(checkpoint, name))
    marker = tmp_path / "code-ran"
    with open(os.path.join(checkpoint, "trainer_state.pt"), "wb") as handle:
        pickle.dump({"fingerprint": RunsCode(marker)}, handle)
    with pytest.raises(CheckpointError, match="trainer_state.pt.*pickled"):
        train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=1,
              out_dir=out, **FAST)
    assert not marker.exists()


def test_checkpoint_holds_no_pickle(finished_run):
    checkpoint = latest_checkpoint(finished_run)
    names = sorted(os.listdir(checkpoint))
    assert names == ["model", ckpt.STATE_JSON, ckpt.STATE_TENSORS]
    for _parent, _dirs, files in os.walk(checkpoint):
        for name in files:
            assert not name.endswith((".pt", ".bin", ".pkl", ".pickle")), name
    with open(os.path.join(checkpoint, ckpt.STATE_JSON)) as handle:
        document = json.load(handle)
    assert document["format"] == ckpt.FORMAT


def test_state_encoding_round_trips_plain_types_and_refuses_others():
    state = {"state": {0: {"step": torch.tensor(3.0), "m": torch.arange(5.0)}},
             "groups": [{"betas": (0.9, 0.999), "params": [0, 1], "foreach": None}],
             "rng": (3, (1, 2), None), "__tensor__": "a key that looks like a tag"}
    encoded, tensors = ckpt.encode_state(state)
    decoded = ckpt.decode_state(json.loads(json.dumps(encoded)), tensors, "x.json")
    assert decoded["groups"][0]["betas"] == (0.9, 0.999) and decoded["rng"] == (3, (1, 2), None)
    assert list(decoded["state"]) == [0] and torch.equal(decoded["state"][0]["m"], torch.arange(5.0))
    assert decoded["__tensor__"] == "a key that looks like a tag"
    with pytest.raises(TypeError, match=r"state\.bad.*set"):
        ckpt.encode_state({"bad": {1, 2}})
    with pytest.raises(CheckpointError, match="x.json.*t9"):
        ckpt.decode_state({"__tensor__": "t9"}, tensors, "x.json")


@pytest.mark.parametrize("damage", ["garbage", "deep", "no-tensors"])
def test_damaged_trainer_state_is_refused_naming_the_file(tokenizer, finished_run, tmp_path, damage):
    out = copy_run(finished_run, tmp_path / "run")
    checkpoint = latest_checkpoint(out)
    if damage == "no-tensors":
        os.remove(os.path.join(checkpoint, ckpt.STATE_TENSORS))
        name = ckpt.STATE_TENSORS
    else:
        text = b"\xff{not json" if damage == "garbage" else b"[" * 100000
        with open(os.path.join(checkpoint, ckpt.STATE_JSON), "wb") as handle:
            handle.write(text)
        name = ckpt.STATE_JSON
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(checkpoint, tiny_model(tokenizer))


# ---------------------------------------------------------------- the latest pointer


@pytest.mark.parametrize("pointer", ["../../elsewhere/ck", "absolute", "symlinked-checkpoint",
                                     "symlinked-pointer", "iter000-step0000001/../iter000-step0000001"])
def test_latest_pointer_must_name_a_checkpoint_inside_out(tokenizer, examples, finished_run, tmp_path,
                                                          pointer):
    elsewhere = copy_run(finished_run, tmp_path / "elsewhere")
    out = copy_run(finished_run, tmp_path / "run")
    root = os.path.join(out, "checkpoints")
    target = latest_checkpoint(elsewhere)
    latest = os.path.join(root, "latest")
    if pointer == "absolute":
        text = target
    elif pointer == "symlinked-checkpoint":
        text = "iter007-step0000099"
        os.symlink(target, os.path.join(root, text))
    elif pointer == "symlinked-pointer":
        os.remove(latest)
        os.symlink(os.path.join(elsewhere, "checkpoints", "latest"), latest)
        text = None
    else:
        text = pointer
    if text is not None:
        with open(latest, "w") as handle:
            handle.write(text)
    with pytest.raises(CheckpointError, match="latest"):
        latest_checkpoint(out)
    with pytest.raises(ValueError, match="latest|is a symbolic link"):  # a link: refused with --out's check
        train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=1,
              out_dir=out, **FAST)


# ---------------------------------------------------------------- same settings


def test_resume_with_other_settings_is_refused_naming_them(tokenizer, examples, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    changed = dict(FAST, lr=0.5)
    with pytest.raises(CheckpointError, match=r"lr: 0\.003 -> 0\.5.*method: 'sft' -> 'bash'"):
        train(tiny_model(tokenizer), tokenizer, examples, method="bash", steps_per_iteration=1,
              out_dir=out, **changed)
    # settings that do not change what is trained may differ
    train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=1,
          out_dir=out, log_every=3, save_every=5, **FAST)
    # and the user may insist
    result = train(tiny_model(tokenizer), tokenizer, examples, method="sft", iterations=2,
                   steps_per_iteration=1, out_dir=out, resume_with_changed_config=True, **FAST)
    assert result.steps == 2
    events = metrics(out)
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed[-1]["config_changes"] == ["iterations: 1 -> 2"]


# ---------------------------------------------------------------- metrics after resume


def test_metrics_after_a_resume_read_like_an_uninterrupted_run(tokenizer, examples, tmp_path):
    config = dict(method="sft", iterations=2, steps_per_iteration=3, log_every=1, save_every=2, **FAST)

    def step_records(out):
        return [(e["step"], e["loss"]) for e in metrics(out) if e["event"] == "step"]

    straight = str(tmp_path / "straight")
    train(tiny_model(tokenizer), tokenizer, examples, out_dir=straight, **config)

    resumed = str(tmp_path / "resumed")
    train_killed_after(5, tiny_model(tokenizer), tokenizer, examples, out_dir=resumed, **config)
    train(tiny_model(tokenizer, seed=3), tokenizer, examples, out_dir=resumed, **config)
    assert [s for s, _ in step_records(resumed)] == [1, 2, 3, 4, 5, 6]
    assert step_records(resumed) == step_records(straight)


def test_a_run_that_starts_over_starts_its_log_over(tokenizer, examples, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=1,
          out_dir=out, resume=False, **FAST)
    events = metrics(out)
    assert [e["step"] for e in events if e["event"] == "step"] == [1]


# ---------------------------------------------------------------- disk full, fsync


def test_disk_full_while_writing_trainer_state_names_it_and_keeps_previous(tokenizer, examples,
                                                                           tmp_path, monkeypatch):
    """A fake full disk under the trainer state's write: the error says so and names the file."""
    real_open = open
    saved = {}

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def fake_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(ckpt.STATE_TENSORS) and "step0000002" in str(path):
            return FullDisk(handle)
        return handle

    monkeypatch.setattr(ckpt, "open", fake_open, raising=False)
    out = str(tmp_path / "run")
    model = tiny_model(tokenizer)
    with pytest.raises(OSError, match="no space left on device.*step0000002.tmp/trainer_state"):
        train(model, tokenizer, examples, method="sft", steps_per_iteration=3, save_every=1,
              out_dir=out, on_step=lambda r: saved.setdefault(r["step"], params(model)), **FAST)
    monkeypatch.undo()
    before = latest_checkpoint(out)
    assert before.endswith("step0000001")
    assert not [d for d in os.listdir(os.path.join(out, "checkpoints")) if d.endswith(".tmp")]
    fresh = tiny_model(tokenizer, seed=9)
    state = load_checkpoint(before, fresh)
    assert state["position"]["global_step"] == 1
    assert_same_params(saved[1], params(fresh), rtol=0, atol=0)


def folder_blocks(path, block=4096):
    """Bytes the files under `path` take on a filesystem of `block`-byte blocks."""
    return sum(-(-os.path.getsize(os.path.join(p, f)) // block) * block
               for p, _d, fs in os.walk(path) for f in fs)


def test_real_full_disk_says_so_and_keeps_previous_checkpoint(tokenizer, examples, small_tmpfs, tmp_path):
    """On a real (tmpfs) full disk: fill it after the first checkpoint, so that the second
    checkpoint's model fits and its trainer state does not."""
    from gapfix.data import sft_row
    from gapfix.data.arrow import write_rows

    out = str(small_tmpfs / "run")
    rows_file = write_rows(tmp_path / "rows.arrow", [sft_row(ex) for ex in examples])

    def fill_disk(iteration, model):
        if iteration:
            return
        first = latest_checkpoint(out)
        model_size = folder_blocks(os.path.join(first, "model"))
        free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
        rows_size = -(-os.path.getsize(rows_file) // 4096) * 4096  # iteration 1 writes these rows
        leave = model_size + rows_size + 4 * 4096  # the trainer state (~2x the weights) cannot fit
        with open(small_tmpfs / "filler", "wb") as handle:
            handle.write(b"\0" * max(0, free - leave))

    model = tiny_model(tokenizer)
    with pytest.raises(OSError, match="no space left on device while writing .*trainer_state"):
        train(model, tokenizer, examples, method="sft", iterations=2, steps_per_iteration=1,
              out_dir=out, on_iteration_end=fill_disk, **FAST)
    before = latest_checkpoint(out)
    assert before.endswith("iter001-step0000001")
    os.remove(small_tmpfs / "filler")
    assert not [d for d in os.listdir(os.path.join(out, "checkpoints")) if d.endswith(".tmp")]
    assert load_checkpoint(before, tiny_model(tokenizer, seed=4))["position"]["global_step"] == 1


def test_checkpoint_files_are_fsynced_before_the_rename_that_publishes_them(tokenizer, tmp_path,
                                                                           monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.fspath(source)))
        return real_replace(source, target)

    model = tiny_model(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = ckpt.save_checkpoint(str(tmp_path), model=model, tokenizer=tokenizer,
                                 optimizer_state=optimizer.state_dict(), scheduler=scheduler,
                                 position={"iteration": 0, "step_in_iteration": 0, "global_step": 0},
                                 rows=None, config=TrainConfig())
    monkeypatch.undo()
    tmp = final + ".tmp"
    publish = events.index(("replace", tmp))
    synced = {path for kind, path in events[:publish] if kind == "fsync"}
    for parent, _dirs, files in os.walk(final):
        for name in files + [""]:
            path = os.path.join(parent, name).rstrip("/").replace(final, tmp, 1)
            assert path in synced, path
    pointer = events.index(("replace", os.path.join(str(tmp_path), "checkpoints", "latest.tmp")))
    assert publish < pointer
    assert ("fsync", os.path.join(str(tmp_path), "checkpoints", "latest.tmp")) in events[publish:pointer]
