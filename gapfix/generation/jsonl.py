"""Dataset-scale generation to JSONL, resumable, and the readers of its input and output files.

`generate_to_jsonl` appends each batch's records to `<out>.partial` (flushed and fsync'ed) beside
`<out>.partial.json` (the run's settings), and renames the partial file to `<out>` only when the
run is complete; an interrupted run resumes from its last complete batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gapfix.generation.common import FINISH_REASONS, Generation, _is_model_path, _model_dir
from gapfix.generation.runner import _progress, _Run


def read_prompts_jsonl(path, *, on_error: str = "raise", field: str | None = None,
                       prefixes: list | None = None) -> list:
    """Prompts from a JSONL file, one per line: an object with "prompt" (text)
    or "prompt_ids" / "input_ids" / "token_ids" (a list of ints), a bare JSON
    string, or a bare JSON list of ints. Blank lines are skipped. `field`
    names the key to read instead. Bad lines (bad bytes, bad JSON, no prompt):
    on_error="raise" raises a ValueError listing their line numbers (1-based);
    "skip" leaves them out with a warning that lists them. A file that holds no
    prompt is an error. `prefixes`: a list that gets, per prompt read, its
    object's "prefix" (the start of the response to continue from: text or
    token ids) or None (see `with_prefixes`)."""
    from gapfix.data import check_input_file, parse_jsonl_lines

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(check_input_file(path, "prompts file"))
    keys = (field,) if field else ("prompt", "prompt_ids", "input_ids", "token_ids")
    prompts, bad = [], []
    for number, value, why in parse_jsonl_lines(path):
        if why is not None:
            bad.append((number, why))
            continue
        prefix = None
        if isinstance(value, dict):
            found = [k for k in keys if k in value]
            if not found:
                bad.append((number, f"no {' / '.join(repr(k) for k in keys)} key"))
                continue
            prefix = value.get("prefix")
            if prefix is not None and not (isinstance(prefix, str) or (isinstance(prefix, list) and all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prefix))):
                bad.append((number, "prefix is not a string or a list of token ids"))
                continue
            value = value[found[0]]
        if isinstance(value, str) and value:
            try:
                value.encode("utf-8")  # a lone surrogate escape ("\\ud800") would fail the tokenizer
            except UnicodeEncodeError:
                bad.append((number, "prompt holds a lone surrogate escape (not encodable text)"))
                continue
        elif not (isinstance(value, list) and value and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)):
            bad.append((number, "prompt is not a non-empty string or list of token ids"))
            continue
        prompts.append(value)
        if prefixes is not None:
            prefixes.append(prefix)
    if bad:
        listing = "; ".join(f"line {n}: {why}" for n, why in bad[:20])
        more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
        message = f"{len(bad)} malformed prompt line(s) in {str(path)!r}: {listing}{more}"
        if on_error == "raise":
            raise ValueError(message)
        import warnings

        warnings.warn(message + " (skipped)", stacklevel=2)
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} holds no prompts"
                         + (f" (its {len(bad)} line(s) were malformed)" if bad else " (it is empty)"))
    if len({isinstance(p, str) for p in prompts}) > 1:
        raise ValueError(f"prompts file {str(path)!r} mixes text prompts and token-id prompts")
    return prompts


def with_prefixes(prompts: list, prefixes: list, tokenizer) -> list:
    """Token-id prompts that end with each prompt's response prefix (None: none).

    A text prompt is encoded with special tokens (as `generate` does), a text
    prefix without: prompt and response are tokenized apart, as in training
    (gapfix.data), so a forced continuation sees the ids training saw.
    """
    if len(prompts) != len(prefixes):
        raise ValueError(f"prompts ({len(prompts)}) and prefixes ({len(prefixes)}) differ in length")
    if tokenizer is None and any(isinstance(x, str) for x in list(prompts) + list(prefixes)):
        raise ValueError("text prompts or prefixes need a tokenizer (the model folder has none)")
    out = []
    for prompt, prefix in zip(prompts, prefixes):
        ids = list(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)
        if isinstance(prefix, str):
            ids += list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        elif prefix is not None:
            ids += list(prefix)
        out.append(ids)
    return out


def read_generations_jsonl(path) -> list:
    """The `Generation` records of a complete output file; a bad line raises a ValueError
    naming the file and line."""
    from gapfix.data import check_input_file, parse_jsonl_lines

    path = check_input_file(path, "generations file")
    records = []
    for number, value, why in parse_jsonl_lines(path):
        try:
            if why is not None:
                raise ValueError(why)
            records.append(Generation.from_record(value))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a generation record ({err})") from None
    return records


def _partial_paths(out_path: Path):
    return out_path.with_name(out_path.name + ".partial"), out_path.with_name(out_path.name + ".partial.json")


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _scan_partial(partial: Path, run_prompt_count: int, n: int, batch_size: int):
    """(byte offset, prompt index) where the partial file's last complete batch
    ends. Records are checked to be exactly the expected sequence; a torn or
    out-of-order line ends the scan (everything from it on is dropped)."""
    good_end, next_prompt = 0, 0
    expected = [0, 0]  # prompt_index, sample_index of the next record
    offset = 0
    with open(partial, "rb") as handle:
        for raw in handle:
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break  # torn last line
            try:
                record = json.loads(raw)
                ok = (record["prompt_index"], record["sample_index"]) == tuple(expected) \
                    and isinstance(record["token_ids"], list) \
                    and record["finish_reason"] in FINISH_REASONS
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                break
            expected[1] += 1
            if expected[1] == n:
                expected = [expected[0] + 1, 0]
                # a batch ends after its last prompt's last sample
                if expected[0] % batch_size == 0 or expected[0] == run_prompt_count:
                    good_end, next_prompt = offset, expected[0]
    return good_end, next_prompt


def generate_to_jsonl(
    model,
    prompts,
    out_path,
    *,
    tokenizer=None,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int | None = None,
    backend: str = "auto",
    logprobs: bool = False,
    batch_size: int | None = None,
    dtype=None,
    engine_kwargs: dict | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate for every prompt and write one JSON record per answer to
    `out_path` (keys: prompt_index, sample_index, token_ids, finish_reason,
    and text / logprobs where available), in (prompt_index, sample_index) order.

    `prompts` is a list (as for `generate`) or the path of a prompts JSONL file
    (see `read_prompts_jsonl`). Records go to `<out_path>.partial`, flushed and
    fsync'ed after every batch, beside `<out_path>.partial.json` (the run's
    settings); only a finished run is renamed to `out_path`, so a file at
    `out_path` is always complete. resume=True continues an interrupted run
    with the same settings from its last complete batch (a torn or partial
    batch at the end is dropped and regenerated), so no record is lost or
    duplicated; with a seed (or greedy) the result equals an uninterrupted run.
    An existing complete `out_path` raises FileExistsError unless overwrite.
    """
    out_path = Path(os.fspath(out_path))
    if out_path.is_dir():
        raise ValueError(f"out_path {str(out_path)!r} is a directory: name the JSONL file to write")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"out_path {str(out_path)!r} already exists (a complete run); "
                              "pass overwrite=True to replace it")
    prompts_source = None
    if _is_model_path(prompts):
        prompts_source = str(Path(os.fspath(prompts)).resolve())
        prompts = read_prompts_jsonl(prompts)
    run = _Run(model, prompts, tokenizer=tokenizer, n=n, temperature=temperature, top_p=top_p,
               max_new_tokens=max_new_tokens, seed=seed, backend=backend, logprobs=logprobs,
               batch_size=batch_size, dtype=dtype, engine_kwargs=engine_kwargs, reload=False)
    settings = {
        "format": 1,
        "model": str(_model_dir(model)) if _is_model_path(model) else f"<in-memory {type(model).__name__}>",
        "backend": run.backend_name,
        "prompts_sha256": hashlib.sha256(json.dumps(run.prompt_ids).encode()).hexdigest(),
        "prompts_source": prompts_source,
        "num_prompts": len(run.prompt_ids),
        "batch_size": run.batch_size,
        "dtype": None if dtype is None else str(dtype),
        **run.options,
    }
    partial, meta = _partial_paths(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    start_prompt, keep_bytes = 0, 0
    if resume and partial.exists() and meta.exists():
        try:
            previous = json.loads(meta.read_text())
        except ValueError:
            previous = None
        if previous is not None:
            differ = sorted(k for k in settings if k != "prompts_source"
                            and previous.get(k) != settings[k])
            if differ:
                raise ValueError(
                    f"cannot resume {str(partial)!r}: settings differ from the interrupted run's "
                    f"({', '.join(differ)}); pass resume=False to start over"
                )
            keep_bytes, start_prompt = _scan_partial(partial, len(run.prompt_ids), n, run.batch_size)
    meta.write_text(json.dumps(settings, indent=1))
    mode = "r+b" if keep_bytes else "wb"  # r+b keeps the complete batches
    bar = _progress(len(run.prompt_ids), enabled=progress, initial=start_prompt)
    try:
        with open(partial, mode) as handle:
            handle.seek(keep_bytes)
            handle.truncate()
            for first, batch in run.batches(start_prompt):
                records = run.run_batch(first, batch)
                handle.write(b"".join(
                    (json.dumps(r.to_record(), ensure_ascii=False) + "\n").encode("utf-8")
                    for r in records
                ))
                handle.flush()
                os.fsync(handle.fileno())
                bar.update(len(batch))
    finally:
        bar.close()
    os.replace(partial, out_path)  # atomic: out_path appears only complete
    meta.unlink(missing_ok=True)
    _fsync_dir(out_path.parent)
    return out_path
