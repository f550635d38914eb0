"""Token-mixing embedding: the input side of BASH (batch-scheduled sampling).

    embeds, mixed = gapfix.mix_embedding(weight, ids, alt_ids, beta=0.1, seed=step,
                                         eligible=answer_mask)

Each eligible position takes the embedding of the model's own token alt_ids
instead of the reference token ids, independently with probability beta
(or where an explicit `mask` says), inside the embedding gather. `seed` is an
int (one key for the whole call; the Philox counter is the flat position) or an
int64 tensor of one seed per row of ids (the counter restarts at each row), so a
row's mask depends on its own seed only, never on which batch it sits in. In soft mode
(alt_ids with a trailing top-k dimension and alt_probs) a mixed position gets
sum_k p_k * W[alt_k]. `mixed` is the bool mask actually applied.

Layers, as for every gapfix op:
  - mix_embedding_reference: the pure-PyTorch spec (given the mask) and oracle;
  - philox_uint32 / mixing_mask: the counter-based RNG (NumPy for CPU tensors,
    torch elsewhere), bit-equal to the Triton kernel's tl.randint, so a seed
    gives one mask on all devices;
  - _forward_cpu / _backward_cpu: impl="torch_fast", the fast plain-PyTorch path
    (any device; "auto" picks it for CPU tensors);
  - _forward_triton / _backward_triton: launchers of kernels/mix_embedding.py
    (imported lazily), for CUDA tensors (or CPU under TRITON_INTERPRET=1);
  - torch.ops.gapfix.mix_embedding / mix_embedding_backward: custom ops with
    fake (meta) kernels and autograd, so torch.compile traces through (eager
    calls use an autograd.Function twin, skipping the op dispatch);
  - mix_embedding: the public function (validation, impl choice).
"""

import math
import numbers
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from gapfix.kernels.common import MASK_BITS
from gapfix.ops import _common
from gapfix.ops._common import cdiv, launch, resolve_impl, triton_runs_on

__all__ = ["mix_embedding", "mix_embedding_reference", "mixing_mask", "mixing_threshold",
           "philox_uint32"]

IMPLS = ("auto", "torch", "torch_fast", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The decision compares the top MASK_BITS bits of a Philox word with
# round(beta * 2**MASK_BITS) (MASK_BITS lives with the kernels, in a triton-free module).
_MAX_SEED = 2**63  # seeds are split into the two 32-bit Philox key words
_MAX_POSITIONS = 2**31  # the Philox counter is the int32 flat position

# Philox-4x32 constants (Salmon et al., SC 2011), as in triton.language.random
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUNDS = 10

# an int key for every position, or an int64 tensor of per-row keys
Seed = Union[int, Tensor]
OptTensor = Optional[Tensor]
_U32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------
# counter-based RNG
# ----------------------------------------------------------------------------

def philox_uint32(seed: Seed, counter: torch.Tensor) -> torch.Tensor:
    """Word 0 of Philox-4x32-10 at counters (counter, 0, 0, 0), key = seed.

    Bit-equal to `tl.randint(seed, counter)` for int32 counters. `seed` is an
    int, or an int64 tensor on counter's device broadcastable against it (a key
    per element; a negative key is taken as its 64-bit two's complement, as
    Triton does). Values are returned as int64 in [0, 2**32), of the broadcast
    shape, on counter's device. CPU tensors go through NumPy (native wrapping
    uint64 arithmetic, ~2.5x fewer passes than emulating it in torch int64);
    other devices through torch.
    """
    if isinstance(seed, torch.Tensor) and seed.device != counter.device:
        raise ValueError(f"seed is on {seed.device} but counter is on {counter.device}")
    if counter.device.type == "cpu" and not torch.compiler.is_compiling():
        return _philox_numpy(seed, counter)
    return _philox_torch(seed, counter)


def _philox_numpy(seed: Seed, counter: Tensor) -> Tensor:
    import numpy as np

    low, shift = np.uint64(_U32), np.uint64(32)
    if isinstance(seed, torch.Tensor):
        keys = seed.to(torch.int64).numpy().view(np.uint64)
        k0, k1 = keys & low, (keys >> shift) & low
        shape = np.broadcast_shapes(tuple(counter.shape), k0.shape)
        c0 = np.broadcast_to(counter.numpy(), shape).astype(np.uint64)
        # the key schedule of every round at once (k + r * KEY mod 2**32): two array ops, not
        # four a round, which per-row keys (small arrays) would pay for in call overhead
        rounds = np.arange(_PHILOX_ROUNDS, dtype=np.uint64).reshape(-1, *([1] * k0.ndim))
        keys0 = (k0 + rounds * np.uint64(_PHILOX_KEY_A)) & low
        keys1 = (k1 + rounds * np.uint64(_PHILOX_KEY_B)) & low
    else:  # one int key: scalars, no broadcasting (small calls pay per-call overhead)
        c0 = counter.numpy().astype(np.uint64)
        keys0 = [np.uint64((seed + r * _PHILOX_KEY_A) & _U32) for r in range(_PHILOX_ROUNDS)]
        keys1 = [np.uint64(((seed >> 32) + r * _PHILOX_KEY_B) & _U32) for r in range(_PHILOX_ROUNDS)]
    c0 &= low
    c1, c2, c3 = np.zeros_like(c0), np.zeros_like(c0), np.zeros_like(c0)
    prod_a, prod_b = np.empty_like(c0), np.empty_like(c0)
    round_a, round_b = np.uint64(_PHILOX_ROUND_A), np.uint64(_PHILOX_ROUND_B)
    for k0, k1 in zip(keys0, keys1):
        # 32 x 32-bit products are exact in uint64: high word = >> 32, low = & 0xffffffff
        np.multiply(c0, round_a, out=prod_a)
        np.multiply(c2, round_b, out=prod_b)
        np.right_shift(prod_b, shift, out=c0)
        c0 ^= c1
        c0 ^= k0
        np.right_shift(prod_a, shift, out=c2)
        c2 ^= c3
        c2 ^= k1
        np.bitwise_and(prod_b, low, out=c1)
        np.bitwise_and(prod_a, low, out=c3)
    return torch.from_numpy(c0.view(np.int64))


def _philox_torch(seed: Seed, counter: Tensor) -> Tensor:
    # 32 x 32-bit products formed in int64 wrap modulo 2**64, so the high and
    # low words of the exact product are still bits 32..63 and 0..31 (a key
    # tensor broadcasts against the counters at the first round)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    c0 = counter.to(torch.int64) & _U32
    if isinstance(seed, torch.Tensor):
        c0 = c0.expand(torch.broadcast_shapes(c0.shape, seed.shape)).clone()
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_PHILOX_ROUNDS):
        prod_a = c0 * _PHILOX_ROUND_A
        prod_b = c2 * _PHILOX_ROUND_B
        c0 = ((prod_b >> 32) & _U32) ^ c1 ^ k0
        c2 = ((prod_a >> 32) & _U32) ^ c3 ^ k1
        c1 = prod_b & _U32
        c3 = prod_a & _U32
        k0 = (k0 + _PHILOX_KEY_A) & _U32
        k1 = (k1 + _PHILOX_KEY_B) & _U32
    return c0


def mixing_threshold(beta: float) -> int:
    """The integer threshold a position's top MASK_BITS random bits are compared with."""
    return int(round(float(beta) * (1 << MASK_BITS)))


def mixing_mask(shape: Sequence[int], *, beta: float, seed: Seed, eligible: Optional[torch.Tensor] = None,
                device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """The bool mask mix_embedding(..., beta=beta, seed=seed, eligible=eligible) applies.

    For callers that mix at the id level (an embedding module mix_embedding
    cannot see into): same RNG, same positions (row-major flat index, or the
    position within the row for per-row seeds). `seed` is an int or an int64
    tensor of shape (shape[0],), as in mix_embedding; the device is eligible's,
    else the seed tensor's, else `device`.
    """
    shape = tuple(shape)
    beta = _check_beta(beta)
    if eligible is not None:
        device = eligible.device
        if tuple(eligible.shape) != shape or eligible.dtype != torch.bool:
            raise ValueError(f"eligible must be a bool tensor of shape {shape}, "
                             f"got {eligible.dtype} {tuple(eligible.shape)}")
    elif isinstance(seed, torch.Tensor) and device is None:
        device = seed.device
    device = torch.device("cpu") if device is None else torch.device(device)
    # reading a CPU tensor's sign costs no device sync; a GPU one's would
    seed = _check_seed(seed, shape, device, check_sign=device.type == "cpu",
                       device_of="eligible" if eligible is not None else "device")
    numel = math.prod(shape)
    if numel >= _MAX_POSITIONS:
        raise ValueError(f"shape: at most 2**31 - 1 positions, got {numel}")
    mixed = _random_mixed(numel, mixing_threshold(beta), seed, device).view(shape)
    return mixed & eligible if eligible is not None else mixed


def _random_mixed(n: int, threshold: int, seed: Seed, device: torch.device) -> torch.Tensor:
    """(n,) bool: philox bits under threshold. An int seed keys every position with counter
    = flat index; a (B,) tensor keys row b's n // B positions with counter = index in the row."""
    if isinstance(seed, torch.Tensor):
        row_len = n // seed.shape[0] if seed.shape[0] else 0
        counter = torch.arange(row_len, device=device)
        bits = philox_uint32(seed[:, None], counter[None, :]).reshape(-1)
    else:
        bits = philox_uint32(seed, torch.arange(n, device=device))
    return (bits >> (32 - MASK_BITS)) < threshold


# ----------------------------------------------------------------------------
# reference (the spec, given the mask)
# ----------------------------------------------------------------------------

def mix_embedding_reference(weight: torch.Tensor, ids: torch.Tensor, alt_ids: torch.Tensor,
                            mixed: torch.Tensor, alt_probs: Optional[torch.Tensor] = None,
                            padding_idx: Optional[int] = None) -> torch.Tensor:
    """embeds[n] = W[alt[n]] where mixed[n] else W[ids[n]]; soft: sum_k p[n,k] W[alt[n,k]].

    Plain PyTorch with ordinary autograd (gradient to weight and to
    alt_probs). The soft sum is taken in fp32 (or the weight's dtype if
    wider), in order k = 0..K-1, and rounded once.
    """
    if alt_probs is None:
        return F.embedding(torch.where(mixed, alt_ids, ids), weight, padding_idx=padding_idx)
    plain = F.embedding(ids, weight, padding_idx=padding_idx)
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    rows = F.embedding(alt_ids, weight, padding_idx=padding_idx).to(acc_dtype)
    probs = alt_probs.to(acc_dtype)
    soft = torch.zeros_like(rows[..., 0, :])
    for k in range(alt_ids.shape[-1]):
        soft = soft + probs[..., k, None] * rows[..., k, :]
    return torch.where(mixed[..., None], soft.to(weight.dtype), plain)


# ----------------------------------------------------------------------------
# fast CPU path (flat tensors: ids (N,), alt (N,) or (N, K), weight (V, D))
# ----------------------------------------------------------------------------

def _draw_mixed(n: int, mask: OptTensor, eligible: OptTensor, threshold: int, seed: Seed,
                device: torch.device) -> Tensor:
    mixed = mask.clone() if mask is not None else _random_mixed(n, threshold, seed, device)
    if eligible is not None:
        mixed &= eligible
    return mixed


def _forward_cpu(weight: Tensor, ids: Tensor, alt_ids: Tensor, alt_probs: OptTensor, mask: OptTensor,
                 eligible: OptTensor, threshold: int, seed: Seed) -> tuple[Tensor, Tensor]:
    mixed = _draw_mixed(ids.shape[0], mask, eligible, threshold, seed, ids.device)
    if alt_probs is None:
        return F.embedding(torch.where(mixed, alt_ids, ids), weight), mixed
    embeds = F.embedding(ids, weight)
    # only the mixed rows need the K-row gather (beta is small)
    where = mixed.nonzero().squeeze(1)
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    alt, probs = alt_ids[where], alt_probs[where].to(acc_dtype)
    soft = torch.zeros(where.shape[0], weight.shape[1], dtype=acc_dtype, device=weight.device)
    for k in range(alt_ids.shape[1]):
        soft.addcmul_(probs[:, k, None], F.embedding(alt[:, k], weight).to(acc_dtype))
    embeds[where] = soft.to(weight.dtype)
    return embeds, mixed


def _backward_entries(ids: Tensor, alt_ids: Tensor, alt_probs: OptTensor, mixed: Tensor, padding_idx: int,
                      num_embeddings: int) -> tuple[Tensor, OptTensor]:
    """(rows, coef) of every gradient entry; rows -1 mark entries that add nothing
    (padding_idx, and ids outside [0, num_embeddings), which the Triton forward reads as
    NaN rows: they must never index the gradient).

    hard: one entry per position (coef None = 1). soft: K per position:
    entry (n, 0) is ids[n] with weight 1 if not mixed; entries (n, k) are
    alt[n, k] with weight p[n, k] if mixed.
    """
    if alt_probs is None:
        rows = torch.where(mixed, alt_ids, ids)
        coef = None
    else:
        k = alt_ids.shape[1]
        plain = torch.full_like(alt_ids, -1)
        plain[:, 0] = ids
        rows = torch.where(mixed[:, None], alt_ids, plain)
        coef = torch.where(mixed[:, None], alt_probs.float(),
                           (torch.arange(k, device=ids.device) == 0).float().expand(ids.shape[0], k))
        rows = rows.masked_fill(coef == 0, -1)
    if padding_idx >= 0:
        rows = rows.masked_fill(rows == padding_idx, -1)
    rows = rows.masked_fill(rows >= num_embeddings, -1)  # negative ids are < 0 already
    return rows.reshape(-1), (None if coef is None else coef.reshape(-1))


def _backward_cpu(grad: Tensor, ids: Tensor, alt_ids: Tensor, alt_probs: OptTensor, mixed: Tensor,
                  num_embeddings: int, padding_idx: int) -> Tensor:
    """Deterministic: the CPU embedding backward adds in position order.

    Hard mode is F.embedding's own backward on the mixed ids, bit for bit (in
    half precision that backward accumulates in the weight's dtype; an fp32
    accumulation here cost 3x on the CPU). Soft mode sums the weighted entries
    in fp32 per touched row, then rounds each touched row once.
    """
    dense_backward = torch.ops.aten.embedding_dense_backward
    if alt_probs is None:
        rows = torch.where(mixed, alt_ids, ids)
        return dense_backward(grad, rows, num_embeddings, padding_idx, False)
    acc_dtype = torch.promote_types(grad.dtype, torch.float32)
    rows, coef = _backward_entries(ids, alt_ids, alt_probs, mixed, padding_idx, num_embeddings)
    keep = (rows >= 0).nonzero().squeeze(1)
    src = grad[keep // alt_ids.shape[1]].to(acc_dtype) * coef[keep, None].to(acc_dtype)
    touched, slot = torch.unique(rows[keep], return_inverse=True)
    sums = dense_backward(src, slot, touched.shape[0], -1, False)
    grad_weight = torch.zeros(num_embeddings, grad.shape[1], dtype=grad.dtype, device=grad.device)
    return grad_weight.index_copy_(0, touched, sums.to(grad.dtype))


# ----------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------

def _forward_triton(weight: Tensor, ids: Tensor, alt_ids: Tensor, alt_probs: OptTensor, mask: OptTensor,
                    eligible: OptTensor, threshold: int, seed: Seed) -> tuple[Tensor, Tensor]:
    from gapfix.kernels import mix_embedding as kernels

    n, d = ids.shape[0], weight.shape[1]
    embeds = torch.empty(n, d, dtype=weight.dtype, device=weight.device)
    mixed = torch.empty(n, dtype=torch.bool, device=weight.device)
    if n == 0 or d == 0:  # nothing to gather (Triton grids must be non-empty)
        return embeds, _draw_mixed(n, mask, eligible, threshold, seed, weight.device)
    soft = alt_probs is not None
    row_seeds = isinstance(seed, torch.Tensor)  # (B,) keys, B >= 1 here since n > 0
    block_n, block_d = kernels.launch_config(n, d)
    grid = (cdiv(n, block_n), cdiv(d, block_d))
    launch(
        kernels.mix_embedding_fwd_kernel, grid,
        weight, ids, alt_ids, alt_probs if soft else ids,
        mask.view(torch.uint8) if mask is not None else ids,
        eligible.view(torch.uint8) if eligible is not None else ids,
        embeds, mixed.view(torch.uint8),
        seed if row_seeds else ids,
        n, d, weight.shape[0], threshold, 0 if row_seeds else seed,
        n // seed.shape[0] if row_seeds else 1,
        K=alt_ids.shape[1] if soft else 1, SOFT=soft,
        device=weight.device,
        HAS_MASK=mask is not None, HAS_ELIGIBLE=eligible is not None, ROW_SEEDS=row_seeds,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=kernels.NUM_WARPS,
    )
    return embeds, mixed


def _backward_triton(grad: Tensor, ids: Tensor, alt_ids: Tensor, alt_probs: OptTensor, mixed: Tensor,
                     num_embeddings: int, padding_idx: int, deterministic: bool) -> Tensor:
    from gapfix.kernels import mix_embedding as kernels

    n, d = grad.shape
    soft = alt_probs is not None
    k = alt_ids.shape[1] if soft else 1
    if n == 0 or d == 0:
        return torch.zeros(num_embeddings, d, dtype=grad.dtype, device=grad.device)
    if grad.dtype == torch.float32 and not deterministic:
        grad_weight = _new_grad_weight(num_embeddings, d, torch.float32, grad.device)
        block_n, block_d = kernels.launch_config(n, d)
        grid = (cdiv(n, block_n), cdiv(d, block_d))
        launch(
            kernels.mix_embedding_bwd_atomic_kernel, grid,
            grad, ids, alt_ids, alt_probs if soft else grad, mixed.view(torch.uint8), grad_weight,
            n, d, num_embeddings, padding_idx, device=grad.device,
            K=k, SOFT=soft, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=kernels.NUM_WARPS,
        )
        return grad_weight
    rows, coef = _backward_entries(ids, alt_ids, alt_probs, mixed, padding_idx, num_embeddings)
    sorted_rows, order = torch.sort(rows, stable=True)
    grad_weight = _new_grad_weight(num_embeddings, d, grad.dtype, grad.device)
    block_d = kernels.sorted_block_d(d)
    launch(
        kernels.mix_embedding_bwd_sorted_kernel, (rows.shape[0], cdiv(d, block_d)),
        grad, sorted_rows, order, coef if coef is not None else grad, grad_weight,
        rows.shape[0], d, num_embeddings, device=grad.device,
        K=k, HAS_COEF=coef is not None, CHUNK=kernels.SORTED_CHUNK, BLOCK_D=block_d,
        num_warps=kernels.NUM_WARPS,
    )
    return grad_weight


def _new_grad_weight(num_embeddings: int, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The zeroed gradient the backward kernels add into (a seam for the bounds tests)."""
    return torch.zeros(num_embeddings, d, dtype=dtype, device=device)


# ----------------------------------------------------------------------------
# custom ops (contiguous tensors in the caller's shapes; validated by mix_embedding)
# ----------------------------------------------------------------------------

def _mix_embedding_forward(weight: torch.Tensor, ids: torch.Tensor, alt_ids: torch.Tensor,
                           alt_probs: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                           eligible: Optional[torch.Tensor], threshold: int, seed: int,
                           row_seeds: Optional[torch.Tensor], padding_idx: int, deterministic: bool,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds ids.shape + (D,), mixed ids.shape); padding_idx / deterministic are for the backward.

    Tensors arrive contiguous in the caller's shapes and are flattened here
    (free), so no view of an autograd output is needed outside. row_seeds,
    (ids.shape[0],) int64, replaces the int seed when given.
    """
    forward = _forward_triton if backend == "triton" else _forward_cpu  # else "torch_fast"
    embeds, mixed = forward(weight, *_flat(ids, alt_ids, alt_probs, mask, eligible), threshold,
                            seed if row_seeds is None else row_seeds)
    return embeds.view(*ids.shape, weight.shape[1]), mixed.view(ids.shape)


def _flat(ids: Tensor, alt_ids: Tensor, alt_probs: OptTensor, *per_position: OptTensor) -> list[OptTensor]:
    """Views of (ids, alt_ids, alt_probs, *per_position) over the N flat positions."""
    k = () if alt_ids.dim() == ids.dim() else (alt_ids.shape[-1],)
    flat = [ids.reshape(-1), alt_ids.reshape(-1, *k)]
    flat.append(None if alt_probs is None else alt_probs.reshape(-1, *k))
    flat.extend(None if t is None else t.reshape(-1) for t in per_position)
    return flat


_mix_embedding_op = torch.library.custom_op("gapfix::mix_embedding", _mix_embedding_forward,
                                            mutates_args=())


@_mix_embedding_op.register_fake
def _(weight: Tensor, ids: Tensor, alt_ids: Tensor, alt_probs: OptTensor, mask: OptTensor,
      eligible: OptTensor, threshold: int, seed: int, row_seeds: OptTensor, padding_idx: int,
      deterministic: bool, backend: str) -> tuple[Tensor, Tensor]:
    return (weight.new_empty(*ids.shape, weight.shape[1]),
            ids.new_empty(ids.shape, dtype=torch.bool))


@torch.library.custom_op("gapfix::mix_embedding_backward", mutates_args=())
def _mix_embedding_backward_op(grad: torch.Tensor, ids: torch.Tensor, alt_ids: torch.Tensor,
                               alt_probs: Optional[torch.Tensor], mixed: torch.Tensor,
                               num_embeddings: int, padding_idx: int, deterministic: bool,
                               backend: str) -> torch.Tensor:
    """Gradient of the weight, (num_embeddings, D) in grad's dtype (inputs in the forward's shapes)."""
    ids, alt_ids, alt_probs, mixed = _flat(ids, alt_ids, alt_probs, mixed)
    grad = grad.reshape(-1, grad.shape[-1])
    if backend == "triton":
        grad_weight = _backward_triton(grad, ids, alt_ids, alt_probs, mixed, num_embeddings,
                                       padding_idx, deterministic)
        return grad_weight.to(grad.dtype)
    return _backward_cpu(grad, ids, alt_ids, alt_probs, mixed, num_embeddings, padding_idx)


@_mix_embedding_backward_op.register_fake
def _(grad: Tensor, ids: Tensor, alt_ids: Tensor, alt_probs: OptTensor, mixed: Tensor, num_embeddings: int,
      padding_idx: int, deterministic: bool, backend: str) -> Tensor:
    return grad.new_empty(num_embeddings, grad.shape[-1])


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    weight, ids, alt_ids, alt_probs, _, _, _, _, _, padding_idx, deterministic, backend = inputs
    ctx.save_for_backward(weight, ids, alt_ids, alt_probs, output[1])
    ctx.padding_idx, ctx.deterministic, ctx.backend = padding_idx, deterministic, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: Any, grad_embeds: Tensor, _grad_mixed: OptTensor) -> tuple[OptTensor, ...]:
    weight, ids, alt_ids, alt_probs, mixed = ctx.saved_tensors
    grad_weight = grad_probs = None
    grad_embeds = grad_embeds.contiguous()
    if ctx.needs_input_grad[0]:
        grad_weight = _mix_embedding_backward_op(
            grad_embeds, ids, alt_ids, alt_probs, mixed, weight.shape[0], ctx.padding_idx,
            ctx.deterministic, ctx.backend)
    if alt_probs is not None and ctx.needs_input_grad[3]:
        # d embeds[n] / d p[n, k] = W[alt[n, k]] at mixed n (padding_idx only
        # stops the weight's gradient, as in F.embedding)
        rows = F.embedding(alt_ids, weight).float()
        grad_probs = (rows * grad_embeds.float()[..., None, :]).sum(-1)
        grad_probs = (grad_probs * mixed[..., None]).to(alt_probs.dtype)
    return grad_weight, None, None, grad_probs, None, None, None, None, None, None, None, None


_mix_embedding_op.register_autograd(_backward, setup_context=_setup_context)


class _MixEmbeddingFunction(torch.autograd.Function):
    """Eager twin of torch.ops.gapfix.mix_embedding: the same forward, context
    and backward without the custom-op dispatch (about 30 us a call, a quarter
    of a small CPU gather). torch.compile traces the custom op instead."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, Tensor]:
        outputs = _mix_embedding_forward(*inputs)
        _setup_context(ctx, inputs, outputs)
        return outputs

    backward = staticmethod(_backward)


# ----------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------

def mix_embedding(weight: torch.Tensor, ids: torch.Tensor, alt_ids: torch.Tensor, *,
                  beta: Optional[float] = None, seed: Union[int, torch.Tensor, None] = None,
                  mask: Optional[torch.Tensor] = None, eligible: Optional[torch.Tensor] = None,
                  alt_probs: Optional[torch.Tensor] = None, padding_idx: Optional[int] = None,
                  deterministic: bool = False, check_ids: Optional[bool] = None,
                  impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding lookup that swaps in alternative tokens at random positions.

    Args:
        weight: (V, D) embedding matrix (fp32, bf16, fp16 or fp64).
        ids: (...) int32/int64 reference token ids.
        alt_ids: (...) alternative ids (hard mode), or (..., K) top-k ids (soft mode).
        beta: probability that an eligible position is mixed, in [0, 1]. Exactly
            one of `beta` and `mask` is given.
        seed: int in [0, 2**63) keying the counter-based RNG (Philox-4x32-10 at
            counter = row-major flat position); or per-row seeds, an int64 tensor
            of shape (B,) on weight's device for ids of shape (B, ...): row b is
            keyed by seed[b] with counter = the row-major position within the row,
            so mixed[b] depends only on (seed[b], beta, eligible[b]), whatever
            the other rows. None draws an int from torch's global CPU generator
            (beta mode only). The mask is the same on CPU and GPU and for every
            impl. Per-row seeds must lie in [0, 2**63): checked for CPU tensors,
            and for CUDA tensors with check_ids=True (reading them is a host sync);
            an unchecked negative seed keys by its 64-bit two's complement.
        mask: (...) bool, the positions to mix (instead of beta).
        eligible: (...) bool, the positions that may be mixed (answer tokens:
            never prompt or padding); None = all. Applied to `mask` too.
        alt_probs: (..., K) weights of the top-k ids (soft mode; each row should
            sum to 1). It receives a gradient if it requires one.
        padding_idx: rows equal to it get no gradient (as in F.embedding).
        deterministic: a fixed-order backward (sorted segmented reduction) on the
            GPU. The CPU path and half-precision weights are always deterministic;
            fp32 weights on the GPU otherwise use atomic adds. Sums are fp32 on the
            GPU; on the CPU the hard-mode backward is F.embedding's own (which
            accumulates half-precision gradients in their dtype), soft mode fp32.
        check_ids: check that ids / alt_ids lie in [0, V). None = check CPU
            tensors and impl="torch" only, skipping CUDA tensors on the fast paths,
            where the check would be a host sync; an id that escapes the check reads a NaN row on the GPU
            (never out of bounds). Always skipped under torch.compile.
        impl (docs/ops.md): "auto" (Triton for CUDA tensors, "torch_fast" for the
            rest), "triton" (ValueError on CPU tensors unless TRITON_INTERPRET=1),
            "torch_fast" (the fast plain-PyTorch path, any device), or "torch" (the
            reference; it always checks the ids, having no NaN-row guard).

    Returns:
        embeds (..., D) in weight's dtype, and mixed (...) bool, the mask applied.
        The gradient flows to `weight` (duplicates summed) and `alt_probs`.
    """
    _common.refuse_functorch("mix_embedding", "it checks the ids and draws its mask from their values",
                             weight, ids, alt_ids, alt_probs, mask, eligible)
    _check_tensor(weight, "weight", floating=True)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_embeddings, dim), got shape {tuple(weight.shape)}")
    device = weight.device
    # (_common.check_ids: the name check_ids is this function's flag)
    _common.check_ids("ids", ids, dim=None, device=device, device_of="weight")
    _common.check_ids("alt_ids", alt_ids, dim=None, device=device, device_of="weight")
    shape = tuple(ids.shape)
    soft = alt_ids.dim() == ids.dim() + 1
    if tuple(alt_ids.shape[:ids.dim()]) != shape or alt_ids.dim() not in (ids.dim(), ids.dim() + 1) \
            or (soft and alt_ids.shape[-1] == 0):
        raise ValueError(f"alt_ids must have the shape of ids {shape}, or {shape} + (K,) with K >= 1 "
                         f"in soft mode; got {tuple(alt_ids.shape)}")
    if soft and alt_probs is None:
        raise ValueError("alt_probs is required in soft mode (alt_ids with a trailing top-k dimension)")
    if alt_probs is not None:
        _check_tensor(alt_probs, "alt_probs", floating=True, device=device)
        if not soft:
            raise ValueError(f"alt_probs given but alt_ids {tuple(alt_ids.shape)} has no top-k "
                             f"dimension; expected alt_ids of shape {shape} + (K,)")
        if alt_probs.shape != alt_ids.shape:
            raise ValueError(f"alt_probs must have the shape of alt_ids {tuple(alt_ids.shape)}, "
                             f"got {tuple(alt_probs.shape)}")
    if (beta is None) == (mask is None):
        raise ValueError("pass exactly one of beta (random mixing) and mask (explicit positions)")
    threshold = 0
    if mask is not None:
        _check_tensor(mask, "mask", device=device)
        if mask.dtype != torch.bool or tuple(mask.shape) != shape:
            raise ValueError(f"mask must be a bool tensor of shape {shape}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
    else:
        threshold = mixing_threshold(_check_beta(beta))
    if seed is None:  # the CPU generator: no device sync; not consumed with an explicit mask
        seed = int(torch.randint(0, 2**62, ())) if mask is None else 0
    seed = _check_seed(seed, shape, device, check_sign=False)  # the sign: below, with the ids
    if eligible is not None:
        _check_tensor(eligible, "eligible", device=device)
        if eligible.dtype != torch.bool or tuple(eligible.shape) != shape:
            raise ValueError(f"eligible must be a bool tensor of shape {shape}, got {eligible.dtype} "
                             f"{tuple(eligible.shape)}")
    num_embeddings = weight.shape[0]
    if padding_idx is not None:
        if not isinstance(padding_idx, numbers.Integral) or not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx must be an int in [-{num_embeddings}, {num_embeddings}), "
                             f"got {padding_idx!r}")
        padding_idx = int(padding_idx) % num_embeddings
    if ids.numel() >= _MAX_POSITIONS:
        raise ValueError(f"ids: at most 2**31 - 1 positions, got {ids.numel()}")
    impl = resolve_impl(impl, op="mix_embedding", device=device, supported=IMPLS, auto=_auto_impl)
    if impl == "triton" and weight.dtype not in _TRITON_DTYPES:
        raise ValueError(f"weight: the Triton path takes fp32, bf16 or fp16, got {weight.dtype} "
                         "(use impl='torch_fast' or 'torch')")
    if check_ids is None:
        # the reference gathers with F.embedding, which has no NaN-row guard: always checked
        check_ids = device.type == "cpu" or impl == "torch"
    if check_ids and not torch.compiler.is_compiling():
        _check_range(ids, "ids", num_embeddings)
        _check_range(alt_ids, "alt_ids", num_embeddings)
    if isinstance(seed, torch.Tensor) and (check_ids or device.type == "cpu") \
            and not torch.compiler.is_compiling():
        _check_seed_sign(seed)

    if ids.dtype != alt_ids.dtype:
        ids, alt_ids = ids.long(), alt_ids.long()
    if impl == "torch":
        mixed = _draw_mixed(ids.numel(), None if mask is None else mask.reshape(-1),
                            None if eligible is None else eligible.reshape(-1),
                            threshold, seed, device).view(shape)
        embeds = mix_embedding_reference(weight, ids, alt_ids, mixed, alt_probs, padding_idx)
        return embeds, mixed

    contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
    apply = _mix_embedding_op if torch.compiler.is_compiling() else _MixEmbeddingFunction.apply
    row_seeds = seed.contiguous() if isinstance(seed, torch.Tensor) else None
    return apply(weight.contiguous(), ids.contiguous(), alt_ids.contiguous(), contiguous(alt_probs),
                 contiguous(mask), contiguous(eligible), threshold, 0 if row_seeds is not None else seed,
                 row_seeds, -1 if padding_idx is None else padding_idx, bool(deterministic), impl)


# ----------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------

def _auto_impl(device: torch.device) -> str:
    return "triton" if device.type == "cuda" and triton_runs_on(device) else "torch_fast"


def _check_tensor(t: Any, name: str, *, floating: bool = False,
                  device: Optional[torch.device] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but weight is on {device}")


def _check_beta(beta: Any) -> float:
    if isinstance(beta, torch.Tensor) or isinstance(beta, bool) or not isinstance(beta, numbers.Real) \
            or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    return float(beta)


def _check_seed(seed: Any, shape: tuple, device: torch.device, *, check_sign: bool,
                device_of: str = "weight") -> Seed:
    """An int in [0, 2**63), or per-row seeds: an int64 tensor of shape (shape[0],) on device."""
    if not isinstance(seed, torch.Tensor):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < _MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**63) or an int64 tensor of per-row seeds, "
                             f"got {seed!r}")
        return int(seed)
    if len(shape) == 0:
        raise ValueError("seed: per-row seeds need ids with at least one dimension (rows), got a scalar")
    if seed.dtype != torch.int64 or tuple(seed.shape) != shape[:1]:
        raise ValueError(f"seed: per-row seeds must be an int64 tensor of shape ({shape[0]},), one per "
                         f"row of ids {shape}; got {seed.dtype} {tuple(seed.shape)}")
    if seed.device != device:
        raise ValueError(f"seed is on {seed.device} but {device_of} is on {device}")
    if check_sign:
        _check_seed_sign(seed)
    return seed


def _check_seed_sign(seed: torch.Tensor) -> None:
    if seed.numel() and bool((seed < 0).any()):
        raise ValueError(f"seed: per-row seeds must lie in [0, 2**63), found {int(seed.min())}")


def _check_range(ids: Tensor, name: str, num_embeddings: int) -> None:
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_embeddings:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must lie in [0, {num_embeddings}) (num_embeddings of weight), "
                         f"found {bad}")
