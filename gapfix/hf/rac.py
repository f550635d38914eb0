"""RAC inside transformers Trainer / TRL SFTTrainer: RacTrainer, RacSFTTrainer, build_rac_dataset.

    trainer = RacTrainer(model=model, args=TrainingArguments(num_train_epochs=3, ...),
                         train_dataset=ds, processing_class=tokenizer, data_collator=collator,
                         rac_config=RacConfig(samples=2, sft_ratio=0.5))
    trainer.train()

One training epoch is one RAC iteration: at its start the model, as it is then,
answers `prompts_per_iteration` prompts of the training rows (gapfix.generate;
the prompts split across ranks in fixed chunks, each chunk seeded from (seed,
iteration, chunk), so the answers do not depend on the world size); every answer
becomes a RAC row (gapfix.methods.rac.build_rac_rows: the answer as input, the
corrections its alignment to the reference owes as labels, Hugging Face
convention), `sft_ratio` SFT rows per RAC row are mixed in (the dataset's own
rows), and the epoch trains on them: `refresh` optimizer steps, or one pass.
One Trainer, one optimizer, one learning-rate schedule, one global step.

A training row is split where its labels start: the prompt is everything before
the last run of trained tokens (labels != -100), the reference answer is that
run. Packed rows have no such split and are refused (SFTConfig(packing=False)).

Logged with the first training step of an iteration: rac_finished (the fraction of
answers that ended with EOS, from their finish reasons), rac_exact_match,
rac_label_agreement, rac_mean_edit_distance, rac_rows. The iteration's rows are
saved in Trainer's checkpoints (gapfix_rac.json), so a resumed run continues the
iteration it stopped in on the same rows.

With vLLM under torchrun every rank generates on its process's colocated engine
(gapfix.generation.colocate): each iteration pushes the trained weights into it in
memory before generating, and puts it to sleep after, where the platform can.
"""
from __future__ import annotations

import math
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from transformers import Trainer

from gapfix.hf._common import (
    checked_config,
    checkpoint_dir,
    rank_and_world,
    read_json,
    refuse_fsdp,
    require_dataset,
    sft_trainer_class,
    step_seed,
    write_json,
)
from gapfix.hf.config import RacConfig

if TYPE_CHECKING:  # annotations only
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["RacTrainer", "build_rac_dataset"]

STATE_FILE = "gapfix_rac.json"
_GENERATION_CHUNK = 8  # prompts per generation chunk when RacConfig.generation_batch_size is None


def _split(input_ids: Sequence[int], labels: Sequence[int], index: int) -> tuple[list[int], list[int]]:
    """(prompt, reference) of a training row: the last run of labels != -100 is the answer."""
    trained = [i for i, lab in enumerate(labels) if lab != -100]
    if not trained:
        raise ValueError(f"train_dataset row {index} has no trained token (labels all -100)")
    stop = trained[-1] + 1
    start = stop
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    if start == 0:
        raise ValueError(f"train_dataset row {index} has no prompt (every token is trained): RAC needs "
                         "prompt/answer rows (labels -100 on the prompt, or TRL's completion_only_loss)")
    return list(input_ids[:start]), list(input_ids[start:stop])


class _Sources:
    """The training rows as (prompt, reference) pairs and as SFT rows."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        columns = dataset.column_names
        if "seq_lengths" in columns:
            raise ValueError("train_dataset is packed; RAC needs one prompt/answer per row (packing=False)")
        if "input_ids" not in columns or "labels" not in columns:
            raise ValueError(f"train_dataset must have input_ids and labels columns, it has {columns}")
        ids, labels = dataset["input_ids"], dataset["labels"]
        self.sft_rows = [{"input_ids": list(i), "labels": list(lab)} for i, lab in zip(ids, labels)]
        self.pairs = [_split(i, lab, n) for n, (i, lab) in enumerate(zip(ids, labels))]

    def __len__(self) -> int:
        return len(self.pairs)


def _resolve_backend(backend: str, model: torch.nn.Module) -> str:
    if backend != "auto":
        return backend
    from gapfix.generation import vllm_available

    on_gpu = next(model.parameters()).device.type == "cuda"
    return "vllm" if on_gpu and vllm_available() else "hf"


def _colocated(model: torch.nn.Module, config: RacConfig, backend: str):
    """This process's colocated vLLM engine (gapfix.generation.colocate) when a torchrun job generates
    with vLLM, else None: an ordinary engine would hang there (vllm_backend.in_distributed_job).
    Every rank makes it (a collective). backend "auto" falls back to transformers (None) where
    vLLM refuses the model."""
    from gapfix.generation.colocate import colocated_engine, world_position

    tp = config.vllm_tensor_parallel_size
    if backend != "vllm":
        return None
    if not world_position()[2]:
        if tp > 1:
            raise ValueError(f"RacConfig.vllm_tensor_parallel_size {tp} needs torchrun (one process per "
                             "rank of the group)")
        return None
    return colocated_engine(model, tensor_parallel_size=tp,
                            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                            fall_back=config.backend == "auto")


def iteration_rows(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sources: _Sources,
                   config: RacConfig, *, seed: int, iteration: int, rank: int = 0, world: int = 1,
                   gather: Callable[[dict], list] | None = None) -> tuple[list[dict], dict, list[str]]:
    """(rows, stats, answers) of one RAC iteration: rows in the Hugging Face convention (RAC rows
    and SFT rows mixed and shuffled), build_rac_rows' stats, and the Generation objects."""
    from gapfix.generation import Generation, generate
    from gapfix.generation.colocate import tp_share, world_position
    from gapfix.methods.rac import (
        answer_stop_ids,
        build_rac_rows_to_ends,
        mix_with_sft,
        reference_ends,
    )

    order = list(range(len(sources)))
    random.Random(step_seed(seed, iteration, 0)).shuffle(order)
    chosen = order[: config.prompts_per_iteration or len(order)]
    chunk = config.generation_batch_size or _GENERATION_CHUNK
    chunks = [chosen[i:i + chunk] for i in range(0, len(chosen), chunk)]
    backend = _resolve_backend(config.backend, model)
    # the token each reference ends with (a chat template's end-of-turn, else EOS): RAC labels it,
    # and generation stops on it
    ends = dict(zip(chosen, reference_ends([sources.pairs[i][1] for i in chosen], tokenizer,
                                           answer_stop_ids(model, tokenizer))))
    stops = [end for _, end in ends.values()]
    engine = _colocated(model, config, backend)
    if backend == "vllm" and engine is None and world_position()[2]:
        backend = "hf"  # "auto", and vLLM refused the model (colocated_engine warned)
    mine = {}
    if engine is not None and engine.tensor_parallel_size > 1:
        # the ranks of a group feed their shared engine the same chunks in the same calls; one keeps them
        share = tp_share(rank, world, engine.tensor_parallel_size, len(chunks))
        assigned, keeps = share.chunks, share.writes
    else:
        assigned, keeps = range(rank, len(chunks), world), True
    if engine is not None:
        engine.begin(model)  # every rank: the trained weights, in memory (through DDP; LoRA merged)
    try:
        for c in assigned:
            prompts = [sources.pairs[i][0] for i in chunks[c]]
            answers = [(g.token_ids, g.finish_reason, g.stop_token_id) for g in generate(
                model, prompts, tokenizer=tokenizer, n=config.samples, temperature=config.temperature,
                max_new_tokens=config.max_new_tokens, seed=step_seed(seed, iteration, c + 1),
                backend=engine if engine is not None else backend, stop_token_ids=stops)]
            if keeps:
                mine[c] = answers
    finally:
        if engine is not None:
            engine.end()  # its device memory goes back to training, where vLLM can sleep
    results = {}
    for part in (gather(mine) if gather is not None else [mine]):
        results.update(part)
    pad = getattr(tokenizer, "pad_token_id", None)
    prompts, generated, references, reference_end, reasons = [], [], [], [], []
    for c, members in enumerate(chunks):
        for k, (tokens, reason, stop) in enumerate(results[c]):
            source = members[k // config.samples]
            prompt, reference = sources.pairs[source]
            prompts.append(prompt)
            generated.append(Generation(len(prompts) - 1, 0, list(tokens), reason, stop_token_id=stop))
            references.append(reference)
            reference_end.append(ends[source])
            reasons.append(reason)
    rows, stats = build_rac_rows_to_ends(prompts, generated, references, reference_end, pad_id=pad,
                                         mode=config.mode)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]  # Hugging Face convention
    for row, reason in zip(rows, reasons):
        row["finish_reason"] = reason
    sft = [{**r, "finish_reason": ""} for r in sources.sft_rows]
    mixed = mix_with_sft(rows, sft, config.sft_ratio, step_seed(seed, iteration, 2**31))
    return mixed, stats, reasons


def build_rac_dataset(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                      dataset: datasets.Dataset, *,
                      config: RacConfig | None = None, seed: int = 0, iteration: int = 0) -> datasets.Dataset:
    """One RAC iteration as a datasets.Dataset, for users who schedule iterations themselves.

    dataset: tokenized rows with input_ids and labels (Hugging Face convention, -100 on the
    prompt). Returns rows with input_ids, labels (HF convention) and finish_reason ("eos" /
    "length" for RAC rows, "" for the SFT rows mixed in at config.sft_ratio).
    """
    import datasets

    config = RacConfig() if config is None else config
    if not isinstance(config, RacConfig):
        raise ValueError(f"config must be a gapfix.hf.RacConfig, got {type(config).__name__}")
    rows, _, _ = iteration_rows(model, tokenizer, _Sources(dataset), config, seed=seed, iteration=iteration)
    return datasets.Dataset.from_list(rows)


class _RacStream(torch.utils.data.IterableDataset):
    """This rank's micro-batches of one iteration per pass (one Trainer epoch)."""

    def __init__(self, trainer: _RacMixin) -> None:
        self.trainer = trainer

    def __len__(self) -> int:
        return self.trainer._rac_steps_per_iteration() * self.trainer.args.gradient_accumulation_steps

    def __iter__(self) -> Iterator[dict]:
        trainer = self.trainer
        args = trainer.args
        rank, world = rank_and_world(trainer)
        steps = trainer._rac_steps_per_iteration()
        iteration = trainer.state.global_step // steps
        rows = trainer._rac_rows_for(iteration)
        per_rank = args.per_device_train_batch_size
        order = list(range(len(rows)))
        for micro in range(len(self)):
            first = (micro * world + rank) * per_rank
            batch = [rows[order[(first + i) % len(rows)]] for i in range(per_rank)]
            yield trainer.data_collator([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in batch])


class _RacMixin:
    """RAC on top of a Trainer class (transformers.Trainer or trl.SFTTrainer)."""

    def __init__(self, *args: Any, rac_config: RacConfig | None = None, **kwargs: Any) -> None:
        rac_config = checked_config("rac_config", rac_config, RacConfig)
        from gapfix.hf.trl_head import serve_trl_head

        with serve_trl_head():  # under trl.SFTTrainer, TRL's fused head runs on gapfix's kernel
            super().__init__(*args, **kwargs)
        self.rac_config = rac_config
        self._rac_sources = _Sources(require_dataset(self, "of prompt/answer rows"))
        if self.processing_class is None or getattr(self.processing_class, "eos_token_id", None) is None:
            raise ValueError("processing_class must be the tokenizer (RAC needs its eos_token_id and pad_token_id)")
        self._rac_iteration = None
        self._rac_rows = None
        self._rac_pending_stats = None
        self.rac_history = []  # stats of every iteration this trainer generated

    def _rac_rows_per_iteration(self) -> int:
        prompts = min(self.rac_config.prompts_per_iteration or len(self._rac_sources), len(self._rac_sources))
        rac = prompts * self.rac_config.samples
        return rac + round(self.rac_config.sft_ratio * rac)

    def _rac_steps_per_iteration(self) -> int:
        if self.rac_config.refresh is not None:
            return self.rac_config.refresh
        _, world = rank_and_world(self)
        global_batch = self.args.per_device_train_batch_size * world * self.args.gradient_accumulation_steps
        return max(1, math.ceil(self._rac_rows_per_iteration() / global_batch))

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_RacStream(self), batch_size=None, num_workers=0)

    def _rac_gather(self, mine: dict) -> list:
        if rank_and_world(self)[1] > 1 and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, mine)  # lists of ints and strings between our ranks
            return parts
        return [mine]

    def _rac_rows_for(self, iteration: int) -> list:
        if self._rac_iteration != iteration:
            refuse_fsdp(self, "RAC generation")
            rank, world = rank_and_world(self)
            rows, stats, _ = iteration_rows(self.model, self.processing_class, self._rac_sources, self.rac_config,
                                            seed=self.args.seed, iteration=iteration, rank=rank, world=world,
                                            gather=self._rac_gather)
            stats = {**stats, "iteration": iteration}
            self._rac_iteration, self._rac_rows, self._rac_pending_stats = iteration, rows, stats
            self.rac_history.append(stats)
        return self._rac_rows

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._rac_pending_stats is not None:
            for key in ("finished", "exact_match", "label_agreement", "mean_edit_distance", "rows"):
                logs[f"rac_{key}"] = self._rac_pending_stats[key]
            self._rac_pending_stats = None
        return super().log(logs, start_time)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self._rac_rows is None or not self.args.should_save:
            return
        folder = checkpoint_dir(self, trial)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / STATE_FILE, {"iteration": self._rac_iteration, "config": self.rac_config.to_dict(),
                                         "rows": self._rac_rows})

    def _load_from_checkpoint(self, resume_from_checkpoint: str,
                              model: torch.nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / STATE_FILE
        if not path.is_file():
            warnings.warn(f"{path.parent} holds no RAC rows ({STATE_FILE}): the iteration is generated again "
                          "with the resumed weights", stacklevel=2)
            return
        state = read_json(path)
        saved = state.get("config")
        if isinstance(saved, dict):  # a field added since the checkpoint was saved has its default there
            saved = {**{k: v for k, v in RacConfig().to_dict().items() if k not in saved}, **saved}
        if saved != self.rac_config.to_dict():
            raise ValueError(f"{path}: line 1: saved with RacConfig {state.get('config')}, "
                             f"resumed with {self.rac_config.to_dict()}")
        rows = state.get("rows")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("input_ids"), list)
                                                 and isinstance(r.get("labels"), list) for r in rows):
            raise ValueError(f"{path}: line 1: 'rows' must be a list of {{input_ids, labels}} objects")
        self._rac_iteration, self._rac_rows = int(state["iteration"]), rows


class RacTrainer(_RacMixin, Trainer):
    """transformers.Trainer with RAC: RacTrainer(..., processing_class=tokenizer, rac_config=RacConfig())."""


def __getattr__(name: str) -> type:
    if name == "RacSFTTrainer":  # built on first use, so that importing this module never imports trl
        doc = "trl.SFTTrainer with RAC: RacSFTTrainer(..., rac_config=RacConfig())."
        cls = globals()[name] = sft_trainer_class(name, _RacMixin, __name__, doc)
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
