"""Fused cross-entropy: on logits, and on (hidden, lm_weight) without the logits.

The math (one token i, logits z over a vocabulary of V, after the optional
soft cap z = c * tanh(x / c)):

    lse   = log sum_v exp(z_v)
    q     = (1 - eps) * w + eps * S / V        target distribution; w_k on the
                                               slot ids id_k, S = sum_k w_k
    loss  = -sum_v q_v log p_v + zl * lse^2
          = S * lse - (1 - eps) * sum_k w_k z_{id_k} - eps * S * mean(z) + zl * lse^2

A hard target is the soft target with one slot of weight 1, so one formula
covers both. The loss of a token is then multiplied by its token_weight. Tokens
whose every slot is ignore_index are not counted: loss 0, gradient 0.

Gradient of the loss of token i with respect to its logits, with r the
upstream scale of that token (grad_out * token_weight / denominator):

    dL/dz_v = r * [ p_v * (S + 2 * zl * lse) - (1 - eps) * sum_k w_k [v = id_k] - eps * S / V ]
    dL/dx_v = dL/dz_v * (1 - (z_v / c)^2)            with a soft cap

and for the linear form, with G the (N, V) matrix of dL/dx:
dhidden = G @ lm_weight, dlm_weight = G^T @ hidden, dbias = G.sum(0).

Reductions: "none" (per token), "sum", and "mean" = sum / denominator, where the
denominator is `num_tokens` when given (so micro-batches of one optimizer step
each divide by the step's total count and their gradients add up exactly), else
the number of counted tokens of this call. If no token is counted, "mean" is 0
and every gradient is zero (the denominator is clamped to at least 1), never NaN.

Implementations (`impl=`):
  "triton"  Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
            Linear form: the forward streams over V tiles of hidden @ lm_weight^T with
            an online logsumexp; the backward recomputes each (rows x vocab) tile and
            accumulates dhidden and dlm_weight with atomics. Logits never exist.
  "cpu"     (alias "chunked") chunks of rows: logits of a chunk, its lse, loss and
            gradient, computed once in the forward (mean/sum) or recomputed in the
            backward ("none"). On CPU tensors ignored rows are dropped before any matmul;
            without a soft cap the chunk is softmaxed in place and the rest of the
            gradient (one-hots, smoothing) goes through the matmuls in factored form.
            Plain torch ops: runs on any device (on CUDA, every row is visited).
  "torch"   the pure-PyTorch reference (materializes the logits): the oracle.
  "auto"    "triton" on CUDA tensors, "cpu" elsewhere.

Invalid values: on CPU tensors an out-of-range target id, a negative target
weight or a negative token_weight raises ValueError. On CUDA tensors checking
would need a host synchronization, so instead such a token's loss (and hence the
reduced loss and the gradients) is NaN: never a silently wrong number.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "cross_entropy_reference",
    "linear_cross_entropy_reference",
]

Target = Union[Tensor, Tuple[Tensor, Tensor], Sequence[Tensor]]

_REDUCTIONS = ("none", "sum", "mean")
_IMPLS = ("auto", "triton", "cpu", "chunked", "native", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# Rows per chunk of the chunked path: a quarter of the rows (so at most a quarter of the
# logits ever exist), within 2**24..2**26 logits (64..256 MiB in fp32). Each chunk re-reads
# and re-writes the (V, H) dW accumulator, so fewer, larger chunks are faster: 2048 rows
# beat 1024 by ~5% at N = 8192, V = 32768, H = 512.
_CHUNK_MIN_ELEMENTS, _CHUNK_MAX_ELEMENTS = 1 << 24, 1 << 26


# --------------------------------------------------------------------------------------
# pure-PyTorch reference (the oracle and the readable spec)
# --------------------------------------------------------------------------------------


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


def linear_cross_entropy_reference(hidden, lm_weight, target, *, bias=None, **kwargs):
    """Reference of the linear form: logits = hidden @ lm_weight^T + bias in the inputs'
    dtype (as an eager model computes them), then cross_entropy_reference."""
    logits = torch.nn.functional.linear(hidden, lm_weight, bias)
    return cross_entropy_reference(logits, target, **kwargs)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def _check_options(ignore_index, label_smoothing, z_loss, softcap, reduction, num_tokens, impl,
                   chunk_size=None):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if not (0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not (float(z_loss) >= 0.0 and math.isfinite(float(z_loss))):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and not (float(softcap) > 0.0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
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


def _check_target(target, n_rows, device, lead_shape):
    """-> (ids (N, K) int64-or-int32, target weights (N, K) or None)."""
    if isinstance(target, Tensor):
        if target.dtype not in _INT_DTYPES:
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
    if ids.dtype not in _INT_DTYPES:
        raise ValueError(f"target ids must hold integer ids, got dtype {ids.dtype}")
    if weights.dtype not in _FLOAT_DTYPES:
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


def _check_token_weight(token_weight, n_rows, device, lead_shape):
    if token_weight is None:
        return None
    if not isinstance(token_weight, Tensor) or token_weight.dtype not in _FLOAT_DTYPES:
        raise ValueError("token_weight must be a floating-point tensor")
    if tuple(token_weight.shape) != tuple(lead_shape):
        raise ValueError(f"token_weight has shape {tuple(token_weight.shape)}, expected {tuple(lead_shape)}")
    if token_weight.device != device:
        raise ValueError(f"token_weight is on {token_weight.device}, expected {device}")
    return token_weight.reshape(n_rows)


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl in ("chunked", "native"):
        impl = "cpu"
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and _triton_available() and dtype in _TRITON_DTYPES else "cpu"
    if impl == "triton":
        if not _triton_available():
            raise ValueError("impl='triton' needs the triton package")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(f"impl='triton' needs CUDA tensors (got {device}); "
                             "CPU tensors run Triton only under TRITON_INTERPRET=1")
        if dtype not in _TRITON_DTYPES:
            raise ValueError(f"impl='triton' supports float32, bfloat16, float16; got {dtype}")
    return impl


# --------------------------------------------------------------------------------------
# shared pieces of the fast paths
# --------------------------------------------------------------------------------------


class _Rows:
    """Per-token target terms shared by the chunked and Triton paths.

    safe_ids (N, K) int64: slot ids, 0 where the slot is ignored or out of range;
    slot_w (N, K): slot weights, 0 where ignored; mass (N,) = S = sum_k slot_w;
    counted (N,) bool; invalid (N,) bool: an out-of-range id or negative weight.
    """

    def __init__(self, ids, target_weight, token_weight, vocab, ignore_index, dtype):
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

    def raise_if_invalid(self):
        """CPU only (host reads): the ValueError contract."""
        if bool(self.bad_id.any()):
            raise ValueError("target holds ids outside [0, V) that are not ignore_index")
        if self.bad_weight is not None and bool(self.bad_weight.any()):
            raise ValueError("target weights must be >= 0")
        if self.bad_token_weight is not None and bool(self.bad_token_weight.any()):
            raise ValueError("token_weight must be >= 0")


def _num_tokens_denominator(num_tokens: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh scalar of `dtype` (never a view of num_tokens: a custom op's output may not
    alias its input), NaN where num_tokens <= 0 or NaN: decided on the device, no host read."""
    count = num_tokens.reshape(()).to(dtype, copy=True)
    return torch.where(count > 0, count, torch.full((), float("nan"), dtype=dtype, device=count.device))


def _denominator(rows: _Rows, reduction: str, num_tokens: Optional[Tensor], num_tokens_value: float,
                 dtype) -> Tensor:
    device = rows.counted.device
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if num_tokens is not None:
        return _num_tokens_denominator(num_tokens, dtype)
    if num_tokens_value > 0:
        return torch.full((), num_tokens_value, dtype=dtype, device=device)
    return rows.counted.sum().to(dtype).clamp_min(1.0)


def _assemble_loss(rows: _Rows, lse, target_logit, logit_sum, vocab, label_smoothing, z_loss,
                   reduction, denom):
    """Per-token loss from the row terms, then the reduction (device-side, no host sync)."""
    loss = rows.mass * lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing:
        loss = loss - (label_smoothing / vocab) * rows.mass * logit_sum
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(rows.counted, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if rows.token_weight is not None:
        loss = loss * rows.token_weight
    loss = torch.where(rows.invalid, torch.full((), float("nan"), dtype=loss.dtype, device=loss.device), loss)
    if reduction == "none":
        return loss
    return loss.sum() / denom


def _grad_coefficients(rows: _Rows, lse: Tensor, r: Tensor, params, vocab: int):
    """-> (coef_p, coef_t, coef_s) per row, with dL/dz_v = coef_p p_v - coef_t sum_k w_k [v = id_k] - coef_s
    (the module docstring's gradient): coef_p = r (S + 2 zl lse), coef_t = r (1 - eps),
    coef_s = r eps S / V. Both are exactly 0 on rows with r = 0 (ignored)."""
    eps, zl = params["label_smoothing"], params["z_loss"]
    coef_p = r * (rows.mass + 2.0 * zl * lse) if zl else r * rows.mass
    return coef_p, r * (1.0 - eps), r * (eps / vocab) * rows.mass


def _row_scale(rows: _Rows, grad_loss: Tensor, reduction: str, denom: Tensor) -> Tensor:
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


# --------------------------------------------------------------------------------------
# chunked path (CPU, or any device): chunks of rows, never the full logits
# --------------------------------------------------------------------------------------


def _default_chunk_rows(n_rows, vocab):
    vocab = max(vocab, 1)
    rows = max(_CHUNK_MIN_ELEMENTS // vocab, min(_CHUNK_MAX_ELEMENTS // vocab, -(-n_rows // 4)))
    return max(16, min(n_rows, rows))


def _rows_to_visit(rows: _Rows, all_rows: bool):
    """None (every row, in order) or the index of the counted rows. On CPU, ignored rows
    (prompt tokens, padding) are dropped before any matmul; finding them reads the mask
    on the host, which a GPU stream must not wait for, so other devices visit every row."""
    if all_rows or rows.counted.device.type != "cpu":
        return None
    keep = rows.counted.nonzero().squeeze(1)
    return None if keep.numel() == rows.counted.numel() else keep


def _chunked_pass(fill_logits, visit, n_rows, vocab, chunk_rows, compute_dtype, device, rows: _Rows,
                  label_smoothing, z_loss, softcap, row_scale=None, on_grad=None, on_probs=None):
    """One pass over the rows in chunks.

    visit: None (all rows) or an index of the rows to visit (the others get lse 0).
    fill_logits(sel, out) writes the logits of rows `sel` (a slice or an index) into
    `out`. Returns (lse, target_logit, logit_sum or None). With row_scale, also, while
    the chunk is live, either
      on_grad(sel, G): G = dL/dx of the chunk (the formula in the module docstring), or
      on_probs(sel, P, coef_p, coef_t, coef_s) (no soft cap): the softmax P and the row
        coefficients with G = coef_p * P - coef_t-weighted one-hots - coef_s, so that the
        caller can push the cheap terms through its matmuls instead of through P.
    """
    alloc = torch.empty if visit is None else torch.zeros
    lse = alloc(n_rows, dtype=compute_dtype, device=device)
    target_logit = alloc(n_rows, dtype=compute_dtype, device=device)
    logit_sum = alloc(n_rows, dtype=compute_dtype, device=device) if label_smoothing else None
    n_visit = n_rows if visit is None else visit.numel()
    chunk_rows = max(1, min(chunk_rows, n_visit))
    buf = torch.empty(chunk_rows, vocab, dtype=compute_dtype, device=device)
    cap_buf = torch.empty_like(buf) if (softcap is not None and row_scale is not None) else None
    zero = torch.zeros((), dtype=compute_dtype, device=device)
    for start in range(0, n_visit, chunk_rows):
        end = min(n_visit, start + chunk_rows)
        sel = slice(start, end) if visit is None else visit[start:end]
        z = buf[: end - start]
        fill_logits(sel, z)
        if softcap is not None:
            z.div_(softcap).tanh_()
            if cap_buf is not None:
                tanh = cap_buf[: end - start]
                tanh.copy_(z)
            z.mul_(softcap)
        ids = rows.safe_ids[sel]
        slot_w = rows.slot_w[sel]
        # an unused slot (weight 0) may point at a -inf logit: 0 * -inf must not give NaN
        picked = z.gather(1, ids)
        target_logit[sel] = torch.where(slot_w != 0, picked * slot_w, zero).sum(dim=1)
        if logit_sum is not None:
            logit_sum[sel] = z.sum(dim=1)
        if on_probs is not None and row_scale is not None:
            # softmax in place, row by row (a row stays in cache: one read and one write
            # of the chunk); lse from the probability of the row's largest logit, which
            # is at least 1/V, so its log is well conditioned
            row_max, arg_max = z.max(dim=1)
            torch._softmax(z, 1, False, out=z)
            chunk_lse = row_max - z.gather(1, arg_max[:, None]).squeeze(1).log()
            chunk_lse = torch.where(row_max == float("-inf"), row_max, chunk_lse)
            lse[sel] = chunk_lse
            r = row_scale[sel]
            mass = rows.mass[sel]
            if visit is None:  # ignored rows are in the chunk: their P (NaN for all -inf) must not reach the matmuls
                z.masked_fill_((r == 0)[:, None], 0.0)
            coef_p = r * (mass + 2.0 * z_loss * chunk_lse) if z_loss else r * mass
            coef_p = torch.where(r != 0, coef_p, zero)
            coef_t = slot_w * ((1.0 - label_smoothing) * r)[:, None]
            coef_s = (label_smoothing / vocab) * r * mass if label_smoothing else None
            on_probs(sel, z, coef_p, coef_t, coef_s)
            continue
        row_max = z.amax(dim=1)
        # an all -inf row: shift by 0 so that exp gives 0 and lse = -inf (no NaN)
        row_max = torch.where(torch.isfinite(row_max), row_max, zero)
        z.sub_(row_max[:, None]).exp_()
        sumexp = z.sum(dim=1)
        chunk_lse = row_max + sumexp.log()
        lse[sel] = chunk_lse
        if row_scale is None:
            continue
        r = row_scale[sel]
        mass = rows.mass[sel]
        # z holds exp(x - max); p = z / sumexp
        coef = r * (mass + 2.0 * z_loss * chunk_lse) / sumexp if z_loss else r * mass / sumexp
        z.mul_(torch.where(r != 0, coef, zero)[:, None])
        z.scatter_add_(1, ids, slot_w * (-(1.0 - label_smoothing) * r)[:, None])
        if label_smoothing:
            z.sub_(((label_smoothing / vocab) * r * mass)[:, None])
        if cap_buf is not None:
            tanh = cap_buf[: end - start]
            z.mul_(tanh.mul_(tanh).neg_().add_(1.0))
        on_grad(sel, z)
    return lse, target_logit, logit_sum


def _compute_dtype(dtype):
    """Chunks, losses, lse and row terms are fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _linear_chunked(hidden, weight, bias, rows, params, row_scale, need_dx, need_dw, need_db, all_rows=False):
    """-> (lse, target_logit, logit_sum, dx, dw, db); the gradients only with row_scale."""
    n_rows, _ = hidden.shape
    vocab = weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    same = hidden.dtype == cdt
    weight_t = weight.t()
    visit = _rows_to_visit(rows, all_rows)
    chunk_x = [None]  # the chunk's hidden rows (a copy when rows are gathered), for on_probs

    def fill(sel, out):
        x = chunk_x[0] = hidden[sel]
        if same:
            if bias is None:
                torch.mm(x, weight_t, out=out)
            else:
                torch.addmm(bias, x, weight_t, out=out)
        else:
            out.copy_(torch.nn.functional.linear(x, weight, bias))

    dx = dw = db = None
    on_grad = on_probs = None
    # fp32/fp64 without a soft cap: the gradient goes through the matmuls in factored
    # form, G = diag(coef_p) P - T - coef_s 1^T with T the weighted one-hots:
    #   dX = coef_p * (P @ W) - sum_k coef_t_k W[id_k] - coef_s (sum_v W_v)
    #   dW += P^T @ (coef_p * X) - scatter_k(coef_t_k X) - 1 (coef_s^T X)
    # so the (rows x V) chunk is only written by the matmul and softmaxed in place
    factored = row_scale is not None and same and params["softcap"] is None
    if factored:
        dx = torch.zeros_like(hidden) if need_dx else None
        # dW: the first chunk's product writes it (no zero fill of V x H), later ones add
        dw = torch.empty(weight.shape, dtype=cdt, device=weight.device) if need_dw else None
        dw_started = [False]
        db = torch.zeros(vocab, dtype=cdt, device=weight.device) if need_db else None
        smooth = bool(params["label_smoothing"])
        weight_colsum = weight.sum(dim=0) if (smooth and need_dx) else None
        smooth_x = torch.zeros(hidden.shape[1], dtype=cdt, device=hidden.device) if (smooth and need_dw) else None
        smooth_total = torch.zeros((), dtype=cdt, device=hidden.device) if (smooth and need_db) else None

        def on_probs(sel, probs, coef_p, coef_t, coef_s):
            ids = rows.safe_ids[sel]
            if dx is not None:
                g_x = torch.mm(probs, weight).mul_(coef_p[:, None])
                g_x.sub_(torch.einsum("ck,ckh->ch", coef_t, weight[ids]))
                if coef_s is not None:
                    g_x.sub_(coef_s[:, None] * weight_colsum[None, :])
                dx[sel] = g_x
            if dw is not None or db is not None:
                x = chunk_x[0]
                flat_ids = ids.reshape(-1)
                if dw is not None:
                    if dw_started[0]:
                        dw.addmm_(probs.t(), x * coef_p[:, None])
                    else:
                        torch.mm(probs.t(), x * coef_p[:, None], out=dw)
                        dw_started[0] = True
                    dw.index_add_(0, flat_ids, (x[:, None, :] * coef_t[:, :, None]).reshape(-1, x.shape[1]),
                                  alpha=-1)
                    if coef_s is not None:
                        smooth_x.add_(coef_s @ x)
                if db is not None:
                    db.addmv_(probs.t(), coef_p)
                    db.index_add_(0, flat_ids, coef_t.reshape(-1), alpha=-1)
                    if coef_s is not None:
                        smooth_total.add_(coef_s.sum())
    elif row_scale is not None:
        if need_dx:  # rows never visited (ignored) get zeros
            dx = torch.empty_like(hidden) if visit is None else torch.zeros_like(hidden)
        # dW and dbias accumulate over chunks: in fp32 (fp64 for fp64 inputs) always
        dw = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_dw else None
        db = torch.zeros(vocab, dtype=cdt, device=weight.device) if need_db else None

        def on_grad(sel, g):
            if dx is not None:
                if same and visit is None:
                    torch.mm(g, weight, out=dx[sel])
                else:
                    dx[sel] = g.to(weight.dtype) @ weight
            if dw is not None:
                x = hidden[sel]
                dw.addmm_(g.t(), x if same else x.to(cdt))
            if db is not None:
                db.add_(g.sum(dim=0))

    lse, tl_, ls = _chunked_pass(fill, visit, n_rows, vocab,
                                 params["chunk_rows"] or _default_chunk_rows(n_rows, vocab), cdt, hidden.device,
                                 rows, params["label_smoothing"], params["z_loss"], params["softcap"], row_scale,
                                 on_grad, on_probs)
    if factored and dw is not None and not dw_started[0]:
        dw.zero_()  # no row was visited
    if factored and params["label_smoothing"]:
        if dw is not None:
            dw.sub_(smooth_x[None, :])
        if db is not None:
            db.sub_(smooth_total)
    if dw is not None:
        dw = dw.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype)
    return lse, tl_, ls, dx, dw, db


def _logits_chunked(logits, rows, params, row_scale, all_rows=False):
    n_rows, vocab = logits.shape
    cdt = _compute_dtype(logits.dtype)
    visit = _rows_to_visit(rows, all_rows)

    def fill(sel, out):
        out.copy_(logits[sel])

    dlogits = None
    on_grad = None
    if row_scale is not None:
        alloc = torch.empty_like if visit is None else torch.zeros_like
        dlogits = alloc(logits, memory_format=torch.contiguous_format)

        def on_grad(sel, g):
            dlogits[sel] = g.to(dlogits.dtype)

    lse, tl_, ls = _chunked_pass(fill, visit, n_rows, vocab,
                                 params["chunk_rows"] or _default_chunk_rows(n_rows, vocab), cdt, logits.device,
                                 rows, params["label_smoothing"], params["z_loss"], params["softcap"], row_scale,
                                 on_grad)
    return lse, tl_, ls, dlogits


# --------------------------------------------------------------------------------------
# Triton launchers (kernels in gapfix.kernels.cross_entropy, imported lazily)
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    if not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _on_device(tensor: Tensor):
    """Launch inside the tensor's device context: Triton launches on the current CUDA
    device, which is not the tensors' one when a model is spread over GPUs."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _dot_fp32(tensor):
    """bf16 tiles are widened before tl.dot under the interpreter (see the kernels' docstring)."""
    return tensor.device.type != "cuda" and tensor.dtype == torch.bfloat16


def _dot_precision(dtype):
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _linear_triton_forward(hidden, weight, bias, rows: _Rows, params):
    """-> (lse, target_logit, logit_sum or None), fp32 (N,). One pass of hidden @ W^T tiles."""
    from gapfix.kernels import cross_entropy as K

    n_rows, hdim = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    if n_rows == 0:  # no program to launch (and no row block to split the vocabulary for)
        empty = torch.empty(0, **f32)
        return empty, empty.clone(), empty.clone() if params["label_smoothing"] else None
    cfg = K.linear_config(hidden.dtype, n_rows, vocab, hdim, hidden.device.type == "cuda")
    n_blocks = -(-n_rows // cfg["BLOCK_N"])
    v_blocks = -(-vocab // cfg["BLOCK_V"])
    sms = _sm_count(hidden.device.index) if hidden.device.type == "cuda" else 1
    # enough programs to fill the GPU: split the vocabulary into ranges, each
    # program does one (row block, vocab range), the partial lse are merged below
    splits = max(1, min(v_blocks, -(-2 * sms // n_blocks)))
    v_per_split = -(-v_blocks // splits) * cfg["BLOCK_V"]
    splits = -(-vocab // v_per_split)
    smooth = bool(params["label_smoothing"])
    part_max = torch.empty((splits, n_rows), **f32)
    part_sum = torch.empty((splits, n_rows), **f32)
    part_target = torch.empty((splits, n_rows), **f32)
    part_logit_sum = torch.empty((splits, n_rows), **f32) if smooth else part_target
    softcap = params["softcap"]
    with _on_device(hidden):
        K.linear_ce_forward_kernel[(n_blocks, splits)](
            hidden, weight, bias if bias is not None else hidden,
            rows.safe_ids, rows.slot_w,
            part_max, part_sum, part_target, part_logit_sum,
            n_rows, vocab, hdim, hidden.stride(0), weight.stride(0), v_per_split,
            float(softcap or 1.0),
            NUM_SLOTS=rows.safe_ids.shape[1], HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
            SMOOTH=smooth, DOT_PRECISION=_dot_precision(hidden.dtype), DOT_FP32=_dot_fp32(hidden),
            **cfg,
        )
    top = part_max.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros((), **f32))
    lse = top + (part_sum * torch.exp(part_max - top)).sum(dim=0).log()
    return lse, part_target.sum(dim=0), part_logit_sum.sum(dim=0) if smooth else None


def _linear_triton_backward(hidden, weight, bias, rows: _Rows, lse, r, params, need_dx, need_dw, need_db):
    from gapfix.kernels import cross_entropy as K

    n_rows, hdim = hidden.shape
    vocab = weight.shape[0]
    coef_p, coef_t, coef_s = _grad_coefficients(rows, lse, r, params, vocab)
    # fp32 accumulators, only those asked for (dW in grad_weight_dtype when given); a
    # gradient not asked for gets no buffer, its pointer argument is any tensor (unused)
    dev = hidden.device
    dx_acc = torch.zeros((n_rows, hdim), dtype=torch.float32, device=dev) if need_dx else None
    dw_acc = torch.zeros((vocab, hdim), dtype=params["grad_weight_dtype"] or torch.float32,
                         device=dev) if need_dw else None
    db_acc = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    if n_rows > 0:
        cfg = K.linear_config(hidden.dtype, n_rows, vocab, hdim, dev.type == "cuda", backward=True)
        grid = (-(-n_rows // cfg["BLOCK_N"]) * -(-vocab // cfg["BLOCK_V"]),)
        softcap = params["softcap"]
        unused = coef_p
        with _on_device(hidden):
            K.linear_ce_backward_kernel[grid](
                hidden, weight, bias if bias is not None else hidden,
                rows.safe_ids, rows.slot_w, lse, coef_p, coef_t, coef_s, r,
                unused if dx_acc is None else dx_acc, unused if dw_acc is None else dw_acc,
                unused if db_acc is None else db_acc,
                n_rows, vocab, hdim, hidden.stride(0), weight.stride(0),
                float(softcap or 1.0), float(params["filter_eps"] or 0.0),
                NUM_SLOTS=rows.safe_ids.shape[1], HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
                SMOOTH=bool(params["label_smoothing"]), NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
                FILTER=bool(params["filter_eps"]), DOT_PRECISION=_dot_precision(hidden.dtype),
                DOT_FP32=_dot_fp32(hidden), **cfg,
            )
    dx = dx_acc.to(hidden.dtype) if need_dx else None
    dw = dw_acc.to(weight.dtype) if need_dw else None
    db = db_acc.to(bias.dtype) if need_db else None
    return dx, dw, db


def _row_launch(logits):
    from gapfix.kernels import cross_entropy as K

    return {"num_warps": K.ROW_WARPS} if logits.device.type == "cuda" else {}


def _logits_triton_forward(logits, rows: _Rows, params):
    from gapfix.kernels import cross_entropy as K

    n_rows, vocab = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, **f32)
    target_logit = torch.empty(n_rows, **f32)
    smooth = bool(params["label_smoothing"])
    logit_sum = torch.empty(n_rows, **f32) if smooth else target_logit
    if n_rows == 0:
        return lse, target_logit, logit_sum if smooth else None
    softcap = params["softcap"]
    with _on_device(logits):
        K.ce_forward_kernel[(n_rows,)](
            logits, rows.safe_ids, rows.slot_w, lse, target_logit, logit_sum,
            vocab, logits.stride(0), float(softcap or 1.0),
            NUM_SLOTS=rows.safe_ids.shape[1], SOFTCAP=softcap is not None, SMOOTH=smooth,
            BLOCK_V=K.row_block(vocab), **_row_launch(logits),
        )
    return lse, target_logit, logit_sum if smooth else None


def _logits_triton_backward(logits, rows: _Rows, lse, r, params):
    from gapfix.kernels import cross_entropy as K

    n_rows, vocab = logits.shape
    coef_p, coef_t, coef_s = _grad_coefficients(rows, lse, r, params, vocab)
    dlogits = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return dlogits
    block_v = K.row_block(vocab)
    softcap = params["softcap"]
    eps = params["label_smoothing"]
    with _on_device(logits):
        K.ce_backward_kernel[(n_rows, -(-vocab // block_v))](
            logits, rows.safe_ids, rows.slot_w, lse, coef_p, coef_t, coef_s, dlogits,
            vocab, logits.stride(0), dlogits.stride(0), float(softcap or 1.0),
            NUM_SLOTS=rows.safe_ids.shape[1], SOFTCAP=softcap is not None, SMOOTH=bool(eps),
            BLOCK_V=block_v, **_row_launch(logits),
        )
    return dlogits


# --------------------------------------------------------------------------------------
# custom ops (torch.library) + autograd
# --------------------------------------------------------------------------------------


def _params(label_smoothing, z_loss, softcap, chunk_rows=0, grad_weight_dtype=None, filter_eps=0.0):
    return dict(label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                softcap=None if softcap <= 0 else float(softcap), chunk_rows=int(chunk_rows),
                grad_weight_dtype=grad_weight_dtype, filter_eps=float(filter_eps))


def _make_rows(ids, target_weight, token_weight, vocab, ignore_index, device, dtype):
    rows = _Rows(ids, target_weight, token_weight, vocab, ignore_index, _compute_dtype(dtype))
    if device.type == "cpu":
        rows.raise_if_invalid()
    return rows


_EMPTY = (0,)


def _or_empty(like, *tensors):
    """Custom ops return tensors, never None, and no two outputs may alias: a fresh
    empty tensor stands for each gradient that was not computed."""
    return tuple(like.new_empty(_EMPTY) if t is None else t for t in tensors)


@torch.library.custom_op("gapfix::linear_cross_entropy_fwd", mutates_args=())
def _linear_ce_fwd_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, target_weight: Optional[Tensor],
    token_weight: Optional[Tensor], num_tokens: Optional[Tensor], num_tokens_value: float,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, reduction: str, impl: str,
    chunk_rows: int, grad_weight_dtype: Optional[torch.dtype], filter_eps: float,
    need_dx: bool, need_dw: bool, need_db: bool, all_rows: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, lse, denominator, dx, dw, db). The chunked path with a scalar reduction
    computes the gradients here (for grad_out = 1; the backward scales them); otherwise
    they are empty and the backward recomputes. all_rows: the lse of ignored rows is
    wanted too (else the chunked path may skip those rows and leave their lse at 0)."""
    vocab = weight.shape[0]
    params = _params(label_smoothing, z_loss, softcap, chunk_rows, grad_weight_dtype, filter_eps)
    rows = _make_rows(ids, target_weight, token_weight, vocab, ignore_index, hidden.device, hidden.dtype)
    denom = _denominator(rows, reduction, num_tokens, num_tokens_value, rows.mass.dtype)
    dx = dw = db = None
    if impl == "triton":
        lse, target_logit, logit_sum = _linear_triton_forward(hidden, weight, bias, rows, params)
    else:
        precompute = reduction != "none" and (need_dx or need_dw or need_db)
        row_scale = _row_scale(rows, torch.ones((), dtype=rows.mass.dtype, device=hidden.device), reduction,
                               denom) if precompute else None
        lse, target_logit, logit_sum, dx, dw, db = _linear_chunked(
            hidden, weight, bias, rows, params, row_scale, need_dx, need_dw, need_db, all_rows)
    loss = _assemble_loss(rows, lse, target_logit, logit_sum, vocab, params["label_smoothing"], params["z_loss"],
                          reduction, denom)
    return (loss, lse, denom) + _or_empty(hidden, dx, dw, db)


def _scale_precomputed(grad_loss, *grads):
    """The gradients the forward computed for grad_out = 1, times grad_out. loss.backward()
    passes exactly 1: on CPU, outside tracing, that is checked and the (V x H) multiply
    skipped (the check would be a host sync on a GPU, and is data-dependent in a trace)."""
    g = grad_loss.reshape(())
    if g.device.type == "cpu" and type(g) is torch.Tensor and not _tracing() and g.item() == 1.0:
        return grads
    return tuple(None if t is None else t * g.to(t.dtype) for t in grads)


def _precomputes(hidden, reduction, impl, need):
    return impl != "triton" and reduction != "none" and need


@_linear_ce_fwd_op.register_fake
def _(hidden, weight, bias, ids, target_weight, token_weight, num_tokens, num_tokens_value, ignore_index,
      label_smoothing, z_loss, softcap, reduction, impl, chunk_rows, grad_weight_dtype, filter_eps,
      need_dx, need_dw, need_db, all_rows):
    n_rows, ldt = hidden.shape[0], _compute_dtype(hidden.dtype)
    loss = hidden.new_empty((n_rows,) if reduction == "none" else (), dtype=ldt)
    lse = hidden.new_empty((n_rows,), dtype=ldt)
    denom = hidden.new_empty((), dtype=ldt)
    pre = impl != "triton" and reduction != "none" and (need_dx or need_dw or need_db)
    dx = torch.empty_like(hidden) if pre and need_dx else hidden.new_empty(_EMPTY)
    dw = torch.empty_like(weight) if pre and need_dw else hidden.new_empty(_EMPTY)
    db = torch.empty_like(bias) if pre and need_db else hidden.new_empty(_EMPTY)
    return loss, lse, denom, dx, dw, db


@torch.library.custom_op("gapfix::linear_cross_entropy_bwd", mutates_args=())
def _linear_ce_bwd_op(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
    target_weight: Optional[Tensor], token_weight: Optional[Tensor], lse: Tensor, denom: Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, reduction: str, impl: str,
    chunk_rows: int, grad_weight_dtype: Optional[torch.dtype], filter_eps: float,
    need_dx: bool, need_dw: bool, need_db: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    vocab = weight.shape[0]
    params = _params(label_smoothing, z_loss, softcap, chunk_rows, grad_weight_dtype, filter_eps)
    rows = _Rows(ids, target_weight, token_weight, vocab, ignore_index, _compute_dtype(hidden.dtype))
    r = _row_scale(rows, grad_loss, reduction, denom)
    if impl == "triton":
        dx, dw, db = _linear_triton_backward(hidden, weight, bias, rows, lse, r, params, need_dx, need_dw, need_db)
    else:
        _, _, _, dx, dw, db = _linear_chunked(hidden, weight, bias, rows, params, r, need_dx, need_dw, need_db)
    return _or_empty(hidden, dx, dw, db)


@_linear_ce_bwd_op.register_fake
def _(grad_loss, hidden, weight, bias, ids, target_weight, token_weight, lse, denom, ignore_index,
      label_smoothing, z_loss, softcap, reduction, impl, chunk_rows, grad_weight_dtype, filter_eps,
      need_dx, need_dw, need_db):
    dx = torch.empty_like(hidden) if need_dx else hidden.new_empty(_EMPTY)
    dw = torch.empty_like(weight) if need_dw else hidden.new_empty(_EMPTY)
    db = torch.empty_like(bias) if need_db else hidden.new_empty(_EMPTY)
    return dx, dw, db


_LINEAR_ARGS = ("hidden", "weight", "bias", "ids", "target_weight", "token_weight", "num_tokens",
                "num_tokens_value", "ignore_index", "label_smoothing", "z_loss", "softcap", "reduction", "impl",
                "chunk_rows", "grad_weight_dtype", "filter_eps", "need_dx", "need_dw", "need_db", "all_rows")


def _linear_setup_context(ctx, inputs, output):
    args = dict(zip(_LINEAR_ARGS, inputs))
    _, lse, denom, dx, dw, db = output
    ctx.args = {k: args[k] for k in ("ignore_index", "label_smoothing", "z_loss", "softcap", "reduction", "impl",
                                     "chunk_rows", "grad_weight_dtype", "filter_eps")}
    ctx.precomputed = _precomputes(args["hidden"], args["reduction"], args["impl"],
                                   args["need_dx"] or args["need_dw"] or args["need_db"])
    ctx.has_bias = args["bias"] is not None
    if ctx.precomputed:
        ctx.save_for_backward(dx, dw, db)
    else:
        ctx.save_for_backward(args["hidden"], args["weight"], args["bias"], args["ids"], args["target_weight"],
                              args["token_weight"], lse, denom)


def _linear_backward(ctx, grad_loss, *unused):
    _refuse_double_backward()
    need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if ctx.precomputed:
        dx, dw, db = ctx.saved_tensors
        dx, dw, db = _scale_precomputed(grad_loss, dx if need_dx else None, dw if need_dw else None,
                                        db if need_db and ctx.has_bias else None)
    else:
        hidden, weight, bias, ids, target_weight, token_weight, lse, denom = ctx.saved_tensors
        need_db = need_db and bias is not None
        dx, dw, db = torch.ops.gapfix.linear_cross_entropy_bwd(
            grad_loss, hidden, weight, bias, ids, target_weight, token_weight, lse, denom,
            need_dx=need_dx, need_dw=need_dw, need_db=need_db, **ctx.args)
        dx, dw, db = (dx if need_dx else None), (dw if need_dw else None), (db if need_db else None)
    return (dx, dw, db) + (None,) * (len(_LINEAR_ARGS) - 3)


_linear_ce_fwd_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


@torch.library.custom_op("gapfix::cross_entropy_fwd", mutates_args=())
def _ce_fwd_op(
    logits: Tensor, ids: Tensor, target_weight: Optional[Tensor], token_weight: Optional[Tensor],
    num_tokens: Optional[Tensor], num_tokens_value: float, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: float, reduction: str, impl: str, chunk_rows: int, need_grad: bool, all_rows: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, lse, denominator, dlogits for grad_out = 1 or empty)."""
    vocab = logits.shape[1]
    params = _params(label_smoothing, z_loss, softcap, chunk_rows)
    rows = _make_rows(ids, target_weight, token_weight, vocab, ignore_index, logits.device, logits.dtype)
    denom = _denominator(rows, reduction, num_tokens, num_tokens_value, rows.mass.dtype)
    dlogits = None
    if impl == "triton":
        lse, target_logit, logit_sum = _logits_triton_forward(logits, rows, params)
    else:
        row_scale = _row_scale(rows, torch.ones((), dtype=rows.mass.dtype, device=logits.device), reduction,
                               denom) if (need_grad and reduction != "none") else None
        lse, target_logit, logit_sum, dlogits = _logits_chunked(logits, rows, params, row_scale, all_rows)
    loss = _assemble_loss(rows, lse, target_logit, logit_sum, vocab, params["label_smoothing"], params["z_loss"],
                          reduction, denom)
    return loss, lse, denom, logits.new_empty(_EMPTY) if dlogits is None else dlogits


@_ce_fwd_op.register_fake
def _(logits, ids, target_weight, token_weight, num_tokens, num_tokens_value, ignore_index, label_smoothing,
      z_loss, softcap, reduction, impl, chunk_rows, need_grad, all_rows):
    n_rows, ldt = logits.shape[0], _compute_dtype(logits.dtype)
    loss = logits.new_empty((n_rows,) if reduction == "none" else (), dtype=ldt)
    pre = impl != "triton" and reduction != "none" and need_grad
    return (loss, logits.new_empty((n_rows,), dtype=ldt), logits.new_empty((), dtype=ldt),
            torch.empty_like(logits, memory_format=torch.contiguous_format) if pre else logits.new_empty(_EMPTY))


@torch.library.custom_op("gapfix::cross_entropy_bwd", mutates_args=())
def _ce_bwd_op(
    grad_loss: Tensor, logits: Tensor, ids: Tensor, target_weight: Optional[Tensor],
    token_weight: Optional[Tensor], lse: Tensor, denom: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: float, reduction: str, impl: str, chunk_rows: int,
) -> Tensor:
    vocab = logits.shape[1]
    params = _params(label_smoothing, z_loss, softcap, chunk_rows)
    rows = _Rows(ids, target_weight, token_weight, vocab, ignore_index, _compute_dtype(logits.dtype))
    r = _row_scale(rows, grad_loss, reduction, denom)
    if impl == "triton":
        return _logits_triton_backward(logits, rows, lse, r, params)
    return _logits_chunked(logits, rows, params, r)[3]


@_ce_bwd_op.register_fake
def _(grad_loss, logits, ids, target_weight, token_weight, lse, denom, ignore_index, label_smoothing, z_loss,
      softcap, reduction, impl, chunk_rows):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


_CE_ARGS = ("logits", "ids", "target_weight", "token_weight", "num_tokens", "num_tokens_value", "ignore_index",
            "label_smoothing", "z_loss", "softcap", "reduction", "impl", "chunk_rows", "need_grad", "all_rows")


def _ce_setup_context(ctx, inputs, output):
    args = dict(zip(_CE_ARGS, inputs))
    _, lse, denom, dlogits = output
    ctx.args = {k: args[k] for k in ("ignore_index", "label_smoothing", "z_loss", "softcap", "reduction", "impl",
                                     "chunk_rows")}
    ctx.precomputed = args["impl"] != "triton" and args["reduction"] != "none" and args["need_grad"]
    if ctx.precomputed:
        ctx.save_for_backward(dlogits)
    else:
        ctx.save_for_backward(args["logits"], args["ids"], args["target_weight"], args["token_weight"], lse, denom)


def _ce_backward(ctx, grad_loss, *unused):
    _refuse_double_backward()
    if ctx.precomputed:
        (dlogits,) = ctx.saved_tensors
        (dlogits,) = _scale_precomputed(grad_loss, dlogits)
    else:
        logits, ids, target_weight, token_weight, lse, denom = ctx.saved_tensors
        dlogits = torch.ops.gapfix.cross_entropy_bwd(grad_loss, logits, ids, target_weight, token_weight, lse,
                                                     denom, **ctx.args)
    return (dlogits,) + (None,) * (len(_CE_ARGS) - 1)


_ce_fwd_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# --------------------------------------------------------------------------------------
# public functions and modules
# --------------------------------------------------------------------------------------


def _num_tokens_args(num_tokens, device) -> Tuple[Optional[Tensor], float]:
    """-> (num_tokens as a tensor or None, num_tokens as a number or 0). A tensor count must
    be on the inputs' device. Its value is checked where reading it costs nothing: on CPU
    (outside a trace) a count <= 0 is a ValueError; on a GPU it is not read (that would be a
    host sync) and a count <= 0 makes the loss and the gradients NaN instead."""
    if num_tokens is None:
        return None, 0.0
    if isinstance(num_tokens, Tensor):
        if num_tokens.device != device:
            raise ValueError(f"num_tokens is on {num_tokens.device}, expected {device}")
        if num_tokens.device.type == "cpu" and not _tracing() and not bool(num_tokens.reshape(()) > 0):
            raise ValueError(f"num_tokens must be > 0, got {num_tokens.reshape(()).item()!r}")
        return num_tokens.detach().reshape(()), 0.0
    return None, float(num_tokens)


def _tracing() -> bool:
    """Inside torch.compile or a dispatch-mode trace, where tensor values cannot be read."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _reference_inputs(ids, target_weight, token_weight, num_tokens, vocab, ignore_index, device, dtype):
    """impl="torch" validates like the fast paths: on CPU an out-of-range id, a negative
    target weight, a negative token_weight or a count num_tokens <= 0 is a ValueError; on
    other devices (where a check would be a host sync) such a token's loss, and with it
    the reduced loss and the gradients, is NaN. -> (ids, token_weight, num_tokens) for
    cross_entropy_reference."""
    nt_tensor, nt_value = _num_tokens_args(num_tokens, device)
    cdt = _compute_dtype(dtype)
    num_tokens = _num_tokens_denominator(nt_tensor, cdt) if nt_tensor is not None else (nt_value or None)
    rows = _Rows(ids, target_weight, token_weight, vocab, ignore_index, cdt)
    if device.type == "cpu" and not _tracing():
        rows.raise_if_invalid()
        return ids, token_weight, num_tokens
    # out-of-range ids would index out of bounds: read slot 0 instead, and NaN the token
    ids = torch.where((ids != ignore_index) & ~rows.valid_slot, 0, ids)
    base = token_weight if token_weight is not None else torch.ones((), dtype=cdt, device=device)
    token_weight = torch.where(rows.invalid, torch.full((), float("nan"), dtype=base.dtype, device=device), base)
    return ids, token_weight.expand(rows.invalid.shape), num_tokens


def _refuse_weight_grads(target_weight, token_weight, impl):
    """The fast paths give no gradient to target weights or token_weight: refuse rather
    than leave their .grad silently None."""
    if not torch.is_grad_enabled():
        return
    for name, t in (("target weights", target_weight), ("token_weight", token_weight)):
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} require grad, but impl={impl!r} computes no gradient for them: "
                             f"detach them, or use impl='torch' (the reference) to differentiate them")


def _refuse_double_backward():
    """The backward of the fast paths is not itself differentiable. It runs with grad mode on
    only under create_graph=True: refuse there, rather than return a gradient whose own
    gradient would be silently 0."""
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "second-order gradients (backward with create_graph=True) through gapfix's fused "
            "cross-entropy are not supported by impl='cpu' or impl='triton'; use impl='torch'")


def _torch_impl_result(loss, lse, lead_shape, reduction, return_lse):
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    return (loss, lse.detach().reshape(lead_shape)) if return_lse else loss


def _autocast_inputs(hidden, lm_weight, bias):
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
):
    """Cross-entropy of logits (..., V) against hard ids (...) or soft (ids (..., K), weights (..., K)).

    Returns the loss in fp32: a scalar for "mean"/"sum", shape (...) for "none";
    with return_lse=True, (loss, lse) where lse (...) is the (soft-capped) logsumexp of
    every row, ignored or not, without gradient. See the module docstring for the
    exact formula, the reductions and the handling of invalid values.
    """
    _check_options(ignore_index, label_smoothing, z_loss, softcap, reduction, num_tokens, impl, chunk_size)
    if not isinstance(logits, Tensor) or logits.dim() < 1 or logits.dtype not in _FLOAT_DTYPES:
        raise ValueError("logits must be a floating-point tensor of shape (..., V)")
    if logits.shape[-1] < 1:
        raise ValueError("logits must have V >= 1 classes")
    lead_shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    n_rows = math.prod(lead_shape)
    ids, target_weight = _check_target(target, n_rows, logits.device, lead_shape)
    token_weight = _check_token_weight(token_weight, n_rows, logits.device, lead_shape)
    impl = _resolve_impl(impl, logits.device, logits.dtype)
    flat = logits.reshape(n_rows, vocab)
    if impl == "torch":
        ids, token_weight, num_tokens = _reference_inputs(ids, target_weight, token_weight, num_tokens, vocab,
                                                          ignore_index, logits.device, logits.dtype)
        tgt = ids.reshape(n_rows) if target_weight is None else (ids, target_weight)
        loss, lse = cross_entropy_reference(
            flat, tgt, ignore_index=ignore_index, token_weight=token_weight, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, reduction=reduction, num_tokens=num_tokens)
        return _torch_impl_result(loss, lse, lead_shape, reduction, return_lse)
    _refuse_weight_grads(target_weight, token_weight, impl)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    nt_tensor, nt_value = _num_tokens_args(num_tokens, logits.device)
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, lse, _, _ = torch.ops.gapfix.cross_entropy_fwd(
        flat, ids, target_weight, token_weight, nt_tensor, nt_value, ignore_index, float(label_smoothing),
        float(z_loss), float(softcap or 0.0), reduction, impl, int(chunk_size or 0), need_grad, bool(return_lse))
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
):
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
    _check_options(ignore_index, label_smoothing, z_loss, softcap, reduction, num_tokens, impl, chunk_size)
    if not isinstance(hidden, Tensor) or hidden.dim() < 1 or hidden.dtype not in _FLOAT_DTYPES:
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
    if grad_weight_dtype is not None and grad_weight_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"grad_weight_dtype must be a floating dtype, got {grad_weight_dtype!r}")
    if filter_eps is not None and not (float(filter_eps) >= 0.0):
        raise ValueError(f"filter_eps must be None or >= 0, got {filter_eps!r}")
    lead_shape = hidden.shape[:-1]
    n_rows = math.prod(lead_shape)
    ids, target_weight = _check_target(target, n_rows, hidden.device, lead_shape)
    token_weight = _check_token_weight(token_weight, n_rows, hidden.device, lead_shape)
    impl = _resolve_impl(impl, hidden.device, hidden.dtype)
    if impl == "triton" and hidden.device.type != "cuda" and grad_weight_dtype == torch.bfloat16:
        raise ValueError("grad_weight_dtype=torch.bfloat16 needs a GPU: Triton's interpreter has no bf16 atomics")
    flat = hidden.reshape(n_rows, hdim)
    if impl == "torch":
        ids, token_weight, num_tokens = _reference_inputs(ids, target_weight, token_weight, num_tokens, vocab,
                                                          ignore_index, hidden.device, hidden.dtype)
        tgt = ids.reshape(n_rows) if target_weight is None else (ids, target_weight)
        loss, lse = linear_cross_entropy_reference(
            flat, lm_weight, tgt, bias=bias, ignore_index=ignore_index, token_weight=token_weight,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction,
            num_tokens=num_tokens)
        return _torch_impl_result(loss, lse, lead_shape, reduction, return_lse)
    _refuse_weight_grads(target_weight, token_weight, impl)
    flat = flat.contiguous()
    weight = lm_weight.contiguous()
    grad_on = torch.is_grad_enabled()
    need_dx = grad_on and hidden.requires_grad
    need_dw = grad_on and lm_weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    nt_tensor, nt_value = _num_tokens_args(num_tokens, hidden.device)
    loss, lse, _, _, _, _ = torch.ops.gapfix.linear_cross_entropy_fwd(
        flat, weight, bias, ids, target_weight, token_weight, nt_tensor, nt_value, ignore_index,
        float(label_smoothing), float(z_loss), float(softcap or 0.0), reduction, impl, int(chunk_size or 0),
        grad_weight_dtype, float(filter_eps or 0.0), need_dx, need_dw, need_db, bool(return_lse))
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    return (loss, lse.detach().reshape(lead_shape)) if return_lse else loss


class CrossEntropyLoss(torch.nn.Module):
    """Module form of `cross_entropy`: options at construction, tensors at call."""

    def __init__(self, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                 return_lse=False, impl="auto"):
        super().__init__()
        _check_options(ignore_index, label_smoothing, z_loss, softcap, reduction, None, impl)
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.softcap, self.reduction, self.return_lse, self.impl = softcap, reduction, return_lse, impl

    def forward(self, logits, target, token_weight=None, num_tokens=None):
        return cross_entropy(logits, target, ignore_index=self.ignore_index, token_weight=token_weight,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             reduction=self.reduction, num_tokens=num_tokens, return_lse=self.return_lse,
                             impl=self.impl)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, reduction={self.reduction!r}, impl={self.impl!r}")


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of `linear_cross_entropy`; called as loss(hidden, lm_weight, target, bias=None, ...)."""

    def __init__(self, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                 return_lse=False, chunk_size=None, grad_weight_dtype=None, filter_eps=None, impl="auto"):
        super().__init__()
        _check_options(ignore_index, label_smoothing, z_loss, softcap, reduction, None, impl)
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.softcap, self.reduction, self.return_lse, self.impl = softcap, reduction, return_lse, impl
        self.chunk_size, self.grad_weight_dtype, self.filter_eps = chunk_size, grad_weight_dtype, filter_eps

    def forward(self, hidden, lm_weight, target, bias=None, token_weight=None, num_tokens=None):
        return linear_cross_entropy(hidden, lm_weight, target, bias=bias, ignore_index=self.ignore_index,
                                    token_weight=token_weight, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap, reduction=self.reduction,
                                    num_tokens=num_tokens, return_lse=self.return_lse, chunk_size=self.chunk_size,
                                    grad_weight_dtype=self.grad_weight_dtype, filter_eps=self.filter_eps,
                                    impl=self.impl)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, reduction={self.reduction!r}, impl={self.impl!r}")
