"""The custom ops (torch.library: traceable by torch.compile, with fake implementations) and
their autograd.

gapfix::linear_cross_entropy_fwd / _bwd and gapfix::cross_entropy_fwd / _bwd take their
options flat, in the order of rows.Options / rows.LinearOptions (the custom op's inputs are
named from its own signature, never from a hand-kept list). Where the gradients are computed
is Options.precomputes_grads: in the forward (returned as outputs, scaled in the backward) or
recomputed by the _bwd op.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from gapfix.ops.cross_entropy.chunked import linear_chunked, logits_chunked
from gapfix.ops.cross_entropy.rows import (
    LinearOptions,
    Options,
    Rows,
    assemble_loss,
    compute_dtype,
    denominator,
    row_scale,
)
from gapfix.ops.cross_entropy.triton_launch import (
    linear_triton_backward,
    linear_triton_forward,
    logits_triton_backward,
    logits_triton_forward,
)
from gapfix.ops.cross_entropy.validation import check_values, tracing

_EMPTY = (0,)


def _or_empty(like: Tensor, *tensors: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """Custom ops return tensors, never None, and no two outputs may alias: a fresh
    empty tensor stands for each gradient that was not computed."""
    return tuple(like.new_empty(_EMPTY) if t is None else t for t in tensors)


def _make_rows(
    ids: Tensor, target_weight: Optional[Tensor], token_weight: Optional[Tensor], vocab: int,
    ignore_index: int, dtype: torch.dtype,
) -> Rows:
    """The row terms; on CPU tensors (outside a trace) invalid values raise ValueError."""
    rows = Rows(ids, target_weight, token_weight, vocab, ignore_index, compute_dtype(dtype))
    check_values(rows, ids.device)
    return rows


def _unit_scale(rows: Rows, opts: Options, denom: Tensor) -> Tensor:
    """The row scale r for grad_out = 1: what the forward's precomputed gradients use."""
    return row_scale(rows, torch.ones((), dtype=rows.mass.dtype, device=rows.mass.device), opts.reduction, denom)


def _scale_precomputed(grad_loss: Tensor, *grads: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The gradients the forward computed for grad_out = 1, times grad_out. loss.backward()
    passes exactly 1: on CPU, outside tracing, that is checked and the (V x H) multiply
    skipped (the check would be a host sync on a GPU, and is data-dependent in a trace)."""
    g = grad_loss.reshape(())
    if g.device.type == "cpu" and type(g) is torch.Tensor and not tracing() and g.item() == 1.0:
        return grads
    return tuple(None if t is None else t * g.to(t.dtype) for t in grads)


def _refuse_double_backward() -> None:
    """The backward of the fast paths is not itself differentiable. It runs with grad mode on
    only under create_graph=True: refuse there, rather than return a gradient whose own
    gradient would be silently 0."""
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "second-order gradients (backward with create_graph=True) through gapfix's fused "
            "cross-entropy are not supported by impl='torch_fast' or impl='triton'; use impl='torch'")


def _input_grads(input_names: Sequence[str], **grads: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The backward's return: a gradient (or None) for each input of the forward op, by name."""
    return tuple(grads.get(name) for name in input_names)


# --------------------------------------------------------------------------------------
# linear form
# --------------------------------------------------------------------------------------


def _linear_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, target_weight: Optional[Tensor],
    token_weight: Optional[Tensor], num_tokens: Optional[Tensor], num_tokens_value: float,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float], reduction: str, impl: str,
    chunk_rows: int, grad_weight_dtype: Optional[torch.dtype], filter_eps: float,
    need_dx: bool, need_dw: bool, need_db: bool, all_rows: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, lse, denominator, dx, dw, db, row_loss, logit_sum); the gradients are empty
    unless precomputed; row_loss (before token_weight) and logit_sum (empty without label
    smoothing) serve the gradients of the weights (api.py). all_rows: the lse of ignored
    rows is wanted too (else the chunked path may skip those rows and leave their lse at 0)."""
    opts = LinearOptions(ignore_index, label_smoothing, z_loss, softcap, reduction, impl, chunk_rows,
                         grad_weight_dtype, filter_eps)
    vocab = weight.shape[0]
    rows = _make_rows(ids, target_weight, token_weight, vocab, ignore_index, hidden.dtype)
    denom = denominator(rows, reduction, num_tokens, num_tokens_value)
    dx = dw = db = None
    if impl == "triton":
        lse, target_logit, logit_sum = linear_triton_forward(hidden, weight, bias, rows, opts)
    else:
        scale = _unit_scale(rows, opts, denom) if opts.precomputes_grads(need_dx or need_dw or need_db) else None
        lse, target_logit, logit_sum, dx, dw, db = linear_chunked(
            hidden, weight, bias, rows, opts, scale, need_dx, need_dw, need_db, all_rows)
    loss, row_loss = assemble_loss(rows, lse, target_logit, logit_sum, vocab, opts, denom)
    return (loss, lse, denom) + _or_empty(hidden, dx, dw, db) + (row_loss,) + _or_empty(lse, logit_sum)


_LINEAR_FWD_INPUTS = tuple(inspect.signature(_linear_fwd).parameters)
_linear_fwd_op = torch.library.custom_op("gapfix::linear_cross_entropy_fwd", mutates_args=())(_linear_fwd)


@_linear_fwd_op.register_fake
def _(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, target_weight: Optional[Tensor],
    token_weight: Optional[Tensor], num_tokens: Optional[Tensor], num_tokens_value: float,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float], reduction: str,
    impl: str, chunk_rows: int, grad_weight_dtype: Optional[torch.dtype], filter_eps: float,
    need_dx: bool, need_dw: bool, need_db: bool, all_rows: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n_rows, ldt = hidden.shape[0], compute_dtype(hidden.dtype)
    loss = hidden.new_empty((n_rows,) if reduction == "none" else (), dtype=ldt)
    lse = hidden.new_empty((n_rows,), dtype=ldt)
    denom = hidden.new_empty((), dtype=ldt)
    opts = LinearOptions(ignore_index, label_smoothing, z_loss, softcap, reduction, impl, chunk_rows,
                         grad_weight_dtype, filter_eps)
    pre = opts.precomputes_grads(need_dx or need_dw or need_db)
    dx = torch.empty_like(hidden) if pre and need_dx else hidden.new_empty(_EMPTY)
    dw = torch.empty_like(weight) if pre and need_dw else hidden.new_empty(_EMPTY)
    db = torch.empty_like(bias) if pre and need_db else hidden.new_empty(_EMPTY)
    logit_sum = hidden.new_empty((n_rows,) if label_smoothing else _EMPTY, dtype=ldt)
    return loss, lse, denom, dx, dw, db, hidden.new_empty((n_rows,), dtype=ldt), logit_sum


@torch.library.custom_op("gapfix::linear_cross_entropy_bwd", mutates_args=())
def _linear_bwd_op(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
    target_weight: Optional[Tensor], token_weight: Optional[Tensor], lse: Tensor, denom: Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float], reduction: str, impl: str,
    chunk_rows: int, grad_weight_dtype: Optional[torch.dtype], filter_eps: float,
    need_dx: bool, need_dw: bool, need_db: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    opts = LinearOptions(ignore_index, label_smoothing, z_loss, softcap, reduction, impl, chunk_rows,
                         grad_weight_dtype, filter_eps)
    rows = Rows(ids, target_weight, token_weight, weight.shape[0], ignore_index, compute_dtype(hidden.dtype))
    r = row_scale(rows, grad_loss, reduction, denom)
    if impl == "triton":
        dx, dw, db = linear_triton_backward(hidden, weight, bias, rows, lse, r, opts, need_dx, need_dw, need_db)
    else:
        _, _, _, dx, dw, db = linear_chunked(hidden, weight, bias, rows, opts, r, need_dx, need_dw, need_db)
    return _or_empty(hidden, dx, dw, db)


@_linear_bwd_op.register_fake
def _(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
    target_weight: Optional[Tensor], token_weight: Optional[Tensor], lse: Tensor, denom: Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float], reduction: str,
    impl: str, chunk_rows: int, grad_weight_dtype: Optional[torch.dtype], filter_eps: float,
    need_dx: bool, need_dw: bool, need_db: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    dx = torch.empty_like(hidden) if need_dx else hidden.new_empty(_EMPTY)
    dw = torch.empty_like(weight) if need_dw else hidden.new_empty(_EMPTY)
    db = torch.empty_like(bias) if need_db else hidden.new_empty(_EMPTY)
    return dx, dw, db


def _linear_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    # outputs without a gradient reach the backward as None: no zeros of the (V, H)
    # precomputed-gradient output's shape are filled for it
    ctx.set_materialize_grads(False)
    args = dict(zip(_LINEAR_FWD_INPUTS, inputs, strict=True))
    _, lse, denom, dx, dw, db, _, _ = output
    ctx.opts = LinearOptions.from_args(args)
    ctx.precomputed = ctx.opts.precomputes_grads(args["need_dx"] or args["need_dw"] or args["need_db"])
    ctx.has_bias = args["bias"] is not None
    if ctx.precomputed:
        ctx.save_for_backward(dx, dw, db)
    else:
        ctx.save_for_backward(args["hidden"], args["weight"], args["bias"], args["ids"], args["target_weight"],
                              args["token_weight"], lse, denom)


def _linear_backward(ctx: Any, grad_loss: Optional[Tensor], *unused: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    _refuse_double_backward()
    if grad_loss is None:  # the loss has no gradient: nor have the inputs
        return _input_grads(_LINEAR_FWD_INPUTS)
    need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    need_db = need_db and ctx.has_bias
    if ctx.precomputed:
        dx, dw, db = ctx.saved_tensors
        dx, dw, db = _scale_precomputed(grad_loss, dx if need_dx else None, dw if need_dw else None,
                                        db if need_db else None)
    else:
        hidden, weight, bias, ids, target_weight, token_weight, lse, denom = ctx.saved_tensors
        dx, dw, db = torch.ops.gapfix.linear_cross_entropy_bwd(
            grad_loss, hidden, weight, bias, ids, target_weight, token_weight, lse, denom,
            need_dx=need_dx, need_dw=need_dw, need_db=need_db, **ctx.opts.as_kwargs())
        dx, dw, db = (dx if need_dx else None), (dw if need_dw else None), (db if need_db else None)
    return _input_grads(_LINEAR_FWD_INPUTS, hidden=dx, weight=dw, bias=db)


_linear_fwd_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# --------------------------------------------------------------------------------------
# logits form
# --------------------------------------------------------------------------------------


def _logits_fwd(
    logits: Tensor, ids: Tensor, target_weight: Optional[Tensor], token_weight: Optional[Tensor],
    num_tokens: Optional[Tensor], num_tokens_value: float, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: Optional[float], reduction: str, impl: str, chunk_rows: int, need_grad: bool,
    all_rows: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, lse, denominator, dlogits for grad_out = 1 or empty, row_loss, logit_sum), as
    the linear form's."""
    opts = Options(ignore_index, label_smoothing, z_loss, softcap, reduction, impl, chunk_rows)
    vocab = logits.shape[1]
    rows = _make_rows(ids, target_weight, token_weight, vocab, ignore_index, logits.dtype)
    denom = denominator(rows, reduction, num_tokens, num_tokens_value)
    dlogits = None
    if impl == "triton":
        lse, target_logit, logit_sum = logits_triton_forward(logits, rows, opts)
    else:
        scale = _unit_scale(rows, opts, denom) if opts.precomputes_grads(need_grad) else None
        lse, target_logit, logit_sum, dlogits = logits_chunked(logits, rows, opts, scale, all_rows)
    loss, row_loss = assemble_loss(rows, lse, target_logit, logit_sum, vocab, opts, denom)
    return (loss, lse, denom) + _or_empty(logits, dlogits) + (row_loss,) + _or_empty(lse, logit_sum)


_LOGITS_FWD_INPUTS = tuple(inspect.signature(_logits_fwd).parameters)
_logits_fwd_op = torch.library.custom_op("gapfix::cross_entropy_fwd", mutates_args=())(_logits_fwd)


@_logits_fwd_op.register_fake
def _(
    logits: Tensor, ids: Tensor, target_weight: Optional[Tensor], token_weight: Optional[Tensor],
    num_tokens: Optional[Tensor], num_tokens_value: float, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: Optional[float], reduction: str, impl: str, chunk_rows: int, need_grad: bool,
    all_rows: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n_rows, ldt = logits.shape[0], compute_dtype(logits.dtype)
    loss = logits.new_empty((n_rows,) if reduction == "none" else (), dtype=ldt)
    pre = Options(ignore_index, label_smoothing, z_loss, softcap, reduction, impl, chunk_rows).precomputes_grads(
        need_grad)
    return (loss, logits.new_empty((n_rows,), dtype=ldt), logits.new_empty((), dtype=ldt),
            torch.empty_like(logits, memory_format=torch.contiguous_format) if pre else logits.new_empty(_EMPTY),
            logits.new_empty((n_rows,), dtype=ldt),
            logits.new_empty((n_rows,) if label_smoothing else _EMPTY, dtype=ldt))


@torch.library.custom_op("gapfix::cross_entropy_bwd", mutates_args=())
def _logits_bwd_op(
    grad_loss: Tensor, logits: Tensor, ids: Tensor, target_weight: Optional[Tensor],
    token_weight: Optional[Tensor], lse: Tensor, denom: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: Optional[float], reduction: str, impl: str, chunk_rows: int,
) -> Tensor:
    opts = Options(ignore_index, label_smoothing, z_loss, softcap, reduction, impl, chunk_rows)
    rows = Rows(ids, target_weight, token_weight, logits.shape[1], ignore_index, compute_dtype(logits.dtype))
    r = row_scale(rows, grad_loss, reduction, denom)
    if impl == "triton":
        return logits_triton_backward(logits, rows, lse, r, opts)
    return logits_chunked(logits, rows, opts, r)[3]


@_logits_bwd_op.register_fake
def _(
    grad_loss: Tensor, logits: Tensor, ids: Tensor, target_weight: Optional[Tensor],
    token_weight: Optional[Tensor], lse: Tensor, denom: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: Optional[float], reduction: str, impl: str, chunk_rows: int,
) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _logits_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    # outputs without a gradient reach the backward as None: no (N, V) zeros are filled for
    # the precomputed dlogits output
    ctx.set_materialize_grads(False)
    args = dict(zip(_LOGITS_FWD_INPUTS, inputs, strict=True))
    _, lse, denom, dlogits, _, _ = output
    ctx.opts = Options.from_args(args)
    ctx.precomputed = ctx.opts.precomputes_grads(args["need_grad"])
    if ctx.precomputed:
        ctx.save_for_backward(dlogits)
    else:
        ctx.save_for_backward(args["logits"], args["ids"], args["target_weight"], args["token_weight"], lse, denom)


def _logits_backward(ctx: Any, grad_loss: Optional[Tensor], *unused: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    _refuse_double_backward()
    if grad_loss is None:  # the loss has no gradient: nor have the logits
        return _input_grads(_LOGITS_FWD_INPUTS)
    if ctx.precomputed:
        (dlogits,) = ctx.saved_tensors
        (dlogits,) = _scale_precomputed(grad_loss, dlogits)
    else:
        logits, ids, target_weight, token_weight, lse, denom = ctx.saved_tensors
        dlogits = torch.ops.gapfix.cross_entropy_bwd(grad_loss, logits, ids, target_weight, token_weight, lse,
                                                     denom, **ctx.opts.as_kwargs())
    return _input_grads(_LOGITS_FWD_INPUTS, logits=dlogits)


_logits_fwd_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)
