"""Pieces shared by the BASH and RAC trainers: ranks, seeds, checkpoint side files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from gapfix.generation import derive_seed

if TYPE_CHECKING:  # annotations only: transformers and datasets load where they are used
    import datasets
    from transformers import Trainer

ConfigT = TypeVar("ConfigT")

CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def rank_and_world(trainer: Trainer) -> tuple[int, int]:
    """(this process's rank, number of processes) of a Trainer's run."""
    args = trainer.args
    return int(args.process_index), int(args.world_size)


def distributed(trainer: Trainer) -> bool:
    return rank_and_world(trainer)[1] > 1 and torch.distributed.is_available() \
        and torch.distributed.is_initialized()


def all_reduce_sum(trainer: Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over the ranks (in place; unchanged on one process). Every rank holds
    zeros where it computed nothing, so the sum puts each rank's share in place exactly."""
    if distributed(trainer):
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from the run's seed and integer parts (step, micro-step, rank, ...)."""
    for part in parts:
        seed = derive_seed(seed, int(part))
    return seed


def checkpoint_dir(trainer: Trainer, trial: Any) -> Path:
    """The folder Trainer._save_checkpoint has just written for the current global step."""
    return Path(trainer._get_output_dir(trial=trial)) / f"{CHECKPOINT_PREFIX}-{trainer.state.global_step}"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: line 1: expected a JSON object")
    return data


def checked_config(name: str, value: ConfigT | None, cls: type[ConfigT]) -> ConfigT:
    """The trainer's method config: `cls()` for None, the value itself if a `cls`, else ValueError."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise ValueError(f"{name} must be a gapfix.hf.{cls.__name__}, got {type(value).__name__}")
    return value


def require_dataset(trainer: Trainer, why: str) -> datasets.Dataset:
    """The trainer's train_dataset, which must be a datasets.Dataset (map-style, with columns)."""
    import datasets

    if not isinstance(trainer.train_dataset, datasets.Dataset):
        raise ValueError(f"train_dataset must be a datasets.Dataset ({why})")
    return trainer.train_dataset


def sft_trainer_class(name: str, mixin: type, module: str, doc: str) -> type:
    """`mixin` over trl.SFTTrainer, built when first asked for (trl is imported only then)."""
    from trl import SFTTrainer

    return type(name, (mixin, SFTTrainer), {"__doc__": doc, "__module__": module})


def refuse_fsdp(trainer: Trainer, what: str) -> None:
    """The offline passes run the unsharded model on each rank's own share: under FSDP the ranks
    would run different numbers of sharded forwards (a hang), so FSDP is refused, by name."""
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(f"{type(trainer).__name__}: {what} does not run under FSDP (each rank runs the whole "
                         "model on its own share of the rows); use DDP")
