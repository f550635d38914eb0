"""Batched prefix alignment: the edit-distance engine under RAC's labels.

For each pair of a generated answer g (n tokens) and a reference y (m tokens),
D[t][j] is the unit-cost Levenshtein distance between g_<t and y_<j. `align`
returns, per row t = 0..n (entries past a row's length are -1):

- distance (B,): D[n][m];
- path (B, Tg+1): j(t), the smallest reference index in row t of the canonical
  optimal alignment traced back from (n, m) to (0, 0), preferring the diagonal
  (match / substitution), then up (g_{t-1} extra), then left (y_{j-1} missing);
- cost (B, Tg+1): c_t = min_j D[t][j];
- first / last (B, Tg+1): min / max of J_t = {j : D[t][j] = c_t};
- targets (B, Tg+1, K) when max_targets = K > 0, else None: for each distinct
  token among {y_j : j in J_t} (y_m is a virtual EOS distinct from every id),
  the first such j, in ascending order, at most K of them, -1 padded.

All int32, on the input device. Layers: the native op torch.ops.gapfix.align
(csrc/: bit-parallel CPU kernel, CUDA kernel), its fake (meta) registration so
torch.compile traces it, the pure-PyTorch reference `align_reference` (the
readable spec and the fallback), and the public `align`.
"""
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch

from gapfix.ops import _common
from gapfix.ops._common import check_ids, check_int, check_lengths, resolve_impl

# Row lengths as the public functions take them: None (the full width), a (B,) tensor or ints.
Lengths = Union[torch.Tensor, Sequence[int], None]

__all__ = ["Alignment", "align", "align_reference"]


class Alignment(NamedTuple):
    distance: torch.Tensor
    path: torch.Tensor
    cost: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor
    targets: Optional[torch.Tensor] = None


IMPLS = ("auto", "native", "torch")
# max_targets slots are allocated for every prefix (B * (Tg+1) * K int32) whatever the
# inputs hold: a bound keeps a mistyped K from asking for gigabytes. Prefixes with more
# distinct optimal tokens than this keep the first MAX_TARGETS_LIMIT (by position).
MAX_TARGETS_LIMIT = 1024


# ----------------------------------------------------------------------------
# Native op registration
# ----------------------------------------------------------------------------

def _native_op() -> Optional[Callable[..., Any]]:
    """torch.ops.gapfix.align, or None when gapfix._C is not loaded."""
    from gapfix import _native

    if not _native.available():
        return None
    return torch.ops.gapfix.align


def _find_native_kernels() -> frozenset[str]:
    """Device types with a registered native kernel (looked up once, at import,
    so that torch.compile sees a constant)."""
    if _native_op() is None:
        return frozenset()
    return frozenset(
        device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("gapfix::align", key)
    )


_NATIVE_KERNELS = _find_native_kernels()


def _has_native_kernel(device_type: str) -> bool:
    return device_type in _NATIVE_KERNELS


def _auto_impl(device: torch.device) -> str:
    return "native" if _has_native_kernel(device.type) else "torch"


def _register_fake() -> None:
    if _native_op() is None:
        return

    @torch.library.register_fake("gapfix::align")
    def _align_fake(
        gen: torch.Tensor, ref: torch.Tensor, gen_lens: torch.Tensor, ref_lens: torch.Tensor, max_targets: int
    ) -> tuple[torch.Tensor, ...]:
        batch, gen_width = gen.shape
        rows = gen.new_empty((batch, gen_width + 1), dtype=torch.int32)
        return (
            gen.new_empty((batch,), dtype=torch.int32),
            rows,
            torch.empty_like(rows),
            torch.empty_like(rows),
            torch.empty_like(rows),
            gen.new_empty((batch, gen_width + 1, max_targets), dtype=torch.int32),
        )


_register_fake()


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

def _check_values(
    gen: torch.Tensor, ref: torch.Tensor, gen_lens: torch.Tensor, ref_lens: torch.Tensor
) -> None:
    """Length ranges and negative ids (inside the lengths only: padding is free).
    One host sync on CUDA, none under torch.compile (the native CPU op re-checks
    the lengths itself)."""
    gen_ok = (gen_lens >= 0) & (gen_lens <= gen.shape[1])
    ref_ok = (ref_lens >= 0) & (ref_lens <= ref.shape[1])
    gen_in = torch.arange(gen.shape[1], device=gen.device) < gen_lens[:, None]
    ref_in = torch.arange(ref.shape[1], device=ref.device) < ref_lens[:, None]
    gen_neg = ((gen < 0) & gen_in).any()
    ref_neg = ((ref < 0) & ref_in).any()
    flags = torch.stack([gen_ok.all(), ref_ok.all(), ~gen_neg, ~ref_neg]).tolist()
    if not flags[0]:
        bad = int(torch.nonzero(~gen_ok)[0, 0])
        raise ValueError(f"gen_lens[{bad}] = {int(gen_lens[bad])} outside [0, {gen.shape[1]}]")
    if not flags[1]:
        bad = int(torch.nonzero(~ref_ok)[0, 0])
        raise ValueError(f"ref_lens[{bad}] = {int(ref_lens[bad])} outside [0, {ref.shape[1]}]")
    if not flags[2]:
        raise ValueError("gen holds negative token ids within gen_lens")
    if not flags[3]:
        raise ValueError("ref holds negative token ids within ref_lens")


def _prepare(
    gen: torch.Tensor, ref: torch.Tensor, gen_lens: Lengths, ref_lens: Lengths, max_targets: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validation shared by every impl; -> (gen, ref, gen_lens, ref_lens) ready for either."""
    check_ids("gen", gen)
    check_ids("ref", ref, device=gen.device, batch=gen.shape[0])
    check_int("max_targets", max_targets, low=0, high=MAX_TARGETS_LIMIT)
    batch = gen.shape[0]
    gen_lens = check_lengths("gen_lens", gen_lens, batch=batch, width=gen.shape[1], device=gen.device)
    ref_lens = check_lengths("ref_lens", ref_lens, batch=batch, width=ref.shape[1], device=gen.device)
    if not torch.compiler.is_compiling():
        _check_values(gen, ref, gen_lens, ref_lens)
    if gen.dtype != ref.dtype:
        gen, ref = gen.to(torch.int64), ref.to(torch.int64)
    return gen.contiguous(), ref.contiguous(), gen_lens, ref_lens


# ----------------------------------------------------------------------------
# Pure-PyTorch reference
# ----------------------------------------------------------------------------

def _reference_impl(
    gen: torch.Tensor, ref: torch.Tensor, gen_lens: torch.Tensor, ref_lens: torch.Tensor, max_targets: int
) -> Alignment:
    batch, gen_width = gen.shape
    ref_width = ref.shape[1]
    device = gen.device
    g, y = gen.long(), ref.long()
    cols = torch.arange(ref_width + 1, device=device)
    rows = torch.arange(gen_width + 1, device=device)

    # D (B, Tg+1, Tr+1), row by row: E[j] = min(diagonal, up) and E[0] = t, then
    # the left moves D[t][j] = min_{i <= j} E[i] + (j - i) as one cummin. Cells
    # past a pair's lengths are computed too and ignored (nothing flows back).
    D = torch.empty(batch, gen_width + 1, ref_width + 1, dtype=torch.int64, device=device)
    D[:, 0] = cols
    for t in range(1, gen_width + 1):
        prev = D[:, t - 1]
        mismatch = (g[:, t - 1 : t] != y).long()
        E = torch.empty_like(prev)
        E[:, 0] = t
        E[:, 1:] = torch.minimum(prev[:, :-1] + mismatch, prev[:, 1:] + 1)
        D[:, t] = torch.cummin(E - cols, dim=1).values + cols

    b_idx = torch.arange(batch, device=device)
    distance = D[b_idx, gen_lens, ref_lens]
    live_row = rows[None, :] <= gen_lens[:, None]  # (B, Tg+1)

    # Row minima over j <= m.
    big = torch.iinfo(torch.int64).max // 2
    in_ref = cols[None, None, :] <= ref_lens[:, None, None]
    Dm = torch.where(in_ref, D, big)
    cost = Dm.min(dim=2).values
    at_min = Dm == cost[:, :, None]  # J_t as a mask
    first = at_min.long().argmax(dim=2)
    last = ref_width - at_min.flip(2).long().argmax(dim=2)

    # Canonical traceback, all pairs in lock-step.
    path = torch.full((batch, gen_width + 1), -1, dtype=torch.int64, device=device)
    t, j = gen_lens.clone(), ref_lens.clone()
    d = distance.clone()
    active = t > 0
    # one spare column, so the gathers below stay in range for zero-width tensors
    g_pad = torch.nn.functional.pad(g, (0, 1))
    y_pad = torch.nn.functional.pad(y, (0, 1))
    while bool(active.any()):
        tp, jp = (t - 1).clamp(min=0), (j - 1).clamp(min=0)
        mismatch = (g_pad[b_idx, tp] != y_pad[b_idx, jp]).long()
        diag = active & (j > 0) & (D[b_idx, tp, jp] + mismatch == d)
        up = active & ~diag & (D[b_idx, tp, j] + 1 == d)
        left = active & ~diag & ~up
        leave = diag | up
        path[b_idx[leave], t[leave]] = j[leave]
        d = d - torch.where(diag, mismatch, 0) - up.long() - left.long()
        t = t - leave.long()
        j = j - (diag | left).long()
        active = t > 0
    path[:, 0] = 0

    targets = None
    if max_targets > 0:
        # Token per column: y_j for j < m, the virtual EOS (-1; ids are >= 0) at j = m.
        tokens = torch.cat([y, y.new_zeros(batch, 1)], dim=1)
        tokens = torch.where(cols[None, :] == ref_lens[:, None], -1, tokens)
        targets = torch.full((batch, gen_width + 1, max_targets + 1), -1, dtype=torch.int64, device=device)
        for t in range(gen_width + 1):
            J = at_min[:, t]
            keys = torch.where(J, tokens, big)
            sorted_keys, order = torch.sort(keys, dim=1, stable=True)
            starts = torch.ones_like(J)
            starts[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
            starts &= sorted_keys != big
            first_of_token = torch.zeros_like(J).scatter(1, order, starts)  # back to column order
            rank = first_of_token.long().cumsum(dim=1) - 1
            slot = torch.where(first_of_token & (rank < max_targets), rank, max_targets)
            targets[:, t].scatter_(1, slot, cols.expand(batch, -1).clone())
        targets = targets[:, :, :max_targets]
        targets = torch.where(live_row[:, :, None], targets, -1).int()

    def rowwise(x: torch.Tensor) -> torch.Tensor:
        return torch.where(live_row, x, -1).int()

    return Alignment(distance.int(), rowwise(path), rowwise(cost), rowwise(first), rowwise(last), targets)


def align_reference(
    gen: torch.Tensor,
    ref: torch.Tensor,
    gen_lens: Lengths = None,
    ref_lens: Lengths = None,
    *,
    max_targets: int = 0,
) -> Alignment:
    """Pure-PyTorch alignment (the readable spec): the full D matrix, O(B*Tg*Tr) memory."""
    gen, ref, gen_lens, ref_lens = _prepare(gen, ref, gen_lens, ref_lens, max_targets)
    return _reference_impl(gen, ref, gen_lens, ref_lens, max_targets)


# ----------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------

def align(
    gen: torch.Tensor,
    ref: torch.Tensor,
    gen_lens: Lengths = None,
    ref_lens: Lengths = None,
    *,
    max_targets: int = 0,
    impl: str = "auto",
) -> Alignment:
    """Aligns each generated row to its reference row (see the module docstring).

    gen (B, Tg), ref (B, Tr): int32/int64 token ids >= 0, right-padded; gen_lens,
    ref_lens (B,): the lengths (default: the full widths). max_targets: K in
    [0, MAX_TARGETS_LIMIT]. impl (docs/ops.md): "auto" (the native kernel for the
    tensors' device, else the PyTorch reference), "native" (gapfix._C; ValueError
    where it has no kernel for the device) or "torch" (the reference).

    Lengths outside [0, width] and negative ids within the lengths raise
    ValueError; on CUDA that check costs one host sync (skipped under
    torch.compile). Memory: CPU O(Tg * band) bits per thread; CUDA scratch of
    ~(Tr + 2.5 Tg) * Tr / 8 bytes per pair, in chunks of at most 2 GiB
    (GAPFIX_ALIGN_SCRATCH_MB).
    """
    _common.refuse_functorch("align", "each row's dynamic program reads its lengths and ids", gen, ref, gen_lens,
                             ref_lens)
    gen, ref, gen_lens, ref_lens = _prepare(gen, ref, gen_lens, ref_lens, max_targets)
    impl = resolve_impl(impl, op="align", device=gen.device, supported=IMPLS, auto=_auto_impl)
    if impl == "torch":
        return _reference_impl(gen, ref, gen_lens, ref_lens, max_targets)
    if not _has_native_kernel(gen.device.type):
        from gapfix import _native

        raise ValueError(
            f"align: impl='native' has no gapfix._C kernel for {gen.device.type} tensors "
            f"({_native.build_info()}); use impl='torch' or rebuild the extension"
        )
    distance, path, cost, first, last, targets = torch.ops.gapfix.align(gen, ref, gen_lens, ref_lens, max_targets)
    return Alignment(distance, path, cost, first, last, targets if max_targets > 0 else None)
