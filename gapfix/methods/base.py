"""The one interface between the reference trainer (gapfix.trainer) and a training method.

A method says, for each iteration:

- which configuration it accepts (`validate`, run on the trainer's TrainConfig);
- how many rows its offline phase yields (`num_rows`), so that the learning-rate
  schedule is known before any row exists;
- how the rows are built (`build_shard`, then `finish`): with the current model
  frozen, rank r of N builds only its share and writes it through
  `OfflineContext.writer`; the trainer then waits for every rank and opens the
  union. Randomness is seeded from the example (`row_seed`), never from the rank,
  so every world size builds the same rows;
- which fields its rows add to a batch (`batch_fields`) and what the loss reads:
  `loss_inputs` (per micro-batch keyword arguments, e.g. BASH's mixing rate and
  per-row seeds) and `model_inputs` (how a batch becomes the trunk's inputs,
  inside the module DDP wraps), with the step statistics it reports.

A method's settings are one frozen dataclass (`Method.config_class`), each field made
by `setting(default, help, flag=...)`: the help text and the name of the reference
trainer's flag (a TrainConfig field, `gapfix train --flag-name`) live on the field, and the
dataclass validates itself in `__post_init__`. gapfix.hf takes the same dataclass
(gapfix.hf.BashConfig is gapfix.methods.bash.BashConfig).

Methods are registered by name (`register`, or the built-in table below, imported
on first use); `get_method(name)` returns an instance. A new method is one file
that subclasses `Method` and calls `register`; both drivers then run it by name:
`gapfix train --method <name>` and gapfix.hf.MethodTrainer / MethodSFTTrainer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

# name -> "module:Class" of the built-in methods, imported when first asked for
_BUILTIN = {
    "sft": "gapfix.methods.sft:SFT",
    "bash": "gapfix.methods.bash:BASH",
    "rac": "gapfix.methods.rac:RAC",
}
_REGISTRY: Dict[str, Type["Method"]] = {}


def register(cls: Type["Method"]) -> Type["Method"]:
    """Registers a Method subclass under `cls.name` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register takes a Method subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def method_names() -> Tuple[str, ...]:
    return tuple(dict.fromkeys([*_BUILTIN, *_REGISTRY]))


def get_method_class(name: str) -> Type["Method"]:
    if name not in _REGISTRY and name in _BUILTIN:
        module, attr = _BUILTIN[name].split(":")
        register(getattr(importlib.import_module(module), attr))
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return _REGISTRY[name]


def get_method(name: str) -> "Method":
    return get_method_class(name)()


def method_for_batch(batch) -> Optional["Method"]:
    """The registered method whose added batch fields a batch carries (a batch with alt_ids is
    mixed as its method says), or None for a plain batch; lets CausalLMLoss(model) take any
    method's batch without being told the method."""
    for name in method_names():
        cls = get_method_class(name)
        if cls.batch_fields and all(key in batch for key in cls.batch_fields) and \
                cls.model_inputs is not Method.model_inputs:
            return cls()
    return None


def setting(default: Any, help: str, *, flag: Optional[str] = None) -> Any:
    """A field of a method's config dataclass: its default, its help text, and `flag`, the
    reference trainer's name for it (a TrainConfig field and `gapfix train --<flag>`); None: a
    setting only gapfix.hf reads."""
    return field(default=default, metadata={"help": help, "flag": flag})


def flag_fields(config_class: type) -> List[Tuple[str, Any, Any]]:
    """(flag, type, dataclasses.field) of each field of `config_class` that has a flag: the
    reference trainer's TrainConfig fields for the method (dataclasses.make_dataclass's form)."""
    import typing

    hints = typing.get_type_hints(config_class)
    return [(f.metadata["flag"], hints[f.name], field(default=f.default, metadata={**f.metadata, "of": f.name}))
            for f in dataclasses.fields(config_class) if f.metadata.get("flag")]


def config_from_flags(config_class: type, values: Any, **extra) -> Any:
    """`config_class` from the flat settings `values` (a TrainConfig, or any object with the
    flag names as attributes); a refused value is named by its flag too."""
    given = {f.name: getattr(values, f.metadata["flag"]) for f in dataclasses.fields(config_class)
             if f.metadata.get("flag") and hasattr(values, f.metadata["flag"])}
    try:
        return config_class(**given, **extra)
    except ValueError as error:
        flags = {f.name: f.metadata.get("flag") for f in dataclasses.fields(config_class)}
        name = str(error).split(" ", 1)[0]
        flag = flags.get(name)
        if flag and flag != name:
            raise ValueError(f"{flag} (--{flag.replace('_', '-')}): {error}") from None
        raise


def check_int(name: str, value: Any, low: int = 1, high: Optional[int] = None, *, optional: bool = False) -> None:
    """ValueError naming `name` unless `value` is an int in [low, high] (or None where optional)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}{' or None' if optional else ''}, got {value!r}"[:300])


def check_number(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> None:
    """ValueError naming `name` unless `value` is a finite number in [low, high] ((low, high] if open_low)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > high or value < low or (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}"[:300])


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}"[:300])


def row_seed(*parts) -> int:
    """A 56-bit seed from its parts (seed, iteration, a purpose, an example or row index...):
    stable across processes and Python versions, never a function of rank or chunk."""
    key = "/".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=7).digest(), "little")


@dataclass
class OfflineContext:
    """What an offline phase is given. `examples` is a sequence of gapfix.data.Example
    (an ExampleTable reads them from a memory-mapped dataset: prefer `gather`).

    `model` is the frozen model, whole on this rank (under FSDP2 a copy gathered for the
    phase, where the method's `runs_model`): its forwards and generate calls are local, never
    collective, so ranks may run different numbers of them. Its weights are freed when the
    phase ends: keep no reference to them past `finish`."""
    model: object
    tokenizer: object
    examples: Sequence
    config: object
    iteration: int
    device: object
    rank: int
    world: int
    folder: str  # this iteration's row files live here (shared by every rank)
    log: Callable[[dict], None]
    trained_rows: Callable[[int], List[int]]  # the row indices the steps draw, given the row count
    barrier: Callable[[], None]
    all_reduce: Callable[[List[float]], List[float]]  # sums numbers over ranks
    counters: Dict[str, int] = field(default_factory=dict)  # e.g. forwards run by this rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard_path(self, stem: str = "part") -> str:
        import os

        return os.path.join(self.folder, f"{stem}-{self.rank:05d}-of-{self.world:05d}.arrow")

    def shard_paths(self, stem: str = "part") -> List[str]:
        import os

        return [os.path.join(self.folder, f"{stem}-{r:05d}-of-{self.world:05d}.arrow")
                for r in range(self.world)]

    def writer(self, first_row: int, stem: str = "part"):
        """A RowWriter for this rank's shard, whose first row is global row `first_row`."""
        from gapfix.data.arrow import RowWriter

        return RowWriter(self.shard_path(stem), first_row=first_row)

    def gather(self, indices: Sequence[int]) -> list:
        gather = getattr(self.examples, "gather", None)
        return gather(indices) if gather is not None else [self.examples[i] for i in indices]

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount


class Method:
    """A training method; subclass it, set `name`, and `register` the class."""

    name: str = ""
    config_class: Optional[type] = None  # the method's settings (fields made by `setting`)
    batch_fields: Tuple[str, ...] = ()  # fields its rows add beyond input_ids / labels (targets)
    uses_row_seeds: bool = False  # whether loss_inputs needs per-row seeds
    generates: bool = False  # whether the offline phase generates from the prompts (prompts must leave room)
    # whether the offline phase runs the model (forwards, generation); under FSDP2 the trainer then
    # gathers a whole copy for it, and otherwise spares that gather (ctx.model is then the sharded model)
    runs_model: bool = True

    def settings(self, config) -> Any:
        """This method's config_class instance from a TrainConfig (validated on construction)."""
        return None if self.config_class is None else config_from_flags(self.config_class, config)

    def validate(self, config) -> None:
        """Raises ValueError naming a TrainConfig field this method cannot use. TrainConfig.validate
        runs it for every registered method, whichever runs: check only this method's own fields."""
        self.settings(config)

    def num_rows(self, num_examples: int, config) -> int:
        """Rows one iteration's offline phase yields from `num_examples` examples."""
        return num_examples

    def build_shard(self, ctx: OfflineContext) -> dict:
        """Builds this rank's share of the iteration's rows and writes it with
        `ctx.writer(first_row)` (every rank writes a file, possibly empty); returns
        statistics for the trainer's "offline" log record."""
        raise NotImplementedError

    def finish(self, ctx: OfflineContext) -> List[str]:
        """After every rank's build_shard: the files whose union is the iteration's rows
        (default: the shards as written). Runs on every rank; a method that writes a
        further file writes it on ctx.main and calls ctx.barrier()."""
        return ctx.shard_paths()

    def loss_inputs(self, config, row_seeds) -> dict:
        """Keyword arguments of the loss module's forward for one micro-batch; row_seeds is a
        (rows,) int64 tensor of per-row seeds (None unless uses_row_seeds)."""
        return {}

    def model_inputs(self, model, batch, *, impl: str, **loss_inputs) -> Tuple[dict, Optional[dict]]:
        """(the trunk's input keyword arguments: input_ids or inputs_embeds, and step
        statistics {name: (numerator, denominator)} summed on device, or None). Runs inside
        the forward of the module DDP/FSDP wraps."""
        return {"input_ids": batch["input_ids"]}, None


__all__ = ["Method", "OfflineContext", "check_choice", "check_int", "check_number", "config_from_flags",
           "flag_fields", "get_method", "get_method_class", "method_for_batch", "method_names", "register",
           "row_seed", "setting", "unregister"]
