"""Triton kernel: RAC correction labels from alignment indices.

Given, for every generated prefix g_<t, one or more reference positions j chosen
by the alignment (gapfix.align), the label is the reference token y_j, with the
end of the reference (j == m, m = the row's reference length) standing for EOS
and a negative j marking a padded prefix (t past the generated length):

    label(b, t, k) = ref[b, j]     if 0 <= j < m        j = index[b, t, k]
                   = eos_id        if j == m
                   = ignore_index  otherwise (j == -1: padding)

SOFT (mode "all") adds the soft-target layout: the K candidates of a row are
deduplicated by token id (two positions can carry the same id only when the
reference itself contains eos_id), compacted to the front in their original
order, and weighted uniformly: w = 1 / (number of distinct ids) on the filled
slots, 0 on the rest (whose id is ignore_index). A padded row has no filled slot.

One program handles BLOCK_ROWS flattened (b, t) rows. Pure gather, no reuse:
per slot it reads one index (4 or 8 B) and one reference token, writes one
int64 id (+ one float32 weight when SOFT), so it runs at memory bandwidth; the
(BLOCK_K x BLOCK_K) dedup compare is register work on K <= 64 candidates (the op's MAX_TARGETS_LIMIT).
"""
import triton
import triton.language as tl

from .common import next_pow2


def launch_config(k: int, soft: bool, block_rows=None) -> tuple:
    """(BLOCK_ROWS, BLOCK_K) for K slots per row; block_rows overrides the default (tests pass
    small blocks to get several programs and a ragged tail at tiny shapes).

    hard: 512 rows of one slot (40 registers on sm_90); soft: a (rows x K x K) dedup tile of
    2K elements (K=4: 128 rows, ~110 registers, no spills; 4K elements took ~180 registers).
    """
    block_k = next_pow2(k)
    if block_rows is None:
        block_rows = 512 if not soft else max(1, 2048 // (block_k * block_k))
    return next_pow2(block_rows), block_k  # tl.arange needs powers of two


@triton.jit
def rac_labels_kernel(
    ref_ptr,  # (B, Tr) int32/int64 reference token ids
    ref_lens_ptr,  # (B,) reference lengths; unused unless HAS_REF_LENS
    index_ptr,  # (B, T, K) int32/int64 reference positions, -1 = none
    ids_ptr,  # (B, T, K) int64 out
    weights_ptr,  # (B, T, K) float32 out; unused unless SOFT
    n_rows,  # B * T
    T,
    K,
    ref_width,  # Tr: the reference length of every row when not HAS_REF_LENS
    stride_rb,
    stride_rt,
    stride_ib,
    stride_it,
    stride_ik,
    stride_ob,
    stride_ot,
    stride_ok,
    eos_id,
    ignore_index,
    HAS_REF_LENS: tl.constexpr,
    SOFT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    b = rows // T
    t = rows % T
    slot = tl.arange(0, BLOCK_K)
    slot_ok = row_ok[:, None] & (slot[None, :] < K)

    j = tl.load(
        index_ptr + b[:, None] * stride_ib + t[:, None] * stride_it + slot[None, :] * stride_ik,
        mask=slot_ok,
        other=-1,
    ).to(tl.int64)
    if HAS_REF_LENS:
        m = tl.load(ref_lens_ptr + b, mask=row_ok, other=0).to(tl.int64)
    else:
        m = tl.zeros([BLOCK_ROWS], dtype=tl.int64) + ref_width
    # j outside [0, m] is treated like padding, so a bad index can never read
    # past the row (the public function validates caller-supplied indices).
    in_ref = slot_ok & (j >= 0) & (j < m[:, None])
    at_end = slot_ok & (j == m[:, None])
    tok = tl.load(ref_ptr + b[:, None] * stride_rb + j * stride_rt, mask=in_ref, other=0).to(tl.int64)
    ids = tl.where(at_end, eos_id, tl.where(in_ref, tok, ignore_index)).to(tl.int64)
    out_offs = b[:, None] * stride_ob + t[:, None] * stride_ot + slot[None, :] * stride_ok

    if SOFT:
        filled = in_ref | at_end
        # dup[r, k] = some earlier filled slot k' < k of row r holds the same id
        earlier = slot[None, :, None] > slot[None, None, :]  # [r, k, k']
        same = (ids[:, :, None] == ids[:, None, :]) & filled[:, None, :] & earlier
        dup = tl.max(same.to(tl.int32), axis=2) > 0
        keep = filled & (dup == 0)
        keep_i = keep.to(tl.int32)
        count = tl.sum(keep_i, axis=1)  # distinct ids per row
        rank = tl.cumsum(keep_i, axis=1) - 1  # destination slot of each kept id
        # compaction as a select-and-sum: out[r, s] = ids[r, k] for the kept k of rank s
        pick = keep[:, None, :] & (rank[:, None, :] == slot[None, :, None])  # [r, s, k]
        packed = tl.sum(tl.where(pick, ids[:, None, :], 0), axis=2)
        used = slot[None, :] < count[:, None]
        ids = tl.where(used, packed, ignore_index).to(tl.int64)
        # div_rn: the IEEE-rounded 1/count, bit-equal to the PyTorch reference
        # (plain `/` may lower to the approximate division on GPUs)
        ones = tl.full([BLOCK_ROWS], 1.0, dtype=tl.float32)
        inv = tl.math.div_rn(ones, tl.maximum(count, 1).to(tl.float32))
        weight = tl.where(used, inv[:, None], 0.0)
        tl.store(weights_ptr + out_offs, weight, mask=slot_ok)
    tl.store(ids_ptr + out_offs, ids, mask=slot_ok)
