"""Hostile and careless input: help text, the --out folder (links, a second
run), chat templates that refuse or never finish, token ids past the vocabulary, a full disk, the
data cache's fingerprints, durable rows, crafted checkpoint state, and non-finite training."""
import errno
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from test_failures import TRAIN, one_line_error, records, write
from test_trainer import FAST, tiny_model

from gapfix import checkpoint as ckpt
from gapfix.cli import COMMANDS, main
from gapfix.data import DataError, encode_record, math_task
from gapfix.trainer import train

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return math_task.math_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    from gapfix.data import encode_example

    return [encode_example(tokenizer, p["prompt"], p["response"], p)
            for p in math_task.make_split("train", 32, seed=5)]


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command", [None, *sorted(COMMANDS)])
def test_help_of_gapfix_and_of_every_command_prints(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gapfix")
    if command is None:
        assert "95%" in out and "%%" not in out  # compare's line, with its literal percent sign
        assert all(name in out for name in COMMANDS)


# ---------------------------------------------------------------- nothing written through a link


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "data_cache", "iterations", "final",
                                  "checkpoints/latest.tmp"])
def test_a_link_in_out_leading_elsewhere_is_refused_and_its_target_untouched(tmp_path, capsys, name):
    data = write(tmp_path / "data.jsonl", records(8))
    out = tmp_path / "run"
    victim = tmp_path / "victim"
    if name in ("data_cache", "iterations", "final"):
        victim.mkdir()
        (victim / "keep.txt").write_text("precious")
    else:
        victim.write_text("precious\n")
    link = out / name
    link.parent.mkdir(parents=True)
    link.symlink_to(victim)
    assert main(["train", "--train", data, "--out", str(out), "--no-resume", *TRAIN]) == 2
    line = one_line_error(capsys, "train")
    assert str(link) in line and "symbolic link" in line
    if victim.is_dir():
        assert os.listdir(victim) == ["keep.txt"] and (victim / "keep.txt").read_text() == "precious"
    else:
        assert victim.read_text() == "precious\n"


def test_the_trainer_refuses_a_linked_metrics_file_too(tokenizer, examples, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(ValueError, match="metrics.jsonl is a symbolic link"):
        train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=1, out_dir=str(out),
              **FAST)
    assert victim.read_text() == "precious\n"


def test_a_hard_linked_metrics_file_is_not_written(tmp_path):
    from gapfix.outdir import OutDirError, open_file

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.link(victim, tmp_path / "metrics.jsonl")
    for mode in ("a", "w", "r+b"):
        with pytest.raises(OutDirError, match="2 hard links"):
            open_file(str(tmp_path / "metrics.jsonl"), mode)
    assert victim.read_text() == "precious\n"


def test_a_refused_run_leaves_no_out_folder_behind(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--train", str(tmp_path / "missing.jsonl"), "--out", str(out), *TRAIN]) == 2
    assert "does not exist" in one_line_error(capsys, "train")
    assert not out.exists()


# ---------------------------------------------------------------- one run per --out


HOLD_LOCK = """
import sys, time
from gapfix.outdir import claim
with claim(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_into_the_same_out_is_refused_naming_the_first(tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", records(8))
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "--train", data, "--out", str(out), *TRAIN]) == 2
        line = one_line_error(capsys, "train")
        assert str(out) in line and "in use by another gapfix run" in line and f"pid {holder.pid}" in line
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--train", data, "--out", str(out), *TRAIN]) == 0  # the lock went with its holder


def test_claims_nest_within_one_process(tmp_path):
    from gapfix.outdir import claim

    with claim(str(tmp_path / "run")):
        with claim(str(tmp_path / "run")):  # the CLI claims --out, then train() claims out_dir
            pass
        with claim(str(tmp_path / "run")):
            pass


# ---------------------------------------------------------------- crafted checkpoint state


@pytest.fixture(scope="module")
def finished_run(tokenizer, examples, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished"))
    train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=2, save_every=1,
          out_dir=out, **FAST)
    return out


def crafted(finished_run, tmp_path, edit):
    out = str(tmp_path / "run")
    subprocess.run(["cp", "-a", finished_run, out], check=True)
    latest = ckpt.latest_checkpoint(out)
    path = os.path.join(latest, ckpt.STATE_JSON)
    with open(path) as handle:
        document = json.load(handle)
    edit(document["state"])
    with open(path, "w") as handle:
        json.dump(document, handle)
    return out, path


@pytest.mark.parametrize("field, value, needle", [
    ("iteration", 10**9, "position.iteration is 1000000000, outside [0, 1]"),
    ("iteration", "1", "position.iteration is '1', not a step count"),
    ("global_step", 10**9, "position.global_step is 1000000000, outside [2, 2]"),
    ("global_step", -1, "position.global_step is -1"),
    ("step_in_iteration", 10**9, "position.step_in_iteration is 1000000000, outside [0, 0]"),
    ("step_in_iteration", None, "position.step_in_iteration is None"),
    (None, None, "field position holds ['global_step', 'iteration']"),
])
def test_a_crafted_position_is_refused_naming_the_field(tokenizer, examples, finished_run, tmp_path, field,
                                                        value, needle):
    def edit(state):
        if field is None:
            del state["position"]["step_in_iteration"]
        else:
            state["position"][field] = value

    out, path = crafted(finished_run, tmp_path, edit)
    with pytest.raises(ckpt.CheckpointError) as refused:
        train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=2, save_every=1,
              out_dir=out, **FAST)
    assert needle in str(refused.value) and path in str(refused.value)


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.update(position=[0, 0, 2]), "field position is a list"),
    (lambda s: s.update(config="sft"), "field config is a str"),
    (lambda s: s.update(metrics_bytes="12"), "field metrics_bytes is '12'"),
    (lambda s: s["scheduler"].update(last_epoch="2"), "field scheduler"),
    (lambda s: s["rng"].update(python={"__tuple__": [3, "x", None]}), "field rng cannot be restored"),
    (lambda s: s["optimizer"].update(param_groups=[]), "field optimizer cannot be restored"),
])
def test_crafted_state_fields_are_refused_naming_them(tokenizer, examples, finished_run, tmp_path, edit, needle):
    out, path = crafted(finished_run, tmp_path, edit)
    with pytest.raises(ckpt.CheckpointError) as refused:
        train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=2, save_every=1,
              out_dir=out, **FAST)
    assert needle in str(refused.value) and path in str(refused.value)


def test_a_crafted_position_is_one_line_exit_2_on_the_command_line(tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", records(8))
    out = str(tmp_path / "run")
    assert main(["train", "--train", data, "--out", out, *TRAIN]) == 0
    path = os.path.join(ckpt.latest_checkpoint(out), ckpt.STATE_JSON)
    with open(path) as handle:
        document = json.load(handle)
    document["state"]["position"]["iteration"] = 10**9
    with open(path, "w") as handle:
        json.dump(document, handle)
    capsys.readouterr()
    assert main(["train", "--train", data, "--out", out, *TRAIN]) == 2
    line = one_line_error(capsys, "train")
    assert path in line and "position.iteration" in line


# ---------------------------------------------------------------- non-finite training


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_saves_nothing_after(tokenizer, examples,
                                                                                   tmp_path):
    out = str(tmp_path / "run")
    steps = []
    with pytest.raises(ckpt.NonFiniteTrainingError, match=r"loss is nan.*lower --lr \(now 1e\+09\)") as stopped:
        train(tiny_model(tokenizer), tokenizer, examples, method="sft", steps_per_iteration=6, save_every=1,
              out_dir=out, on_step=steps.append, **{**FAST, "lr": 1e9})
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    stopped_at = int(str(stopped.value).split("global step ")[1].split()[0])
    assert stopped_at == len(steps) + 1 < 6
    assert not os.path.exists(os.path.join(out, "final"))
    latest = ckpt.latest_checkpoint(out)
    assert latest is None or latest.endswith(f"step{len(steps):07d}")
    if latest:
        from safetensors.torch import load_file

        weights = load_file(os.path.join(latest, "model", "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_non_finite_weights_are_never_saved(tokenizer, examples, tmp_path):
    model = tiny_model(tokenizer)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(ckpt.NonFiniteTrainingError, match="NaN or infinite weights: not saved"):
        ckpt.check_finite_weights(model)


def test_the_command_line_names_a_diverged_run_in_one_line(tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", records(16))
    assert main(["train", "--train", data, "--out", str(tmp_path / "run"), *TRAIN, "--lr", "1e9",
                 "--steps-per-iteration", "8", "--seed", "0"]) == 2
    assert "training diverged" in one_line_error(capsys, "train")
    assert not (tmp_path / "run" / "final").exists()


def test_compare_marks_a_diverged_run_failed(tokenizer, examples, tmp_path):
    from gapfix.compare import markdown, run_compare
    from gapfix.trainer import TrainConfig

    def make_base(seed):
        return tiny_model(tokenizer, seed=seed)

    def evaluate(model):
        return {"accuracy": [1.0, 0.0, 1.0]}

    config = TrainConfig(**{**FAST, "lr": 1e9})
    analysis = run_compare(make_base, tokenizer, examples, evaluate=evaluate, methods=("sft",), seeds=1,
                           extra_steps=8, config=config, log=lambda line: None, draws=50)
    sft = next(r for r in analysis["runs"] if r["method"] == "sft")
    assert "training diverged" in sft["failed"] and sft["per_example"] == {}
    assert analysis["failed"] == [{"seed": 0, "method": "sft", "why": sft["failed"]}]
    assert "sft - base" not in analysis["differences"] or not analysis["differences"]["sft - base"]
    report = markdown(analysis)
    assert "| sft (FAILED: seed 0) | - |" in report and "FAILED: sft seed 0" in report
    assert "no difference detected" not in report


# ---------------------------------------------------------------- items 5 and 14: chat templates


PLAIN_CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
NO_SYSTEM_TURN = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}" + PLAIN_CHAT)
NESTED_LOOPS = ("{% if messages[0]['role'] == 'system' %}{% for i in range(100000) %}{% for j in range(100000) %}"
                "{% endfor %}{% endfor %}{% endif %}" + PLAIN_CHAT)
SANDBOX_REFUSAL = "{% if messages[0]['role'] == 'system' %}{% set x = [] %}{{ x.append(1) }}{% endif %}" + PLAIN_CHAT
CHAT_WORDS = ["user", "assistant", "system", ":", "be", "brief", "1", "2", "3", "4", "+", "="]


def chat_tokenizer(template):
    from gapfix.models import train_tokenizer

    return train_tokenizer([" ".join(CHAT_WORDS)], kind="word", add_bos=True, chat_template=template)


def chat_record(system=False, a=1, b=2):
    turns = [{"role": "system", "content": "be brief"}] if system else []
    turns += [{"role": "user", "content": f"{a} + {b} ="}, {"role": "assistant", "content": f"{a + b}"}]
    return json.dumps({"messages": turns})


def chat_file(tmp_path):
    return write(tmp_path / "chat.jsonl", [chat_record(a=1, b=2), chat_record(system=True), chat_record(a=2, b=1),
                                           chat_record(a=1, b=1)])


@pytest.mark.parametrize("template, reason", [
    (NO_SYSTEM_TURN, "the chat template refused the record (System role not supported)"),
    (SANDBOX_REFUSAL, "the chat template refused the record (SecurityError: access to attribute 'append'"),
    (NESTED_LOOPS, "the chat template did not finish rendering the record within 0.5 s"),
])
def test_a_chat_template_that_refuses_or_never_ends_names_the_record(tmp_path, monkeypatch, template, reason):
    from gapfix import data
    from gapfix.data import load_examples
    from gapfix.data.arrow import load_tokenized

    monkeypatch.setattr(data, "CHAT_TEMPLATE_SECONDS", 0.5)
    path = chat_file(tmp_path)
    tok = chat_tokenizer(template)
    for load in (load_examples, lambda *a, **k: load_tokenized(*a, cache_dir=str(tmp_path / "cache"), **k)):
        started = time.monotonic()
        with pytest.raises(DataError) as refused:
            load(path, tok)
        assert str(refused.value).startswith(f"{path}:2: {reason}"), str(refused.value)
        report = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = load(path, tok, on_error="skip", report=report)
        assert len(kept) == 3 and report["unusable_records"] == 1
        assert time.monotonic() - started < 30


def test_the_time_limit_holds_in_a_thread_and_leaves_nothing_pending(monkeypatch):
    import threading

    from gapfix import data

    monkeypatch.setattr(data, "CHAT_TEMPLATE_SECONDS", 0.3)
    tok = chat_tokenizer(NESTED_LOOPS)
    outcome = []

    def work():
        try:
            encode_record(json.loads(chat_record(system=True)), tok, "x.jsonl:7")
        except DataError as err:
            outcome.append(str(err))
        outcome.append(encode_record(json.loads(chat_record()), tok, "x.jsonl:8"))  # unaffected
        time.sleep(0.5)  # no late exception arrives after the guard
        outcome.append("done")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert outcome[0].startswith("x.jsonl:7: the chat template did not finish") and outcome[-1] == "done"


def test_train_honours_on_error_for_a_refusing_chat_template(tmp_path, capsys):
    from gapfix.models import save_model, tiny_llama

    tok = chat_tokenizer(NO_SYSTEM_TURN)
    model_dir = tmp_path / "model"
    save_model(tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0), tok, model_dir)
    path = chat_file(tmp_path)
    args = ["train", "--model", str(model_dir), "--train", path, "--out", str(tmp_path / "run"),
            "--steps-per-iteration", "1", "--batch-size", "2", "--progress", "false"]
    assert main(args) == 2
    assert f"{path}:2: the chat template refused the record (System role not supported)" in \
        one_line_error(capsys, "train")
    with pytest.warns(UserWarning, match="skipped 1 unusable record"):
        assert main([*args, "--on-error", "skip"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data"]["train"]["unusable_records"] == 1


# ---------------------------------------------------------------- ids past the vocabulary


def tokenized_parquet(path, answer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt_ids": [[1, 5, 6]] * 4, "answer_ids": [[7, 2]] * 3 + [answer]},
                     schema=pa.schema([("prompt_ids", pa.list_(pa.int64())), ("answer_ids", pa.list_(pa.int64()))]))
    pq.write_table(table, path)
    return str(path)


@pytest.mark.parametrize("method", ["sft", "bash"])
def test_ids_past_the_vocabulary_are_named_with_file_and_column(tmp_path, capsys, model_dir, method):
    from gapfix.models import load_model

    vocab = load_model(model_dir)[0].get_input_embeddings().num_embeddings
    args = ["train", "--model", model_dir, "--out", str(tmp_path / "run"), "--method", method,
            "--steps-per-iteration", "1", "--batch-size", "2", "--progress", "false"]
    huge = tokenized_parquet(tmp_path / "huge.parquet", [2**40, 2])
    assert main([*args, "--train", huge]) == 2
    assert f"{huge}: column answer_ids, row 3: token id 1099511627776 is outside [0, 2**31)" in \
        one_line_error(capsys, "train")
    past = tokenized_parquet(tmp_path / "past.parquet", [vocab + 3, 2])
    assert main([*args, "--train", past]) == 2
    assert f"{past}: example 3 (answer_ids) holds token id {vocab + 3}, outside the model's vocabulary " \
           f"[0, {vocab})" in one_line_error(capsys, "train")


@pytest.mark.parametrize("method", ["sft", "bash", "rac"])
def test_train_refuses_examples_past_the_vocabulary_for_every_method(tokenizer, examples, method):
    from gapfix.data import Example

    model = tiny_model(tokenizer)
    vocab = model.get_input_embeddings().num_embeddings
    bad = [*examples[:5], Example([1, 2, vocab], [3, tokenizer.eos_token_id])]
    with pytest.raises(DataError, match=rf"train_examples: example 5 \(prompt_ids\) holds token id {vocab}"):
        train(model, tokenizer, bad, method=method, steps_per_iteration=1, **FAST)


# ---------------------------------------------------------------- disk full, named


def test_disk_full_while_tokenizing_is_one_line_naming_the_cache(tmp_path, capsys, monkeypatch, model_dir):
    from datasets import arrow_writer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for name in ("write", "write_batch", "write_table"):
        monkeypatch.setattr(arrow_writer.ArrowWriter, name, full)
    data = write(tmp_path / "data.jsonl", records(8))
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--train", data, "--out", str(out), *TRAIN[2:]]) == 2
    line = one_line_error(capsys, "train")
    assert f"no space left on device while writing the data cache {out / 'data_cache'}" in line and data in line


def test_a_real_full_disk_while_tokenizing_is_one_line(tmp_path, capsys, small_tmpfs, model_dir):
    problem = " + ".join(["1 2 3 4 5 6 7 8 9"] * 40)
    data = write(tmp_path / "big.jsonl", [json.dumps({"prompt": problem, "response": "7"})] * 8000)  # 10 MB
    out = small_tmpfs / "run"
    assert main(["train", "--model", model_dir, "--train", data, "--out", str(out), *TRAIN[2:]]) == 2
    line = one_line_error(capsys, "train")
    assert f"no space left on device while writing the data cache {out / 'data_cache'}" in line


def test_disk_full_while_writing_rows_names_the_file(small_tmpfs):
    from gapfix.data.arrow import write_rows

    path = small_tmpfs / "rows.arrow"
    rows = ({"input_ids": list(range(1000)), "labels": list(range(1000))} for _ in range(2000))  # 16 MB
    with pytest.raises(OSError, match=f"no space left on device while writing {path}") as full:
        write_rows(path, rows)
    assert full.value.errno == errno.ENOSPC
    assert os.listdir(small_tmpfs) == []  # nothing half-written is left


# ---------------------------------------------------------------- the data cache's fingerprints


def rewrite_arrow(path, edit):
    """Rewrites a datasets cache file (an Arrow stream) with edit(table)'s table: still valid Arrow."""
    import pyarrow as pa

    with pa.memory_map(path) as source:
        table = pa.ipc.open_stream(source).read_all()
    table = edit(table)
    with pa.OSFile(path, "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)


def shifted_answers(table):
    import pyarrow as pa

    index = table.schema.get_field_index("answer_ids")
    answers = [[token + 1 for token in ids] for ids in table.column("answer_ids").to_pylist()]
    return table.set_column(index, "answer_ids", pa.array(answers, type=table.schema.field("answer_ids").type))


def reversed_texts(table):
    import pyarrow as pa

    index = table.schema.get_field_index("text")
    texts = [[text[::-1] for text in chunk] for chunk in table.column("text").to_pylist()]
    return table.set_column(index, "text", pa.array(texts, type=table.schema.field("text").type))


@pytest.mark.parametrize("which, damage", [
    ("gapfix-tokenized-*.arrow", "edit"), ("gapfix-tokenized-*.arrow", "truncate"),
    ("generator/**/*.arrow", "edit"), ("generator/**/*.arrow", "truncate"),
])
def test_a_changed_data_cache_file_is_refused_naming_it(tmp_path, which, damage):
    import glob

    from gapfix.data.arrow import ExampleTable, load_tokenized

    tok = math_task.math_tokenizer()
    data = write(tmp_path / "data.jsonl", records(12))
    cache = str(tmp_path / "cache")
    first = [e.answer_ids for e in ExampleTable(load_tokenized(data, tok, cache_dir=cache))]
    assert [e.answer_ids for e in ExampleTable(load_tokenized(data, tok, cache_dir=cache))] == first
    path, = glob.glob(os.path.join(cache, which), recursive=True)
    if damage == "edit":
        rewrite_arrow(path, shifted_answers if "tokenized" in which else reversed_texts)
    else:
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match=f"{path}: the data cache file changed since it was written"):
        load_tokenized(data, tok, cache_dir=cache)


def test_a_tampered_cache_is_named_on_the_command_line(tmp_path, capsys, model_dir):
    import glob

    data = write(tmp_path / "data.jsonl", records(8))
    out = tmp_path / "run"
    args = ["train", "--model", model_dir, "--train", data, "--out", str(out), *TRAIN[2:]]
    assert main(args) == 0
    path, = glob.glob(str(out / "data_cache" / "gapfix-tokenized-*.arrow"))
    rewrite_arrow(path, shifted_answers)
    capsys.readouterr()
    assert main([*args, "--no-resume"]) == 2
    assert f"{path}: the data cache file changed" in one_line_error(capsys, "train")


# ---------------------------------------------------------------- durable rows


def test_iteration_rows_are_fsynced_before_a_checkpoint_referring_to_them_is_published(tokenizer, examples,
                                                                                      tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.fspath(source), os.fspath(target)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = str(tmp_path / "run")
    for method in ("sft", "bash"):
        events.clear()
        train(tiny_model(tokenizer), tokenizer, examples, method=method, steps_per_iteration=2, save_every=1,
              out_dir=os.path.join(out, method), **FAST)
        rows = [e[2] for e in events if e[0] == "replace" and f"{os.sep}iterations{os.sep}" in e[2]]
        publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("latest"))
        assert rows, events
        synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
        for path in rows:
            assert path in synced and os.path.dirname(path) in synced, path


# ---------------------------------------------------------------- memory that grows with the data


def test_the_rows_a_bash_step_draws_cost_memory_of_the_steps_not_of_the_data():
    """The row order of an iteration and BASH's rows-to-examples map hold no Python object per row
    of the data (a list of n ints is 36 bytes a row: about 1 byte a training token, twice over)."""
    import tracemalloc
    import types

    from gapfix.methods.base import get_method
    from gapfix.trainer import _row_order

    rows = 2_000_000
    ctx = types.SimpleNamespace(examples=range(rows), iteration=0,
                                config=types.SimpleNamespace(bash_rows=None, seed=0))
    bash = get_method("bash")
    _row_order(10, 4, 0, 0)  # whatever a first call loads
    tracemalloc.start()
    try:
        order = _row_order(rows, 16, 0, 0)
        owners = bash._subset(ctx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(order) == 16 and len(owners) == rows and owners[rows - 1] == rows - 1
    assert peak < 2**20, peak
