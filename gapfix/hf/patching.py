"""patch(model): the causal-LM loss of a transformers model through gapfix.linear_cross_entropy.

After ``patch(model)`` a forward with ``labels`` runs the model's trunk, then the
fused linear cross-entropy on (last hidden state, lm_head weight): the (B, T, V)
logits never exist and ``output.logits`` is None. Everything happens inside the
model's own forward, so DDP/FSDP hooks, gradient checkpointing and PEFT see an
ordinary forward. Without labels (generation, evaluation of logits) and for
for calls without labels, the original forward runs unchanged.

TRL's fused LM head (trl >= 1.16: ``model(..., labels=..., fused_lm_head=True)`` returns a
FusedCausalLMOutput of per-token log_probs, entropy, ... instead of logits) is served by
gapfix's kernel too: when a TRL trainer calls ``trl.trainer.utils.add_fused_lm_head`` on a
patched model, gapfix records TRL's settings (temperature, cast_lm_head_to_fp32, outputs)
instead of letting TRL wrap the forward, and the patched forward computes those fields with
gapfix.ops.cross_entropy.linear_log_probs (gapfix/hf/trl_head.py has the contract).

Conventions, as transformers' own causal-LM loss:
    labels (B, T) unshifted: position t is trained to predict labels[t + 1];
        -100 is ignored (and so is the last position).
    shift_labels (B, T) already shifted (used by sequence parallelism) is accepted
        instead of labels.
    num_items_in_batch (from Trainer): the loss is sum / num_items_in_batch, so the
        micro-batches of one optimizer step add up to the step's mean exactly.
The config's logit post-processing is folded in: ``logit_scale`` (Cohere,
multiplies) and ``logits_scaling`` (Granite, divides) scale the hidden state,
``final_logit_softcapping`` (Gemma 2/3) is the kernel's soft cap.

Only the instance is patched (its ``forward`` attribute); the class and every
other model stay untouched, and ``unpatch(model)`` restores it.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["is_patched", "patch", "unpatch"]

_STATE = "_gapfix_patch"
# options the patch sets itself: the caller cannot override them
_RESERVED = ("hidden", "lm_weight", "target", "bias", "softcap", "reduction", "num_tokens", "token_weight",
             "return_lse")


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM under a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def _trunk(lm: nn.Module) -> nn.Module:
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if not isinstance(decoder, nn.Module) or decoder is lm:
        raise ValueError(f"model: {type(lm).__name__} has no separate decoder trunk (get_decoder()); "
                         "gapfix.hf.patch needs a transformers *ForCausalLM model")
    return decoder


def _check_loss_options(options: dict) -> dict:
    from gapfix.lm_loss import check_loss_options

    for name in options:
        if name in _RESERVED:
            raise ValueError(f"loss option {name!r} is set by gapfix.hf.patch itself "
                             "(from the config, the labels and num_items_in_batch)")
    return check_loss_options(options)


def fused_causal_lm_loss(lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None, *,
                         shift_labels: torch.Tensor | None = None,
                         num_items_in_batch: torch.Tensor | int | None = None,
                         loss_options: dict | None = None) -> torch.Tensor:
    """The causal-LM loss of hidden states (B, T, H) against HF-convention labels (or
    shift_labels): gapfix.lm_loss.causal_lm_loss, the reference trainer's loss too."""
    from gapfix.lm_loss import causal_lm_loss
    from gapfix.lm_loss import shift_labels as shifted

    options = dict(loss_options or {})
    ignore_index = options.setdefault("ignore_index", -100)
    if shift_labels is None:
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (batch, sequence), "
                             f"got {tuple(labels.shape)}")
        shift_labels = shifted(labels, ignore_index)
    elif shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"shift_labels must have shape {tuple(hidden.shape[:-1])}, got {tuple(shift_labels.shape)}")
    if num_items_in_batch is not None:
        _check_item_count(num_items_in_batch)
    return causal_lm_loss(lm, hidden, shift_labels, reduction="mean", num_items_in_batch=num_items_in_batch,
                          **options)


def _check_item_count(num_items_in_batch: torch.Tensor | int | float) -> None:
    """num_items_in_batch divides the summed loss: a count of 0 or below would give the sum (or
    its negative) as the loss. Refused by name where reading it costs no device sync (a number, a
    CPU tensor); a count on an accelerator is divided as given."""
    count = num_items_in_batch
    if isinstance(count, torch.Tensor):
        if count.device.type != "cpu":
            return
        if count.numel() != 1:
            raise ValueError(f"num_items_in_batch must be one count, got a tensor of shape {tuple(count.shape)}")
        count = count.item()
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not count > 0:
        raise ValueError(f"num_items_in_batch must be a positive token count (the trained tokens of the step), "
                         f"got {num_items_in_batch!r}")


def patch(model: nn.Module, **loss_options: Any) -> nn.Module:
    """Make ``model``'s causal-LM loss gapfix's fused linear cross-entropy; returns ``model``.

    model: a transformers ``*ForCausalLM`` (or a PEFT model wrapping one). Patching an
        already patched model replaces its loss options.
    loss_options: passed to gapfix.linear_cross_entropy: label_smoothing, z_loss,
        ignore_index (default -100), impl, chunk_size, grad_weight_dtype, filter_eps.
        reduction, num_tokens and softcap are set by the patch (from num_items_in_batch
        and the config) and refused here.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lm = _causal_lm(model)
    from gapfix.models import output_head

    _trunk(lm), output_head(lm)  # refuse models the fused loss cannot serve, now rather than at the first step
    options = _check_loss_options(loss_options)
    from gapfix.hf import trl_head

    trl_head.refuse_wrapped(lm)
    trl_head.install()
    previous_head = lm.__dict__[_STATE].get("trl_head") if is_patched(lm) else None
    if is_patched(lm):
        unpatch(lm, keep_trl_head=False)
    original = lm.forward  # the bound class forward (or a caller's own instance forward)
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        fused_head = kwargs.pop("fused_lm_head", False)
        if fused_head:
            from gapfix.hf.trl_head import fused_head_forward

            return fused_head_forward(lm, signature, args, kwargs, lm.__dict__[_STATE].get("trl_head"))
        if "labels" not in kwargs and "shift_labels" not in kwargs and len(args) <= _position(signature, "labels"):
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        call = dict(bound.arguments)
        call.update(call.pop(_var_keyword(signature), None) or {})
        labels = call.pop("labels", None)
        shift_labels = call.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return original(*args, **kwargs)
        num_items = call.pop("num_items_in_batch", None)
        return_dict = call.pop("return_dict", None)
        keep = call.pop("logits_to_keep", 0)
        if not (isinstance(keep, int) and keep == 0):
            raise ValueError("logits_to_keep must be 0 when labels are given to a gapfix-patched model")
        call.pop("use_cache", None)
        outputs = _trunk(lm)(use_cache=False, **call)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        loss = fused_causal_lm_loss(lm, hidden, labels, shift_labels=shift_labels, num_items_in_batch=num_items,
                                    loss_options=lm.__dict__[_STATE]["options"])
        from transformers.modeling_outputs import CausalLMOutputWithPast

        result = CausalLMOutputWithPast(loss=loss, logits=None,
                                        hidden_states=getattr(outputs, "hidden_states", None),
                                        attentions=getattr(outputs, "attentions", None))
        return result.to_tuple() if return_dict is False else result

    had_forward = "forward" in lm.__dict__
    lm.__dict__[_STATE] = {
        "forward": forward,
        "options": options,
        "previous_forward": lm.__dict__.get("forward") if had_forward else None,
        "had_forward": had_forward,
        "had_accepts": "accepts_loss_kwargs" in lm.__dict__,
        "previous_accepts": lm.__dict__.get("accepts_loss_kwargs"),
        "trl_head": previous_head,  # TRL's fused-head settings, once a TRL trainer asked for its head
    }
    lm.forward = forward
    # Trainer passes num_items_in_batch to a forward that declares it handles it; this one does
    lm.accepts_loss_kwargs = True
    return model


def _position(signature: inspect.Signature, name: str) -> int:
    """Index of a positional parameter (a large number when it cannot be passed positionally)."""
    for index, (key, param) in enumerate(signature.parameters.items()):
        if key == name:
            return index if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) else 10**9
    return 10**9


def _var_keyword(signature: inspect.Signature) -> str:
    for key, param in signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            return key
    return "\0"  # no **kwargs: nothing to merge


def is_patched(model: nn.Module) -> bool:
    return _STATE in _causal_lm(model).__dict__


def unpatch(model: nn.Module, *, keep_trl_head: bool = True) -> nn.Module:
    """Undo ``patch``: the model's own forward and loss again; returns ``model``. A model whose
    TRL fused head gapfix served gets TRL's own head back (same settings), so its trainer goes
    on working; keep_trl_head=False leaves the bare forward."""
    lm = _causal_lm(model)
    state = lm.__dict__.get(_STATE)
    if state is None:
        raise ValueError("model is not patched by gapfix.hf.patch")
    if lm.__dict__.get("forward") is not state["forward"]:
        # another wrapper went on top after the patch (TRL's SFTTrainer adds its fused LM head
        # this way): removing ours would remove it too
        raise ValueError("model: its forward was wrapped again after gapfix.hf.patch (e.g. by trl's "
                         "SFTTrainer); unpatch it before that wrapper is added, or build a new model")
    del lm.__dict__[_STATE]
    if state["had_forward"]:
        lm.forward = state["previous_forward"]
    else:
        del lm.forward
    if state["had_accepts"]:
        lm.accepts_loss_kwargs = state["previous_accepts"]
    else:
        del lm.accepts_loss_kwargs
    if keep_trl_head and state.get("trl_head") is not None:
        from gapfix.hf.trl_head import add_trl_head

        add_trl_head(lm, state["trl_head"])
    return model
