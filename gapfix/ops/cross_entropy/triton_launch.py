"""Launchers of the Triton kernels (impl="triton"; kernels in gapfix.kernels.cross_entropy,
imported when a launcher runs, so that importing gapfix does not import triton).

Every launch goes through gapfix.ops._common.launch: with the tensors' CUDA device current
(a model spread over GPUs), and not at all for an empty grid.
"""
from __future__ import annotations

import functools

import torch

from gapfix.ops._common import cdiv, launch
from gapfix.ops.cross_entropy.rows import LinearOptions, Options, Rows, grad_coefficients


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    if not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dot_fp32(tensor):
    """bf16 tiles are widened before tl.dot under the interpreter (see the kernels' docstring)."""
    return tensor.device.type != "cuda" and tensor.dtype == torch.bfloat16


def _dot_precision(dtype):
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def vocab_splits(n_rows: int, vocab: int, block_n: int, block_v: int, sms: int):
    """-> (splits, v_per_split) of the linear forward: enough programs to fill the GPU
    (about 2 per SM), each doing one (row block, vocabulary range). n_rows >= 1."""
    n_blocks, v_blocks = cdiv(n_rows, block_n), cdiv(vocab, block_v)
    splits = max(1, min(v_blocks, cdiv(2 * sms, n_blocks)))
    v_per_split = cdiv(v_blocks, splits) * block_v
    return cdiv(vocab, v_per_split), v_per_split


def linear_triton_forward(hidden, weight, bias, rows: Rows, opts: LinearOptions):
    """-> (lse, target_logit, logit_sum or None), fp32 (N,). One pass of hidden @ W^T tiles."""
    from gapfix.kernels import cross_entropy as K

    n_rows, hdim = hidden.shape
    vocab = weight.shape[0]
    smooth = bool(opts.label_smoothing)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    if n_rows == 0:  # no program to launch, and no row block to split the vocabulary for
        empty = torch.empty(0, **f32)
        return empty, empty.clone(), empty.clone() if smooth else None
    cfg = K.linear_config(hidden.dtype, n_rows, vocab, hdim, hidden.device.type == "cuda")
    sms = _sm_count(hidden.device.index) if hidden.device.type == "cuda" else 1
    splits, v_per_split = vocab_splits(n_rows, vocab, cfg["BLOCK_N"], cfg["BLOCK_V"], sms)
    part_max = torch.empty((splits, n_rows), **f32)
    part_sum = torch.empty((splits, n_rows), **f32)
    part_target = torch.empty((splits, n_rows), **f32)
    part_logit_sum = torch.empty((splits, n_rows), **f32) if smooth else part_target
    launch(K.linear_ce_forward_kernel, (cdiv(n_rows, cfg["BLOCK_N"]), splits),
           hidden, weight, bias if bias is not None else hidden,
           rows.safe_ids, rows.slot_w,
           part_max, part_sum, part_target, part_logit_sum, part_max, part_max, part_max,
           n_rows, vocab, hdim, hidden.stride(0), weight.stride(0), v_per_split,
           float(opts.softcap or 1.0),
           device=hidden.device,
           NUM_SLOTS=rows.safe_ids.shape[1], HAS_BIAS=bias is not None, SOFTCAP=opts.softcap is not None,
           SMOOTH=smooth, ENTROPY=False, SQ=False, TOP1=False,
           DOT_PRECISION=_dot_precision(hidden.dtype), DOT_FP32=_dot_fp32(hidden), **cfg)
    top = part_max.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros((), **f32))
    lse = top + (part_sum * torch.exp(part_max - top)).sum(dim=0).log()
    return lse, part_target.sum(dim=0), part_logit_sum.sum(dim=0) if smooth else None


def linear_triton_backward(hidden, weight, bias, rows: Rows, lse, r, opts: LinearOptions, need_dx, need_dw,
                           need_db):
    from gapfix.kernels import cross_entropy as K

    n_rows, hdim = hidden.shape
    vocab = weight.shape[0]
    coef_p, coef_t, coef_s = grad_coefficients(rows, lse, r, opts, vocab)
    # accumulators only for the gradients asked for (fp32; dW in grad_weight_dtype when
    # given): dx's (N, H) fp32 buffer is not allocated when dx is not needed. A pointer
    # argument whose NEED_* flag is off is never dereferenced; any tensor stands for it.
    dev = hidden.device
    dx_acc = torch.zeros((n_rows, hdim), dtype=torch.float32, device=dev) if need_dx else None
    dw_acc = torch.zeros((vocab, hdim), dtype=opts.grad_weight_dtype or torch.float32,
                         device=dev) if need_dw else None
    db_acc = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    cfg = K.linear_config(hidden.dtype, n_rows, vocab, hdim, dev.type == "cuda", backward=True)
    unused = coef_p
    launch(K.linear_ce_backward_kernel, (cdiv(n_rows, cfg["BLOCK_N"]) * cdiv(vocab, cfg["BLOCK_V"]),),
           hidden, weight, bias if bias is not None else hidden,
           rows.safe_ids, rows.slot_w, lse, coef_p, coef_t, coef_s, r, unused, unused,
           unused if dx_acc is None else dx_acc, unused if dw_acc is None else dw_acc,
           unused if db_acc is None else db_acc,
           n_rows, vocab, hdim, hidden.stride(0), weight.stride(0),
           float(opts.softcap or 1.0), float(opts.filter_eps or 0.0),
           device=dev,
           NUM_SLOTS=rows.safe_ids.shape[1], HAS_BIAS=bias is not None, SOFTCAP=opts.softcap is not None,
           SMOOTH=bool(opts.label_smoothing), ENTROPY=False, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
           FILTER=bool(opts.filter_eps), DOT_PRECISION=_dot_precision(hidden.dtype), DOT_FP32=_dot_fp32(hidden),
           **cfg)
    dx = dx_acc.to(hidden.dtype) if need_dx else None
    dw = dw_acc.to(weight.dtype) if need_dw else None
    db = db_acc.to(bias.dtype) if need_db else None
    return dx, dw, db


def log_probs_triton_forward(hidden, weight, bias, rows: Rows, softcap, flags):
    """linear_log_probs' forward: the cross-entropy forward kernel with its statistics on,
    partials per vocabulary range merged here. -> (log_probs, entropy, log_sum_sq, mean,
    top1, lse), unrequested statistics empty."""
    from gapfix.kernels import cross_entropy as K

    want_entropy, want_sq, want_mean, want_top1 = flags
    n_rows, hdim = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    empty = torch.empty(0, **f32)
    if n_rows == 0:
        return (empty, empty.clone(), empty.clone(), empty.clone(), torch.empty(0, dtype=torch.bool,
                                                                               device=hidden.device), empty.clone())
    cfg = K.linear_config(hidden.dtype, n_rows, vocab, hdim, hidden.device.type == "cuda")
    sms = _sm_count(hidden.device.index) if hidden.device.type == "cuda" else 1
    splits, v_per_split = vocab_splits(n_rows, vocab, cfg["BLOCK_N"], cfg["BLOCK_V"], sms)
    parts = {name: torch.empty((splits, n_rows), **f32) for name in ("max", "sum", "target")}
    for name, wanted in (("logit_sum", want_mean), ("xs", want_entropy), ("sq", want_sq), ("before", want_top1)):
        parts[name] = torch.empty((splits, n_rows), **f32) if wanted else parts["max"]
    launch(K.linear_ce_forward_kernel, (cdiv(n_rows, cfg["BLOCK_N"]), splits),
           hidden, weight, bias if bias is not None else hidden, rows.safe_ids, rows.slot_w,
           parts["max"], parts["sum"], parts["target"], parts["logit_sum"], parts["xs"], parts["sq"],
           parts["before"], n_rows, vocab, hdim, hidden.stride(0), weight.stride(0), v_per_split,
           float(softcap or 1.0), device=hidden.device,
           NUM_SLOTS=rows.safe_ids.shape[1], HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
           SMOOTH=want_mean, ENTROPY=want_entropy, SQ=want_sq, TOP1=want_top1,
           DOT_PRECISION=_dot_precision(hidden.dtype), DOT_FP32=_dot_fp32(hidden), **cfg)
    top = parts["max"].amax(dim=0)
    shift = torch.where(torch.isfinite(top), top, torch.zeros((), **f32))
    weight_s = torch.exp(parts["max"] - shift)  # each range's rescale to the global max
    total = (parts["sum"] * weight_s).sum(dim=0)
    lse = shift + total.log()
    target = parts["target"].sum(dim=0)
    zero = torch.zeros((), **f32)
    counted = rows.counted
    log_probs = torch.where(counted, target - lse, zero)
    entropy, log_sum_sq, mean = (torch.empty(0, **f32) for _ in range(3))  # outputs never alias
    top1 = torch.empty(0, dtype=torch.bool, device=hidden.device)
    if want_entropy:
        entropy = torch.where(counted, lse - (parts["xs"] * weight_s).sum(dim=0) / total, zero)
    if want_sq:
        log_sum_sq = torch.where(counted, (parts["sq"] * weight_s * weight_s).sum(dim=0).log() - 2.0 * total.log(),
                                 zero)
    if want_mean:
        mean = torch.where(counted, parts["logit_sum"].sum(dim=0) / vocab, zero)
    if want_top1:
        # the first argmax: at least every logit, above every logit of a smaller id
        top1 = counted & (target >= top) & (target > parts["before"].amax(dim=0))
    return log_probs, entropy, log_sum_sq, mean, top1, lse


def log_probs_triton_backward(hidden, weight, bias, rows: Rows, lse, entropy, grad_log_probs, grad_entropy, softcap,
                              need_dx, need_dw, need_db):
    """linear_log_probs' backward on the cross-entropy backward kernel: dL/dz = a (onehot - p)
    is coef_p = coef_t = -a; the entropy term comes in with ENTROPY."""
    from gapfix.kernels import cross_entropy as K

    n_rows, hdim = hidden.shape
    vocab = weight.shape[0]
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    a = torch.where(rows.counted, grad_log_probs.reshape(-1).float(), zero)
    a = torch.where(rows.invalid, torch.full((), float("nan"), dtype=torch.float32, device=hidden.device), a)
    coef = -a
    coef_e = None if grad_entropy is None else torch.where(rows.counted, grad_entropy.reshape(-1).float(), zero)
    dev = hidden.device
    dx_acc = torch.zeros((n_rows, hdim), dtype=torch.float32, device=dev) if need_dx else None
    dw_acc = torch.zeros((vocab, hdim), dtype=torch.float32, device=dev) if need_dw else None
    db_acc = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    cfg = K.linear_config(hidden.dtype, n_rows, vocab, hdim, dev.type == "cuda", backward=True)
    unused = coef
    launch(K.linear_ce_backward_kernel, (cdiv(n_rows, cfg["BLOCK_N"]) * cdiv(vocab, cfg["BLOCK_V"]),),
           hidden, weight, bias if bias is not None else hidden,
           rows.safe_ids, rows.slot_w, lse, coef, coef.clone(), unused, unused,
           unused if coef_e is None else entropy, unused if coef_e is None else coef_e,
           unused if dx_acc is None else dx_acc, unused if dw_acc is None else dw_acc,
           unused if db_acc is None else db_acc,
           n_rows, vocab, hdim, hidden.stride(0), weight.stride(0), float(softcap or 1.0), 0.0,
           device=dev,
           NUM_SLOTS=rows.safe_ids.shape[1], HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
           SMOOTH=False, ENTROPY=coef_e is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
           FILTER=False, DOT_PRECISION=_dot_precision(hidden.dtype), DOT_FP32=_dot_fp32(hidden), **cfg)
    dx = dx_acc.to(hidden.dtype) if need_dx else None
    dw = dw_acc.to(weight.dtype) if need_dw else None
    db = db_acc.to(bias.dtype) if need_db else None
    return dx, dw, db


def _row_launch(logits):
    from gapfix.kernels import cross_entropy as K

    return {"num_warps": K.ROW_WARPS} if logits.device.type == "cuda" else {}


def logits_triton_forward(logits, rows: Rows, opts: Options):
    from gapfix.kernels import cross_entropy as K

    n_rows, vocab = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, **f32)
    target_logit = torch.empty(n_rows, **f32)
    smooth = bool(opts.label_smoothing)
    logit_sum = torch.empty(n_rows, **f32) if smooth else target_logit
    launch(K.ce_forward_kernel, (n_rows,),
           logits, rows.safe_ids, rows.slot_w, lse, target_logit, logit_sum,
           vocab, logits.stride(0), float(opts.softcap or 1.0),
           device=logits.device,
           NUM_SLOTS=rows.safe_ids.shape[1], SOFTCAP=opts.softcap is not None, SMOOTH=smooth,
           BLOCK_V=K.row_block(vocab), **_row_launch(logits))
    return lse, target_logit, logit_sum if smooth else None


def logits_triton_backward(logits, rows: Rows, lse, r, opts: Options):
    from gapfix.kernels import cross_entropy as K

    n_rows, vocab = logits.shape
    coef_p, coef_t, coef_s = grad_coefficients(rows, lse, r, opts, vocab)
    dlogits = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    block_v = K.row_block(vocab)
    launch(K.ce_backward_kernel, (n_rows, cdiv(vocab, block_v)),
           logits, rows.safe_ids, rows.slot_w, lse, coef_p, coef_t, coef_s, dlogits,
           vocab, logits.stride(0), dlogits.stride(0), float(opts.softcap or 1.0),
           device=logits.device,
           NUM_SLOTS=rows.safe_ids.shape[1], SOFTCAP=opts.softcap is not None, SMOOTH=bool(opts.label_smoothing),
           BLOCK_V=block_v, **_row_launch(logits))
    return dlogits
