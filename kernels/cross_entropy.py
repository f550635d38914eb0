"""Triton kernels of the fused cross-entropy (launched from gapfix/ops/cross_entropy/triton_launch.py).

Notation as in the gapfix.ops.cross_entropy docstring: x = hidden @ W^T (+ bias) are the raw
logits, z = c * tanh(x / c) with a soft cap (else z = x), lse = logsumexp(z),
and per row the coefficients computed by the launcher,
    coef_p = r * (S + 2 * zl * lse),  coef_t = r * (1 - eps),  coef_s = r * eps * S / V,
so that dL/dz_v = coef_p * p_v - coef_t * sum_k w_k [v = id_k] - coef_s
and dL/dx_v = dL/dz_v * (1 - (z_v / c)^2) with a soft cap.

Linear form, N rows, V vocabulary, H hidden; (N, V) never exists in memory:
  forward   grid (row blocks, vocabulary ranges). Each program streams its range in
            BLOCK_V tiles: the tile of logits (BLOCK_N x BLOCK_V, fp32 accumulation
            over H) lives in registers only; it folds into a running max / sum of
            exp (online logsumexp), the target logits and, with label smoothing, the
            sum of logits. Partials per range are merged by the launcher.
            Traffic: hidden is read once per vocabulary tile from L2, W once per row
            block: the memory traffic of one (N x H) @ (H x V) matmul.
  backward  grid (row blocks x vocabulary blocks). Each program recomputes its logits
            tile, turns it into dL/dx in registers, then adds
              dhidden[rows]  += G @ W[cols]        (BLOCK_N x H)
              dW[cols]       += G^T @ hidden[rows] (BLOCK_V x H)
              dbias[cols]    += sum_rows G
            with atomic adds into fp32 accumulators (order of additions, hence the
            last bits, is not deterministic). 3 matmuls' FLOPs; tiles whose rows are
            all ignored are skipped before any matmul. The atomics are relaxed
            (sem="relaxed"): they are pure sums that nothing reads before the kernel
            ends, so no ordering is needed, and acquire-release would add a fence to
            each. An accumulator whose gradient is not needed is not allocated (NEED_*
            off: its pointer is never dereferenced).

DOT_FP32 (the interpreter only, for bf16): Triton's CPU interpreter multiplies bf16
tiles wrongly, so there the tiles are widened to fp32 before tl.dot; on a GPU the
dots take the inputs' dtype.

All offsets are int64 (N * H and V * H may exceed 2**31).
"""
import triton
import triton.language as tl


def linear_config(dtype, n_rows, vocab, hdim, on_gpu, backward=False):
    """Tile sizes. Small fixed tiles under the interpreter (CPU) keep tests quick."""
    if not on_gpu:
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, GROUP_N=4) if backward else \
            dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16)
    small = dtype.itemsize == 4  # fp32 tiles take twice the shared memory
    # BLOCK_H (the matmuls' inner step) is as small as keeps the kernels under the
    # 255-register cap: the fp32 logits/gradient tile and the two products are live
    # together. Lowered for sm_90 (bench/kernel_report.py, bench/RESULTS.md's registers
    # table), bf16/fp16 at 128x128 spilled 0.3-1.5 KB a thread with BLOCK_H=64 and
    # 0-24 bytes with 32; fp32 spilled 20-64 bytes with 32 and none (plain) with 16.
    # The FLOPs per atomic of a tile do not depend on BLOCK_H.
    block_h = 16 if small else 32
    if backward:
        # atomics per tile: (BLOCK_N + BLOCK_V) * H for 6 * BLOCK_N * BLOCK_V * H FLOPs,
        # so big square tiles keep the atomic traffic (to L2) below the tensor-core rate
        if small:
            return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=block_h, GROUP_N=8, num_warps=8, num_stages=2)
        return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=block_h, GROUP_N=8, num_warps=8, num_stages=2)
    return dict(BLOCK_N=64 if small else 128, BLOCK_V=128, BLOCK_H=block_h, num_warps=8, num_stages=3)


def row_block(vocab):
    """Vocabulary tile of the row kernels: three fp32 vectors of 2048 live across the
    loop, 24 registers a thread at 8 warps (ROW_WARPS)."""
    return min(2048, triton.next_power_of_2(vocab))


ROW_WARPS = 8


@triton.jit
def _tanh(u):
    # |u| >= 1/2: 1 - 2 / (exp(2u) + 1), exact limits +-1 for |u| -> inf and no libdevice
    # dependency; compiled, exp is ex2.approx (relative error ~2 ulp), which moves the
    # result by at most ~half that, so tanh (>= 0.46 there) keeps ~3 ulp.
    # |u| < 1/2: that form cancels (1 - (1 - u)) to an absolute error of a few ulp of 1, a
    # relative error of ~eps / |u| that the soft cap c multiplies (6e-6 at c = 20): the odd
    # Taylor polynomial to u^17 instead: truncation < 1e-9 relative at |u| = 1/2, no
    # cancellation (u^2 P is < 1/10), 0.52 ulp of fp32 measured over [-1/2, 1/2].
    small = tl.abs(u) < 0.5
    v = tl.where(small, u, 0.0)
    a = v * v
    p = 6404582 / 10854718875
    p = p * a - 929569 / 638512875
    p = p * a + 21844 / 6081075
    p = p * a - 1382 / 155925
    p = p * a + 62 / 2835
    p = p * a - 17 / 315
    p = p * a + 2 / 15
    p = p * a - 1 / 3
    return tl.where(small, v + v * (a * p), 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))


@triton.jit
def _logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_x, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """hidden[rows] @ W[cols]^T, fp32 accumulation: (BLOCK_N, BLOCK_V)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    hs = tl.arange(0, BLOCK_H).to(tl.int64)
    x_base = x_ptr + rows[:, None] * stride_x
    w_base = w_ptr + cols[:, None] * stride_w
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hs
        h_mask = h < H
        xt = tl.load(x_base + h[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        wt = tl.load(w_base + h[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)
        if DOT_FP32:
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def linear_ce_forward_kernel(
    x_ptr, w_ptr, b_ptr, ids_ptr, slot_w_ptr,
    part_max_ptr, part_sum_ptr, part_target_ptr, part_logit_sum_ptr,
    part_xs_ptr, part_sq_ptr, part_before_ptr,
    N, V, H, stride_x, stride_w, v_per_split, softcap,
    NUM_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    ENTROPY: tl.constexpr, SQ: tl.constexpr, TOP1: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # ENTROPY / SQ / TOP1 (linear_log_probs): also the online sums of exp(z - m) z and
    # exp(z - m)^2 (rescaled with the running max m as the sum of exp is) and the max of
    # the logits before the target id; no extra traffic, a few FLOPs per logit
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    v_start = pid_s.to(tl.int64) * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)

    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    target = tl.zeros((BLOCK_N,), tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), tl.float32)
    run_xs = tl.zeros((BLOCK_N,), tl.float32)
    run_sq = tl.zeros((BLOCK_N,), tl.float32)
    before = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    if TOP1:
        first_id = tl.load(ids_ptr + rows * NUM_SLOTS, mask=row_mask, other=0)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < v_end
        z = _logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_x, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, DOT_FP32)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if SOFTCAP:
            z = softcap * _tanh(z / softcap)
        for k in tl.static_range(NUM_SLOTS):
            tid = tl.load(ids_ptr + rows * NUM_SLOTS + k, mask=row_mask, other=-1)
            tw = tl.load(slot_w_ptr + rows * NUM_SLOTS + k, mask=row_mask, other=0.0)
            hit = cols[None, :] == tid[:, None]
            target += tl.where(tw != 0.0, tw * tl.sum(tl.where(hit, z, 0.0), axis=1), 0.0)
        if SMOOTH:
            logit_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        if TOP1:
            early = cols[None, :] < first_id[:, None]
            before = tl.maximum(before, tl.max(tl.where(early, z, float("-inf")), axis=1))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # rows whose logits are all -inf so far shift by 0: exp gives 0, never NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)
        e = tl.exp(z - shift[:, None])
        run_sum = run_sum * rescale + tl.sum(e, axis=1)
        if ENTROPY:
            run_xs = run_xs * rescale + tl.sum(tl.where(e != 0.0, e * z, 0.0), axis=1)
        if SQ:
            run_sq = run_sq * rescale * rescale + tl.sum(e * e, axis=1)
        run_max = new_max

    out = pid_s.to(tl.int64) * N + rows
    tl.store(part_max_ptr + out, run_max, mask=row_mask)
    tl.store(part_sum_ptr + out, run_sum, mask=row_mask)
    tl.store(part_target_ptr + out, target, mask=row_mask)
    if SMOOTH:
        tl.store(part_logit_sum_ptr + out, logit_sum, mask=row_mask)
    if ENTROPY:
        tl.store(part_xs_ptr + out, run_xs, mask=row_mask)
    if SQ:
        tl.store(part_sq_ptr + out, run_sq, mask=row_mask)
    if TOP1:
        tl.store(part_before_ptr + out, before, mask=row_mask)


@triton.jit
def linear_ce_backward_kernel(
    x_ptr, w_ptr, b_ptr, ids_ptr, slot_w_ptr, lse_ptr, coef_p_ptr, coef_t_ptr, coef_s_ptr, row_scale_ptr,
    entropy_ptr, coef_e_ptr,
    dx_ptr, dw_ptr, db_ptr,
    N, V, H, stride_x, stride_w, softcap, filter_eps,
    NUM_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    ENTROPY: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    # grouped order: GROUP_N row blocks sweep the vocabulary together, so a W tile
    # is reused from L2 by several programs in flight
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    v_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * v_blocks
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V
    coef_p = tl.load(coef_p_ptr + rows, mask=row_mask, other=0.0)
    coef_t = tl.load(coef_t_ptr + rows, mask=row_mask, other=0.0)
    # ENTROPY (linear_log_probs): dL/dz_v also has b p_v (lse - H - z_v), b = coef_e
    coef_e = tl.zeros((BLOCK_N,), tl.float32)
    if ENTROPY:
        coef_e = tl.load(coef_e_ptr + rows, mask=row_mask, other=0.0)
    # all are exactly 0 for ignored rows (r = 0): a tile of such rows has no gradient
    active = tl.max(tl.abs(coef_p), axis=0) + tl.max(tl.abs(coef_t), axis=0) + tl.max(tl.abs(coef_e), axis=0)
    if active == 0.0:
        return
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)

    z = _logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_x, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, DOT_FP32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    live = row_mask[:, None] & col_mask[None, :] & ((coef_p != 0.0) | (coef_t != 0.0) | (coef_e != 0.0))[:, None]
    p = tl.exp(z - lse[:, None])
    g = coef_p[:, None] * p
    if ENTROPY:
        ent = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        g += coef_e[:, None] * tl.where(p != 0.0, p * (lse[:, None] - ent[:, None] - z), 0.0)
    for k in tl.static_range(NUM_SLOTS):
        tid = tl.load(ids_ptr + rows * NUM_SLOTS + k, mask=row_mask, other=-1)
        tw = tl.load(slot_w_ptr + rows * NUM_SLOTS + k, mask=row_mask, other=0.0)
        g -= tl.where(cols[None, :] == tid[:, None], (coef_t * tw)[:, None], 0.0)
    if SMOOTH:
        g -= tl.load(coef_s_ptr + rows, mask=row_mask, other=0.0)[:, None]
    if SOFTCAP:
        g = g * (1.0 - t * t)
    g = tl.where(live, g, 0.0)
    if FILTER:
        # drop the tile when every |dL/dx| / r < filter_eps (the per-token gradient, before
        # the upstream scale r): its products would change dhidden and dW by less than that
        r = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
        if tl.max(tl.max(tl.abs(g) - filter_eps * tl.abs(r)[:, None], axis=1), axis=0) <= 0.0:
            return
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")
    g_in = g.to(tl.float32 if DOT_FP32 else x_ptr.dtype.element_ty)

    hs = tl.arange(0, BLOCK_H).to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hs
        h_mask = h < H
        if NEED_DX:
            wt = tl.load(w_ptr + cols[:, None] * stride_w + h[None, :],
                         mask=col_mask[:, None] & h_mask[None, :], other=0.0)
            if DOT_FP32:
                wt = wt.to(tl.float32)
            dx = tl.dot(g_in, wt, input_precision=DOT_PRECISION)
            tl.atomic_add(dx_ptr + rows[:, None] * H + h[None, :], dx,
                          mask=row_mask[:, None] & h_mask[None, :], sem="relaxed")
        if NEED_DW:
            xt = tl.load(x_ptr + rows[:, None] * stride_x + h[None, :],
                         mask=row_mask[:, None] & h_mask[None, :], other=0.0)
            if DOT_FP32:
                xt = xt.to(tl.float32)
            dw = tl.dot(tl.trans(g_in), xt, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_ptr + cols[:, None] * H + h[None, :], dw.to(dw_ptr.dtype.element_ty),
                          mask=col_mask[:, None] & h_mask[None, :], sem="relaxed")


# ---- cross-entropy on given logits: one row per program, streamed over V ----


@triton.jit
def ce_forward_kernel(
    logits_ptr, ids_ptr, slot_w_ptr, lse_ptr, target_ptr, logit_sum_ptr,
    V, stride_row, softcap,
    NUM_SLOTS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # reads the row once (online logsumexp); writes 3 floats
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V).to(tl.int64)
    run_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_V,), tl.float32)
    logit_sum = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            z = tl.where(mask, softcap * _tanh(z / softcap), float("-inf"))
        if SMOOTH:
            logit_sum += tl.where(mask, z, 0.0)
        # lane-wise online logsumexp, merged across lanes at the end
        new_max = tl.maximum(run_max, z)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.exp(z - shift)
        run_max = new_max
    top = tl.max(run_max, axis=0)
    top_shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(run_sum * tl.exp(run_max - top_shift), axis=0)
    tl.store(lse_ptr + row, top_shift + tl.log(total))
    target = 0.0
    for k in tl.static_range(NUM_SLOTS):
        tid = tl.load(ids_ptr + row * NUM_SLOTS + k)
        tw = tl.load(slot_w_ptr + row * NUM_SLOTS + k)
        zt = tl.load(base + tid).to(tl.float32)  # tid is 0 for ignored slots (weight 0)
        if SOFTCAP:
            zt = softcap * _tanh(zt / softcap)
        target += tl.where(tw != 0.0, tw * zt, 0.0)  # an unused slot may point at a -inf logit
    tl.store(target_ptr + row, target)
    if SMOOTH:
        tl.store(logit_sum_ptr + row, tl.sum(logit_sum, axis=0))


@triton.jit
def ce_backward_kernel(
    logits_ptr, ids_ptr, slot_w_ptr, lse_ptr, coef_p_ptr, coef_t_ptr, coef_s_ptr, dlogits_ptr,
    V, stride_row, stride_grad, softcap,
    NUM_SLOTS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # one (row, vocabulary block): reads the logits block once, writes dlogits once
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    mask = cols < V
    coef_p = tl.load(coef_p_ptr + row)
    coef_t = tl.load(coef_t_ptr + row)
    out = dlogits_ptr + row * stride_grad + cols
    if (coef_p == 0.0) & (coef_t == 0.0):
        tl.store(out, tl.zeros((BLOCK_V,), tl.float32).to(dlogits_ptr.dtype.element_ty), mask=mask)
        return
    z = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    g = coef_p * tl.exp(z - tl.load(lse_ptr + row))
    for k in tl.static_range(NUM_SLOTS):
        tid = tl.load(ids_ptr + row * NUM_SLOTS + k)
        tw = tl.load(slot_w_ptr + row * NUM_SLOTS + k)
        g -= tl.where(cols == tid, coef_t * tw, 0.0)
    if SMOOTH:
        g -= tl.load(coef_s_ptr + row)
    if SOFTCAP:
        g = g * (1.0 - t * t)
    tl.store(out, g.to(dlogits_ptr.dtype.element_ty), mask=mask)
