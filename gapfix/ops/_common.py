"""Helpers shared by every gapfix op: the impl= vocabulary, Triton detection and launch,
integer helpers, and the validators of ids, lengths and integer options.

The impl= vocabulary (docs/ops.md has the op x impl table). Names say which implementation
runs, never which device:

    "auto"        the fastest implementation available for the tensors' device
    "torch"       the pure-PyTorch reference: the readable spec and the tests' oracle
    "torch_fast"  an optimized plain-PyTorch path (no custom kernel; any device)
    "triton"      the Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
    "native"      the C++/CUDA kernels of gapfix._C

Every public op validates its arguments once, before choosing an implementation, so every
impl (the reference included) refuses the same bad inputs with the same ValueError.

Nothing here imports triton: `triton_available` asks importlib, and kernels are imported by
the launchers when they run.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from gapfix.kernels.common import next_pow2  # noqa: F401  (shared with the kernels; triton-free)

__all__ = [
    "IMPLS", "INDEX_DTYPES", "INT64_MAX", "INT64_MIN",
    "triton_available", "triton_runs_on", "check_triton_device",
    "cdiv", "next_pow2", "FunctorchTransformError", "under_functorch", "refuse_functorch",
    "resolve_impl", "device_guard", "launch",
    "is_int", "check_int", "check_ids", "check_lengths", "check_length_values",
]

IMPLS = ("auto", "torch", "torch_fast", "triton", "native")
INDEX_DTYPES = (torch.int32, torch.int64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------------------
# Triton detection
# --------------------------------------------------------------------------------------


def triton_available() -> bool:
    """The triton package is installed (asked without importing it: importing takes seconds)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Triton can run kernels on tensors of `device`: CUDA, or CPU under TRITON_INTERPRET=1."""
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return False
    return triton_available()


def check_triton_device(device: torch.device, op: str) -> None:
    """ValueError unless impl='triton' can run on `device`."""
    if not triton_available():
        raise ValueError(f"{op}: impl='triton' needs the triton package")
    if not triton_runs_on(device):
        raise ValueError(f"{op}: impl='triton' needs CUDA tensors, got tensors on {device} "
                         "(CPU tensors run Triton only under TRITON_INTERPRET=1); "
                         "use impl='auto' or impl='torch'")


# --------------------------------------------------------------------------------------
# Integer helpers
# --------------------------------------------------------------------------------------


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)




# --------------------------------------------------------------------------------------
# torch.func transforms
# --------------------------------------------------------------------------------------


class FunctorchTransformError(NotImplementedError):
    """An op called under a torch.func transform (grad, vmap, jvp, ...) that it cannot run in."""


def under_functorch(*tensors: Any) -> bool:
    """Some tensor is a torch.func wrapper (a grad or vmap level is tracking it). False while
    torch.compile traces (it handles the transforms itself, and cannot trace this query)."""
    if torch.compiler.is_compiling():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(isinstance(t, Tensor) and wrapped(t) for t in tensors)


def refuse_functorch(op: str, why: str, *tensors: Any) -> None:
    """FunctorchTransformError naming the op when its inputs come from a torch.func transform."""
    if under_functorch(*tensors):
        raise FunctorchTransformError(f"gapfix.{op} does not run under torch.func transforms (grad, vmap, jvp, ...): "
                                      f"{why}; call it outside the transform")


# --------------------------------------------------------------------------------------
# impl resolution
# --------------------------------------------------------------------------------------


def resolve_impl(
    impl: Any,
    *,
    op: str,
    device: torch.device,
    supported: Sequence[str],
    auto: Callable[[torch.device], str],
    aliases: Optional[Mapping[str, str]] = None,
) -> str:
    """The implementation to run: one of `supported` (never "auto").

    impl: the caller's choice. aliases: deprecated spellings an op accepts (each mapped to a
    name of IMPLS, documented in docs/ops.md as deprecated). auto(device): the op's choice for
    "auto". "triton" is checked against the device here; other availability checks (the
    native build, dtypes) stay with the op, which knows what it needs.
    """
    accepted = tuple(supported) + tuple(aliases or ())
    if not isinstance(impl, str) or impl not in accepted:
        raise ValueError(f"{op}: impl must be one of {tuple(supported)}, got {impl!r}")
    impl = (aliases or {}).get(impl, impl)
    if impl == "auto":
        impl = auto(device)
    if impl == "triton":
        check_triton_device(device, op)
    return impl


# --------------------------------------------------------------------------------------
# Triton launch
# --------------------------------------------------------------------------------------


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """The context that makes `device` current, for CUDA devices (a no-op elsewhere).

    Triton launches on the current CUDA device, not on its arguments' device: with a model
    spread over GPUs (device_map="auto") a kernel for tensors on cuda:1 would otherwise run
    on cuda:0 and read foreign memory.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel: Any, grid: tuple, *args: Any, device: torch.device, **meta: Any) -> None:
    """kernel[grid](*args, **meta), launched with `device` (the tensors' device) current."""
    if any(g <= 0 for g in grid):  # Triton grids must be non-empty: nothing to do
        return
    with device_guard(device):
        kernel[grid](*args, **meta)


# --------------------------------------------------------------------------------------
# Validators (ValueError naming the argument)
# --------------------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    """A Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """`value` as an int in [low, high] (either bound optional), else ValueError naming `name`."""
    lo_text = "-inf" if low is None else str(low)
    hi_text = "inf" if high is None else str(high)
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int in [{lo_text}, {hi_text}], got {value!r}")
    return int(value)


def check_ids(
    name: str,
    value: Any,
    *,
    dim: Optional[int] = 2,
    device: Optional[torch.device] = None,
    device_of: str = "gen",
    batch: Optional[int] = None,
    dtypes: Iterable[torch.dtype] = INDEX_DTYPES,
) -> Tensor:
    """A tensor of token ids: a Tensor of an integer dtype in `dtypes`, `dim`-D (None = any),
    on `device` (when given; `device_of` names where that device comes from), with `batch`
    rows (when given)."""
    dtypes = tuple(dtypes)
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        layout = {1: "(n,)", 2: "(batch, length)"}.get(dim, f"{dim}-D")
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must hold {names} token ids, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on device {value.device} but {device_of} is on {device}")
    if batch is not None and value.shape[0] != batch:
        raise ValueError(f"{name} has batch size {value.shape[0]}, expected {batch} (the batch size of gen)")
    return value


def check_lengths(
    name: str,
    lens: Any,
    *,
    batch: int,
    width: int,
    device: torch.device,
    device_of: str = "gen",
) -> Tensor:
    """Row lengths as a contiguous int64 (batch,) tensor on `device`: None means `width` for
    every row; a sequence of ints is accepted. Checks type, shape, dtype and device (values:
    check_length_values, which costs a host sync on CUDA)."""
    if lens is None:
        return torch.full((batch,), width, dtype=torch.int64, device=device)
    if not isinstance(lens, Tensor):
        try:
            lens = torch.as_tensor(lens, device=device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a tensor or a sequence of ints, got {type(lens).__name__}") from err
    if lens.device != device:
        raise ValueError(f"{name} is on device {lens.device} but {device_of} is on {device}")
    if lens.dtype.is_floating_point or lens.dtype.is_complex or lens.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer lengths, got {lens.dtype}")
    if tuple(lens.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(lens.shape)}")
    return lens.to(torch.int64).contiguous()


def check_length_values(name: str, lens: Tensor, width: int) -> None:
    """Every length in [0, width] (one host sync on CUDA; skipped under torch.compile)."""
    if torch.compiler.is_compiling() or lens.numel() == 0:
        return
    bad = (lens < 0) | (lens > width)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{name}[{i}] = {int(lens[i])} outside [0, {width}]")
