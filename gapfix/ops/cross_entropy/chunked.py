"""The chunked torch path (impl="torch_fast"): chunks of rows, never the full logits.

Logits of a chunk, its lse, loss and gradient, computed once in the forward (mean/sum) or
recomputed in the backward ("none"). On CPU tensors ignored rows are dropped before any
matmul; without a soft cap the chunk is softmaxed in place and the rest of the gradient
(one-hots, smoothing) goes through the matmuls in factored form. Plain torch ops: runs on
any device (on CUDA, every row is visited).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from gapfix.ops.cross_entropy.rows import (
    LinearOptions,
    Options,
    Rows,
    compute_dtype,
    prob_coefficient,
    smoothing_coefficient,
    target_coefficient,
)

# the rows of a chunk: a slice of all rows, or an index of the visited ones
RowSelection = Union[slice, Tensor]

# Rows per chunk of the chunked path: a quarter of the rows (so at most a quarter of the
# logits ever exist), within 2**24..2**26 logits (64..256 MiB in fp32). Each chunk re-reads
# and re-writes the (V, H) dW accumulator, so fewer, larger chunks are faster: 2048 rows
# beat 1024 by ~5% at N = 8192, V = 32768, H = 512.
_CHUNK_MIN_ELEMENTS, _CHUNK_MAX_ELEMENTS = 1 << 24, 1 << 26


def default_chunk_rows(n_rows: int, vocab: int) -> int:
    vocab = max(vocab, 1)
    rows = max(_CHUNK_MIN_ELEMENTS // vocab, min(_CHUNK_MAX_ELEMENTS // vocab, -(-n_rows // 4)))
    return max(16, min(n_rows, rows))


def _rows_to_visit(rows: Rows, all_rows: bool) -> Optional[Tensor]:
    """None (every row, in order) or the index of the counted rows. On CPU, ignored rows
    (prompt tokens, padding) are dropped before any matmul; finding them reads the mask
    on the host, which a GPU stream must not wait for, so other devices visit every row."""
    if all_rows or rows.counted.device.type != "cpu":
        return None
    keep = rows.counted.nonzero().squeeze(1)
    return None if keep.numel() == rows.counted.numel() else keep


def _chunked_pass(
    fill_logits: Callable[[RowSelection, Tensor], None],
    visit: Optional[Tensor],
    n_rows: int,
    vocab: int,
    cdt: torch.dtype,
    device: torch.device,
    rows: Rows,
    opts: Options,
    row_scale: Optional[Tensor] = None,
    on_grad: Optional[Callable[[RowSelection, Tensor], None]] = None,
    on_probs: Optional[Callable[..., None]] = None,
    on_logits: Optional[Callable[[RowSelection, Tensor], None]] = None,
    on_exp: Optional[Callable[[RowSelection, Tensor, Optional[Tensor]], None]] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One pass over the rows in chunks.

    visit: None (all rows) or an index of the rows to visit (the others get lse 0).
    fill_logits(sel, out) writes the logits of rows `sel` (a slice or an index) into
    `out`. Returns (lse, target_logit, logit_sum or None). With row_scale, also, while
    the chunk is live, either
      on_grad(sel, G): G = dL/dx of the chunk (the formula in the module docstring), or
      on_probs(sel, P, coef_p, coef_t, coef_s) (no soft cap): the softmax P and the row
        coefficients with G = coef_p * P - coef_t-weighted one-hots - coef_s, so that the
        caller can push the cheap terms through its matmuls instead of through P.
    Per-row statistics read the same live chunk (no second pass over the logits):
      on_logits(sel, z): the (soft-capped) logits, before the softmax;
      on_exp(sel, E, s): E = exp(z - row max) with s = sum_v E (E / s is the softmax), or
        the softmax itself with s None; read-only, before the chunk becomes the gradient.
    """
    label_smoothing, z_loss, softcap = opts.label_smoothing, opts.z_loss, opts.softcap
    chunk_rows = opts.chunk_rows or default_chunk_rows(n_rows, vocab)
    alloc = torch.empty if visit is None else torch.zeros
    lse = alloc(n_rows, dtype=cdt, device=device)
    target_logit = alloc(n_rows, dtype=cdt, device=device)
    logit_sum = alloc(n_rows, dtype=cdt, device=device) if label_smoothing else None
    n_visit = n_rows if visit is None else visit.numel()
    chunk_rows = max(1, min(chunk_rows, n_visit))
    buf = torch.empty(chunk_rows, vocab, dtype=cdt, device=device)
    cap_buf = torch.empty_like(buf) if (softcap is not None and row_scale is not None) else None
    zero = torch.zeros((), dtype=cdt, device=device)
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
        if on_logits is not None:
            on_logits(sel, z)
        if on_probs is not None and row_scale is not None:
            # softmax in place, row by row (a row stays in cache: one read and one write
            # of the chunk); lse from the probability of the row's largest logit, which
            # is at least 1/V, so its log is well conditioned
            row_max, arg_max = z.max(dim=1)
            torch._softmax(z, 1, False, out=z)
            chunk_lse = row_max - z.gather(1, arg_max[:, None]).squeeze(1).log()
            chunk_lse = torch.where(row_max == float("-inf"), row_max, chunk_lse)
            lse[sel] = chunk_lse
            if on_exp is not None:
                on_exp(sel, z, None)
            r = row_scale[sel]
            mass = rows.mass[sel]
            if visit is None:  # ignored rows are in the chunk: their P (NaN for all -inf) must not reach the matmuls
                z.masked_fill_((r == 0)[:, None], 0.0)
            coef_p = torch.where(r != 0, prob_coefficient(r, mass, chunk_lse, z_loss), zero)
            coef_t = slot_w * target_coefficient(r, label_smoothing)[:, None]
            coef_s = smoothing_coefficient(r, mass, label_smoothing, vocab) if label_smoothing else None
            on_probs(sel, z, coef_p, coef_t, coef_s)
            continue
        row_max = z.amax(dim=1)
        # an all -inf row: shift by 0 so that exp gives 0 and lse = -inf (no NaN)
        row_max = torch.where(torch.isfinite(row_max), row_max, zero)
        z.sub_(row_max[:, None]).exp_()
        sumexp = z.sum(dim=1)
        chunk_lse = row_max + sumexp.log()
        lse[sel] = chunk_lse
        if on_exp is not None:
            on_exp(sel, z, sumexp)
        if row_scale is None:
            continue
        r = row_scale[sel]
        mass = rows.mass[sel]
        # z holds exp(x - max); p = z / sumexp
        coef = prob_coefficient(r, mass, chunk_lse, z_loss) / sumexp
        z.mul_(torch.where(r != 0, coef, zero)[:, None])
        z.scatter_add_(1, ids, slot_w * -target_coefficient(r, label_smoothing)[:, None])
        if label_smoothing:
            z.sub_(smoothing_coefficient(r, mass, label_smoothing, vocab)[:, None])
        if cap_buf is not None:
            tanh = cap_buf[: end - start]
            z.mul_(tanh.mul_(tanh).neg_().add_(1.0))
        on_grad(sel, z)
    return lse, target_logit, logit_sum


def linear_chunked(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    rows: Rows,
    opts: LinearOptions,
    row_scale: Optional[Tensor],
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    all_rows: bool = False,
    on_logits: Optional[Callable[[RowSelection, Tensor], None]] = None,
    on_exp: Optional[Callable[[RowSelection, Tensor, Optional[Tensor]], None]] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """-> (lse, target_logit, logit_sum, dx, dw, db); the gradients only with row_scale.
    on_logits, on_exp: per-row statistics of each live chunk (_chunked_pass)."""
    n_rows, _ = hidden.shape
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    same = hidden.dtype == cdt
    weight_t = weight.t()
    visit = _rows_to_visit(rows, all_rows)
    chunk_x = [None]  # the chunk's hidden rows (a copy when rows are gathered), for on_probs

    def fill(sel: RowSelection, out: Tensor) -> None:
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
    factored = row_scale is not None and same and opts.softcap is None
    if factored:
        dx = torch.zeros_like(hidden) if need_dx else None
        # dW: the first chunk's product writes it (no zero fill of V x H), later ones add
        dw = torch.empty(weight.shape, dtype=cdt, device=weight.device) if need_dw else None
        dw_started = [False]
        db = torch.zeros(vocab, dtype=cdt, device=weight.device) if need_db else None
        smooth = bool(opts.label_smoothing)
        weight_colsum = weight.sum(dim=0) if (smooth and need_dx) else None
        smooth_x = torch.zeros(hidden.shape[1], dtype=cdt, device=hidden.device) if (smooth and need_dw) else None
        smooth_total = torch.zeros((), dtype=cdt, device=hidden.device) if (smooth and need_db) else None

        def on_probs(sel: RowSelection, probs: Tensor, coef_p: Tensor, coef_t: Tensor,
                     coef_s: Optional[Tensor]) -> None:
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

        def on_grad(sel: RowSelection, g: Tensor) -> None:
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

    lse, tl_, ls = _chunked_pass(fill, visit, n_rows, vocab, cdt, hidden.device, rows, opts, row_scale,
                                 on_grad, on_probs, on_logits, on_exp)
    if factored and dw is not None and not dw_started[0]:
        dw.zero_()  # no row was visited
    if factored and opts.label_smoothing:
        if dw is not None:
            dw.sub_(smooth_x[None, :])
        if db is not None:
            db.sub_(smooth_total)
    if dw is not None:
        dw = dw.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype)
    return lse, tl_, ls, dx, dw, db


def logits_chunked(
    logits: Tensor, rows: Rows, opts: Options, row_scale: Optional[Tensor], all_rows: bool = False
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    n_rows, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    visit = _rows_to_visit(rows, all_rows)

    def fill(sel: RowSelection, out: Tensor) -> None:
        out.copy_(logits[sel])

    dlogits = None
    on_grad = None
    if row_scale is not None:
        alloc = torch.empty_like if visit is None else torch.zeros_like
        dlogits = alloc(logits, memory_format=torch.contiguous_format)

        def on_grad(sel: RowSelection, g: Tensor) -> None:
            dlogits[sel] = g.to(dlogits.dtype)

    lse, tl_, ls = _chunked_pass(fill, visit, n_rows, vocab, cdt, logits.device, rows, opts, row_scale, on_grad)
    return lse, tl_, ls, dlogits
