"""`gapfix train`: the reference training script on your model and data.

    gapfix train --model path/to/hf_model --train train.jsonl --eval eval.jsonl \\
                 --method rac --iterations 3 --out runs/rac

--model is a local transformers model folder (nothing is downloaded), a
config.json to build a randomly initialised model from, or "tiny" for a small
Llama; the last two get a byte-level BPE tokenizer trained locally on the
training data. --attn auto (the default) uses FlashAttention-2 with packed
micro-batches on a GPU where flash-attn is installed, else sdpa. Every TrainConfig field is a flag (--beta, --rac-mode,
--steps-per-iteration, ...). Under torchrun the same command trains with DDP
(or --distributed fsdp).
"""
import dataclasses
import json
import os
import typing

from gapfix.trainer import TrainConfig

_SKIP = {"out_dir", "method", "iterations"}


def _flag_type(field):
    hint = field.type if not isinstance(field.type, str) else eval(field.type, vars(typing))  # noqa: S307
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def configure(parser):
    parser.add_argument("--model", required=True, help='a local HF model folder, a config.json, or "tiny"')
    parser.add_argument("--train", required=True, help="JSONL of prompt/response or chat records")
    parser.add_argument("--eval", help="held-out JSONL, evaluated by greedy generation after each iteration")
    parser.add_argument("--method", default="sft", help="sft, bash or rac")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--out", required=True, help="output folder (metrics, checkpoints, final model)")
    parser.add_argument("--max-length", type=int, default=None, help="drop examples longer than this")
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                        help="malformed data lines: stop, or skip them with a warning")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")
    parser.add_argument("--attn", default="auto",
                        help="attention implementation: auto, sdpa, flash_attention_2, eager")
    parser.add_argument("--lora-r", type=int, default=None,
                        help="train a LoRA adapter of this rank (the model frozen); saved in PEFT's format")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * r)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    parser.add_argument("--lora-targets", default=None,
                        help="comma-separated module names to adapt (default: every linear layer but the head)")
    for field in dataclasses.fields(TrainConfig):
        if field.name in _SKIP:
            continue
        kind = _flag_type(field)
        flag = "--" + field.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, type=_parse_bool, default=field.default, metavar="{true,false}")
        else:
            parser.add_argument(flag, type=kind, default=field.default)


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


def _tokenizer_from_data(train_path, vocab_size):
    from gapfix.data import read_jsonl, split_record
    from gapfix.models import train_tokenizer

    texts = []
    for record in read_jsonl(train_path, on_error="skip"):
        pair = split_record(record)
        if pair:
            texts.extend(pair)
    return train_tokenizer(texts, vocab_size=vocab_size, add_bos=True)


def load_model_and_tokenizer(spec, train_path, attn="sdpa", seed=0):
    """(model, tokenizer) from a local folder, a config.json, or a tiny Llama for "tiny"."""
    if spec == "tiny":
        from gapfix.models import tiny_llama

        tokenizer = _tokenizer_from_data(train_path, 512)
        return tiny_llama(tokenizer, seed=seed), tokenizer
    if os.path.isfile(spec) and spec.endswith(".json"):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(spec)
        tokenizer = _tokenizer_from_data(train_path, getattr(config, "vocab_size", 512))
        config.vocab_size = len(tokenizer)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(config, name, getattr(tokenizer, name))
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn), tokenizer
    if not os.path.isdir(spec):
        raise ValueError(f"--model {spec!r} is not 'tiny', a config.json or an existing local model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gapfix.models import is_adapter_folder, load_adapter_for_training

    if is_adapter_folder(spec):  # a PEFT adapter: its base model, the adapter trainable
        model, tokenizer = load_adapter_for_training(spec, attn_implementation=attn)
        if tokenizer is None:
            raise ValueError(f"--model {spec!r}: neither the adapter nor its base model folder has a tokenizer")
    else:
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def run(args) -> int:
    from gapfix.data import load_examples
    from gapfix.evaluation import evaluate
    from gapfix.trainer import train

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                            if f.name not in _SKIP},
                         method=args.method, iterations=args.iterations, out_dir=args.out)
    attention = resolve_attention(args.attn)
    if attention in ("flash_attention_2", "flash_attention_3") and args.attn == "auto":
        config.packing = True  # varlen attention: packed micro-batches compute no padding
    config.validate()  # a bad --method or --beta fails before any model is loaded
    model, tokenizer = load_model_and_tokenizer(args.model, args.train, attention, config.seed)
    if args.lora_r is not None:
        from gapfix.models import apply_lora

        if hasattr(model, "peft_config"):
            raise ValueError(f"--lora-r: --model {args.model!r} is already an adapter; it is trained as it is")
        model = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets,
                           dropout=args.lora_dropout)
    examples = load_examples(args.train, tokenizer, max_length=args.max_length, on_error=args.on_error)
    eval_examples = (load_examples(args.eval, tokenizer, max_length=args.max_length, on_error=args.on_error)
                     if args.eval else None)
    evaluations = []

    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1 and config.distributed == "fsdp"
    if sharded and eval_examples is not None:
        # generating on rank 0 alone would wait forever on the other ranks' shards
        print("--eval is skipped under FSDP: evaluate the saved final model instead")
        eval_examples = None

    def on_iteration_end(iteration, trained):
        if eval_examples is None or int(os.environ.get("RANK", "0")) != 0:
            return
        result = evaluate(trained, tokenizer, eval_examples, max_new_tokens=config.max_new_tokens,
                          backend="hf")
        result["iteration"] = iteration
        evaluations.append(result)
        print(f"iteration {iteration}: eval accuracy {result['accuracy']:.3f} ({result['count']} examples)")

    result = train(model, tokenizer, examples, config, resume=not args.no_resume,
                   on_iteration_end=on_iteration_end)
    summary = {"method": config.method, "steps": result.steps, "phase_seconds": result.phase_seconds,
               "evaluations": evaluations}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0
