"""gapfix.data.arrow: tokenized examples as a cached datasets.Dataset, rows as memory-mapped Arrow files."""
import json
import os
import random
import re
import subprocess
import sys

import pytest

pytest.importorskip("datasets")
pytest.importorskip("pyarrow")

import datasets  # noqa: E402  (after the skip: an image without datasets skips this module)
import pyarrow as pa  # noqa: E402

from gapfix import data as gapfix_data
from gapfix.data import DataError, Example, collate, load_examples, math_task, sft_row
from gapfix.data.arrow import (
    ExampleTable,
    RowTable,
    RowWriter,
    dataset_from_examples,
    load_tokenized,
    shard_range,
    write_rows,
    write_sft_rows,
)


@pytest.fixture(scope="module")
def tokenizer():
    return math_task.math_tokenizer()


def _records(count=40, seed=5):
    """prompt/response and chat records, mixed (the two forms gapfix reads)."""
    records = []
    for i, problem in enumerate(math_task.make_split("train", count, seed=seed)):
        if i % 3 == 2:
            records.append({"messages": [{"role": "user", "content": problem["prompt"]},
                                         {"role": "assistant", "content": problem["response"]}],
                            "final": problem["final"]})
        else:
            records.append(problem)
    return records


def _write_jsonl(path, records, raw_lines=()):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def _tokens(dataset):
    return [(ex.prompt_ids, ex.answer_ids) for ex in ExampleTable(dataset)]


# ------------------------------------------------------------------ loading


def test_jsonl_matches_load_examples_int32(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", _records())
    dataset = load_tokenized(path, tokenizer, cache_dir=str(tmp_path / "cache"))
    expected = load_examples(path, tokenizer)
    assert list(ExampleTable(dataset)) == expected  # ids, records and prompt_labels
    schema = dataset.data.schema
    for column in ("prompt_ids", "answer_ids", "prompt_labels"):
        assert schema.field(column).type == pa.list_(pa.int32())
    assert all(f["filename"].startswith(str(tmp_path / "cache")) for f in dataset.cache_files)


# multi-turn chats through a ChatML template whose end-of-turn (<|im_end|>) is not EOS


def _chat_records():
    from test_seams import CONVERSATION

    return [{"messages": CONVERSATION, "final": 15},  # two assistant turns: the first in prompt_labels
            {"messages": CONVERSATION[:3]},  # one turn: nothing trained in the prompt
            {"prompt": "12 plus 30", "response": "it is 42"}]


@pytest.mark.parametrize("template", ["generation-block", "rendered-diff"])
def test_chat_records_give_the_examples_load_examples_gives(tmp_path, template):
    """The two loaders share encode_record: the same ids (one BOS, the template's end-of-turn),
    the same prompt_labels (earlier assistant turns trained), from JSONL and from a table."""
    from test_seams import CHATML, CHATML_PLAIN, chat_tokenizer

    tok = chat_tokenizer(CHATML if template == "generation-block" else CHATML_PLAIN)
    records = _chat_records()
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    expected = load_examples(path, tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [t for t in expected[0].prompt_labels if t != -100].count(im_end) == 1
    assert expected[1].prompt_labels is None and expected[2].prompt_labels is None
    assert expected[0].prompt_ids.count(tok.bos_token_id) == 1
    dataset = load_tokenized(path, tok, cache_dir=str(tmp_path / "cache"))
    assert list(ExampleTable(dataset)) == expected
    assert dataset.data.schema.field("prompt_labels").type == pa.list_(pa.int32())
    assert dataset["prompt_labels"][1] == []  # "no trained prompt" is stored as an empty list
    # a table source: null where a row is of the other form
    table = datasets.Dataset.from_json(path, cache_dir=str(tmp_path / "json"))
    assert list(ExampleTable(load_tokenized(table, tok))) == expected
    assert ExampleTable(dataset_from_examples(expected)).gather([2, 0, 1]) == [expected[i] for i in (2, 0, 1)]


def test_chat_rows_round_trip_through_row_files(tmp_path):
    """The SFT rows of multi-turn chats (labels inside the prompt) stored and read back exactly."""
    from test_seams import CHATML, chat_tokenizer

    tok = chat_tokenizer(CHATML)
    path = _write_jsonl(tmp_path / "chat.jsonl", _chat_records() * 3)
    expected = [sft_row(ex) for ex in load_examples(path, tok)]
    assert any(label != -100 for label in expected[0]["labels"][:len(expected[0]["labels"]) // 2])
    dataset = load_tokenized(path, tok, cache_dir=str(tmp_path / "cache"))
    rows = RowTable.open(write_sft_rows(tmp_path / "sft.arrow", dataset, batch_rows=4))
    assert rows.gather(range(len(expected))) == expected
    assert rows.gather([3, 0]) == [expected[3], expected[0]]
    torch_batch = collate(rows.gather(range(len(expected))), pad_id=tok.pad_token_id or 0)
    assert torch_batch["labels"].equal(collate(expected, pad_id=tok.pad_token_id or 0)["labels"])


def test_unusable_chat_records_name_the_line_or_row(tmp_path, tokenizer):
    """What load_examples refuses, load_tokenized refuses with the same message."""
    bad = [{"messages": [{"role": "user", "content": "1 + 1"}]},  # no assistant turn to train
           {"messages": "1 + 1"},
           {"prompt": "\ud800", "response": "answer 2"}]  # a lone surrogate: not encodable
    for i, record in enumerate(bad):
        path = _write_jsonl(tmp_path / f"bad{i}.jsonl", _records(2) + [record])
        with pytest.raises(DataError) as from_examples:
            load_examples(path, tokenizer)
        with pytest.raises(DataError) as from_arrow:
            load_tokenized(path, tokenizer, cache_dir=str(tmp_path / "cache"))
        assert str(from_arrow.value) == str(from_examples.value)
        assert str(from_arrow.value).startswith(f"{path}:3: ")
    table = datasets.Dataset.from_list([_records(1)[0], {"prompt": "1 + 1", "response": None,
                                                         "final": None}])
    with pytest.raises(DataError, match=r"^dataset: row 1: record has neither"):
        load_tokenized(table, tokenizer)


def test_pretokenized_prompt_labels_are_checked(tmp_path):
    raw = datasets.Dataset.from_dict({"prompt_ids": [[1, 2, 3], [4]], "answer_ids": [[5, 2], [6, 2]],
                                      "prompt_labels": [[-100, 2, -100], []]})
    loaded = load_tokenized(raw)
    assert loaded.data.schema.field("prompt_labels").type == pa.list_(pa.int32())
    assert [ex.prompt_labels for ex in ExampleTable(loaded)] == [[-100, 2, -100], None]
    wrong = datasets.Dataset.from_dict({"prompt_ids": [[1, 2, 3]], "answer_ids": [[5, 2]],
                                        "prompt_labels": [[-100, 2]]})
    with pytest.raises(DataError, match="prompt_labels holds 2 labels for 3 prompt tokens"):
        list(ExampleTable(load_tokenized(wrong)))


def test_second_load_reads_the_cache_and_tokenizes_nothing(tmp_path, tokenizer, monkeypatch):
    path = _write_jsonl(tmp_path / "train.jsonl", _records())
    cache = str(tmp_path / "cache")
    first = load_tokenized(path, tokenizer, cache_dir=cache)
    files = sorted(f["filename"] for f in first.cache_files)
    stamps = {f: os.stat(f).st_mtime_ns for f in files}

    def must_not_run(*args, **kwargs):
        raise AssertionError("encode_record called: the cache was not used")

    monkeypatch.setattr(gapfix_data, "encode_record", must_not_run)
    second = load_tokenized(path, tokenizer, cache_dir=cache)
    assert sorted(f["filename"] for f in second.cache_files) == files
    assert {f: os.stat(f).st_mtime_ns for f in files} == stamps
    assert _tokens(second) == _tokens(first)
    # a changed file is tokenized again (the cache key holds its size and mtime)
    _write_jsonl(tmp_path / "train.jsonl", _records()[:-1])
    with pytest.raises(AssertionError, match="cache was not used"):
        load_tokenized(path, tokenizer, cache_dir=cache)


def test_a_changed_encoding_is_tokenized_again(tmp_path, tokenizer, monkeypatch):
    """The cache key holds gapfix.data's source: tables cached by another version of
    encode_record are not read back (as chat records cached before encode_record would have been)."""
    from gapfix.data import arrow as arrow_module

    path = _write_jsonl(tmp_path / "train.jsonl", _records(6))
    records = [r for r in _records(6) if "prompt" in r]
    for source in (path, datasets.Dataset.from_list(records)):
        first = load_tokenized(source, tokenizer, cache_dir=str(tmp_path / "cache"))
        calls, encode_record = [], gapfix_data.encode_record
        monkeypatch.setattr(gapfix_data, "encode_record",
                            lambda *args: calls.append(1) or encode_record(*args))
        assert _tokens(load_tokenized(source, tokenizer, cache_dir=str(tmp_path / "cache"))) == _tokens(first)
        assert not calls  # the same encoding: read from the cache
        monkeypatch.setattr(arrow_module, "_encoding_fingerprint", lambda: "another version of gapfix.data")
        assert _tokens(load_tokenized(source, tokenizer, cache_dir=str(tmp_path / "cache"))) == _tokens(first)
        assert len(calls) == len(first)
        monkeypatch.undo()


def test_num_proc_two_gives_the_same_tokens(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", _records(30))
    one = load_tokenized(path, tokenizer, cache_dir=str(tmp_path / "c1"))
    two = load_tokenized(path, tokenizer, cache_dir=str(tmp_path / "c2"), num_proc=2)
    assert _tokens(two) == _tokens(one)
    assert len({f["filename"] for f in two.cache_files}) >= 1


def test_parquet_saved_folder_and_dataset_sources(tmp_path, tokenizer):
    records = [r for r in _records(30) if "prompt" in r]
    path = _write_jsonl(tmp_path / "train.jsonl", records)
    expected = _tokens(load_tokenized(path, tokenizer, cache_dir=str(tmp_path / "cache")))
    in_memory = datasets.Dataset.from_list(records)
    assert _tokens(load_tokenized(in_memory, tokenizer)) == expected
    mapped = load_tokenized(in_memory, tokenizer, cache_dir=str(tmp_path / "mem"))  # on disk, not in RAM
    assert _tokens(mapped) == expected
    assert mapped.cache_files and all(f["filename"].startswith(str(tmp_path / "mem")) for f in mapped.cache_files)
    in_memory.to_parquet(str(tmp_path / "train.parquet"))
    assert _tokens(load_tokenized(str(tmp_path / "train.parquet"), tokenizer,
                                cache_dir=str(tmp_path / "cache"))) == expected
    in_memory.save_to_disk(str(tmp_path / "saved"))
    assert _tokens(load_tokenized(str(tmp_path / "saved"), tokenizer)) == expected


def test_table_sources_with_both_record_forms(tmp_path, tokenizer):
    records = _records(12)  # prompt/response and chat rows: each row's other columns are null
    path = _write_jsonl(tmp_path / "train.jsonl", records)
    expected = _tokens(load_tokenized(path, tokenizer, cache_dir=str(tmp_path / "cache")))
    table = datasets.Dataset.from_json(path, cache_dir=str(tmp_path / "json"))  # a union of the columns
    assert {"prompt", "response", "messages"} <= set(table.column_names)
    assert _tokens(load_tokenized(table, tokenizer)) == expected
    table.to_parquet(str(tmp_path / "mixed.parquet"))
    got = load_tokenized(str(tmp_path / "mixed.parquet"), tokenizer, cache_dir=str(tmp_path / "cache"))
    assert _tokens(got) == expected
    assert json.loads(got["record"][2])["messages"][1]["role"] == "assistant"
    with pytest.raises(DataError, match=r"mixed\.parquet: row 1: record has neither"):
        datasets.Dataset.from_list([records[0], {"prompt": "1 + 1"}]).to_parquet(str(tmp_path / "mixed.parquet"))
        load_tokenized(str(tmp_path / "mixed.parquet"), tokenizer, cache_dir=str(tmp_path / "cache2"))


def test_pretokenized_source_is_cast_to_int32_without_tokenizer(tmp_path):
    raw = datasets.Dataset.from_dict({"prompt_ids": [[1, 2], [3]], "answer_ids": [[4, 5, 2], [6, 2]]})
    assert raw.features["prompt_ids"].feature.dtype == "int64"
    raw.save_to_disk(str(tmp_path / "tok"))
    loaded = load_tokenized(str(tmp_path / "tok"))
    assert loaded.data.schema.field("prompt_ids").type == pa.list_(pa.int32())
    assert _tokens(loaded) == [([1, 2], [4, 5, 2]), ([3], [6, 2])]
    assert _tokens(load_tokenized(str(tmp_path / "tok"), max_length=3)) == [([3], [6, 2])]


def test_max_length_and_limit(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", _records(30))
    expected = load_examples(path, tokenizer, max_length=30)
    got = load_tokenized(path, tokenizer, max_length=30, cache_dir=str(tmp_path / "cache"))
    assert _tokens(got) == [(e.prompt_ids, e.answer_ids) for e in expected]
    assert 0 < len(got) < 30
    assert len(load_tokenized(path, tokenizer, limit=7, cache_dir=str(tmp_path / "cache"))) == 7


def test_malformed_line_names_file_and_line(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "bad.jsonl", _records(3), raw_lines=["{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl:4: malformed JSONL line"):
        load_tokenized(path, tokenizer, cache_dir=str(tmp_path / "cache"))
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "1 + 2", "response": "1 + 2 = 3 ; answer 3"},
                                                 {"question": "x"}])
    with pytest.raises(DataError, match=r"odd\.jsonl:2: record has neither"):
        load_tokenized(path, tokenizer, cache_dir=str(tmp_path / "cache"))


def test_errors_found_in_worker_processes_name_the_line(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "bad.jsonl", _records(600), raw_lines=["{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl:601: malformed JSONL line"):
        load_tokenized(path, tokenizer, num_proc=2, cache_dir=str(tmp_path / "cache"))


def test_blank_lines_keep_line_numbers(tmp_path, tokenizer):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(_records(1)[0]) + "\n\n\n[1, 2]\n")
    with pytest.raises(DataError, match=r"gaps\.jsonl:4: malformed JSONL line: not a JSON object \(a list\)"):
        load_tokenized(str(path), tokenizer, cache_dir=str(tmp_path / "cache"))


def test_bytes_are_decoded_as_load_examples_decodes_them(tmp_path, tokenizer):
    """A byte order mark starts line 1 of a usable file; a line that is not UTF-8 is refused
    (or skipped) on its own, with load_examples' message."""
    lines = [json.dumps(record).encode() for record in _records(4)]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    assert list(ExampleTable(load_tokenized(str(bom), tokenizer, cache_dir=str(tmp_path / "cache")))) == \
        load_examples(str(bom), tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines[:2] + [b'{"prompt": "\xff", "response": "1"}'] + lines[2:]) + b"\n")
    with pytest.raises(DataError) as from_examples:
        load_examples(str(bad), tokenizer)
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSONL line: not UTF-8") as from_arrow:
        load_tokenized(str(bad), tokenizer, cache_dir=str(tmp_path / "cache"))
    assert str(from_arrow.value) == str(from_examples.value)
    with pytest.warns(UserWarning, match=r"bad\.jsonl: skipped 1 malformed line\(s\): 3$"):
        got = load_tokenized(str(bad), tokenizer, on_error="skip", cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match=r"skipped 1 malformed line"):
        assert list(ExampleTable(got)) == load_examples(str(bad), tokenizer, on_error="skip")


def test_on_error_skip_warns_and_drops(tmp_path, tokenizer):
    records = _records(5)
    path = _write_jsonl(tmp_path / "bad.jsonl", records, raw_lines=["{oops", json.dumps({"q": 1})])
    with pytest.warns(UserWarning) as caught:
        got = load_tokenized(path, tokenizer, on_error="skip", cache_dir=str(tmp_path / "cache"))
    messages = [str(w.message) for w in caught]
    assert any(re.search(r"bad\.jsonl: skipped 1 malformed line\(s\): 6$", m) for m in messages), messages
    assert any(re.search(r"skipped 1 unusable record\(s\): .*bad\.jsonl:7", m) for m in messages), messages
    expected = load_examples(_write_jsonl(tmp_path / "good.jsonl", records), tokenizer)
    assert _tokens(got) == [(e.prompt_ids, e.answer_ids) for e in expected]
    only_bad = _write_jsonl(tmp_path / "only_bad.jsonl", [], raw_lines=["{oops"])
    with pytest.raises(DataError, match="no usable examples"):
        load_tokenized(only_bad, tokenizer, on_error="skip", cache_dir=str(tmp_path / "cache"))


def test_unusable_sources_are_data_errors(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        load_tokenized(str(empty), tokenizer)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load_tokenized(str(tmp_path / "missing.jsonl"), tokenizer)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"garbage\.parquet: not a readable Parquet file"):
        load_tokenized(str(garbage), tokenizer, cache_dir=str(tmp_path / "cache"))
    os.makedirs(tmp_path / "not_saved")
    with pytest.raises(DataError, match=r"not_saved: not a folder written by datasets' save_to_disk"):
        load_tokenized(str(tmp_path / "not_saved"), tokenizer)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(_records(2)[:1])})
    splits.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="DatasetDict"):
        load_tokenized(str(tmp_path / "dict"), tokenizer)
    with pytest.raises(ValueError, match="on_error"):
        load_tokenized(str(empty), tokenizer, on_error="ignore")
    with pytest.raises(ValueError, match="tokenizer is required"):
        load_tokenized(datasets.Dataset.from_list(_records(2)[:1]))


def test_example_table_reads_examples(tokenizer):
    examples = [gapfix_data.encode_example(tokenizer, r["prompt"], r["response"], r)
                for r in math_task.make_split("test", 11, seed=2)]
    table = ExampleTable(dataset_from_examples(examples))
    assert len(table) == 11 and table[-1] == examples[-1] and table[3:5] == examples[3:5]
    assert [ex for batch in table.batches(4) for ex in batch] == examples
    assert table.gather([9, 0, 9, 4]) == [examples[i] for i in (9, 0, 9, 4)] and table.gather([]) == []
    with pytest.raises(IndexError, match="indices: example 11 out of range"):
        table.gather([0, 11])
    with pytest.raises(IndexError):
        table[11]
    with pytest.raises(ValueError, match="lacks column"):
        ExampleTable(datasets.Dataset.from_dict({"x": [1]}))


# --------------------------------------------------------------------- rows


def _sft_rows(count=23, seed=0):
    rng = random.Random(seed)
    return [sft_row(Example([rng.randrange(32000) for _ in range(rng.randint(1, 9))],
                            [rng.randrange(32000) for _ in range(rng.randint(1, 17))] + [2]))
            for _ in range(count)]


def _bash_like_rows(count=23, seed=1, k=None):
    rng = random.Random(seed)
    rows = []
    for row in _sft_rows(count, seed):
        n = len(row["input_ids"])
        row["eligible"] = [rng.random() < 0.5 for _ in range(n)]
        if k is None:
            row["alt_ids"] = [rng.randrange(32000) for _ in range(n)]
        else:
            row["alt_ids"] = [[rng.randrange(32000) for _ in range(k)] for _ in range(n)]
            # float32 values, as a torch tensor's tolist() gives them
            row["alt_probs"] = [[float(pa.scalar(rng.random(), pa.float32()).as_py()) for _ in range(k)]
                                for _ in range(n)]
        rows.append(row)
    return rows


@pytest.mark.parametrize("kind", ["sft", "bash", "bash_topk"])
def test_rows_round_trip_exactly(tmp_path, kind):
    rows = {"sft": _sft_rows, "bash": _bash_like_rows, "bash_topk": lambda: _bash_like_rows(k=3)}[kind]()
    path = write_rows(tmp_path / "rows.arrow", rows, batch_rows=5)
    table = RowTable.open(path)
    assert len(table) == len(rows)
    assert table.gather(range(len(rows))) == rows
    order = [7, 0, 22, 7, 3]
    assert table.gather(order) == [rows[i] for i in order]
    assert table[-1] == rows[-1] and table[2:4] == rows[2:4]
    assert [r for batch in table.iter_batches(4) for r in batch] == rows
    for name, torch_batch in collate(table.gather(order), pad_id=0).items():
        assert torch_batch.equal(collate([rows[i] for i in order], pad_id=0)[name]), name
    types = {f.name: f.type for f in table.table.schema}
    assert types["input_ids"] == types["labels"] == pa.list_(pa.int32())
    if kind == "bash":
        assert types["eligible"] == pa.list_(pa.bool_()) and types["alt_ids"] == pa.list_(pa.int32())
    if kind == "bash_topk":
        assert types["alt_ids"] == pa.list_(pa.list_(pa.int32(), 3))
        assert types["alt_probs"] == pa.list_(pa.list_(pa.float32(), 3))


def test_real_bash_and_rac_rows_round_trip(tmp_path, tokenizer):
    """Rows from the trainer's own BASH offline phase and from build_rac_rows (soft "all")."""

    from gapfix.methods.rac import build_rac_rows, mix_with_sft
    from gapfix.models import tiny_llama
    from gapfix.trainer import TrainConfig, build_rows

    examples = [gapfix_data.encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 6, seed=4)]
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    for mode in ("sample", "topk"):
        config = TrainConfig(method="bash", bash_mode=mode, bash_top_k=3)
        rows = build_rows("bash", model, tokenizer, examples, config)
        table = RowTable.open(write_rows(tmp_path / f"bash_{mode}.arrow", rows))
        assert table.gather(range(len(rows))) == rows
    rng = random.Random(0)
    generated = [ex.answer_ids[:-1] if i % 2 else [rng.randrange(5, 100) for _ in range(9)]
                 for i, ex in enumerate(examples)]
    rac, _ = build_rac_rows([ex.prompt_ids for ex in examples], generated, [ex.answer_ids for ex in examples],
                            eos_id=tokenizer.eos_token_id, mode="all", max_targets=3, impl="torch")
    rows = mix_with_sft(rac, [sft_row(ex) for ex in examples], 1.0, seed=0)
    table = RowTable.open(write_rows(tmp_path / "rac.arrow", rows, batch_rows=4))
    assert table.gather(range(len(rows))) == rows
    assert table.table.schema.field("target_weights").type == pa.list_(pa.list_(pa.float32(), 3))


def test_file_bytes_depend_on_rows_not_on_appends(tmp_path):
    rows = _bash_like_rows(41)
    write_rows(tmp_path / "a.arrow", rows, batch_rows=8)
    with RowWriter(tmp_path / "b.arrow", batch_rows=8) as writer:
        start = 0
        for size in (1, 13, 2, 0, 20, 5):
            writer.write(rows[start:start + size])
            start += size
    assert start == 41
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()
    reordered = [{key: row[key] for key in reversed(list(row))} for row in rows]  # the same rows
    write_rows(tmp_path / "r.arrow", rows[:1] + reordered[1:], batch_rows=8)
    assert (tmp_path / "r.arrow").read_bytes() == (tmp_path / "a.arrow").read_bytes()
    write_rows(tmp_path / "c.arrow", rows, batch_rows=9)  # the batch size is part of the format
    assert (tmp_path / "c.arrow").read_bytes() != (tmp_path / "a.arrow").read_bytes()


@pytest.mark.parametrize("kind", ["sft", "bash_topk"])
def test_shard_union_is_independent_of_shard_count(tmp_path, kind):
    rows = _sft_rows(29) if kind == "sft" else _bash_like_rows(29, k=2)
    reference = tmp_path / "one.arrow"
    write_rows(reference, rows, batch_rows=6)
    for world in (1, 2, 3, 40):  # 40 ranks: most shards are empty
        paths = []
        for rank in range(world):
            share = shard_range(len(rows), rank, world)
            paths.append(write_rows(tmp_path / f"w{world}_r{rank}.arrow", rows[share.start:share.stop],
                                    first_row=share.start, batch_rows=6))
        union = RowTable.open(paths[::-1], expected_rows=len(rows))  # order of the list does not matter
        assert union.gather(range(len(rows))) == rows
        assert union.gather([28, 0, 14]) == [rows[28], rows[0], rows[14]]
        merged = union.write_to(tmp_path / f"merged{world}.arrow", batch_rows=6)
        assert open(merged, "rb").read() == reference.read_bytes(), world


def test_shard_union_rejects_gaps_overlaps_and_mixed_fields(tmp_path):
    rows = _sft_rows(10)
    a = write_rows(tmp_path / "a.arrow", rows[:5], first_row=0)
    b = write_rows(tmp_path / "b.arrow", rows[5:], first_row=5)
    with pytest.raises(DataError, match=r"b\.arrow: starts at row 5, which leaves rows 0\.\.4 missing"):
        RowTable.open([b])
    with pytest.raises(DataError, match="overlaps"):
        RowTable.open([a, write_rows(tmp_path / "c.arrow", rows[4:], first_row=4)])
    with pytest.raises(DataError, match="10 rows, expected 12"):
        RowTable.open([a, b], expected_rows=12)
    other = write_rows(tmp_path / "d.arrow", _bash_like_rows(5), first_row=5)
    with pytest.raises(DataError, match=r"d\.arrow: row fields"):
        RowTable.open([a, other])
    (tmp_path / "junk.arrow").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"junk\.arrow: not a gapfix row file"):
        RowTable.open([tmp_path / "junk.arrow"])


def test_bad_rows_raise_and_leave_no_file(tmp_path):
    path = tmp_path / "rows.arrow"
    cases = [
        ([{"input_ids": [1, 2], "labels": [2, -100]}, {"input_ids": [1], "lab": [3]}], r"rows\[1\] has fields"),
        ([{"input_ids": [1, 2 ** 31], "labels": [2, -100]}], r"'input_ids': value 2147483648 does not fit int32"),
        ([{"input_ids": [1, 2], "labels": [2, "x"]}], r"'labels': expected int values"),
        ([{"input_ids": [1, 2], "alt_ids": [[1, 2], [3]]}], r"'alt_ids'"),
        ([{"input_ids": [1, 2], "labels": {"a": 1}}], r"'labels': values must be int, float or bool"),
    ]
    for rows, message in cases:
        with pytest.raises(ValueError, match=message):
            write_rows(path, rows)
        assert not path.exists() and not (tmp_path / "rows.arrow.tmp").exists()
    with pytest.raises(ValueError, match=r"rows\[0\] has fields"):  # a later batch, after a good one
        with RowWriter(path, batch_rows=1) as writer:
            writer.write(_sft_rows(3))
            writer.write([{"input_ids": [1]}])
    assert not path.exists() and not (tmp_path / "rows.arrow.tmp").exists()
    table = RowTable.open(write_rows(path, _sft_rows(3)))
    with pytest.raises(IndexError, match="indices: row 3 out of range"):
        table.gather([0, 3])
    with pytest.raises(ValueError, match="first_row"):
        RowWriter(path, first_row=-1)


def test_sft_rows_from_a_dataset(tmp_path, tokenizer):
    examples = [gapfix_data.encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 13, seed=6)]
    path = write_sft_rows(tmp_path / "sft.arrow", dataset_from_examples(examples), batch_rows=4)
    assert RowTable.open(path).gather(range(13)) == [sft_row(ex) for ex in examples]


def test_sft_rows_sharded_by_rank_merge_to_the_same_bytes(tmp_path, tokenizer):
    """The trainer's recipe: rank r writes the SFT rows of its share (dataset.select), all read the union."""
    examples = [gapfix_data.encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 17, seed=7)]
    dataset = dataset_from_examples(examples)
    single = write_sft_rows(tmp_path / "single.arrow", dataset, batch_rows=4)
    for world in (2, 3):
        paths = []
        for rank in range(world):
            share = shard_range(len(dataset), rank, world)
            paths.append(write_sft_rows(tmp_path / f"{world}_{rank}.arrow", dataset.select(share),
                                        first_row=share.start, batch_rows=4))
        union = RowTable.open(paths, expected_rows=len(dataset))
        assert union.gather(range(17)) == [sft_row(ex) for ex in examples]
        merged = union.write_to(tmp_path / f"merged_{world}.arrow", batch_rows=4)
        assert open(merged, "rb").read() == open(single, "rb").read()


def test_empty_shard_file_and_empty_union(tmp_path):
    path = write_rows(tmp_path / "empty.arrow", [], first_row=0)
    table = RowTable.open(path)
    assert len(table) == 0 and table.gather([]) == []


def test_shard_range_tiles_rows():
    for rows in (0, 1, 7, 64):
        for world in (1, 2, 3, 8):
            shares = [shard_range(rows, r, world) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(rows))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_range(5, 2, 2)


def test_import_gapfix_does_not_import_datasets():
    code = ("import sys, gapfix, gapfix.data, gapfix.data.arrow; "
            "print('datasets' in sys.modules, 'pyarrow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------ reports, length limits, cache


def _lengths(examples):
    return [len(e.prompt_ids) for e in examples], [len(e.prompt_ids) + len(e.answer_ids) for e in examples]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_report_and_drops_are_those_of_load_examples(tmp_path, tokenizer):
    """Malformed lines, unusable records, too-long examples and too-long prompts: the same
    examples kept and the same report as load_examples, for the same limits."""
    records = _records(30)
    path = _write_jsonl(tmp_path / "mixed.jsonl", records, raw_lines=["{oops", json.dumps({"q": 1}), "[1]"])
    prompts, totals = _lengths(load_examples(path, tokenizer, on_error="skip"))
    max_length = sorted(set(totals))[-2]  # drops the longest
    max_prompt_length = min(prompts)  # then those with longer prompts
    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length, on_error="skip")
    expected_report, report = {}, {}
    expected = load_examples(path, tokenizer, **limits, report=expected_report)
    got = load_tokenized(path, tokenizer, **limits, report=report, cache_dir=str(tmp_path / "cache"))
    assert report == expected_report
    assert report["skipped_lines"] == [31, 33] and report["unusable_records"] == 1
    assert report["too_long"] > 0 and report["prompt_too_long"] > 0
    assert list(ExampleTable(got)) == expected


def test_report_is_filled_when_nothing_fits(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "long.jsonl", _records(5))
    expected_report, report = {}, {}
    with pytest.raises(DataError) as from_examples:
        load_examples(path, tokenizer, max_prompt_length=1, report=expected_report)
    with pytest.raises(DataError, match=r"long\.jsonl: no usable examples \(5 prompt too long\)"):
        load_tokenized(path, tokenizer, max_prompt_length=1, report=report, cache_dir=str(tmp_path / "cache"))
    assert report == expected_report and "5 prompt too long" in str(from_examples.value)


def test_max_prompt_length_is_checked(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "a.jsonl", _records(3))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_prompt_length"):
            load_tokenized(path, tokenizer, max_prompt_length=bad)


@pytest.mark.parametrize("tokenized", [False, True], ids=["records", "tokenized"])
def test_nothing_is_written_beside_a_saved_folder_given_a_cache_dir(tmp_path, tokenizer, tokenized):
    """A saved datasets folder is the user's data: its tokenized and filtered copies go to cache_dir."""
    records = [record for record in _records(12) if "prompt" in record]
    examples = load_examples(_write_jsonl(tmp_path / "a.jsonl", records), tokenizer)
    source = dataset_from_examples(examples) if tokenized else datasets.Dataset.from_list(records)
    folder = tmp_path / "saved"
    source.save_to_disk(str(folder))
    before = sorted(os.listdir(folder))
    cache = tmp_path / "cache"
    max_length = sorted(_lengths(examples)[1])[-3]
    got = load_tokenized(str(folder), tokenizer, max_length=max_length, max_prompt_length=1000,
                         cache_dir=str(cache))
    assert sorted(os.listdir(folder)) == before
    written = [f["filename"] for f in got.cache_files if not f["filename"].startswith(str(folder))]
    assert written and all(name.startswith(str(cache)) for name in written)
    assert _tokens(got) == [(e.prompt_ids, e.answer_ids) for e in examples
                            if len(e.prompt_ids) + len(e.answer_ids) <= max_length]
