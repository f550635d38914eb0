"""gapfix inside transformers Trainer and TRL (the `gapfix[hf]` extra).

    gapfix.hf.patch(model)                      fused linear cross-entropy as the model's loss
    BashTrainer / BashSFTTrainer + BashConfig   batch-scheduled sampling (offline predictions)
    RacTrainer / RacSFTTrainer + RacConfig      training on corrected own answers
    BashSFTConfig / BashTrainingArguments,      the settings inside the training arguments
    RacSFTConfig / RacTrainingArguments         (TRL's convention: a config class per method)
    build_rac_dataset(model, tokenizer, dataset, ...) -> datasets.Dataset
    MethodTrainer / MethodSFTTrainer            any registered method (gapfix.methods), by name:
                                                MethodTrainer(..., method="name", method_config=...)

Importing gapfix.hf loads neither transformers nor TRL; each name loads its module
on first use (the SFT trainers import trl, the others transformers only).
"""
import importlib

_EXPORTS = {
    "patch": "gapfix.hf.patching",
    "unpatch": "gapfix.hf.patching",
    "is_patched": "gapfix.hf.patching",
    "BashConfig": "gapfix.hf.config",
    "RacConfig": "gapfix.hf.config",
    "BashSFTConfig": "gapfix.hf.config",
    "BashTrainingArguments": "gapfix.hf.config",
    "RacSFTConfig": "gapfix.hf.config",
    "RacTrainingArguments": "gapfix.hf.config",
    "BashTrainer": "gapfix.hf.bash",
    "BashSFTTrainer": "gapfix.hf.bash",
    "RacTrainer": "gapfix.hf.rac",
    "RacSFTTrainer": "gapfix.hf.rac",
    "build_rac_dataset": "gapfix.hf.rac",
    "MethodTrainer": "gapfix.hf.method",
    "MethodSFTTrainer": "gapfix.hf.method",
}

__all__ = ["BashConfig", "BashSFTConfig", "BashSFTTrainer", "BashTrainer", "BashTrainingArguments",
           "MethodSFTTrainer", "MethodTrainer", "RacConfig", "RacSFTConfig", "RacSFTTrainer", "RacTrainer",
           "RacTrainingArguments", "build_rac_dataset", "is_patched", "patch", "unpatch"]


def __getattr__(name: str) -> object:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gapfix.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
