"""Data: JSONL loading, prompt masking, padding and packing.

Records are JSON objects, one a line, in either form:

    {"prompt": "...", "response": "..."}          (also "completion" or "answer")
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

A chat record trains every assistant turn, each ending in the chat template's
own end-of-turn (ChatML's `<|im_end|>` and newline, not the tokenizer's EOS):
the assistant tokens come from `apply_chat_template(...,
return_assistant_tokens_mask=True)` where the template marks them
(`{% generation %}`), else from the difference between renderings with and
without each assistant turn. The rendered text already holds the template's
special tokens (BOS where it has one), so it is tokenized without adding any.
The last assistant turn is the example's answer (what RAC regenerates and
evaluation compares); the earlier turns are trained inside its prompt
(`Example.prompt_labels`). Without a chat template, turns are rendered as
"role: content" lines and each assistant turn ends in EOS.

Examples are token ids: `Example(prompt_ids, answer_ids)`, the answer ending
with EOS. Training rows and batches follow one label convention at every public
boundary of gapfix, the Hugging Face one: `labels` is aligned with `input_ids`
(`labels[i]` is the target for the token at position i, predicted from the
prefix before it), `ignore_index` (-100) where nothing is trained (the prompt,
padding), and the loss shifts. Soft targets (`target_ids` / `target_weights`,
one K-list per position) are aligned the same way. Targets that are already
shifted travel under transformers' own name for them, `shift_labels`
(`shift_labels[i]` is the target predicted at position i); a row or batch with
both is refused, and `labels` whose content is recognisably shifted (see
`check_labels`) are refused too, never trained on silently.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Union

if TYPE_CHECKING:  # annotations only: torch and transformers load where they are used
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
RESPONSE_KEYS = ("response", "completion", "answer")
# the longest a chat template may take to render one record (all its renderings together)
CHAT_TEMPLATE_SECONDS = 5.0


@dataclass
class Example:
    prompt_ids: List[int]
    answer_ids: List[int]  # ends with EOS (chat: the template's end-of-turn)
    record: Optional[dict] = None  # the source record (for evaluation: "final", ...)
    # labels (HF convention) of the prompt tokens: earlier assistant turns of a chat; None: untrained
    prompt_labels: Optional[List[int]] = None


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


def check_input_file(path: Union[str, os.PathLike], argument: str) -> str:
    """`path` as a string, if it is an existing regular file; else a DataError naming `argument`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{argument} {path!r} is a directory, not a JSONL file")
    if not os.path.exists(path):
        raise DataError(f"{argument} {path!r} does not exist")
    if not os.path.isfile(path):
        raise DataError(f"{argument} {path!r} is not a regular file")
    return path


def decode_jsonl_line(number: int, raw: bytes) -> tuple[Optional[str], Optional[str]]:
    """(text, None) of line `number` (1-based) of a JSONL file read as bytes, or (None, why)
    when it is not UTF-8. Line 1 may start with a byte order mark."""
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 (byte {err.start + 1} of the line is {raw[err.start]:#04x})"


def parse_jsonl_text(text: str) -> tuple[Any, Optional[str]]:
    """(value, None) of a decoded JSONL line, or (None, why) when it is not JSON (bad JSON,
    nesting too deep, a number too long to convert)."""
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "JSON nested too deeply"
    except ValueError as err:  # also ints past Python's digit limit
        return None, f"not JSON ({str(err)[:120]})"


def not_a_record(value: Any) -> Optional[str]:
    """Why a parsed JSONL value is not a record (a JSON object), or None."""
    return None if isinstance(value, dict) else f"not a JSON object (a {type(value).__name__})"


def parse_jsonl_lines(path: Union[str, os.PathLike]) -> Iterator[tuple]:
    """(line number, value, None) for each non-blank line of a JSONL file that is UTF-8 JSON,
    (line number, None, why) for each that is not (bad bytes, bad JSON, nesting too deep,
    a number too long to convert). Line numbers start at 1. Reads bytes, so that one bad
    byte costs its line only."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            text, why = decode_jsonl_line(number, raw)
            if why is not None:
                yield number, None, why
            elif text.strip():
                yield number, *parse_jsonl_text(text)


def read_jsonl_lines(path: str, *, on_error: str = "raise", skipped: list | None = None) -> list:
    """(line number, record) for the JSON objects of a JSONL file (see read_jsonl)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = check_input_file(path, "data file")
    records, bad = [], []
    for line_number, record, why in parse_jsonl_lines(path):
        if why is None:
            why = not_a_record(record)
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


class _TemplateTimeout(BaseException):
    """Raised inside a thread whose chat template rendering ran past its time limit (a
    BaseException, so that no `except Exception` on the way swallows it)."""


class _Watchdog:
    """One daemon thread that raises _TemplateTimeout in a thread still inside `limit` when
    its deadline passes (PyThreadState_SetAsyncExc: the exception is raised at the thread's
    next bytecode, which a template's loops, pure Python, reach at once). Unlike SIGALRM it
    works in any thread and leaves the process's signal handlers and timers alone."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._deadlines: dict = {}  # thread id -> [deadline, fired]
        self._thread: Optional[threading.Thread] = None
        self._pid = None

    def _start(self) -> None:  # once per process: a forked worker has no watchdog thread
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._deadlines.clear()
            self._thread = threading.Thread(target=self._run, name="gapfix-template-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        import ctypes

        with self._condition:
            while True:
                now = time.monotonic()
                waiting = [entry[0] for entry in self._deadlines.values() if not entry[1]]
                for ident, entry in self._deadlines.items():
                    if not entry[1] and entry[0] <= now:
                        entry[1] = True
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                                   ctypes.py_object(_TemplateTimeout))
                self._condition.wait(max(0.0, min(waiting) - now) if waiting else None)

    @contextlib.contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        """Raises _TemplateTimeout in this thread once `seconds` have passed inside the block."""
        import ctypes

        ident = threading.get_ident()
        entry = [time.monotonic() + seconds, False]
        with self._condition:
            self._start()
            self._deadlines[ident] = entry
            self._condition.notify()
        try:
            yield
        finally:
            with self._condition:
                if self._deadlines.get(ident) is entry:
                    del self._deadlines[ident]
            if entry[1]:  # fired: clear a still pending exception, then raise it here
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)
                raise _TemplateTimeout()


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def chat_template_guard(where: str) -> Iterator[None]:
    """Runs a record's chat template renderings (tokenizer.apply_chat_template) so that whatever
    the template does is a DataError naming `where` (file:line): its own refusals
    (`raise_exception`, as templates that take no system turn do), the sandbox's (SecurityError),
    any other error, and a rendering running past CHAT_TEMPLATE_SECONDS (loops nested too deep to
    finish). Guards nest: an inner guard is part of the outer one's time."""
    if getattr(_GUARDED, "active", False):
        yield
        return
    _GUARDED.active = True
    try:
        with _WATCHDOG.limit(CHAT_TEMPLATE_SECONDS):
            yield
    except _TemplateTimeout:
        raise DataError(f"{where}: the chat template did not finish rendering the record within "
                        f"{CHAT_TEMPLATE_SECONDS:g} s (loops too large?)") from None
    except DataError:
        raise
    except Exception as exc:  # the template's code: whatever it raises is about this record
        name = type(exc).__name__
        if name == "TemplateError":  # raise_exception("...") in the template: its message is the reason
            reason = str(exc)
        else:
            reason = f"{name}: {exc}"
        raise DataError(f"{where}: the chat template refused the record ({' '.join(reason.split())[:300]})") \
            from None
    finally:
        _GUARDED.active = False


_GUARDED = threading.local()


def split_record(
    record: dict, tokenizer: Optional[PreTrainedTokenizerBase] = None, where: str = "record"
) -> Optional[tuple[str, str]]:
    """(prompt text, response text) of a record, or None when it has neither form. A chat
    template's failure is a DataError naming `where` (chat_template_guard)."""
    if "messages" in record:
        messages = record["messages"]
        if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                and messages[-1].get("role") == "assistant"):
            return None
        response = messages[-1].get("content")
        context = messages[:-1]
        if getattr(tokenizer, "chat_template", None):
            with chat_template_guard(where):
                prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        else:
            prompt = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in context) + "\nassistant:"
        return (prompt, response) if isinstance(response, str) else None
    prompt = record.get("prompt")
    response = next((record[k] for k in RESPONSE_KEYS if k in record), None)
    if isinstance(prompt, str) and isinstance(response, str):
        return prompt, response
    return None


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _chat_messages(record: dict) -> Optional[list[dict]]:
    """The record's messages when it is a usable chat (a list of role/content dicts
    ending with an assistant turn), else None."""
    messages = record.get("messages")
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        return None
    if messages[-1].get("role") != "assistant":
        return None
    if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        return None
    return messages


def _chat_with_mask(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict]
) -> Optional[tuple[list[int], list[bool]]]:
    """(token ids, assistant mask) from the template's {% generation %} blocks, or None."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not _GENERATION_BLOCK.search(template):
        return None
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    return (ids, mask) if any(mask) else None


def _chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str
) -> list[tuple[Optional[str], bool]]:
    """(text, trained) pieces of the conversation: with a template, the rendered
    difference each assistant turn makes (its content and end-of-turn); without
    one, "role: content" lines and each assistant turn ending in EOS."""
    template = getattr(tokenizer, "chat_template", None)
    segments = []
    if not template:
        for m in messages:
            if m["role"] == "assistant":
                segments += [("assistant: ", False), (m["content"], True), (None, True), ("\n", False)]
            else:
                segments.append((f"{m['role']}: {m['content']}\n", False))
        return segments
    rendered = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False)
        if not (before.startswith(rendered) and after.startswith(before)):
            raise DataError(f"{where}: the chat template renders turn {k} differently once later turns "
                            "exist, so its assistant tokens cannot be told apart; mark them with "
                            "{% generation %} in the template")
        segments += [(before[len(rendered):], False), (after[len(before):], True)]
        rendered = after
    return segments


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], record: Optional[dict] = None,
                where: str = "record") -> Example:
    """An Example of a conversation: every assistant turn trained, with the template's own
    end-of-turn; the last one is the answer, the earlier ones labelled in prompt_labels."""
    with chat_template_guard(where):
        found = _chat_with_mask(tokenizer, messages)
        segments = None if found is not None else _chat_segments(tokenizer, messages, where)
    if found is None:
        ids, mask = [], []
        for text, trained in segments:
            piece = [tokenizer.eos_token_id] if text is None else \
                tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [trained] * len(piece)
    else:
        ids, mask = found
    if not any(mask):
        raise DataError(f"{where}: no assistant tokens to train")
    end = len(mask) - mask[::-1].index(True)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    if start == 0:
        raise DataError(f"{where}: the conversation renders nothing before its first assistant turn")
    prompt_labels = [t if m else IGNORE_INDEX for t, m in zip(ids[:start], mask[:start])]
    return Example(ids[:start], ids[start:end], record,
                   prompt_labels if any(m for m in mask[:start]) else None)


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str,
                   record: Optional[dict] = None) -> Example:
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


def encode_record(record: dict, tokenizer: PreTrainedTokenizerBase, where: str) -> Example:
    """The Example of one record: the one definition every loader uses (load_examples,
    gapfix.data.arrow.load_tokenized), so that they cannot disagree.

    A record with "messages" is a chat (encode_chat: every assistant turn trained with the
    template's end-of-turn, earlier turns in prompt_labels); else a prompt/response record
    (encode_example). An unusable record (see record_problem; neither form; a chat not ending
    with an assistant turn) is a DataError whose message starts with `where` (file:line, or
    "file: row N").
    """
    problem = record_problem(record)
    if problem is not None:
        raise DataError(f"{where}: {problem}")
    if "messages" in record:
        messages = _chat_messages(record)
        if messages is None:
            raise DataError(f"{where}: record has neither prompt/response nor messages that end "
                            "with an assistant turn")
        return encode_chat(tokenizer, messages, record, where=where)
    pair = split_record(record, tokenizer, where)
    if pair is None:
        raise DataError(f"{where}: record has neither prompt/response nor messages")
    return encode_example(tokenizer, *pair, record=record)


def load_examples(path: str, tokenizer: PreTrainedTokenizerBase, *, max_length: Optional[int] = None,
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
    examples, first_problem = [], None
    for line, record in read_jsonl_lines(path, on_error=on_error, skipped=skipped):
        try:
            example = encode_record(record, tokenizer, f"{path}:{line}")
        except DataError as err:
            if on_error == "raise":
                raise
            counts["unusable_records"] += 1
            first_problem = first_problem or str(err)
            continue
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
                        f"{f'; {len(skipped)} malformed lines skipped' if skipped else ''}"
                        f"{f'; first unusable record: {first_problem}' if first_problem else ''})")
    return examples


def sft_row(example: Example, ignore_index: int = IGNORE_INDEX) -> dict:
    """Input prompt+answer; labels (HF convention, aligned with input_ids) are the
    answer tokens, the prompt masked."""
    input_ids = example.prompt_ids + example.answer_ids
    context = example.prompt_labels or [ignore_index] * len(example.prompt_ids)
    if ignore_index != IGNORE_INDEX:
        context = [ignore_index if t == IGNORE_INDEX else t for t in context]
    labels = list(context) + list(example.answer_ids)
    return {"input_ids": input_ids, "labels": labels}


LABEL_FIELDS = ("labels", "shift_labels")


def label_field(fields: Any, where: str = "batch") -> str:
    """Which label convention a row or batch carries: "labels" (aligned with input_ids,
    the loss shifts) or "shift_labels" (already shifted). Exactly one must be present."""
    present = [name for name in LABEL_FIELDS if name in fields]
    if len(present) != 1:
        raise ValueError(
            f"{where} must carry exactly one of 'labels' (aligned with input_ids, the loss shifts: the "
            f"Hugging Face convention) or 'shift_labels' (already shifted), got {present or 'neither'}")
    return present[0]


def check_labels(input_ids: torch.Tensor, labels: torch.Tensor, *,
                 attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                 ignore_index: int = IGNORE_INDEX, where: str = "labels") -> None:
    """Refuses `labels` that are recognisably in the shifted convention.

    input_ids, labels: (B, T) tensors (labels aligned with input_ids expected).
    attention_mask / position_ids mark where each row (or packed example) ends.

    A row is refused when every trained label equals the *next* input token
    (labels[i] == input_ids[i + 1], within the same example) while not every one
    equals its own token: that is what prompt-masked targets shifted by one look
    like. Rows in the aligned convention never look so: SFT-style labels equal
    their own tokens, and rows that train their last token (gapfix's SFT and RAC
    rows: the answer's EOS, RAC's label after the whole answer) have nothing after
    it to equal. Shifted correction targets cannot be told apart by content: pass
    them as `shift_labels`.
    """
    import torch

    if labels.shape != input_ids.shape:
        raise ValueError(f"{where} must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(labels.shape)}")
    trained = labels != ignore_index
    has_next = torch.zeros_like(trained)
    has_next[:, :-1] = True
    if attention_mask is not None:
        has_next[:, :-1] &= attention_mask[:, 1:] != 0
    if position_ids is not None:
        has_next[:, :-1] &= position_ids[:, 1:] != 0
    next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], 1)
    matches_next = has_next & (labels == next_ids)
    matches_own = labels == input_ids
    shifted = trained.any(1) & (matches_next | ~trained).all(1) & ~(matches_own | ~trained).all(1)
    if bool(shifted.any()):
        row = int(shifted.nonzero()[0, 0])
        raise ValueError(
            f"{where}: row {row} is in the shifted convention (every trained label is the next input "
            "token); gapfix takes labels aligned with input_ids (the Hugging Face convention: -100 "
            "ignored, the loss shifts), or already shifted targets as 'shift_labels'")


def collate(rows: List[dict], *, pad_id: int, ignore_index: int = IGNORE_INDEX,
            pad_to_multiple_of: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-pads rows to one tensor batch: input_ids, attention_mask, labels (or
    shift_labels), and any per-position list field (e.g. RAC's target_ids /
    target_weights, BASH's alt_ids). Rows must all carry the same label field;
    `labels` in the shifted convention are refused (check_labels)."""
    import torch

    key = label_field(rows[0], "rows[0]")
    for index, row in enumerate(rows):
        if label_field(row, f"rows[{index}]") != key:
            raise ValueError(f"rows[{index}] carries {label_field(row)!r}, rows[0] {key!r}: "
                             "one batch holds one label convention")
    width = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        key: torch.full((len(rows), width), ignore_index, dtype=torch.long),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        if len(row[key]) != n:
            raise ValueError(f"rows[{i}]: {key} has {len(row[key])} entries, input_ids {n}")
        batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch[key][i, :n] = torch.tensor(row[key])
    if key == "labels":
        check_labels(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"],
                     ignore_index=ignore_index, where="rows' labels")
    _collate_extra(rows, batch, width, ignore_index)
    return batch


def _collate_extra(
    rows: Sequence[dict], batch: dict[str, torch.Tensor], width: int, ignore_index: int
) -> None:
    import torch

    extra = [k for k in rows[0] if k not in ("input_ids", "attention_mask") + LABEL_FIELDS
             and isinstance(rows[0][k], list)]
    for key in extra:
        sample = torch.tensor(rows[0][key])
        fill = ignore_index if key == "target_ids" else 0
        out = torch.full((len(rows), width) + tuple(sample.shape[1:]), fill, dtype=sample.dtype)
        for i, row in enumerate(rows):
            value = torch.tensor(row[key], dtype=sample.dtype)
            out[i, : value.shape[0]] = value
        batch[key] = out


def pack_rows(rows: List[dict], *, ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Packs rows into one row with position_ids restarting at 0 for each example.

    Attention that reads the restarts as sequence boundaries (FlashAttention's
    varlen path; transformers' sdpa path given position_ids and no attention
    mask, see gapfix.trainer.packing_supported) keeps packed examples apart and
    computes no padding. The label at each example's first position is set to
    ignore_index, so that the loss's shift never trains one example's first
    token from the previous example's last.
    """
    import torch

    key = label_field(rows[0], "rows[0]")
    fields = [k for k, v in rows[0].items() if isinstance(v, list)]  # input_ids, labels, BASH/RAC extras
    packed = {k: [] for k in fields}
    position_ids = []
    for index, row in enumerate(rows):
        if label_field(row, f"rows[{index}]") != key:
            raise ValueError(f"rows[{index}] carries a different label field than rows[0] ({key!r})")
        start = len(position_ids)
        for name in fields:
            packed[name] += row[name]
        position_ids += list(range(len(row["input_ids"])))
        if key == "labels":
            packed["labels"][start] = ignore_index
            if "target_ids" in packed:
                width = len(packed["target_ids"][start])
                packed["target_ids"][start] = [ignore_index] * width
                packed["target_weights"][start] = [0.0] * width
    batch = {k: torch.tensor([v]) for k, v in packed.items()}
    batch["position_ids"] = torch.tensor([position_ids])
    if key == "labels":
        check_labels(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"],
                     ignore_index=ignore_index, where="rows' labels")
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
