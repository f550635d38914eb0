"""RAC (Reference-Answer-based Correction): training rows from generated answers.

Each iteration the current model answers every training prompt x with g; RAC
trains on the model's own tokens, input x + g, and after every generated
prefix g_<t (t = 0..n, n = len(g)) the label is the correction that the
alignment of g to the reference y says is owed there (gapfix.rac_labels): the
next reference token while g follows y, the right token where g went wrong,
and EOS once g has covered the whole reference.

Row convention: the Hugging Face one, as gapfix.data.sft_row (so RAC and SFT
rows batch together): ``labels`` is aligned with ``input_ids`` and the loss
shifts, i.e. ``labels[i]`` is the target predicted from input positions < i.

    input_ids = x + g + [e]          e = the generated EOS, or pad_id when g
                                     was cut at the length limit
    labels[len(x) + t] = label after g_<t,   t = 0..n
    labels[i] = ignore_index         elsewhere (the prompt)

The label after g_<t is predicted from the last token of x + g_<t, so it sits
at the next position: t = 0 on the first answer position, t = n on e. The
label may differ from the input token there (a correction), and the extra
token e is never fed to the model as a prefix of anything trained; it gives
RAC rows the shape of SFT rows (x + y + EOS, labels on y + EOS) and keeps the
input what the model actually emitted.

Soft mode ("all") rows also carry ``target_ids`` / ``target_weights``: one
K-list per position, aligned like labels (ignore_index / 0.0 where nothing is
trained).
"""
import math
import random
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from gapfix.data import IGNORE_INDEX
from gapfix.methods import base
from gapfix.methods.base import Method, OfflineContext, register, row_seed, setting

__all__ = ["RAC", "RacConfig", "answer_stop_ids", "build_rac_rows", "build_rac_rows_to_ends", "drawn_prompts",
           "generation_seed", "mix_with_sft", "reference_ends", "to_soft_row"]

RAC_MODES = ("path", "first", "last", "all")
BACKENDS = ("auto", "hf", "vllm")
MAX_SFT_RATIO = 1000.0  # SFT rows per RAC row; the mixed order holds (1 + ratio) entries per RAC row
MAX_SAMPLES = 1024  # answers per prompt
_AVERAGED = ("label_agreement", "mean_edit_distance", "finished", "exact_match")


@dataclass(frozen=True)
class RacConfig:
    """The settings of RAC, for both drivers (`gapfix train` flags and gapfix.hf's trainers)."""

    mode: str = setting("path", "the label after each generated prefix: path (the next token of the canonical "
                        "optimal alignment), first / last (of the first / last optimal reference position), or "
                        "all (soft, reference trainer only; see gapfix.rac_labels)", flag="rac_mode")
    temperature: float = setting(1.0, "sampling temperature of the model's answers (0: greedy)",
                                 flag="rac_temperature")
    samples: int = setting(1, f"answers per prompt (at most {MAX_SAMPLES})", flag="rac_samples")
    prompts_per_iteration: Optional[int] = setting(None, "prompts answered per iteration, drawn afresh each "
                                                   "iteration (unset: all)", flag="rac_prompts")
    sft_ratio: float = setting(1.0, f"SFT rows (the reference answers) mixed in per RAC row (at most "
                               f"{MAX_SFT_RATIO:g})", flag="rac_sft_ratio")
    only_until_divergence: bool = setting(False, "train only the prefixes up to the first divergence",
                                          flag="rac_only_until_divergence")
    backend: str = setting("auto", "generation backend: auto (vLLM for a model on a GPU where vLLM is "
                           "installed, else transformers), vllm or hf", flag="generation_backend")
    max_new_tokens: int = setting(128, "generation budget of RAC answers (and of --eval)", flag="max_new_tokens")
    vllm_tensor_parallel_size: int = setting(1, "under torchrun with vLLM: ranks sharing one tensor-parallel "
                                             "engine (divides the world size)", flag="vllm_tensor_parallel_size")
    vllm_gpu_memory_utilization: float = setting(0.4, "with vLLM on a GPU: the fraction of GPU memory the engine "
                                                 "may take", flag="vllm_gpu_memory_utilization")
    refresh: Optional[int] = setting(None, "gapfix.hf: optimizer steps per iteration (unset: one pass over "
                                     "the iteration's rows)")
    generation_batch_size: Optional[int] = setting(None, "gapfix.hf: prompts per generation chunk (unset: "
                                                   "RAC.generate_prompts, as the reference trainer)")

    def __post_init__(self) -> None:
        from gapfix.generation.colocate import check_engine_options

        base.check_choice("mode", self.mode, RAC_MODES)
        base.check_number("temperature", self.temperature, 0.0, float("inf"))
        base.check_int("samples", self.samples, 1, MAX_SAMPLES)
        base.check_int("prompts_per_iteration", self.prompts_per_iteration, optional=True)
        base.check_number("sft_ratio", self.sft_ratio, 0.0, MAX_SFT_RATIO)
        if not isinstance(self.only_until_divergence, bool):
            raise ValueError(f"only_until_divergence must be a bool, got {self.only_until_divergence!r}")
        base.check_choice("backend", self.backend, BACKENDS)
        base.check_int("max_new_tokens", self.max_new_tokens)
        base.check_int("refresh", self.refresh, optional=True)
        base.check_int("generation_batch_size", self.generation_batch_size, optional=True)
        check_engine_options(self.vllm_tensor_parallel_size, self.vllm_gpu_memory_utilization)

    def to_dict(self) -> dict:
        return asdict(self)


def drawn_prompts(seed: int, iteration: int, num_examples: int, prompts: Optional[int]) -> List[int]:
    """The examples whose prompts an iteration answers, in generation order: `prompts` of them
    (None: all) drawn afresh each iteration from (seed, iteration). Both drivers draw this way."""
    rng = random.Random(f"{seed}/{iteration}/rows")  # str seeds are hashed stably
    return rng.sample(range(num_examples), min(prompts or num_examples, num_examples))


def rows_per_iteration(num_examples: int, config: RacConfig) -> int:
    """The rows of one iteration: the RAC rows (prompts x samples) and the SFT rows mixed in."""
    rac = min(config.prompts_per_iteration or num_examples, num_examples) * config.samples
    return rac + round(rac * config.sft_ratio)


def generation_seed(seed: int, iteration: int, first_example: int) -> int:
    """The sampling seed of the generation chunk whose first prompt is example `first_example`."""
    return row_seed(seed, iteration, "generate", "chunk", first_example)


def mixing_order_seed(seed: int, iteration: int) -> int:
    """The seed of mix_with_sft's order of an iteration's RAC and SFT rows."""
    return row_seed(seed, iteration, "mix", 0, 0)


def _strip_generated(g: Sequence[int], eos_id: int, finished: Optional[bool] = None):
    """(answer without EOS, whether the model finished): generation stops at the
    first EOS, so anything after it is not part of the answer. `finished` says
    so for an answer given without its EOS (gapfix.generate's token_ids)."""
    g = list(g)
    if eos_id in g:
        return g[: g.index(eos_id)], True
    return g, bool(finished)


def _unpack_generated(generated):
    """(token-id lists, finished flags or None, stop tokens or None) of `generated`:
    lists of ids, or gapfix.generate's Generation objects (token_ids without the
    EOS, finish_reason, stop_token_id)."""
    if not isinstance(generated, (list, tuple)):
        raise ValueError(f"generated must be a list of token-id lists or Generation objects, "
                         f"got {type(generated).__name__}")
    objects = [hasattr(g, "token_ids") and hasattr(g, "finish_reason") for g in generated]
    if not any(objects):
        return generated, None, None
    if not all(objects):
        raise ValueError("generated mixes Generation objects and token-id lists")
    return ([list(g.token_ids) for g in generated], [g.finish_reason == "eos" for g in generated],
            [getattr(g, "stop_token_id", None) for g in generated])


def _strip_reference(y: Sequence[int], eos_id: int):
    y = list(y)
    return y[:-1] if y and y[-1] == eos_id else y  # y_m := EOS is implied


def _check_ids(name: str, index: int, row) -> None:
    """A row of token ids: a list of non-negative ints (checked in numpy: per-token
    Python checks would cost more than the alignment itself)."""
    if not isinstance(row, (list, tuple)):
        raise ValueError(f"{name}[{index}] must be a list of token ids, got {type(row).__name__}")
    if row:
        arr = np.asarray(row)
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.min() < 0:
            raise ValueError(f"{name}[{index}] must be a list of non-negative int token ids")


def _check_rows(name: str, rows, count: Optional[int]) -> None:
    if not isinstance(rows, (list, tuple)):
        raise ValueError(f"{name} must be a list of token-id lists, got {type(rows).__name__}")
    if count is not None and len(rows) != count:
        raise ValueError(f"{name} has {len(rows)} entries, prompts has {count}")
    for i, row in enumerate(rows):
        _check_ids(name, i, row)


def _padded(rows: List[List[int]], device):
    """(B, max len) int64 right-padded with 0, and the lengths."""
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.zeros((len(rows), int(lens.max(initial=0))), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out).to(device), torch.from_numpy(lens).to(device)


def build_rac_rows(
    prompts: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    *,
    eos_id: int,
    pad_id: Optional[int] = None,
    mode: str = "path",
    ignore_index: int = IGNORE_INDEX,
    max_targets: int = 4,
    only_until_divergence: bool = False,
    finished: Optional[Sequence[bool]] = None,
    impl: str = "auto",
    device=None,
):
    """RAC training rows for (prompt, generated answer, reference answer) triples.

    prompts: token ids of each prompt (non-empty: its last token predicts the
        first label). generated: the model's answers: gapfix.generate's
        Generation objects (finished = finish_reason "eos"; their token_ids
        hold no EOS), or token-id lists, each possibly ending with EOS
        (anything from the first EOS on is dropped) or cut at the length
        limit. finished: for token-id lists given without their EOS, whether
        each answer was finished (an EOS in a list finishes it regardless).
        references: the reference answers, a trailing EOS dropped.
    pad_id: the token appended after an answer that has no EOS (default eos_id).
    mode: "path" | "first" | "last" | "all", as in gapfix.rac_labels.
    only_until_divergence: train only the prefixes t <= d, d the first position
        where g_t is not the label (for "all": not among the targets), i.e. the
        first correction and everything before it; afterwards the model's own
        tokens are off the reference and their corrections less certain.
    impl: passed to gapfix.align and gapfix.rac_labels; device: where the
        alignment runs (default CPU).

    All pairs go through one gapfix.align and one gapfix.rac_labels call.

    Returns (rows, stats). rows: dicts with input_ids and labels (aligned with
    input_ids, the Hugging Face convention; see the module doc), plus target_ids /
    target_weights for "all". stats: ``rows``;
    ``trained_positions``; ``label_agreement``, the fraction of trained
    positions whose label equals the token the model generated there (for
    "all": is among the targets; the position after a cut answer has no
    generated token and is left out); ``mean_edit_distance`` between g and y;
    ``finished``, the fraction of answers that ended with EOS; ``exact_match``,
    the fraction that ended with EOS and equal the reference.
    """
    from gapfix.ops.align import align
    from gapfix.ops.rac_labels import MODES, rac_labels

    _check_rows("prompts", prompts, None)
    generated, flags, stops = _unpack_generated(generated)
    if finished is not None:
        if flags is not None:
            raise ValueError("finished must be None when generated holds Generation objects "
                             "(their finish_reason says it)")
        if not isinstance(finished, (list, tuple)) or len(finished) != len(prompts):
            raise ValueError(f"finished must be a list of {len(prompts)} bools, got {finished!r}"[:200])
        flags = [bool(f) for f in finished]
    _check_rows("generated", generated, len(prompts))
    _check_rows("references", references, len(prompts))
    if not isinstance(eos_id, int) or isinstance(eos_id, bool) or eos_id < 0:
        raise ValueError(f"eos_id must be a non-negative int, got {eos_id!r}")
    pad_id = eos_id if pad_id is None else pad_id
    if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative int or None, got {pad_id!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompts[{i}] is empty: the label after the empty answer prefix "
                             "sits on the last prompt token (prepend BOS)")
    if not prompts:
        return [], dict(rows=0, trained_positions=0, label_agreement=float("nan"),
                        mean_edit_distance=float("nan"), finished=float("nan"), exact_match=float("nan"))

    soft = mode == "all"
    answers, finished = zip(*(_strip_generated(g, eos_id, None if flags is None else flags[i])
                              for i, g in enumerate(generated)))
    refs = [_strip_reference(y, eos_id) for y in references]
    device = torch.device("cpu") if device is None else torch.device(device)
    gen, gen_lens = _padded(list(answers), device)
    ref, ref_lens = _padded(refs, device)
    align_impl = "torch" if impl == "torch" else "auto"
    alignment = align(gen, ref, gen_lens, ref_lens, max_targets=max_targets if soft else 0, impl=align_impl)
    out = rac_labels(gen, ref, gen_lens, ref_lens, eos_id=eos_id, mode=mode, ignore_index=ignore_index,
                     max_targets=max_targets, alignment=alignment, impl=impl)
    labels = out.labels if soft else out

    # which prefixes are trained, and where the label agrees with the model's own next token
    batch, rows_per = labels.shape
    t = torch.arange(rows_per, device=device)
    n = gen_lens[:, None]
    done = torch.tensor(finished, device=device)[:, None]
    # the model's token after g_<t: g_t, then its EOS if it finished (-1: none)
    next_tok = torch.cat([gen, torch.full((batch, 1), -1, dtype=gen.dtype, device=device)], 1)
    next_tok = torch.where(t < n, next_tok, torch.where((t == n) & done, eos_id, -1))
    if soft:
        agree = (out.target_ids == next_tok[..., None]).any(-1)
    else:
        agree = labels == next_tok
    valid = t <= n
    trained = valid
    if only_until_divergence:
        miss = (valid & (t < n) & ~agree).long()
        trained = valid & ((miss.cumsum(1) - miss) == 0)  # up to and including the first miss
    known = trained & (next_tok >= 0)
    num_known = int(known.sum())

    dist = alignment.distance.long()
    done_all = done[:, 0]
    stats = dict(
        rows=batch,
        trained_positions=int(trained.sum()),
        label_agreement=(int((agree & known).sum()) / num_known) if num_known else float("nan"),
        mean_edit_distance=float(dist.float().mean()),
        finished=float(done_all.float().mean()),
        exact_match=float(((dist == 0) & done_all).float().mean()),
    )

    # to Python lists through numpy (far faster than per-element work)
    labels = torch.where(trained, labels, ignore_index).cpu().numpy()
    if soft:
        target_ids = torch.where(trained[..., None], out.target_ids, ignore_index).cpu().numpy()
        target_weights = torch.where(trained[..., None], out.target_weights, 0.0).cpu().numpy()
    rows = []
    for b in range(batch):
        prompt, answer = list(prompts[b]), answers[b]
        stop = eos_id if stops is None or stops[b] is None else stops[b]  # the EOS it emitted
        input_ids = prompt + answer + [stop if finished[b] else pad_id]
        start, stop = len(prompt), len(input_ids)  # positions of t = 0 .. n
        row_labels = np.full(len(input_ids), ignore_index, dtype=np.int64)
        row_labels[start:stop] = labels[b, : stop - start]
        row = {"input_ids": input_ids, "labels": row_labels.tolist()}
        if soft:
            ids = np.full((len(input_ids), max_targets), ignore_index, dtype=np.int64)
            weights = np.zeros((len(input_ids), max_targets), dtype=np.float32)
            ids[start:stop] = target_ids[b, : stop - start]
            weights[start:stop] = target_weights[b, : stop - start]
            row["target_ids"], row["target_weights"] = ids.tolist(), weights.tolist()
        rows.append(row)
    return rows, stats


# ----------------------------------------------------------------------------
# the token a reference answer ends with (shared by gapfix's trainer and gapfix.hf)
# ----------------------------------------------------------------------------

def answer_stop_ids(model, tokenizer) -> List[int]:
    """The tokens gapfix.generate stops `model`'s answers on: the tokenizer's EOS, then the
    model's generation-config and config EOS ids (first seen first)."""
    from gapfix.generation import _eos_ids

    return _eos_ids(getattr(model, "config", None), tokenizer, getattr(model, "generation_config", None))


def _end_candidates(tokenizer, stop_ids: Sequence[int]) -> set:
    """Tokens that can end a reference: the stop tokens and the tokenizer's special tokens (a chat
    template's end-of-turn is one), less BOS, padding and unknown unless they are stop tokens."""
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(token_id)
    special -= {getattr(tokenizer, name, None) for name in ("bos_token_id", "pad_token_id", "unk_token_id")}
    return special | set(stop_ids)


def reference_ends(references: Sequence[Sequence[int]], tokenizer, stop_ids: Sequence[int]) -> List[tuple]:
    """(content length, end token) of each reference answer: the token that ends it, which RAC
    labels once an answer has covered the reference, generation must stop on, and finished /
    exact_match expect; the reference's content is reference[:content length].

    The end token is the reference's last token that is a stop token or a special token of the
    tokenizer (`_end_candidates`), provided only whitespace follows it: a chat template's
    end-of-turn and the newline it may put after it (ChatML `<|im_end|>` "\\n"), which the model
    never generates since generation stops at the end-of-turn. A reference with no such token
    (plain text at its end) is used whole, ending with stop_ids[0] (the tokenizer's EOS), as
    build_rac_rows implies. References may end with different tokens (plain and chat records in
    one file): build_rac_rows_to_ends gives each its own.
    """
    stop_ids = list(stop_ids)
    if not stop_ids:
        raise ValueError("stop_ids is empty: the tokenizer has no eos_token_id and the model no "
                         "eos_token_id; RAC needs a token that ends answers")
    candidates = _end_candidates(tokenizer, stop_ids)
    blank = {}  # token id -> whether it decodes to whitespace only

    def is_blank(token_id: int) -> bool:
        if token_id not in blank:
            blank[token_id] = not tokenizer.decode([token_id], skip_special_tokens=False).strip()
        return blank[token_id]

    ends = []
    for reference in references:
        k = len(reference) - 1
        while k >= 0 and reference[k] not in candidates and is_blank(reference[k]):
            k -= 1
        if k >= 0 and reference[k] in candidates:
            ends.append((k, reference[k]))
        else:
            ends.append((len(reference), stop_ids[0]))
    return ends


def build_rac_rows_to_ends(prompts, generated, references, ends: Sequence[tuple], *,
                           finished: Optional[Sequence[bool]] = None, ignore_index: int = IGNORE_INDEX,
                           **options):
    """build_rac_rows where each reference ends with its own token: `ends` from reference_ends.

    One build_rac_rows call per distinct end token, with the references cut to their content
    (no trailing newline after an end-of-turn); the rows come back in the order given. `options`
    are build_rac_rows' (pad_id, mode, only_until_divergence, ...). The statistics are those of
    all rows together; an answer that stopped on another stop token than its reference's end
    (stop_token_id of a Generation) counts as finished, its last input is the token it stopped
    on, labelled with the reference's end, and it is no exact match.
    """
    _check_rows("prompts", prompts, None)
    _check_rows("references", references, len(prompts))
    tokens, flags, stops = _unpack_generated(generated)
    if len(tokens) != len(prompts):
        raise ValueError(f"generated has {len(tokens)} entries, prompts has {len(prompts)}")
    if not isinstance(ends, (list, tuple)) or len(ends) != len(prompts):
        raise ValueError(f"ends must be a list of {len(prompts)} (content length, end token) pairs "
                         "(reference_ends)")
    for i, end in enumerate(ends):
        if not (isinstance(end, (list, tuple)) and len(end) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in end)
                and end[0] <= len(references[i])):
            raise ValueError(f"ends[{i}] must be a (content length <= {len(references[i])}, end token) pair "
                             f"of non-negative ints, got {end!r}"[:200])
    if finished is not None:
        if not isinstance(finished, (list, tuple)) or len(finished) != len(prompts):
            raise ValueError(f"finished must be a list of {len(prompts)} bools, got {finished!r}"[:200])
        flags = finished

    def pick(seq, members):
        return None if seq is None else [seq[i] for i in members]

    groups = {}
    for i, (_, end) in enumerate(ends):
        groups.setdefault(end, []).append(i)
    rows, parts = [None] * len(references), []
    for end, members in groups.items():
        part_rows, part_stats = build_rac_rows(
            pick(prompts, members), pick(generated, members),
            [list(references[i][:ends[i][0] + 1]) for i in members],
            eos_id=end, finished=pick(finished, members), ignore_index=ignore_index, **options)
        for i, row in zip(members, part_rows):
            rows[i] = row
        parts.append(part_stats)
    if not rows:
        return build_rac_rows(prompts, generated, references, eos_id=0, finished=finished,
                              ignore_index=ignore_index, **options)
    closed_otherwise = stops is not None and any(
        stop is not None and stop != end for stop, (_, end) in zip(stops, ends))
    if len(parts) == 1 and not closed_otherwise:  # build_rac_rows' own figures, bit for bit
        return rows, parts[0]

    # finished, exact_match and label_agreement from the rows and the token each answer really ended with
    soft = options.get("mode") == "all"
    exact = agree = known = closed = 0
    for i, row in enumerate(rows):
        end = ends[i][1]
        answer, done = _strip_generated(tokens[i], end, None if flags is None else flags[i])
        closed += done
        stop = end if stops is None or stops[i] is None else stops[i]
        exact += bool(done and stop == end and answer == list(references[i][:ends[i][0]]))
        start = len(prompts[i])
        labels = np.asarray(row["labels"][start:])
        inputs = np.asarray(row["input_ids"][start:])  # g_t, then the stop token (or padding if cut)
        counted = labels != ignore_index
        if not done:
            counted[-1] = False  # the position after a cut answer: the model put no token there
        if soft:
            hit = (np.asarray(row["target_ids"][start:]) == inputs[:, None]).any(-1)
        else:
            hit = labels == inputs
        agree += int((hit & counted).sum())
        known += int(counted.sum())
    count = len(rows)
    stats = dict(rows=count, trained_positions=sum(p["trained_positions"] for p in parts))
    stats["mean_edit_distance"] = sum(p["mean_edit_distance"] * p["rows"] for p in parts) / count
    stats["finished"] = closed / count
    stats["exact_match"] = exact / count
    stats["label_agreement"] = agree / known if known else float("nan")
    return rows, stats


def answer_chunk(model, tokenizer, prompts: Sequence[Sequence[int]], references: Sequence[Sequence[int]],
                 config: RacConfig, *, seeds, backend, mode: Optional[str] = None, impl: str = "auto"):
    """RAC's offline step on one chunk of prompts, as both drivers run it: the model's answers
    (gapfix.generate, config.samples per prompt, stopping on each reference's end token:
    reference_ends, a chat template's end-of-turn, else EOS) and their RAC rows.

    seeds: the seed of the chunk's one generate call (generation_seed), or a list with one per
    prompt (one call each); unused at temperature 0. backend: config.backend or a running engine.
    Returns (rows in prompt order, build_rac_rows' stats, the Generation objects of the rows)."""
    from gapfix.generation import generate

    ends = reference_ends(references, tokenizer, answer_stop_ids(model, tokenizer))
    options = dict(tokenizer=tokenizer, n=config.samples, temperature=config.temperature,
                   max_new_tokens=config.max_new_tokens, backend=backend, stop_token_ids=[end for _, end in ends])
    sampled = config.temperature > 0
    if isinstance(seeds, list):
        outputs, owners = [], []
        for k, (prompt, seed) in enumerate(zip(prompts, seeds)):
            got = generate(model, [prompt], seed=seed if sampled else None, **options)
            outputs += got
            owners += [k] * len(got)
    else:
        outputs = generate(model, list(prompts), seed=seeds if sampled else None, **options)
        owners = [output.prompt_index for output in outputs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, stats = build_rac_rows_to_ends(
        [prompts[k] for k in owners], outputs, [references[k] for k in owners], [ends[k] for k in owners],
        pad_id=pad_id, mode=mode or config.mode, only_until_divergence=config.only_until_divergence, impl=impl)
    return rows, stats, outputs


def merge_stats(parts: Sequence[dict]) -> dict:
    """build_rac_rows' stats of several chunks as one: counts summed, label_agreement weighted
    by trained positions, the other averages by rows (NaN parts left out)."""
    merged = {"rows": sum(p["rows"] for p in parts), "trained_positions": sum(p["trained_positions"] for p in parts)}
    for key in _AVERAGED:
        weights = [(p["trained_positions"] if key == "label_agreement" else p["rows"], p[key]) for p in parts]
        weights = [(w, v) for w, v in weights if w and v == v]
        total = sum(w for w, _ in weights)
        merged[key] = sum(w * v for w, v in weights) / total if total else float("nan")
    return merged


def to_soft_row(row: dict, max_targets: int, ignore_index: int = IGNORE_INDEX) -> dict:
    """A hard-label row (SFT) in the soft layout: its label in slot 0 with weight 1,
    so that it can share a batch with soft RAC rows; the loss is unchanged."""
    pad = [ignore_index] * (max_targets - 1)
    ids = [[label] + pad for label in row["labels"]]
    weights = [[0.0 if label == ignore_index else 1.0] + [0.0] * (max_targets - 1) for label in row["labels"]]
    return {**row, "target_ids": ids, "target_weights": weights}


def mix_with_sft(rac_rows: Sequence, sft_rows: Sequence, ratio: float, seed: int,
                 ignore_index: int = IGNORE_INDEX) -> list:
    """Interleaves RAC items with round(ratio * len(rac_rows)) SFT items, shuffled
    with `seed`.

    ratio: SFT items per RAC item (0 = RAC only). Items are rows (dicts) or
    whole batches (anything else, passed through). SFT items are drawn without
    replacement, reshuffled and reused only when more are wanted than exist.
    Where the RAC rows are soft (target_ids), the SFT rows are converted with
    ``to_soft_row`` so that every row of a batch has the same fields.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0 <= ratio <= MAX_SFT_RATIO:
        raise ValueError(f"ratio must be a number in [0, {MAX_SFT_RATIO:g}], got {ratio!r}")
    wanted = round(ratio * len(rac_rows))
    if wanted and not sft_rows:
        raise ValueError(f"sft_rows is empty but ratio={ratio} asks for {wanted} SFT items")
    rng = random.Random(seed)
    chosen = []
    while len(chosen) < wanted:
        order = list(range(len(sft_rows)))
        rng.shuffle(order)
        chosen += order[: wanted - len(chosen)]
    sft = [sft_rows[i] for i in chosen]
    soft_rac = next((r for r in rac_rows if isinstance(r, dict) and "target_ids" in r), None)
    if soft_rac is not None:
        k = len(soft_rac["target_ids"][0])
        sft = [to_soft_row(r, k, ignore_index) if isinstance(r, dict) and "target_ids" not in r else r
               for r in sft]
    mixed = list(rac_rows) + sft
    rng.shuffle(mixed)
    return mixed


# ----------------------------------------------------------------------------
# the method, as the reference trainer runs it (gapfix.methods.base.Method)
# ----------------------------------------------------------------------------



@register
class RAC(Method):
    """Offline: the model answers rac_prompts prompts (drawn afresh each iteration), the
    answers become RAC rows (build_rac_rows), mixed with rac_sft_ratio SFT rows per RAC row.

    The drawn prompts are cut into chunks of `generate_prompts`, the same chunks at any world
    size; rank r generates its contiguous share and writes its RAC rows as a shard; then rank r
    writes its share of the mixed rows (a shard of mix_with_sft's order). Sampled answers: one
    generate call per chunk, seeded from (seed, iteration, the chunk's first example), so that they
    do not depend on the world size (the chunks do not); with `seed_per_prompt`, one call per
    prompt seeded from its own example, so that they do not depend on the chunking either, at the
    cost of batching (several times slower generation)."""

    name = "rac"
    config_class = RacConfig
    generates = True
    generate_prompts = 32
    seed_per_prompt = False
    soft = False  # soft "all" targets regardless of rac_mode (a subclass may set it)

    def label_mode(self, config) -> str:
        return "all" if self.soft else config.rac_mode

    def num_rows(self, num_examples: int, config) -> int:
        return rows_per_iteration(num_examples, self.settings(config))

    def _chosen(self, ctx: OfflineContext) -> List[int]:
        return drawn_prompts(ctx.config.seed, ctx.iteration, len(ctx.examples), ctx.config.rac_prompts)

    def build_shard(self, ctx: OfflineContext) -> dict:
        """Generates this rank's share of the chunks and writes their RAC rows. With vLLM under
        torchrun the engine is colocated (gapfix.generation.colocate): groups of
        vllm_tensor_parallel_size ranks share one, every rank of a group generates the group's
        chunks and its first rank writes them (the others write an empty shard)."""
        from gapfix.generation.colocate import tp_share

        config = ctx.config
        chosen = self._chosen(ctx)
        chunks = [chosen[i:i + self.generate_prompts] for i in range(0, len(chosen), self.generate_prompts)]
        engine = self._colocated(ctx)
        share = tp_share(ctx.rank, ctx.world, engine.tensor_parallel_size if engine else 1, len(chunks))
        first = min(share.chunks.start * self.generate_prompts, len(chosen)) * config.rac_samples
        sums = {"generated": 0, "rows": 0, "trained_positions": 0, **{k: 0.0 for k in _AVERAGED}}
        weights = {k: 0 for k in _AVERAGED}
        if engine is not None:
            engine.begin(ctx.model)  # every rank: wake, and the trained weights (gathered under FSDP)
        self._engine = engine
        try:
            with ctx.writer(first, stem="rac") as writer:
                for c in share.chunks:
                    rows, stats, generated = self._rows(ctx, chunks[c])
                    if not share.writes:  # another rank of the group writes and counts these rows
                        continue
                    writer.write(rows)
                    sums["generated"] += generated
                    sums["rows"] += stats["rows"]
                    sums["trained_positions"] += stats["trained_positions"]
                    for key in _AVERAGED:  # label agreement weighted by trained positions, the rest by rows
                        weight = stats["trained_positions"] if key == "label_agreement" else stats["rows"]
                        if weight and stats[key] == stats[key]:
                            sums[key] += stats[key] * weight
                            weights[key] += weight
        finally:
            self._engine = None
            if engine is not None:
                engine.end()  # its device memory goes back to training
        keys = list(sums)
        totals = dict(zip(keys, ctx.all_reduce([sums[k] for k in keys])))
        weight_totals = dict(zip(_AVERAGED, ctx.all_reduce([weights[k] for k in _AVERAGED])))
        stats = {"rows": int(totals["rows"]), "trained_positions": int(totals["trained_positions"])}
        for key in _AVERAGED:
            stats[key] = totals[key] / weight_totals[key] if weight_totals[key] else float("nan")
        generated = int(totals["generated"])
        ctx.log(dict(event="rac_offline", iteration=ctx.iteration, prompts=len(chosen), generated=generated,
                     **stats))
        if generated and stats.get("mean_edit_distance") == 0.0:  # every answer is its reference
            import warnings

            warnings.warn(f"RAC iteration {ctx.iteration}: all {generated} generated answers equal their "
                          "references, so every RAC row is an SFT row and the iteration is SFT on fewer "
                          "rows; "
                          "sample them (--rac-temperature > 0)", stacklevel=2)
        return {}

    _engine = None  # the colocated engine while build_shard runs

    def _colocated(self, ctx: OfflineContext):
        """The colocated vLLM engine this phase generates on, or None (colocate.generation_engine)."""
        from gapfix.generation.colocate import generation_engine

        return generation_engine(ctx.model, ctx.config.generation_backend,
                                 tensor_parallel_size=ctx.config.vllm_tensor_parallel_size,
                                 gpu_memory_utilization=ctx.config.vllm_gpu_memory_utilization)

    def _rows(self, ctx: OfflineContext, chunk: List[int]):
        """The RAC rows of the prompts of examples `chunk`, in order, build_rac_rows' stats,
        and the number of answers generated (answer_chunk)."""
        config = ctx.config
        examples = ctx.gather(chunk)
        if config.rac_temperature > 0 and self.seed_per_prompt:  # each prompt from its example's seed
            seeds = [row_seed(config.seed, ctx.iteration, "generate", index) for index in chunk]
        else:
            seeds = generation_seed(config.seed, ctx.iteration, chunk[0])
        ctx.count("generate_calls", len(seeds) if isinstance(seeds, list) else 1)
        rows, stats, outputs = answer_chunk(
            ctx.model, ctx.tokenizer, [ex.prompt_ids for ex in examples], [ex.answer_ids for ex in examples],
            self.settings(config), seeds=seeds, backend=self._backend(ctx.model, config),
            mode=self.label_mode(config), impl="auto" if config.fused else "torch")
        return rows, stats, len(outputs)

    def _backend(self, model, config):
        """The colocated engine while build_shard runs with one; else the configured backend, for
        every model: vLLM serves a PEFT (LoRA) model too, its weights pushed merged from memory
        (gapfix.generation.vllm_backend.push_weights)."""
        if self._engine is not None:
            return self._engine
        return config.generation_backend

    def finish(self, ctx: OfflineContext) -> List[str]:
        """Every rank writes its contiguous share (shard_range) of the mixed order of the RAC rows
        of every shard and the SFT rows (mix_with_sft's order) as a shard; the shards' union is the
        iteration's rows, the same rows in the same order for any world size."""
        self._write_mixed(ctx, ctx.shard_path("mix"))
        ctx.barrier()
        return ctx.shard_paths("mix")

    def _write_mixed(self, ctx: OfflineContext, path: str, chunk_rows: int = 1024) -> None:
        """This rank's share of the mixed rows, written to `path` (its first row is the share's first)."""
        from gapfix.data import sft_row
        from gapfix.data.arrow import RowTable, RowWriter, shard_range

        config = ctx.config
        rac = RowTable.open(ctx.shard_paths("rac"))
        # the mixed order of mix_with_sft, computed on references (tuples pass through it): every
        # rank computes the whole order (two ints a row) and writes the rows of its share of it
        order = mix_with_sft([("rac", i) for i in range(len(rac))],
                             [("sft", i) for i in range(len(ctx.examples))], config.rac_sft_ratio,
                             seed=mixing_order_seed(config.seed, ctx.iteration))
        mine = shard_range(len(order), ctx.rank, ctx.world)
        width = next((f.width for f in rac.fields if f.name == "target_ids"), None)
        with RowWriter(path, first_row=mine.start) as writer:
            for start in range(mine.start, mine.stop, chunk_rows):
                part = order[start:min(start + chunk_rows, mine.stop)]
                rac_rows = iter(rac.gather([i for kind, i in part if kind == "rac"]))
                sft_rows = iter(ctx.gather([i for kind, i in part if kind == "sft"]))
                rows = []
                for kind, _ in part:
                    if kind == "rac":
                        rows.append(next(rac_rows))
                    else:
                        row = sft_row(next(sft_rows))
                        rows.append(to_soft_row(row, width) if width else row)
                writer.write(rows)
