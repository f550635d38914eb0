"""Triton kernels of the token-mixing embedding (gapfix.ops.mix_embedding).

Forward, per position n of the flattened ids (N positions, embedding width D):

    mixed[n] = eligible[n] and (mask[n] if a mask is given
                                else (philox(key(n), ctr(n)) >> (32 - MASK_BITS)) < threshold)
    one seed:       key(n) = seed,          ctr(n) = n
    per-row seeds:  key(n) = seeds[n // L], ctr(n) = n % L    (L = ROW_LEN positions a row)
    hard:  out[n] = W[alt[n]] if mixed[n] else W[ids[n]]
    soft:  out[n] = sum_k p[n, k] * W[alt[n, k]] if mixed[n] else W[ids[n]]

The random draw is word 0 of Philox-4x32-10 (`tl.randint`) with counter
(ctr(n), 0, 0, 0) and key (key low, key high); its top 24 bits are compared with
threshold = round(beta * 2**24), so a position mixes with probability beta
(quantized to 2**-24) and beta = 0 / 1 give never / always exactly. The same
integers are computed on the CPU by gapfix.ops.mix_embedding.philox_uint32,
so a seed gives the same mask on every device.

Memory traffic of the forward (hard): read N ids (+ N alt ids, + N mask
bytes), read N*D weight elements, write N*D outputs and N mask bytes: the
same as F.embedding; the RNG is integer arithmetic in registers. Soft mode
reads K rows (and K probabilities) instead of one at mixed positions only.

Backward (gradient to the weight only): every position scatters its output
gradient into the rows it read,

    hard:  dW[row[n]] += dout[n],  row[n] = alt[n] if mixed[n] else ids[n]
    soft:  dW[alt[n, k]] += p[n, k] * dout[n] at mixed n,  dW[ids[n]] += dout[n] else

and rows equal to padding_idx receive nothing, nor do rows outside [0, V) (which the
forward reads as NaN): an id that escaped validation never writes past dW. Two kernels: atomic adds into
an fp32 gradient (fast, order of the sums not fixed), or a segmented
reduction over the entries sorted by row (deterministic; also the choice for
half-precision weights since it writes each touched row once in the weight's
dtype, with the sum kept in fp32, and needs no fp32 copy of the gradient).
"""
import triton
import triton.language as tl

from .common import MASK_BITS, next_pow2

# the decision keeps the top MASK_BITS bits of the Philox word (common.py: shared with the
# op, whose CPU path draws the same bits)
_MASK_SHIFT = tl.constexpr(32 - MASK_BITS)

# launch configuration
NUM_WARPS = 4
SORTED_BLOCK_D = 256  # columns per program of the sorted backward
SORTED_CHUNK = 16  # run entries summed per step of the sorted backward


def launch_config(n: int, d: int) -> tuple:
    """(BLOCK_N, BLOCK_D) of the forward and the atomic backward: tiles of up to 4096
    elements, at most 512 wide."""
    block_d = min(next_pow2(d), 512)
    block_n = max(1, min(4096 // block_d, next_pow2(n)))
    return block_n, block_d


def sorted_block_d(d: int) -> int:
    """BLOCK_D of the sorted backward."""
    return min(next_pow2(d), SORTED_BLOCK_D)


@triton.jit
def _tile(N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's positions and columns, with their in-bounds masks."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return offs_n, offs_n < N, offs_d, offs_d < D


@triton.jit
def _soft_index(offs_n, K: tl.constexpr, k):
    """Index of element (n, k) of the (N, K) alt_ids / alt_probs, in int64: N * K may pass
    2**31 (a program id times BLOCK_N is int32, and so would be the product)."""
    return offs_n.to(tl.int64) * K + k


@triton.jit
def _load_mixed(mask_ptr, eligible_ptr, seeds_ptr, offs_n, in_n, threshold, seed, ROW_LEN,
                HAS_MASK: tl.constexpr, HAS_ELIGIBLE: tl.constexpr, ROW_SEEDS: tl.constexpr):
    """The mixing decision of a block of positions (int1, False past N)."""
    if HAS_MASK:
        mixed = tl.load(mask_ptr + offs_n, mask=in_n, other=0) != 0
    else:
        # counters are int32, so this is philox(key, (ctr, 0, 0, 0)), word 0
        if ROW_SEEDS:
            # int64 key per row (tl.randint splits each lane's key into its two words)
            row = offs_n // ROW_LEN
            keys = tl.load(seeds_ptr + row, mask=in_n, other=0)
            bits = tl.randint(keys, offs_n - row * ROW_LEN)
        else:
            bits = tl.randint(seed, offs_n)
        mixed = (bits >> _MASK_SHIFT).to(tl.int32) < threshold
    if HAS_ELIGIBLE:
        mixed = mixed & (tl.load(eligible_ptr + offs_n, mask=in_n, other=0) != 0)
    return mixed & in_n


@triton.jit
def _gather_rows(weight_ptr, rows, take, offs_d, in_d, V, D):
    """W[rows] for the positions where `take`, as a [BLOCK_N, BLOCK_D] tile.

    An id outside [0, V) is never dereferenced: its row reads as NaN, so a
    bad id that escaped validation poisons the loss instead of memory.
    """
    bad = (rows < 0) | (rows >= V)
    rows64 = rows.to(tl.int64)
    ptrs = weight_ptr + rows64[:, None] * D + offs_d[None, :]
    vals = tl.load(ptrs, mask=(take & ~bad)[:, None] & in_d[None, :], other=0.0)
    return tl.where((take & bad)[:, None], float("nan"), vals.to(tl.float32))


@triton.jit
def mix_embedding_fwd_kernel(
    weight_ptr, ids_ptr, alt_ptr, probs_ptr, mask_ptr, eligible_ptr,
    out_ptr, mixed_ptr, seeds_ptr,
    N, D, V, threshold, seed, ROW_LEN,
    K: tl.constexpr, SOFT: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_ELIGIBLE: tl.constexpr, ROW_SEEDS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_n, in_n, offs_d, in_d = _tile(N, D, BLOCK_N, BLOCK_D)

    # every D-block redraws the same bits (cheap integer math); one stores them
    mixed = _load_mixed(mask_ptr, eligible_ptr, seeds_ptr, offs_n, in_n, threshold, seed, ROW_LEN,
                        HAS_MASK, HAS_ELIGIBLE, ROW_SEEDS)
    if tl.program_id(1) == 0:
        tl.store(mixed_ptr + offs_n, mixed.to(tl.int8), mask=in_n)

    ids = tl.load(ids_ptr + offs_n, mask=in_n, other=0)
    if SOFT:
        acc = _gather_rows(weight_ptr, ids, in_n & ~mixed, offs_d, in_d, V, D)
        for k in tl.static_range(K):
            soft_idx = _soft_index(offs_n, K, k)
            alt = tl.load(alt_ptr + soft_idx, mask=mixed, other=0)
            p = tl.load(probs_ptr + soft_idx, mask=mixed, other=0.0).to(tl.float32)
            acc += p[:, None] * _gather_rows(weight_ptr, alt, mixed, offs_d, in_d, V, D)
    else:
        alt = tl.load(alt_ptr + offs_n, mask=mixed, other=0)
        rows = tl.where(mixed, alt, ids)
        acc = _gather_rows(weight_ptr, rows, in_n, offs_d, in_d, V, D)

    out_ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_n[:, None] & in_d[None, :])


@triton.jit
def mix_embedding_bwd_atomic_kernel(
    grad_ptr, ids_ptr, alt_ptr, probs_ptr, mixed_ptr, grad_weight_ptr,
    N, D, V, padding_idx,
    K: tl.constexpr, SOFT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dW[row] += dout[n] by fp32 atomics (grad_weight_ptr is fp32), rows in [0, V) only."""
    offs_n, in_n, offs_d, in_d = _tile(N, D, BLOCK_N, BLOCK_D)

    mixed = tl.load(mixed_ptr + offs_n, mask=in_n, other=0) != 0
    ids = tl.load(ids_ptr + offs_n, mask=in_n, other=0)
    grad = tl.load(grad_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :],
                   mask=in_n[:, None] & in_d[None, :], other=0.0).to(tl.float32)
    if SOFT:
        keep = in_n & ~mixed & (ids != padding_idx) & (ids >= 0) & (ids < V)
        ptrs = grad_weight_ptr + ids.to(tl.int64)[:, None] * D + offs_d[None, :]
        tl.atomic_add(ptrs, grad, mask=keep[:, None] & in_d[None, :], sem="relaxed")
        for k in tl.static_range(K):
            soft_idx = _soft_index(offs_n, K, k)
            alt = tl.load(alt_ptr + soft_idx, mask=mixed, other=0)
            p = tl.load(probs_ptr + soft_idx, mask=mixed, other=0.0).to(tl.float32)
            keep = mixed & (alt != padding_idx) & (p != 0.0) & (alt >= 0) & (alt < V)
            ptrs = grad_weight_ptr + alt.to(tl.int64)[:, None] * D + offs_d[None, :]
            tl.atomic_add(ptrs, p[:, None] * grad, mask=keep[:, None] & in_d[None, :], sem="relaxed")
    else:
        alt = tl.load(alt_ptr + offs_n, mask=mixed, other=0)
        rows = tl.where(mixed, alt, ids)
        keep = in_n & (rows != padding_idx) & (rows >= 0) & (rows < V)
        ptrs = grad_weight_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :]
        tl.atomic_add(ptrs, grad, mask=keep[:, None] & in_d[None, :], sem="relaxed")


@triton.jit
def mix_embedding_bwd_sorted_kernel(
    grad_ptr, sorted_rows_ptr, order_ptr, coef_ptr, grad_weight_ptr,
    E, D, V,
    K: tl.constexpr, HAS_COEF: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Segmented sum over entries sorted by row (stable sort: fixed order).

    Entry e stands for position e // K (with weight coef[e] in soft mode);
    skipped entries carry row -1 and sort first; rows >= V (never produced by the
    launcher, which masks them) are skipped too. The program of the first
    entry of each row's run sums the run in fp32, CHUNK entries per step (a
    frequent token's long run is CHUNK times fewer dependent steps), and
    writes the row once; the other programs return at once. grad_weight_ptr
    is pre-zeroed and in the weight's dtype.
    """
    i = tl.program_id(0)
    row = tl.load(sorted_rows_ptr + i)
    prev = tl.load(sorted_rows_ptr + i - 1, mask=i > 0, other=-1)
    if (row >= 0) & (row < V) & (row != prev):
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        start = i
        full = row >= 0  # True, as an int1 tensor: loop-carried types must not change
        while full:
            offs_e = start + tl.arange(0, CHUNK)
            # the run is a prefix of the chunk (sorted); past E reads as another row
            same = tl.load(sorted_rows_ptr + offs_e, mask=offs_e < E, other=-1) == row
            entry = tl.load(order_ptr + offs_e, mask=same, other=0)
            n = entry // K
            g = tl.load(grad_ptr + n[:, None] * D + offs_d[None, :],
                        mask=same[:, None] & in_d[None, :], other=0.0).to(tl.float32)
            if HAS_COEF:
                g = g * tl.load(coef_ptr + entry, mask=same, other=0.0).to(tl.float32)[:, None]
            acc += tl.sum(g, axis=0)
            start += CHUNK
            full = tl.sum(same.to(tl.int32), axis=0) == CHUNK
        out_ptrs = grad_weight_ptr + row.to(tl.int64) * D + offs_d
        tl.store(out_ptrs, acc.to(grad_weight_ptr.dtype.element_ty), mask=in_d)
