"""The commands' data loading: `gapfix eval`, `gapfix compare` and `gapfix demo` read their data
through `gapfix train`'s loader (load_tokenized, memory-mapped, its cache under --out), giving the
examples gapfix.data.load_examples gives; `--model tiny`'s tokenizer is trained from the file
streamed a batch at a time, and is the tokenizer a whole list of texts gives."""
import json
import os

import pytest

pytest.importorskip("transformers")

from gapfix.data import DataError, load_examples, math_task, read_jsonl, split_record  # noqa: E402


def _fields(examples):
    return [(ex.prompt_ids, ex.answer_ids, ex.prompt_labels, ex.record) for ex in examples]


def test_demo_trains_and_evaluates_on_the_examples_load_examples_gives(tmp_path):
    """docs/demo-results.json stays reproducible: the same token ids, in the same order."""
    from gapfix.data.arrow import ExampleTable
    from gapfix.demo import load_splits

    paths = math_task.write_splits(str(tmp_path / "data"), train=300, test=40, hard=20)
    tokenizer = math_task.math_tokenizer()
    train, test, hard, problems = load_splits(paths, tokenizer, str(tmp_path))
    assert _fields(ExampleTable(train)) == _fields(load_examples(paths["train"], tokenizer))
    assert _fields(test) == _fields(load_examples(paths["test"], tokenizer))
    assert _fields(hard) == _fields(load_examples(paths["hard"], tokenizer))
    assert problems == read_jsonl(paths["test"])
    assert train.cache_files and all(entry["filename"].startswith(str(tmp_path / "data_cache"))
                                     for entry in train.cache_files)


def test_example_table_iterates_and_slices_in_batches(tmp_path):
    """evaluate_model iterates the table and reads slices of it: each is one Arrow read, and
    gives the examples one at a time would."""
    from gapfix.data.arrow import ExampleTable, load_tokenized

    path = str(tmp_path / "train.jsonl")
    math_task.write_jsonl(math_task.make_split("train", 37, seed=3), path)
    table = ExampleTable(load_tokenized(path, math_task.math_tokenizer(), cache_dir=str(tmp_path / "c")))
    one_by_one = [table[i] for i in range(len(table))]
    assert _fields(table) == _fields(one_by_one)
    assert _fields(table[5:30]) == _fields(one_by_one[5:30])
    assert _fields(table[30:5:-3]) == _fields(one_by_one[30:5:-3])
    assert table[7:7] == [] and _fields(table[-3:]) == _fields(one_by_one[-3:])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from gapfix.models import save_model, tiny_llama

    tokenizer = math_task.math_tokenizer()
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("model") / "model"), tokenizer


def test_eval_command_reports_what_the_list_path_reports(saved_model, tmp_path, capsys):
    """--on-error skip, --max-length and --limit drop and count what load_examples drops; the
    report's per-example numbers are those of evaluate_model on load_examples' list."""
    from gapfix.cli import main
    from gapfix.evaluation import evaluate_model
    from gapfix.models import load_model

    folder, tokenizer = saved_model
    problems = math_task.make_split("test", 14, seed=1)
    lines = [json.dumps(p) for p in problems]
    lines.insert(3, "{not json")
    lines.insert(6, json.dumps({"prompt": "1 + 1 " * 40, "response": "2"}))  # too long
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(folder), "--data", str(data), "--max-new-tokens", "6", "--out", str(out),
            "--threads", "1", "--on-error", "skip", "--max-length", "60", "--limit", "12"]
    with pytest.warns(UserWarning, match="skipped 1 malformed line"):
        assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"{data}: skipped malformed line(s) [4]" in err
    assert f"{data}: dropped 1 example(s) longer than 60 tokens" in err
    report = json.loads((out / "report.json").read_text())
    assert os.path.isdir(out / "data_cache")
    with pytest.warns(UserWarning):
        examples = load_examples(str(data), tokenizer, max_length=60, on_error="skip", limit=12)
    model, _ = load_model(folder)
    expected = evaluate_model(model, tokenizer, examples, max_new_tokens=6, backend="hf", seed=0, top_k=5)
    assert report["count"] == 12
    assert json.dumps(report["per_example"], sort_keys=True) == json.dumps(
        json.loads(json.dumps(expected["per_example"])), sort_keys=True)


def test_eval_and_compare_name_the_file_and_line_of_a_malformed_record(saved_model, tmp_path, capsys):
    from gapfix.cli import main

    folder, _ = saved_model
    good = json.dumps({"prompt": "1 + 2", "response": "3"})
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{good}\n{good}\n[1, 2]\n")
    assert main(["eval", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "e")]) == 2
    assert f"{data}:3: malformed JSONL line" in capsys.readouterr().err
    train = tmp_path / "train.jsonl"
    math_task.write_jsonl(math_task.make_split("train", 20, seed=0), str(train))
    assert main(["compare", "--model", str(folder), "--train", str(train), "--eval", str(data),
                 "--extra-steps", "1", "--out", str(tmp_path / "c")]) == 2
    assert f"{data}:3: malformed JSONL line" in capsys.readouterr().err
    assert main(["compare", "--model", str(folder), "--train", str(tmp_path / "missing.jsonl"),
                 "--eval", str(data), "--extra-steps", "1", "--out", str(tmp_path / "c")]) == 2
    assert "--train" in capsys.readouterr().err


# ------------------------------------------------------------------ --model tiny's tokenizer


@pytest.mark.parametrize("kind", ["bpe", "word", "char"])
def test_tokenizer_streamed_from_the_file_is_the_one_from_a_list(tmp_path, monkeypatch, kind):
    """The same vocabulary (and merges) as training on the whole list of texts at once, on the
    bundled math data plus chat records."""
    import gapfix.models as models
    from gapfix.train_cli import _tokenizer_from_data

    path = tmp_path / "train.jsonl"
    problems = math_task.make_split("train", 2500, seed=0)
    chats = [{"messages": [{"role": "user", "content": p["prompt"]},
                           {"role": "assistant", "content": p["response"]}]} for p in problems[:50]]
    path.write_text("".join(json.dumps(r) + "\n" for r in problems + chats))
    streamed = _tokenizer_from_data(str(path), 512, kind)
    texts = [text for record in read_jsonl(str(path)) for text in split_record(record)]

    def whole_list(items, seen):  # the list handed over at once, not in batches
        seen[0] = len(items)
        return items

    monkeypatch.setattr(models, "_checked_batches", whole_list)
    listed = models.train_tokenizer(texts, vocab_size=512, kind=kind, add_bos=True)
    assert streamed.get_vocab() == listed.get_vocab()
    assert streamed.backend_tokenizer.to_str() == listed.backend_tokenizer.to_str()


def test_tokenizer_texts_are_read_lazily_and_errors_name_the_line(tmp_path):
    from gapfix.train_cli import _record_texts, _tokenizer_from_data

    path = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "1 + 2", "response": "3"})
    path.write_text(f"{good}\n{good}\n{{oops\n")
    texts = _record_texts(str(path), "raise", {"records": 0, "texts": 0})
    assert [next(texts), next(texts)] == ["1 + 2", "3"]  # before the bad line is read
    with pytest.raises(DataError, match=r"train.jsonl:3: malformed JSONL line"):
        _tokenizer_from_data(str(path), 300, "bpe", on_error="raise")
    assert len(_tokenizer_from_data(str(path), 300, "char", on_error="skip")) > 4
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"neither": 1}) + "\n")
    with pytest.raises(DataError, match="no prompt/response or chat records"):
        _tokenizer_from_data(str(empty), 300, "word", on_error="skip")


def test_tokenizer_from_parquet_or_a_saved_folder_is_the_jsonl_one(tmp_path, monkeypatch):
    """Table sources stream their rows too (Parquet through pyarrow, writing nothing to datasets'
    own cache); nulls are fields a record lacks, as load_tokenized reads them."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gapfix.train_cli import _tokenizer_from_data

    problems = [{"prompt": p["prompt"], "response": p["response"]} for p in math_task.make_split("train", 300)]
    chat = {"messages": [{"role": "user", "content": "7 + 8"}, {"role": "assistant", "content": "15"}]}
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in problems + [chat]))
    rows = problems + [{"prompt": None, "response": None, **chat}]
    table = pa.Table.from_pylist([{"messages": None, **row} for row in rows])
    pq.write_table(table, tmp_path / "train.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    home_cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home_cache)
    expected = _tokenizer_from_data(str(jsonl), 300, "word").backend_tokenizer.to_str()
    for source in ("train.parquet", "saved"):
        assert _tokenizer_from_data(str(tmp_path / source), 300, "word").backend_tokenizer.to_str() == expected
    assert not home_cache.exists()
    tokenized = tmp_path / "tokenized.parquet"
    pq.write_table(pa.table({"prompt_ids": [[1, 2]], "answer_ids": [[3]]}), tokenized)
    with pytest.raises(DataError, match="already tokenized"):
        _tokenizer_from_data(str(tokenized), 300, "word")
