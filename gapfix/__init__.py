"""gapfix: fine-tune language models on their own generated tokens.

Fused ops (alignment, RAC labels, token-mixing embedding, fused cross-entropy)
and a reference trainer for Batch-Scheduled Sampling (BASH) and
Reference-Answer-based Correction (RAC), after Cen et al. (TMLR 2025).

Public names are resolved lazily, so `import gapfix` loads neither Triton,
transformers nor vLLM; each loads where it is used.
"""

__version__ = "0.1.0"  # the only copy: pyproject.toml reads it (setuptools dynamic version)

# public name -> module that defines it
_EXPORTS = {
    "align": "gapfix.ops.align",
    "Alignment": "gapfix.ops.align",
    "rac_labels": "gapfix.ops.rac_labels",
    "RacTargets": "gapfix.ops.rac_labels",
    "mix_embedding": "gapfix.ops.mix_embedding",
    "cross_entropy": "gapfix.ops.cross_entropy",
    "linear_cross_entropy": "gapfix.ops.cross_entropy",
    "CrossEntropyLoss": "gapfix.ops.cross_entropy",
    "LinearCrossEntropyLoss": "gapfix.ops.cross_entropy",
    "generate": "gapfix.generation",
    "generate_to_jsonl": "gapfix.generation",
    "Generation": "gapfix.generation",
    "train": "gapfix.trainer",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> object:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gapfix' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
