"""Any registered method inside transformers Trainer / TRL SFTTrainer: MethodTrainer, MethodSFTTrainer.

    trainer = MethodTrainer(model=model, args=TrainingArguments(num_train_epochs=3, ...),
                            train_dataset=ds, processing_class=tokenizer,
                            method="first_half", method_config=None)
    trainer.train()

A method registered in gapfix.methods (gapfix.methods.base.register) runs here as under
`gapfix train`, by its one file. One training epoch is one iteration: at its start the
method's offline phase runs on the model as it is then (gapfix.trainer.offline_phase:
Method.build_shard on every rank, then Method.finish), over the training rows as
gapfix.data.Example (the answer is a row's last run of trained tokens, the prompt what
precedes it), with the reference trainer's settings of the method's config
(`method_config`, its flags) and the run's seed; the iteration trains on the rows it
built: `refresh` optimizer steps (the keyword, else the config's `refresh` field where it
has one), or one pass over them, drawn in the reference trainer's order (_row_order).

Rows of input_ids and labels only are collated by the trainer's data_collator; rows with
the method's own per-token fields (BASH's alt_ids, eligible) by gapfix.data.collate, and
the method's batch transform (Method.model_inputs, with Method.loss_inputs and the
reference trainer's per-row seeds, mixing_seeds) runs inside the model's input embedding,
within the model's own forward. The loss is the model's (gapfix.hf.patch makes it
gapfix's fused loss, the reference trainer's).

Logged with the first training step of an iteration: the offline phase's statistics as
`<method>_<name>` (`<method>_rows`: the rows built); with each logged step, the batch
transform's statistics (BASH: bash_mixed_fraction). The iteration's rows are saved in
Trainer's checkpoints (gapfix_<method>.json), so a resumed run continues the iteration it
stopped in on the same rows.
"""
from __future__ import annotations

import dataclasses
import math
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from transformers import Trainer

from gapfix.hf._common import (
    all_reduce_sum,
    checked_config,
    checkpoint_dir,
    config_dict,
    dataset_examples,
    load_side_state,
    rank_and_world,
    refuse_fsdp,
    replaced_embeddings,
    require_dataset,
    resolved_config,
    save_side_state,
    sft_trainer_class,
)

if TYPE_CHECKING:  # annotations only
    from gapfix.methods.base import Method

__all__ = ["MethodTrainer", "reference_settings"]

ROWS_KEY = "gapfix_method_rows"  # per batch row: its index in the iteration's rows


def reference_settings(method: Method, config: Any, seed: int) -> Any:
    """The reference trainer's settings (a TrainConfig) of `method` run with `config` and `seed`:
    what its offline phase and loss_inputs read. A flag TrainConfig lacks (a method registered
    outside gapfix) is added alongside its fields."""
    from gapfix.trainer import TrainConfig

    flags = {} if config is None else {f.metadata["flag"]: getattr(config, f.name)
                                       for f in dataclasses.fields(config) if f.metadata.get("flag")}
    known = {name: value for name, value in flags.items() if name in TrainConfig.__dataclass_fields__}
    settings = TrainConfig(method=method.name, seed=seed, **known)
    if len(known) == len(flags):
        return settings
    return types.SimpleNamespace(**{**dataclasses.asdict(settings), **flags})


class _IterationStream(torch.utils.data.IterableDataset):
    """This rank's micro-batches of one iteration per pass (one Trainer epoch)."""

    def __init__(self, trainer: _MethodMixin) -> None:
        self.trainer = trainer

    def __len__(self) -> int:
        return self.trainer._steps_per_iteration() * self.trainer.args.gradient_accumulation_steps

    def __iter__(self) -> Iterator[dict]:
        trainer = self.trainer
        rank, world = rank_and_world(trainer)
        iteration = trainer.state.global_step // trainer._steps_per_iteration()
        rows = trainer._rows_for(iteration)
        order = trainer._row_order(len(rows), iteration)
        per_rank = trainer.args.per_device_train_batch_size
        for micro in range(len(self)):
            first = (micro * world + rank) * per_rank
            chosen = [order[(first + i) % len(order)] for i in range(per_rank)]
            yield trainer._collate_rows(rows, chosen)


class _MethodMixin:
    """A registered method on top of a Trainer class (transformers.Trainer or trl.SFTTrainer)."""

    method_name: str | None = None  # a subclass for one method names it; else the `method` keyword

    def __init__(self, *args: Any, method: str | None = None, method_config: Any = None,
                 refresh: int | None = None, resume_with_changed_config: bool = False, **kwargs: Any) -> None:
        from gapfix.hf.trl_head import serve_trl_head
        from gapfix.methods.base import check_int, get_method

        self._method = get_method(method or self.method_name or "")
        config_class = self._method.config_class
        keyword = f"{self._method.name}_config" if self.method_name else "method_config"
        if method_config is not None:
            if config_class is None:
                raise ValueError(f"{keyword}: method {self._method.name!r} has no settings")
            checked_config(keyword, method_config, config_class)
        check_int("refresh", refresh, optional=True)
        with serve_trl_head():  # under trl.SFTTrainer, TRL's fused head runs on gapfix's kernel
            super().__init__(*args, **kwargs)
        self.method_config = None if config_class is None else resolved_config(
            self, keyword, method_config, config_class, prefix=self._method.name)
        self.resume_with_changed_config = resume_with_changed_config
        self._refresh = refresh if refresh is not None else getattr(self.method_config, "refresh", None)
        self._settings = reference_settings(self._method, self.method_config, self.args.seed)
        self._method_iteration = None
        self._method_rows = None
        self._method_pending_stats = None
        self._method_counts = {}  # the batch transform's statistics since the last log
        self.method_history = []  # the offline statistics of every iteration this trainer built
        self._read_train_dataset()

    def _read_train_dataset(self) -> None:
        self._method_examples = dataset_examples(require_dataset(self, "of prompt/answer rows"))

    # -- the iterations ---------------------------------------------------------------------------
    def _rows_per_iteration(self) -> int:
        return self._method.num_rows(len(self._method_examples), self._settings)

    def _steps_per_iteration(self) -> int:
        if self._refresh is not None:
            return self._refresh
        _, world = rank_and_world(self)
        global_batch = self.args.per_device_train_batch_size * world * self.args.gradient_accumulation_steps
        return max(1, math.ceil(self._rows_per_iteration() / global_batch))

    def _row_order(self, num_rows: int, iteration: int) -> list[int]:
        from gapfix.trainer import _row_order

        return _row_order(num_rows, num_rows, self.args.seed, iteration)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_IterationStream(self), batch_size=None, num_workers=0)

    def _rows_for(self, iteration: int) -> list[dict]:
        if self._method_iteration != iteration:
            refuse_fsdp(self, f"{self._method.name}'s offline phase")
            rows, stats = self._build_iteration(iteration)
            stats = {**stats, "iteration": iteration}
            self._method_iteration, self._method_rows, self._method_pending_stats = iteration, rows, stats
            self.method_history.append(stats)
        return self._method_rows

    def _build_iteration(self, iteration: int) -> tuple[list[dict], dict]:
        """(rows, statistics) of the method's offline phase on the model as it is now."""
        from gapfix.trainer import _RowFolders, offline_phase

        rank, world = rank_and_world(self)
        dist = types.SimpleNamespace(rank=rank, world=world, main=rank == 0, barrier=self._barrier)
        folders = _RowFolders(None, dist)
        try:
            table, _, stats, _ = offline_phase(self._method, self.model, self.processing_class,
                                               self._method_examples, self._settings, iteration, self.args.device,
                                               dist, folders, lambda record: None, lambda n: list(range(n)))
            rows = table.gather(range(len(table)))
            del table  # its memory maps close before the folder goes
        finally:
            folders.close()
        if rows and "target_ids" in rows[0]:
            raise ValueError(f"method {self._method.name!r} built soft-target rows (target_ids): Trainer's labels "
                             "carry one token per position; train them with gapfix train")
        return rows, {**stats, "rows": len(rows)}

    def _barrier(self) -> None:
        if rank_and_world(self)[1] > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    # -- training ---------------------------------------------------------------------------------
    def _collate_rows(self, rows: list[dict], chosen: list[int]) -> dict:
        """A micro-batch of the rows `chosen`: the data_collator's for plain rows, else
        gapfix.data.collate's with the method's per-token fields, with ROWS_KEY."""
        picked = [rows[i] for i in chosen]
        if not any(isinstance(v, list) and k not in ("input_ids", "labels") for k, v in picked[0].items()):
            return self.data_collator([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in picked])
        from gapfix.data import collate

        pad = getattr(self.processing_class, "pad_token_id", None)
        batch = collate(picked, pad_id=0 if pad is None else pad)
        batch[ROWS_KEY] = list(chosen)
        return batch

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        held = inputs.pop(ROWS_KEY, None)
        fields = {} if held is None else {k: inputs.pop(k) for k in list(inputs)
                                          if k not in ("input_ids", "labels", "attention_mask", "position_ids")}
        if held is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with replaced_embeddings(self.model, self._transform(inputs["input_ids"], fields, held)):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def _transform(self, input_ids: torch.Tensor, fields: dict, held: list[int]):
        """The embedding of a batch's ids after the method's batch transform (Method.model_inputs),
        seeded as the reference trainer seeds a row (mixing_seeds: iteration, step, row)."""
        from gapfix.methods.bash import mixing_seeds

        method = self._method
        window, step = divmod(self.state.global_step, self._steps_per_iteration())
        seeds = mixing_seeds(self.args.seed, window, step, held).to(input_ids.device) \
            if method.uses_row_seeds else None
        loss_inputs = method.loss_inputs(self._settings, seeds)

        def embed(module: torch.nn.Module, ids: torch.Tensor | None) -> torch.Tensor:
            if not isinstance(ids, torch.Tensor) or ids.shape != input_ids.shape:
                raise ValueError(f"{method.name}: the model embedded ids of another shape than the batch's "
                                 "input_ids (pass input_ids, not inputs_embeds)")
            given, stats = method.model_inputs(self.model, {**fields, "input_ids": ids}, impl="auto", **loss_inputs)
            for name, (numerator, denominator) in (stats or {}).items():
                old = self._method_counts.get(name, torch.zeros(2, dtype=torch.float64, device=ids.device))
                self._method_counts[name] = old + torch.stack([numerator.double(), denominator.double()])
            return given["inputs_embeds"] if "inputs_embeds" in given else module(given["input_ids"])

        return embed

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            name = self._method.name
            for key, value in self._logged_stats(self._method_pending_stats or {}).items():
                logs[f"{name}_{key}"] = value
            self._method_pending_stats = None
            for key, counts in sorted(self._method_counts.items()):
                total = all_reduce_sum(self, counts.clone())
                if total[1] > 0:
                    logs[f"{name}_{key}"] = float(total[0] / total[1])
            self._method_counts = {}
        return super().log(logs, start_time)

    def _logged_stats(self, stats: dict) -> dict:
        """The offline statistics logged with an iteration's first step (numbers only)."""
        return {k: v for k, v in stats.items() if k != "iteration" and isinstance(v, (int, float))
                and not isinstance(v, bool)}

    # -- checkpoints ------------------------------------------------------------------------------
    @property
    def _state_file(self) -> str:
        return f"gapfix_{self._method.name}.json"

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self._method_rows is None or not self.args.should_save:
            return
        save_side_state(checkpoint_dir(self, trial), self._state_file, {
            "iteration": self._method_iteration, "config": config_dict(self.method_config),
            "rows": self._method_rows})

    def _load_from_checkpoint(self, resume_from_checkpoint: str,
                              model: torch.nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        keyword = f"{self._method.name}_config" if self.method_name else "method_config"
        loaded = load_side_state(Path(resume_from_checkpoint), self._state_file, self.method_config, keyword,
                                 self.resume_with_changed_config,
                                 missing="the iteration is built again with the resumed weights")
        if loaded is None:
            return
        state, _, _ = loaded  # with changed settings the saved rows are continued on, as gapfix train does
        path = Path(resume_from_checkpoint) / self._state_file
        rows = state.get("rows")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("input_ids"), list)
                                                 and isinstance(r.get("labels"), list) for r in rows):
            raise ValueError(f"{path}: line 1: 'rows' must be a list of {{input_ids, labels}} objects")
        self._method_iteration, self._method_rows = int(state["iteration"]), rows


class MethodTrainer(_MethodMixin, Trainer):
    """transformers.Trainer with a registered method: MethodTrainer(..., method="name", method_config=...)."""


def __getattr__(name: str) -> type:
    if name == "MethodSFTTrainer":  # built on first use, so that importing this module never imports trl
        doc = "trl.SFTTrainer with a registered method: MethodSFTTrainer(..., method=\"name\", method_config=...)."
        cls = globals()[name] = sft_trainer_class(name, _MethodMixin, __name__, doc)
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
