"""`gapfix eval`: accuracy and exposure-bias diagnostics of a model on held-out data.

    gapfix eval --model runs/sft/final --data test.jsonl --answer-regex '#### (\\S+)' --out eval/

--data holds prompt/response or chat records (JSONL, Parquet or a saved datasets folder),
tokenized as `gapfix train` tokenizes --eval: into a memory-mapped cache under --out
(data_cache/), read a batch of examples at a time. Writes report.json and report.png
into --out (see gapfix.evaluation for what each number means) and prints a
one-line summary.
"""
import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a local model folder (save_pretrained, with its tokenizer), a *.gguf file or "
                             '"smollm2-135m-instruct"')
    parser.add_argument("--data", required=True,
                        help="prompt/response or chat records: JSONL, Parquet or a saved datasets folder, "
                             "tokenized into a memory-mapped cache under --out (data_cache/)")
    parser.add_argument("--answer-regex", default=None,
                        help="score the answer this regex captures (group 1, else the whole match; the last "
                             "match counts) instead of exact match of the whole response "
                             "(default: exact match)")
    parser.add_argument("--out", default="gapfix-eval", help="output folder for report.json and report.png "
                                                             "(default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="generation budget (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--top-k", type=int, default=5,
                        help="recovery: the wrong token is drawn from the model's top-k "
                             "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="recovery positions and tokens (default %(default)s)")
    parser.add_argument("--backend", choices=("auto", "vllm", "hf"), default="hf",
                        help="generation backend (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=None, help="drop examples longer than this")
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                        help="malformed data lines: stop, or skip them with a warning (default %(default)s)")
    add_threads_flag(parser)


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def quiet_third_party() -> None:
    """No third-party progress bars (transformers' loading and saving bars, datasets' tokenizing)."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def load_eval_examples(path: str, tokenizer, *, out: str, max_length: int | None = None,
                       on_error: str = "raise", limit: int | None = None):
    """--data's examples as an ExampleTable over a memory-mapped dataset (gapfix train's loader,
    its cache under <out>/data_cache): the evaluation reads them a batch at a time, never the
    whole file as Python lists of ints."""
    from gapfix.data.arrow import ExampleTable
    from gapfix.train_cli import data_cache_dir, load_data

    dataset, _ = load_data(path, tokenizer, cache_dir=data_cache_dir(out), max_length=max_length,
                           on_error=on_error, limit=limit)
    return ExampleTable(dataset)


def run(args: argparse.Namespace) -> int:
    from gapfix.data import check_input_file
    from gapfix.evaluation import evaluate_model, summary_line, write_report
    from gapfix.models import load_model
    from gapfix.train_cli import _is_table_source

    apply_threads(args.threads)
    quiet_third_party()
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise ValueError(f"--model {args.model!r} has no tokenizer files: "
                         "save the tokenizer beside the model")
    if not _is_table_source(args.data):
        check_input_file(args.data, "--data")
    examples = load_eval_examples(args.data, tokenizer, out=args.out, max_length=args.max_length,
                                  on_error=args.on_error, limit=args.limit)
    report = evaluate_model(model, tokenizer, examples, answer_regex=args.answer_regex,
                            max_new_tokens=args.max_new_tokens, backend=args.backend, seed=args.seed,
                            top_k=args.top_k)
    report["model"], report["data"] = args.model, args.data
    paths = write_report(report, args.out)
    print(summary_line(report))
    for note in report["notes"]:
        print("note:", note)
    print("wrote", ", ".join(paths.values()))
    return 0
