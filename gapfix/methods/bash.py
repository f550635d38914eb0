"""BASH: batch-scheduled sampling, offline (Cen et al., TMLR 2025).

One iteration:

    alts = predict_alternatives(model, input_ids, attention_mask, answer_mask)   # frozen pass
    for step, (rows, ...) in enumerate(batches):
        batch = build_bash_batch(model, input_ids[rows], labels[rows], alts.alt_ids[rows],
                                 alt_probs=None if alts.alt_probs is None else alts.alt_probs[rows],
                                 beta=0.1, seed=iteration * 1_000_003 + step,
                                 attention_mask=attention_mask[rows])
        loss = model(**batch.model_inputs()).loss

predict_alternatives runs the model once, teacher-forced, over prompt+answer
and records its guess for every answer token; build_bash_batch swaps each
answer input token for that guess with probability beta inside the embedding
gather (gapfix.mix_embedding), keeping the reference as the labels.

Position convention: alt_ids[b, t] is the model's prediction for token t,
i.e. what it predicts from the prefix ending at t - 1. Positions that are not
answer tokens (and position 0, which has no prefix) hold the original id.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gapfix.data import check_labels
from gapfix.methods.base import (
    Method,
    OfflineContext,
    check_choice,
    check_int,
    check_number,
    register,
    row_seed,
    setting,
)
from gapfix.models import decoder_trunk, output_head, unwrap_model
from gapfix.ops.mix_embedding import mix_embedding

__all__ = ["BASH", "Alternatives", "BashBatch", "BashConfig", "build_bash_batch", "mixed_inputs_embeds",
           "changed_inputs", "mixing_seeds", "predict_alternatives", "predict_rows", "prediction_seeds"]

MODES = ("argmax", "sample", "topk")  # predict_alternatives' modes
BASH_MODES = MODES + ("random",)  # random: the noise control, uniform random tokens
MAX_TOP_K = 1024  # topk keeps K ids and probabilities per token of the dataset
PREDICTION_BATCH_SIZE = 64  # rows per forward of the prediction pass, under either driver


@dataclass(frozen=True)
class BashConfig:
    """The settings of BASH, for both drivers (`gapfix train` flags and gapfix.hf's trainers)."""

    beta: float = setting(0.2, "probability that an answer input token is replaced by the model's own",
                          flag="beta")
    mode: str = setting("sample", "the mixed-in token: the model's argmax, a sample at the temperature, its "
                        "topk (the probability-weighted mix of its top_k embeddings), or random (uniform random "
                        "tokens: the noise control of gapfix compare)", flag="bash_mode")
    temperature: float = setting(1.0, "sampling temperature of the predictions (sample, topk)",
                                 flag="bash_temperature")
    top_k: int = setting(4, f"K of topk mode (at most {MAX_TOP_K} and the vocabulary size)", flag="bash_top_k")
    rows: Optional[int] = setting(None, "reference trainer: examples predicted and trained per iteration "
                                  "(unset: those the steps draw)", flag="bash_rows")
    refresh: Optional[int] = setting(None, "gapfix.hf: optimizer steps per prediction window (unset: an epoch)")
    prediction_batch_size: int = setting(PREDICTION_BATCH_SIZE, "rows per forward of the prediction pass (the "
                                         "same chunks of rows under either driver)",
                                         flag="bash_prediction_batch_size")

    def __post_init__(self) -> None:
        check_number("beta", self.beta, 0.0, 1.0)
        check_choice("mode", self.mode, BASH_MODES)
        check_number("temperature", self.temperature, 0.0, float("inf"), open_low=True)
        check_int("top_k", self.top_k, 1, MAX_TOP_K)
        check_int("rows", self.rows, optional=True)
        check_int("refresh", self.refresh, optional=True)
        check_int("prediction_batch_size", self.prediction_batch_size)

    def to_dict(self) -> dict:
        return asdict(self)


def prediction_seeds(seed: int, iteration: int, rows: Sequence[int]) -> List[int]:
    """The sampling seed of each row's predictions (mode sample / random): a function of the run's
    seed, the iteration (gapfix.hf: the prediction window) and the row's example index, never of
    the rank or of the rows predicted beside it. Both drivers seed this way."""
    return [row_seed(seed, iteration, "predict", int(row)) for row in rows]


def mixing_seeds(seed: int, iteration: int, step: int, rows: Sequence) -> torch.Tensor:
    """BASH's mixing seed of each batch row, int64 (B,) in [0, 2**56): a function of the run's seed,
    the iteration, the step within it and the row (its index in the iteration's rows, or a tuple of
    them for a packed row), never of the rank or the micro-batch. Both drivers seed this way."""
    return torch.tensor([row_seed(seed, iteration, step, "row", row) for row in rows], dtype=torch.int64)


# ----------------------------------------------------------------------------
# the model's input embedding
# ----------------------------------------------------------------------------

def _embedding_plan(embedding: nn.Module):
    """How to reproduce embedding(ids) from its weight: (weight, scale, padding_idx) or None.

    Recognized: a plain nn.Embedding, and the transformers "ScaledWordEmbedding"
    modules (Gemma, Gemma 2/3/4, Bart, ...: F.embedding(ids, W) * embed_scale,
    the scale cast to W's dtype where it is a tensor). Anything else (a norm
    after the lookup, max_norm renormalization, sparse gradients, a custom
    module) returns None: mixing then happens at the id level.
    """
    if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None or embedding.sparse:
        return None
    padding_idx = embedding.padding_idx
    if type(embedding).forward is nn.Embedding.forward:
        return embedding.weight, None, padding_idx
    if type(embedding).__name__.endswith("ScaledWordEmbedding") and hasattr(embedding, "embed_scale"):
        scale = embedding.embed_scale
        if isinstance(scale, torch.Tensor):
            scale = scale.to(embedding.weight.dtype)
        return embedding.weight, scale, padding_idx
    return None


def mixed_inputs_embeds(model: nn.Module, input_ids: torch.Tensor, alt_ids: torch.Tensor, *,
                        beta: Optional[float] = None, seed: Optional[int] = None,
                        mask: Optional[torch.Tensor] = None, eligible: Optional[torch.Tensor] = None,
                        alt_probs: Optional[torch.Tensor] = None, deterministic: bool = False,
                        impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """inputs_embeds for `model` with alt_ids mixed in, through the model's own embedding.

    Args:
        model: a transformers causal LM (anything with get_input_embeddings()),
            or the input embedding module itself.
        input_ids: (B, T) reference ids.
        alt_ids, beta, seed, mask, eligible, alt_probs, deterministic, impl: as
            in gapfix.mix_embedding (hard alt_ids (B, T), or soft (B, T, K) with
            alt_probs).

    Returns:
        (inputs_embeds (B, T, D), mixed (B, T) bool). With nothing mixed,
        inputs_embeds equals model.get_input_embeddings()(input_ids).

    A plain or scaled (Gemma's sqrt(d)) embedding goes through the fused
    kernel on its weight, so tied input/output weights receive both gradients.
    Any other embedding module is called as is on the mixed ids
    (torch.where(mixed, alt_ids, input_ids)) with the mask drawn by the same
    RNG; in soft mode it is then called on the K alternatives and the outputs
    are weighted by alt_probs (mixing after the module, which differs from
    mixing rows before it when the module is not linear, e.g. a norm).
    """
    embedding = model if isinstance(model, nn.Embedding) or not hasattr(model, "get_input_embeddings") \
        else model.get_input_embeddings()
    plan = _embedding_plan(embedding)
    if plan is not None:
        weight, scale, padding_idx = plan
        embeds, mixed = mix_embedding(weight, input_ids, alt_ids, beta=beta, seed=seed, mask=mask,
                                      eligible=eligible, alt_probs=alt_probs, padding_idx=padding_idx,
                                      deterministic=deterministic, impl=impl)
        return (embeds if scale is None else embeds * scale), mixed

    # id-level fallback: validate through mix_embedding's own checks on a 0-width proxy
    proxy = torch.empty(_num_embeddings(embedding, model), 0, device=input_ids.device)
    _, mixed = mix_embedding(proxy, input_ids, alt_ids, beta=beta, seed=seed, mask=mask,
                             eligible=eligible, alt_probs=alt_probs, impl="torch")
    if alt_probs is None:
        return embedding(torch.where(mixed, alt_ids, input_ids)), mixed
    plain = embedding(input_ids)
    soft = (alt_probs.to(plain.dtype)[..., None] * embedding(alt_ids)).sum(-2)
    return torch.where(mixed[..., None], soft, plain), mixed


def changed_inputs(input_ids: torch.Tensor, alt_ids: torch.Tensor, alt_probs: Optional[torch.Tensor],
                   mixed: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the mixed positions whose input actually changed: another token (hard mixing),
    or a distribution not wholly on the token itself (soft). A mixed position whose prediction
    is the reference token feeds what SFT feeds."""
    if alt_probs is None:
        return mixed & (alt_ids != input_ids)
    own = ((alt_ids == input_ids[..., None]) * alt_probs).sum(-1)
    return mixed & (own < 1.0 - 1e-6)


def _num_embeddings(embedding, model):
    for owner, attr in ((embedding, "num_embeddings"), (getattr(model, "config", None), "vocab_size")):
        value = getattr(owner, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError("model: cannot tell the vocabulary size of its input embedding "
                     "(no num_embeddings or config.vocab_size)")


# ----------------------------------------------------------------------------
# the batch
# ----------------------------------------------------------------------------

@dataclass
class BashBatch:
    """Model inputs of one BASH step.

    inputs_embeds (B, T, D): the mixed embeddings (differentiable w.r.t. the
    embedding weight); attention_mask (B, T) or None; labels (B, T): the
    reference, unchanged; mixed (B, T) bool: which inputs were replaced.
    """
    inputs_embeds: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    labels: torch.Tensor
    mixed: torch.Tensor

    def model_inputs(self) -> dict:
        """Keyword arguments for a transformers model: model(**batch.model_inputs())."""
        inputs = {"inputs_embeds": self.inputs_embeds, "labels": self.labels}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs


def build_bash_batch(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     alt_ids: torch.Tensor, *, beta: float, seed: int,
                     attention_mask: Optional[torch.Tensor] = None,
                     eligible: Optional[torch.Tensor] = None,
                     alt_probs: Optional[torch.Tensor] = None, ignore_index: int = -100,
                     deterministic: bool = False, impl: str = "auto") -> BashBatch:
    """Turn (prompt+answer ids, the model's alternatives, beta, seed) into model inputs.

    Args:
        model: the model being trained (its input embedding is used).
        input_ids: (B, T) prompt + reference answer (+ padding).
        labels: (B, T) transformers convention (aligned with input_ids, the
            model shifts; ignore_index on prompt and padding). Returned as is.
            Labels recognisably in the shifted convention are refused
            (gapfix.data.check_labels).
        alt_ids: (B, T) from predict_alternatives, or (B, T, K) with alt_probs.
        beta: replacement probability of an answer token, in [0, 1].
        seed: int in [0, 2**63); one seed per step makes a run reproducible.
        attention_mask: (B, T), passed through; padding is never mixed.
        eligible: (B, T) bool positions that may be replaced. Default: the
            answer tokens, labels != ignore_index (and attention_mask != 0).
        alt_probs: (B, T, K) for soft mixing.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(labels.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    check_labels(input_ids, labels, attention_mask=attention_mask, ignore_index=ignore_index)
    if eligible is None:
        eligible = labels != ignore_index
        if attention_mask is not None:
            eligible = eligible & (attention_mask != 0)
    inputs_embeds, mixed = mixed_inputs_embeds(
        model, input_ids, alt_ids, beta=beta, seed=seed, eligible=eligible, alt_probs=alt_probs,
        deterministic=deterministic, impl=impl)
    return BashBatch(inputs_embeds, attention_mask, labels, mixed)


# ----------------------------------------------------------------------------
# the prediction pass
# ----------------------------------------------------------------------------

class Alternatives(NamedTuple):
    """The model's own tokens: alt_ids (B, T) or (B, T, K); alt_probs (B, T, K) in topk mode, else None."""
    alt_ids: torch.Tensor
    alt_probs: Optional[torch.Tensor]


@torch.no_grad()
def predict_alternatives(model: nn.Module, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None,
                         answer_mask: Optional[torch.Tensor] = None, *,
                         position_ids: Optional[torch.Tensor] = None, mode: str = "argmax",
                         temperature: float = 1.0, top_k: int = 4, chunk_size: int = 2048,
                         generator: Optional[torch.Generator] = None,
                         seed: Optional[int] = None,
                         row_seeds: Optional[Sequence[int]] = None) -> Alternatives:
    """The frozen model's guess for every answer token, from one teacher-forced pass.

    Args:
        model: a transformers causal LM, or one wrapped by PEFT or DDP (the
            trunk and head are found through the wrapper, the adapter applies);
            put in eval mode for the pass and its mode restored after; no gradients.
        input_ids: (B, T) prompt + reference answer (+ padding).
        attention_mask: (B, T) or None.
        position_ids: (B, T) or None; a packed batch (examples concatenated in
            one row, positions restarting at 0 per example, attention_mask None)
            gives the predictions of the examples run one by one, where the
            model's attention keeps packed examples apart (flash-attention,
            and transformers' sdpa path given position_ids).
        answer_mask: (B, T) bool, the answer tokens to predict (labels !=
            -100 in transformers convention). None: every position but 0.
        mode: "argmax"; "sample" (from softmax(logits / temperature)); or
            "topk" (the top_k tokens and their probabilities renormalized over
            the top k, at the temperature).
        temperature: > 0; used by "sample" and "topk".
        top_k: K of "topk".
        chunk_size: positions whose logits are formed at once (chunk_size x V
            fp32 values): the lm head runs on chunks of the final hidden states,
            so the (B, T, V) logits never exist; only positions that predict an
            answer token are projected. Models without a separate trunk and
            head run whole forwards on micro-batches of chunk_size // T rows.
        generator / seed: the randomness of "sample" (a generator on the
            model's device, or a seed to make one).
        row_seeds: "sample" only, instead of generator / seed: one seed per row,
            each row's draws coming from its own stream, so that a row samples
            alike whatever rows share its batch (the trainer seeds a row from
            its example, so every world size builds the same rows).

    Returns:
        Alternatives(alt_ids, alt_probs): alt_ids (B, T) long, alt_ids[b, t]
        the prediction for token t made at position t - 1 (the original id
        where answer_mask is False and at t = 0); in "topk" mode alt_ids is
        (B, T, K) and alt_probs (B, T, K) fp32 (non-answer positions: the
        original id with probability 1, then itself with probability 0).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be a (B, T) integer tensor, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    if answer_mask is None:
        answer_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if answer_mask.shape != input_ids.shape or answer_mask.dtype != torch.bool:
        raise ValueError(f"answer_mask must be a bool tensor of shape {tuple(input_ids.shape)}, "
                         f"got {answer_mask.dtype} {tuple(answer_mask.shape)}")
    for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if value is not None and value.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(value.shape)}")
    if mode != "argmax" and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if mode == "topk" and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if row_seeds is not None and len(row_seeds) != input_ids.shape[0]:
        raise ValueError(f"row_seeds must have one seed per row ({input_ids.shape[0]}), got {len(row_seeds)}")
    if mode == "sample" and generator is None and seed is not None and row_seeds is None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)

    input_ids = input_ids.long()
    # the hidden state at t - 1 predicts token t
    predicts = answer_mask[:, 1:]
    trunk, head = decoder_trunk(model), None
    if trunk is not None and getattr(unwrap_model(model), "get_output_embeddings", lambda: None)() is not None:
        head = output_head(model)
    was_training = model.training
    model.eval()
    try:
        if head is not None:
            hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
            hidden = hidden.last_hidden_state[:, :-1][predicts]
            chunks = (head.logits(hidden[i:i + chunk_size]).float()
                      for i in range(0, hidden.shape[0], chunk_size))
        else:  # no separate trunk: whole-model forwards on micro-batches of rows
            rows = max(1, chunk_size // max(1, input_ids.shape[1]))

            def part(i):
                extra = {} if position_ids is None else {"position_ids": position_ids[i:i + rows]}
                mask = None if attention_mask is None else attention_mask[i:i + rows]
                return model(input_ids=input_ids[i:i + rows], attention_mask=mask, use_cache=False, **extra)

            chunks = (part(i).logits[:, :-1][predicts[i:i + rows]].float()
                      for i in range(0, input_ids.shape[0], rows))
        uniforms = None
        if mode == "sample" and row_seeds is not None:  # row-major, as the predicted positions are
            counts = predicts.sum(1).tolist()
            uniforms = torch.cat([torch.rand(n, generator=torch.Generator().manual_seed(int(s)))
                                  for n, s in zip(counts, row_seeds)] or [torch.empty(0)])
            uniforms = uniforms.to(input_ids.device)
        picks, used = [], 0
        for logits in chunks:
            u = None if uniforms is None else uniforms[used:used + logits.shape[0], None]
            used += logits.shape[0]
            picks.append(_pick(logits, mode, temperature, top_k, generator, u))
    finally:
        model.train(was_training)

    if mode == "topk":
        k = top_k
        alt_ids = input_ids[..., None].expand(*input_ids.shape, k).clone()
        alt_probs = torch.zeros(*input_ids.shape, k, dtype=torch.float32, device=input_ids.device)
        alt_probs[..., 0] = 1.0
        if picks:
            alt_ids[:, 1:][predicts] = torch.cat([ids for ids, _ in picks])
            alt_probs[:, 1:][predicts] = torch.cat([p for _, p in picks])
        return Alternatives(alt_ids, alt_probs)
    alt_ids = input_ids.clone()
    if picks:
        alt_ids[:, 1:][predicts] = torch.cat(picks)
    return Alternatives(alt_ids, None)


def predict_rows(model: nn.Module, ids: Sequence[torch.Tensor], eligible: Sequence[torch.Tensor],
                 config: BashConfig, seeds: Sequence[int], *, device=None,
                 position_ids: Optional[torch.Tensor] = None) -> Alternatives:
    """BASH's offline phase on a few rows, as both drivers run it: the rows (1-D id tensors, and
    the positions whose prediction is used) right-padded into one batch, predicted in
    config.mode (the "random" noise control draws uniform tokens), row b seeded by seeds[b]
    (prediction_seeds). position_ids: a single packed row's (then no padding, no mask).
    Returns Alternatives (B, T) or (B, T, K) on `device`."""
    device = torch.device("cpu") if device is None else torch.device(device)
    width = max(len(row) for row in ids)
    batch = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    answer = torch.zeros((len(ids), width), dtype=torch.bool)
    for i, (row, trained) in enumerate(zip(ids, eligible)):
        batch[i, :len(row)], mask[i, :len(row)], answer[i, :len(row)] = row, 1, trained
    if config.mode == "random":
        return Alternatives(*(None if t is None else t.to(device) for t in random_alternatives(
            model, {"input_ids": batch, "eligible": answer}, seeds)))
    return predict_alternatives(
        model, batch.to(device), None if position_ids is not None else mask.to(device), answer.to(device),
        position_ids=None if position_ids is None else position_ids.to(device), mode=config.mode,
        temperature=config.temperature, top_k=config.top_k, row_seeds=seeds)


def _pick(logits, mode, temperature, top_k, generator, u=None):
    if mode == "argmax":
        return logits.argmax(-1)
    if mode == "sample":
        # inverse-CDF sampling: one cumsum and a binary search per row; torch.multinomial
        # is several times slower than the model's forward on CPU at a 32k vocabulary
        cdf = F.softmax(logits / temperature, dim=-1).cumsum(-1)
        if u is None:
            u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
        u = u.to(cdf.dtype)
        picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
        return picked.clamp_max(cdf.shape[-1] - 1)
    values, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    probs = F.softmax(values / temperature, dim=-1)
    if ids.shape[-1] < top_k:  # vocabulary smaller than K: pad with zero-probability copies
        pad = top_k - ids.shape[-1]
        ids = torch.cat([ids, ids[:, :1].expand(-1, pad)], dim=-1)
        probs = torch.cat([probs, probs.new_zeros(probs.shape[0], pad)], dim=-1)
    return ids, probs


# ----------------------------------------------------------------------------
# the method, as the reference trainer runs it (gapfix.methods.base.Method)
# ----------------------------------------------------------------------------

@register
class BASH(Method):
    """Offline: one teacher-forced pass over the rows the steps draw gives the model's own token
    at every trained position (alt_ids, with alt_probs in topk mode); rows the steps never draw
    carry their own ids (eligible all False). Training: each eligible input token is replaced by
    its alternative with probability beta inside the embedding gather, seeded per row.

    The predicted rows are cut into chunks of `prediction_batch_size` in row order, the same chunks at
    any world size; rank r predicts its contiguous share of the chunks (so a row's forward has
    the same batch, hence the same bits, for any N), sampling from per-example seeds."""

    name = "bash"
    config_class = BashConfig
    batch_fields = ("alt_ids", "eligible")
    uses_row_seeds = True

    def num_rows(self, num_examples: int, config) -> int:
        return min(config.bash_rows, num_examples) if config.bash_rows else num_examples

    def _subset(self, ctx: OfflineContext) -> Sequence[int]:
        """The example behind each row: all of them (a range: no list as long as the data), or
        bash_rows drawn afresh each iteration."""
        import random

        n, config = len(ctx.examples), ctx.config
        if not config.bash_rows:
            return range(n)
        rng = random.Random(f"{config.seed}/{ctx.iteration}/rows")  # str seeds are hashed stably
        return rng.sample(range(n), min(config.bash_rows, n))

    def build_shard(self, ctx: OfflineContext) -> dict:
        from gapfix.data.arrow import shard_range

        owners = self._subset(ctx)
        num_rows = len(owners)
        scheduled = not ctx.config.bash_rows  # predict only the rows the steps draw
        todo = sorted(set(ctx.trained_rows(num_rows))) if scheduled else list(range(num_rows))
        size = self.settings(ctx.config).prediction_batch_size
        chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
        mine = shard_range(len(chunks), ctx.rank, ctx.world)

        def boundary(chunk):  # the first row of the rank whose first chunk is `chunk`
            return 0 if chunk == 0 else (num_rows if chunk >= len(chunks) else chunks[chunk][0])

        start, stop = boundary(mine.start), boundary(mine.stop)
        if ctx.rank == ctx.world - 1:
            stop = num_rows
        predicted = same = 0
        with ctx.writer(start) as writer:
            done = start
            for c in mine:
                chunk = chunks[c]
                self._write_plain(ctx, writer, owners, range(done, chunk[0]))
                rows, counts = self._predict(ctx, [owners[i] for i in chunk])
                predicted, same = predicted + counts[0], same + counts[1]
                done = chunk[0]
                for index, row in zip(chunk, rows):
                    self._write_plain(ctx, writer, owners, range(done, index))
                    writer.write([row])
                    done = index + 1
            self._write_plain(ctx, writer, owners, range(done, stop))
        predicted, same = (int(v) for v in ctx.all_reduce([predicted, same]))
        ratio = same / predicted if predicted else float("nan")
        ctx.log(dict(event="bash_offline", iteration=ctx.iteration, predicted_rows=len(todo),
                     predicted_tokens=predicted, equal_to_input=ratio))
        config = ctx.config
        if predicted and same == predicted and config.beta > 0 and config.bash_mode != "topk":
            import warnings

            warnings.warn(f"BASH iteration {ctx.iteration}: every predicted token equals the reference input "
                          f"({predicted} tokens), so mixing changes nothing and the iteration is SFT; "
                          "raise --bash-temperature or use --bash-mode sample/topk", stacklevel=2)
        return {"predicted_rows": len(todo)} if scheduled else {}

    def _write_plain(self, ctx, writer, owners, rows) -> None:
        """Rows no step draws: their own ids as alternatives, nothing eligible (never mixed)."""
        from gapfix.data import sft_row

        for start in range(rows.start, rows.stop, 1024):
            part = range(start, min(start + 1024, rows.stop))
            plain = []
            for example in ctx.gather([owners[i] for i in part]):
                row = sft_row(example)
                row["eligible"] = [False] * len(row["input_ids"])
                if ctx.config.bash_mode == "topk":
                    k = ctx.config.bash_top_k
                    row["alt_ids"] = [[t] * k for t in row["input_ids"]]
                    row["alt_probs"] = [[1.0] + [0.0] * (k - 1) for _ in row["input_ids"]]
                else:
                    row["alt_ids"] = list(row["input_ids"])
                plain.append(row)
            writer.write(plain)

    def _predict(self, ctx: OfflineContext, example_indices: List[int]):
        """The rows of these examples with the frozen model's alternatives, and (predicted
        tokens, predicted tokens equal to the input)."""
        from gapfix.data import IGNORE_INDEX, sft_row

        config = ctx.config
        rows = [sft_row(ex) for ex in ctx.gather(example_indices)]
        for row in rows:  # the trained tokens (every assistant turn of a chat)
            row["eligible"] = [label != IGNORE_INDEX for label in row["labels"]]
        ids = [torch.tensor(row["input_ids"]) for row in rows]
        eligible = [torch.tensor(row["eligible"], dtype=torch.bool) for row in rows]
        if config.bash_mode != "random":
            ctx.count("forwards")
        prediction = predict_rows(ctx.model, ids, eligible, self.settings(config),
                                  prediction_seeds(config.seed, ctx.iteration, example_indices), device=ctx.device)
        alt = (prediction.alt_ids if prediction.alt_ids.dim() == 2 else prediction.alt_ids[..., 0]).cpu()
        predicted = same = 0
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            predicted += int(eligible[i].sum())
            same += int(((alt[i, :n] == ids[i]) & eligible[i]).sum())
            row["alt_ids"] = prediction.alt_ids[i, :n].tolist()
            if prediction.alt_probs is not None:
                row["alt_probs"] = prediction.alt_probs[i, :n].tolist()
        return rows, (predicted, same)

    def loss_inputs(self, config, row_seeds) -> dict:
        return {"mix_seed": row_seeds, "beta": config.beta}

    def model_inputs(self, model, batch, *, impl: str, mix_seed=None, beta: float = 0.0, **unused):
        embeds, mixed = mixed_inputs_embeds(model, batch["input_ids"], batch["alt_ids"], beta=beta,
                                            seed=mix_seed, eligible=batch["eligible"],
                                            alt_probs=batch.get("alt_probs"), impl=impl)
        eligible = batch["eligible"].sum()
        changed = changed_inputs(batch["input_ids"], batch["alt_ids"], batch.get("alt_probs"), mixed)
        return {"inputs_embeds": embeds}, {"mixed_fraction": (mixed.sum(), eligible),
                                           "changed_fraction": (changed.sum(), eligible)}


def random_alternatives(model, batch, row_seeds: Sequence[int]) -> Alternatives:
    """Uniform random tokens at the eligible positions (BASH's noise control), one stream per row."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = batch["input_ids"]
    noise = torch.stack([torch.randint(0, vocab, ids.shape[1:],
                                       generator=torch.Generator().manual_seed(int(s))) for s in row_seeds])
    return Alternatives(torch.where(batch["eligible"], noise, ids), None)
