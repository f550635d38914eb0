"""`gapfix train`: the reference training script on your model and data.

    gapfix train --model path/to/hf_model --train train.jsonl --eval eval.jsonl \\
                 --method rac --iterations 3 --out runs/rac

--model is a local transformers model folder (nothing is downloaded), a
config.json to build a randomly initialised model from, or "tiny" for a small
Llama; the last two get a tokenizer trained locally on the training data
(--tokenizer bpe, word or char). --attn auto (the default) uses FlashAttention-2 with packed
micro-batches on a GPU where flash-attn is installed, else sdpa. Every TrainConfig field is a
flag (--beta, --rac-mode, --steps-per-iteration, ...), its help text the field's (a method's
flags come from its config dataclass, gapfix.methods.bash.BashConfig and
gapfix.methods.rac.RacConfig). Under torchrun the same command trains with DDP (or
--distributed fsdp).
"""
import dataclasses
import json
import os
import typing

from gapfix.data.loading import data_cache_dir, load_data
from gapfix.data.loading import is_table_source as _is_table_source
from gapfix.data.loading import length_limits as _length_limits
from gapfix.data.loading import prompt_limit as _prompt_limit
from gapfix.trainer import TrainConfig

_SKIP = {"out_dir", "method", "iterations"}


def _flag_type(field):
    """The flag's value type: the field's annotation, Optional[X] read as X."""
    hint = typing.get_type_hints(TrainConfig)[field.name]  # resolves string annotations, no eval
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _show(value):
    return "unset" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def configure(parser):
    import argparse

    from gapfix.recipes import RECIPES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (parser.description or "") + (
        "\n\nDefaults: TrainConfig's, or the named --recipe's (gapfix.recipes); an explicit flag "
        "overrides either.")
    demo = RECIPES["demo"]
    parser.add_argument("--model", required=True, help='a local HF model folder, a config.json, a *.gguf file, '
                        '"smollm2-135m-instruct" (gapfix[real]) or "tiny"')
    parser.add_argument("--train", required=True,
                        help="prompt/response or chat records: a JSONL file, a Parquet file, or a folder "
                        "written by datasets' save_to_disk, tokenized by datasets.map into a memory-mapped "
                        "cache under --out (data_cache/); Parquet and folders may hold prompt_ids/answer_ids")
    parser.add_argument("--eval", help="held-out records (as --train takes), evaluated by greedy generation "
                        "after each iteration (under torchrun each rank its share)")
    parser.add_argument("--answer-regex", default=None,
                        help="--eval scores the answer this regex captures (group 1; default: exact match)")
    from gapfix.eval_cli import add_scorer_flag

    add_scorer_flag(parser)
    parser.add_argument("--method", default="sft",
                        help="sft, bash, rac, or a method registered with gapfix.methods.base.register "
                        "(default sft)")
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                        help="named defaults: 'default' (TrainConfig's) or 'demo' (the demo's recipe)")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"offline phase + training rounds (default 1; demo recipe {demo['iterations']})")
    parser.add_argument("--out", required=True, help="output folder (metrics, checkpoints, final model)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="drop examples longer than this (default: keep all)")
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                        help="malformed data lines: stop, or skip them with a warning (default raise)")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")
    parser.add_argument("--resume-with-changed-config", action="store_true",
                        help="resume a checkpoint in --out even though it was written with other "
                             "settings (refused by default, naming the settings that differ)")
    parser.add_argument("--attn", default="auto",
                        help="attention implementation: auto, sdpa, flash_attention_2, eager (default auto)")
    parser.add_argument("--tokenizer", default="bpe", choices=["bpe", "word", "char"],
                        help="for --model tiny / config.json: the tokenizer trained on --train: byte-level "
                             "BPE, word level (one token per number / word) or characters (default bpe)")
    parser.add_argument("--vocab-size", type=int, default=512,
                        help="for --model tiny / config.json: tokenizer vocabulary cap (default 512)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    add_lora_flags(parser)
    add_config_flags(parser)


def add_lora_flags(parser):
    """--lora-r / --lora-alpha / --lora-dropout / --lora-targets (gapfix train and gapfix compare)."""
    parser.add_argument("--lora-r", type=int, default=None,
                        help="train a LoRA adapter of this rank (the model frozen); saved in PEFT's format")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * r)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    parser.add_argument("--lora-targets", default=None,
                        help="comma-separated module names to adapt (default: every linear layer but the head)")


def add_config_flags(parser, skip=()):
    """A flag per TrainConfig field (but `skip`), with its meaning and default; default None
    in argparse, so that config_values() can tell a given flag from a recipe's default."""
    from gapfix.recipes import RECIPES

    demo = RECIPES["demo"]
    for field in dataclasses.fields(TrainConfig):
        if field.name in _SKIP or field.name in skip:
            continue
        kind = _flag_type(field)
        flag = "--" + field.name.replace("_", "-")
        text = field.metadata.get("help") or field.name.replace("_", " ")
        text += f" (default {_show(field.default)}"
        if field.name in demo and demo[field.name] != field.default:
            text += f"; demo recipe {_show(demo[field.name])}"
        text = (text + ")").replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="{true,false}", help=text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=text)


def config_values(args) -> dict:
    """TrainConfig defaults, then the --recipe's values, then the flags given."""
    from gapfix.recipes import recipe

    values = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    values.update(recipe(getattr(args, "recipe", "default")))
    for field in dataclasses.fields(TrainConfig):
        given = getattr(args, field.name, None)
        if field.name not in _SKIP and given is not None:
            values[field.name] = given
    if getattr(args, "iterations", None) is not None:
        values["iterations"] = args.iterations
    return values


def config_from_args(args) -> TrainConfig:
    values = config_values(args)
    values["method"], values["out_dir"] = args.method, args.out
    return TrainConfig(**values)


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def resolve_attention(attn):
    """"auto": FlashAttention-2 where it can run (a GPU and flash-attn installed), else sdpa."""
    if attn != "auto":
        return attn
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _tokenizer_from_data(train_path, vocab_size, kind="bpe", on_error="skip"):
    """A tokenizer trained on the prompt and response texts of --train's records, streamed:
    records are read and handed to the trainer a batch at a time (`_record_texts`), so memory
    does not grow with the file."""
    from gapfix.data import DataError
    from gapfix.models import train_tokenizer

    if kind == "bpe":
        vocab_size = max(vocab_size, 260)  # a byte-level BPE needs its 256 bytes and 4 specials
    seen = {"records": 0, "texts": 0}
    try:
        return train_tokenizer(_record_texts(train_path, on_error, seen), vocab_size=vocab_size, kind=kind,
                               add_bos=True)
    except ValueError as exc:
        if seen["texts"] or isinstance(exc, DataError):  # only "no texts at all" is rephrased
            raise
        raise DataError(f"{train_path}: no prompt/response or chat records to build a tokenizer from"
                        + ("" if seen["records"] else " (the file holds no records)")) from None


def _record_texts(train_path, on_error, seen):
    """The prompt and response text of each usable record of a JSONL file (read line by line),
    a Parquet file or a saved datasets folder (read a batch of rows at a time); seen counts the
    records and texts. A malformed JSONL line raises DataError (on_error="raise") or is passed
    over silently: load_tokenized reports it once, when the data is loaded."""
    from gapfix.data import (
        DataError,
        check_input_file,
        not_a_record,
        parse_jsonl_lines,
        record_problem,
        split_record,
    )

    if _is_table_source(train_path):
        records = _table_records(train_path)
    else:
        def records_of_file():
            check_input_file(train_path, "--train")
            for line, record, why in parse_jsonl_lines(train_path):
                why = why if why is not None else not_a_record(record)
                if why is None:
                    yield record
                elif on_error == "raise":
                    raise DataError(f"{train_path}:{line}: malformed JSONL line: {why}")

        records = records_of_file()
    for record in records:
        seen["records"] += 1
        pair = split_record(record) if record_problem(record) is None else None  # load_tokenized names it
        if pair:
            seen["texts"] += len(pair)
            yield from pair


def load_model_and_tokenizer(spec, train_path, attn="sdpa", seed=0, tokenizer="bpe", vocab_size=512,
                             on_error="skip"):
    """(model, tokenizer) from a local folder, a config.json, or a tiny Llama for "tiny"."""
    if spec == "tiny":
        from gapfix.models import tiny_llama

        tokenizer = _tokenizer_from_data(train_path, vocab_size, tokenizer, on_error)
        return tiny_llama(tokenizer, seed=seed), tokenizer
    from gapfix.models import LOCAL_ONLY, check_no_remote_code, resolve_model

    if os.path.isfile(spec) and spec.endswith(".json"):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        check_no_remote_code(os.path.dirname(os.path.abspath(spec)))
        config = AutoConfig.from_pretrained(spec, **LOCAL_ONLY)
        tokenizer = _tokenizer_from_data(train_path, getattr(config, "vocab_size", vocab_size), tokenizer,
                                         on_error)
        config.vocab_size = len(tokenizer)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(config, name, getattr(tokenizer, name))
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn), tokenizer
    spec = str(resolve_model(spec))  # smollm2-135m-instruct or a *.gguf file: its cached folder
    if not os.path.isdir(spec):
        raise ValueError(f"--model {spec!r} is not 'tiny', 'smollm2-135m-instruct', a config.json, a *.gguf "
                         "file or an existing local model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gapfix.models import is_adapter_folder, load_adapter_for_training

    if is_adapter_folder(spec):  # a PEFT adapter: its base model, the adapter trainable
        model, tokenizer = load_adapter_for_training(spec, attn_implementation=attn)
        if tokenizer is None:
            raise ValueError(f"--model {spec!r}: neither the adapter nor its base model folder has a tokenizer")
    else:
        check_no_remote_code(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, **LOCAL_ONLY, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(spec, **LOCAL_ONLY)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _table_records(path):
    """The records of a Parquet file or saved datasets folder (to build a tokenizer from), a batch
    of rows at a time. A Parquet file is read with pyarrow directly: datasets would first convert
    it into its cache (~/.cache, as --out is not known here). A null is a field the record does not
    have (as load_tokenized reads table rows)."""
    from gapfix.data import DataError
    from gapfix.data.arrow import TOKEN_COLUMNS, _raw_dataset

    if os.path.isfile(path):
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types; name the file whatever it is
            raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
        names, batches = parquet.schema_arrow.names, (batch.to_pylist() for batch in parquet.iter_batches(1000))
    else:
        raw, path, _ = _raw_dataset(path, None)
        names = raw.column_names
        batches = ([dict(zip(batch, values)) for values in zip(*batch.values())] for batch in raw.iter(1000))
    if all(column in names for column in TOKEN_COLUMNS):
        raise DataError(f"{path}: already tokenized (prompt_ids/answer_ids): pass --model with its tokenizer")
    for batch in batches:
        yield from ({key: value for key, value in row.items() if value is not None} for row in batch)


def join_process_group(device_name):
    """Under torchrun (WORLD_SIZE > 1), joins the process group now, as train() would (the same
    backend and device), so that loading the data can already wait on rank 0 (load_data)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from gapfix.trainer import _Dist, _pick_device

        _Dist(_pick_device(device_name))


def evaluate_across_ranks(model, tokenizer, examples, *, max_new_tokens: int, answer_regex=None,
                          scorer=None) -> dict:
    """Greedy accuracy of `model` on `examples` ({"accuracy", "count"}, as gapfix.evaluation.evaluate
    gives), split across the ranks of a torchrun job: each rank generates for its contiguous share
    (gapfix.data.arrow.shard_range), and one all_reduce per call, on every rank whatever its share
    (empty where the world outnumbers the examples), sums the correct answers and the counts.
    Greedy answers do not depend on the split, so any world size gives the accuracy of one process.
    The generation itself runs no collective (ranks run different numbers of generate calls)."""
    import types

    from gapfix.data.arrow import shard_range
    from gapfix.evaluation import evaluate
    from gapfix.trainer import _all_reduce_sum

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    share = shard_range(len(examples), rank, world)
    correct = 0
    if len(share):
        result = evaluate(model, tokenizer, examples[share.start:share.stop], max_new_tokens=max_new_tokens,
                          backend="hf", return_answers=True, answer_regex=answer_regex, scorer=scorer)
        correct = sum(result["correct"])
    device = next(model.parameters()).device  # NCCL reduces on the GPU the model is on
    total_correct, count = _all_reduce_sum(types.SimpleNamespace(world=world), device)([float(correct), len(share)])
    count = int(count)
    return {"accuracy": total_correct / count, "count": count, "backend": "hf"}


def run(args) -> int:
    from gapfix.data import check_input_file
    from gapfix.eval_cli import scoring_args
    from gapfix.threads import apply_threads, quiet_third_party
    from gapfix.trainer import leave_process_group, train

    config = config_from_args(args)
    apply_threads(args.threads)
    scoring = scoring_args(args)
    if not config.progress:
        quiet_third_party()
    attention = resolve_attention(args.attn)
    if attention in ("flash_attention_2", "flash_attention_3") and args.attn == "auto":
        config.packing = True  # varlen attention: packed micro-batches compute no padding
    config.validate()  # a bad --method or --beta fails before any model is loaded
    if not _is_table_source(args.train):
        check_input_file(args.train, "--train")
    if args.eval and not _is_table_source(args.eval):
        check_input_file(args.eval, "--eval")
    model, tokenizer = load_model_and_tokenizer(args.model, args.train, attention, config.seed,
                                                args.tokenizer, args.vocab_size, on_error=args.on_error)
    if args.lora_r is not None:
        from gapfix.models import apply_lora

        if hasattr(model, "peft_config"):
            raise ValueError(f"--lora-r: --model {args.model!r} is already an adapter; it is trained as it is")
        model = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets,
                           dropout=args.lora_dropout)
    max_length, max_length_source, context = _length_limits(model, args.max_length)
    limits = {"max_length": max_length, "max_length_source": max_length_source, "on_error": args.on_error,
              "cache_dir": data_cache_dir(args.out)}
    from gapfix.methods.base import get_method

    generated = get_method(config.method).generates  # RAC generates from the training prompts
    join_process_group(config.device)
    examples, train_report = load_data(
        args.train, tokenizer, **limits,
        max_prompt_length=_prompt_limit(context, config.max_new_tokens) if generated else None)
    from gapfix.data.arrow import check_token_ids

    check_token_ids(examples, model, args.train)  # named by its file before train() checks it again
    eval_examples, eval_report = (
        load_data(args.eval, tokenizer, **limits, max_prompt_length=_prompt_limit(context, config.max_new_tokens))
        if args.eval else (None, None))
    if eval_examples is not None:  # evaluate() reads its Examples a batch at a time from the table
        from gapfix.data.arrow import ExampleTable

        eval_examples = ExampleTable(eval_examples)
    evaluations = []

    def on_iteration_end(iteration, trained):  # under FSDP `trained` is a whole copy (the trainer's)
        if eval_examples is None:
            return
        result = evaluate_across_ranks(trained, tokenizer, eval_examples, max_new_tokens=config.max_new_tokens,
                                       **scoring)
        result["iteration"] = iteration
        evaluations.append(result)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"iteration {iteration}: eval accuracy {result['accuracy']:.3f} ({result['count']} examples)")

    result = train(model, tokenizer, examples, config, resume=not args.no_resume,
                   resume_with_changed_config=args.resume_with_changed_config,
                   on_iteration_end=on_iteration_end)
    summary = {"method": config.method, "steps": result.steps, "phase_seconds": result.phase_seconds,
               "evaluations": evaluations, "data": {"train": train_report, "eval": eval_report}}
    if int(os.environ.get("RANK", "0")) == 0:  # one writer: the ranks would race on one file
        from gapfix.outdir import open_file

        with open_file(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary))
    leave_process_group()
    return 0
