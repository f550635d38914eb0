"""The model-level causal-LM loss: one function for the reference trainer (CausalLMLoss) and
gapfix.hf.patch.

    causal_lm_loss(model, hidden, target, reduction="sum", num_items_in_batch=None, **options)

hidden (..., H): the trunk's final hidden states; target: what each position predicts, already
aligned with hidden (shift_labels(labels) turns Hugging Face labels into it), hard ids (...)
or soft (ids (..., K), weights (..., K)). The model's output head decides the logits, as its
own forward would (gapfix.models.OutputHead): the logit scale folds into the hidden states, the
config's soft cap is the kernel's `softcap`; a plain linear head goes through
gapfix.linear_cross_entropy (no logits), another (a LoRA-wrapped head) forms its logits for
gapfix.cross_entropy. Without autocast a hidden state in another dtype than the head's is cast
to the head's (a bf16 trunk with an fp32 head computes the logits in fp32).

options: the loss options of linear_cross_entropy that a caller may set (LOSS_OPTIONS);
num_items_in_batch (Trainer's count of the step's trained tokens): the loss is sum / count,
the count clamped to at least 1 (a tensor count stays on the device: no host sync).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["LOSS_OPTIONS", "causal_lm_loss", "check_loss_options", "shift_labels"]

# the options a caller sets; the others (hidden, lm_weight, target, bias, softcap, reduction,
# num_tokens, token_weight, return_lse) come from the model, the labels and the count
LOSS_OPTIONS = ("ignore_index", "label_smoothing", "z_loss", "chunk_size", "grad_weight_dtype", "filter_eps", "impl")


def check_loss_options(options: dict) -> dict:
    """ValueError naming an unknown option or a value the loss would refuse at its first call."""
    from gapfix.ops.cross_entropy.validation import FLOAT_DTYPES, check_options

    for name in options:
        if name not in LOSS_OPTIONS:
            raise ValueError(f"unknown loss option {name!r}; allowed: {sorted(LOSS_OPTIONS)}")
    check_options(options.get("ignore_index", -100), options.get("label_smoothing", 0.0), options.get("z_loss", 0.0),
                  None, "mean", None, options.get("impl", "auto"), options.get("chunk_size"))
    dtype = options.get("grad_weight_dtype")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"grad_weight_dtype must be a floating dtype, got {dtype!r}")
    eps = options.get("filter_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0):
        raise ValueError(f"filter_eps must be None or a number >= 0, got {eps!r}")
    return dict(options)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hugging Face labels (..., T) (position t holds its own token) -> targets (..., T):
    position t predicts labels[t + 1]; the last position predicts nothing."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(model: torch.nn.Module, hidden: torch.Tensor, target: Any, *, reduction: str = "sum",
                   num_items_in_batch: Optional[Union[torch.Tensor, int, float]] = None, **options: Any
                   ) -> torch.Tensor:
    """The loss of `model`'s head on hidden states against aligned targets (module docstring).
    reduction "sum" or "mean" (over counted tokens); with num_items_in_batch: sum / count."""
    from gapfix.models import output_head
    from gapfix.ops.cross_entropy import cross_entropy, linear_cross_entropy

    head = output_head(model)
    if head.is_linear:
        hidden, weight, bias = head.linear_loss_inputs(hidden)
        loss_fn = functools.partial(linear_cross_entropy, lm_weight=weight, bias=bias)
    else:  # a LoRA-wrapped (or custom) lm_head: its logits are formed, the loss still fused
        weight = next(head.module.parameters())
        loss_fn = cross_entropy
    device_type = hidden.device.type
    autocast = device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)
    if not autocast and hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    if not head.is_linear:
        hidden = head.scaled_logits(hidden)
    if isinstance(target, torch.Tensor):
        target = target.to(hidden.device)
    options.setdefault("ignore_index", -100)
    if num_items_in_batch is None:
        return loss_fn(hidden, target=target, softcap=head.softcap, reduction=reduction, **options)
    total = loss_fn(hidden, target=target, softcap=head.softcap, reduction="sum", **options)
    if isinstance(num_items_in_batch, torch.Tensor):
        return total / num_items_in_batch.to(device=total.device, dtype=total.dtype).clamp_min(1)
    return total / max(float(num_items_in_batch), 1.0)
