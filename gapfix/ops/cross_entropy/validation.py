"""Validation of the fused cross-entropy's arguments, done once before an implementation is
chosen, so that every impl (the reference included) refuses the same inputs the same way.

Values that only a read of the data can check (target ids in range, weights >= 0, a tensor
num_tokens > 0) are checked on CPU tensors (ValueError); on other devices a check would be a
host synchronization, so an invalid token's loss, and with it the reduced loss and the
gradients, is NaN instead (see rows.Rows).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from gapfix.ops._common import FunctorchTransformError, triton_available, under_functorch
from gapfix.ops._common import resolve_impl as _resolve_common
from gapfix.ops.cross_entropy.rows import Rows, compute_dtype, num_tokens_denominator

Target = Union[Tensor, Tuple[Tensor, Tensor], Sequence[Tensor]]
# the denominator of reduction="mean" a caller may pass: a number, a one-element tensor, or None
NumTokens = Optional[Union[int, float, Tensor]]

REDUCTIONS = ("none", "sum", "mean")
IMPLS = ("auto", "torch", "torch_fast", "triton")
# deprecated spellings of "torch_fast" (docs/ops.md)
IMPL_ALIASES = {"cpu": "torch_fast", "chunked": "torch_fast"}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def tracing() -> bool:
    """Inside torch.compile or a dispatch-mode trace, where tensor values cannot be read."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def check_options(ignore_index: Any, label_smoothing: float, z_loss: float, softcap: Optional[float],
                  reduction: str, num_tokens: NumTokens, impl: str, chunk_size: Optional[int] = None) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if not (0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not (float(z_loss) >= 0.0 and math.isfinite(float(z_loss))):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and not (float(softcap) > 0.0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(impl, str) or (impl not in IMPLS and impl not in IMPL_ALIASES):
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if num_tokens is not None:
        if reduction != "mean":
            raise ValueError(f"num_tokens is the denominator of reduction='mean'; got reduction={reduction!r}")
        if isinstance(num_tokens, Tensor):
            if num_tokens.numel() != 1 or num_tokens.dim() > 1:
                raise ValueError(f"num_tokens must hold one number (shape () or (1,)), "
                                 f"got shape {tuple(num_tokens.shape)}")
            if num_tokens.dtype == torch.bool or num_tokens.is_complex():
                raise ValueError(f"num_tokens must be a real number tensor, got dtype {num_tokens.dtype}")
            if num_tokens.requires_grad:
                raise ValueError("num_tokens is a count: it must not require grad")
        elif (isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, float))
              or not (num_tokens > 0 and math.isfinite(num_tokens))):
            raise ValueError(f"num_tokens must be a finite number > 0 or a tensor, got {num_tokens!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def check_target(
    target: Any, n_rows: int, device: torch.device, lead_shape: Sequence[int]
) -> Tuple[Tensor, Optional[Tensor]]:
    """-> (ids (N, K) int64-or-int32, target weights (N, K) or None)."""
    if isinstance(target, Tensor):
        if target.dtype not in INT_DTYPES:
            raise ValueError(f"target must hold integer ids, got dtype {target.dtype}")
        if tuple(target.shape) != tuple(lead_shape):
            raise ValueError(f"target has shape {tuple(target.shape)}, expected {tuple(lead_shape)}")
        if target.device != device:
            raise ValueError(f"target is on {target.device}, expected {device}")
        return target.reshape(n_rows, 1), None
    if not isinstance(target, (tuple, list)) or len(target) != 2:
        raise ValueError("target must be a tensor of ids or a tuple (ids (N, K), weights (N, K))")
    ids, weights = target
    if not isinstance(ids, Tensor) or not isinstance(weights, Tensor):
        raise ValueError("target must be a tuple of two tensors (ids, weights)")
    if ids.dtype not in INT_DTYPES:
        raise ValueError(f"target ids must hold integer ids, got dtype {ids.dtype}")
    if weights.dtype not in FLOAT_DTYPES:
        raise ValueError(f"target weights must be floating point, got dtype {weights.dtype}")
    if ids.dim() != len(lead_shape) + 1 or tuple(ids.shape[:-1]) != tuple(lead_shape):
        raise ValueError(f"target ids have shape {tuple(ids.shape)}, expected {tuple(lead_shape)} + (K,)")
    if tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(
            f"target weights have shape {tuple(weights.shape)} but target ids {tuple(ids.shape)} "
            f"(K mismatch: {weights.shape[-1] if weights.dim() else None} vs {ids.shape[-1]})")
    if ids.shape[-1] < 1:
        raise ValueError("target ids need K >= 1 slots")
    for name, t in (("target ids", ids), ("target weights", weights)):
        if t.device != device:
            raise ValueError(f"{name} are on {t.device}, expected {device}")
    return ids.reshape(n_rows, -1), weights.reshape(n_rows, -1)


def check_token_weight(
    token_weight: Any, n_rows: int, device: torch.device, lead_shape: Sequence[int]
) -> Optional[Tensor]:
    if token_weight is None:
        return None
    if not isinstance(token_weight, Tensor) or token_weight.dtype not in FLOAT_DTYPES:
        raise ValueError("token_weight must be a floating-point tensor")
    if tuple(token_weight.shape) != tuple(lead_shape):
        raise ValueError(f"token_weight has shape {tuple(token_weight.shape)}, expected {tuple(lead_shape)}")
    if token_weight.device != device:
        raise ValueError(f"token_weight is on {token_weight.device}, expected {device}")
    return token_weight.reshape(n_rows)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype, op: str, *tensors: Tensor) -> str:
    """"torch", "torch_fast" or "triton" (docs/ops.md). "auto": the Triton kernels on CUDA
    tensors of a dtype they support, else the chunked torch path. Under a torch.func
    transform (`tensors` wrapped by grad, vmap, ...) "auto" is the reference, plain autograd
    that the transforms differentiate; the fast paths' custom autograd cannot run there."""
    if under_functorch(*tensors):
        if impl in ("auto", "torch"):
            return "torch"
        raise FunctorchTransformError(f"{op}: impl={impl!r} does not run under torch.func transforms (grad, vmap, "
                                      "...); use impl='auto' or impl='torch' there")

    def auto(dev: torch.device) -> str:
        return "triton" if dev.type == "cuda" and triton_available() and dtype in TRITON_DTYPES else "torch_fast"

    impl = _resolve_common(impl, op=op, device=device, supported=IMPLS, auto=auto, aliases=IMPL_ALIASES)
    if impl == "triton" and dtype not in TRITON_DTYPES:
        raise ValueError(f"{op}: impl='triton' supports float32, bfloat16, float16; got {dtype}")
    return impl


def num_tokens_args(num_tokens: NumTokens, device: torch.device) -> Tuple[Optional[Tensor], float]:
    """-> (num_tokens as a tensor or None, num_tokens as a number or 0). A tensor count must
    be on the inputs' device. Its value is checked where reading it costs nothing: on CPU
    (outside a trace) a count <= 0 is a ValueError; on a GPU it is not read (that would be a
    host sync) and a count <= 0 makes the loss and the gradients NaN instead."""
    if num_tokens is None:
        return None, 0.0
    if isinstance(num_tokens, Tensor):
        if num_tokens.device != device:
            raise ValueError(f"num_tokens is on {num_tokens.device}, expected {device}")
        if num_tokens.device.type == "cpu" and not tracing() and not bool(num_tokens.reshape(()) > 0):
            raise ValueError(f"num_tokens must be > 0, got {num_tokens.reshape(()).item()!r}")
        return num_tokens.detach().reshape(()), 0.0
    return None, float(num_tokens)


def check_values(rows: Rows, device: torch.device) -> bool:
    """The ValueError contract on CPU tensors outside a trace (True: checked); elsewhere the
    invalid rows are left to be NaN (False)."""
    if device.type == "cpu" and not tracing():
        rows.raise_if_invalid()
        return True
    return False


def reference_inputs(
    ids: Tensor,
    target_weight: Optional[Tensor],
    token_weight: Optional[Tensor],
    num_tokens: NumTokens,
    vocab: int,
    ignore_index: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tuple[Tensor, Optional[Tensor], Optional[Union[float, Tensor]]]:
    """impl="torch" validates like the fast paths (module docstring): -> (ids, token_weight,
    num_tokens) for cross_entropy_reference, where on a GPU an invalid token carries a NaN
    token weight and an out-of-range id reads slot 0 instead of indexing out of bounds."""
    nt_tensor, nt_value = num_tokens_args(num_tokens, device)
    cdt = compute_dtype(dtype)
    num_tokens = num_tokens_denominator(nt_tensor, cdt) if nt_tensor is not None else (nt_value or None)
    rows = Rows(ids, target_weight, token_weight, vocab, ignore_index, cdt)
    if check_values(rows, device):
        return ids, token_weight, num_tokens
    ids = torch.where((ids != ignore_index) & ~rows.valid_slot, 0, ids)
    base = token_weight if token_weight is not None else torch.ones((), dtype=cdt, device=device)
    token_weight = torch.where(rows.invalid, torch.full((), float("nan"), dtype=base.dtype, device=device), base)
    return ids, token_weight.expand(rows.invalid.shape), num_tokens
