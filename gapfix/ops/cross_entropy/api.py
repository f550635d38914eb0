"""The public functions and modules of the fused cross-entropy: validate once, then run the
reference (impl="torch") or a fast path through the custom ops (registration.py)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from gapfix.ops.cross_entropy import registration  # noqa: F401  (registers the torch.ops.gapfix ops)
from gapfix.ops.cross_entropy.reference import cross_entropy_reference, linear_cross_entropy_reference
from gapfix.ops.cross_entropy.rows import LinearOptions, Options, Rows, compute_dtype, weight_gradient_terms
from gapfix.ops.cross_entropy.validation import (
    FLOAT_DTYPES,
    Target,
    check_options,
    check_target,
    check_token_weight,
    num_tokens_args,
    reference_inputs,
    resolve_impl,
)

__all__ = ["cross_entropy", "linear_cross_entropy", "CrossEntropyLoss", "LinearCrossEntropyLoss"]

# the loss, or (loss, lse) with return_lse=True
LossResult = Union[Tensor, tuple[Tensor, Tensor]]


def _weights_needing_grad(
    target_weight: Optional[Tensor], token_weight: Optional[Tensor]
) -> tuple[tuple[Optional[Tensor], Optional[Tensor]], bool]:
    """-> (target weights, token_weight) for the custom op (detached: it does not
    differentiate them) and whether either requires a gradient."""
    wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (target_weight, token_weight))
    return tuple(None if t is None else t.detach() for t in (target_weight, token_weight)), wanted


def _attach_weight_grads(
    loss: Tensor,
    outputs: Sequence[Tensor],
    slot_logits_fn: Callable[[Tensor], Tensor],
    ids: Tensor,
    target_weight: Optional[Tensor],
    token_weight: Optional[Tensor],
    vocab: int,
    opts: Options,
) -> Tensor:
    """loss plus a term that is exactly 0 in value and carries the gradients of the target
    weights and token_weight, from the op's row terms (the custom op differentiates its
    tensor inputs, not the weights):
        dL/d token_weight_i = s_i row_loss_i,  dL/d w_ik = s_i token_weight_i d row_loss_i / d w_ik
    with s_i the reduction's scale (1/denominator, 1, or per token for "none")."""
    denom, lse, row_loss, logit_sum = (t.detach() for t in outputs)
    cdt = row_loss.dtype
    term = torch.zeros_like(row_loss)
    if token_weight is not None and token_weight.requires_grad:
        term = term + (token_weight - token_weight.detach()).to(cdt) * row_loss
    if target_weight is not None and target_weight.requires_grad:
        rows = Rows(ids, None, None, vocab, opts.ignore_index, cdt)
        with torch.no_grad():
            d = weight_gradient_terms(rows, lse, logit_sum if opts.label_smoothing else None,
                                      slot_logits_fn(rows.safe_ids).to(cdt), vocab, opts)
            if token_weight is not None:
                d = d * token_weight.detach().to(cdt)[:, None]
        term = term + ((target_weight - target_weight.detach()).to(cdt) * d).sum(dim=1)
    if opts.reduction == "none":
        return loss + term
    return loss + term.sum() / denom


def _torch_impl_result(
    loss: Tensor, lse: Tensor, lead_shape: Sequence[int], reduction: str, return_lse: bool
) -> LossResult:
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    return (loss, lse.detach().reshape(lead_shape)) if return_lse else loss


def _autocast_inputs(
    hidden: Tensor, lm_weight: Tensor, bias: Optional[Tensor]
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Under autocast the projection runs in the autocast dtype, as F.linear would (custom
    ops are not autocast-aware): a bf16 hidden with an fp32 head under torch.autocast
    works, and the casts carry the gradients back to the fp32 parameters."""
    device_type = hidden.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return hidden, lm_weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t if t is None or not t.is_floating_point() else t.to(dtype) for t in (hidden, lm_weight, bias)]
    return tuple(cast)


def cross_entropy(
    logits: Tensor,
    target: Target,
    *,
    ignore_index: int = -100,
    token_weight: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_tokens: Optional[Union[int, float, Tensor]] = None,
    return_lse: bool = False,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
) -> LossResult:
    """Cross-entropy of logits (..., V) against hard ids (...) or soft (ids (..., K), weights (..., K)).

    Returns the loss in fp32: a scalar for "mean"/"sum", shape (...) for "none";
    with return_lse=True, (loss, lse) where lse (...) is the (soft-capped) logsumexp of
    every row, ignored or not, without gradient. See the module docstring for the
    exact formula, the reductions and the handling of invalid values.
    """
    check_options(ignore_index, label_smoothing, z_loss, softcap, reduction, num_tokens, impl, chunk_size)
    if not isinstance(logits, Tensor) or logits.dim() < 1 or logits.dtype not in FLOAT_DTYPES:
        raise ValueError("logits must be a floating-point tensor of shape (..., V)")
    if logits.shape[-1] < 1:
        raise ValueError("logits must have V >= 1 classes")
    lead_shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    n_rows = math.prod(lead_shape)
    ids, target_weight = check_target(target, n_rows, logits.device, lead_shape)
    token_weight = check_token_weight(token_weight, n_rows, logits.device, lead_shape)
    impl = resolve_impl(impl, logits.device, logits.dtype, "cross_entropy", logits, target_weight, token_weight)
    flat = logits.reshape(n_rows, vocab)
    if impl == "torch":
        ids, token_weight, num_tokens = reference_inputs(ids, target_weight, token_weight, num_tokens, vocab,
                                                         ignore_index, logits.device, logits.dtype)
        tgt = ids.reshape(n_rows) if target_weight is None else (ids, target_weight)
        loss, lse = cross_entropy_reference(
            flat, tgt, ignore_index=ignore_index, token_weight=token_weight, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, reduction=reduction, num_tokens=num_tokens)
        return _torch_impl_result(loss, lse, lead_shape, reduction, return_lse)
    (op_target_weight, op_token_weight), weights_need_grad = _weights_needing_grad(target_weight, token_weight)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    nt_tensor, nt_value = num_tokens_args(num_tokens, logits.device)
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    opts = Options(ignore_index, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap),
                   reduction, impl, int(chunk_size or 0))
    loss, lse, denom, _, row_loss, logit_sum = torch.ops.gapfix.cross_entropy_fwd(
        flat, ids, op_target_weight, op_token_weight, nt_tensor, nt_value, *opts.values(), need_grad,
        bool(return_lse))
    if weights_need_grad:
        def slot_logits(safe_ids: Tensor) -> Tensor:
            z = flat.detach().gather(1, safe_ids).to(compute_dtype(flat.dtype))
            return z if softcap is None else softcap * torch.tanh(z / softcap)

        loss = _attach_weight_grads(loss, (denom, lse, row_loss, logit_sum), slot_logits, ids, target_weight,
                                    token_weight, vocab, opts)
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    return (loss, lse.detach().reshape(lead_shape)) if return_lse else loss


def linear_cross_entropy(
    hidden: Tensor,
    lm_weight: Tensor,
    target: Target,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    token_weight: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_tokens: Optional[Union[int, float, Tensor]] = None,
    return_lse: bool = False,
    chunk_size: Optional[int] = None,
    grad_weight_dtype: Optional[torch.dtype] = None,
    filter_eps: Optional[float] = None,
    impl: str = "auto",
) -> LossResult:
    """Cross-entropy of hidden (..., H) @ lm_weight (V, H)^T + bias (V,) without the logits.

    Same target, options and return values as `cross_entropy`. Further options:
      chunk_size         rows per chunk of the chunked ("cpu") path; default ~2**24 / V.
      grad_weight_dtype  dtype in which dlm_weight is accumulated. Default: fp32 on every
                         path. On the Triton path torch.bfloat16 / torch.float16 accumulate
                         atomically in that dtype instead (half the memory of the fp32
                         accumulator, at bf16 rounding per partial sum).
      filter_eps         Triton path only: skip the dhidden/dlm_weight products of a
                         (rows x vocab) tile where every per-token |dL/dx| (before the upstream
                         scale) is below filter_eps, as Cut Cross-Entropy does (its default is
                         finfo(dtype).eps / 32). Off by default: the skipped terms add up to
                         a wrong gradient when the softmax is flat (an untrained model).
    """
    check_options(ignore_index, label_smoothing, z_loss, softcap, reduction, num_tokens, impl, chunk_size)
    if not isinstance(hidden, Tensor) or hidden.dim() < 1 or hidden.dtype not in FLOAT_DTYPES:
        raise ValueError("hidden must be a floating-point tensor of shape (..., H)")
    if not isinstance(lm_weight, Tensor) or lm_weight.dim() != 2:
        raise ValueError("lm_weight must be a tensor of shape (V, H)")
    hidden, lm_weight, bias = _autocast_inputs(hidden, lm_weight, bias)
    if lm_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_weight has shape {tuple(lm_weight.shape)}; its second dimension must equal "
                         f"hidden's last dimension {hidden.shape[-1]}")
    if lm_weight.shape[0] < 1:
        raise ValueError("lm_weight must have V >= 1 rows")
    if lm_weight.dtype != hidden.dtype:
        raise ValueError(f"lm_weight has dtype {lm_weight.dtype}, hidden {hidden.dtype}: they must match")
    if lm_weight.device != hidden.device:
        raise ValueError(f"lm_weight is on {lm_weight.device}, hidden on {hidden.device}: they must match")
    vocab, hdim = lm_weight.shape
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape ({vocab},)")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError("bias must have hidden's dtype and device")
    if grad_weight_dtype is not None and grad_weight_dtype not in FLOAT_DTYPES:
        raise ValueError(f"grad_weight_dtype must be a floating dtype, got {grad_weight_dtype!r}")
    if filter_eps is not None and not (float(filter_eps) >= 0.0):
        raise ValueError(f"filter_eps must be None or >= 0, got {filter_eps!r}")
    lead_shape = hidden.shape[:-1]
    n_rows = math.prod(lead_shape)
    ids, target_weight = check_target(target, n_rows, hidden.device, lead_shape)
    token_weight = check_token_weight(token_weight, n_rows, hidden.device, lead_shape)
    impl = resolve_impl(impl, hidden.device, hidden.dtype, "linear_cross_entropy", hidden, lm_weight, bias,
                        target_weight, token_weight)
    if impl == "triton" and hidden.device.type != "cuda" and grad_weight_dtype == torch.bfloat16:
        raise ValueError("grad_weight_dtype=torch.bfloat16 needs a GPU: Triton's interpreter has no bf16 atomics")
    flat = hidden.reshape(n_rows, hdim)
    if impl == "torch":
        ids, token_weight, num_tokens = reference_inputs(ids, target_weight, token_weight, num_tokens, vocab,
                                                         ignore_index, hidden.device, hidden.dtype)
        tgt = ids.reshape(n_rows) if target_weight is None else (ids, target_weight)
        loss, lse = linear_cross_entropy_reference(
            flat, lm_weight, tgt, bias=bias, ignore_index=ignore_index, token_weight=token_weight,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction,
            num_tokens=num_tokens)
        return _torch_impl_result(loss, lse, lead_shape, reduction, return_lse)
    (op_target_weight, op_token_weight), weights_need_grad = _weights_needing_grad(target_weight, token_weight)
    flat = flat.contiguous()
    weight = lm_weight.contiguous()
    grad_on = torch.is_grad_enabled()
    need_dx = grad_on and hidden.requires_grad
    need_dw = grad_on and lm_weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    nt_tensor, nt_value = num_tokens_args(num_tokens, hidden.device)
    opts = LinearOptions(ignore_index, float(label_smoothing), float(z_loss),
                         None if softcap is None else float(softcap), reduction, impl, int(chunk_size or 0),
                         grad_weight_dtype, float(filter_eps or 0.0))
    loss, lse, denom, _, _, _, row_loss, logit_sum = torch.ops.gapfix.linear_cross_entropy_fwd(
        flat, weight, bias, ids, op_target_weight, op_token_weight, nt_tensor, nt_value, *opts.values(),
        need_dx, need_dw, need_db, bool(return_lse))
    if weights_need_grad:
        def slot_logits(safe_ids: Tensor) -> Tensor:
            # the logits of the target slots only: (N, K) dot products of length H
            cdt = compute_dtype(flat.dtype)
            z = torch.einsum("nh,nkh->nk", flat.detach().to(cdt), weight.detach()[safe_ids].to(cdt))
            if bias is not None:
                z = z + bias.detach()[safe_ids].to(cdt)
            return z if softcap is None else softcap * torch.tanh(z / softcap)

        loss = _attach_weight_grads(loss, (denom, lse, row_loss, logit_sum), slot_logits, ids, target_weight,
                                    token_weight, vocab, opts)
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    return (loss, lse.detach().reshape(lead_shape)) if return_lse else loss


class CrossEntropyLoss(torch.nn.Module):
    """Module form of `cross_entropy`: options at construction, tensors at call."""

    def __init__(self, *, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, reduction: str = "mean", return_lse: bool = False,
                 impl: str = "auto") -> None:
        super().__init__()
        check_options(ignore_index, label_smoothing, z_loss, softcap, reduction, None, impl)
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.softcap, self.reduction, self.return_lse, self.impl = softcap, reduction, return_lse, impl

    def forward(self, logits: Tensor, target: Target, token_weight: Optional[Tensor] = None,
                num_tokens: Optional[Union[int, float, Tensor]] = None) -> LossResult:
        return cross_entropy(logits, target, ignore_index=self.ignore_index, token_weight=token_weight,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             reduction=self.reduction, num_tokens=num_tokens, return_lse=self.return_lse,
                             impl=self.impl)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, reduction={self.reduction!r}, impl={self.impl!r}")


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of `linear_cross_entropy`; called as loss(hidden, lm_weight, target, bias=None, ...)."""

    def __init__(self, *, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, reduction: str = "mean", return_lse: bool = False,
                 chunk_size: Optional[int] = None, grad_weight_dtype: Optional[torch.dtype] = None,
                 filter_eps: Optional[float] = None, impl: str = "auto") -> None:
        super().__init__()
        check_options(ignore_index, label_smoothing, z_loss, softcap, reduction, None, impl, chunk_size)
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.softcap, self.reduction, self.return_lse, self.impl = softcap, reduction, return_lse, impl
        self.chunk_size, self.grad_weight_dtype, self.filter_eps = chunk_size, grad_weight_dtype, filter_eps

    def forward(self, hidden: Tensor, lm_weight: Tensor, target: Target, bias: Optional[Tensor] = None,
                token_weight: Optional[Tensor] = None,
                num_tokens: Optional[Union[int, float, Tensor]] = None) -> LossResult:
        return linear_cross_entropy(hidden, lm_weight, target, bias=bias, ignore_index=self.ignore_index,
                                    token_weight=token_weight, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap, reduction=self.reduction,
                                    num_tokens=num_tokens, return_lse=self.return_lse, chunk_size=self.chunk_size,
                                    grad_weight_dtype=self.grad_weight_dtype, filter_eps=self.filter_eps,
                                    impl=self.impl)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, reduction={self.reduction!r}, impl={self.impl!r}")
