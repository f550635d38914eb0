"""vLLM colocated with training under torchrun: one engine per rank, or per group of `tp` ranks.

TRL's colocate mode, for gapfix's reference trainer: every rank of the torchrun job runs a vLLM
engine in its own process beside the model it trains (vLLM's `external_launcher` executor, which
joins the job's torch.distributed world instead of spawning workers). With tensor parallelism the
world is cut into groups of `tp` consecutive ranks (ranks g*tp .. g*tp+tp-1); the ranks of a group
hold one engine between them, each rank a 1/tp shard of its weights, and must feed it the same
prompts in the same calls. vLLM takes the world divided by tp as its data-parallel size.

An iteration's offline phase is `begin(model)` (wake the engine, give it the trained weights),
`generate` calls (gapfix.generate(..., backend=engine)), `end()` (sleep). Where the platform has
vLLM's sleep mode (CUDA, ROCm, XPU; not CPU), sleep frees the engine's device memory while the
trainer runs: level 2 (the default) drops the weights and the KV cache, which suits an engine whose
weights are replaced every iteration anyway; level 1 keeps a copy of the weights in host memory.
On a platform without sleep mode the engine stays resident and sleep / wake are skipped.

Weights go from the trained model to the engine in memory, never through disk: the engine starts
from the model's config alone on random weights (load_format="dummy") and every `begin` copies
the model's tensors in (gapfix.generation.vllm_backend.push_weights; a PEFT model's adapters
merged). Under FSDP every parameter is gathered to its full tensor, one at a time, on every rank
(a collective: every rank calls `begin`).

One engine lives per process, for the process's lifetime: vLLM keeps its parallel state in
module globals, and shutting an external-launcher engine down (`release_colocated`) also
destroys torch.distributed's default process group (vLLM's cleanup does), so it is for the end
of a job, after its last collective.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

from gapfix.generation.vllm_backend import (
    _VLLM_CPU_ENV,
    MODEL_COPY_PREFIX,
    _ProcessStateGuard,
    _VLLMBackend,
    checkpoint_weights,
    push_weights,
)

__all__ = ["ColocatedEngine", "TPShare", "check_engine_options", "colocated_engine", "release_colocated",
           "sleep_mode_available", "tp_share", "world_position"]

SLEEP_LEVELS = (1, 2)
_STAMPED = ("transformers_version", "dtype", "torch_dtype", "name_or_path", "architectures")
_ACTIVE: dict = {}  # "engine" -> the process's ColocatedEngine, "key" -> what it was built for
_REFUSED: set = set()  # keys of the engines vLLM refused to start ("auto" then generates with hf)


@dataclass(frozen=True)
class TPShare:
    """Where a rank stands among the tensor-parallel groups: its group, the number of groups,
    the chunks its group generates (contiguous, sizes differing by at most one) and whether it
    writes them (the group's first rank; the others generate the same rows and write nothing)."""
    group: int
    groups: int
    chunks: range
    writes: bool


def tp_share(rank: int, world: int, tp: int, num_chunks: int) -> TPShare:
    """The share of `num_chunks` chunks that `rank` of `world` generates when groups of `tp`
    consecutive ranks share an engine. world 1 (one process) builds every chunk whatever tp is."""
    from gapfix.data.arrow import shard_range

    _check_tp(tp, world if world > 1 else tp)
    if world == 1:
        return TPShare(0, 1, range(num_chunks), True)
    group, groups = rank // tp, world // tp
    return TPShare(group, groups, shard_range(num_chunks, group, groups), rank % tp == 0)


def _check_tp(tp, world: int) -> None:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"vllm_tensor_parallel_size must be an int >= 1, got {tp!r}")
    if world % tp:
        raise ValueError(f"vllm_tensor_parallel_size {tp} does not divide the world size {world}: "
                         "each group of that many ranks shares one vLLM engine")


def check_engine_options(tensor_parallel_size, gpu_memory_utilization) -> None:
    """The colocated engine's two knobs, each refused by name when out of range (a trainer's
    config checks them before any engine starts)."""
    _check_tp(tensor_parallel_size, tensor_parallel_size if isinstance(tensor_parallel_size, int) else 1)
    if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, (int, float)) \
            or not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")


def _check_options(tensor_parallel_size, gpu_memory_utilization, sleep_level) -> None:
    _, world, launched = world_position()
    check_engine_options(tensor_parallel_size, gpu_memory_utilization)
    if tensor_parallel_size > 1 and not launched:
        raise ValueError(f"vllm_tensor_parallel_size {tensor_parallel_size} needs torchrun (one process "
                         "per rank of the group)")
    _check_tp(tensor_parallel_size, world)
    if sleep_level not in SLEEP_LEVELS:
        raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level!r}")


def world_position() -> Tuple[int, int, bool]:
    """(rank, world size, whether this process is one of several in a job): torch.distributed's
    when it is initialised, else torchrun's environment, else (0, 1, False). A world of one is
    not a job: an in-process vLLM engine initialises torch.distributed with a world of one in
    its host process, and one process needs no external launcher."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        rank, world = 0, 1
    return rank, world, world > 1


def sleep_mode_available() -> bool:
    """Whether vLLM's sleep mode runs on this platform (CUDA, ROCm, XPU; not CPU)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def _full_weights(model) -> Iterator[Tuple[str, "object"]]:
    """(checkpoint name, full tensor) pairs of the trained model (vllm_backend.checkpoint_weights:
    through DDP, PEFT adapters merged). An FSDP shard (DTensor) is gathered to its full tensor as
    it is reached: every rank must iterate, in the same order."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no FSDP2 either
        DTensor = ()
    for name, tensor in checkpoint_weights(model):
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


def _write_owner(folder: Path) -> None:
    """Records this process as the folder's owner, so that remove_stale_model_copies removes it
    after a kill (the record vllm_backend's own model copies carry)."""
    import socket

    from gapfix.generation import vllm_backend

    owner = {"pid": os.getpid(), "start": vllm_backend._process_start(os.getpid()),
             "host": socket.gethostname()}
    (folder / vllm_backend._COPY_OWNER).write_text(json.dumps(owner), encoding="utf-8")


class ColocatedEngine(_VLLMBackend):
    """A vLLM engine in this process for the model being trained (see the module doc); also a
    gapfix.generate backend: `gapfix.generate(model, prompts, backend=engine, ...)`.

    model: the trained transformers model (through DDP / FSDP2 / PEFT); its config starts the
        engine, its weights come in on every `begin`. tensor_parallel_size: ranks per engine (divides the world size).
    gpu_memory_utilization: the fraction of the GPU the engine may take (CUDA only; the trainer
        shares the GPU). dtype: None runs the model's own dtype. sleep_level: 1 or 2.
    enable_sleep_mode: None where the platform has it. engine_kwargs: more vllm.LLM arguments.
    llm_class: what builds the engine (vllm.LLM; tests pass a fake)."""

    name = "vllm"

    def __init__(self, model, *, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.4, dtype=None, sleep_level: int = 2,
                 enable_sleep_mode: Optional[bool] = None, engine_kwargs: Optional[dict] = None,
                 llm_class=None):
        import torch

        self.rank, self.world, self.launched = world_position()
        _check_options(tensor_parallel_size, gpu_memory_utilization, sleep_level)
        self.tensor_parallel_size = tensor_parallel_size
        self.group = self.rank // tensor_parallel_size
        self.sleep_level = sleep_level
        if not torch.cuda.is_available():
            for name, value in _VLLM_CPU_ENV.items():
                os.environ.setdefault(name, value)
        # in this process (external_launcher forces it; one plain process needs it for the pushes)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.can_sleep = sleep_mode_available() if enable_sleep_mode is None else bool(enable_sleep_mode)
        self.calls: list = []  # what was done to the engine, in order ("sleep 2", "wake weights", "push"...)
        self.asleep = False
        self._folder = tempfile.TemporaryDirectory(prefix=MODEL_COPY_PREFIX)
        folder = Path(self._folder.name).resolve()
        _write_owner(folder)
        # the engine starts on random weights (no weight file) and gets the model's on begin()
        weights_dtype = self._write_config(model, folder)
        options = dict(
            model=str(folder),
            dtype=str(dtype).replace("torch.", "") if dtype is not None else weights_dtype,
            skip_tokenizer_init=True,  # token ids in and out; the caller's tokenizer decodes
            tensor_parallel_size=tensor_parallel_size,
            # the ranks of a group sample in lockstep: the same seed; requests carry their own seeds
            seed=self.group,
            enable_sleep_mode=self.can_sleep,
        )
        if self.launched:
            options["distributed_executor_backend"] = "external_launcher"
        if torch.cuda.is_available():
            options["gpu_memory_utilization"] = float(gpu_memory_utilization)
        else:
            options["enforce_eager"] = True
        options["load_format"] = "dummy"
        options.update(engine_kwargs or {})
        if llm_class is None:
            import logging

            from vllm import LLM as llm_class

            logging.getLogger("vllm.renderers.base").setLevel(logging.ERROR)  # no chat-template warm-up
        with _ProcessStateGuard():
            self.llm = llm_class(**options)
        self.options = options
        self.engine = self  # _VLLMBackend.generate runs self.engine.llm

    # ------------------------------------------------------------ weights
    @staticmethod
    def _write_config(model, folder: Path) -> str:
        """The model's config.json into `folder` (with the architecture vLLM runs); returns the
        dtype of the model's weights. Not save_pretrained: under torch.distributed it writes on rank
        0 only, and every rank's engine reads its own folder."""
        base = _base_model(model)  # through DDP and PEFT: the base model's config
        config = json.loads(base.config.to_json_string(use_diff=False))
        config["architectures"] = config.get("architectures") or [type(base).__name__]
        (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        dtypes = [p.dtype for p in base.parameters() if p.is_floating_point()]
        return str(dtypes[0]).replace("torch.", "") if dtypes else "float32"

    def push(self, model) -> None:
        """Gives the engine the model's current weights, in memory (vllm_backend.push_weights)."""
        self.calls.append("push")
        with _ProcessStateGuard():
            push_weights(self.llm, _full_weights(model))

    # ------------------------------------------------------------ one offline phase
    def begin(self, model) -> None:
        """Before an offline phase: wake the engine and give it the model's current weights. Every
        rank calls it (a collective under FSDP)."""
        with _ProcessStateGuard():
            if self.asleep and self.sleep_level == 2:
                # weights first: the KV cache stays released while the new weights come in
                self.calls.append("wake weights")
                self.llm.wake_up(tags=["weights"])
            elif self.asleep:
                self.calls.append("wake")
                self.llm.wake_up()
        self.push(model)
        if self.asleep and self.sleep_level == 2:
            with _ProcessStateGuard():
                self.calls.append("wake kv_cache")
                self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False

    def end(self) -> None:
        """After an offline phase: release the engine's device memory for training (sleep mode),
        where the platform has it."""
        if not self.can_sleep or self.asleep:
            return
        with _ProcessStateGuard():
            self.calls.append(f"sleep {self.sleep_level}")
            self.llm.sleep(level=self.sleep_level)
        self.asleep = True

    def discard(self):
        """Kept after a failed call (the base class would close it): it lives for the process."""

    def close(self) -> None:
        """Shuts the engine down. vLLM's shutdown also destroys torch.distributed's default process
        group: call it after the job's last collective."""
        llm, self.llm = self.llm, None
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            with _ProcessStateGuard():
                shutdown()
        self._folder.cleanup()


def _base_model(model):
    """The transformers model under DDP and PEFT (its save_pretrained writes the merged weights
    it is given under the base checkpoint's names)."""
    from gapfix.models import unwrap_model

    return unwrap_model(model)


def _engine_key(model, tensor_parallel_size, gpu_memory_utilization, dtype, sleep_level, engine_kwargs):
    config = getattr(_base_model(model), "config", None)
    to_dict = getattr(config, "to_dict", None)
    # what saving a checkpoint stamps on the config (versions, names, dtype) is not the model's shape
    shape = {k: v for k, v in to_dict().items() if not k.startswith("_") and k not in _STAMPED} \
        if callable(to_dict) else repr(config)
    return json.dumps([shape, tensor_parallel_size,
                       gpu_memory_utilization, None if dtype is None else str(dtype), sleep_level,
                       engine_kwargs or {}], sort_keys=True, default=str)


def colocated_engine(model, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.4,
                     dtype=None, sleep_level: int = 2, engine_kwargs: Optional[dict] = None,
                     llm_class=None, fall_back: bool = False) -> Optional[ColocatedEngine]:
    """This process's colocated engine: started on the first call (every rank of the job must make
    it), the same engine afterwards for the same model config and options. Another config or other
    options in the same process: ValueError (vLLM holds one external-launcher engine per process).
    fall_back: where vLLM refuses to start on the model, warn and return None (then, and for the
    rest of the process, the caller generates with transformers) instead of raising."""
    key = _engine_key(model, tensor_parallel_size, gpu_memory_utilization, dtype, sleep_level, engine_kwargs)
    _check_options(tensor_parallel_size, gpu_memory_utilization, sleep_level)  # errors of the caller's
    if fall_back and key in _REFUSED:
        return None
    engine = _ACTIVE.get("engine")
    if engine is not None:
        if _ACTIVE["key"] != key:
            raise ValueError("this process runs a colocated vLLM engine for another model config or other "
                             "options (vllm_tensor_parallel_size, vllm_gpu_memory_utilization...); one "
                             "engine per process: release_colocated() ends it, with torch.distributed")
        return engine
    try:
        engine = ColocatedEngine(model, tensor_parallel_size=tensor_parallel_size,
                                 gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                                 sleep_level=sleep_level, engine_kwargs=engine_kwargs, llm_class=llm_class)
    except Exception as err:
        if not fall_back:
            raise
        import warnings

        _REFUSED.add(key)
        warnings.warn(f"generation_backend='auto': vLLM could not start a colocated engine for this model "
                      f"({type(err).__name__}: {str(err)[:300]}); generating with transformers",
                      RuntimeWarning, stacklevel=2)
        return None
    _ACTIVE.update(engine=engine, key=key)
    return engine


def check_vllm_head_size(model) -> None:
    """ValueError naming the head size where vLLM's CPU attention (the backend a CPU model runs
    on) has no kernel for it, before any engine starts; the list is vLLM's own. GPU backends
    cover other sizes between them, so a GPU model is left to vLLM."""
    import torch

    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except Exception:  # vLLM absent, or laid out otherwise: the engine itself will say
        return
    first = next(iter(model.parameters()), None)
    config = getattr(_base_model(model), "config", None)
    if first is None or first.device.type != "cpu" or config is None or torch.cuda.is_available():
        return
    heads = getattr(config, "num_attention_heads", None)
    head_size = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size is not None and head_size not in supported:
        raise ValueError(f"model: attention head size {head_size} has no kernel in vLLM's CPU attention "
                         f"(supported: {supported}); generate with backend 'hf' (or 'auto', which falls back)")


def generation_engine(model, backend: str, *, tensor_parallel_size: int = 1,
                      gpu_memory_utilization: float = 0.4) -> Optional[ColocatedEngine]:
    """The engine a RAC iteration generates on, for both drivers: this process's colocated vLLM
    engine when a torchrun job generates with vLLM (an ordinary engine would hang there), else
    None (gapfix.generate then runs `backend` itself). backend "vllm": the engine under torchrun
    (an error where vLLM cannot start), and tensor_parallel_size > 1 without torchrun is refused;
    "auto" (gapfix.generate's rule: vLLM for a model on a GPU where vLLM is installed): the engine
    under torchrun where vLLM starts on the model, else None (transformers); "hf": None. Every
    rank calls it (a collective where an engine starts)."""
    from gapfix.generation.runner import _resolve_backend

    check_engine_options(tensor_parallel_size, gpu_memory_utilization)
    if backend == "hf" or (backend == "auto" and _resolve_backend("auto", model) == "hf"):
        return None
    if not world_position()[2]:
        if tensor_parallel_size > 1 and backend == "vllm":
            raise ValueError(f"vllm_tensor_parallel_size {tensor_parallel_size} needs torchrun (one process per "
                             "rank of the group)")
        return None
    return colocated_engine(model, tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, fall_back=backend == "auto")


def release_colocated() -> bool:
    """Shuts this process's colocated engine down (and, through vLLM, torch.distributed's default
    process group); True when there was one."""
    engine = _ACTIVE.pop("engine", None)
    _ACTIVE.pop("key", None)
    if engine is None:
        return False
    engine.close()
    return True
