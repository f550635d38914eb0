"""`gapfix generate`: answers for a JSONL file of prompts, written as JSONL.

    gapfix generate --model ckpt/ --prompts prompts.jsonl --out answers.jsonl \\
        --n 4 --temperature 0.7 --max-new-tokens 256 --seed 0

Each prompt line is {"prompt": "text"} or {"prompt_ids": [ids]} (or a bare
string / list), optionally with "prefix": the start of the response to continue
from (text or ids; the answer's text is then the continuation after it); each
output line is one answer (see generate_to_jsonl). An
interrupted run resumes when the same command is run again.
"""
import os


def configure(parser):
    parser.add_argument("--model", required=True, help="local model folder (save_pretrained)")
    parser.add_argument("--prompts", required=True, help="JSONL file of prompts")
    parser.add_argument("--out", required=True, help="JSONL file of answers to write")
    parser.add_argument("--n", type=int, default=1, help="answers per prompt (default 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto",
                        help="auto = vLLM where installed, else transformers")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per batch, the unit of checkpointing")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    parser.add_argument("--logprobs", action="store_true", help="record each token's log-probability")
    parser.add_argument("--field", default=None, help="the prompt key in each JSON line")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="malformed prompt lines: stop (default) or skip them")
    parser.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete output file")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")


def run(args) -> int:
    """Errors (bad arguments or files) reach gapfix.cli.main, which prints them in one line."""
    from gapfix.generation import generate_to_jsonl, read_prompts_jsonl, with_prefixes
    from gapfix.generation.common import _resolve_tokenizer
    from gapfix.threads import apply_threads

    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a directory: name the JSONL file to write")
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a local model folder")
    apply_threads(args.threads)
    prefixes = []
    prompts = read_prompts_jsonl(args.prompts, on_error=args.on_error, field=args.field, prefixes=prefixes)
    if any(p is not None for p in prefixes):
        prompts = with_prefixes(prompts, prefixes, _resolve_tokenizer(args.model, None))
    out = generate_to_jsonl(
        args.model, prompts, args.out,
        n=args.n, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed, backend=args.backend,
        logprobs=args.logprobs, batch_size=args.batch_size, dtype=args.dtype,
        resume=not args.no_resume, overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(out)
    return 0
