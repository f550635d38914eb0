"""What the backends and the writers share: the `Generation` record, argument checks, and the
model, tokenizer and prompt resolution that turns a caller's inputs into checked token ids."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
from pathlib import Path

BACKENDS = ("auto", "vllm", "hf")
FINISH_REASONS = ("eos", "length")


@dataclasses.dataclass
class Generation:
    """One generated answer: sample `sample_index` (0..n-1) of prompt `prompt_index`."""

    prompt_index: int
    sample_index: int
    token_ids: list
    finish_reason: str  # "eos" | "length"
    text: str | None = None
    logprobs: list | None = None  # log p(token_ids[k] | prompt, token_ids[:k]), one per token
    stop_token_id: int | None = None  # the EOS token it stopped on (finish_reason "eos")

    @property
    def finished(self) -> bool:
        """The model ended its answer itself (an EOS token), rather than running out of length."""
        return self.finish_reason == "eos"

    def token_ids_with_stop(self) -> list:
        """token_ids followed by the EOS token the model stopped on, if it finished."""
        tokens = list(self.token_ids)
        return tokens + [self.stop_token_id] if self.finished and self.stop_token_id is not None else tokens

    def to_record(self) -> dict:
        record = {
            "prompt_index": self.prompt_index,
            "sample_index": self.sample_index,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
        }
        if self.text is not None:
            record["text"] = self.text
        if self.logprobs is not None:
            record["logprobs"] = list(self.logprobs)
        if self.stop_token_id is not None:
            record["stop_token_id"] = self.stop_token_id
        return record

    @classmethod
    def from_record(cls, record: dict) -> "Generation":
        return cls(
            prompt_index=record["prompt_index"],
            sample_index=record["sample_index"],
            token_ids=record["token_ids"],
            finish_reason=record["finish_reason"],
            text=record.get("text"),
            logprobs=record.get("logprobs"),
            stop_token_id=record.get("stop_token_id"),
        )


def _check_sampling(n, temperature, top_p, max_new_tokens, backend, batch_size):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")


def _is_model_path(model) -> bool:
    return isinstance(model, (str, os.PathLike))


def _model_dir(model) -> Path:
    path = Path(os.fspath(model))
    if not path.is_dir():
        raise ValueError(f"model {str(path)!r} is not an existing model folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"model {str(path)!r} has no config.json: not a saved model folder")
    from gapfix.models import check_no_remote_code

    check_no_remote_code(path)
    return path.resolve()


def _load_config(model):
    """The model's transformers config (a path is read, not loaded)."""
    if _is_model_path(model):
        from transformers import AutoConfig

        from gapfix.models import LOCAL_ONLY

        return AutoConfig.from_pretrained(_model_dir(model), **LOCAL_ONLY)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"model must be a local model folder or a transformers model, got {type(model).__name__}"
        )
    return config


def _context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_ids(config, tokenizer, generation_config=None) -> list:
    ids = []
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(generation_config, "eos_token_id", None),
                   getattr(config, "eos_token_id", None)):
        for value in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(value, int) and value not in ids:
                ids.append(value)
    return ids


def _resolve_tokenizer(model, tokenizer):
    """tokenizer=None: the model folder's tokenizer if it has one (or the
    in-memory model has none); False: no tokenizer (no text out)."""
    if tokenizer is False:
        return None
    if tokenizer is not None:
        return tokenizer
    if _is_model_path(model):
        from gapfix.models import LOCAL_ONLY, has_tokenizer

        path = _model_dir(model)
        if has_tokenizer(path):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path, **LOCAL_ONLY)
    return None


def _prepare_prompts(prompts, tokenizer, vocab_size, context_length, max_new_tokens):
    """Token-id lists for `prompts` (all text or all id lists), checked."""
    if isinstance(prompts, (str, bytes)):
        raise ValueError("prompts must be a list of prompts, not a single string")
    try:
        prompts = list(prompts)
    except TypeError:
        raise ValueError(f"prompts must be a list of strings or of token-id lists, "
                         f"got {type(prompts).__name__}") from None
    if not prompts:
        return []
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("prompts are text but no tokenizer was given (tokenizer=) "
                             "and the model folder has none")
        ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    else:
        ids = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                raise ValueError(f"prompts mixes text and token ids (prompts[{i}] is text)")
            if hasattr(prompt, "tolist"):  # a tensor or an array
                prompt = prompt.tolist()
            if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            ):
                raise ValueError(f"prompts[{i}] must be a list of int token ids or a string")
            ids.append(list(prompt))
    for i, prompt in enumerate(ids):
        if not prompt:
            raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token")
        if vocab_size is not None and (min(prompt) < 0 or max(prompt) >= vocab_size):
            bad = next(t for t in prompt if t < 0 or t >= vocab_size)
            raise ValueError(f"prompts[{i}] holds token id {bad}, outside the model's "
                             f"vocabulary [0, {vocab_size})")
        if context_length is not None and len(prompt) + max_new_tokens > context_length:
            raise ValueError(
                f"prompts[{i}] has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} "
                f"that exceeds the model's context length {context_length}"
            )
    return ids


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item `index` of a run seeded with `seed` (stable across
    processes and platforms, unlike hash())."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("float32", "float", "fp32"):
        return torch.float32
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype in ("float16", "half", "fp16"):
        return torch.float16
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")


def _read_generation_config(path: Path):
    file = path / "generation_config.json"
    if not file.is_file():
        return None
    try:
        return types.SimpleNamespace(eos_token_id=json.loads(file.read_text()).get("eos_token_id"))
    except (ValueError, OSError, AttributeError):
        return None
