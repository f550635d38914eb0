"""RAC inside transformers Trainer / TRL SFTTrainer: RacTrainer, RacSFTTrainer, build_rac_dataset.

    trainer = RacTrainer(model=model, args=TrainingArguments(num_train_epochs=3, ...),
                         train_dataset=ds, processing_class=tokenizer, data_collator=collator,
                         rac_config=RacConfig(samples=2, sft_ratio=0.5))
    trainer.train()

RacTrainer is gapfix.hf.method's driver for any registered method, with RAC's rows
built from the dataset's own rows. One training epoch is one RAC iteration: at its
start the model, as it is then, answers `prompts_per_iteration` prompts of the training rows, drawn, chunked, seeded
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

from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import Trainer

from gapfix.hf._common import dataset_examples, rank_and_world, require_dataset, sft_trainer_class
from gapfix.hf.method import _MethodMixin
from gapfix.methods.rac import RacConfig

if TYPE_CHECKING:  # annotations only
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["RacTrainer", "build_rac_dataset"]

STATE_FILE = "gapfix_rac.json"


class _Sources:
    """The training rows as (prompt, reference) pairs (gapfix.hf._common.split_row) and as SFT rows."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        examples = dataset_examples(dataset)
        self.sft_rows = [{"input_ids": list(i), "labels": list(lab)}
                         for i, lab in zip(dataset["input_ids"], dataset["labels"])]
        self.pairs = [(example.prompt_ids, example.answer_ids) for example in examples]

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


class _RacMixin(_MethodMixin):
    """RAC on top of a Trainer class (transformers.Trainer or trl.SFTTrainer): the generic driver
    (gapfix.hf.method) with RAC's rows built from the dataset's rows by iteration_rows, in their
    mixed order."""

    method_name = "rac"

    def __init__(self, *args: Any, rac_config: RacConfig | None = None,
                 resume_with_changed_config: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, method_config=rac_config, resume_with_changed_config=resume_with_changed_config,
                         **kwargs)
        if self.rac_config.mode == "all":
            raise ValueError("rac_config.mode 'all' (soft targets) is the reference trainer's: Trainer's labels "
                             "carry one token per position; use path, first or last")
        if self.rac_config.backend == "vllm":
            from gapfix.generation.colocate import check_vllm_head_size

            check_vllm_head_size(self.model)
        if self.processing_class is None or getattr(self.processing_class, "eos_token_id", None) is None:
            raise ValueError("processing_class must be the tokenizer (RAC needs its eos_token_id and pad_token_id)")

    def _read_train_dataset(self) -> None:
        self._rac_sources = _Sources(require_dataset(self, "of prompt/answer rows"))

    @property
    def rac_config(self) -> RacConfig:
        return self.method_config

    @property
    def rac_history(self) -> list:
        """Stats of every iteration this trainer generated."""
        return self.method_history

    def _rows_per_iteration(self) -> int:
        from gapfix.methods.rac import rows_per_iteration

        return rows_per_iteration(len(self._rac_sources), self.rac_config)

    def _row_order(self, num_rows: int, iteration: int) -> list[int]:
        return list(range(num_rows))  # mix_with_sft has shuffled them

    def _rac_gather(self, mine: dict) -> list:
        if rank_and_world(self)[1] > 1 and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, mine)  # lists of ints and strings between our ranks
            return parts
        return [mine]

    def _rows_for(self, iteration: int) -> list:
        return self._rac_rows_for(iteration)

    def _rac_rows_for(self, iteration: int) -> list:
        return _MethodMixin._rows_for(self, iteration)

    def _build_iteration(self, iteration: int) -> tuple[list[dict], dict]:
        rank, world = rank_and_world(self)
        rows, stats, _ = iteration_rows(self.model, self.processing_class, self._rac_sources, self.rac_config,
                                        seed=self.args.seed, iteration=iteration, rank=rank, world=world,
                                        gather=self._rac_gather)
        return rows, {**stats, "sft_rows": len(rows) - stats["rows"]}

    def _logged_stats(self, stats: dict) -> dict:
        keys = ("finished", "exact_match", "label_agreement", "mean_edit_distance", "rows", "sft_rows")
        return {key: stats[key] for key in keys if key in stats}


class RacTrainer(_RacMixin, Trainer):
    """transformers.Trainer with RAC: RacTrainer(..., processing_class=tokenizer, rac_config=RacConfig())."""


def __getattr__(name: str) -> type:
    if name == "RacSFTTrainer":  # built on first use, so that importing this module never imports trl
        doc = "trl.SFTTrainer with RAC: RacSFTTrainer(..., rac_config=RacConfig())."
        cls = globals()[name] = sft_trainer_class(name, _RacMixin, __name__, doc)
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
