"""Data: JSONL loading, prompt masking, padding and packing.

Records are JSON objects, one a line, in either form:

    {"prompt": "...", "response": "..."}          (also "completion" or "answer")
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

A chat record's last assistant message is the response; everything before it is
the prompt, rendered with the tokenizer's chat template where it has one.

Examples are token ids: `Example(prompt_ids, answer_ids)`, the answer ending
with EOS. Training rows follow one convention throughout gapfix: `labels[i]`
is the target for input position i (already shifted), `ignore_index` where
nothing is trained (the prompt, padding).
"""
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import List, Optional

IGNORE_INDEX = -100
RESPONSE_KEYS = ("response", "completion", "answer")


@dataclass
class Example:
    prompt_ids: List[int]
    answer_ids: List[int]  # ends with EOS
    record: Optional[dict] = None  # the source record (for evaluation: "final", ...)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


def check_input_file(path, argument: str) -> str:
    """`path` as a string, if it is an existing regular file; else a DataError naming `argument`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{argument} {path!r} is a directory, not a JSONL file")
    if not os.path.exists(path):
        raise DataError(f"{argument} {path!r} does not exist")
    if not os.path.isfile(path):
        raise DataError(f"{argument} {path!r} is not a regular file")
    return path


def parse_jsonl_lines(path) -> Iterator[tuple]:
    """(line number, value, None) for each non-blank line of a JSONL file that is UTF-8 JSON,
    (line number, None, why) for each that is not (bad bytes, bad JSON, nesting too deep,
    a number too long to convert). Line numbers start at 1. Reads bytes, so that one bad
    byte costs its line only."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            value, why = None, None
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield number, None, f"not UTF-8 (byte {err.start + 1} of the line is {raw[err.start]:#04x})"
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except RecursionError:
                why = "JSON nested too deeply"
            except ValueError as err:  # also ints past Python's digit limit
                why = f"not JSON ({str(err)[:120]})"
            yield number, value, why


def read_jsonl_lines(path: str, *, on_error: str = "raise", skipped: list | None = None) -> list:
    """(line number, record) for the JSON objects of a JSONL file (see read_jsonl)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = check_input_file(path, "data file")
    records, bad = [], []
    for line_number, record, why in parse_jsonl_lines(path):
        if why is None and not isinstance(record, dict):
            why = f"not a JSON object (a {type(record).__name__})"
        if why is not None:
            if on_error == "raise":
                raise DataError(f"{path}:{line_number}: malformed JSONL line: {why}")
            bad.append(line_number)
            continue
        records.append((line_number, record))
    if bad:
        import warnings

        shown = ", ".join(map(str, bad[:20])) + (" ..." if len(bad) > 20 else "")
        warnings.warn(f"{path}: skipped {len(bad)} malformed line(s): {shown}", stacklevel=3)
        if skipped is not None:
            skipped.extend(bad)
    return records


def read_jsonl(path: str, *, on_error: str = "raise") -> List[dict]:
    """JSON objects of a JSONL file. Malformed lines (bad bytes, bad JSON, not an object)
    raise a DataError naming the file and line (on_error="raise") or are skipped with a
    warning that lists their line numbers (on_error="skip")."""
    return [record for _line, record in read_jsonl_lines(path, on_error=on_error)]


def split_record(record: dict, tokenizer=None):
    """(prompt text, response text) of a record, or None when it has neither form."""
    if "messages" in record:
        messages = record["messages"]
        if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                and messages[-1].get("role") == "assistant"):
            return None
        response = messages[-1].get("content")
        context = messages[:-1]
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        else:
            prompt = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in context) + "\nassistant:"
        return (prompt, response) if isinstance(response, str) else None
    prompt = record.get("prompt")
    response = next((record[k] for k in RESPONSE_KEYS if k in record), None)
    if isinstance(prompt, str) and isinstance(response, str):
        return prompt, response
    return None


def encode_example(tokenizer, prompt: str, response: str, record=None) -> Example:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return Example(list(prompt_ids), list(answer_ids) + [tokenizer.eos_token_id], record)


def record_problem(record: dict) -> Optional[str]:
    """What makes a record unusable before it reaches a tokenizer (which would fail with no
    file or line), or None: chat messages that are not {role, content} objects, text that
    is not encodable (a lone surrogate escape such as "\\ud800")."""
    messages = record.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            return f"messages is a {type(messages).__name__}, not a list"
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                return f"messages[{i}] is not an object with a string role and content"
    for key in ("prompt", *RESPONSE_KEYS):
        if isinstance(record.get(key), str):
            texts = [record[key]]
        elif key == "prompt" and messages is not None:
            texts = [m["content"] for m in messages]
        else:
            continue
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                return f"{key} holds text that is not encodable ({err.reason} at {err.start})"
    return None


def load_examples(path: str, tokenizer, *, max_length: Optional[int] = None,
                  max_prompt_length: Optional[int] = None, on_error: str = "raise",
                  limit: Optional[int] = None, report: Optional[dict] = None) -> List[Example]:
    """Tokenized examples of a JSONL file of prompt/response or chat records.

    Records of neither form are errors (or skipped, with on_error="skip"); an example
    longer than max_length tokens, or whose prompt is longer than max_prompt_length, is
    dropped. A file with no usable example is an error either way. `report`, when given,
    is filled with what was kept and dropped: examples, skipped_lines (malformed lines),
    unusable_records, too_long, prompt_too_long.
    """
    skipped = []
    counts = {"unusable_records": 0, "too_long": 0, "prompt_too_long": 0}
    examples = []
    for line, record in read_jsonl_lines(path, on_error=on_error, skipped=skipped):
        problem = record_problem(record)
        pair = split_record(record, tokenizer) if problem is None else None
        if pair is None:
            if on_error == "raise":
                raise DataError(f"{path}:{line}: {problem or 'record has neither prompt/response nor messages'}")
            counts["unusable_records"] += 1
            continue
        example = encode_example(tokenizer, *pair, record=record)
        if max_length is not None and len(example.prompt_ids) + len(example.answer_ids) > max_length:
            counts["too_long"] += 1
            continue
        if max_prompt_length is not None and len(example.prompt_ids) > max_prompt_length:
            counts["prompt_too_long"] += 1
            continue
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if report is not None:
        report.update(examples=len(examples), skipped_lines=skipped, **counts)
    if not examples:
        dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v)
        raise DataError(f"{path}: no usable examples ({dropped or 'the file holds no records'}"
                        f"{f'; {len(skipped)} malformed lines skipped' if skipped else ''})")
    return examples


def sft_row(example: Example, ignore_index: int = IGNORE_INDEX) -> dict:
    """Input prompt+answer; labels train every answer token, the prompt masked."""
    input_ids = example.prompt_ids + example.answer_ids
    labels = [ignore_index] * len(input_ids)
    start = len(example.prompt_ids) - 1  # this position predicts the first answer token
    labels[start:len(input_ids) - 1] = example.answer_ids
    return {"input_ids": input_ids, "labels": labels}


def collate(rows: List[dict], *, pad_id: int, ignore_index: int = IGNORE_INDEX,
            pad_to_multiple_of: Optional[int] = None):
    """Right-pads rows to one tensor batch: input_ids, attention_mask, labels, and
    any per-position list field (e.g. RAC's target_ids/target_weights, BASH's alt_ids)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), ignore_index, dtype=torch.long),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.tensor(row["labels"])
    _collate_extra(rows, batch, width, ignore_index)
    return batch


def _collate_extra(rows, batch, width, ignore_index):
    import torch

    extra = [k for k in rows[0] if k not in ("input_ids", "labels", "attention_mask")
             and isinstance(rows[0][k], list)]
    for key in extra:
        sample = torch.tensor(rows[0][key])
        fill = ignore_index if key == "target_ids" else 0
        out = torch.full((len(rows), width) + tuple(sample.shape[1:]), fill, dtype=sample.dtype)
        for i, row in enumerate(rows):
            value = torch.tensor(row[key], dtype=sample.dtype)
            out[i, : value.shape[0]] = value
        batch[key] = out


def pack_rows(rows: List[dict]):
    """Packs rows into one row with position_ids restarting at 0 for each example.

    transformers' FlashAttention path reads the restarts as sequence boundaries
    (varlen attention), so packed examples never attend to each other and no
    padding is computed. Only for attention implementations that honour
    position_ids boundaries (flash_attention_2/3).
    """
    import torch

    fields = [k for k, v in rows[0].items() if isinstance(v, list)]  # input_ids, labels, BASH/RAC extras
    packed = {k: [] for k in fields}
    position_ids = []
    for row in rows:
        for key in fields:
            packed[key] += row[key]
        position_ids += list(range(len(row["input_ids"])))
    batch = {k: torch.tensor([v]) for k, v in packed.items()}
    batch["position_ids"] = torch.tensor([position_ids])
    return batch


def token_budget_batches(rows: List[dict], max_tokens: int, *, max_rows: Optional[int] = None,
                         padded: bool = True) -> List[List[int]]:
    """Groups row indices, in order, into batches within a token budget.

    padded=True counts the padded size (rows x longest row), as `collate` will
    allocate; padded=False counts real tokens, as `pack_rows` will. A row
    longer than the budget gets a batch of its own.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches, current, longest, total = [], [], 0, 0
    for index, row in enumerate(rows):
        n = len(row["input_ids"])
        new_longest, new_total = max(longest, n), total + n
        cost = new_longest * (len(current) + 1) if padded else new_total
        if current and (cost > max_tokens or (max_rows and len(current) >= max_rows)):
            batches.append(current)
            current, new_longest, new_total = [], n, n
        current.append(index)
        longest, total = new_longest, new_total
    if current:
        batches.append(current)
    return batches
