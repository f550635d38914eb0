"""Per-token log-probabilities and distribution statistics of hidden @ lm_weight^T, without
the (N, V) logits: what TRL's fused LM head asks a model for.

Per row, with logits z (after the optional soft cap z = c * tanh(x / c)), lse = logsumexp(z),
p = softmax(z) and the row's target id t:

    log_probs         z_t - lse                       differentiable
    entropy           H = lse - sum_v p_v z_v          differentiable
    log_sum_sq_probs  log sum_v p_v^2 = logsumexp(2z) - 2 lse       no gradient
    mean_logits       sum_v z_v / V                                  no gradient
    is_top1           t is the first argmax of z (a tie with an earlier id is not top-1)

Rows whose target is ignore_index give 0 (False) in every field and no gradient.

Gradient, with upstream a = dL/dlog_probs and b = dL/dentropy of the row:

    dL/dz_v = a ([v = t] - p_v) + b p_v (lse - H - z_v)     (dH/dz_v = -p_v (log p_v + H))
    dL/dx_v = dL/dz_v (1 - (z_v / c)^2)                      with a soft cap

then dhidden = G @ W, dW = G^T @ hidden, dbias = G.sum(0) as for the cross-entropy.

A temperature T and a logit scale s fold into the inputs: (s/T) hidden, (s/T) bias and soft
cap c/T give c/T tanh(s x / c) = softcap(s x) / T.

Implementations (docs/ops.md): "torch" materializes the logits (the oracle); "torch_fast"
streams chunks of rows (CPU: ignored rows are skipped) in one pass: each chunk's logits are
formed once, its statistics read while it is live, and, when a gradient is wanted, the chunk
then becomes the gradient for a uniform upstream a (the SFT loss, a sum of log-probabilities
over a count), accumulated into dhidden, dW and dbias in the forward. The backward uses
those when a is the same on every counted row and b is 0 (read on the host: CPU only),
scales the rows of dhidden when only b is 0, and otherwise recomputes, chunk by chunk, in
reused buffers; "triton" streams vocabulary tiles (kernels/cross_entropy.py) and recomputes
in the backward.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from gapfix.ops.cross_entropy.chunked import _rows_to_visit, default_chunk_rows, linear_chunked
from gapfix.ops.cross_entropy.rows import LinearOptions, Rows, compute_dtype
from gapfix.ops.cross_entropy.validation import (
    FLOAT_DTYPES,
    check_target,
    check_values,
    resolve_impl,
    tracing,
)

__all__ = ["STATS", "TokenLogProbs", "linear_log_probs", "linear_log_probs_reference", "log_probs_of_logits"]

# the optional per-token fields, besides log_probs (always computed)
STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_EMPTY = (0,)


class TokenLogProbs(NamedTuple):
    """Per-token fields of `linear_log_probs`, each of the target's shape; a field that was
    not asked for is None."""

    log_probs: Tensor
    entropy: Optional[Tensor] = None
    log_sum_sq_probs: Optional[Tensor] = None
    mean_logits: Optional[Tensor] = None
    is_top1: Optional[Tensor] = None


# --------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------


def linear_log_probs_reference(hidden: Tensor, lm_weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                               ignore_index: int = -100, softcap: Optional[float] = None) -> TokenLogProbs:
    """Every field (module docstring) from the materialized logits, in fp32 (fp64 for fp64
    inputs); log_probs and entropy differentiable through autograd. hidden (N, H), target (N,)."""
    logits = torch.nn.functional.linear(hidden, lm_weight, bias)
    return log_probs_of_logits(logits, target, ignore_index=ignore_index, softcap=softcap)


def log_probs_of_logits(logits: Tensor, target: Tensor, *, ignore_index: int = -100, softcap: Optional[float] = None,
                        outputs: Sequence[str] = ("log_probs",) + STATS) -> TokenLogProbs:
    """The fields of given logits (..., V) against target (...), through autograd (the
    reference's math; also the path of a head that is not a plain linear layer)."""
    z = logits.to(compute_dtype(logits.dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    counted = target != ignore_index
    safe = torch.where(counted, target, 0).long()
    log_p = torch.log_softmax(z, dim=-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    log_probs = torch.where(counted, log_p.gather(-1, safe[..., None]).squeeze(-1), zero)
    entropy = torch.where(counted, -(log_p.exp() * log_p).sum(-1), zero) if "entropy" in outputs else None
    with torch.no_grad():
        log_sum_sq = (torch.where(counted, torch.logsumexp(2.0 * log_p, dim=-1), zero)
                      if "log_sum_sq_probs" in outputs else None)
        mean = torch.where(counted, z.mean(-1), zero) if "mean_logits" in outputs else None
        top1 = counted & (z.argmax(-1) == safe) if "is_top1" in outputs else None
    return TokenLogProbs(log_probs, entropy, log_sum_sq, mean, top1)


# --------------------------------------------------------------------------------------
# torch_fast: chunks of rows
# --------------------------------------------------------------------------------------


# entropy's sum_v E log E runs over sub-blocks of a chunk's rows through a scratch of at
# most this many elements (8 MiB in fp32) beside the chunk, instead of a chunk-sized one
_SCRATCH_ELEMENTS = 1 << 21


def _stat_hooks(out: dict, ids: Tensor, vocab: int, flags: Sequence[bool]) -> Tuple[Any, Any]:
    """-> (on_logits, on_exp) for linear_chunked, writing the requested statistics of each
    live chunk into `out` (the module docstring's formulas). With E = exp(z - max) and
    s = sum_v E (s = 1 when the chunk holds the softmax P itself):
        H = log s - sum_v E log E / s            (E log E read as 0 where E underflows to 0)
        log sum_v p_v^2 = log sum_v E^2 - 2 log s
    Each reads the chunk once more (row dot products: a batched matmul, no chunk-sized
    temporary; E log E through the scratch), and writes (rows,) floats."""
    want_entropy, want_sq, want_mean, want_top1 = flags
    scratch = []

    def on_logits(sel: Any, z: Tensor) -> None:
        if want_top1:
            out["is_top1"][sel] = z.argmax(dim=1) == ids[sel]
        if want_mean:
            out["mean_logits"][sel] = z.sum(dim=1) / vocab

    def on_exp(sel: Any, e: Tensor, s: Optional[Tensor]) -> None:
        log_s = None if s is None else s.log()
        if want_sq:
            sq = torch.bmm(e.unsqueeze(1), e.unsqueeze(2)).view(-1).log()
            out["log_sum_sq_probs"][sel] = sq if log_s is None else sq - 2.0 * log_s
        if want_entropy:
            n = e.shape[0]
            if not scratch:
                scratch.append(e.new_empty(min(n, max(1, _SCRATCH_ELEMENTS // vocab)), vocab))
            buf = scratch[0]
            e_log_e = e.new_empty(n)
            for r0 in range(0, n, buf.shape[0]):
                r1 = min(n, r0 + buf.shape[0])
                part = buf[: r1 - r0]
                torch.special.xlogy(e[r0:r1], e[r0:r1], out=part)
                torch.sum(part, dim=1, out=e_log_e[r0:r1])
            out["entropy"][sel] = -e_log_e if s is None else log_s - e_log_e / s

    return (on_logits if (want_top1 or want_mean) else None), (on_exp if (want_sq or want_entropy) else None)


def _chunked_fields(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Rows, ignore_index: int,
                    softcap: Optional[float], chunk_rows: int, flags: Sequence[bool], precompute: bool,
                    need_dx: bool, need_dw: bool, need_db: bool) -> Tuple[Optional[Tensor], ...]:
    """-> (log_probs, entropy, log_sum_sq, mean, top1, lse, dx, dw, db), fields (N,) each
    (unrequested stats empty), in one pass over chunks of rows (linear_chunked): each
    chunk's logits are formed once, its statistics read while it is live, and with
    `precompute` the chunk then becomes the gradient of sum over counted rows of
    -log_probs (the cross-entropy's "sum" gradient; gradients None otherwise). Memory: one
    (chunk rows, V) buffer (two with a soft cap and a gradient), the entropy scratch, dW."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    dev = hidden.device
    out = {}
    for name, wanted in zip(STATS, flags):
        if wanted:
            out[name] = torch.zeros(n_rows, dtype=torch.bool if name == "is_top1" else cdt, device=dev)
    on_logits, on_exp = _stat_hooks(out, rows.safe_ids[:, 0], vocab, flags)
    opts = LinearOptions(ignore_index, 0.0, 0.0, softcap, "sum", "torch_fast", chunk_rows)
    scale = None
    if precompute:
        scale = torch.where(rows.counted, torch.ones((), dtype=rows.mass.dtype, device=dev),
                            torch.zeros((), dtype=rows.mass.dtype, device=dev))
    else:
        need_dx = need_dw = need_db = False
    lse, target_logit, _, dx, dw, db = linear_chunked(hidden, weight, bias, rows, opts, scale, need_dx, need_dw,
                                                      need_db, on_logits=on_logits, on_exp=on_exp)
    counted = rows.counted
    zero = torch.zeros((), dtype=cdt, device=dev)
    results = [torch.where(counted, target_logit - lse, zero)]
    for name, wanted in zip(STATS, flags):
        if not wanted:
            results.append(hidden.new_empty(_EMPTY, dtype=torch.bool if name == "is_top1" else cdt))
        elif name == "is_top1":
            results.append(out[name] & counted)
        else:
            results.append(torch.where(counted, out[name], zero))
    return tuple(results) + (lse, dx, dw, db)


def _chunked_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Rows, lse: Tensor,
                      entropy: Optional[Tensor], a: Tensor, b: Optional[Tensor], softcap: Optional[float],
                      chunk_rows: int, need_dx: bool, need_dw: bool, need_db: bool
                      ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The module docstring's gradient, recomputing each chunk's logits into a reused
    (chunk rows, V) buffer and turning it into G in place: one such buffer, plus one for p
    when b (the entropy's upstream) is given and one for tanh with a soft cap."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    same = hidden.dtype == cdt
    dev = hidden.device
    visit = _rows_to_visit(rows, False)
    n_visit = n_rows if visit is None else visit.numel()
    step = max(1, min(chunk_rows or default_chunk_rows(n_rows, vocab), n_visit or 1))
    # dhidden row by row in the inputs' dtype (G rounded to it first, as the forward's
    # precomputed gradient is); dW and dbias accumulate over chunks in the compute dtype
    dx = torch.zeros_like(hidden) if need_dx else None
    dw = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_dw else None
    db = torch.zeros(vocab, dtype=cdt, device=weight.device) if need_db else None
    zero = torch.zeros((), dtype=cdt, device=dev)
    a = torch.where(rows.counted, a.to(cdt), zero)
    b = None if b is None else torch.where(rows.counted, b.to(cdt), zero)
    ids = rows.safe_ids[:, 0]
    weight_t = weight.t()
    buf = torch.empty(step, vocab, dtype=cdt, device=dev)
    p_buf = torch.empty_like(buf) if b is not None else None
    cap_buf = torch.empty_like(buf) if softcap is not None else None
    for start in range(0, n_visit, step):
        end = min(n_visit, start + step)
        sel = slice(start, end) if visit is None else visit[start:end]
        x = hidden[sel]
        z = buf[: end - start]
        if same:
            torch.mm(x, weight_t, out=z) if bias is None else torch.addmm(bias, x, weight_t, out=z)
        else:
            z.copy_(torch.nn.functional.linear(x, weight, bias))
        tanh = None
        if softcap is not None:
            tanh = cap_buf[: end - start]
            tanh.copy_(z.div_(softcap).tanh_())
            z.mul_(softcap)
        chunk_lse = lse[sel][:, None]
        ra = a[sel][:, None]
        if b is not None:
            # a (onehot - p) + b p (lse - H - z) = p (b (lse - H - z) - a) + a onehot
            p = torch.sub(z, chunk_lse, out=p_buf[: end - start]).exp_()
            g = z.neg_().add_(chunk_lse - entropy[sel][:, None]).mul_(b[sel][:, None]).sub_(ra).mul_(p)
        else:
            g = z.sub_(chunk_lse).exp_().mul_(-ra)
        g.scatter_add_(1, ids[sel][:, None], ra)
        if tanh is not None:
            g.mul_(tanh.mul_(tanh).neg_().add_(1.0))
        if dx is not None:
            dx[sel] = g @ weight if same else g.to(weight.dtype) @ weight
        if dw is not None:
            dw.addmm_(g.t(), x if same else x.to(cdt))
        if db is not None:
            db.add_(g.sum(dim=0))
    return dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype)


# --------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------


def _fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, ignore_index: int,
         softcap: Optional[float], impl: str, chunk_rows: int, want_entropy: bool, want_sq: bool, want_mean: bool,
         want_top1: bool, precompute: bool, need_dx: bool, need_dw: bool, need_db: bool
         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (log_probs, entropy, log_sum_sq, mean, top1, lse, dx, dw, db): the gradients of the
    uniform upstream a = -1 (empty unless precompute), unrequested stats empty."""
    vocab = weight.shape[0]
    rows = Rows(ids, None, None, vocab, ignore_index, compute_dtype(hidden.dtype))
    check_values(rows, hidden.device)
    flags = (want_entropy, want_sq, want_mean, want_top1)
    dx = dw = db = None
    if impl == "triton":
        from gapfix.ops.cross_entropy.triton_launch import log_probs_triton_forward

        fields = log_probs_triton_forward(hidden, weight, bias, rows, softcap, flags)
    else:
        *fields, dx, dw, db = _chunked_fields(hidden, weight, bias, rows, ignore_index, softcap, chunk_rows, flags,
                                              precompute, need_dx, need_dw, need_db)
    nan = torch.full((), float("nan"), dtype=fields[0].dtype, device=hidden.device)
    fields = (torch.where(rows.invalid, nan, fields[0]),) + tuple(fields[1:])
    empty = [hidden.new_empty(_EMPTY) if t is None else t for t in (dx, dw, db)]
    return tuple(fields) + tuple(empty)


_FWD_INPUTS = tuple(inspect.signature(_fwd).parameters)
_fwd_op = torch.library.custom_op("gapfix::linear_log_probs_fwd", mutates_args=())(_fwd)


@_fwd_op.register_fake
def _(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, ignore_index: int,
      softcap: Optional[float], impl: str, chunk_rows: int, want_entropy: bool, want_sq: bool, want_mean: bool,
      want_top1: bool, precompute: bool, need_dx: bool, need_dw: bool, need_db: bool
      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n_rows, cdt = hidden.shape[0], compute_dtype(hidden.dtype)

    def field(wanted: bool, dtype: torch.dtype = cdt) -> Tensor:
        return hidden.new_empty((n_rows,) if wanted else _EMPTY, dtype=dtype)

    return (field(True), field(want_entropy), field(want_sq), field(want_mean), field(want_top1, torch.bool),
            field(True), torch.empty_like(hidden) if precompute and need_dx else hidden.new_empty(_EMPTY),
            torch.empty_like(weight) if precompute and need_dw else hidden.new_empty(_EMPTY),
            torch.empty_like(bias) if precompute and need_db else hidden.new_empty(_EMPTY))


@torch.library.custom_op("gapfix::linear_log_probs_bwd", mutates_args=())
def _bwd_op(grad_log_probs: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
            bias: Optional[Tensor], ids: Tensor, lse: Tensor, entropy: Optional[Tensor], ignore_index: int,
            softcap: Optional[float], impl: str, chunk_rows: int, need_dx: bool, need_dw: bool, need_db: bool
            ) -> Tuple[Tensor, Tensor, Tensor]:
    rows = Rows(ids, None, None, weight.shape[0], ignore_index, compute_dtype(hidden.dtype))
    if impl == "triton":
        from gapfix.ops.cross_entropy.triton_launch import log_probs_triton_backward

        grads = log_probs_triton_backward(hidden, weight, bias, rows, lse, entropy, grad_log_probs, grad_entropy,
                                          softcap, need_dx, need_dw, need_db)
    else:
        grads = _chunked_backward(hidden, weight, bias, rows, lse, entropy, grad_log_probs, grad_entropy, softcap,
                                  chunk_rows, need_dx, need_dw, need_db)
    return tuple(hidden.new_empty(_EMPTY) if t is None else t for t in grads)


@_bwd_op.register_fake
def _(grad_log_probs: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
      bias: Optional[Tensor], ids: Tensor, lse: Tensor, entropy: Optional[Tensor], ignore_index: int,
      softcap: Optional[float], impl: str, chunk_rows: int, need_dx: bool, need_dw: bool, need_db: bool
      ) -> Tuple[Tensor, Tensor, Tensor]:
    return (torch.empty_like(hidden) if need_dx else hidden.new_empty(_EMPTY),
            torch.empty_like(weight) if need_dw else hidden.new_empty(_EMPTY),
            torch.empty_like(bias) if need_db and bias is not None else hidden.new_empty(_EMPTY))


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    # the backward takes None for an output without a gradient: no zeros of the (V, H)
    # precomputed-gradient output's shape are filled for it
    ctx.set_materialize_grads(False)
    args = dict(zip(_FWD_INPUTS, inputs, strict=True))
    ctx.args = {k: args[k] for k in ("ignore_index", "softcap", "impl", "chunk_rows")}
    ctx.precomputed = args["precompute"]
    ctx.has_entropy = args["want_entropy"]
    ctx.has_bias = args["bias"] is not None
    _, entropy, _, _, _, lse, dx, dw, db = output
    ctx.save_for_backward(args["hidden"], args["weight"], args["bias"], args["ids"], lse,
                          entropy if args["want_entropy"] else None)
    # the precomputed gradients are consumed (scaled in place, handed out as the gradients)
    # by the first backward that can use them; held detached: no reference cycle, no
    # saved-tensor version check for that in-place scaling
    ctx.precomputed_grads = (dx.detach(), dw.detach(), db.detach()) if ctx.precomputed else None


def _host_reads_ok(t: Tensor) -> bool:
    return t.device.type == "cpu" and type(t) is torch.Tensor and not tracing()


def _backward(ctx: Any, grad_log_probs: Optional[Tensor], grad_entropy: Optional[Tensor], *unused: Any
              ) -> Tuple[Optional[Tensor], ...]:
    if torch.is_grad_enabled():
        raise NotImplementedError("second-order gradients through gapfix's linear_log_probs are not supported "
                                  "by impl='torch_fast' or impl='triton'; use impl='torch'")
    hidden, weight, bias, ids, lse, entropy = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    need_db = need_db and ctx.has_bias
    if grad_log_probs is None:
        grad_log_probs = torch.zeros_like(lse)
    if grad_entropy is not None and (not ctx.has_entropy or (_host_reads_ok(grad_entropy)
                                                              and not bool(grad_entropy.any()))):
        grad_entropy = None
    rows_counted = ids[:, 0] != ctx.args["ignore_index"]
    a = grad_log_probs.reshape(-1)
    if ctx.precomputed_grads is not None and grad_entropy is None and _host_reads_ok(a):
        dx_pre, dw_pre, db_pre = ctx.precomputed_grads
        ctx.precomputed_grads = None  # a second backward (retain_graph) recomputes
        counted_a = a[rows_counted]
        uniform = counted_a.numel() == 0 or bool((counted_a == counted_a[0]).all())
        if uniform:
            # the forward's gradients are those of a = -1 on every counted row
            scale = -(counted_a[0] if counted_a.numel() else a.new_zeros(()))
            grads = [t.mul_(scale.to(t.dtype)) if need else None
                     for t, need in ((dx_pre, need_dx), (dw_pre, need_dw), (db_pre, need_db))]
            return _input_grads(grads)
        if need_dx:
            # dhidden is row-wise in a: only dW and dbias need the logits again
            dx = (dx_pre.to(a.dtype) * -torch.where(rows_counted, a, torch.zeros((), dtype=a.dtype))[:, None])
            _, dw, db = torch.ops.gapfix.linear_log_probs_bwd(
                a, None, hidden, weight, bias, ids, lse, entropy, need_dx=False, need_dw=need_dw, need_db=need_db,
                **ctx.args)
            return _input_grads([dx.to(hidden.dtype), dw if need_dw else None, db if need_db else None])
    dx, dw, db = torch.ops.gapfix.linear_log_probs_bwd(
        a, grad_entropy, hidden, weight, bias, ids, lse, entropy, need_dx=need_dx, need_dw=need_dw, need_db=need_db,
        **ctx.args)
    return _input_grads([dx if need_dx else None, dw if need_dw else None, db if need_db else None])


def _input_grads(grads: Sequence[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    dx, dw, db = grads
    named = {"hidden": dx, "weight": dw, "bias": db}
    return tuple(named.get(name) for name in _FWD_INPUTS)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------


def linear_log_probs(hidden: Tensor, lm_weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                     ignore_index: int = -100, softcap: Optional[float] = None,
                     outputs: Sequence[str] = ("log_probs",), chunk_size: Optional[int] = None,
                     impl: str = "auto") -> TokenLogProbs:
    """Per-token log-probabilities of `target` (...) under hidden (..., H) @ lm_weight (V, H)^T
    + bias, and the statistics named in `outputs` (module docstring), without the logits.

    Returns a TokenLogProbs of tensors of target's shape: fp32 (fp64 for fp64 inputs) fields,
    is_top1 bool; a stat not named in `outputs` is None. log_probs and entropy carry
    gradients to hidden, lm_weight and bias; the other fields do not. An out-of-range target
    id is a ValueError on CPU tensors and a NaN log-probability elsewhere.
    """
    from gapfix.ops.cross_entropy.api import _autocast_inputs
    from gapfix.ops.cross_entropy.validation import check_options

    check_options(ignore_index, 0.0, 0.0, softcap, "none", None, impl, chunk_size)
    if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs):
        raise ValueError(f"outputs must be a sequence of field names, got {outputs!r}")
    unknown = sorted(set(outputs) - set(("log_probs",) + STATS))
    if unknown:
        raise ValueError(f"outputs: unknown fields {unknown}; known: {('log_probs',) + STATS}")
    if not isinstance(hidden, Tensor) or hidden.dim() < 1 or hidden.dtype not in FLOAT_DTYPES:
        raise ValueError("hidden must be a floating-point tensor of shape (..., H)")
    if not isinstance(lm_weight, Tensor) or lm_weight.dim() != 2:
        raise ValueError("lm_weight must be a tensor of shape (V, H)")
    hidden, lm_weight, bias = _autocast_inputs(hidden, lm_weight, bias)
    if lm_weight.shape[1] != hidden.shape[-1] or lm_weight.shape[0] < 1:
        raise ValueError(f"lm_weight has shape {tuple(lm_weight.shape)}; expected (V >= 1, {hidden.shape[-1]})")
    if lm_weight.dtype != hidden.dtype or lm_weight.device != hidden.device:
        raise ValueError(f"lm_weight ({lm_weight.dtype}, {lm_weight.device}) must have hidden's dtype and device "
                         f"({hidden.dtype}, {hidden.device})")
    vocab, hdim = lm_weight.shape
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (vocab,)
                             or bias.dtype != hidden.dtype or bias.device != hidden.device):
        raise ValueError(f"bias must be a tensor of shape ({vocab},) with hidden's dtype and device")
    if not isinstance(target, Tensor):
        raise ValueError("target must be a tensor of ids (soft targets have no log-probability)")
    lead_shape = hidden.shape[:-1]
    n_rows = math.prod(lead_shape)
    ids, _ = check_target(target, n_rows, hidden.device, lead_shape)
    impl = resolve_impl(impl, hidden.device, hidden.dtype, "linear_log_probs", hidden, lm_weight, bias)
    wanted = {name: name in outputs for name in STATS}
    flat = hidden.reshape(n_rows, hdim)
    if impl == "torch":
        ref = linear_log_probs_reference(flat, lm_weight, ids[:, 0], bias=bias, ignore_index=ignore_index,
                                         softcap=softcap)
        if ids.device.type == "cpu" and not tracing():
            Rows(ids, None, None, vocab, ignore_index, torch.float32).raise_if_invalid()
        fields = [ref.log_probs] + [getattr(ref, n) if wanted[n] else None for n in STATS]
    else:
        grad_on = torch.is_grad_enabled()
        need_dx = grad_on and hidden.requires_grad
        need_dw = grad_on and lm_weight.requires_grad
        need_db = grad_on and bias is not None and bias.requires_grad
        precompute = impl == "torch_fast" and (need_dx or need_dw or need_db)
        res = torch.ops.gapfix.linear_log_probs_fwd(
            flat.contiguous(), lm_weight.contiguous(), bias, ids, ignore_index,
            None if softcap is None else float(softcap), impl, int(chunk_size or 0),
            wanted["entropy"], wanted["log_sum_sq_probs"], wanted["mean_logits"], wanted["is_top1"],
            precompute, need_dx, need_dw, need_db)
        fields = [res[0], res[1] if wanted["entropy"] else None]
        fields += [res[i].detach() if wanted[n] else None for i, n in ((2, "log_sum_sq_probs"), (3, "mean_logits"),
                                                                        (4, "is_top1"))]
    return TokenLogProbs(*(None if f is None else f.reshape(lead_shape) for f in fields))
