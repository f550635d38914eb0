"""TRL's fused LM head served by gapfix's kernel on a gapfix-patched model.

TRL (>= 1.16) trainers call ``trl.trainer.utils.add_fused_lm_head(model, temperature,
cast_lm_head_to_fp32, outputs)`` once, then ``model(..., labels=..., fused_lm_head=True)``
at every step, and read per-token fields of the returned FusedCausalLMOutput:

    log_probs          log p(label) at the temperature, 0 where the label is -100
    entropy            entropy of the next-token distribution (differentiable)
    log_sum_sq_probs   log sum_v p_v^2 (no gradient)
    mean_logits        mean of the temperature-scaled logits (no gradient)
    is_top1            the label is the first argmax
    label_mask         labels != -100
    loss               -sum(log_probs) / (num_items_in_batch, else the count of labels),
                       plus the MoE router loss weighted by router_aux_loss_coef
    aux_loss           the MoE router loss when router logits are requested

shaped (B, T - 1) for labels (the head shifts) and (B, T) for shift_labels. Logits are
softcap(scale * hidden @ W^T + scale * b) / T with the config's scale and soft cap; they
are computed in the autocast dtype under autocast, else in the hidden states' dtype, and in
fp32 with cast_lm_head_to_fp32. Fields not in `outputs` are None.

`install()` wraps add_fused_lm_head in every loaded trl module (and in trl.trainer.utils,
from which later imports take it): for a patched model (or any model while
`serve_trl_head()` is active) the wrapper records TRL's settings on the patch instead of
wrapping the forward, and the patched forward computes the fields with
gapfix.ops.cross_entropy.linear_log_probs. Other models get TRL's own head. A trl whose
add_fused_lm_head or FusedCausalLMOutput differs from this contract is refused by name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.abc
import importlib.util
import inspect
import sys
import threading
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["install", "serve_trl_head", "fused_head_forward", "add_trl_head", "refuse_wrapped"]

CONTRACT_PARAMETERS = ("model", "temperature", "cast_lm_head_to_fp32", "outputs")
CONTRACT_FIELDS = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask",
                   "aux_loss")
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
DEFAULT_SETTINGS = {"temperature": 1.0, "cast_lm_head_to_fp32": False, "outputs": ("log_probs",)}
_ORIGINAL = "__gapfix_original__"
_serving = threading.local()


def _trl_version() -> str:
    try:
        import trl

        return str(getattr(trl, "__version__", "unknown"))
    except ImportError:
        return "not installed"


def check_contract(original: Any) -> None:
    """ValueError naming the trl version unless its fused head is the contract served here."""
    params = tuple(inspect.signature(original).parameters)
    fields: tuple = ()
    try:
        from trl.trainer.utils import FusedCausalLMOutput

        fields = tuple(f.name for f in dataclasses.fields(FusedCausalLMOutput))
    except (ImportError, TypeError):
        pass
    if params != CONTRACT_PARAMETERS or fields != CONTRACT_FIELDS:
        raise ValueError(
            f"trl {_trl_version()}: its fused LM head (add_fused_lm_head{params}, FusedCausalLMOutput{fields}) is "
            f"not the contract gapfix.hf.patch serves (trl 1.16: add_fused_lm_head{CONTRACT_PARAMETERS}, "
            f"FusedCausalLMOutput{CONTRACT_FIELDS}); install trl 1.16, or unpatch the model "
            "(gapfix.hf.unpatch) to train with TRL's own head")


def _settings(arguments: dict) -> dict:
    temperature = arguments["temperature"]
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    outputs = tuple(arguments["outputs"])
    unknown = sorted(set(outputs) - set(FIELDS))
    if unknown:
        raise ValueError(f"outputs: unknown fields {unknown}; TRL's fused head knows {FIELDS}")
    return {"temperature": float(temperature), "cast_lm_head_to_fp32": bool(arguments["cast_lm_head_to_fp32"]),
            "outputs": outputs}


def _wrap(original: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def add_fused_lm_head(*args: Any, **kwargs: Any) -> Any:
        from gapfix.hf.patching import _STATE, _causal_lm, is_patched, patch

        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        model = next(iter(bound.arguments.values()))
        if not isinstance(model, nn.Module) or not (is_patched(model) or getattr(_serving, "depth", 0)):
            return original(*args, **kwargs)
        check_contract(original)
        settings = _settings(bound.arguments)
        lm = _causal_lm(model)
        if not is_patched(lm):
            patch(lm)
        options = lm.__dict__[_STATE]["options"]
        for name in ("label_smoothing", "z_loss"):
            if options.get(name):
                raise ValueError(f"gapfix.hf.patch(..., {name}={options[name]!r}): TRL computes its loss from the "
                                 f"fused head's per-token log_probs, where {name} cannot apply; patch without it")
        lm.__dict__[_STATE]["trl_head"] = settings
        return None

    setattr(add_fused_lm_head, _ORIGINAL, original)
    return add_fused_lm_head


def install() -> bool:
    """Route TRL's add_fused_lm_head through gapfix for patched models (idempotent). When trl
    is installed but not imported yet, this happens right after trl.trainer.utils is first
    imported (importing trl here would cost seconds to users who do not use it). False when
    trl is not installed, or has no fused head (its trainers then call the forward with
    labels, which the patch already serves)."""
    utils = sys.modules.get("trl.trainer.utils")
    if utils is None:
        if importlib.util.find_spec("trl") is None:
            return False
        if not any(isinstance(finder, _AfterTrlUtils) for finder in sys.meta_path):
            sys.meta_path.insert(0, _AfterTrlUtils())
        return True
    current = utils.__dict__.get("add_fused_lm_head")
    if current is None:
        return False
    original = getattr(current, _ORIGINAL, current)
    wrapper = current if original is not current else _wrap(original)
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "trl" or name.startswith("trl.")):
            continue
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("add_fused_lm_head") is original:
            module.add_fused_lm_head = wrapper
    return True


class _AfterTrlUtils(importlib.abc.MetaPathFinder):
    """Runs install() once trl.trainer.utils has executed, before any trainer module takes
    add_fused_lm_head from it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "trl.trainer.utils":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_install(module: Any) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            install()

        loader.exec_module = exec_then_install
        return spec


@contextlib.contextmanager
def serve_trl_head() -> Iterator[None]:
    """While active (in this thread), TRL's add_fused_lm_head patches the model it is given
    and serves its head with gapfix's kernel: gapfix's own TRL trainers build under it."""
    install()
    _serving.depth = getattr(_serving, "depth", 0) + 1
    try:
        yield
    finally:
        _serving.depth -= 1


def add_trl_head(lm: nn.Module, settings: dict) -> None:
    """TRL's own fused head on `lm`, with the settings TRL asked gapfix for."""
    import trl.trainer.utils as utils

    current = utils.add_fused_lm_head
    getattr(current, _ORIGINAL, current)(lm, **settings)


def refuse_wrapped(lm: nn.Module) -> None:
    """ValueError when TRL's fused head already wraps `lm` (patched after a trainer was built)."""
    forward = lm.__dict__.get("forward")
    for _ in range(8):  # through wrappers added on top (accelerate's output conversion)
        code = getattr(getattr(forward, "__func__", forward), "__code__", None)
        # functools.wraps gave TRL's wrapper the model's names; its code keeps its own
        if code is not None and code.co_name == "_fused_forward" and "trl" in code.co_filename:
            break
        forward = getattr(forward, "model_forward", None) or getattr(forward, "__wrapped__", None)
        if forward is None:
            return
    else:
        return
    raise ValueError("model: a TRL trainer already added its fused LM head to this model; patch the model "
                     "(gapfix.hf.patch) before creating the trainer, so that gapfix serves that head")


def _output_class() -> Any:
    try:
        from trl.trainer.utils import FusedCausalLMOutput

        return FusedCausalLMOutput
    except ImportError:
        from transformers.utils import ModelOutput

        @dataclasses.dataclass
        class FusedCausalLMOutput(ModelOutput):
            loss: Any = None
            log_probs: Any = None
            entropy: Any = None
            log_sum_sq_probs: Any = None
            mean_logits: Any = None
            is_top1: Any = None
            label_mask: Any = None
            aux_loss: Any = None

        return FusedCausalLMOutput


def _router_loss(lm: nn.Module, text_config: Any, trunk_outputs: Any, attention_mask: Any) -> torch.Tensor:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    experts = getattr(text_config, "num_experts", None) or getattr(lm, "num_experts", None)
    per_token = getattr(text_config, "num_experts_per_tok", None) or getattr(lm, "num_experts_per_tok", None)
    return load_balancing_loss_func(trunk_outputs.router_logits, experts, per_token, attention_mask)


def fused_head_forward(lm: nn.Module, signature: inspect.Signature, args: tuple, kwargs: dict,
                       settings: dict | None) -> Any:
    """The forward of a patched model called with fused_lm_head=True (module docstring)."""
    from gapfix.hf.patching import _STATE, _trunk, _var_keyword
    from gapfix.models import output_head
    from gapfix.ops.cross_entropy.log_probs import linear_log_probs, log_probs_of_logits

    settings = dict(DEFAULT_SETTINGS if settings is None else settings)
    bound = signature.bind(*args, **kwargs)
    call = dict(bound.arguments)
    call.update(call.pop(_var_keyword(signature), None) or {})
    labels = call.pop("labels", None)
    shift_labels = call.pop("shift_labels", None)
    num_items = call.pop("num_items_in_batch", None)
    for name in ("return_dict", "logits_to_keep", "use_cache"):
        call.pop(name, None)
    if labels is None and shift_labels is None:
        raise ValueError("fused_lm_head=True needs labels (or shift_labels): the head scores the next tokens")
    text_config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if getattr(text_config, "output_router_logits", False):
        call.setdefault("output_router_logits", True)
    trunk_outputs = _trunk(lm)(use_cache=False, **call)
    hidden = trunk_outputs.last_hidden_state if hasattr(trunk_outputs, "last_hidden_state") else trunk_outputs[0]
    if shift_labels is None:
        hidden, target = hidden[:, :-1], labels[:, 1:]
    else:
        hidden, target = hidden, shift_labels
    head = output_head(lm)
    weight = next(head.module.parameters())
    hidden = hidden.to(weight.device)
    target = target.to(weight.device)
    mask = target != -100
    temperature = settings["temperature"]
    outputs = settings["outputs"]
    options = {k: v for k, v in lm.__dict__[_STATE]["options"].items() if k in ("impl", "chunk_size")}
    device_type = hidden.device.type
    autocast_off = contextlib.nullcontext()
    if settings["cast_lm_head_to_fp32"]:
        hidden = hidden.float()
        autocast_off = torch.autocast(device_type, enabled=False) if device_type in ("cuda", "cpu") else autocast_off
    autocast = device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)
    softcap = None if head.softcap is None else head.softcap / temperature
    with autocast_off:
        if head.is_linear:
            x, w, b = head.linear_loss_inputs(hidden)
            compute = hidden.dtype if settings["cast_lm_head_to_fp32"] or not autocast else None
            if compute is not None and w.dtype != compute:
                # TRL forms the logits in the hidden states' dtype (or fp32 when asked)
                w = w.to(compute)
                b = None if b is None else b.to(compute)
            if temperature != 1.0:
                x = x / temperature
                b = None if b is None else b / temperature
            fields = linear_log_probs(x, w, target, bias=b, softcap=softcap, outputs=outputs, **options)
        else:  # a wrapped (LoRA) head: its logits are formed, the statistics still fused per row
            logits = head.scaled_logits(hidden)
            if temperature != 1.0:
                logits = logits / temperature
            fields = log_probs_of_logits(logits, target, softcap=softcap, outputs=outputs)
    log_probs = fields.log_probs
    denominator = mask.sum().clamp(min=1) if num_items is None else num_items
    loss = -log_probs.sum() / denominator
    aux_loss = None
    if call.get("output_router_logits"):
        aux_loss = _router_loss(lm, text_config, trunk_outputs, call.get("attention_mask"))
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
    return _output_class()(loss=loss, log_probs=log_probs, entropy=fields.entropy,
                           log_sum_sq_probs=fields.log_sum_sq_probs, mean_logits=fields.mean_logits,
                           is_top1=fields.is_top1, label_mask=mask, aux_loss=aux_loss)
