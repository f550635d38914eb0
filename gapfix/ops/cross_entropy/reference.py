"""The pure-PyTorch reference of the fused cross-entropy: the oracle of the tests and the
readable spec of the formula in the package docstring. It materializes the logits."""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from gapfix.ops.cross_entropy.validation import Target

__all__ = ["cross_entropy_reference", "linear_cross_entropy_reference"]


def cross_entropy_reference(
    logits: Tensor,
    target: Target,
    *,
    ignore_index: int = -100,
    token_weight: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_tokens: Optional[Union[float, Tensor]] = None,
) -> Tuple[Tensor, Tensor]:
    """Returns (loss, lse). Computes in fp32, or fp64 for fp64 logits; differentiable.

    logits (..., V); target (...) ids or (ids (..., K), weights (..., K)).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lead_shape = logits.shape[:-1]
    z = logits.to(dtype).reshape(-1, logits.shape[-1])
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    n = z.shape[0]
    if isinstance(target, Tensor):
        ids, weights = target.reshape(n, 1), None
    else:
        ids, weights = target[0].reshape(n, -1), target[1].reshape(n, -1)
    valid = ids != ignore_index
    w = torch.ones(ids.shape, dtype=dtype, device=z.device) if weights is None else weights.to(dtype)
    w = torch.where(valid, w, torch.zeros((), dtype=dtype, device=z.device))
    counted = valid.any(dim=1)
    with torch.no_grad():
        lse_all = torch.logsumexp(z, dim=1)
    # Ignored rows take zeros, so that their (possibly -inf) logits cannot put a
    # NaN into the gradient through a masked-out branch.
    z_counted = torch.where(counted[:, None], z, torch.zeros((), dtype=dtype, device=z.device))
    lse = torch.logsumexp(z_counted, dim=1)
    s = w.sum(dim=1)
    picked = z_counted.gather(1, torch.where(valid, ids, 0).long())
    zero = torch.zeros((), dtype=dtype, device=z.device)
    target_logit = torch.where(w != 0, w * picked, zero).sum(dim=1)  # 0 * -inf would be NaN
    loss = s * lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing:
        loss = loss - label_smoothing * s * z_counted.mean(dim=1)
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(counted, loss, torch.zeros((), dtype=dtype, device=z.device))
    if token_weight is not None:
        loss = loss * token_weight.to(dtype).reshape(n)
    lse_all = lse_all.reshape(lead_shape)
    if reduction == "none":
        return loss.reshape(lead_shape), lse_all
    total = loss.sum()
    if reduction == "sum":
        return total, lse_all
    if num_tokens is None:
        denom = counted.sum().to(dtype).clamp_min(1.0)
    else:
        denom = torch.as_tensor(num_tokens, dtype=dtype, device=z.device)
    return total / denom, lse_all


def linear_cross_entropy_reference(
    hidden: Tensor, lm_weight: Tensor, target: Target, *, bias: Optional[Tensor] = None, **kwargs: Any
) -> Tuple[Tensor, Tensor]:
    """Reference of the linear form: logits = hidden @ lm_weight^T + bias in the inputs'
    dtype (as an eager model computes them), then cross_entropy_reference."""
    logits = torch.nn.functional.linear(hidden, lm_weight, bias)
    return cross_entropy_reference(logits, target, **kwargs)
