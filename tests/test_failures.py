"""Hostile and careless input on the command line and in files: every failure is named in one
line (exit 2), nothing runs from the current directory, nothing is left behind (docs/failures.md)."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from gapfix import bench_cli
from gapfix.cli import COMMANDS, build_parser, main
from gapfix.data import DataError, read_jsonl
from gapfix.generation import read_generations_jsonl, read_prompts_jsonl

CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def one_line_error(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing printed"
    assert "Traceback" not in "\n".join(err)
    last = err[-1]
    assert last.startswith(f"gapfix {command}: error: "), last
    return last


def write(path, lines):
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path.write_bytes(data)
    return str(path)


def records(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append(json.dumps({"prompt": f"{a} + {b} =", "response": f"{a + b}"}))
    return out


TRAIN = ["--model", "tiny", "--steps-per-iteration", "1", "--batch-size", "2", "--progress", "false"]


# ---------------------------------------------------------------- gapfix bench: the installed suite only


def test_bench_runs_the_installed_suite_never_the_current_directorys(tmp_path, monkeypatch):
    hostile = tmp_path / "bench"
    hostile.mkdir()
    (hostile / "test_bench_align.py").write_text("open('ran', 'w').close()\n")
    (tmp_path / "pytest.py").write_text("open('ran', 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(bench_cli.subprocess, "call",
                        lambda command, **kwargs: calls.append((command, kwargs)) or 0)
    assert main(["bench", "-k", "nothing", "--json", "out.json"]) == 0
    (command, kwargs), = calls
    suite = os.path.join(CHECKOUT, "bench")
    assert bench_cli.bench_dir() == suite
    assert suite in command and str(hostile) not in " ".join(command)
    assert kwargs["cwd"] == CHECKOUT  # no module of the user's cwd shadows pytest
    assert "-P" in command or sys.version_info < (3, 11)
    assert f"--benchmark-json={tmp_path / 'out.json'}" in command


# ---------------------------------------------------------------- bad data, named


def test_train_names_an_empty_file(tmp_path, capsys):
    empty = write(tmp_path / "empty.jsonl", [])
    assert main(["train", "--train", empty, "--out", str(tmp_path / "run"), *TRAIN]) == 2
    line = one_line_error(capsys, "train")
    assert empty in line and "no record" in line


def test_train_names_a_non_utf8_line_and_skips_it_when_asked(tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", records(6)[:3] + [b'{"prompt": "\xff\xfe", "response": "1"}']
                 + records(6)[3:])
    out = tmp_path / "run"
    assert main(["train", "--train", data, "--out", str(out), *TRAIN]) == 2
    line = one_line_error(capsys, "train")
    assert f"{data}:4" in line and "UTF-8" in line
    with pytest.warns(UserWarning, match="skipped 1 malformed line"):
        assert main(["train", "--train", data, "--out", str(out), "--on-error", "skip", *TRAIN]) == 0
    assert "[4]" in capsys.readouterr().err  # the skipped line is reported
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"]["skipped_lines"] == [4] and summary["data"]["train"]["examples"] == 6
    # the tokenized copy of the JSONL is memory-mapped from under --out, not beside the data
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl", "run"] and (out / "data_cache").is_dir()


def test_generate_names_a_non_utf8_line_and_skips_it_when_asked(tmp_path, model_dir, capsys):
    prompts = write(tmp_path / "prompts.jsonl", ['{"prompt": "1 + 2 ="}', b'{"prompt": "\xc3("}',
                                                 '{"prompt": "3 + 4 ="}'])
    args = ["generate", "--model", model_dir, "--prompts", prompts, "--backend", "hf",
            "--max-new-tokens", "4", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a.jsonl")]) == 2
    line = one_line_error(capsys, "generate")
    assert prompts in line and "line 2" in line and "UTF-8" in line
    with pytest.warns(UserWarning, match="line 2"):
        assert main([*args, "--out", str(tmp_path / "b.jsonl"), "--on-error", "skip"]) == 0
    answers = read_generations_jsonl(tmp_path / "b.jsonl")
    assert sorted({a.prompt_index for a in answers}) == [0, 1]


# ---------------------------------------------------------------- overlong examples


def test_an_example_longer_than_the_context_is_dropped_and_reported(tmp_path, capsys):
    rng = random.Random(1)
    long_text = " ".join(str(rng.randrange(10)) for _ in range(4000))  # thousands of tokens
    data = write(tmp_path / "data.jsonl", records(6) + [json.dumps({"prompt": long_text, "response": "1"})])
    out = tmp_path / "run"
    assert main(["train", "--train", data, "--out", str(out), *TRAIN]) == 0
    err = capsys.readouterr().err
    assert re.search(r"dropped 1 example\(s\) longer than 512 tokens \(the model's context length\)", err)
    report = json.loads((out / "summary.json").read_text())["data"]["train"]
    assert report["too_long"] == 1 and report["examples"] == 6 and report["max_length"] == 512


def test_eval_prompts_that_leave_no_room_to_generate_are_dropped_and_named(tmp_path, capsys):
    """--max-new-tokens 500 of the tiny model's 512 leaves 12 prompt tokens: longer --eval prompts
    are dropped and counted (stderr), and an --eval file of nothing else is named (exit 2)."""
    long_prompt = " ".join(["1 + 2 + 3 + 4 + 5"] * 6) + " ="
    data = write(tmp_path / "data.jsonl", records(6))
    evals = write(tmp_path / "eval.jsonl", [json.dumps({"prompt": long_prompt, "response": "90"})] * 3)
    args = ["train", "--train", data, "--eval", evals, "--out", str(tmp_path / "run"), "--max-new-tokens", "500"]
    assert main([*args, *TRAIN]) == 2
    err = capsys.readouterr().err
    assert re.search(r"eval\.jsonl: dropped 3 example\(s\) whose prompt is longer than 12 tokens", err)
    line = err.strip().splitlines()[-1]
    assert evals in line and "no usable examples (3 prompt too long)" in line


# ---------------------------------------------------------------- resume, other flags


def test_resume_with_other_flags_is_refused_naming_them(tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", records(8))
    out = str(tmp_path / "run")
    assert main(["train", "--train", data, "--out", out, *TRAIN]) == 0
    before = (tmp_path / "run" / "summary.json").read_text()
    capsys.readouterr()
    again = ["train", "--train", data, "--out", out, *TRAIN, "--method", "bash", "--lr", "0.5"]
    assert main(again) == 2
    line = one_line_error(capsys, "train")
    assert "lr: 0.001 -> 0.5" in line and "method: 'sft' -> 'bash'" in line
    assert "--resume-with-changed-config" in line
    assert (tmp_path / "run" / "summary.json").read_text() == before
    assert main([*again, "--resume-with-changed-config"]) == 0


# ---------------------------------------------------------------- vLLM model copies


KILLED_COPY = textwrap.dedent("""
    import os, signal
    from gapfix.generation import _saved_copy
    from gapfix.models import tiny_llama
    model = tiny_llama(64, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    print(_saved_copy(model, None), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_runs_model_copy_is_removed_by_the_next_run(tmp_path, monkeypatch):
    import tempfile

    from gapfix import generation
    from gapfix.models import tiny_llama

    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", KILLED_COPY], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    stale = done.stdout.strip()
    assert os.path.dirname(stale) == str(tmp_path) and os.path.isdir(stale)
    foreign = tmp_path / "gapfix-vllm-no-owner"  # not ours to judge: left alone
    foreign.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_llama(64, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    fresh = generation._saved_copy(model, None)
    assert not os.path.exists(stale) and foreign.is_dir()
    assert fresh.is_dir() and generation.remove_stale_model_copies() == []  # ours is alive
    del model  # its copy goes with it
    import gc

    gc.collect()
    assert not fresh.exists()


# ---------------------------------------------------------------- generate's files


@pytest.mark.parametrize("case", ["out-is-a-directory", "prompts-is-a-directory", "empty-prompts",
                                  "unencodable-prompt"])
def test_generate_names_bad_files(tmp_path, capsys, case):
    prompts = write(tmp_path / "prompts.jsonl", ['{"prompt": "1 + 2 ="}'])
    out = str(tmp_path / "answers.jsonl")
    if case == "out-is-a-directory":
        out, expected = str(tmp_path), "is a directory"
    elif case == "prompts-is-a-directory":
        prompts, expected = str(tmp_path), "is a directory"
    elif case == "empty-prompts":
        prompts, expected = write(tmp_path / "empty.jsonl", []), "holds no prompts"
    else:
        prompts, expected = write(tmp_path / "odd.jsonl", ['{"prompt": "\\udc00"}']), "line 1: prompt"
    code = main(["generate", "--model", str(tmp_path), "--prompts", prompts, "--out", out])
    assert code == 2
    line = one_line_error(capsys, "generate")
    assert expected in line and (out if case == "out-is-a-directory" else prompts) in line


# ---------------------------------------------------------------- one line, exit 2


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "tiny", "--train", "x.jsonl", "--out", "o", "--beta", "2"], "beta"),
    (["generate", "--model", ".", "--prompts", "missing.jsonl", "--out", "o.jsonl"], "does not exist"),
    (["bench", "--threads", "0"], "--threads"),
    (["demo", "--out", "a-file", "--quick"], "a-file"),
    (["demo", "--threads", "0"], "--threads"),
])
def test_a_configuration_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    assert main(argv) == 2
    assert needle in one_line_error(capsys, argv[0])
    with pytest.raises((ValueError, OSError)):
        main(["--debug", *argv])


def required_arguments(command):
    """Placeholder values for the required arguments of `command` (argparse checks only that
    they are there)."""
    import argparse

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    values = []
    for action in subparsers.choices[command]._actions:
        if action.option_strings and action.required:
            placeholder = {int: "1", float: "1.0"}.get(action.type, "x")  # argparse converts these
            values += [action.option_strings[0], placeholder]
        elif not action.option_strings and action.nargs not in ("?", "*"):
            values.append("x")
    return values


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_reports_user_errors_in_one_line(command, monkeypatch, capsys):
    """Whatever a command raises for a user's mistake reaches the user as one line;
    a bug (any other exception) keeps its traceback."""
    import importlib

    module = importlib.import_module(COMMANDS[command][0])

    def fail(args):
        raise ValueError("the problem\nspread over lines")

    monkeypatch.setattr(module, "run", fail)
    required = required_arguments(command)
    assert main([command, *required]) == 2
    assert one_line_error(capsys, command) == f"gapfix {command}: error: the problem spread over lines"

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(module, "run", bug)
    with pytest.raises(ZeroDivisionError):
        main([command, *required])


# ---------------------------------------------------------------- fuzz: the JSONL readers


def fuzz_inputs(count=300, seed=1234):
    rng = random.Random(seed)
    good = [b'{"prompt": "1 + 2 =", "response": "3"}', b'"bare prompt"', b'[1, 2, 3]',
            b'{"prompt_ids": [4, 5]}',
            b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}']
    for index in range(count):
        kind = index % 6
        lines = [rng.choice(good) for _ in range(rng.randrange(0, 4))]
        if kind == 0:  # random bytes
            lines.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))))
        elif kind == 1:  # a truncated line
            line = rng.choice(good)
            lines.append(line[: rng.randrange(len(line))])
        elif kind == 2:  # deep nesting
            depth = rng.choice([10, 1000, 10**5])
            lines.append(b"[" * depth + b"]" * depth if rng.random() < 0.5 else b'{"a":' * depth)
        elif kind == 3:  # huge numbers
            digits = rng.choice([20, 400, 5000, 10**5])
            number = rng.choice([b"9" * digits, b"1e" + b"9" * 6, b"-0." + b"1" * digits])
            lines.append(b'{"prompt": "x", "response": "y", "n": ' + number + b"}")
            lines.append(b"[" + number + b"]")
        elif kind == 4:  # odd text (NULs, surrogate escapes, BOMs, bare CRs) and odd records
            lines.append(rng.choice([b'{"prompt": "a\x00b"}', b'"\\ud800"', b"\xef\xbb\xbf[1]",
                                     b'{"prompt": "a"}\r{"prompt": "b"}', b'{"prompt": "\\u0000"}',
                                     b'{"prompt": "\\ud800", "response": "y"}', b'{"messages": "abc"}',
                                     b'{"messages": [1, {"role": "assistant", "content": "x"}]}',
                                     b'{"prompt": 5, "response": []}', b'{"prompt": {"a": [1]}}']))
        else:  # a good file with a blank line
            lines.append(b"   ")
        rng.shuffle(lines)
        yield b"\n".join(lines) + (b"\n" if rng.random() < 0.7 else b"")


def load_math_examples(path, on_error):
    from gapfix.data import load_examples, math_task

    return load_examples(path, math_task.math_tokenizer(), on_error=on_error)


READERS = {
    "load_examples": load_math_examples,
    "read_jsonl": lambda path, on_error: read_jsonl(path, on_error=on_error),
    "read_prompts_jsonl": lambda path, on_error: read_prompts_jsonl(path, on_error=on_error),
    "read_generations_jsonl": lambda path, on_error: read_generations_jsonl(path),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("reader", sorted(READERS))
def test_fuzzed_jsonl_is_read_or_refused_naming_file_and_line(tmp_path, reader):
    path = tmp_path / "fuzz.jsonl"
    outcomes = {"read": 0, "refused": 0}
    for index, data in enumerate(fuzz_inputs()):
        path.write_bytes(data)
        for on_error in ("raise", "skip"):
            try:
                result = READERS[reader](path, on_error)
            except ValueError as err:  # DataError is one
                message = str(err)
                assert str(path) in message, (index, data[:80], message)
                file_level = re.search(r"holds no prompts|mixes text|no usable", message)
                assert file_level or re.search(r"(:| line )\d+", message), (index, data[:80], message)
                outcomes["refused"] += 1
            else:
                assert isinstance(result, list)
                outcomes["read"] += 1
    assert outcomes["read"] and outcomes["refused"]


def test_data_errors_are_value_errors():
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- fuzz: the data cache and chat templates


def load_tokenized_with_cache(cache_dir):
    def load(path, on_error):
        from gapfix.data.arrow import load_tokenized

        return list(load_tokenized(path, _math_tokenizer(), on_error=on_error, cache_dir=cache_dir))

    return load


def _math_tokenizer():
    from gapfix.data import math_task

    return math_task.math_tokenizer()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzzed_jsonl_through_the_data_cache_is_read_or_refused_naming_file_and_line(tmp_path):
    """load_tokenized (the cache `gapfix train` tokenizes into) on the fuzzed files, twice each:
    tokenized, then read back from the cache, with the same outcome."""
    path = tmp_path / "fuzz.jsonl"
    load = load_tokenized_with_cache(str(tmp_path / "cache"))
    outcomes = {"read": 0, "refused": 0}
    for index, data in enumerate(fuzz_inputs(count=36, seed=77)):
        path.write_bytes(data)
        for on_error in ("raise", "skip"):
            results = []
            for _ in range(2):  # the second time from the cache
                try:
                    results.append(("read", [(e["prompt_ids"], e["answer_ids"]) for e in load(path, on_error)]))
                except ValueError as err:
                    message = str(err)
                    assert str(path) in message, (index, data[:80], message)
                    assert re.search(r"(:\d+|no usable|no records|empty file)", message), (index, message)
                    results.append(("refused", message))
            assert results[0] == results[1], (index, data[:80])
            outcomes[results[0][0]] += 1
    assert outcomes["read"] and outcomes["refused"]


HOSTILE_TEMPLATES = [
    "{{ raise_exception('no system turn') }}",
    "{% set x = [] %}{{ x.append(1) }}",  # the sandbox refuses
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # never ends
    "{% for i in range(10**9) %}{% endfor %}",  # a range too large for the sandbox
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",  # unbounded recursion
    "{{ messages[0]['content'] + 1 }}",  # a type error
    "{{ messages[99]['content'] }}",  # an index the record has not
    "{{ undefined_name.attribute }}",
    "{% for m in messages %}{{ m.content | int // 0 }}{% endfor %}",  # division by zero
    "{% for m in messages %}",  # a syntax error
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
]


def fuzz_chat_records(rng, count):
    lines = []
    for _ in range(count):
        roles = rng.choice([["user", "assistant"], ["system", "user", "assistant"],
                            ["user", "assistant", "user", "assistant"], ["assistant"], ["user"]])
        turns = [{"role": role, "content": rng.choice(["1 + 2 =", "3", "", "7 7 7", "\u00e9\u4e2d"])}
                 for role in roles]
        lines.append(json.dumps({"messages": turns}))
    return lines


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzzed_chat_templates_are_read_or_refused_in_bounded_time_naming_file_and_line(tmp_path, monkeypatch):
    """Templates that refuse, loop, recurse or fail, each guarding an assistant-first conversation (so
    that some records render and others meet the hostile part), on fuzzed chat records: the records are
    tokenized, or refused (DataError naming file:line), within the template time limit per record."""
    import time

    from gapfix import data
    from gapfix.data import load_examples
    from gapfix.data.arrow import load_tokenized
    from gapfix.models import train_tokenizer

    monkeypatch.setattr(data, "CHAT_TEMPLATE_SECONDS", 0.3)
    rng = random.Random(5)
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
            "{% if add_generation_prompt %}assistant: {% endif %}"
    outcomes = {"read": 0, "refused": 0}
    for index, hostile in enumerate(HOSTILE_TEMPLATES):
        template = "{% if messages[0]['role'] == 'system' %}" + hostile + "{% endif %}" + plain
        try:
            tok = train_tokenizer(["user assistant system : 1 2 3 7 + ="], kind="word", add_bos=True,
                                  chat_template=template)
        except Exception:  # a template transformers refuses to compile is refused when set, not later
            continue
        path = write(tmp_path / f"chat{index}.jsonl", fuzz_chat_records(rng, 6))
        for on_error in ("raise", "skip"):
            for load in (load_examples, lambda p, t, **k: load_tokenized(p, t, cache_dir=str(tmp_path / "c"), **k)):
                started = time.monotonic()
                try:
                    load(path, tok, on_error=on_error)
                    outcomes["read"] += 1
                except DataError as err:
                    assert str(err).startswith(path), (hostile, str(err))
                    assert re.search(r":\d+: |no usable", str(err)), (hostile, str(err))
                    outcomes["refused"] += 1
                assert time.monotonic() - started < 6 * 0.3 * 3 + 15, hostile
    assert outcomes["read"] and outcomes["refused"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzzed_damage_to_the_data_cache_is_refused_naming_the_file(tmp_path):
    """Random damage (a flipped byte, a truncation, appended bytes, an emptied file, another cache
    file's bytes) to any Arrow file of a data cache: the next load refuses it, naming that file;
    undone, the cache is read back as before."""
    import glob

    from gapfix.data.arrow import load_tokenized

    rng = random.Random(11)
    data = write(tmp_path / "data.jsonl", records(40) + ["not json"])
    cache = str(tmp_path / "cache")

    def load():
        return [(e["prompt_ids"], e["answer_ids"]) for e in
                load_tokenized(data, _math_tokenizer(), on_error="skip", max_length=20, cache_dir=cache)]

    expected = load()
    files = sorted(f for f in glob.glob(os.path.join(cache, "**", "*.arrow"), recursive=True)
                   if f"{os.sep}fingerprints{os.sep}" not in f)
    assert len(files) >= 3  # the JSONL's text, its tokens, the usable rows' and the short ones' indices
    assert load() == expected
    for trial in range(24):
        path = rng.choice(files)
        original = open(path, "rb").read()
        kind = trial % 5
        if kind == 0:
            damaged = bytearray(original)
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            damaged = original[:rng.randrange(len(original))]
        elif kind == 2:
            damaged = original + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif kind == 3:
            damaged = b""
        else:
            damaged = open(rng.choice([f for f in files if f != path]), "rb").read()
        with open(path, "wb") as handle:
            handle.write(bytes(damaged))
        with pytest.raises(DataError, match=re.escape(path)):
            load()
        with open(path, "wb") as handle:
            handle.write(original)
        assert load() == expected, (trial, path)
