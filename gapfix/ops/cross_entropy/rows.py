"""Row math shared by the fast paths: the options of a call, the per-token target terms, the
denominator, the loss assembled from the row terms, and the gradient's row coefficients.

The formulas are the package docstring's; this is their one implementation outside the
kernels (kernels/cross_entropy.py applies the coefficients computed here).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional, Tuple

import torch
from torch import Tensor


def _named_fields(cls: type) -> type:
    """cls.NAMES: its field names in order, computed once (torch.compile traces a read of
    a class attribute, not dataclasses.fields)."""
    cls.NAMES = tuple(f.name for f in dataclasses.fields(cls))
    return cls


@_named_fields
@dataclasses.dataclass(frozen=True)
class Options:
    """The options of one call, in the order in which the custom ops take them (flat: a
    torch.library schema has no records). softcap None: no soft cap; chunk_rows 0: the
    chunked path's default."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]
    reduction: str
    impl: str
    chunk_rows: int
    NAMES: ClassVar[Tuple[str, ...]]

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "Options":
        """The options among a custom op's named arguments."""
        return cls(**{name: args[name] for name in cls.NAMES})

    def values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.NAMES)

    def as_kwargs(self) -> dict:
        return {name: getattr(self, name) for name in self.NAMES}

    def precomputes_grads(self, any_grad: bool) -> bool:
        """The one rule for where the gradients are computed: the chunked path with a
        scalar reduction computes them in the forward, while each chunk of logits is live
        (for grad_out = 1; the backward scales them). The Triton path and reduction="none"
        (whose upstream gradient is per token) recompute in the backward."""
        return self.impl != "triton" and self.reduction != "none" and any_grad


@_named_fields
@dataclasses.dataclass(frozen=True)
class LinearOptions(Options):
    """Options of the linear form. grad_weight_dtype: the Triton path's dW accumulator dtype
    (None: fp32); filter_eps: its gradient filter (0: off)."""

    grad_weight_dtype: Optional[torch.dtype] = None
    filter_eps: float = 0.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Chunks, losses, lse and row terms are fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Rows:
    """Per-token target terms shared by the chunked and Triton paths.

    safe_ids (N, K) int64: slot ids, 0 where the slot is ignored or out of range;
    slot_w (N, K): slot weights, 0 where ignored; mass (N,) = S = sum_k slot_w;
    counted (N,) bool; invalid (N,) bool: an out-of-range id or negative weight.
    """

    def __init__(self, ids: Tensor, target_weight: Optional[Tensor], token_weight: Optional[Tensor],
                 vocab: int, ignore_index: int, dtype: torch.dtype) -> None:
        valid = ids != ignore_index
        in_range = (ids >= 0) & (ids < vocab)
        self.valid_slot = valid & in_range
        self.safe_ids = torch.where(self.valid_slot, ids, 0).long()
        zero = torch.zeros((), dtype=dtype, device=ids.device)
        w = torch.ones((), dtype=dtype, device=ids.device) if target_weight is None else target_weight.to(dtype)
        self.slot_w = torch.where(self.valid_slot, w, zero).expand(ids.shape).contiguous()
        self.mass = self.slot_w.sum(dim=1)
        self.counted = valid.any(dim=1)
        self.bad_id = (valid & ~in_range).any(dim=1)
        self.bad_weight = (valid & (w < 0)).any(dim=1) if target_weight is not None else None
        self.bad_token_weight = (token_weight < 0) if token_weight is not None else None
        invalid = self.bad_id
        for extra in (self.bad_weight, self.bad_token_weight):
            if extra is not None:
                invalid = invalid | extra
        self.invalid = invalid
        self.token_weight = None if token_weight is None else token_weight.to(dtype)

    def raise_if_invalid(self) -> None:
        """CPU only (host reads): the ValueError contract."""
        if bool(self.bad_id.any()):
            raise ValueError("target holds ids outside [0, V) that are not ignore_index")
        if self.bad_weight is not None and bool(self.bad_weight.any()):
            raise ValueError("target weights must be >= 0")
        if self.bad_token_weight is not None and bool(self.bad_token_weight.any()):
            raise ValueError("token_weight must be >= 0")


def num_tokens_denominator(num_tokens: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh scalar of `dtype` (never a view of num_tokens: a custom op's output may not
    alias its input), NaN where num_tokens <= 0 or NaN: decided on the device, no host read."""
    count = num_tokens.reshape(()).to(dtype, copy=True)
    return torch.where(count > 0, count, torch.full((), float("nan"), dtype=dtype, device=count.device))


def denominator(rows: Rows, reduction: str, num_tokens: Optional[Tensor], num_tokens_value: float) -> Tensor:
    dtype, device = rows.mass.dtype, rows.mass.device
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if num_tokens is not None:
        return num_tokens_denominator(num_tokens, dtype)
    if num_tokens_value > 0:
        return torch.full((), num_tokens_value, dtype=dtype, device=device)
    return rows.counted.sum().to(dtype).clamp_min(1.0)


def assemble_loss(rows: Rows, lse: Tensor, target_logit: Tensor, logit_sum: Optional[Tensor], vocab: int,
                  opts: Options, denom: Tensor) -> Tuple[Tensor, Tensor]:
    """-> (loss, row_loss): the loss (per token weighted, then reduced; device-side, no host
    sync) and the per-token loss before token_weight (0 for ignored tokens, NaN for invalid
    ones), which is the gradient of the loss with respect to token_weight before the
    reduction's scale."""
    row_loss = rows.mass * lse - (1.0 - opts.label_smoothing) * target_logit
    if opts.label_smoothing:
        row_loss = row_loss - (opts.label_smoothing / vocab) * rows.mass * logit_sum
    if opts.z_loss:
        row_loss = row_loss + opts.z_loss * lse * lse
    row_loss = torch.where(rows.counted, row_loss, torch.zeros((), dtype=row_loss.dtype, device=row_loss.device))
    row_loss = torch.where(rows.invalid, torch.full((), float("nan"), dtype=row_loss.dtype, device=row_loss.device),
                           row_loss)
    # a fresh tensor: a custom op's outputs may not alias each other
    loss = row_loss * rows.token_weight if rows.token_weight is not None else row_loss.clone()
    if opts.reduction == "none":
        return loss, row_loss
    return loss.sum() / denom, row_loss


def weight_gradient_terms(rows: Rows, lse: Tensor, logit_sum: Optional[Tensor], slot_logits: Tensor, vocab: int,
                          opts: Options) -> Tensor:
    """d row_loss / d w_k per slot (N, K): lse - (1 - eps) z_{id_k} - eps mean(z) on the
    counted slots, 0 on ignored ones (the package docstring's loss, differentiated by the
    target weights; S = sum_k w_k contributes lse and eps mean(z))."""
    d = lse[:, None] - (1.0 - opts.label_smoothing) * slot_logits
    if opts.label_smoothing:
        d = d - (opts.label_smoothing / vocab) * logit_sum[:, None]
    return torch.where(rows.valid_slot, d, torch.zeros((), dtype=d.dtype, device=d.device))


# The gradient (package docstring), per row with upstream scale r:
#   dL/dz_v = coef_p p_v - coef_t sum_k w_k [v = id_k] - coef_s
#   coef_p = r (S + 2 zl lse),  coef_t = r (1 - eps),  coef_s = r eps S / V
# All three are exactly 0 on rows with r = 0 (ignored).


def prob_coefficient(r: Tensor, mass: Tensor, lse: Tensor, z_loss: float) -> Tensor:
    """coef_p, the weight of the softmax p_v."""
    return r * (mass + 2.0 * z_loss * lse) if z_loss else r * mass


def target_coefficient(r: Tensor, label_smoothing: float) -> Tensor:
    """coef_t, the weight of the target one-hots (times their slot weights w_k)."""
    return r * (1.0 - label_smoothing)


def smoothing_coefficient(r: Tensor, mass: Tensor, label_smoothing: float, vocab: int) -> Tensor:
    """coef_s, the constant subtracted from every class by label smoothing."""
    return r * (label_smoothing / vocab) * mass


def grad_coefficients(
    rows: Rows, lse: Tensor, r: Tensor, opts: Options, vocab: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (coef_p, coef_t, coef_s) of every row."""
    return (prob_coefficient(r, rows.mass, lse, opts.z_loss), target_coefficient(r, opts.label_smoothing),
            smoothing_coefficient(r, rows.mass, opts.label_smoothing, vocab))


def row_scale(rows: Rows, grad_loss: Tensor, reduction: str, denom: Tensor) -> Tensor:
    """r = grad_out * token_weight / denominator per token; 0 for ignored tokens, NaN for invalid."""
    dtype = rows.mass.dtype
    if reduction == "none":
        r = grad_loss.reshape(-1).to(dtype)
    else:
        r = (grad_loss.reshape(()).to(dtype) / denom).expand(rows.mass.shape)
    if rows.token_weight is not None:
        r = r * rows.token_weight
    r = torch.where(rows.counted, r, torch.zeros((), dtype=dtype, device=r.device))
    return torch.where(rows.invalid, torch.full((), float("nan"), dtype=dtype, device=r.device), r)
