"""Examples and training rows as memory-mapped Arrow tables.

Two stores, both on disk and memory-mapped, so that resident memory does not grow
with the dataset (Python lists of ints cost about 57 bytes a token; Arrow int32
columns cost 4 bytes a token on disk and only the pages being read in memory):

- Examples: `load_tokenized(source, tokenizer)` returns a `datasets.Dataset` with
  int32 list columns `prompt_ids`, `answer_ids` (the answer ends with EOS, or a
  chat template's end-of-turn) and `prompt_labels` (the labels of the prompt
  tokens: a chat's earlier assistant turns; an empty list where the prompt is
  untrained, which `ExampleTable` reads back as `Example.prompt_labels = None`),
  and the source record as JSON text. The source is a JSONL file, a Parquet
  file, a folder written by `Dataset.save_to_disk`, or a `datasets.Dataset`.
  Tokenization is `Dataset.map` over `gapfix.data.encode_record` (the one
  definition of an example, the one `load_examples` uses), with `num_proc`
  workers and datasets' cache: a rerun on the same file and tokenizer reads the
  cache and tokenizes nothing. A source that already has `prompt_ids` and
  `answer_ids` (and optionally `prompt_labels`) is taken as tokenized.
  `ExampleTable` reads such a dataset as a sequence of `Example`s.

- Rows: built training rows (dicts of per-position lists: input_ids, labels and
  any method field: eligible, alt_ids, alt_probs, target_ids, target_weights)
  go to an Arrow IPC file through `RowWriter`, which appends rows as they come
  (an offline phase streams them) and cuts record batches of a fixed number of
  rows, so the file's bytes depend on the rows only, not on how they were
  appended. Integers are stored as int32, floats as float32, booleans as bits;
  a per-position list of K values (top-k alternatives, soft targets) is a
  fixed-size list. `RowTable.open(paths)` maps one file or the shards of several
  ranks, each shard carrying the index of its first row, and reads their union
  in row order whatever the order and number of the shards; `gather` returns rows
  as the dicts of Python lists the trainer's `collate` and `pack_rows` take.

Under torch.distributed, `main_process_first()` around `load_tokenized` lets rank 0 tokenize
into the shared cache while the other ranks wait, then read it (gapfix train, eval, compare).

`datasets` and `pyarrow` are imported where used, never by `import gapfix`.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from gapfix.data import IGNORE_INDEX as IGNORE
from gapfix.data import DataError, Example
from gapfix.outdir import fsync_path

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import pyarrow as pa
    from transformers import PreTrainedTokenizerBase

TOKEN_COLUMNS = ("prompt_ids", "answer_ids")  # required of a tokenized dataset
PROMPT_LABELS = "prompt_labels"  # optional: an empty list (or a missing column) is "no trained prompt"
_INT32 = np.iinfo(np.int32)
_META_FIRST_ROW = b"gapfix.first_row"
_META_BATCH_ROWS = b"gapfix.batch_rows"
DEFAULT_BATCH_ROWS = 1024


# ------------------------------------------------------------------ examples


def _example_features(with_record: bool) -> datasets.Features:
    import datasets

    columns = {name: datasets.List(datasets.Value("int32")) for name in (*TOKEN_COLUMNS, PROMPT_LABELS)}
    if with_record:
        columns["record"] = datasets.Value("string")
    columns["error"] = datasets.Value("string")
    columns["line"] = datasets.Value("int64")  # the source's line (JSONL) or row: for the report
    columns["malformed"] = datasets.Value("bool")  # a bad JSONL line, not an unusable record
    return datasets.Features(columns)


_LINES_PER_CHUNK = 256
_CHUNKS_PER_WRITE = 4
# a row of JSONL is a chunk of lines: one chunk per tokenizing call keeps a call's Python lists of
# ids (the peak of resident memory while tokenizing) to 256 records (and rows of a table to 256)
_CHUNKS_PER_CALL = 1


def _jsonl_lines(path: str, stamp: str) -> Iterator[Dict[str, list]]:
    """Non-blank lines of a JSONL file with their 1-based numbers, `_LINES_PER_CHUNK` to a
    row (datasets' per-row cost is paid per chunk; the map parses and splits them). Read as
    bytes and decoded as `gapfix.data.parse_jsonl_lines` decodes them: a line that is not
    UTF-8 is kept as "" with why it is not, so that it costs its line only.

    stamp ("size:mtime") is unused here: it is part of the generator's arguments so
    that datasets' cache key changes when the file does. (Not a list: datasets
    splits list arguments into shards.)
    """
    from gapfix.data import decode_jsonl_line

    del stamp
    texts, numbers, whys = [], [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            text, why = decode_jsonl_line(number, raw)
            if why is not None or text.strip():
                texts.append(text or "")
                numbers.append(number)
                whys.append(why)
            if len(texts) == _LINES_PER_CHUNK:
                yield {"text": texts, "line": numbers, "why": whys}
                texts, numbers, whys = [], [], []
    if texts:
        yield {"text": texts, "line": numbers, "why": whys}


def _raw_dataset(
    source: Union[str, os.PathLike, datasets.Dataset], cache_dir: Optional[str]
) -> tuple[datasets.Dataset, str, str]:
    """(dataset of records, its name for messages, how rows are named: "line" or "row")."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source, "dataset", "row"
    if isinstance(source, datasets.DatasetDict):
        raise ValueError(f"source is a DatasetDict with splits {sorted(source)}; pass one split")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a path or a datasets.Dataset, got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"{path}: holds a DatasetDict with splits {sorted(loaded)}; pass one split's folder")
        return loaded, path, "row"
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or folder")
    if path.endswith(".parquet"):
        try:
            return datasets.Dataset.from_parquet(path, cache_dir=cache_dir), path, "row"
        except Exception as exc:  # pyarrow raises several types; name the file whatever it is
            raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    with open(path, "rb") as f:
        if not any(line.strip() for line in f):
            raise DataError(f"{path}: empty file (no records)")
    stat = os.stat(path)
    features = datasets.Features({"text": datasets.List(datasets.Value("string")),
                                  "line": datasets.List(datasets.Value("int64")),
                                  "why": datasets.List(datasets.Value("string"))})
    raw = datasets.Dataset.from_generator(
        _jsonl_lines, features=features, cache_dir=cache_dir,
        # chunks written as they come: datasets' default (1000 rows) would hold 256k lines, a
        # whole file of long records, as Python strings before writing any (resident memory
        # the allocator then keeps)
        writer_batch_size=_CHUNKS_PER_WRITE,
        gen_kwargs={"path": os.path.abspath(path), "stamp": f"{stat.st_size}:{stat.st_mtime_ns}"})
    return raw, path, "line"


def _encoding_fingerprint() -> str:
    """A hash of gapfix.data's source. The tokenizing map looks encode_record (and what it calls)
    up at call time, so datasets' cache key, which hashes the map's own code and arguments,
    does not see them: this argument makes a cache written by another version of the encoding
    miss instead of being read back."""
    import hashlib

    from gapfix import data as gapfix_data

    with open(gapfix_data.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tokenize_batch(batch: Dict[str, list], indices: List[int], *, tokenizer: PreTrainedTokenizerBase,
                    source: str, kind: str, with_record: bool, encoding: str) -> Dict[str, list]:
    """Dataset.map function: records to token ids, one output row per input row.

    A record that cannot be used gets empty ids and its message in `error`
    (the caller raises or drops it): a worker process never decides alone.
    encoding (`_encoding_fingerprint`) is unused here: it is part of the cache key.
    """
    from gapfix import data as gapfix_data  # looked up at call time: the cache key is the code, not a copy

    del encoding

    out: Dict[str, list] = {name: [] for name in (*TOKEN_COLUMNS, PROMPT_LABELS, "record", "error", "line",
                                                  "malformed")}
    if kind == "line":  # rows are chunks of lines: one output row per line
        lines = list(itertools.chain.from_iterable(batch["line"]))
        texts = list(itertools.chain.from_iterable(batch["text"]))
        whys = list(itertools.chain.from_iterable(batch["why"]))
        indices = range(len(lines))
    for i, index in enumerate(indices):
        error, record, malformed = None, None, False
        if kind == "line":
            where = f"{source}:{lines[i]}"
            why = whys[i]
            if why is None:
                record, why = gapfix_data.parse_jsonl_text(texts[i])
            if why is None:
                why = gapfix_data.not_a_record(record)
            if why is not None:  # the message read_jsonl gives
                record, error, malformed = None, f"{where}: malformed JSONL line: {why}", True
        else:
            where = f"{source}: row {index}"
            # a null is a field this record does not have (a table holding both record forms
            # has prompt/response and messages columns, null where a row is of the other form)
            record = {key: values[i] for key, values in batch.items() if values[i] is not None}
        example = None
        if error is None:
            try:
                example = gapfix_data.encode_record(record, tokenizer, where)
            except gapfix_data.DataError as exc:
                error = str(exc)
        out["prompt_ids"].append(example.prompt_ids if example else [])
        out["answer_ids"].append(example.answer_ids if example else [])
        out[PROMPT_LABELS].append((example.prompt_labels or []) if example else [])
        out["record"].append(json.dumps(record, default=str) if record is not None else None)
        out["error"].append(error)
        out["line"].append(lines[i] if kind == "line" else index)
        out["malformed"].append(malformed)
    if not with_record:
        del out["record"]
    return out


def _is_usable(errors: List[Optional[str]]) -> List[bool]:
    return [error is None for error in errors]


def _within_length(
    prompt_ids: pa.ChunkedArray, answer_ids: pa.ChunkedArray, *, max_length: int
) -> pa.ChunkedArray:
    import pyarrow.compute as pc

    lengths = pc.add(pc.list_value_length(prompt_ids), pc.list_value_length(answer_ids))
    return pc.less_equal(lengths, max_length)


def _prompt_within_length(prompt_ids: pa.ChunkedArray, *, max_prompt_length: int) -> pa.ChunkedArray:
    import pyarrow.compute as pc

    return pc.less_equal(pc.list_value_length(prompt_ids), max_prompt_length)


_TOKEN_ID_LIMIT = 2**31  # ids are stored as int32


def _first_bad_id(dataset: "datasets.Dataset", column: str, high: int,
                  allowed: Optional[int] = None) -> Optional[tuple[int, int]]:
    """(row, value) of the first value of list column `column` outside [0, high) (but `allowed`),
    or None; read `_CHECK_ROWS` rows at a time through the dataset's own row order and filters."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.select_columns([column]).with_format("arrow")
    for start in range(0, len(dataset), _CHECK_ROWS):
        values = table[start:start + _CHECK_ROWS].column(column)
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        flat = pc.list_flatten(values)
        if len(flat) == 0:
            continue
        bad = pc.or_(pc.less(flat, 0), pc.greater_equal(flat, high))
        if allowed is not None:
            bad = pc.and_(bad, pc.not_equal(flat, allowed))
        if not pc.any(bad).as_py():
            continue
        position = pc.index(bad, True).as_py()
        row = pc.list_parent_indices(values)[position].as_py()
        return start + row, flat[position].as_py()
    return None


_CHECK_ROWS = 1024


def _check_token_column(raw: "datasets.Dataset", column: str, name: str) -> None:
    """Refuses (DataError naming the source, column and row) a pre-tokenized column that is not
    lists of integers, or holds an id outside [0, 2**31) (prompt_labels may also hold -100)."""
    import datasets

    feature = raw.features[column]
    inner = getattr(feature, "feature", None)
    if not isinstance(inner, datasets.Value) or not inner.dtype.startswith(("int", "uint")):
        raise DataError(f"{name}: column {column} holds {feature}, not lists of integer token ids")
    bad = _first_bad_id(raw, column, _TOKEN_ID_LIMIT, allowed=IGNORE if column == PROMPT_LABELS else None)
    if bad is not None:
        row, value = bad
        raise DataError(f"{name}: column {column}, row {row}: token id {value} is outside [0, 2**31)")


def _vocabulary_size(model: Any) -> Optional[int]:
    """The rows of the model's input embedding, or its output head's where fewer (the ids a
    model can take and predict); None where neither can be told."""
    sizes = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        rows = getattr(module, "num_embeddings", None)
        if rows is None and getattr(module, "weight", None) is not None:
            rows = module.weight.shape[0]
        if isinstance(rows, int):
            sizes.append(rows)
    if not sizes:
        size = getattr(getattr(model, "config", None), "vocab_size", None)
        return size if isinstance(size, int) else None
    return min(sizes)


def check_token_ids(examples: Any, model: Any, source: str) -> None:
    """Refuses (DataError) examples holding a token id the model has no embedding (or output) row
    for, naming `source`, the example and the field, before anything is trained: an id past the
    embedding would otherwise surface as an IndexError deep in a forward. examples: a tokenized
    datasets.Dataset, an ExampleTable or a sequence of Example; read a batch at a time."""
    vocab = _vocabulary_size(model)
    if vocab is None:
        return
    dataset = examples.dataset if isinstance(examples, ExampleTable) else examples
    if hasattr(dataset, "with_format") and hasattr(dataset, "column_names"):
        columns = [c for c in (*TOKEN_COLUMNS, PROMPT_LABELS) if c in dataset.column_names]
        found = [(bad, column) for column in columns
                 if (bad := _first_bad_id(dataset, column, vocab, IGNORE if column == PROMPT_LABELS else None))]
        if not found:
            return
        (index, value), column = min(found)
    else:
        found = next(((index, value, column) for index, example in enumerate(examples)
                      for column, ids in (("prompt_ids", example.prompt_ids), ("answer_ids", example.answer_ids),
                                          (PROMPT_LABELS, example.prompt_labels or ()))
                      for value in ids
                      if not 0 <= value < vocab and not (column == PROMPT_LABELS and value == IGNORE)), None)
        if found is None:
            return
        index, value, column = found
    raise DataError(f"{source}: example {index} ({column}) holds token id {value}, outside the model's "
                    f"vocabulary [0, {vocab}) (a tokenizer larger than the model's embedding, or ids "
                    "tokenized for another model)")


def _positive_or_none(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def load_tokenized(source: Union[str, os.PathLike, "datasets.Dataset"],
                   tokenizer: Optional[PreTrainedTokenizerBase] = None, *,
                   max_length: Optional[int] = None, max_prompt_length: Optional[int] = None,
                   on_error: str = "raise", num_proc: Optional[int] = None,
                   cache_dir: Optional[str] = None, keep_records: bool = True,
                   limit: Optional[int] = None, report: Optional[dict] = None) -> "datasets.Dataset":
    """Tokenized examples of `source` as a memory-mapped `datasets.Dataset`.

    source: a JSONL file (.jsonl/.json, one record a line), a Parquet file, a
        folder written by `Dataset.save_to_disk`, or a `datasets.Dataset`; records
        are prompt/response or chat records, as `gapfix.data.load_examples` reads.
        A source with `prompt_ids` and `answer_ids` columns is already tokenized
        and is only cast to int32 (no tokenizer needed), its `prompt_labels` column too
        when it has one.
    tokenizer: called through `gapfix.data.encode_record` (as `load_examples` calls it).
    max_length: examples longer than this many tokens are dropped.
    max_prompt_length: examples whose prompt is longer than this many tokens are
        dropped (a prompt that leaves no room for generated tokens).
    on_error: "raise" (DataError naming the file and line, or row) or "skip"
        (warnings list the malformed lines and the unusable records). A source with
        no usable example is an error either way.
    num_proc: worker processes for `Dataset.map` (None: this process).
    cache_dir: datasets' cache for JSONL/Parquet sources (default: datasets'
        own, ~/.cache/huggingface/datasets). The cache is keyed on the file's size and mtime,
        the tokenizer and this code and gapfix.data's: a rerun reads it back and tokenizes
        nothing. Every tokenized or filtered copy is written there too, never beside a saved
        folder's files; for an in-memory Dataset it is memory-mapped from there. Without
        cache_dir, an in-memory Dataset's copies stay in memory and a saved folder's go beside
        its files (datasets' own behaviour).
    keep_records: keep each source record as JSON text in column "record"
        (evaluation reads fields such as "final" from it).
    limit: keep the first `limit` usable examples.
    report: when given, filled as `load_examples` fills it (also when the source has no
        usable example): examples, skipped_lines (malformed JSONL lines),
        unusable_records, too_long, prompt_too_long.

    Returns a Dataset with int32 list columns prompt_ids, answer_ids and
    prompt_labels (empty where the prompt is untrained), and "record", backed
    by Arrow files in the cache (in memory only for an in-memory Dataset passed
    as source).
    """
    import datasets

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    for value, argument in ((max_length, "max_length"), (max_prompt_length, "max_prompt_length"),
                            (limit, "limit"), (num_proc, "num_proc")):
        _positive_or_none(value, argument)
    cache = _SealedCache(cache_dir, source)
    raw, name, kind = cache.run(lambda: _raw_dataset(source, cache_dir))
    if len(raw) == 0:
        raise DataError(f"{name}: no records")
    counts = {"skipped_lines": [], "unusable_records": 0, "too_long": 0, "prompt_too_long": 0}
    if all(column in raw.column_names for column in TOKEN_COLUMNS):
        features = raw.features.copy()
        for column in (*TOKEN_COLUMNS, PROMPT_LABELS):
            if column not in features:
                continue
            _check_token_column(raw, column, name)
            features[column] = datasets.List(datasets.Value("int32"))
        file = _cache_file(raw, cache_dir, "cast", features)
        dataset = raw if features == raw.features else cache.run(lambda: raw.cast(
            features, num_proc=num_proc, cache_file_name=file), file)
    else:
        if tokenizer is None:
            raise ValueError(f"tokenizer is required: {name} has no prompt_ids/answer_ids columns")
        file = _cache_file(raw, cache_dir, "tokenized", tokenizer, keep_records, _tokenize_batch,
                           _encoding_fingerprint())
        dataset = cache.run(lambda: raw.map(
            _tokenize_batch, with_indices=True, batched=True, num_proc=num_proc, cache_file_name=file,
            batch_size=_CHUNKS_PER_CALL if kind == "line" else _CHUNKS_PER_CALL * _LINES_PER_CHUNK,
            remove_columns=raw.column_names, features=_example_features(keep_records),
            fn_kwargs=dict(tokenizer=tokenizer, source=name, kind=kind, with_record=keep_records,
                           encoding=_encoding_fingerprint()),
            desc="tokenize"), file)
        dataset = _drop_unusable(dataset, name, on_error, num_proc, counts, cache_dir, cache)
    for limit_value, count, keep, columns in (
            (max_length, "too_long", _within_length, list(TOKEN_COLUMNS)),
            (max_prompt_length, "prompt_too_long", _prompt_within_length, ["prompt_ids"])):
        if limit_value is None or len(dataset) == 0:
            continue
        before = len(dataset)
        argument = "max_length" if count == "too_long" else "max_prompt_length"
        file = _cache_file(dataset, cache_dir, argument, limit_value)
        dataset = cache.run(functools.partial(
            _filtered, dataset, keep, input_columns=columns, fn_kwargs={argument: limit_value}, num_proc=num_proc,
            cache_file_name=file, desc=argument), file)
        counts[count] = before - len(dataset)
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    first_problem = counts.pop("first_problem", None)
    import pyarrow as pa

    pa.default_memory_pool().release_unused()  # the tokenizing's buffers: written out, not needed
    if report is not None:
        report.update(examples=len(dataset), **counts)
    if len(dataset) == 0:
        dropped = ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in counts.items()
                            if value and key != "skipped_lines")
        skipped = counts["skipped_lines"]
        raise DataError(f"{name}: no usable examples ({dropped or 'none of the records fit'}"
                        f"{f'; {len(skipped)} malformed lines skipped' if skipped else ''}"
                        f"{f'; first unusable record: {first_problem}' if first_problem else ''})")
    return dataset


def _filtered(dataset: datasets.Dataset, keep: Callable, **options: Any) -> datasets.Dataset:
    """dataset.filter(keep, batched=True, **options) over Arrow batches."""
    return dataset.with_format("arrow").filter(keep, batched=True, **options).with_format(None)


def _cache_file(dataset: datasets.Dataset, cache_dir: Optional[str], step: str, *key: Any) -> Optional[str]:
    """Where a map/filter/cast of `dataset` writes its result: a file named by `dataset`'s
    fingerprint and `key` under cache_dir whenever one is given (datasets would write it beside
    the input's files, into the user's saved folder, and keep the result of an in-memory Dataset
    in RAM, not memory-mapped); the name is known before the step runs, so that a cached result
    is checked (_SealedCache) before datasets reads it. None (datasets' own naming) otherwise."""
    if cache_dir is None:
        return None
    from datasets.fingerprint import Hasher

    os.makedirs(cache_dir, exist_ok=True)
    return os.path.join(cache_dir, f"gapfix-{step}-{Hasher.hash([dataset._fingerprint, *key])}.arrow")


def _drop_unusable(
    dataset: datasets.Dataset, name: str, on_error: str, num_proc: Optional[int], counts: dict,
    cache_dir: Optional[str], cache: Optional["_SealedCache"] = None,
) -> datasets.Dataset:
    """`dataset` without its rows that hold an error (on_error="skip"; the first error is raised
    with "raise"), malformed JSONL lines listed in counts["skipped_lines"] and unusable records
    counted in counts["unusable_records"] (the first in counts["first_problem"]), each kind warned
    about once, as load_examples does. Empty when no row is usable: the caller names that."""
    import pyarrow.compute as pc

    table = dataset.data
    failed = pc.is_valid(table.column("error"))
    bad = int(pc.sum(failed).as_py() or 0)
    if bad:
        if on_error == "raise":
            raise DataError(pc.drop_null(table.column("error"))[0].as_py())
        malformed = pc.and_(failed, table.column("malformed"))
        lines = pc.filter(table.column("line"), malformed).to_pylist()
        unusable = pc.filter(table.column("error"), pc.and_(failed, pc.invert(malformed))).to_pylist()
        counts["skipped_lines"], counts["unusable_records"] = lines, len(unusable)
        if lines:
            shown = ", ".join(map(str, lines[:20])) + (" ..." if len(lines) > 20 else "")
            warnings.warn(f"{name}: skipped {len(lines)} malformed line(s): {shown}", stacklevel=3)
        if unusable:
            shown = "; ".join(unusable[:5]) + (" ..." if len(unusable) > 5 else "")
            warnings.warn(f"{name}: skipped {len(unusable)} unusable record(s): {shown}", stacklevel=3)
        counts["first_problem"] = unusable[0] if unusable else None
        file = _cache_file(dataset, cache_dir, "usable")
        cache = cache or _SealedCache(cache_dir, name)
        dataset = cache.run(lambda: dataset.filter(_is_usable, batched=True, input_columns=["error"],
                                                   num_proc=num_proc, cache_file_name=file,
                                                   desc="skip unusable"), file)
    return dataset.remove_columns(["error", "line", "malformed"])


# ------------------------------------------------------------------ the data cache's fingerprints


SEALS_FOLDER = "fingerprints"  # <cache_dir>/fingerprints/<path of the Arrow file>.sha256


def disk_full(exc: Optional[BaseException]) -> Optional[BaseException]:
    """The exception of `exc`'s chain (its causes and contexts) that says the disk is full, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        text = str(exc)
        if "No space left on device" in text or "[Errno 28]" in text or "errno 28" in text:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def no_space_error(exc: BaseException, what: str) -> OSError:
    """OSError(ENOSPC) saying, in one line, what was being written when the disk filled."""
    cause = disk_full(exc)
    filename = getattr(cause, "filename", None)
    return OSError(errno.ENOSPC, f"no space left on device while writing {what}"
                   + (f" ({filename})" if filename and str(filename) not in what else ""))


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _SealedCache:
    """The Arrow files of a data cache folder, each with a SHA-256 written beside it (under
    `<cache_dir>/fingerprints/`) when gapfix's loading writes it, and checked before it is read
    back: a cache file changed since (edited, truncated, corrupted) is a DataError naming it,
    never tokenized data read back silently. A cache file without a fingerprint (written by a
    gapfix without them, or a run killed between writing and fingerprinting) is fingerprinted
    as it is found. Like the rows' references in checkpoints, this detects changes, not someone
    who rewrites the fingerprints too. Disk full while a step writes the cache is an
    OSError(ENOSPC) naming the folder (and the file, where the error says which)."""

    def __init__(self, cache_dir: Optional[str], source: Any) -> None:
        self.root = os.path.abspath(cache_dir) if cache_dir else None
        self.source = source if isinstance(source, (str, os.PathLike)) else "a dataset"
        self.checked: set = set()
        if self.root and os.path.isdir(self.root):
            from gapfix.outdir import check_no_links

            check_no_links(self.root, "cache_dir")

    def _inside(self, path: str) -> bool:
        return self.root is not None and os.path.commonpath([self.root, os.path.abspath(path)]) == self.root

    def _seal_path(self, path: str) -> str:
        return os.path.join(self.root, SEALS_FOLDER, os.path.relpath(os.path.abspath(path), self.root) + ".sha256")

    def _files(self) -> set:
        found = set()
        if self.root is None or not os.path.isdir(self.root):
            return found
        for parent, dirs, files in os.walk(self.root):
            if parent == self.root and SEALS_FOLDER in dirs:
                dirs.remove(SEALS_FOLDER)
            found.update(os.path.join(parent, f) for f in files if f.endswith(".arrow"))
        return found

    def seal(self, path: str) -> None:
        seal = self._seal_path(path)
        os.makedirs(os.path.dirname(seal), exist_ok=True)
        record = json.dumps({"sha256": _sha256(path), "bytes": os.path.getsize(path)})
        with open(seal + ".tmp", "w") as handle:
            handle.write(record)
        os.replace(seal + ".tmp", seal)
        self.checked.add(path)

    def verify(self, path: str, adopt: bool = True) -> None:
        """Refuses (DataError) a cache file whose bytes are not those fingerprinted; one without a
        fingerprint is fingerprinted now (adopt) or left alone."""
        if path in self.checked:
            return
        seal = self._seal_path(path)
        if not os.path.isfile(seal):
            if adopt:
                self.seal(path)
            return
        remedy = f"remove it (or the cache folder {self.root}) to tokenize {self.source} again"
        try:
            with open(seal, "rb") as handle:
                expected = json.loads(handle.read(4096).decode("utf-8"))
            digest, size = str(expected["sha256"]), int(expected["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"{seal}: not a readable data cache fingerprint; {remedy}") from None
        if os.path.getsize(path) != size or _sha256(path) != digest:
            raise DataError(f"{path}: the data cache file changed since it was written (its SHA-256 "
                            f"differs from {seal}); {remedy}")
        self.checked.add(path)

    def run(self, make: Callable[[], Any], known: Optional[str] = None) -> Any:
        """make()'s result (a Dataset, or a tuple holding one first), with the cache files it reads
        checked and the ones it writes fingerprinted. `known`: the file the step writes, or reads
        back when it exists (checked before the step reads it)."""
        import datasets

        if known and self._inside(known) and os.path.isfile(known):
            self.verify(known)
        before = self._files()
        try:
            result = make()
        except DataError:
            raise
        except Exception as exc:
            if disk_full(exc):
                raise no_space_error(exc, f"the data cache {self.root or '(datasets default)'} while "
                                          f"loading {self.source}") from None
            for path in sorted(before):  # a damaged cache file that the step could not read: name it
                self.verify(path, adopt=False)
            raise
        dataset = result[0] if isinstance(result, tuple) else result
        if self.root is not None and isinstance(dataset, datasets.Dataset):
            try:
                for entry in dataset.cache_files:
                    path = os.path.abspath(entry["filename"])
                    if not self._inside(path) or path in self.checked:
                        continue
                    if path in before:
                        self.verify(path)
                    else:
                        self.seal(path)
            except OSError as exc:
                if disk_full(exc):
                    raise no_space_error(exc, f"the data cache {self.root}") from None
                raise
        return result


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Under torch.distributed (a process group of more than one rank), rank 0 runs the body
    first while the other ranks wait at a barrier, then they run it: a `load_tokenized` there
    finds rank 0's cache (datasets' cache hit) and tokenizes nothing. Without a process group
    the body just runs. Should rank 0 fail, the others are released and meet the same error
    themselves, rather than waiting for a barrier rank 0 never reaches."""
    import sys

    distributed = sys.modules.get("torch.distributed")  # no process group without torch imported
    active = (distributed is not None and distributed.is_available() and distributed.is_initialized()
              and distributed.get_world_size() > 1)
    first = not active or distributed.get_rank() == 0
    if not first:
        distributed.barrier()
    try:
        yield
    finally:
        if active and first:
            distributed.barrier()


def dataset_from_examples(examples: Sequence[Example]) -> "datasets.Dataset":
    """An in-memory Dataset of `examples` (the same columns as `load_tokenized` returns)."""
    import datasets

    features = _example_features(True)
    for column in ("error", "line", "malformed"):
        del features[column]
    return datasets.Dataset.from_dict({
        "prompt_ids": [list(ex.prompt_ids) for ex in examples],
        "answer_ids": [list(ex.answer_ids) for ex in examples],
        PROMPT_LABELS: [list(ex.prompt_labels or []) for ex in examples],
        "record": [None if ex.record is None else json.dumps(ex.record, default=str) for ex in examples],
    }, features=features)


class ExampleTable(Sequence[Example]):
    """A tokenized Dataset read as a sequence of `Example`s, a batch of rows at a time.

    Indexing decodes one row; `batches` reads `batch_size` rows per Arrow slice.
    Nothing is held beyond the Dataset's memory map.
    """

    ITER_BATCH = 128  # examples decoded per Arrow read when iterating (a few MiB of Python ints)

    def __init__(self, dataset: "datasets.Dataset") -> None:
        missing = [column for column in TOKEN_COLUMNS if column not in dataset.column_names]
        if missing:
            raise ValueError(f"dataset lacks column(s) {missing}; build it with load_tokenized")
        self.dataset = dataset
        self._arrow = dataset.with_format("arrow")
        self._has_record = "record" in dataset.column_names
        self._has_prompt_labels = PROMPT_LABELS in dataset.column_names

    def __len__(self) -> int:
        return len(self.dataset)

    def _decode(self, table: pa.Table) -> List[Example]:
        prompts = table.column("prompt_ids").to_pylist()
        answers = table.column("answer_ids").to_pylist()
        records = table.column("record").to_pylist() if self._has_record else [None] * len(prompts)
        labels = table.column(PROMPT_LABELS).to_pylist() if self._has_prompt_labels else [None] * len(prompts)
        examples = [Example(p, a, None if r is None else json.loads(r), pl or None)
                    for p, a, r, pl in zip(prompts, answers, records, labels)]
        for example in examples:
            if example.prompt_labels is not None and len(example.prompt_labels) != len(example.prompt_ids):
                raise DataError(f"{PROMPT_LABELS} holds {len(example.prompt_labels)} labels for "
                                f"{len(example.prompt_ids)} prompt tokens (record: {example.record})")
        return examples

    def __getitem__(self, index: Union[int, slice]) -> Union[Example, List[Example]]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:  # one Arrow slice (evaluation reads its micro-batches so)
                return self._decode(self._arrow[start:stop]) if start < stop else []
            return self.gather(range(start, stop, step))
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int or a slice, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return self._decode(self._arrow[int(index) % len(self):int(index) % len(self) + 1])[0]

    def gather(self, indices: Sequence[int]) -> List[Example]:
        """The examples at `indices` (any order, repeats allowed), read in one Arrow gather."""
        index = [int(i) for i in indices]
        bad = next((i for i in index if not 0 <= i < len(self)), None)
        if bad is not None:
            raise IndexError(f"indices: example {bad} out of range for {len(self)} examples")
        return self._decode(self._arrow[index]) if index else []

    def batches(self, batch_size: int = DEFAULT_BATCH_ROWS) -> Iterator[List[Example]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self._decode(self._arrow[start:start + batch_size])

    def __iter__(self) -> Iterator[Example]:
        """The examples in order, decoded `ITER_BATCH` at a time (Sequence's default decodes one row
        per Arrow read); only one batch of Python examples exists at a time."""
        for batch in self.batches(self.ITER_BATCH):
            yield from batch


# ---------------------------------------------------------------------- rows


@dataclass(frozen=True)
class _Field:
    name: str
    kind: str  # "int", "float" or "bool": the element type
    per_position: bool  # a list per row (else one value per row)
    width: Optional[int]  # K for a per-position list of K values, else None

    def arrow_type(self) -> pa.DataType:
        import pyarrow as pa

        element = {"int": pa.int32(), "float": pa.float32(), "bool": pa.bool_()}[self.kind]
        if not self.per_position:
            return {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}[self.kind]
        if self.width is not None:
            element = pa.list_(element, self.width)
        return pa.list_(element)


def _kind(value: Any, name: str) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    raise ValueError(f"row field {name!r}: values must be int, float or bool, got {type(value).__name__}")


def _infer_field(name: str, rows: Sequence[dict]) -> _Field:
    first = rows[0][name]
    if not isinstance(first, list):
        return _Field(name, _kind(first, name), False, None)
    sample = next((row[name] for row in rows if row[name]), None)
    if sample is None:  # every row's list is empty: nothing says otherwise
        return _Field(name, "int", True, None)
    element = sample[0]
    if isinstance(element, list):
        if not element:
            raise ValueError(f"row field {name!r}: per-position lists must not be empty")
        return _Field(name, _kind(element[0], name), True, len(element))
    return _Field(name, _kind(element, name), True, None)


_NUMPY_KIND = {"int": "iu", "float": "fiu", "bool": "b"}


def _values_array(field: _Field, values: list, shape_hint: str) -> np.ndarray:
    """numpy array of a field's values, checked against its kind and int32 range."""
    try:
        array = np.asarray(values)
    except ValueError as exc:  # ragged inner lists
        raise ValueError(f"row field {field.name!r}: {shape_hint} ({exc})") from None
    if array.size and array.dtype.kind not in _NUMPY_KIND[field.kind]:
        raise ValueError(f"row field {field.name!r}: expected {field.kind} values, got {array.dtype}")
    expected_ndim = 1 + (field.width is not None)
    if array.size and (array.ndim != expected_ndim or (field.width and array.shape[1] != field.width)):
        raise ValueError(f"row field {field.name!r}: {shape_hint}, got values of shape {array.shape}")
    if field.kind == "int" and array.size and field.per_position:
        low, high = int(array.min()), int(array.max())
        if low < _INT32.min or high > _INT32.max:
            raise ValueError(f"row field {field.name!r}: value {low if low < _INT32.min else high} "
                             "does not fit int32")
    if field.kind == "int":
        dtype = np.int32 if field.per_position else np.int64
    elif field.kind == "float":
        dtype = np.float32 if field.per_position else np.float64
    else:
        dtype = np.bool_
    if not array.size:
        return np.zeros((0,), dtype=dtype)
    return array.astype(dtype, copy=False).reshape(-1)


def _list_array(field: _Field, offsets: np.ndarray, flat: np.ndarray) -> pa.ListArray:
    """The one way a per-position column is built, so equal rows give equal buffers (equal bytes)."""
    import pyarrow as pa

    values = pa.array(flat)
    if field.width is not None:
        values = pa.FixedSizeListArray.from_arrays(values, field.width)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32, copy=False), type=pa.int32()), values)


def _column_from_rows(field: _Field, rows: Sequence[dict]) -> pa.Array:
    import pyarrow as pa

    if not field.per_position:
        return pa.array(_values_array(field, [row[field.name] for row in rows], "one value per row"))
    lists = [row[field.name] for row in rows]
    for i, value in enumerate(lists):
        if not isinstance(value, list):
            raise ValueError(f"row field {field.name!r}: rows[{i}] holds {type(value).__name__}, not a list")
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(value) for value in lists], out=offsets[1:])
    if offsets[-1] > _INT32.max:
        raise ValueError(f"row field {field.name!r}: {offsets[-1]} values in one batch; use fewer batch_rows")
    hint = f"every position a list of {field.width} values" if field.width else "a flat list per row"
    flat = _values_array(field, list(itertools.chain.from_iterable(lists)), hint)
    return _list_array(field, offsets, flat)


def _schema(fields: Sequence[_Field], first_row: int, batch_rows: int) -> pa.Schema:
    import pyarrow as pa

    metadata = {_META_FIRST_ROW: str(first_row).encode(), _META_BATCH_ROWS: str(batch_rows).encode()}
    return pa.schema([pa.field(f.name, f.arrow_type(), nullable=False) for f in fields], metadata=metadata)


class RowWriter:
    """Appends training rows to an Arrow IPC file, in record batches of `batch_rows` rows.

    path: the file to write (written to path + ".tmp", renamed on `close`: a
        reader never sees half a file; nothing is left on an error).
    first_row: the global index of this file's first row (a rank's shard of
        the iteration's rows starts where the previous rank's ends).
    batch_rows: rows per record batch (the file's bytes depend on the rows and
        this number only).

    Every row must have the fields (and per-field kinds) of the first row.
    Use as a context manager or call `close()`.
    """

    def __init__(self, path: Union[str, os.PathLike], *, first_row: int = 0,
                 batch_rows: int = DEFAULT_BATCH_ROWS) -> None:
        if isinstance(first_row, bool) or not isinstance(first_row, int) or first_row < 0:
            raise ValueError(f"first_row must be an int >= 0, got {first_row!r}")
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be an int >= 1, got {batch_rows!r}")
        self.path = os.fspath(path)
        self.first_row, self.batch_rows = first_row, batch_rows
        self.num_rows = 0
        self._tmp = self.path + ".tmp"
        self._fields: Optional[List[_Field]] = None
        self._pending: List[dict] = []
        self._sink = self._writer = None
        self._closed = False

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self, fields: List[_Field]) -> None:
        import pyarrow as pa

        self._fields = fields
        self._schema = _schema(fields, self.first_row, self.batch_rows)
        with self._naming_a_full_disk():
            self._sink = pa.OSFile(self._tmp, "wb")
            self._writer = pa.ipc.new_file(self._sink, self._schema)

    @contextlib.contextmanager
    def _naming_a_full_disk(self) -> Iterator[None]:
        """Disk full (Arrow's error names no file) as OSError(ENOSPC) naming this file."""
        try:
            yield
        except OSError as exc:
            if disk_full(exc):
                raise no_space_error(exc, self.path) from None
            raise

    def _check_fields(self, rows: Sequence[dict]) -> None:
        names = [f.name for f in self._fields]
        wanted = set(names)
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or row.keys() != wanted:  # any order; read back in file order
                got = list(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"rows[{i}] has fields {got}; this file's rows have {names}")

    def write(self, rows: Iterable[dict]) -> None:
        """Appends rows (dicts of lists or scalars); full record batches are written out."""
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        rows = list(rows)
        if not rows:
            return
        if self._fields is None:
            if not isinstance(rows[0], dict) or not rows[0]:
                raise ValueError("rows must be non-empty dicts of per-position lists")
            fields = [_infer_field(name, rows) for name in rows[0]]
            self._fields = fields
            try:
                self._check_fields(rows)
                self._encode(rows)  # check the first rows fully before creating a file
            except ValueError:
                self._fields = None
                raise
            self._open(fields)
        else:
            self._check_fields(rows)
        self._pending += rows
        while len(self._pending) >= self.batch_rows:
            self._flush(self._pending[:self.batch_rows])
            self._pending = self._pending[self.batch_rows:]

    def _encode(self, rows: Sequence[dict]) -> pa.RecordBatch:
        import pyarrow as pa

        arrays = [_column_from_rows(field, rows) for field in self._fields]
        return pa.RecordBatch.from_arrays(arrays, schema=_schema(self._fields, self.first_row, self.batch_rows))

    def _flush(self, rows: Sequence[dict]) -> None:
        batch = self._encode(rows)
        with self._naming_a_full_disk():
            self._writer.write_batch(batch)
        self.num_rows += len(rows)

    def write_batch(self, batch: "pa.RecordBatch") -> None:
        """Appends an Arrow record batch of this file's schema (used to re-chunk shards)."""
        if self._pending:
            raise ValueError("write_batch after write: row dicts are still pending")
        with self._naming_a_full_disk():
            self._writer.write_batch(batch)
        self.num_rows += batch.num_rows

    def close(self) -> str:
        """Writes the last rows, fsyncs the file and renames it into place (the folder fsynced
        too: a checkpoint that refers to the file never outlives it in a crash); returns its path."""
        import pyarrow as pa

        if self._closed:
            return self.path
        try:
            if self._pending:
                self._flush(self._pending)
                self._pending = []
            with self._naming_a_full_disk():
                if self._writer is None:  # no rows: a file with an empty schema and the metadata
                    self._sink = pa.OSFile(self._tmp, "wb")
                    self._writer = pa.ipc.new_file(self._sink, _schema([], self.first_row, self.batch_rows))
                self._writer.close()
                self._sink.close()
                fsync_path(self._tmp)
            os.replace(self._tmp, self.path)
            fsync_path(os.path.dirname(os.path.abspath(self.path)))
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drops the file being written."""
        self._closed = True
        for closable in (self._writer, self._sink):
            try:
                if closable is not None:
                    closable.close()
            except Exception:  # already failing; the temporary file is removed below
                pass
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


def write_rows(path: Union[str, os.PathLike], rows: Iterable[dict], *, first_row: int = 0,
               batch_rows: int = DEFAULT_BATCH_ROWS) -> str:
    """Writes rows to one Arrow file (see RowWriter); returns its path."""
    with RowWriter(path, first_row=first_row, batch_rows=batch_rows) as writer:
        for chunk in _chunks(rows, batch_rows):
            writer.write(chunk)
    return writer.path


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def shard_range(num_rows: int, rank: int, world_size: int) -> range:
    """The rows rank `rank` of `world_size` builds: a contiguous share, sizes differing by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got {rank}, {world_size}")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _field_from_arrow(field: pa.Field) -> _Field:
    import pyarrow as pa

    def kind(arrow_type: pa.DataType) -> str:
        if pa.types.is_boolean(arrow_type):
            return "bool"
        return "float" if pa.types.is_floating(arrow_type) else "int"

    arrow_type = field.type
    if not pa.types.is_list(arrow_type):
        return _Field(field.name, kind(arrow_type), False, None)
    element = arrow_type.value_type
    if pa.types.is_fixed_size_list(element):
        return _Field(field.name, kind(element.value_type), True, element.list_size)
    return _Field(field.name, kind(element), True, None)


class RowTable(Sequence[dict]):
    """Training rows read from one Arrow file or the union of several shards, memory-mapped.

    Shards are ordered by the first row each names (not by the order of
    `paths`) and must tile 0..n-1 without gap or overlap; the union is then the
    same rows in the same order for any number of shards. `gather` and
    indexing decode rows to dicts of Python lists, the trainer's row format.
    """

    def __init__(self, table: "pa.Table", paths: List[str], sources: list) -> None:
        self.table = table
        self.paths = paths
        self._sources = sources  # the memory maps stay open while the table lives
        self.fields = [_field_from_arrow(field) for field in table.schema]
        self._batches = table.to_batches()  # zero-copy views of the mapped record batches
        self._batch_starts = np.cumsum([0] + [batch.num_rows for batch in self._batches])

    @classmethod
    def open(cls, paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], *,
             expected_rows: Optional[int] = None) -> "RowTable":
        import pyarrow as pa

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise ValueError("paths must name at least one row file")
        shards = []
        for path in paths:
            try:
                source = pa.memory_map(path, "r")
                table = pa.ipc.open_file(source).read_all()
            except (OSError, pa.ArrowInvalid) as exc:
                raise DataError(f"{path}: not a gapfix row file ({exc})") from None
            metadata = table.schema.metadata or {}
            if _META_FIRST_ROW not in metadata:
                raise DataError(f"{path}: not a gapfix row file (no {_META_FIRST_ROW.decode()} metadata)")
            shards.append((int(metadata[_META_FIRST_ROW]), path, table, source))
        shards.sort(key=lambda shard: (shard[0], shard[2].num_rows))
        next_row, schema, tables = 0, None, []
        for first_row, path, table, _ in shards:
            if first_row != next_row:
                problem = "overlaps the previous shard" if first_row < next_row else \
                    f"leaves rows {next_row}..{first_row - 1} missing"
                raise DataError(f"{path}: starts at row {first_row}, which {problem}")
            next_row += table.num_rows
            if table.num_rows == 0:
                continue
            bare = table.schema.remove_metadata()
            if schema is None:
                schema = bare
            elif not bare.equals(schema):
                raise DataError(f"{path}: row fields {bare.names} ({bare.types}) differ from the other "
                                f"shards' {schema.names} ({schema.types})")
            tables.append(table.replace_schema_metadata(None))
        if expected_rows is not None and next_row != expected_rows:
            raise DataError(f"{', '.join(paths)}: {next_row} rows, expected {expected_rows}")
        table = pa.concat_tables(tables) if tables else pa.table({})
        return cls(table, [shard[1] for shard in shards], [shard[3] for shard in shards])

    def __len__(self) -> int:
        return self.table.num_rows

    def _decode(self, table: pa.Table) -> List[dict]:
        columns = [table.column(field.name).to_pylist() for field in self.fields]
        names = [field.name for field in self.fields]
        return [dict(zip(names, values)) for values in zip(*columns)]

    def gather(self, indices: Sequence[int]) -> List[dict]:
        """Rows at `indices` (any order, repeats allowed), as dicts of Python lists."""
        import pyarrow as pa

        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            bad = index[(index < 0) | (index >= len(self))][0]
            raise IndexError(f"indices: row {bad} out of range for {len(self)} rows")
        if not index.size:
            return []
        # Take within each record batch: Arrow's take on a multi-chunk column concatenates the
        # whole column first, a copy of every row (resident memory growing with the dataset).
        order = np.argsort(index, kind="stable")
        owner = np.searchsorted(self._batch_starts, index[order], side="right") - 1
        pieces = []
        for batch_id in np.unique(owner):
            chosen = order[owner == batch_id]
            local = index[chosen] - self._batch_starts[batch_id]
            pieces.append(self._batches[batch_id].take(pa.array(local)))
        gathered = pa.Table.from_batches(pieces).combine_chunks()  # the wanted rows only, sorted
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return self._decode(gathered.take(pa.array(inverse)))

    def __getitem__(self, index: Union[int, slice]) -> Union[dict, List[dict]]:
        if isinstance(index, slice):
            return self.gather(range(*index.indices(len(self))))
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int or a slice, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        return self.gather([int(index) % len(self)])[0]

    def iter_batches(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[List[dict]]:
        """The rows in order, `batch_rows` at a time."""
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        for start in range(0, len(self), batch_rows):
            yield self._decode(self.table.slice(start, batch_rows))

    def write_to(self, path: Union[str, os.PathLike], *, batch_rows: int = DEFAULT_BATCH_ROWS) -> str:
        """Writes the rows to one file, re-cut into batches of `batch_rows`: the same bytes
        as `write_rows` of the same rows, however many shards they were read from."""
        with RowWriter(path, batch_rows=batch_rows) as writer:
            if not len(self):
                return writer.close()
            writer._open(self.fields)
            for start in range(0, len(self), batch_rows):
                writer.write_batch(self._canonical_batch(self.table.slice(start, batch_rows), writer))
        return writer.path

    def _canonical_batch(self, table: pa.Table, writer: RowWriter) -> pa.RecordBatch:
        import pyarrow as pa

        arrays = []
        for field in self.fields:
            column = table.column(field.name).combine_chunks()
            if not field.per_position:
                arrays.append(pa.array(column.to_numpy(zero_copy_only=False)))
                continue
            offsets = column.offsets.to_numpy().astype(np.int64)
            flat = column.flatten()
            if field.width is not None:
                flat = flat.flatten()
            flat = flat.to_numpy(zero_copy_only=False)
            arrays.append(_list_array(field, offsets - offsets[0], flat))
        return pa.RecordBatch.from_arrays(arrays, schema=writer._schema)


def write_sft_rows(path: Union[str, os.PathLike], examples: Union["datasets.Dataset", ExampleTable], *,
                   first_row: int = 0, batch_rows: int = DEFAULT_BATCH_ROWS,
                   row_fn: Optional[Callable[[Example], dict]] = None) -> str:
    """The SFT rows of `examples` (through `gapfix.data.sft_row`, or `row_fn`) written to `path`,
    `batch_rows` examples at a time: the rows never exist as one Python list."""
    from gapfix import data as gapfix_data

    table = examples if isinstance(examples, ExampleTable) else ExampleTable(examples)
    make_row = row_fn or gapfix_data.sft_row
    with RowWriter(path, first_row=first_row, batch_rows=batch_rows) as writer:
        for batch in table.batches(batch_rows):
            writer.write([make_row(example) for example in batch])
    return writer.path


__all__ = ["ExampleTable", "RowTable", "RowWriter", "dataset_from_examples", "load_tokenized",
           "main_process_first", "shard_range", "write_rows", "write_sft_rows"]

