"""Options of the Trainer integrations: BashConfig and RacConfig (checked at construction)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

BASH_MODES = ("argmax", "sample", "topk")
RAC_MODES = ("path", "first", "last")
BACKENDS = ("auto", "hf", "vllm")


def _positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def _number(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > high or value < low or (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}")


@dataclass(frozen=True)
class BashConfig:
    """Batch-scheduled sampling (BASH) inside Trainer.

    beta: probability that an answer input token (labels != -100) is replaced by
        the frozen model's prediction for it.
    mode: "argmax" (its top token), "sample" (drawn at `temperature`) or "topk"
        (the probability-weighted mix of its top_k embeddings, at `temperature`).
    refresh: None: the predictions are made at the start of every epoch; an int N:
        every N optimizer steps. Never per batch.
    prediction_batch_size: rows per forward of the prediction pass.
    """

    beta: float = 0.1
    mode: str = "argmax"
    temperature: float = 1.0
    top_k: int = 4
    refresh: int | None = None
    prediction_batch_size: int = 16

    def __post_init__(self) -> None:
        _number("beta", self.beta, 0.0, 1.0)
        if self.mode not in BASH_MODES:
            raise ValueError(f"mode must be one of {BASH_MODES}, got {self.mode!r}")
        _number("temperature", self.temperature, 0.0, float("inf"), open_low=True)
        _positive_int("top_k", self.top_k)
        _positive_int("refresh", self.refresh, optional=True)
        _positive_int("prediction_batch_size", self.prediction_batch_size)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RacConfig:
    """Reference-answer-based correction (RAC) inside Trainer.

    mode: which correction is the label after each generated prefix ("path": the
        next token of one optimal alignment, "first" / "last": of the first / last
        optimal alignment; see gapfix.rac_labels).
    temperature: sampling temperature of the generated answers (0: greedy).
    samples: answers generated per prompt.
    prompts_per_iteration: prompts answered per iteration (None: the whole dataset),
        drawn without replacement, reshuffled each iteration.
    sft_ratio: SFT rows (the dataset's own reference rows) per RAC row in an iteration.
    backend: "auto" (vLLM where installed and the model is on a GPU, else transformers),
        "hf" or "vllm".
    refresh: optimizer steps per iteration (None: one pass over the iteration's rows).
    max_new_tokens: the generation limit; an answer cut there is "length", not finished.
    generation_batch_size: prompts per generation chunk (None: 8).
    vllm_tensor_parallel_size, vllm_gpu_memory_utilization: the colocated vLLM engine's, under
        torchrun (gapfix.generation.colocate): ranks per engine (groups of that many ranks
        generate the same chunks), and the fraction of the GPU it may take.
    """

    mode: str = "path"
    temperature: float = 1.0
    samples: int = 1
    prompts_per_iteration: int | None = None
    sft_ratio: float = 0.0
    backend: str = "auto"
    refresh: int | None = None
    max_new_tokens: int = 128
    generation_batch_size: int | None = None
    vllm_tensor_parallel_size: int = 1
    vllm_gpu_memory_utilization: float = 0.4

    def __post_init__(self) -> None:
        if self.mode not in RAC_MODES:
            raise ValueError(f"mode must be one of {RAC_MODES} (soft 'all' needs soft targets, which "
                             f"Trainer's labels cannot carry), got {self.mode!r}")
        _number("temperature", self.temperature, 0.0, float("inf"))
        _positive_int("samples", self.samples)
        _positive_int("prompts_per_iteration", self.prompts_per_iteration, optional=True)
        _number("sft_ratio", self.sft_ratio, 0.0, float("inf"))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _positive_int("refresh", self.refresh, optional=True)
        _positive_int("max_new_tokens", self.max_new_tokens)
        _positive_int("generation_batch_size", self.generation_batch_size, optional=True)
        _positive_int("vllm_tensor_parallel_size", self.vllm_tensor_parallel_size)
        _number("vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, 0.0, 1.0, open_low=True)

    def to_dict(self) -> dict:
        return asdict(self)
