"""Pieces shared by gapfix.hf's trainers: ranks, the method's config, the training rows as examples,
the input-embedding hook, checkpoint side files."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import torch

if TYPE_CHECKING:  # annotations only: transformers and datasets load where they are used
    import datasets
    from transformers import Trainer

    from gapfix.data import Example

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


def checkpoint_dir(trainer: Trainer, trial: Any) -> Path:
    """The folder Trainer._save_checkpoint has just written for the current global step."""
    return Path(trainer._get_output_dir(trial=trial)) / f"{CHECKPOINT_PREFIX}-{trainer.state.global_step}"


def save_side_state(folder: Path, state_file: str, state: dict, tensor_file: str | None = None,
                    tensors: dict | None = None) -> None:
    """A trainer's side files in a Trainer checkpoint folder: `state` as JSON and `tensors` as
    safetensors, each written whole and fsynced (gapfix.checkpoint.write_file) before it replaces
    the file's name."""
    from gapfix.checkpoint import write_file

    folder.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        from safetensors.torch import save

        data = save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()})
        write_file(str(folder / (tensor_file + ".tmp")), data)
        os.replace(folder / (tensor_file + ".tmp"), folder / tensor_file)
    write_file(str(folder / (state_file + ".tmp")), json.dumps(state, indent=1, sort_keys=True).encode())
    os.replace(folder / (state_file + ".tmp"), folder / state_file)


def load_side_state(folder: Path, state_file: str, config: Any, name: str, allow_change: bool, *,
                    tensor_file: str | None = None, missing: str) -> tuple[dict, dict, list] | None:
    """(state, tensors, the config fields that changed) of a checkpoint's side files, or None
    (with a warning saying `missing`) where the checkpoint has none. A state saved with other
    settings than `config` is refused, naming the fields that differ, unless allow_change."""
    import warnings

    from gapfix.checkpoint import config_differences

    path = folder / state_file
    if not path.is_file():
        warnings.warn(f"{folder} holds no {state_file}: {missing}", stacklevel=3)
        return None
    state = read_json(path)
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: line 1: 'config' must be an object of {type(config).__name__} settings")
    defaults = None if config is None else type(config)()
    changes = config_differences(saved, config_dict(config), defaults=config_dict(defaults), free=())
    if changes and not allow_change:
        raise ValueError(f"{path}: line 1: saved with {type(config).__name__} settings other than the resumed "
                         f"run's {name} ({'; '.join(changes)}): resume with the same settings, or pass "
                         "resume_with_changed_config=True to the trainer to continue with the new ones")
    tensors = {}
    if tensor_file is not None and not changes:
        from safetensors.torch import load_file

        tensors = load_file(str(folder / tensor_file))
    return state, tensors, changes


def config_dict(config: Any) -> dict:
    """A method's config as a JSON object ({} for a method without settings)."""
    return {} if config is None else dataclasses.asdict(config)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: line 1: expected a JSON object")
    return data


def resolved_config(trainer: Trainer, name: str, given: ConfigT | None, cls: type[ConfigT], *,
                    prefix: str | None = None) -> ConfigT:
    """The trainer's method config: `given` (the trainer's keyword argument `name`), else the training
    arguments' own (BashSFTConfig, RacTrainingArguments, ...: `args.<prefix>_config()`, the prefix
    being `name`'s by default), else the defaults. Both given and differing: ValueError, the
    settings belong in one place."""
    prefix = name.split("_")[0] if prefix is None else prefix
    from_args = getattr(trainer.args, f"{prefix}_config", None)
    in_args = from_args() if callable(from_args) else None
    if given is None:
        return in_args if in_args is not None else cls()
    if in_args is not None and in_args != cls() and in_args != given:
        raise ValueError(f"{name} and args ({type(trainer.args).__name__}) both set {cls.__name__} settings, "
                         "differently: give them in one place")
    return given


def checked_config(name: str, value: ConfigT | None, cls: type[ConfigT]) -> ConfigT:
    """The trainer's method config: `cls()` for None, the value itself if a `cls`, else ValueError."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        where = "gapfix.hf" if cls.__module__.startswith("gapfix.") else cls.__module__
        raise ValueError(f"{name} must be a {where}.{cls.__name__}, got {type(value).__name__}")
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


def split_row(input_ids: Sequence[int], labels: Sequence[int], index: int) -> Example:
    """A training row (Hugging Face labels) as a gapfix.data.Example: the answer is the last run of
    trained tokens (labels != -100), the prompt everything before it, whose trained tokens (earlier
    assistant turns) become prompt_labels."""
    from gapfix.data import Example

    trained = [i for i, lab in enumerate(labels) if lab != -100]
    if not trained:
        raise ValueError(f"train_dataset row {index} has no trained token (labels all -100)")
    stop = trained[-1] + 1
    start = stop
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    if start == 0:
        raise ValueError(f"train_dataset row {index} has no prompt (every token is trained): the methods need "
                         "prompt/answer rows (labels -100 on the prompt, or TRL's completion_only_loss)")
    context = list(labels[:start])
    return Example(prompt_ids=list(input_ids[:start]), answer_ids=list(input_ids[start:stop]),
                   prompt_labels=context if trained[0] < start else None)


def dataset_examples(dataset: datasets.Dataset) -> list[Example]:
    """The rows of a tokenized, unpacked train_dataset (input_ids and labels) as examples (split_row)."""
    columns = dataset.column_names
    if "seq_lengths" in columns:
        raise ValueError("train_dataset is packed; the method needs one prompt/answer per row (packing=False)")
    if "input_ids" not in columns or "labels" not in columns:
        raise ValueError(f"train_dataset must have input_ids and labels columns, it has {columns}")
    ids, labels = dataset["input_ids"], dataset["labels"]
    for n, (row, lab) in enumerate(zip(ids, labels)):
        if len(row) != len(lab):
            raise ValueError(f"train_dataset row {n}: labels has {len(lab)} entries, input_ids {len(row)} "
                             "(labels are aligned with input_ids, the Hugging Face convention)")
    return [split_row(i, lab, n) for n, (i, lab) in enumerate(zip(ids, labels))]


@contextlib.contextmanager
def replaced_embeddings(model: torch.nn.Module,
                        compute: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, the model's input embedding returns compute(module, ids) for the ids it embeds
    (inside the model's own forward, so DDP sees an ordinary one). compute may call the module
    itself: that call returns the plain embeddings."""
    busy = []

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if busy:
            return None
        busy.append(True)
        try:
            embeds = compute(module, args[0] if args else None)
        finally:
            busy.clear()
        embeds = embeds.to(output.dtype)
        if output.requires_grad and not embeds.requires_grad:
            # a frozen embedding whose output was made to require grad (PEFT's hook for
            # reentrant gradient checkpointing): keep that for the replaced embeddings too
            embeds.requires_grad_(True)
        return embeds

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
