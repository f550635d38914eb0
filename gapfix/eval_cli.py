"""`gapfix eval`: accuracy and exposure-bias diagnostics of a model on held-out data.

    gapfix eval --model runs/sft/final --data test.jsonl --answer-regex '#### (\\S+)' --out eval/

--data holds prompt/response or chat records (JSONL, Parquet or a saved datasets folder),
tokenized as `gapfix train` tokenizes --eval: into a memory-mapped cache under --out
(data_cache/), read a batch of examples at a time. Writes report.json and report.png
into --out (see gapfix.evaluation for what each number means) and prints a
one-line summary.
"""
import argparse

from gapfix.data.loading import load_eval_examples
from gapfix.threads import add_threads_flag, apply_threads, quiet_third_party

__all__ = ["add_threads_flag", "apply_threads", "configure", "load_eval_examples", "quiet_third_party", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a local model folder (save_pretrained, with its tokenizer)")
    parser.add_argument("--data", required=True,
                        help="prompt/response or chat records: JSONL, Parquet or a saved datasets folder, "
                             "tokenized into a memory-mapped cache under --out (data_cache/)")
    parser.add_argument("--answer-regex", default=None,
                        help="score the answer this regex captures (group 1, else the whole match; the last "
                             "match counts) instead of exact match of the whole response "
                             "(default: exact match)")
    add_scorer_flag(parser)
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
                        help="generation backend: auto is vLLM for a model on a GPU, else hf (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="drop examples longer than this (examples longer than the model's context, "
                             "or whose prompt leaves no room for --max-new-tokens, are always dropped "
                             "and counted)")
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                        help="malformed data lines: stop, or skip them with a warning (default %(default)s)")
    add_threads_flag(parser)


def add_scorer_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scorer", default=None, metavar="MODULE:FUNCTION",
                        help="score each answer with your function (module:function or file.py:function, "
                             "imported because you name it): function(record, generated_text) -> number, "
                             "1 right and 0 wrong (or a grade); for tasks with several valid answers. "
                             "Replaces exact match and --answer-regex")


def scoring_args(args: argparse.Namespace) -> dict:
    """scorer= and answer_regex= for gapfix.evaluation from --scorer and --answer-regex (one of them)."""
    from gapfix.evaluation import compile_answer_regex, load_scorer

    scorer = getattr(args, "scorer", None)
    if scorer is not None and args.answer_regex is not None:
        raise ValueError("--scorer and --answer-regex: give one (the scorer does its own answer extraction)")
    return {"scorer": load_scorer(scorer) if scorer is not None else None,
            "answer_regex": compile_answer_regex(args.answer_regex)}


def run(args: argparse.Namespace) -> int:
    from gapfix.data import check_input_file
    from gapfix.data.loading import is_table_source
    from gapfix.evaluation import evaluate_model, summary_line, write_generations, write_report
    from gapfix.models import load_model

    apply_threads(args.threads)
    scoring = scoring_args(args)
    quiet_third_party()
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise ValueError(f"--model {args.model!r} has no tokenizer files: "
                         "save the tokenizer beside the model")
    if not is_table_source(args.data):
        check_input_file(args.data, "--data")
    loaded: dict = {}
    examples = load_eval_examples(args.data, tokenizer, out=args.out, max_length=args.max_length,
                                  on_error=args.on_error, limit=args.limit, model=model,
                                  max_new_tokens=args.max_new_tokens, report=loaded)
    report = evaluate_model(model, tokenizer, examples, **scoring,
                            max_new_tokens=args.max_new_tokens, backend=args.backend, seed=args.seed,
                            top_k=args.top_k)
    report["model"], report["data"] = args.model, args.data
    report["data_report"] = loaded
    paths = write_report(report, args.out)
    paths["generations"] = write_generations(
        [dict(g, **report["generation"]) for g in report["generations"]], args.out)
    print(summary_line(report))
    for note in report["notes"]:
        print("note:", note)
    print("wrote", ", ".join(paths.values()))
    return 0
