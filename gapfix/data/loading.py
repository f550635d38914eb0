"""The commands' one data loader (train, eval, compare, demo): a JSONL or Parquet file or a saved
datasets folder, tokenized into a memory-mapped cache under the run's --out, with the examples a
model cannot take dropped and counted (longer than its context, or a prompt that leaves no room
for the generation budget)."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # annotations only
    import datasets
    from transformers import PreTrainedTokenizerBase

    from gapfix.data.arrow import ExampleTable


def is_table_source(path: str) -> bool:
    """A Parquet file or a saved datasets folder (read by gapfix.data.arrow.load_tokenized)."""
    return os.path.isdir(path) or str(path).endswith(".parquet")


def data_cache_dir(out: str) -> str:
    """Where a command keeps datasets' cache of its data (the Arrow files that tokenized JSONL or
    Parquet lands in, and every filtered copy): under --out, so that nothing is written beside
    the user's data or into ~/.cache, a rerun into the same --out tokenizes nothing, and removing
    the run removes its cache."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a folder")
    return os.path.join(out, "data_cache")


def load_data(path: str, tokenizer: PreTrainedTokenizerBase, *, cache_dir: str, max_length: Optional[int] = None,
              max_length_source: str = "--max-length", max_prompt_length: Optional[int] = None,
              on_error: str = "raise", limit: Optional[int] = None) -> tuple[datasets.Dataset, dict]:
    """Examples of a JSONL or Parquet file or a saved datasets folder, tokenized by load_tokenized
    into a memory-mapped datasets.Dataset under cache_dir (malformed lines, unusable records and
    too-long examples dropped and counted), and a report of what was dropped and why (also printed,
    naming the file). Under torchrun (a process group already joined) rank 0 tokenizes first and
    the other ranks then read its cache: no rank tokenizes what rank 0 already has, and no two
    write the same cache files at once."""
    from gapfix.data.arrow import load_tokenized, main_process_first

    report = {"file": path, "max_length": max_length, "max_length_from": max_length_source,
              "max_prompt_length": max_prompt_length}
    try:
        with main_process_first():
            return load_tokenized(path, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                  on_error=on_error, cache_dir=cache_dir, limit=limit, report=report), report
    finally:
        _print_dropped(path, report, max_length, max_length_source, max_prompt_length)


def _print_dropped(path: str, report: dict, max_length: Optional[int], max_length_source: str,
                   max_prompt_length: Optional[int]) -> None:
    if report.get("too_long"):
        print(f"{path}: dropped {report['too_long']} example(s) longer than {max_length} tokens "
              f"({max_length_source})", file=sys.stderr)
    if report.get("prompt_too_long"):
        print(f"{path}: dropped {report['prompt_too_long']} example(s) whose prompt is longer than "
              f"{max_prompt_length} tokens (the context less --max-new-tokens)", file=sys.stderr)
    if report.get("skipped_lines"):
        print(f"{path}: skipped malformed line(s) {report['skipped_lines'][:20]}", file=sys.stderr)


def length_limits(model: Any, max_length: Optional[int]) -> tuple[Optional[int], str, Optional[int]]:
    """(max_length, where it comes from, the model's context): the context bounds the
    length, so that an overlong example is dropped, never allocated."""
    from gapfix.generation import _context_length

    if max_length is not None and max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {max_length}")
    context = _context_length(model.config)
    source = "--max-length"
    if context is not None and (max_length is None or max_length > context):
        source = "the model's context length" + (" (--max-length is larger)" if max_length else "")
        max_length = context
    return max_length, source, context


def prompt_limit(context: Optional[int], max_new_tokens: int) -> Optional[int]:
    """The longest prompt that leaves room for --max-new-tokens generated tokens."""
    if context is None:
        return None
    if max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"model's context of {context} tokens")
    return context - max_new_tokens


def load_eval_examples(path: str, tokenizer: PreTrainedTokenizerBase, *, out: str,
                       max_length: Optional[int] = None, on_error: str = "raise", limit: Optional[int] = None,
                       model: Any = None, max_new_tokens: Optional[int] = None,
                       report: Optional[dict] = None) -> ExampleTable:
    """Held-out examples as an ExampleTable over a memory-mapped dataset (load_data, its cache
    under <out>/data_cache): the evaluation reads them a batch at a time, never the whole file as
    Python lists of ints. With `model`, examples longer than its context and (with max_new_tokens)
    prompts that leave no room for the answer are dropped and counted, as training drops them.
    report: filled with load_data's report."""
    from gapfix.data.arrow import ExampleTable

    source, prompt_max = "--max-length", None
    if model is not None:
        max_length, source, context = length_limits(model, max_length)
        if max_new_tokens is not None:
            prompt_max = prompt_limit(context, max_new_tokens)
    dataset, loaded = load_data(path, tokenizer, cache_dir=data_cache_dir(out), max_length=max_length,
                                max_length_source=source, max_prompt_length=prompt_max, on_error=on_error,
                                limit=limit)
    if report is not None:
        report.update(loaded)
    return ExampleTable(dataset)
