"""A synthetic multi-step arithmetic task where exposure bias shows.

Each problem is a start value and a chain of additions and subtractions; the
answer works the chain step by step, each step restating the running value,
then gives the final value:

    prompt:  "12 + 7 - 3 + 5"
    answer:  "12 + 7 = 19 ; 19 - 3 = 16 ; 16 + 5 = 21 ; answer 21"

Every number is one token (values stay in 0..99), so an arithmetic slip is a
substitution of one token, never a change of format. Each step copies the
previous result, so one wrong intermediate value is carried forward unless
the model recomputes it: the task rewards recovering after an error, which is
what training on self-generated tokens is meant to teach. Splits: "train" and
"test" with 2-5 steps, "hard" with 6 steps (longer than anything trained on).

`corrupt_prefix` builds the self-correction probe: the answer's first step with
a wrong result, which the model must continue from. `score` and `recovery_outcome` are the
task's pieces that gapfix.evaluation takes as arguments (its scorer, and the outcome of
`evaluate_recovery`'s probe).
"""
from __future__ import annotations

import json
import os
import random
import re
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # annotations only: transformers loads where it is used
    from transformers import PreTrainedTokenizerFast

MAX_VALUE = 99
MAX_OPERAND = 19

SPLIT_STEPS = {"train": (2, 5), "test": (2, 5), "hard": (6, 6)}
SPLIT_SEEDS = {"train": 1, "test": 2, "hard": 3}

# The word-level vocabulary: every token of every problem is one of these.
VOCAB = [str(v) for v in range(MAX_VALUE + 1)] + ["+", "-", "=", ";", "answer"]

_FINAL = re.compile(r"answer (\d+)\s*$")


def make_problem(rng: random.Random, num_steps: int) -> dict:
    value = rng.randint(0, MAX_VALUE)
    start = value
    ops, steps = [], []
    for _ in range(num_steps):
        operand = rng.randint(1, MAX_OPERAND)
        op = rng.choice("+-")
        # keep every value inside 0..MAX_VALUE: flip the operation at the edges
        if op == "+" and value + operand > MAX_VALUE:
            op = "-"
        elif op == "-" and value - operand < 0:
            op = "+"
        result = value + operand if op == "+" else value - operand
        ops.append(f"{op} {operand}")
        steps.append(f"{value} {op} {operand} = {result}")
        value = result
    return {
        "prompt": " ".join([str(start)] + ops),
        "response": " ; ".join(steps) + f" ; answer {value}",
        "final": value,
    }


def make_split(name: str, num_problems: int, seed: int = 0, exclude: Iterable[str] = ()) -> list:
    """Problems of split `name` ("train", "test" or "hard"); deterministic in (name, seed).

    The splits draw from distinct seeds. A problem whose prompt is in `exclude`
    (pass the training prompts) is redrawn, so held-out accuracy is never recall.
    """
    if name not in SPLIT_STEPS:
        raise ValueError(f"name must be one of {sorted(SPLIT_STEPS)}, got {name!r}")
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    low, high = SPLIT_STEPS[name]
    rng = random.Random(1000 * seed + SPLIT_SEEDS[name])
    avoid = set(exclude)
    problems, seen = [], set()
    while len(problems) < num_problems:
        problem = make_problem(rng, rng.randint(low, high))
        if problem["prompt"] in avoid or problem["prompt"] in seen:
            continue
        seen.add(problem["prompt"])
        problems.append(problem)
    return problems


def final_answer(text: str) -> int | None:
    """The final value an answer states, or None when it states none."""
    match = _FINAL.search(text.strip())
    return int(match.group(1)) if match else None


def corrupt_prefix(problem: dict, rng: random.Random) -> str:
    """The answer's first step with a wrong result: "12 + 7 = 18 ;".

    The wrong value is off by 1 to 3 and stays in range; the continuation must
    recover (recompute 19) to reach the right final answer.
    """
    first_step = problem["response"].split(" ; ")[0]
    lhs, result = first_step.rsplit(" = ", 1)
    result = int(result)
    candidates = [result + d for d in (-3, -2, -1, 1, 2, 3) if 0 <= result + d <= MAX_VALUE]
    return f"{lhs} = {rng.choice(candidates)} ;"


def score(record: dict, text: str) -> float:
    """The task's scorer (gapfix.evaluation's `scorer`): 1.0 where the answer states the record's
    final value, else 0.0 (records without "final" are scored 0)."""
    return float("final" in record and final_answer(text) == record["final"])


def recovery_outcome(problem: dict, prefix: str, continuation: str) -> dict:
    """What a continuation of corrupt_prefix's prefix reached: "recovery" (the right final value)
    and "carried" (the final value off by exactly the injected error: the error was copied on)."""
    final = final_answer(prefix + " " + continuation)
    wrong = int(prefix.rstrip(" ;").rsplit(" = ", 1)[1])
    right = int(problem["response"].split(" ; ")[0].rsplit(" = ", 1)[1])
    return {"recovery": float(final == problem["final"]),
            "carried": float(final == problem["final"] + (wrong - right))}


def write_jsonl(problems: list, path: str) -> None:
    """Writes problems as prompt/response JSONL (write then rename: never half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for problem in problems:
            f.write(json.dumps(problem) + "\n")
    os.replace(tmp, path)


def write_splits(out_dir: str, *, train: int = 20000, test: int = 500, hard: int = 500, seed: int = 0) -> dict:
    """Writes train/test/hard JSONL files into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    splits = {"train": make_split("train", train, seed)}
    train_prompts = {p["prompt"] for p in splits["train"]}
    splits["test"] = make_split("test", test, seed, exclude=train_prompts)
    splits["hard"] = make_split("hard", hard, seed, exclude=train_prompts)
    paths = {}
    for name, problems in splits.items():
        paths[name] = os.path.join(out_dir, f"math_{name}.jsonl")
        write_jsonl(problems, paths[name])
    return paths


SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}


def math_tokenizer() -> PreTrainedTokenizerFast:
    """The task's tokenizer: one token per whitespace-separated word of VOCAB.

    Built locally with `tokenizers` (nothing downloaded); a transformers
    PreTrainedTokenizerFast with <pad>, <bos> (prepended to prompts), <eos> and <unk>.
    """
    return word_tokenizer(VOCAB)


def word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A tokenizer of one token per whitespace-separated word of `words` (ids 4.., in order),
    with the specials of math_tokenizer at ids 0-3 (the benchmarks build a 32k-word one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocab = {token: index for index, token in enumerate(specials + list(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = SPECIAL_TOKENS["bos"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    core.decoder = None
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=SPECIAL_TOKENS["pad"], bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"], unk_token=SPECIAL_TOKENS["unk"])
    return tokenizer
