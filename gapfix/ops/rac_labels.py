"""RAC correction labels: ``gapfix.rac_labels``.

Reference-Answer-based Correction trains on the model's own answer g (input
x + g) with, after every generated prefix g_<t (t = 0..n, n = len(g)), the
reference token y_j that a Levenshtein alignment of g to y says is owed there;
j = m (past the reference) stands for EOS. ``gapfix.align`` picks j (one per
prefix, or every optimal one for the soft mode "all"); this module turns those
indices into training labels.

Layers, as for every gapfix op:

* ``rac_labels_reference`` -- pure PyTorch, the readable spec and the oracle;
  vectorized (one gather), it is also the path for CPU tensors.
* ``rac_labels_triton`` -- the launcher of ``gapfix.kernels.rac_labels`` behind
  the custom ops ``gapfix::rac_labels_hard`` and ``gapfix::rac_labels_soft``
  (torch.library.custom_op with register_fake, so torch.compile and export
  see shapes without running it), used for CUDA tensors. custom_op rather than
  triton_op: registering a triton_op imports torch._inductor (and Triton),
  seconds at import, for an op that runs once per batch build, outside the
  compiled training step.
* ``rac_labels`` -- the public function: validates, aligns, builds labels.

Return type: a plain int64 tensor (B, Tg+1) for the hard modes "path",
"first" and "last" (what a cross-entropy takes); a ``RacTargets`` tuple for
"all".
"""
import math
from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch
from torch import Tensor

from gapfix.ops import _common
from gapfix.ops._common import (
    INDEX_DTYPES,
    INT64_MAX,
    INT64_MIN,
    cdiv,
    check_ids,
    check_int,
    check_length_values,
    check_lengths,
    launch,
    resolve_impl,
    triton_runs_on,
)

if TYPE_CHECKING:  # align loads the native extension at import: only when it is used
    from gapfix.ops.align import Alignment

MODES = ("path", "first", "last", "all")
IMPLS = ("auto", "torch", "triton")
MAX_TARGETS_LIMIT = 64  # the kernel's per-row dedup is (K x K) register work


class RacTargets(NamedTuple):
    """Soft RAC targets (mode "all"), all (B, Tg+1, ...) on the input's device.

    labels: int64 (B, Tg+1), the hard "first" label (= target_ids[..., 0]).
    target_ids: int64 (B, Tg+1, K), the distinct optimal tokens of each prefix,
        in ascending reference position, then ignore_index.
    target_weights: float32 (B, Tg+1, K), 1/count on the filled slots, else 0
        (a padded prefix has no filled slot: all zeros).
    """

    labels: Tensor
    target_ids: Tensor
    target_weights: Tensor


# --------------------------------------------------------------------------
# Reference (the spec), also the CPU path
# --------------------------------------------------------------------------


def rac_labels_reference(
    ref: Tensor,
    index: Tensor,
    ref_lens: Optional[Tensor] = None,
    *,
    eos_id: int,
    ignore_index: int = -100,
    soft: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Labels from alignment indices, in plain PyTorch.

    ref (B, Tr) token ids; ref_lens (B,) or None (= Tr for every row).
    soft=False: index (B, T) reference positions -> labels (B, T) int64 with
        labels = ref[b, j] for 0 <= j < m, eos_id for j == m, ignore_index
        otherwise (j = -1 marks a padded prefix).
    soft=True: index (B, T, K) candidate positions -> (target_ids, target_weights):
        the candidates' labels, duplicate ids dropped (keeping the first),
        compacted to the front, weighted 1/count; ignore_index and 0 elsewhere.
    """
    batch, ref_width = ref.shape
    j = index.long()
    if ref_lens is None:
        m = torch.full((batch,), ref_width, dtype=torch.long, device=ref.device)
    else:
        m = ref_lens.long()
    m = m.view((batch,) + (1,) * (j.dim() - 1))
    in_ref = (j >= 0) & (j < m)
    at_end = j == m
    if ref_width == 0:  # nothing to gather from; every valid j is the end
        tok = torch.zeros_like(j)
    else:
        # explicit width: reshape(0, -1) is ambiguous for an empty batch
        safe_j = torch.where(in_ref, j, 0).reshape(batch, math.prod(j.shape[1:]))
        tok = torch.gather(ref.long(), 1, safe_j).view_as(j)
    ids = torch.where(at_end, eos_id, torch.where(in_ref, tok, ignore_index))
    if not soft:
        return ids

    k = j.shape[-1]
    filled = in_ref | at_end
    # dup[..., k] = an earlier filled candidate k' < k has the same id
    earlier = torch.ones(k, k, dtype=torch.bool, device=j.device).tril(-1)  # [k, k']
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & filled.unsqueeze(-2) & earlier
    keep = filled & ~same.any(-1)
    count = keep.sum(-1, keepdim=True)
    rank = keep.long().cumsum(-1) - 1
    # scatter kept ids to their rank; the rest go to a spare column k, dropped
    packed = torch.full(ids.shape[:-1] + (k + 1,), ignore_index, dtype=torch.long, device=ids.device)
    packed.scatter_(-1, torch.where(keep, rank, k), torch.where(keep, ids, ignore_index))
    target_ids = packed[..., :k].contiguous()
    used = torch.arange(k, device=j.device) < count
    target_weights = torch.where(used, 1.0 / count.clamp_min(1).float(), 0.0)
    return target_ids, target_weights


# --------------------------------------------------------------------------
# Triton launcher and custom ops
# --------------------------------------------------------------------------


def _launch(
    ref: Tensor,
    ref_lens: Optional[Tensor],
    index3: Tensor,
    ids3: Tensor,
    weights3: Optional[Tensor],
    eos_id: int,
    ignore_index: int,
    block_rows: Optional[int],
) -> None:
    from gapfix.kernels.rac_labels import launch_config, rac_labels_kernel

    batch, rows_per_batch, k = index3.shape
    n_rows = batch * rows_per_batch
    if n_rows == 0 or k == 0:
        return
    soft = weights3 is not None
    block_rows, block_k = launch_config(k, soft, block_rows)
    ref_width = ref.shape[1]
    if ref.numel() == 0:  # nothing is read from it; hand the kernel a real pointer
        ref = ref.new_zeros(1, 1)
    launch(
        rac_labels_kernel,
        (cdiv(n_rows, block_rows),),
        ref,
        ref if ref_lens is None else ref_lens,
        index3,
        ids3,
        ids3 if weights3 is None else weights3,
        n_rows,
        rows_per_batch,
        k,
        ref_width,
        ref.stride(0),
        ref.stride(1),
        index3.stride(0),
        index3.stride(1),
        index3.stride(2),
        ids3.stride(0),
        ids3.stride(1),
        ids3.stride(2),
        eos_id,
        ignore_index,
        device=index3.device,
        HAS_REF_LENS=ref_lens is not None,
        SOFT=soft,
        BLOCK_ROWS=block_rows,
        BLOCK_K=block_k,
    )


# block_rows < 0 means "the launcher's default"; tests pass small blocks to
# exercise several programs and a ragged tail at tiny shapes.
@torch.library.custom_op("gapfix::rac_labels_hard", mutates_args=())
def _rac_labels_hard_op(
    ref: Tensor, ref_lens: Optional[Tensor], index: Tensor, eos_id: int, ignore_index: int, block_rows: int
) -> Tensor:
    labels = torch.empty(index.shape, dtype=torch.long, device=index.device)
    _launch(ref, ref_lens, index.unsqueeze(-1), labels.unsqueeze(-1), None, eos_id, ignore_index,
            None if block_rows < 0 else block_rows)
    return labels


@torch.library.custom_op("gapfix::rac_labels_soft", mutates_args=())
def _rac_labels_soft_op(
    ref: Tensor, ref_lens: Optional[Tensor], index: Tensor, eos_id: int, ignore_index: int, block_rows: int
) -> tuple[Tensor, Tensor]:
    target_ids = torch.empty(index.shape, dtype=torch.long, device=index.device)
    target_weights = torch.empty(index.shape, dtype=torch.float32, device=index.device)
    _launch(ref, ref_lens, index, target_ids, target_weights, eos_id, ignore_index,
            None if block_rows < 0 else block_rows)
    return target_ids, target_weights


@_rac_labels_hard_op.register_fake
def _(
    ref: Tensor, ref_lens: Optional[Tensor], index: Tensor, eos_id: int, ignore_index: int, block_rows: int
) -> Tensor:
    return index.new_empty(index.shape, dtype=torch.long)


@_rac_labels_soft_op.register_fake
def _(
    ref: Tensor, ref_lens: Optional[Tensor], index: Tensor, eos_id: int, ignore_index: int, block_rows: int
) -> tuple[Tensor, Tensor]:
    return index.new_empty(index.shape, dtype=torch.long), index.new_empty(index.shape, dtype=torch.float32)


def rac_labels_triton(
    ref: Tensor,
    index: Tensor,
    ref_lens: Optional[Tensor] = None,
    *,
    eos_id: int,
    ignore_index: int = -100,
    soft: bool = False,
    block_rows: Optional[int] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Same contract as ``rac_labels_reference``, on the Triton kernel
    (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    br = -1 if block_rows is None else int(block_rows)
    if soft:
        return torch.ops.gapfix.rac_labels_soft(ref, ref_lens, index, eos_id, ignore_index, br)
    return torch.ops.gapfix.rac_labels_hard(ref, ref_lens, index, eos_id, ignore_index, br)


# --------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------


def _auto_impl(device: torch.device) -> str:
    return "triton" if device.type == "cuda" and triton_runs_on(device) else "torch"


def _check_ref_values(ref: Tensor, ref_lens: Tensor) -> None:
    """Negative ids within ref_lens (a label that could collide with ignore_index);
    one host sync, as for align's own check."""
    if torch.compiler.is_compiling() or ref.numel() == 0:
        return
    inside = torch.arange(ref.shape[1], device=ref.device) < ref_lens[:, None]
    if bool(((ref < 0) & inside).any()):
        raise ValueError("ref holds negative token ids within ref_lens")


def _check_alignment(
    alignment: "Alignment",
    mode: str,
    max_targets: int,
    batch: int,
    rows: int,
    device: torch.device,
    ref: Tensor,
    ref_lens: Tensor,
) -> Tensor:
    """Validates a caller-supplied alignment; returns the index tensor to use."""
    field = {"path": "path", "first": "first", "last": "last", "all": "targets"}[mode]
    index = getattr(alignment, field, None)
    name = f"alignment.{field}"
    if index is None:
        hint = f" (compute it with align(..., max_targets >= {max_targets}))" if mode == "all" else ""
        raise ValueError(f"{name} is missing{hint}")
    if not isinstance(index, Tensor) or index.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be an int32 or int64 tensor")
    want = (batch, rows) if mode != "all" else (batch, rows, index.shape[-1] if index.dim() == 3 else -1)
    if tuple(index.shape) != want:
        raise ValueError(f"{name} must have shape {want} for gen of shape ({batch}, {rows - 1}), "
                         f"got {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but gen is on {device}")
    if mode == "all":
        if index.shape[-1] < max_targets:
            raise ValueError(f"{name} holds {index.shape[-1]} candidates per prefix, fewer than "
                             f"max_targets={max_targets}; align with max_targets >= {max_targets}")
        index = index[..., :max_targets]
    # every index must be -1 (padding) or a position 0..m of its reference row
    m = ref_lens.view((batch,) + (1,) * (index.dim() - 1))
    if index.numel() and bool(((index < -1) | (index > m)).any()):
        raise ValueError(f"{name} holds positions outside [-1, ref_len]")
    return index


def rac_labels(
    gen: Tensor,
    ref: Tensor,
    gen_lens: Optional[Tensor] = None,
    ref_lens: Optional[Tensor] = None,
    *,
    eos_id: int,
    mode: str = "path",
    ignore_index: int = -100,
    max_targets: int = 4,
    alignment: Optional["Alignment"] = None,
    impl: str = "auto",
) -> Union[Tensor, RacTargets]:
    """RAC correction labels for generated answers ``gen`` against references ``ref``.

    gen (B, Tg), ref (B, Tr): int32/int64 token ids, right-padded, without EOS
    (y_m := EOS is implied); gen_lens, ref_lens (B,) or None (= full width).
    Row t of the result (t = 0..Tg) is the label after the generated prefix
    g_<t; rows t > gen_len are ignore_index.

    mode: "path" (the canonical optimal alignment, default), "first" / "last"
    (smallest / largest prefix-optimal reference position), or "all" (soft:
    uniform over the distinct prefix-optimal tokens, at most ``max_targets``,
    the first ones by reference position).
    alignment: a ``gapfix.Alignment`` of (gen, ref) to reuse instead of
    aligning here (for "all" it must carry targets with >= max_targets slots).
    impl (docs/ops.md): "auto" (Triton for CUDA tensors, the reference for CPU
    tensors; the alignment by align's "auto"), "triton", or "torch" (the PyTorch
    references for both the alignment and the labels). Every impl validates the
    same way, before anything runs.

    Returns labels (B, Tg+1) int64 for the hard modes; ``RacTargets`` for "all".
    """
    _common.refuse_functorch("rac_labels", "the alignment under it reads the rows' lengths and ids", gen, ref,
                             gen_lens, ref_lens)
    check_ids("gen", gen)
    batch, gen_width = gen.shape
    device = gen.device
    check_ids("ref", ref, device=device, batch=batch)
    gen_lens = check_lengths("gen_lens", gen_lens, batch=batch, width=gen_width, device=device)
    ref_lens = check_lengths("ref_lens", ref_lens, batch=batch, width=ref.shape[1], device=device)
    eos_id = check_int("eos_id", eos_id, low=0, high=INT64_MAX)
    # labels are int64: an ignore_index outside it could never be stored
    ignore_index = check_int("ignore_index", ignore_index, low=INT64_MIN, high=INT64_MAX)
    if ignore_index == eos_id:
        raise ValueError(f"ignore_index must differ from eos_id ({eos_id}): EOS labels would be ignored")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_int("max_targets", max_targets, low=1, high=MAX_TARGETS_LIMIT)
    # Only an explicit "torch" means the reference alignment: "auto" resolves to the "torch" labels
    # on CPU, but its alignment stays align's "auto" (the native kernel, ~100x the reference there).
    align_impl = "torch" if impl == "torch" else "auto"
    impl = resolve_impl(impl, op="rac_labels", device=device, supported=IMPLS, auto=_auto_impl)
    soft = mode == "all"

    if alignment is None:
        from gapfix.ops.align import align

        # align validates the lengths' values and the ids (one host sync)
        alignment = align(gen, ref, gen_lens, ref_lens, max_targets=max_targets if soft else 0,
                          impl=align_impl)
        index = alignment.targets[..., :max_targets] if soft else getattr(alignment, mode)
    else:
        check_length_values("gen_lens", gen_lens, gen_width)
        check_length_values("ref_lens", ref_lens, ref.shape[1])
        _check_ref_values(ref, ref_lens)
        index = _check_alignment(alignment, mode, max_targets, batch, gen_width + 1, device, ref, ref_lens)

    build = rac_labels_triton if impl == "triton" else rac_labels_reference
    out = build(ref, index, ref_lens, eos_id=eos_id, ignore_index=ignore_index, soft=soft)
    if not soft:
        return out
    target_ids, target_weights = out
    # slot 0 holds the smallest optimal position's token: the "first" label
    return RacTargets(target_ids[..., 0].contiguous(), target_ids, target_weights)
