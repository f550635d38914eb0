"""The methods' settings under transformers and TRL.

BashConfig and RacConfig are the methods' own config dataclasses (gapfix.methods.bash.BashConfig,
gapfix.methods.rac.RacConfig): the settings of `gapfix train` and of these trainers are one class.

In TRL's convention (a config class per method, extending SFTConfig), BashSFTConfig / RacSFTConfig
extend trl.SFTConfig and BashTrainingArguments / RacTrainingArguments extend
transformers.TrainingArguments with the method's settings as fields named `<method>_<setting>`
(bash_beta, rac_sft_ratio, ...), each with its help text: they are parsed by HfArgumentParser and
TrlParser, saved in training_args.bin and shown by report_to. `args.bash_config()` /
`args.rac_config()` gives the method's config. Each class is built on first use, so that
importing this module imports neither transformers nor trl.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from gapfix.methods.bash import BashConfig
from gapfix.methods.rac import RacConfig

__all__ = ["BashConfig", "RacConfig", "method_config_of"]  # and the argument classes, built on first use

# the argument classes: name -> (the method's config, the settings' prefix, base class "module:Class")
_ARGUMENT_CLASSES = {
    "BashSFTConfig": (BashConfig, "bash", "trl:SFTConfig"),
    "BashTrainingArguments": (BashConfig, "bash", "transformers:TrainingArguments"),
    "RacSFTConfig": (RacConfig, "rac", "trl:SFTConfig"),
    "RacTrainingArguments": (RacConfig, "rac", "transformers:TrainingArguments"),
}
# settings only the reference trainer reads (gapfix train): not arguments of a Trainer
_REFERENCE_ONLY = {BashConfig: ("rows",), RacConfig: ()}


def _argument_fields(config_class: type, prefix: str) -> list:
    hints = typing.get_type_hints(config_class)
    return [(f"{prefix}_{f.name}", hints[f.name], dataclasses.field(default=f.default,
                                                                   metadata={"help": f.metadata.get("help", "")}))
            for f in dataclasses.fields(config_class) if f.name not in _REFERENCE_ONLY[config_class]]


def method_config_of(args: Any, config_class: type, prefix: str) -> Any:
    """`config_class` from the `<prefix>_<setting>` fields of a training-arguments object."""
    values = {f.name: getattr(args, f"{prefix}_{f.name}") for f in dataclasses.fields(config_class)
              if hasattr(args, f"{prefix}_{f.name}")}
    try:
        return config_class(**values)
    except ValueError as error:
        raise ValueError(f"{type(args).__name__}.{prefix}_{error}") from None


def _build(name: str) -> type:
    import importlib

    config_class, prefix, base = _ARGUMENT_CLASSES[name]
    module, attr = base.split(":")
    base_class = getattr(importlib.import_module(module), attr)

    def post_init(self) -> None:
        base_class.__post_init__(self)
        method_config_of(self, config_class, prefix)  # refuses a bad setting now, by name

    def method_config(self) -> Any:
        return method_config_of(self, config_class, prefix)

    doc = (f"{base_class.__name__} with the {prefix.upper()} settings of {config_class.__name__} as "
           f"`{prefix}_<setting>` fields; `{prefix}_config()` gives the {config_class.__name__}.")
    return dataclasses.make_dataclass(
        name, _argument_fields(config_class, prefix), bases=(base_class,),
        namespace={"__module__": __name__, "__doc__": doc, "__post_init__": post_init,
                   f"{prefix}_config": method_config})


def __getattr__(name: str) -> type:
    if name in _ARGUMENT_CLASSES:  # built on first use (and found here again when training_args.bin is loaded)
        cls = globals()[name] = _build(name)
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
