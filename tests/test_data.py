import json
import random

import pytest

from gapfix.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    encode_record,
    load_examples,
    math_task,
    pack_rows,
    read_jsonl,
    sft_row,
    token_budget_batches,
)


@pytest.fixture(scope="module")
def tokenizer():
    return math_task.math_tokenizer()


def test_math_problems_are_consistent():
    for name in ("train", "test", "hard"):
        for problem in math_task.make_split(name, 200, seed=3):
            steps = problem["response"].split(" ; ")
            value = int(problem["prompt"].split()[0])
            ops = problem["prompt"].split()[1:]
            assert len(steps) - 1 == len(ops) // 2
            for (op, operand), step in zip(zip(ops[::2], ops[1::2]), steps):
                result = value + int(operand) if op == "+" else value - int(operand)
                assert step == f"{value} {op} {operand} = {result}"
                assert 0 <= result <= math_task.MAX_VALUE
                value = result
            assert steps[-1] == f"answer {value}" and problem["final"] == value
            low, high = math_task.SPLIT_STEPS[name]
            assert low <= len(steps) - 1 <= high


def test_math_splits_deterministic_and_disjoint(tmp_path):
    assert math_task.make_split("test", 50, seed=1) == math_task.make_split("test", 50, seed=1)
    assert math_task.make_split("test", 50, seed=1) != math_task.make_split("test", 50, seed=2)
    paths = math_task.write_splits(str(tmp_path), train=3000, test=300, hard=100)
    train = {r["prompt"] for r in read_jsonl(paths["train"])}
    test = {r["prompt"] for r in read_jsonl(paths["test"])}
    assert len(train) == 3000 and len(test) == 300 and not train & test


def test_corrupt_prefix_is_wrong_and_in_range():
    rng = random.Random(0)
    for problem in math_task.make_split("test", 300):
        prefix = math_task.corrupt_prefix(problem, rng)
        first = problem["response"].split(" ; ")[0]
        assert prefix.endswith(" ;") and prefix[:-2] != first
        assert prefix.rsplit(" = ", 1)[0] == first.rsplit(" = ", 1)[0]
        wrong = int(prefix[:-2].rsplit(" = ", 1)[1])
        assert 0 <= wrong <= math_task.MAX_VALUE and 1 <= abs(wrong - int(first.rsplit(" = ", 1)[1])) <= 3


def test_final_answer():
    assert math_task.final_answer("1 + 2 = 3 ; answer 3") == 3
    assert math_task.final_answer("1 + 2 = 3 ;") is None
    assert math_task.final_answer("answer 12 ") == 12


def test_math_tokenizer_one_token_per_word(tokenizer):
    problem = math_task.make_split("train", 1)[0]
    ids = tokenizer(problem["response"], add_special_tokens=False)["input_ids"]
    assert len(ids) == len(problem["response"].split())
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == problem["response"]
    assert tokenizer(problem["prompt"])["input_ids"][0] == tokenizer.bos_token_id


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_load_prompt_response_and_chat(tmp_path, tokenizer):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "1 + 2", "response": "1 + 2 = 3 ; answer 3"}),
        json.dumps({"messages": [{"role": "user", "content": "4 + 1"},
                                 {"role": "assistant", "content": "answer 5"}]}),
        json.dumps({"prompt": "7 - 1", "completion": "answer 6"}),
    ])
    examples = load_examples(path, tokenizer, on_error="skip")
    assert len(examples) == 3
    assert examples[0].answer_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(examples[2].answer_ids[:-1]) == "answer 6"


def test_malformed_lines_named_or_skipped(tmp_path, tokenizer):
    path = _write(tmp_path / "bad.jsonl", [
        json.dumps({"prompt": "1 + 2", "response": "answer 3"}), "{not json", "[1, 2]",
        json.dumps({"prompt": "3 + 3", "response": "answer 6"})])
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        read_jsonl(path)
    with pytest.warns(UserWarning, match="2, 3"):
        assert len(read_jsonl(path, on_error="skip")) == 2
    with pytest.raises(ValueError, match="on_error"):
        read_jsonl(path, on_error="ignore")


def test_no_usable_examples_is_an_error(tmp_path, tokenizer):
    path = _write(tmp_path / "empty.jsonl", [json.dumps({"text": "x"})])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(path, tokenizer, on_error="skip")
    with pytest.raises(DataError, match=r"empty\.jsonl:1: record"):
        load_examples(path, tokenizer)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "4 + 1"}]}, "messages that end with an assistant turn"),
    ({"messages": []}, "messages that end with an assistant turn"),
    ({"messages": "4 + 1"}, "messages is a str, not a list"),
    ({"messages": [{"role": "user", "content": 4}, {"role": "assistant", "content": "5"}]},
     r"messages\[0\] is not an object"),
    ({"prompt": "4 + 1"}, "record has neither prompt/response nor messages"),
    ({"prompt": "\ud800", "response": "answer 5"}, "prompt holds text that is not encodable"),
])
def test_encode_record_names_where_an_unusable_record_is(tokenizer, record, message):
    with pytest.raises(DataError, match=rf"^f\.jsonl: row 7: .*{message}"):
        encode_record(record, tokenizer, "f.jsonl: row 7")


def test_encode_record_is_what_load_examples_reads(tmp_path, tokenizer):
    records = [{"prompt": "1 + 2", "response": "answer 3"},
               {"messages": [{"role": "user", "content": "4 + 1"},
                             {"role": "assistant", "content": "answer 5"}]}]
    path = _write(tmp_path / "d.jsonl", [json.dumps(r) for r in records])
    assert load_examples(path, tokenizer) == [encode_record(r, tokenizer, "x") for r in records]


def test_skipped_records_are_named_when_none_is_usable(tmp_path, tokenizer):
    path = _write(tmp_path / "chat.jsonl", [json.dumps({"messages": [{"role": "user", "content": "1 + 1"}]})])
    with pytest.raises(DataError, match=r"1 unusable records; first unusable record: .*chat\.jsonl:1: "):
        load_examples(path, tokenizer, on_error="skip")


def test_sft_row_masks_prompt_in_the_hf_convention():
    row = sft_row(Example([1, 10, 11], [20, 21, 2]))
    assert row["input_ids"] == [1, 10, 11, 20, 21, 2]
    # aligned with input_ids (the loss shifts), as transformers' models take them
    assert row["labels"] == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 20, 21, 2]


def test_collate_pads_and_carries_extra_fields():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 5, 6], "target_ids": [[1, -100], [2, 3], [4, -100]]},
            {"input_ids": [4], "labels": [7], "target_ids": [[9, -100]]}]
    batch = collate(rows, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [7, -100, -100, -100]
    assert batch["target_ids"].shape == (2, 4, 2) and batch["target_ids"][1, 1].tolist() == [-100, -100]


def test_pack_rows_restarts_positions_and_keeps_every_field():
    packed = pack_rows([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "eligible": [False, True, True]},
                        {"input_ids": [4, 5], "labels": [4, 5], "eligible": [False, True]}])
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # an example's first label is dropped: the loss's shift would train it from the previous example
    assert packed["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert packed["eligible"].tolist() == [[False, True, True, False, True]]


def test_token_budget_batches():
    rows = [{"input_ids": [0] * n} for n in (3, 3, 5, 1, 8, 2)]
    batches = token_budget_batches(rows, 10)
    assert [i for b in batches for i in b] == list(range(6))
    for b in batches:
        assert len(b) == 1 or max(len(rows[i]["input_ids"]) for i in b) * len(b) <= 10
    assert token_budget_batches(rows, 10, padded=False)[0] == [0, 1]
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches(rows, 0)
