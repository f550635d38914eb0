"""The reference trainer: SFT, BASH and RAC over iterations.

An iteration is an offline phase with the current model frozen, then training:

- sft:  no offline phase; rows are prompt + reference answer.
- bash: one teacher-forced prediction pass gives the model's own token at every
        answer position; during training each answer input token is replaced by
        it with probability beta inside the embedding gather (gapfix.mix_embedding);
        labels stay the reference.
- rac:  the model generates an answer per training prompt (gapfix.generate);
        the answers, labelled with corrections from the alignment to the
        reference (gapfix.rac_labels), are mixed with plain SFT rows.

The loss is gapfix.linear_cross_entropy on the final hidden states, so the full
logits never exist; `fused=False` switches every op to its PyTorch reference.
Gradient accumulation divides by the true number of trained tokens of the
whole optimizer step (every rank knows the global batch, so no all-reduce is
needed for it). Under torchrun the model runs under DDP or FSDP2 (gloo on CPU,
NCCL on GPU); every rank draws the same global batch and takes its share.

Checkpoints (gapfix.checkpoint) are directories written whole and then published
by atomically replacing a `latest` pointer, so a failed save (disk full) leaves the
previous checkpoint valid. A checkpoint holds the model, optimizer, scheduler, RNG
states, the iteration's built rows and the position in them, as data only (JSON
and safetensors): resume is exact, and never runs code from a file.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from gapfix import checkpoint as ckpt
from gapfix._progress import step_progress as _progress
from gapfix.checkpoint import latest_checkpoint, load_checkpoint, model_fingerprint  # noqa: F401 (API)
from gapfix.data import IGNORE_INDEX, Example, collate, label_field, pack_rows, sft_row
from gapfix.models import decoder_trunk, unwrap_model

METHODS = ("sft", "bash", "rac")


@dataclass
class TrainConfig:
    method: str = "sft"
    iterations: int = 1
    steps_per_iteration: Optional[int] = None  # None: epochs_per_iteration over the rows
    epochs_per_iteration: float = 1.0
    batch_size: int = 32  # rows per optimizer step, over all ranks
    micro_batch_size: Optional[int] = None  # rows per forward on one rank; None: all of its share
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # BASH
    beta: float = 0.2
    bash_mode: str = "sample"  # argmax | sample | topk | random (a noise control: uniform random tokens)
    bash_temperature: float = 1.0
    bash_top_k: int = 4
    bash_rows: Optional[int] = None  # examples predicted and trained per iteration; None: all the steps draw
    # RAC
    rac_mode: str = "path"  # path | first | last | all
    rac_sft_ratio: float = 1.0  # SFT rows mixed in per RAC row
    rac_temperature: float = 0.0
    rac_samples: int = 1
    rac_prompts: Optional[int] = None  # prompts regenerated each iteration; None: all
    rac_only_until_divergence: bool = False
    max_new_tokens: int = 128
    generation_backend: str = "auto"
    # ops and runtime
    fused: bool = True
    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # autocast on GPU
    packing: bool = False  # one packed row per micro-batch (where packing_supported(model))
    distributed: str = "ddp"  # ddp | fsdp, under torchrun
    out_dir: Optional[str] = None
    save_every: int = 0  # steps; a checkpoint is also written at the end of each iteration
    keep_checkpoints: int = 1
    log_every: int = 10
    progress: bool = True

    def validate(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.bash_mode not in ("argmax", "sample", "topk", "random"):
            raise ValueError(f"bash_mode must be argmax, sample, topk or random, got {self.bash_mode!r}")
        if self.rac_mode not in ("path", "first", "last", "all"):
            raise ValueError(f"rac_mode must be path, first, last or all, got {self.rac_mode!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"distributed must be ddp or fsdp, got {self.distributed!r}")
        for name in ("iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_iteration is not None and self.steps_per_iteration < 1:
            raise ValueError(f"steps_per_iteration must be >= 1, got {self.steps_per_iteration}")
        for name in ("bash_rows", "rac_prompts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.rac_sft_ratio < 0:
            raise ValueError(f"rac_sft_ratio must be >= 0, got {self.rac_sft_ratio}")


@dataclass
class TrainResult:
    model: object
    steps: int
    metrics_path: Optional[str]
    phase_seconds: dict


# ---------------------------------------------------------------- distributed


class _Dist:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def _pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")
    return torch.device(name)


class CausalLMLoss(torch.nn.Module):
    """Wraps a causal LM so that one forward returns the summed loss of a micro-batch.

        loss_module = DistributedDataParallel(CausalLMLoss(model))   # or CausalLMLoss(model) alone
        loss_sum, mixed = loss_module(batch, mix_seed=step, beta=0.3)

    Wrap this module, not the model, in DDP (or FSDP2): DDP synchronises gradients
    only for what runs inside the wrapped module's forward, and here the BASH
    mixing, the trunk and the output head all do. The logits are never formed
    (fused linear cross-entropy, with the model's own logit scaling and softcap).

    batch: input_ids (B, T); attention_mask or position_ids (packed rows); labels
    aligned with input_ids (HF convention; the loss shifts), or shift_labels, or
    soft target_ids / target_weights (aligned); for BASH alt_ids and eligible
    (and alt_probs), mixed at rate beta with the seed mix_seed. Returns the
    summed loss (divide by the step's trained-token count) and the mixed mask
    (None without alt_ids). model may be wrapped by PEFT.
    """

    def __init__(self, model, fused: bool = True):
        super().__init__()
        self.model = model
        self.fused = fused

    def forward(self, batch, mix_seed: Optional[int] = None, beta: float = 0.0):
        from gapfix.models import decoder_trunk, output_head
        from gapfix.ops.cross_entropy import cross_entropy, linear_cross_entropy

        impl = "auto" if self.fused else "torch"
        kwargs = {"use_cache": False}  # a cache would also turn off transformers' packed-sequence masks
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        if "position_ids" in batch:
            kwargs["position_ids"] = batch["position_ids"]
        if "alt_ids" in batch:
            from gapfix.methods.bash import mixed_inputs_embeds

            kwargs["inputs_embeds"], mixed = mixed_inputs_embeds(
                self.model, batch["input_ids"], batch["alt_ids"], beta=beta, seed=mix_seed,
                eligible=batch["eligible"], alt_probs=batch.get("alt_probs"), impl=impl)
        else:
            kwargs["input_ids"] = batch["input_ids"]
            mixed = None
        trunk, head = decoder_trunk(self.model), output_head(self.model)
        if trunk is None:
            raise ValueError(f"model: {type(self.model).__name__} has no separate trunk (base_model)")
        hidden = trunk(**kwargs).last_hidden_state.flatten(0, 1)
        target = shifted_targets(batch)
        options = dict(ignore_index=IGNORE_INDEX, softcap=head.softcap, reduction="sum", impl=impl)
        if head.is_linear:  # the (N, V) logits are never formed
            hidden, weight, bias = head.linear_loss_inputs(hidden)
            loss = linear_cross_entropy(hidden, weight, target, bias=bias, **options)
        else:  # a wrapped head (a LoRA adapter on lm_head): its logits, then the same loss
            loss = cross_entropy(head.scaled_logits(hidden), target, **options)
        return loss, mixed


def shifted_targets(batch, ignore_index: int = IGNORE_INDEX):
    """The targets of a (B, T) batch as the loss takes them, flattened (B*T,): entry i is
    what position i predicts. `labels` / `target_ids` + `target_weights` (aligned with
    input_ids, the Hugging Face convention) are shifted left by one; `shift_labels` are
    taken as they are. Refuses a batch that carries both conventions."""
    key = label_field(batch)
    if key == "shift_labels":
        if "target_ids" in batch:
            raise ValueError("batch: soft targets (target_ids) are aligned with input_ids; "
                             "they cannot go with shift_labels")
        return batch["shift_labels"].flatten()
    if "target_ids" in batch:
        ids, weights = batch["target_ids"], batch["target_weights"]
        ids = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], ignore_index)], 1)
        weights = torch.cat([weights[:, 1:], torch.zeros_like(weights[:, :1])], 1)
        return ids.flatten(0, 1), weights.flatten(0, 1)
    labels = batch["labels"]
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], 1).flatten()


def _count_targets(rows):
    """Trained positions of rows in the aligned convention (position 0 predicts nothing)."""
    if "target_ids" in rows[0]:
        return sum(any(t != IGNORE_INDEX for t in slot) for r in rows for slot in r["target_ids"][1:])
    key = label_field(rows[0], "rows[0]")
    skip = 1 if key == "labels" else 0
    return sum(t != IGNORE_INDEX for r in rows for t in r[key][skip:])


# ---------------------------------------------------------------- schedule


def _lr_lambda(warmup, total, min_ratio):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ---------------------------------------------------------------- offline phases


def build_rows(method, model, tokenizer, examples, config, iteration, device, log, scheduled=None):
    """The iteration's training rows, built with the current model frozen.

    scheduled: the row indices this iteration trains on (SFT and BASH rows are
    one per example); BASH predicts only those, so its offline pass costs at
    most one forward over the rows actually trained.
    """
    rng = random.Random(f"{config.seed}/{iteration}/rows")  # str seeds are hashed stably
    if method == "sft":
        return [sft_row(ex) for ex in examples]
    if method == "bash":
        if config.bash_rows:  # a fresh subset each iteration, trained for as many epochs as the steps take
            subset = rng.sample(range(len(examples)), min(config.bash_rows, len(examples)))
            return _bash_rows(model, [examples[i] for i in subset], config, iteration, device, None, log)
        return _bash_rows(model, examples, config, iteration, device, scheduled, log)
    return _rac_rows(model, tokenizer, examples, config, iteration, rng, log)


def _bash_rows(model, examples, config, iteration, device, scheduled, log=None, chunk_rows=64):
    from gapfix.methods.bash import predict_alternatives

    rows = [sft_row(ex) for ex in examples]
    todo = sorted(scheduled) if scheduled is not None else range(len(rows))
    predicted_tokens = same_tokens = 0
    for start in range(0, len(todo), chunk_rows):
        chunk = [rows[i] for i in todo[start:start + chunk_rows]]
        for row in chunk:  # the trained tokens (every assistant turn of a chat)
            row["eligible"] = [label != IGNORE_INDEX for label in row["labels"]]
        batch = collate(chunk, pad_id=0)  # eligible pads with False
        if config.bash_mode == "random":  # the noise control: random tokens in place of predictions
            prediction = _random_alternatives(model, batch, _mix_seed(config.seed, iteration, "noise", start, 0))
        else:
            prediction = predict_alternatives(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                batch["eligible"].to(device), mode=config.bash_mode, temperature=config.bash_temperature,
                top_k=config.bash_top_k, seed=_mix_seed(config.seed, iteration, "predict", start, 0))
        eligible = batch["eligible"]
        alt = prediction.alt_ids if prediction.alt_ids.dim() == 2 else prediction.alt_ids[..., 0]
        predicted_tokens += int(eligible.sum())
        same_tokens += int(((alt.cpu() == batch["input_ids"]) & eligible).sum())
        for i, row in enumerate(chunk):
            n = len(row["input_ids"])
            row["alt_ids"] = prediction.alt_ids[i, :n].tolist()
            if prediction.alt_probs is not None:
                row["alt_probs"] = prediction.alt_probs[i, :n].tolist()
    same = same_tokens / predicted_tokens if predicted_tokens else float("nan")
    if log is not None:  # counts what was predicted, not the rows built
        log(dict(event="bash_offline", iteration=iteration, predicted_rows=len(todo),
                 predicted_tokens=predicted_tokens, equal_to_input=same))
    if predicted_tokens and same_tokens == predicted_tokens and config.beta > 0 and config.bash_mode != "topk":
        import warnings

        warnings.warn(f"BASH iteration {iteration}: every predicted token equals the reference input "
                      f"({predicted_tokens} tokens), so mixing changes nothing and the iteration is SFT; "
                      "raise --bash-temperature or use --bash-mode sample/topk", stacklevel=2)
    return rows


def _random_alternatives(model, batch, seed):
    """Uniform random tokens at the answer positions (BASH's noise control)."""
    from gapfix.methods.bash import Alternatives

    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    noise = torch.randint(0, vocab, batch["input_ids"].shape, generator=generator)
    return Alternatives(torch.where(batch["eligible"], noise, batch["input_ids"]), None)


def _rac_rows(model, tokenizer, examples, config, iteration, rng, log):
    from gapfix.generation import generate
    from gapfix.methods.rac import build_rac_rows, mix_with_sft

    count = min(config.rac_prompts or len(examples), len(examples))
    chosen = rng.sample(range(len(examples)), count)
    outputs = generate(model, [examples[i].prompt_ids for i in chosen], tokenizer=tokenizer,
                       n=config.rac_samples, temperature=config.rac_temperature,
                       max_new_tokens=config.max_new_tokens,
                       seed=_mix_seed(config.seed, iteration, "generate", 0, 0),
                       backend=_generation_backend(model, config))
    owners = [chosen[output.prompt_index] for output in outputs]
    # Generation objects: their finish_reason says which answers ended with EOS
    rows, stats = build_rac_rows(
        [examples[i].prompt_ids for i in owners], outputs,
        [examples[i].answer_ids for i in owners], eos_id=tokenizer.eos_token_id,
        pad_id=_pad_id(tokenizer), mode=config.rac_mode,
        only_until_divergence=config.rac_only_until_divergence,
        impl="auto" if config.fused else "torch")
    log(dict(event="rac_offline", iteration=iteration, prompts=count, generated=len(outputs), **stats))
    if outputs and stats.get("mean_edit_distance") == 0.0:  # every answer is its reference
        import warnings

        warnings.warn(f"RAC iteration {iteration}: all {len(outputs)} generated answers equal their "
                      "references, so every RAC row is an SFT row and the iteration is SFT on fewer rows; "
                      "sample them (--rac-temperature > 0)", stacklevel=2)
    return mix_with_sft(rows, [sft_row(ex) for ex in examples], config.rac_sft_ratio,
                        seed=_mix_seed(config.seed, iteration, "mix", 0, 0))


# ---------------------------------------------------------------- training


def train(model, tokenizer, train_examples: List[Example], config: Optional[TrainConfig] = None,
          *, resume: bool = True, resume_with_changed_config: bool = False, on_iteration_end=None,
          on_step=None, **overrides) -> TrainResult:
    """Trains `model` (a transformers causal LM) in place with config.method.

    `overrides` set TrainConfig fields (``train(..., method="bash", beta=0.2)``).
    `on_iteration_end(iteration, model)` runs after each iteration (evaluation);
    `on_step(record)` after each optimizer step, with the step's metrics.
    With config.out_dir set, writes metrics.jsonl, checkpoints and the final model,
    and resumes from the latest checkpoint there when `resume` is true (see gapfix.checkpoint;
    a checkpoint of a run with other settings is refused unless resume_with_changed_config).
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    config.validate()
    if not train_examples:
        raise ValueError("train_examples is empty")
    if config.packing and not packing_supported(model):
        attention = getattr(unwrap_model(model).config, "_attn_implementation", None)
        raise ValueError(
            f"packing needs attention that keeps packed examples apart given position_ids that restart "
            f"per example (flash_attention_2/3, or sdpa/eager/flex in a transformers whose masks read "
            f"packed sequences from position_ids); the model uses {attention!r} in "
            f"{type(unwrap_model(model)).__module__}, under which packed examples would attend to each other")
    device = _pick_device(config.device)
    dist = _Dist(device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model.to(device)

    out = config.out_dir
    metrics_path = None
    if out and dist.main:
        os.makedirs(out, exist_ok=True)
        metrics_path = os.path.join(out, "metrics.jsonl")

    def log(record):
        if metrics_path:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    rows_per_rank = config.batch_size // dist.world
    if rows_per_rank * dist.world != config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the world size {dist.world}")
    micro = config.micro_batch_size or rows_per_rank

    def steps_for(num_rows):
        if config.steps_per_iteration:
            return config.steps_per_iteration
        return max(1, int(config.epochs_per_iteration * num_rows // config.batch_size))

    expected_rows = len(train_examples)
    if config.method == "bash" and config.bash_rows:
        expected_rows = min(config.bash_rows, expected_rows)
    if config.method == "rac":
        n_rac = min(config.rac_prompts or expected_rows, expected_rows) * config.rac_samples
        expected_rows = n_rac + round(n_rac * config.rac_sft_ratio)
    total_steps = config.iterations * steps_for(expected_rows)

    position = {"iteration": 0, "step_in_iteration": 0, "global_step": 0}
    rows, state = None, None
    checkpoint = latest_checkpoint(out) if (out and resume) else None
    if checkpoint:  # weights load before any sharding, on every rank
        state = load_checkpoint(checkpoint, model, config=config,
                                allow_config_change=resume_with_changed_config)
    # a resumed run's log continues from the checkpoint; a run that starts over starts it over
    ckpt.rewind_metrics(metrics_path, state.get("metrics_bytes", 0) if state else 0)
    loss_module = CausalLMLoss(model, config.fused)
    trainable = _wrap_distributed(loss_module, config, dist, device)
    trainable_params = [p for p in model.parameters() if p.requires_grad]  # a PEFT model: its adapter
    if not trainable_params:
        raise ValueError("model has no parameter that requires grad: nothing to train (a PEFT adapter "
                         "loaded for inference? load it with is_trainable=True)")
    optimizer = torch.optim.AdamW(trainable_params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(config.warmup_steps, total_steps, config.min_lr_ratio))
    if state is not None:
        _load_optimizer_state(model, optimizer, state["optimizer"], config, dist)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        position, rows = state["position"], state["rows"]
        log(dict(event="resume", checkpoint=checkpoint, **position,
                 **({"config_changes": state["config_changes"]} if state["config_changes"] else {})))

    phase_seconds = {"offline": 0.0, "train": 0.0}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.bf16
                else contextlib.nullcontext())
    while position["iteration"] < config.iterations:
        iteration = position["iteration"]
        if rows is None:  # offline phase, with the current model frozen
            started = time.perf_counter()
            scheduled = None
            if config.method == "bash" and not config.bash_rows:
                n = len(train_examples)
                scheduled = set(_row_order(n, steps_for(n) * config.batch_size, config.seed, iteration))
            rows = build_rows(config.method, model, tokenizer, train_examples, config, iteration, device,
                              log, scheduled)
            phase_seconds["offline"] += time.perf_counter() - started
            counted = {"predicted_rows": len(scheduled)} if scheduled is not None else {}  # not all rows
            log(dict(event="offline", iteration=iteration, rows=len(rows), **counted,
                     seconds=time.perf_counter() - started))
        steps = steps_for(len(rows))
        order = _row_order(len(rows), steps * config.batch_size, config.seed, iteration)
        started = time.perf_counter()
        bar = _progress(steps, position["step_in_iteration"], f"{config.method} iter {iteration}",
                        config.progress and dist.main)
        model.train()
        while position["step_in_iteration"] < steps:
            step = position["step_in_iteration"]
            step_started = time.perf_counter()
            global_index = order[step * config.batch_size:(step + 1) * config.batch_size]
            global_rows = [rows[i] for i in global_index]
            num_tokens = max(1, _count_targets(global_rows))
            mine, my_index = global_rows[dist.rank::dist.world], global_index[dist.rank::dist.world]
            optimizer.zero_grad(set_to_none=True)
            total_loss, mixed_count, eligible_count = 0.0, 0, 0
            for start in range(0, len(mine), micro):
                chunk = mine[start:start + micro]
                batch = pack_rows(chunk) if config.packing else collate(
                    chunk, pad_id=_pad_id(tokenizer))
                batch = {k: v.to(device) for k, v in batch.items()}
                # per-row seeds: a row mixes alike at any world size and micro-batch size (a packed
                # micro-batch is one row: its seed follows the rows packed into it)
                index = my_index[start:start + micro]
                mix_seed = _row_mix_seeds(config.seed, iteration, step, [tuple(index)] if config.packing
                                          else index).to(device) if "alt_ids" in batch else None
                with autocast:
                    loss_sum, mixed = trainable(batch, mix_seed, config.beta)
                # the loss of the whole step is sum / num_tokens; DDP/FSDP average over ranks
                (loss_sum * (dist.world / num_tokens)).backward()
                total_loss += loss_sum.detach()
                if mixed is not None:  # summed on device; read once per step below
                    mixed_count = mixed_count + mixed.sum()
                    eligible_count = eligible_count + batch["eligible"].sum()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            position["step_in_iteration"] += 1
            position["global_step"] += 1
            if dist.world > 1:
                total_loss = total_loss.clone()
                torch.distributed.all_reduce(total_loss)
            loss_value = float(total_loss) / num_tokens
            seconds = time.perf_counter() - step_started
            record = dict(event="step", iteration=iteration, step=position["global_step"],
                          loss=loss_value, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                          tokens=num_tokens, tokens_per_s=num_tokens / seconds,
                          peak_memory_mb=_peak_memory_mb(device))
            if torch.is_tensor(eligible_count) and int(eligible_count):
                record["mixed_fraction"] = int(mixed_count) / int(eligible_count)
            if position["global_step"] % config.log_every == 0 or step == steps - 1:
                log(record)
            bar(f"loss {loss_value:.4f}")
            if out and config.save_every and position["global_step"] % config.save_every == 0:
                _save(out, model, tokenizer, optimizer, scheduler, position, rows, config, dist)
            if on_step is not None:
                on_step(record)
        bar(None)
        phase_seconds["train"] += time.perf_counter() - started
        position = {"iteration": iteration + 1, "step_in_iteration": 0,
                    "global_step": position["global_step"]}
        rows = None
        if out:
            _save(out, model, tokenizer, optimizer, scheduler, position, rows, config, dist)
        if on_iteration_end is not None:
            on_iteration_end(iteration, model)
    summary = dict(event="summary", method=config.method, steps=position["global_step"],
                   offline_seconds=phase_seconds["offline"], train_seconds=phase_seconds["train"])
    log(summary)
    if out:
        final_state = _full_model_state(model, config, dist)
        if dist.main:
            model.save_pretrained(os.path.join(out, "final"), state_dict=final_state)
            if tokenizer is not None:
                tokenizer.save_pretrained(os.path.join(out, "final"))
    return TrainResult(model, position["global_step"], metrics_path, phase_seconds)


def packing_supported(model) -> bool:
    """Whether packed rows (gapfix.data.pack_rows: no attention mask, position_ids restarting at 0
    per example) keep their examples apart in `model`'s attention.

    FlashAttention-2/3 read the restarts as varlen boundaries. sdpa, eager and flex attention do
    where the model builds its mask with transformers.masking_utils.create_causal_mask and that
    module detects packed sequences from position_ids when no attention mask and no KV cache are
    given (find_packed_sequence_indices; transformers 5.x): then the mask is block-diagonal. The
    forward must pass use_cache=False (CausalLMLoss does; with a cache the detection is skipped).
    """
    import importlib
    import sys

    inner = unwrap_model(model)
    attention = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if attention in ("flash_attention_2", "flash_attention_3"):
        return True
    if attention not in ("sdpa", "eager", "flex_attention"):
        return False
    try:
        masking = importlib.import_module("transformers.masking_utils")
    except ImportError:
        return False
    if not hasattr(masking, "find_packed_sequence_indices"):
        return False
    module = sys.modules.get(type(inner).__module__)
    return getattr(module, "create_causal_mask", None) is getattr(masking, "create_causal_mask", False)


def _sharded(config, dist):
    return dist.world > 1 and config.distributed == "fsdp"


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _full_model_state(model, config, dist):
    """The gathered state dict under FSDP (collective: every rank calls it); None otherwise."""
    if not _sharded(config, dist):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_state_options())


def _save(out, model, tokenizer, optimizer, scheduler, position, rows, config, dist):
    model_state, optimizer_state = _full_model_state(model, config, dist), None
    if _sharded(config, dist):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    if dist.main:
        ckpt.save_checkpoint(out, model=model, tokenizer=tokenizer,
                             optimizer_state=optimizer_state or optimizer.state_dict(),
                             scheduler=scheduler, position=dict(position), rows=rows, config=config,
                             keep=config.keep_checkpoints, model_state=model_state,
                             metrics_bytes=ckpt.metrics_size(os.path.join(out, "metrics.jsonl")))
    dist.barrier()


def _load_optimizer_state(model, optimizer, optimizer_state, config, dist):
    if _sharded(config, dist):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optimizer_state)


def _wrap_distributed(loss_module, config, dist, device):
    if dist.world == 1:
        return loss_module
    if config.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(loss_module, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(loss_module.model):
        fully_shard(layer)
    fully_shard(loss_module)
    return loss_module


def _generation_backend(model, config):
    """vLLM loads a saved folder; a PEFT model saves only its adapter, so it generates with hf."""
    if config.generation_backend == "auto" and unwrap_model(model) is not model:
        return "hf"
    return config.generation_backend


def _decoder_layers(model):
    base = decoder_trunk(model) or model
    for name in ("layers", "h"):
        if hasattr(base, name):
            return list(getattr(base, name))
    return []


def _row_order(num_rows, needed, seed, iteration):
    """Row indices for an iteration: reshuffled epochs, as many as the steps need.
    A pure function of (seed, iteration), so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * 7919 + iteration)
    order = []
    while len(order) < needed:
        order += torch.randperm(num_rows, generator=generator).tolist()
    return order[:needed]


def _mix_seed(seed, iteration, step, rank, micro):
    key = f"{seed}/{iteration}/{step}/{rank}/{micro}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=7).digest(), "little")


def _row_mix_seeds(seed, iteration, step, row_indices):
    """BASH's mixing seeds, one per row: a function of (seed, iteration, step, the row's index in
    the iteration's row table), never of the rank or the micro-batch, as int64 in [0, 2**56)."""
    return torch.tensor([_mix_seed(seed, iteration, step, "row", index) for index in row_indices],
                        dtype=torch.int64)


def _pad_id(tokenizer):
    if tokenizer is None or tokenizer.pad_token_id is None:
        return 0
    return tokenizer.pad_token_id


def _peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # pragma: no cover
        return None
