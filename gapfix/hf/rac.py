"""RAC inside transformers Trainer / TRL SFTTrainer: RacTrainer, RacSFTTrainer, build_rac_dataset.

    trainer = RacTrainer(model=model, args=TrainingArguments(num_train_epochs=3, ...),
                         train_dataset=ds, processing_class=tokenizer, data_collator=collator,
                         rac_config=RacConfig(samples=2, sft_ratio=0.5))
    trainer.train()

One training epoch is one RAC iteration: at its start the model, as it is then,
answers `prompts_per_iteration` prompts of the training rows, drawn, chunked, seeded
and answered as the reference trainer does (gapfix.methods.rac.answer_chunk: the
same model, data, config and seed give the same rows under either, at any world
size); every answer
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
rac_label_agreement, rac_mean_edit_distance, rac_rows (the RAC rows), rac_sft_rows (the SFT
rows mixed in). The iteration's rows are
saved in Trainer's checkpoints (gapfix_rac.json), so a resumed run continues the
iteration it stopped in on the same rows.

With vLLM under torchrun every rank generates on its process's colocated engine
(gapfix.generation.colocate): each iteration pushes the trained weights into it in
memory before generating, and puts it to sleep after, where the platform can.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from transformers import Trainer

from gapfix.hf._common import (
    checked_config,
    checkpoint_dir,
    load_side_state,
    rank_and_world,
    refuse_fsdp,
    require_dataset,
    resolved_config,
    save_side_state,
    sft_trainer_class,
)
from gapfix.methods.rac import RacConfig

if TYPE_CHECKING:  # annotations only
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["RacTrainer", "build_rac_dataset"]

STATE_FILE = "gapfix_rac.json"


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
        for n, (row, lab) in enumerate(zip(ids, labels)):
            if len(row) != len(lab):
                raise ValueError(f"train_dataset row {n}: labels has {len(lab)} entries, input_ids {len(row)} "
                                 "(labels are aligned with input_ids, the Hugging Face convention)")
        self.sft_rows = [{"input_ids": list(i), "labels": list(lab)} for i, lab in zip(ids, labels)]
        self.pairs = [_split(i, lab, n) for n, (i, lab) in enumerate(zip(ids, labels))]

    def __len__(self) -> int:
        return len(self.pairs)


def iteration_rows(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sources: _Sources,
                   config: RacConfig, *, seed: int, iteration: int, rank: int = 0, world: int = 1,
                   gather: Callable[[dict], list] | None = None) -> tuple[list[dict], dict, list[str]]:
    """(rows, stats, finish reasons) of one RAC iteration, as the reference trainer builds them:
    the same prompts drawn (drawn_prompts), the same chunks and seeds (generation_seed), each
    chunk answered and turned into rows by gapfix.methods.rac.answer_chunk, the RAC rows mixed
    with the SFT rows in mix_with_sft's order (mixing_order_seed). Rows are in the Hugging Face
    convention with a finish_reason ("" for the SFT rows); stats are build_rac_rows'."""
    from gapfix.generation.colocate import generation_engine, tp_share
    from gapfix.methods.rac import (
        RAC,
        answer_chunk,
        drawn_prompts,
        generation_seed,
        merge_stats,
        mix_with_sft,
        mixing_order_seed,
    )

    if config.mode == "all":
        raise ValueError("rac_config.mode 'all' (soft targets) is the reference trainer's: Trainer's labels "
                         "carry one token per position; use path, first or last")
    chosen = drawn_prompts(seed, iteration, len(sources), config.prompts_per_iteration)
    size = config.generation_batch_size or RAC.generate_prompts
    chunks = [chosen[i:i + size] for i in range(0, len(chosen), size)]
    engine = generation_engine(model, config.backend, tensor_parallel_size=config.vllm_tensor_parallel_size,
                               gpu_memory_utilization=config.vllm_gpu_memory_utilization)
    share = tp_share(rank, world, engine.tensor_parallel_size if engine is not None else 1, len(chunks))
    mine = {}
    if engine is not None:
        engine.begin(model)  # every rank: the trained weights, in memory (through DDP; LoRA merged)
    try:
        for c in share.chunks:
            members = chunks[c]
            rows, stats, outputs = answer_chunk(
                model, tokenizer, [sources.pairs[i][0] for i in members], [sources.pairs[i][1] for i in members],
                config, seeds=generation_seed(seed, iteration, members[0]),
                backend=engine if engine is not None else config.backend)
            if share.writes:  # the other ranks of a tensor-parallel group generated the same chunk
                mine[c] = ([{"input_ids": r["input_ids"], "labels": r["labels"], "finish_reason": g.finish_reason}
                            for r, g in zip(rows, outputs)], stats)
    finally:
        if engine is not None:
            engine.end()  # its device memory goes back to training, where vLLM can sleep
    results = {}
    for part in (gather(mine) if gather is not None else [mine]):
        results.update(part)
    rows = [row for c in range(len(chunks)) for row in results[c][0]]
    stats = merge_stats([results[c][1] for c in range(len(chunks))])
    sft = [{**r, "finish_reason": ""} for r in sources.sft_rows]
    mixed = mix_with_sft(rows, sft, config.sft_ratio, mixing_order_seed(seed, iteration))
    return mixed, stats, [row["finish_reason"] for row in rows]


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

    def __init__(self, *args: Any, rac_config: RacConfig | None = None,
                 resume_with_changed_config: bool = False, **kwargs: Any) -> None:
        if rac_config is not None:
            checked_config("rac_config", rac_config, RacConfig)
        from gapfix.hf.trl_head import serve_trl_head

        with serve_trl_head():  # under trl.SFTTrainer, TRL's fused head runs on gapfix's kernel
            super().__init__(*args, **kwargs)
        self.rac_config = resolved_config(self, "rac_config", rac_config, RacConfig)
        self.resume_with_changed_config = resume_with_changed_config
        if self.rac_config.mode == "all":
            raise ValueError("rac_config.mode 'all' (soft targets) is the reference trainer's: Trainer's labels "
                             "carry one token per position; use path, first or last")
        if self.rac_config.backend == "vllm":
            from gapfix.generation.colocate import check_vllm_head_size

            check_vllm_head_size(self.model)
        self._rac_sources = _Sources(require_dataset(self, "of prompt/answer rows"))
        if self.processing_class is None or getattr(self.processing_class, "eos_token_id", None) is None:
            raise ValueError("processing_class must be the tokenizer (RAC needs its eos_token_id and pad_token_id)")
        self._rac_iteration = None
        self._rac_rows = None
        self._rac_pending_stats = None
        self.rac_history = []  # stats of every iteration this trainer generated

    def _rac_rows_per_iteration(self) -> int:
        from gapfix.methods.rac import rows_per_iteration

        return rows_per_iteration(len(self._rac_sources), self.rac_config)

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
            stats = {**stats, "sft_rows": len(rows) - stats["rows"], "iteration": iteration}
            self._rac_iteration, self._rac_rows, self._rac_pending_stats = iteration, rows, stats
            self.rac_history.append(stats)
        return self._rac_rows

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._rac_pending_stats is not None:
            for key in ("finished", "exact_match", "label_agreement", "mean_edit_distance", "rows", "sft_rows"):
                logs[f"rac_{key}"] = self._rac_pending_stats[key]
            self._rac_pending_stats = None
        return super().log(logs, start_time)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self._rac_rows is None or not self.args.should_save:
            return
        save_side_state(checkpoint_dir(self, trial), STATE_FILE, {
            "iteration": self._rac_iteration, "config": self.rac_config.to_dict(), "rows": self._rac_rows})

    def _load_from_checkpoint(self, resume_from_checkpoint: str,
                              model: torch.nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = load_side_state(Path(resume_from_checkpoint), STATE_FILE, self.rac_config, "rac_config",
                                 self.resume_with_changed_config,
                                 missing="the iteration is generated again with the resumed weights")
        if loaded is None:
            return
        state, _, _ = loaded  # with changed settings the saved rows are continued on, as gapfix train does
        path = Path(resume_from_checkpoint) / STATE_FILE
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
