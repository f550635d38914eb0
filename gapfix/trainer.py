"""The reference trainer: SFT, BASH and RAC over iterations.

An iteration is an offline phase with the current model frozen, then training.
What a method builds offline, how many rows it yields, which batch fields they add
and what its loss reads is the method's (gapfix.methods.base.Method; the built-in
ones are SFT, BASH and RAC in gapfix/methods/); this module names none of them.

The offline phase is split across ranks: rank r of N builds its share of the rows
and writes it as an Arrow shard under `<out>/iterations/iterNNN/` (without out_dir,
a temporary folder, removed when train() returns; under torchrun without out_dir
that folder must be on storage every rank sees, as it is on one machine); every rank
then reads the union, memory-mapped (gapfix.data.arrow.RowTable). Seeds come from
the example, never the rank, so any N builds the same rows. Under FSDP the offline
phase runs on a whole copy of the model on every rank (_OfflineReplica: its forwards
are local, so ranks may run different numbers of them), split across ranks as under
DDP. An iteration's folder is removed when the iteration ends, unless a kept checkpoint
(keep_checkpoints) still refers to it.

The loss is gapfix.linear_cross_entropy on the final hidden states, so the full
logits never exist; `fused=False` switches every op to its PyTorch reference.
Gradient accumulation divides by the true number of trained tokens of the
whole optimizer step (every rank knows the global batch, so no all-reduce is
needed for it). Under torchrun the model runs under DDP or FSDP2 (gloo on CPU,
NCCL on GPU); every rank draws the same global batch and takes its share, and starts
from rank 0's weights (DDP broadcasts them; before fully_shard, _broadcast_from_rank0 does).
Dropout masks (a PEFT adapter's lora_dropout) are drawn per rank's micro-batch: with
dropout, N processes match one in distribution only.

Checkpoints (gapfix.checkpoint) are directories written whole and then published
by atomically replacing a `latest` pointer, so a failed save (disk full) leaves the
previous checkpoint valid. A checkpoint holds the model, optimizer, scheduler, RNG
states, a reference to the iteration's row files (path inside out_dir, row count,
content hash) and the position in them, as data only (JSON and safetensors): its
size does not grow with the dataset, resume is exact, and never runs code from a file.
"""
import contextlib
import dataclasses
import gc
import itertools
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch

from gapfix import checkpoint as ckpt
from gapfix._progress import step_progress as _progress
from gapfix.checkpoint import latest_checkpoint, load_checkpoint, model_fingerprint  # noqa: F401 (API)
from gapfix.data import IGNORE_INDEX, collate, label_field, pack_rows
from gapfix.data.arrow import check_token_ids
from gapfix.methods.base import (
    OfflineContext,
    check_number,
    flag_fields,
    get_method,
    method_for_batch,
    method_names,
    setting,
)
from gapfix.methods.bash import mixing_seeds
from gapfix.models import decoder_trunk, unwrap_model
from gapfix.outdir import claims_out_dir, open_file

METHODS = method_names()  # the built-in ones; gapfix.methods.base.register adds more


MAX_EPOCHS_PER_ITERATION = 10_000.0  # the steps of an iteration are epochs x rows / batch_size


@dataclass
class _RunSettings:
    """The settings of the reference trainer that belong to no one method."""

    method: str = setting("sft", 'sft, bash, rac, or a registered method')
    iterations: int = setting(1, 'offline phase + training rounds')
    steps_per_iteration: Optional[int] = setting(
        None, "optimizer steps per iteration (unset: --epochs-per-iteration over the rows)")
    epochs_per_iteration: float = setting(1.0, "passes over the iteration's rows when --steps-per-iteration is unset")
    batch_size: int = setting(32, 'rows per optimizer step, over all ranks')
    micro_batch_size: Optional[int] = setting(None, "rows per forward on one rank (unset: the rank's whole share)")
    lr: float = setting(1e-3, 'peak learning rate (AdamW)')
    min_lr_ratio: float = setting(0.1, 'the cosine schedule decays to lr * this')
    warmup_steps: int = setting(0, 'linear warm-up steps')
    weight_decay: float = setting(0.0, 'AdamW weight decay')
    max_grad_norm: float = setting(1.0, 'gradient clipping norm')
    fused: bool = setting(True, "false: every op's pure-PyTorch reference instead of the fused kernels")
    # the loss's options (gapfix.lm_loss, the same loss as gapfix.hf.patch)
    label_smoothing: float = setting(0.0, "loss: label smoothing eps in [0, 1]")
    z_loss: float = setting(0.0, "loss: weight of the z-loss (lse^2) term")
    loss_chunk_size: Optional[int] = setting(None, "loss: rows per chunk of the CPU path (unset: about 2**24 / "
                                             "vocabulary)")
    loss_filter_eps: Optional[float] = setting(None, "loss: Triton path's gradient filter threshold (unset: off)")
    loss_grad_weight_dtype: Optional[str] = setting(None, "loss: Triton path's lm-head gradient accumulator dtype: "
                                                    "float32, bfloat16 or float16")
    seed: int = setting(0, 'seed of the initial weights, the row order, BASH masks and RAC sampling')
    device: str = setting("auto", 'auto (the GPU where there is one), cpu, cuda, cuda:N')
    bf16: bool = setting(True, 'bf16 autocast on a GPU')
    packing: bool = setting(False, 'one packed row per micro-batch (FlashAttention varlen only)')
    distributed: str = setting("ddp", 'under torchrun: ddp or fsdp')
    out_dir: Optional[str] = setting(None, 'output folder')
    save_every: int = setting(0, 'checkpoint every N steps (0: only at the end of each iteration)')
    keep_checkpoints: int = setting(1, 'checkpoints kept in --out')
    log_every: int = setting(10, 'metrics.jsonl gets a step record every N steps')
    progress: bool = setting(True, "progress bars (false also silences transformers' loading/saving bars)")

    def validate(self):
        get_method(self.method)  # refuses an unknown name, listing the registered ones
        for name in method_names():  # every method checks its own fields, whichever method runs
            get_method(name).validate(self)
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"distributed must be ddp or fsdp, got {self.distributed!r}")
        for name in ("iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_iteration is not None and self.steps_per_iteration < 1:
            raise ValueError(f"steps_per_iteration must be >= 1, got {self.steps_per_iteration}")
        check_number("epochs_per_iteration", self.epochs_per_iteration, 0.0, MAX_EPOCHS_PER_ITERATION,
                     open_low=True)
        loss_options(self)


def _method_settings() -> list:
    """The TrainConfig fields of the built-in methods' config dataclasses (one per flag)."""
    from gapfix.methods.bash import BashConfig
    from gapfix.methods.rac import RacConfig

    return flag_fields(BashConfig) + flag_fields(RacConfig)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", _method_settings(), bases=(_RunSettings,),
    namespace={"__module__": __name__,
               "__doc__": "The reference trainer's settings: its own (_RunSettings) and each built-in "
               "method's, by flag name (gapfix.methods.bash.BashConfig, gapfix.methods.rac.RacConfig); "
               "`gapfix train` has a flag per field."})

_GRAD_WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def loss_options(config) -> dict:
    """The loss options of a TrainConfig, checked (ValueError naming the setting)."""
    from gapfix.lm_loss import check_loss_options

    dtype = config.loss_grad_weight_dtype
    if dtype is not None and dtype not in _GRAD_WEIGHT_DTYPES:
        raise ValueError(f"loss_grad_weight_dtype must be one of {sorted(_GRAD_WEIGHT_DTYPES)}, got {dtype!r}")
    options = {"label_smoothing": config.label_smoothing, "z_loss": config.z_loss,
               "chunk_size": config.loss_chunk_size, "filter_eps": config.loss_filter_eps,
               "grad_weight_dtype": None if dtype is None else _GRAD_WEIGHT_DTYPES[dtype]}
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return check_loss_options(options)
    except ValueError as error:
        names = {"chunk_size": "loss_chunk_size", "filter_eps": "loss_filter_eps"}
        message = str(error)
        for old, new in names.items():
            message = message.replace(old, new)
        raise ValueError(message) from None


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


def leave_process_group() -> None:
    """Ends this process's part in a torchrun job that finished: waits for every rank, then destroys
    the process group while the interpreter is whole (no-op outside a job). A DDP wrapper sits in a
    reference cycle and holds the group through its reducer; left to interpreter teardown, gloo's
    threads can then abort a run that succeeded ("terminate called without an active exception",
    about 1 run in 30 here) and NCCL warns. Call it on success only: a rank that failed must not
    wait in a collective for the others."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()  # frees wrappers in reference cycles, so that destroying drops the group's last reference
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


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
        loss_sum, stats = loss_module(batch, mix_seed=step, beta=0.3)

    Wrap this module, not the model, in DDP (or FSDP2): DDP synchronises gradients
    only for what runs inside the wrapped module's forward, and here the BASH
    mixing, the trunk and the output head all do. The logits are never formed
    (fused linear cross-entropy, with the model's own logit scaling and softcap).

    batch: input_ids (B, T); attention_mask or position_ids (packed rows); labels
    aligned with input_ids (HF convention; the loss shifts), or shift_labels, or
    soft target_ids / target_weights (aligned); plus the fields a method adds
    (BASH: alt_ids, eligible, alt_probs), turned into the trunk's inputs by that
    method's model_inputs with the keyword arguments given to forward (BASH:
    mix_seed, beta). Returns the summed loss (divide by the step's trained-token
    count) and the method's step statistics {name: (numerator, denominator)} or
    None. model may be wrapped by PEFT.
    """

    def __init__(self, model, fused: bool = True, method=None, loss_options=None):
        from gapfix.lm_loss import check_loss_options

        super().__init__()
        self.model = model
        self.fused = fused
        self.method = method  # a gapfix.methods Method; None: found from the batch's fields
        # label_smoothing, z_loss, ... (gapfix.lm_loss.LOSS_OPTIONS); impl follows `fused`
        self.loss_options = check_loss_options(dict(loss_options or {}))

    def forward(self, batch, **loss_inputs):
        from gapfix.lm_loss import causal_lm_loss
        from gapfix.models import decoder_trunk

        impl = "auto" if self.fused else "torch"
        kwargs = {"use_cache": False}  # a cache would also turn off transformers' packed-sequence masks
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        if "position_ids" in batch:
            kwargs["position_ids"] = batch["position_ids"]
        method = self.method if self.method is not None else method_for_batch(batch)
        if method is None:
            inputs, stats = {"input_ids": batch["input_ids"]}, None
        else:
            inputs, stats = method.model_inputs(self.model, batch, impl=impl, **loss_inputs)
        kwargs.update(inputs)
        trunk = decoder_trunk(self.model)
        if trunk is None:
            raise ValueError(f"model: {type(self.model).__name__} has no separate trunk (base_model)")
        hidden = trunk(**kwargs).last_hidden_state.flatten(0, 1)
        options = {"impl": impl, **self.loss_options, "ignore_index": IGNORE_INDEX}
        # the (N, V) logits are never formed (a LoRA-wrapped head forms its own)
        loss = causal_lm_loss(self.model, hidden, shifted_targets(batch), reduction="sum", **options)
        return loss, stats


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


# ---------------------------------------------------------------- offline phase


class _RowFolders:
    """Where each iteration's row files live: `<out>/iterations/iterNNN/`, or, without out_dir,
    a temporary folder made by rank 0 (its path broadcast) and removed by `close`."""

    def __init__(self, out: Optional[str], dist: "_Dist"):
        self.dist, self.temporary = dist, None
        if out:
            self.root = os.path.join(out, "iterations")
            return
        path = [tempfile.mkdtemp(prefix="gapfix-rows-") if dist.main else None]
        if dist.world > 1:
            torch.distributed.broadcast_object_list(path, src=0)
        self.root = self.temporary = path[0]

    def folder(self, iteration: int) -> str:
        return os.path.join(self.root, f"iter{iteration:03d}")

    def close(self, wait: bool = True) -> None:
        """Removes the temporary folder (after every rank is done with it, unless not `wait`)."""
        if wait:
            self.dist.barrier()
        if self.temporary and self.dist.main:
            shutil.rmtree(self.temporary, ignore_errors=True)


def _all_reduce_sum(dist, device):
    def reduce(values):
        if dist.world == 1:
            return list(values)
        # gloo sums float64 on the CPU; NCCL needs the values on the GPU
        where = device if device.type == "cuda" else torch.device("cpu")
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=where)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    return reduce


def offline_phase(method, model, tokenizer, examples, config, iteration, device, dist, folders, log,
                  trained_rows):
    """Builds the iteration's rows with the current model frozen: each rank its share, then every
    rank opens the union. Returns (RowTable, the rows' files, the method's statistics, this
    rank's counters)."""
    from gapfix.data.arrow import RowTable

    folder = folders.folder(iteration)
    rank, world, barrier, reduce = dist.rank, dist.world, dist.barrier, _all_reduce_sum(dist, device)
    if dist.main:  # rebuilt from scratch: nothing of an earlier (killed) build is read
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    os.makedirs(folder, exist_ok=True)
    ctx = OfflineContext(model=model, tokenizer=tokenizer, examples=examples, config=config,
                         iteration=iteration, device=device, rank=rank, world=world, folder=folder,
                         log=log, trained_rows=trained_rows, barrier=barrier, all_reduce=reduce)
    stats = method.build_shard(ctx) or {}
    ctx.barrier()
    paths = method.finish(ctx)
    table = RowTable.open(paths, expected_rows=method.num_rows(len(examples), config))
    return table, paths, stats, ctx.counters


def build_rows(method, model, tokenizer, examples, config, iteration=0, device="cpu", log=None) -> list:
    """The rows of one offline phase of `method` (a name) as a list of dicts, built in a temporary
    folder by this process alone (a helper for tests and inspection; train() streams them)."""
    import types

    config = dataclasses.replace(config, method=method)
    config.validate()
    runner = get_method(method)
    device = torch.device(device)
    dist = types.SimpleNamespace(rank=0, world=1, main=True, barrier=lambda: None)
    with tempfile.TemporaryDirectory(prefix="gapfix-rows-") as root:
        folders = types.SimpleNamespace(folder=lambda i: os.path.join(root, f"iter{i:03d}"))
        table, _, _, _ = offline_phase(runner, model, tokenizer, examples, config, iteration, device, dist,
                                       folders, log or (lambda record: None),
                                       lambda n: list(range(n)))
        return table.gather(range(len(table)))


# ---------------------------------------------------------------- training


@claims_out_dir  # one run at a time per out_dir, and no symbolic link in it
def train(model, tokenizer, train_examples, config: Optional[TrainConfig] = None,
          *, resume: bool = True, resume_with_changed_config: bool = False, on_iteration_end=None,
          on_step=None, **overrides) -> TrainResult:
    """Trains `model` (a transformers causal LM) in place with config.method.

    train_examples: a sequence of gapfix.data.Example, or a tokenized datasets.Dataset
    (gapfix.data.arrow.load_tokenized), read memory-mapped.
    `overrides` set TrainConfig fields (``train(..., method="bash", beta=0.2)``).
    `on_iteration_end(iteration, model)` runs after each iteration (evaluation), on every rank;
    under FSDP `model` is a whole copy of the trained model, gathered for the call (collective).
    `on_step(record)` after each optimizer step, with the step's metrics.
    With config.out_dir set, writes metrics.jsonl, the iterations' rows, checkpoints and the
    final model, and resumes from the latest checkpoint there when `resume` is true (see
    gapfix.checkpoint; a checkpoint of a run with other settings is refused unless
    resume_with_changed_config).
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    config.validate()
    method = get_method(config.method)
    examples = _example_sequence(train_examples)
    if not len(examples):
        raise ValueError("train_examples is empty")
    check_token_ids(examples, model, "train_examples")  # once, for every method: no IndexError mid-step
    _check_packing(model, config)
    device = _pick_device(config.device)
    dist = _Dist(device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model.to(device)
    run = _Run(model, tokenizer, examples, config, method, device, dist)
    try:
        run.start(resume, resume_with_changed_config, whole_after_iteration=on_iteration_end is not None)
        while run.position["iteration"] < config.iterations:
            iteration = run.position["iteration"]
            if run.rows is None:
                run.build_rows(iteration)
            run.train_iteration(iteration, on_step)
            if on_iteration_end is not None:
                with run.whole_model() as whole:
                    on_iteration_end(iteration, whole)
    except BaseException:
        run.folders.close(wait=False)  # a failing rank must not wait for the others
        raise
    run.folders.close()
    return run.finish()


def _example_sequence(train_examples):
    """Examples as a sequence: a tokenized datasets.Dataset is read through an ExampleTable."""
    if hasattr(train_examples, "column_names") and hasattr(train_examples, "with_format"):
        from gapfix.data.arrow import ExampleTable

        return ExampleTable(train_examples)
    return train_examples


def _check_packing(model, config):
    if config.packing and not packing_supported(model):
        attention = getattr(unwrap_model(model).config, "_attn_implementation", None)
        raise ValueError(
            f"packing needs attention that keeps packed examples apart given position_ids that restart "
            f"per example (flash_attention_2/3, or sdpa/eager/flex in a transformers whose masks read "
            f"packed sequences from position_ids); the model uses {attention!r} in "
            f"{type(unwrap_model(model)).__module__}, under which packed examples would attend to each other")


class _Run:
    """One train() call's state: the optimizer, schedule and position; the iteration's rows."""

    def __init__(self, model, tokenizer, examples, config, method, device, dist):
        self.model, self.tokenizer, self.examples, self.config = model, tokenizer, examples, config
        self.method, self.device, self.dist = method, device, dist
        self.out = config.out_dir
        self.metrics_path = None
        if self.out and dist.main:
            os.makedirs(self.out, exist_ok=True)
            self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.rows_per_rank = config.batch_size // dist.world
        if self.rows_per_rank * dist.world != config.batch_size:
            raise ValueError(f"batch_size {config.batch_size} must be a multiple of the world size "
                             f"{dist.world}")
        self.micro = config.micro_batch_size or self.rows_per_rank
        self.position = {"iteration": 0, "step_in_iteration": 0, "global_step": 0}
        self.rows, self.rows_reference = None, None
        self.phase_seconds = {"offline": 0.0, "train": 0.0}
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.bf16
                         else contextlib.nullcontext())
        self.folders = _RowFolders(self.out, dist)

    def log(self, record):
        if self.metrics_path:
            with open_file(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def steps_for(self, num_rows):
        if self.config.steps_per_iteration:
            return self.config.steps_per_iteration
        return max(1, int(self.config.epochs_per_iteration * num_rows // self.config.batch_size))

    def start(self, resume, resume_with_changed_config, whole_after_iteration=False):
        """Optimizer and schedule, restored from the latest checkpoint where there is one."""
        config, model, dist = self.config, self.model, self.dist
        state = None
        checkpoint = latest_checkpoint(self.out) if (self.out and resume) else None
        if checkpoint:  # weights load before any sharding, on every rank
            state = load_checkpoint(checkpoint, model, config=config,
                                    allow_config_change=resume_with_changed_config)
        # a resumed run's log continues from the checkpoint; a run that starts over starts it over
        ckpt.rewind_metrics(self.metrics_path, state.get("metrics_bytes", 0) if state else 0)
        # under FSDP2 an offline phase that runs the model, and on_iteration_end, run it on a whole copy (made
        # before sharding, weightless outside the phase)
        if _sharded(config, dist):
            _broadcast_from_rank0(model)  # DDP does this itself when it wraps; fully_shard does not
        replica = _sharded(config, dist) and (self.method.runs_model or whole_after_iteration)
        self.offline_model = _OfflineReplica(model) if replica else None
        loss_module = CausalLMLoss(model, config.fused, self.method, loss_options(config))
        self.trainable = _wrap_distributed(loss_module, config, dist, self.device)
        self._make_optimizer()
        if state is not None:
            self._restore(state, checkpoint)

    def _make_optimizer(self):
        """AdamW over the trainable parameters and the warm-up + cosine schedule of the whole run."""
        config = self.config
        total_steps = config.iterations * self.steps_for(self.method.num_rows(len(self.examples), config))
        trainable_params = [p for p in self.model.parameters() if p.requires_grad]  # a PEFT model: its adapter
        if not trainable_params:
            raise ValueError("model has no parameter that requires grad: nothing to train (a PEFT adapter "
                             "loaded for inference? load it with is_trainable=True)")
        self.optimizer = torch.optim.AdamW(trainable_params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(config.warmup_steps, total_steps, config.min_lr_ratio))

    def _restore(self, state, checkpoint):
        """The optimizer, schedule, RNG, position and the iteration's rows of a checkpoint's state,
        each checked (ranges, schema, values that restore) and named in a CheckpointError."""
        config, steps = self.config, self.steps_for(self.method.num_rows(len(self.examples), self.config))
        self.position = ckpt.check_position(state, checkpoint, iterations=config.iterations, steps=steps,
                                            exact=not state["config_changes"])
        for field, restore in (
                ("optimizer", lambda: _load_optimizer_state(self.model, self.optimizer, state["optimizer"],
                                                            config, self.dist)),
                ("scheduler", lambda: self.scheduler.load_state_dict(state["scheduler"])),
                ("rng", lambda: ckpt.set_rng_state(state["rng"]))):
            with ckpt.restoring(checkpoint, field):
                restore()
        ckpt.check_restored(self.optimizer, self.scheduler, checkpoint, sharded=_sharded(config, self.dist))
        if state["rows"] is not None:
            expected = self.method.num_rows(len(self.examples), self.config)
            self.rows = ckpt.open_rows(self.out, state["rows"], expected_rows=expected)
            self.rows_reference = state["rows"]
        self.log(dict(event="resume", checkpoint=checkpoint, **self.position,
                      **({"config_changes": state["config_changes"]} if state["config_changes"] else {})))

    def trained_rows(self, iteration):
        """The row indices the steps of `iteration` draw, given the number of rows."""
        return lambda num_rows: _row_order(num_rows, self.steps_for(num_rows) * self.config.batch_size,
                                           self.config.seed, iteration)

    def whole_model(self):
        """The trained model, whole: under FSDP the replica, filled by one gather (every rank enters)."""
        return self.offline_model.gathered(self.model) if self.offline_model else \
            contextlib.nullcontext(self.model)

    def build_rows(self, iteration):
        """The offline phase: the iteration's rows written once, under <out>/iterations/."""
        started = time.perf_counter()
        with self.whole_model() as model:
            self.rows, paths, stats, counters = offline_phase(
                self.method, model, self.tokenizer, self.examples, self.config, iteration, self.device,
                self.dist, self.folders, self.log, self.trained_rows(iteration))
        self.rows_reference = ckpt.rows_reference(self.out, paths, len(self.rows)) if (
            self.out and self.dist.main) else None
        seconds = time.perf_counter() - started
        self.phase_seconds["offline"] += seconds
        self.offline_counters = counters
        self.log(dict(event="offline", iteration=iteration, rows=len(self.rows), **stats, seconds=seconds))

    def train_iteration(self, iteration, on_step):
        config, position = self.config, self.position
        steps = self.steps_for(len(self.rows))
        order = _row_order(len(self.rows), steps * config.batch_size, config.seed, iteration)
        started = time.perf_counter()
        bar = _progress(steps, position["step_in_iteration"], f"{config.method} iter {iteration}",
                        config.progress and self.dist.main)
        self.model.train()
        while position["step_in_iteration"] < steps:
            step = position["step_in_iteration"]
            global_index = order[step * config.batch_size:(step + 1) * config.batch_size]
            record = self.train_step(iteration, step, global_index)
            position["step_in_iteration"] += 1
            position["global_step"] += 1
            record["step"] = position["global_step"]
            if position["global_step"] % config.log_every == 0 or step == steps - 1:
                self.log(record)
            bar(f"loss {record['loss']:.4f}")
            if self.out and config.save_every and position["global_step"] % config.save_every == 0:
                self.save()
            if on_step is not None:
                on_step(record)
        bar(None)
        self.phase_seconds["train"] += time.perf_counter() - started
        self.position = {"iteration": iteration + 1, "step_in_iteration": 0,
                         "global_step": position["global_step"]}
        self.rows, self.rows_reference = None, None
        if self.out:
            self.save()
            if self.dist.main:  # the finished iteration's rows, once no kept checkpoint needs them
                ckpt.prune_rows(self.out)
            self.dist.barrier()

    def micro_step(self, rows, row_index, iteration, step, num_tokens):
        """Forward and backward of one micro-batch of this rank; (its detached summed loss, the
        method's step statistics)."""
        config, device = self.config, self.device
        batch = pack_rows(rows) if config.packing else collate(rows, pad_id=_pad_id(self.tokenizer))
        batch = {k: v.to(device) for k, v in batch.items()}
        # per-row seeds: a row mixes alike at any world size and micro-batch size (a packed
        # micro-batch is one row: its seed follows the rows packed into it)
        seeds = mixing_seeds(config.seed, iteration, step, [tuple(row_index)] if config.packing else row_index
                             ).to(device) if self.method.uses_row_seeds else None
        with self.autocast:
            loss_sum, stats = self.trainable(batch, **self.method.loss_inputs(config, seeds))
        # the loss of the whole step is sum / num_tokens; DDP/FSDP average over ranks
        (loss_sum * (self.dist.world / num_tokens)).backward()
        return loss_sum.detach(), stats

    def train_step(self, iteration, step, global_index):
        """One optimizer step on the global batch `global_index`; its metrics record."""
        config, dist, device = self.config, self.dist, self.device
        step_started = time.perf_counter()
        global_rows = self.rows.gather(global_index)
        num_tokens = max(1, _count_targets(global_rows))
        mine, my_index = global_rows[dist.rank::dist.world], global_index[dist.rank::dist.world]
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, stat_sums = 0.0, {}
        for start in range(0, len(mine), self.micro):
            loss_sum, stats = self.micro_step(mine[start:start + self.micro], my_index[start:start + self.micro],
                                              iteration, step, num_tokens)
            total_loss += loss_sum
            for name, (numerator, denominator) in (stats or {}).items():  # summed on device, read once
                old = stat_sums.get(name, (0, 0))
                stat_sums[name] = (old[0] + numerator, old[1] + denominator)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if dist.world > 1:
            total_loss = total_loss.clone()
            torch.distributed.all_reduce(total_loss)
        loss_value, grad_value = float(total_loss) / num_tokens, float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):  # read for the record anyway
            raise ckpt.NonFiniteTrainingError(
                f"training diverged: the loss is {loss_value}, the gradient norm {grad_value} at global step "
                f"{self.position['global_step'] + 1} (iteration {iteration}, step {step + 1}); stopped, and "
                f"nothing was saved after the last checkpoint; try a lower --lr (now {config.lr:g})")
        seconds = time.perf_counter() - step_started
        record = dict(event="step", iteration=iteration, step=None, loss=loss_value,
                      lr=self.scheduler.get_last_lr()[0], grad_norm=grad_value, tokens=num_tokens,
                      tokens_per_s=num_tokens / seconds, peak_memory_mb=_peak_memory_mb(device))
        for name, (numerator, denominator) in stat_sums.items():
            if int(denominator):
                record[name] = int(numerator) / int(denominator)
        return record

    def save(self):
        ckpt.check_finite_weights(self.model, dist=self.dist, device=self.device, where="the trained model")
        _save(self.out, self.model, self.tokenizer, self.optimizer, self.scheduler, self.position,
              self.rows_reference, self.config, self.dist)

    def finish(self):
        summary = dict(event="summary", method=self.config.method, steps=self.position["global_step"],
                       offline_seconds=self.phase_seconds["offline"],
                       train_seconds=self.phase_seconds["train"])
        self.log(summary)
        if self.out:
            ckpt.check_finite_weights(self.model, dist=self.dist, device=self.device, where="the trained model")
            final_state = _full_model_state(self.model, self.config, self.dist)
            if self.dist.main:
                self.model.save_pretrained(os.path.join(self.out, "final"), state_dict=final_state)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(os.path.join(self.out, "final"))
        return TrainResult(self.model, self.position["global_step"], self.metrics_path, self.phase_seconds)


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


class _OfflineReplica:
    """The offline phase's model under FSDP2: a copy of the model made before fully_shard, whose
    parameters are meta tensors (no memory) except inside `gathered`, which fills them with the
    trained weights, whole on every rank, and empties them again.

    Why not the sharded model itself: its forwards are collective. The root (CausalLMLoss) owns
    the embedding, final norm and head, which are all-gathered only by the root's own forward,
    so a forward of the inner model meets sharded DTensors ("mixed torch.Tensor and DTensor");
    the layers' hooks all-gather per forward, so ranks running different numbers of forwards
    (an uneven share of BASH's chunks, RAC's generate calls of different lengths) would pair
    mismatched collectives; and forwards outside the root's leave FSDP's backward-prefetch
    order (per rank) behind. Here the only collective is one gather of the full state dict per
    offline phase, taken by every rank at the same point; the forwards then are local and give
    the bits of an unsharded model with these weights. Memory: the whole model on every rank
    for the duration of the offline phase (as FSDP's unshard would), released after it."""

    def __init__(self, model):
        import copy

        # the memo maps each parameter to a weightless stand-in: the deep copy allocates nothing for
        # them (a tied parameter stays one), while buffers (rotary tables, not all in the state dict)
        # are copied as they are
        memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                for p in model.parameters()}
        self.module = copy.deepcopy(model, memo)

    @contextlib.contextmanager
    def gathered(self, sharded_model):
        """The replica with `sharded_model`'s weights (collective: every rank enters it together)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(sharded_model, options=StateDictOptions(full_state_dict=True))
        self.module.load_state_dict(state, assign=True)  # keeps requires_grad=False: no graph is built
        del state
        try:
            yield self.module
        finally:
            for module in self.module.modules():  # parameters back to meta: the gathered copy is freed
                for name, param in list(module._parameters.items()):
                    if param is not None:
                        module._parameters[name] = torch.nn.Parameter(
                            torch.empty_like(param, device="meta"), requires_grad=False)


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


def _broadcast_from_rank0(model):
    """Every rank's parameters and buffers made rank 0's (collective), before fully_shard.

    fully_shard keeps each rank's own slice of its local tensors, so ranks that built different
    weights (a PEFT adapter's random lora_A drawn from an unseeded or rank-seeded RNG, any model
    built without a fixed seed) would silently train a model stitched from their inits, one that no
    rank built. DDP broadcasts rank 0's parameters and buffers at wrap time; this gives FSDP the
    same start: the model trained is rank 0's at any world size."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.is_contiguous():
                torch.distributed.broadcast(tensor.detach(), src=0)
            else:  # a collective takes contiguous tensors only
                received = tensor.detach().contiguous()
                torch.distributed.broadcast(received, src=0)
                tensor.copy_(received)


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
    parts, have = [], 0
    while have < needed:  # int64 permutations, cut to what the steps draw before they become a list
        parts.append(torch.randperm(num_rows, generator=generator)[:needed - have])
        have += len(parts[-1])
    return torch.cat(parts).tolist() if parts else []


_row_mix_seeds = mixing_seeds  # BASH's per-row mixing seeds, the rule both drivers follow


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
