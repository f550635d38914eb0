"""The vLLM backend and its engine cache.

One engine is kept per (model folder, dtype, engine options), so that a trainer that saves a
checkpoint and regenerates every iteration pays vLLM's start-up once: when the folder's weight
files change, the engine reloads the weights in place (and drops its prefix cache);
`release_engines()` frees every engine.

An in-memory model never goes through disk as weights: its engine is built once, with random
weights (vLLM's load_format="dummy"), from a temporary folder holding only what describes the
architecture (config.json, generation_config.json, the tokenizer's files), and every call then
copies the model's current tensors into it (`push_weights`; the prefix cache is dropped). The
push happens on every call: a parameter's version counter misses updates made through `.data`,
so "unchanged" cannot be told cheaply and soundly. A PEFT (LoRA) model is pushed merged, base +
adapter, under the base model's names, computed apart from the user's model (which is left as
it is). The folder records its owner process so that a later run removes the folders of a
killed one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from gapfix.generation.common import _is_model_path, _model_dir, derive_seed

if TYPE_CHECKING:
    import torch

# Defaults for vLLM on CPU, each set only where the environment does not set it already:
# a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE is in GiB; vLLM's own default takes most of
# the RAM), the engine in this process rather than a worker process (start-up about 2 s
# instead of 15-20 s, and no `if __name__ == "__main__"` guard needed in the caller's
# script), nothing fetched from a hub, no usage reports, quiet logs.
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
# In-memory models handed to the vLLM backend are described (config, no weights)
# in one temporary folder per model object; their weights are pushed from memory.
_SAVED_MODELS: dict = {}  # id(model) -> [weakref, TemporaryDirectory, config JSON written]


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


def in_distributed_job() -> bool:
    """Whether this process is one rank of a multi-process job: torch.distributed's world, or
    torchrun's WORLD_SIZE, is above 1. There an ordinary in-process vLLM engine is not safe: its
    set-up joins torch.distributed (vLLM's parallel groups are made with new_group on the job's
    world, a collective), so a rank that starts one alone, as an evaluation on rank 0 does, waits
    for the others forever; and its shutdown destroys process groups the trainer still uses.
    A process group of one is not such a job: an ordinary engine makes one itself."""
    import sys

    torch = sys.modules.get("torch")  # a process that never imported torch has no process group
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


DISTRIBUTED_REFUSAL = (
    "backend='vllm' in a process of a torchrun job (a torch.distributed world or WORLD_SIZE above 1): "
    "gapfix does not start an ordinary vLLM engine there, as its set-up joins the job's process group "
    "and hangs unless every rank starts one in step. Generate with vLLM through the process's "
    "colocated engine, created and used by every rank together: engine = gapfix.generation.colocate."
    "colocated_engine(model); engine.begin(model); gapfix.generate(model, prompts, backend=engine); "
    "or generate on one rank with backend='hf' (or 'auto', which then uses transformers)")


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


class _InputError(ValueError):
    """A bad argument of push_weights / checkpoint_weights, raised as is through vLLM's loader."""


def checkpoint_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of in-memory `model` under the names of its saved checkpoint, which
    are the names vLLM's loaders map from: a transformers model's state dict (through a DDP
    wrapper). A PEFT model, or a model holding injected LoRA layers, yields the base model's
    names, each adapted layer's weight (and bias, for lora_bias) merged with its active, not yet
    merged adapters in a new tensor: the model itself is not changed. Other tensors are detached
    views, not copies. ValueError names a PEFT layer that cannot be merged this way."""
    import sys

    import torch

    for _ in range(4):  # DistributedDataParallel / DataParallel
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module) or type(model).__name__ not in (
                "DistributedDataParallel", "DataParallel"):
            break
        model = inner
    if callable(getattr(model, "get_base_model", None)):  # peft.PeftModel
        model = model.get_base_model()
    peft = sys.modules.get("peft")  # a model with PEFT layers in it has imported peft
    tuner = getattr(getattr(getattr(peft, "tuners", None), "tuners_utils", None), "BaseTunerLayer", None)
    if tuner is None or not any(isinstance(m, tuner) for m in model.modules()):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    yield from _merged_tensors(model, "", tuner, LoraLayer, AuxiliaryTrainingWrapper)


def _merged_tensors(module, prefix: str, tuner, lora_layer, wrapper):
    """The state dict of `module` (a model holding PEFT layers) with LoRA merged: see checkpoint_weights."""
    if isinstance(module, wrapper) or (isinstance(module, tuner) and not isinstance(module, lora_layer)):
        raise _InputError(f"model: {prefix.rstrip('.') or 'the model'} is a {type(module).__name__}; only "
                          f"LoRA layers can be merged into the weights pushed to vLLM (modules_to_save and "
                          f"other PEFT methods are not supported: merge the adapter, or use backend='hf')")
    if isinstance(module, lora_layer):
        base = module.get_base_layer()
        adapters = [] if module.disable_adapters else [
            name for name in module.active_adapters
            if name not in module.merged_adapters and (name in module.lora_A or name in module.lora_embedding_A)]
        merged = _merged_lora(module, base, adapters, prefix) if adapters else {}
        for name, tensor in base.state_dict().items():
            yield prefix + name, merged.get(name) if merged.get(name) is not None else tensor
        return
    for name, param in module._parameters.items():
        if param is not None:
            yield prefix + name, param.detach()
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, buffer.detach()
    for name, child in module._modules.items():
        if child is not None:
            yield from _merged_tensors(child, f"{prefix}{name}.", tuner, lora_layer, wrapper)


def _merged_lora(module, base, adapters: list, prefix: str) -> dict:
    """{"weight": ..., "bias": ...} of LoRA layer `module` with `adapters` merged, in new tensors
    (no autograd graph: no_grad here, not around the caller's generator, whose suspension would
    leave grad mode off in the caller)."""
    import torch

    with torch.no_grad():
        weight = base.weight.detach().clone()
        bias = None if getattr(base, "bias", None) is None else base.bias.detach().clone()
        for name in adapters:
            # peft's own arithmetic, as in its safe merge: DoRA and other variants merge their way
            if name in module.lora_variant:
                weight = module.lora_variant[name].merge_safe(module, name, weight)
            else:
                weight += module.get_delta_weight(name).to(weight.dtype)
            if module.lora_bias.get(name):
                if bias is None:
                    raise _InputError(f"model: {prefix.rstrip('.')} has lora_bias but its base layer no bias")
                bias += (module.lora_B[name].bias * module.scaling[name]).to(bias.dtype)
    return {"weight": weight, "bias": bias}


def push_weights(llm, weights) -> None:
    """Copy `weights` into the running vLLM engine `llm` (a vllm.LLM) in place, and drop its prefix
    cache (cached keys and values were computed with the old weights). Nothing goes through disk.

    llm: an engine running in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, or torchrun's
        external_launcher); a multiprocess engine is refused with a ValueError. A tensor-parallel
        engine takes its own shard of each full tensor.
    weights: an nn.Module (a transformers model or a PEFT model: see `checkpoint_weights`), a dict
        name -> tensor, or an iterable of (name, tensor) pairs, under the checkpoint's names (what
        save_pretrained writes; vLLM maps them to its fused layers itself). Any dtype and device:
        vLLM copies into its own.

    Every parameter of the engine must receive a weight, and every name must be one the engine
    knows, with a matching shape: else ValueError naming the parameter (the engine may then hold a
    mix of old and new weights: push again, or drop it). Returns nothing. An engine in sleep mode
    must have its weights woken up first (llm.wake_up(tags=["weights"]))."""
    import torch

    executor = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    if executor is None or getattr(executor, "driver_worker", None) is None:
        raise ValueError("llm: push_weights needs the vLLM engine in this process "
                         "(VLLM_ENABLE_V1_MULTIPROCESSING=0, or distributed_executor_backend="
                         "'external_launcher'); this one runs in worker processes")
    if isinstance(weights, torch.nn.Module):
        pairs = checkpoint_weights(weights)
    elif isinstance(weights, dict):
        pairs = iter(weights.items())
    else:
        pairs = iter(weights)
    current = []  # the name being loaded, for the error message

    def named(items):
        for name, tensor in items:
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise _InputError(f"weights: expected (name, tensor) pairs, got ({type(name).__name__}, "
                                  f"{type(tensor).__name__})")
            current[:] = [name]
            yield name, tensor.detach()

    try:
        missing = llm.collective_rpc(_load_in_worker, args=(named(pairs),))
    except _InputError:
        raise
    except (ValueError, KeyError, AttributeError, AssertionError, IndexError, RuntimeError) as err:
        # vLLM's loaders: an unknown name (ValueError, KeyError), a shape that differs
        # (AssertionError, RuntimeError from copy_); named by the pair being loaded
        raise ValueError(f"weights: vLLM could not load {current[0] if current else 'the first weight'!r} "
                         f"({type(err).__name__}: {str(err)[:200]})") from err
    unfilled = sorted({name for names in missing for name in (names or ())})
    if unfilled:
        shown = ", ".join(repr(name) for name in unfilled[:8]) + (" ..." if len(unfilled) > 8 else "")
        raise ValueError(f"weights: no weight given for vLLM's parameter(s) {shown} (the weights' names do "
                         f"not map onto this engine's architecture)")
    llm.reset_prefix_cache()


def _load_in_worker(worker, pairs) -> list | None:
    """Runs inside vLLM's worker (collective_rpc): what vLLM's own in-place reload from a weights
    iterator does, keeping the set of loaded parameters to return those that got nothing. vLLM on
    CPU repacks linear weights after loading (oneDNN); the layerwise reload redoes that, which a
    bare model.load_weights would not. Returns the names of the parameters left without a weight,
    or None where the model's loader does not report what it loaded."""
    import logging

    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    runner = worker.model_runner
    model = runner.get_model()
    config = worker.vllm_config
    lora = config.lora_config is not None  # vLLM's own LoRA wraps layers in base_layer
    expected = {name.replace(".base_layer.", ".") if lora else name for name, _ in model.named_parameters()}
    # The layerwise reload logs "Failed to load weights" for every layer that got nothing,
    # including those that hold only computed buffers (rotary tables): the caller checks
    # the returned names instead, loudly.
    quiet = logging.getLogger(finalize_layerwise_reload.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with set_current_vllm_config(config):
            initialize_layerwise_reload(model)
            try:
                loaded = model.load_weights(pairs)
            finally:
                finalize_layerwise_reload(model, config.model_config)
    finally:
        quiet.setLevel(level)
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        if callable(getattr(runner, reset, None)):
            getattr(runner, reset)()
    if loaded is None or config.model_config.quantization is not None:
        return None  # a quantized engine's parameters (scales, packed weights) are not the checkpoint's
    return sorted(expected - set(loaded))


class _Engine:
    """One vllm.LLM for a model folder: its weights from the folder's files, or with
    pushed=True random ones (load_format="dummy") for `push_weights` to replace."""

    def __init__(self, path: Path, dtype, engine_kwargs, pushed: bool = False):
        import torch

        if in_distributed_job():  # would hang (see in_distributed_job): the colocated engine serves there
            raise ValueError(DISTRIBUTED_REFUSAL)
        if not torch.cuda.is_available():
            for name, value in _VLLM_CPU_ENV.items():
                os.environ.setdefault(name, value)
        self.path = path
        self.pushed = pushed  # weights come from memory (push_weights) on every call, never from files
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
                trust_remote_code=False,  # a model folder's own code never runs
            )
            if torch.cuda.is_available():
                # Leave room for the trainer that shares the GPU.
                options["gpu_memory_utilization"] = 0.4
            else:
                options["enforce_eager"] = True
            options.update(self.engine_kwargs)
            if pushed:  # the folder holds no weights; they come from memory
                options["load_format"] = "dummy"
            # Without a tokenizer vLLM's chat-template warm-up fails and logs
            # a traceback; nothing here uses chat templates.
            import logging

            logging.getLogger("vllm.renderers.base").setLevel(logging.ERROR)
            self.llm = LLM(**options)
        self.weights = None if pushed else _weights_fingerprint(path)
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
    for _, tmp, _ in list(_SAVED_MODELS.values()):
        tmp.cleanup()
    _SAVED_MODELS.clear()
    _VLLM_REFUSED.clear()
    gc.collect()
    return count


def _engine_key(path: Path, dtype, engine_kwargs):
    return (str(path), None if dtype is None else str(dtype),
            json.dumps(engine_kwargs or {}, sort_keys=True, default=str))


def _engine_for(path: Path, dtype, engine_kwargs, reload: bool):
    """(cache key, engine) for a model folder: the cached engine, refreshed
    to the folder's current weights, or a new one."""
    key = _engine_key(path, dtype, engine_kwargs)
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


def _model_dtype(model) -> str:
    """The dtype in-memory `model` computes in: that of its first floating-point parameter."""
    for param in model.parameters():
        if param.is_floating_point():
            return str(param.dtype).replace("torch.", "")
    return "float32"


def _adopted_engine(key, config):
    """A cached engine that another in-memory model of the same architecture (config, dtype,
    engine options) had, taken out of the cache, or None. Every call pushes all weights, so the
    engine serves the new model as well; and it must: a second engine in one process shares
    vLLM's process-wide parallel state with the first, and closing the first (when its model is
    collected) breaks the second."""
    for other, engine in list(_ENGINES.items()):
        if other[1:] == key[1:] and getattr(engine, "pushed", False) and engine.config == config:
            return _ENGINES.pop(other)
    return None


def _pushed_engine_for(model, path: Path, dtype, engine_kwargs, reload: bool):
    """(cache key, engine) for in-memory `model` whose architecture folder is `path`: the
    cached engine, its own or that of an earlier model of the same architecture (a new one where
    the config changed, or for reload=True), holding the
    model's current weights, pushed from memory."""
    import gc

    if dtype is None:  # what the model computes in, so that both backends compute the same
        dtype = _model_dtype(model)
    key, config = _engine_key(path, dtype, engine_kwargs), _config_fingerprint(path)
    engine = _ENGINES.pop(key, None)
    if engine is None and not reload:
        engine = _adopted_engine(key, config)
    if engine is not None and (reload or engine.config != config):
        engine.close()
        engine = None
    if engine is None:
        gc.collect()
        engine = _Engine(path, dtype, engine_kwargs or {}, pushed=True)
    try:
        push_weights(engine.llm, model)
    except BaseException:
        engine.close()  # random or half-pushed weights: never served
        raise
    _ENGINES[key] = engine
    return key, engine


def _refusal_key(model):
    """What vLLM's refusal of a model is remembered by: its folder, or for an
    in-memory model its config (the architecture is what vLLM refuses)."""
    if _is_model_path(model):
        return str(_model_dir(model))
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    return hashlib.sha256(to_json().encode()).hexdigest() if callable(to_json) else None


MODEL_COPY_PREFIX = "gapfix-vllm-"
_COPY_OWNER = "gapfix-owner.json"


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux /proc), which tells its owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _owner_alive(owner: dict) -> bool:
    import socket

    if owner.get("host") != socket.gethostname():
        return True  # a temp folder shared between machines: cannot tell, keep it
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return owner.get("start") is None or _process_start(pid) in (None, owner["start"])


def remove_stale_model_copies(folder: str | None = None) -> list:
    """Removes the model copies for vLLM ($TMPDIR/gapfix-vllm-*) whose owning process is
    gone (killed before it could clean up); returns their paths. A copy without an owner
    record (being created, or from an older gapfix) or of another user is left alone."""
    import shutil

    folder = folder or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(MODEL_COPY_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            with open(os.path.join(entry.path, _COPY_OWNER), encoding="utf-8") as handle:
                owner = json.load(handle)
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and not _owner_alive(owner):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _saved_copy(model, tokenizer) -> Path:
    """The folder describing in-memory `model` to vLLM: config.json, generation_config.json and
    the tokenizer's files, no weights (they are pushed). Written when first asked for and again
    when the model's config changes. It lives in $TMPDIR and records its owner process, so that
    the next run removes it if this one is killed."""
    from gapfix.models import unwrap_model

    inner = unwrap_model(model)  # a PEFT model is served as its base architecture
    config_text = inner.config.to_json_string()
    entry = _SAVED_MODELS.get(id(model))
    if entry is None or entry[0]() is not model:
        import socket

        remove_stale_model_copies()
        tmp = tempfile.TemporaryDirectory(prefix=MODEL_COPY_PREFIX)
        owner = {"pid": os.getpid(), "start": _process_start(os.getpid()), "host": socket.gethostname()}
        Path(tmp.name, _COPY_OWNER).write_text(json.dumps(owner), encoding="utf-8")
        key = id(model)
        _SAVED_MODELS[key] = [weakref.ref(model, lambda _ref: _forget_saved(key)), tmp, None]
        entry = _SAVED_MODELS[key]
    path = Path(entry[1].name).resolve()
    if entry[2] != config_text:
        inner.config.save_pretrained(path)
        if getattr(inner, "generation_config", None) is not None:
            inner.generation_config.save_pretrained(path)
        if tokenizer is not None and entry[2] is None:
            tokenizer.save_pretrained(path)
        entry[2] = config_text
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
            self.engine_key, self.engine = _pushed_engine_for(
                model, _saved_copy(model, tokenizer), dtype, engine_kwargs, reload)
            return
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
