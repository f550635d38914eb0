"""gapfix.mix_embedding: fast paths (CPU, Triton under the interpreter) against the reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import gapfix
from gapfix.ops.mix_embedding import (
    _philox_numpy,
    _philox_torch,
    mix_embedding_reference,
    mixing_mask,
    mixing_threshold,
    philox_uint32,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(v=37, d=19, shape=(3, 7), k=None, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=gen).to(dtype)
    ids = torch.randint(0, v, shape, generator=gen)
    alt_shape = shape if k is None else (*shape, k)
    alt = torch.randint(0, v, alt_shape, generator=gen)
    probs = None if k is None else torch.softmax(torch.randn(alt_shape, generator=gen), -1)
    mask = torch.rand(shape, generator=gen) < 0.5
    grad_out = torch.randn(*shape, d, generator=gen).to(dtype)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(weight), to(ids), to(alt), to(probs), to(mask), to(grad_out)


def _weight_grad(weight, fn, grad_out):
    w = weight.detach().clone().requires_grad_(True)
    out = fn(w)
    (grad,) = torch.autograd.grad(out, w, grad_out.to(out.dtype))
    return out.detach(), grad


def _assert_close_to_fp64(ours, ref_lowp, ref64):
    """Cut-Cross-Entropy style: ours may err at most a small multiple of the low-precision reference."""
    ref_err = (ref_lowp.double() - ref64).abs().max().item()
    our_err = (ours.double() - ref64).abs().max().item()
    assert our_err <= 2 * ref_err + 1e-6 * (1 + ref64.abs().max().item()), (our_err, ref_err)


# ---------------------------------------------------------------------------- RNG

def test_philox_matches_random123_known_answer():
    # Random123 kat_vectors: philox4x32_10, counter 0, key 0 -> first word 0x6627e8d5
    assert int(philox_uint32(0, torch.zeros(1, dtype=torch.long))[0]) == 0x6627E8D5


@pytest.mark.parametrize("seed", [0, 3, 2**40 + 17])
def test_philox_numpy_and_torch_agree(seed):
    counter = torch.arange(2**31 - 300, 2**31 - 1, 7)
    assert torch.equal(_philox_numpy(seed, counter), _philox_torch(seed, counter))


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**63 - 1])
def test_mask_is_the_same_in_the_triton_kernel(triton_device, seed):
    weight, ids, alt, _, _, _ = _case(v=11, d=3, shape=(5, 13), device=triton_device)
    _, mixed_triton = gapfix.mix_embedding(weight, ids, alt, beta=0.37, seed=seed, impl="triton")
    _, mixed_cpu = gapfix.mix_embedding(weight.cpu(), ids.cpu(), alt.cpu(), beta=0.37, seed=seed,
                                        impl="torch_fast")
    assert torch.equal(mixed_triton.cpu(), mixed_cpu)
    assert torch.equal(mixed_cpu, mixing_mask(ids.shape, beta=0.37, seed=seed))


def test_triton_randint_is_our_philox(triton_device):
    import triton
    import triton.language as tl

    @triton.jit
    def draw(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.randint(seed, offs).to(tl.int64, bitcast=False), mask=offs < n)

    out = torch.zeros(29, dtype=torch.int64, device=triton_device)
    draw[(1,)](out, 12345, 29, BLOCK=32)
    ours = philox_uint32(12345, torch.arange(29))
    assert torch.equal(out.cpu() & 0xFFFFFFFF, ours)


def test_seed_reproducible_and_distinct():
    weight, ids, alt, _, _, _ = _case(shape=(4, 50))
    a = gapfix.mix_embedding(weight, ids, alt, beta=0.5, seed=3)[1]
    b = gapfix.mix_embedding(weight, ids, alt, beta=0.5, seed=3)[1]
    c = gapfix.mix_embedding(weight, ids, alt, beta=0.5, seed=4)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seed_none_follows_torch_manual_seed():
    weight, ids, alt, _, _, _ = _case(shape=(4, 50))
    torch.manual_seed(1)
    a = gapfix.mix_embedding(weight, ids, alt, beta=0.5)[1]
    torch.manual_seed(1)
    b = gapfix.mix_embedding(weight, ids, alt, beta=0.5)[1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("beta", [0.05, 0.3, 0.9])
def test_rate_inside_binomial_interval(beta):
    n = 40_000
    weight, ids, alt, _, _, _ = _case(v=5, d=1, shape=(n,))
    for seed in (0, 1, 2):
        mixed = gapfix.mix_embedding(weight, ids, alt, beta=beta, seed=seed)[1]
        rate = mixed.float().mean().item()
        # 5 standard deviations: a false failure has probability ~6e-7
        assert abs(rate - beta) <= 5 * math.sqrt(beta * (1 - beta) / n), (seed, rate)


@pytest.mark.parametrize("impl", ["torch_fast", "torch"])
def test_beta_zero_and_one(impl):
    weight, ids, alt, _, _, _ = _case(shape=(6, 11))
    embeds, mixed = gapfix.mix_embedding(weight, ids, alt, beta=0.0, seed=1, impl=impl)
    assert not mixed.any() and torch.equal(embeds, F.embedding(ids, weight))
    embeds, mixed = gapfix.mix_embedding(weight, ids, alt, beta=1.0, seed=1, impl=impl)
    assert mixed.all() and torch.equal(embeds, F.embedding(alt, weight))
    assert mixing_threshold(1.0) == 2**24 and mixing_threshold(0.0) == 0


@pytest.mark.parametrize("impl", ["torch_fast", "torch", "triton"])
def test_ineligible_positions_never_mixed(impl, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    weight, ids, alt, _, mask, _ = _case(shape=(4, 9), device=device)
    eligible = torch.arange(9, device=device).expand(4, 9) >= 5  # the "answer" is the tail
    for kwargs in ({"beta": 1.0, "seed": 0}, {"mask": torch.ones_like(mask)}):
        embeds, mixed = gapfix.mix_embedding(weight, ids, alt, eligible=eligible, impl=impl, **kwargs)
        assert torch.equal(mixed, eligible)
        assert torch.equal(embeds, F.embedding(torch.where(eligible, alt, ids), weight))


# ---------------------------------------------------------------------------- per-row seeds

ROW_SEEDS = [0, 7, 2**32 + 5, 2**63 - 1, 2**40 + 17, 3, 2**31]


def _row_seeds(rows, device="cpu"):
    return torch.tensor((ROW_SEEDS * rows)[:rows], dtype=torch.int64, device=device)


def test_philox_numpy_and_torch_agree_on_key_tensors():
    """A key per element, broadcast against the counters; negative keys are their two's complement
    (as Triton's int64 -> uint64 cast), so an unchecked negative seed keys alike on every path."""
    keys = torch.tensor([0, 5, 2**63 - 1, -1, -(2**63), 2**32 + 9])[:, None]
    counter = torch.arange(2**31 - 40, 2**31 - 1, 3)[None, :]
    ours = _philox_numpy(keys, counter)
    assert ours.shape == (6, counter.shape[1])
    assert torch.equal(ours, _philox_torch(keys, counter))
    for i, key in enumerate(keys[:, 0].tolist()):
        assert torch.equal(ours[i], _philox_numpy(key % 2**64, counter[0]))


@pytest.mark.parametrize("shape", [(5, 13), (3, 4, 5), (6,), (1, 9)])
def test_row_seed_row_is_the_int_seed_of_that_row_alone(shape):
    """Per-row seeds: row b's mask is what the int seed seed[b] gives the row by itself
    (counter = position within the row), whatever the other rows."""
    seeds = _row_seeds(shape[0])
    mask = mixing_mask(shape, beta=0.4, seed=seeds)
    for b in range(shape[0]):
        assert torch.equal(mask[b], mixing_mask((1, *shape[1:]), beta=0.4, seed=int(seeds[b]))[0])
    assert 0 < mask.sum() < mask.numel()


def test_row_seed_mask_ignores_the_batch_layout():
    """The trainer's invariant: a row mixes alike in any micro-batch, at any padded width."""
    seeds = torch.tensor([11, 2**50 + 3, 42, 9, 2**62])
    whole = mixing_mask((5, 23), beta=0.5, seed=seeds)
    split = mixing_mask((2, 17), beta=0.5, seed=seeds[[3, 1]])  # another order, narrower padding
    assert torch.equal(split, whole[[3, 1], :17])
    weight, ids, alt, _, _, _ = _case(shape=(5, 23))
    embeds, mixed = gapfix.mix_embedding(weight, ids, alt, beta=0.5, seed=seeds)
    sub_embeds, sub_mixed = gapfix.mix_embedding(weight, ids[[3, 1], :17], alt[[3, 1], :17], beta=0.5,
                                                 seed=seeds[[3, 1]])
    assert torch.equal(mixed, whole) and torch.equal(sub_mixed, split)
    assert torch.equal(sub_embeds, embeds[[3, 1], :17])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("impl,deterministic",
                         [("torch_fast", False), ("torch", False), ("triton", False), ("triton", True)])
def test_row_seeds_every_impl_matches_the_reference(impl, deterministic, soft, dtype, triton_device):
    """Bit-identical masks on every impl (and mixing_mask); outputs and gradients as the reference
    given that mask. Odd shapes, a 3-D ids, eligible, large and 0 seeds."""
    device = triton_device if impl == "triton" else "cpu"
    shape = (5, 3, 7)
    weight, ids, alt, probs, _, grad_out = _case(v=41, d=19, shape=shape, k=3 if soft else None,
                                                 dtype=dtype, device=device)
    eligible = torch.rand(shape, generator=torch.Generator().manual_seed(4)).to(device) < 0.8
    seeds = _row_seeds(shape[0], device)
    mask = mixing_mask(shape, beta=0.45, seed=seeds, eligible=eligible)
    assert mask.any() and not mask.all()
    embeds, grad = _weight_grad(weight, lambda w: gapfix.mix_embedding(
        w, ids, alt, alt_probs=probs, beta=0.45, seed=seeds, eligible=eligible, impl=impl,
        deterministic=deterministic)[0], grad_out)
    mixed = gapfix.mix_embedding(weight, ids, alt, alt_probs=probs, beta=0.45, seed=seeds,
                                 eligible=eligible, impl=impl)[1]
    assert torch.equal(mixed, mask)
    cpu_mask = mixing_mask(shape, beta=0.45, seed=seeds.cpu(), eligible=eligible.cpu())
    assert torch.equal(mask.cpu(), cpu_mask)  # the device does not change the draw
    reference = lambda dt: _weight_grad(  # noqa: E731
        weight.to(dt), lambda w: mix_embedding_reference(w, ids, alt, mask, probs), grad_out.to(dt))
    lowp, exact = reference(dtype), reference(torch.float64)
    if not soft:
        assert torch.equal(embeds, lowp[0])  # a gather: exact
    _assert_close_to_fp64(embeds, lowp[0], exact[0])
    _assert_close_to_fp64(grad, lowp[1], exact[1])


def test_row_seeds_in_the_triton_kernel_at_many_rows(triton_device):
    """Rows of one position and blocks spanning many rows: the kernel's row / counter split."""
    for shape in ((37, 1), (9, 31)):
        weight, ids, alt, _, _, _ = _case(v=7, d=3, shape=shape, device=triton_device)
        seeds = torch.randint(0, 2**63 - 1, (shape[0],), generator=torch.Generator().manual_seed(2))
        mixed = gapfix.mix_embedding(weight, ids, alt, beta=0.5, seed=seeds.to(triton_device),
                                     impl="triton")[1]
        assert torch.equal(mixed.cpu(), mixing_mask(shape, beta=0.5, seed=seeds))


def test_row_seeds_empty_rows_and_compile():
    weight, _, _, _, _, grad_out = _case(shape=(3, 8))
    empty = torch.zeros(3, 0, dtype=torch.long)
    embeds, mixed = gapfix.mix_embedding(weight, empty, empty, beta=0.5, seed=_row_seeds(3))
    assert embeds.shape == (3, 0, weight.shape[1]) and mixed.shape == (3, 0)
    none = torch.zeros(0, 4, dtype=torch.long)
    assert gapfix.mix_embedding(weight, none, none, beta=0.5, seed=_row_seeds(0))[1].shape == (0, 4)

    _, ids, alt, _, _, _ = _case(shape=(3, 8))
    seeds = _row_seeds(3)

    def step(w):
        return gapfix.mix_embedding(w, ids, alt, beta=0.5, seed=seeds)

    w = weight.clone().requires_grad_(True)
    embeds, mixed = torch.compile(step, backend="aot_eager", fullgraph=True)(w)
    (grad,) = torch.autograd.grad(embeds, w, grad_out)
    expected, expected_grad = _weight_grad(weight, lambda v: step(v)[0], grad_out)
    assert torch.equal(embeds, expected) and torch.equal(grad, expected_grad)
    assert torch.equal(mixed, mixing_mask(ids.shape, beta=0.5, seed=seeds))


@pytest.mark.parametrize("seed,match", [
    (torch.tensor([1, 2]), r"shape \(3,\)"),
    (torch.tensor([[1], [2], [3]]), "shape"),
    (torch.tensor(1), "shape"),
    (torch.tensor([1, 2, 3], dtype=torch.int32), "int64"),
    (torch.tensor([1.0, 2.0, 3.0]), "int64"),
    (torch.tensor([1, -2, 3]), r"\[0, 2\*\*63\)"),
])
def test_mixing_mask_refuses_bad_row_seeds(seed, match):
    with pytest.raises(ValueError, match=f"seed.*{match}"):
        mixing_mask((3, 4), beta=0.5, seed=seed)
    with pytest.raises(ValueError, match="seed.*eligible"):
        mixing_mask((3, 4), beta=0.5, seed=_row_seeds(3), eligible=torch.ones(3, 4, dtype=torch.bool,
                                                                               device="meta"))


def test_negative_row_seed_is_refused_before_anything_runs():
    weight, ids, alt, _, _, _ = _case()
    w = weight.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="seed"):
        gapfix.mix_embedding(w, ids, alt, beta=0.5, seed=torch.tensor([0, -1, 2]), check_ids=False)
    assert w.grad is None


@pytest.mark.cuda
def test_cuda_row_seeds_draw_the_cpu_mask_without_a_host_sync():
    weight, ids, alt, _, _, grad_out = _case(v=1000, d=64, shape=(8, 129))
    seeds = _row_seeds(8)
    cuda_args = (weight.cuda().requires_grad_(True), ids.cuda(), alt.cuda())
    cuda_seeds, cuda_grad = seeds.cuda(), grad_out.cuda()  # the copies sync: before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        embeds, mixed = gapfix.mix_embedding(*cuda_args, beta=0.3, seed=cuda_seeds)
        embeds.backward(cuda_grad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(mixed.cpu(), mixing_mask(ids.shape, beta=0.3, seed=seeds))
    assert torch.equal(embeds.detach().cpu(), F.embedding(torch.where(mixed.cpu(), alt, ids), weight))


# ---------------------------------------------------------------------------- explicit mask

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["torch_fast", "torch", "triton"])
def test_explicit_mask_equals_where_embedding(impl, dtype, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    # vocab larger than positions and a fixed permutation: no duplicate rows, so sums are exact
    v, shape = 61, (3, 7)
    weight, _, _, _, mask, grad_out = _case(v=v, shape=shape, dtype=dtype, device=device)
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(1)).to(device)
    ids, alt = perm[:21].view(shape), perm[21:42].view(shape)
    expected, expected_grad = _weight_grad(
        weight, lambda w: F.embedding(torch.where(mask, alt, ids), w), grad_out)
    embeds, grad = _weight_grad(
        weight, lambda w: gapfix.mix_embedding(w, ids, alt, mask=mask, impl=impl)[0], grad_out)
    mixed = gapfix.mix_embedding(weight, ids, alt, mask=mask, impl=impl)[1]
    assert embeds.dtype == dtype and grad.dtype == dtype
    assert torch.equal(mixed, mask)
    assert torch.equal(embeds, expected)
    assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backward_is_f_embedding_backward_with_duplicates(dtype):
    weight, ids, alt, _, mask, grad_out = _case(v=5, d=9, shape=(5, 11), dtype=dtype)
    _, grad = _weight_grad(weight, lambda w: gapfix.mix_embedding(w, ids, alt, mask=mask)[0], grad_out)
    _, expected = _weight_grad(weight, lambda w: F.embedding(torch.where(mask, alt, ids), w), grad_out)
    assert torch.equal(grad, expected)


def test_explicit_mask_leaves_the_global_generator_alone():
    weight, ids, alt, _, mask, _ = _case()
    state = torch.get_rng_state()
    gapfix.mix_embedding(weight, ids, alt, mask=mask)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl,deterministic", [("torch_fast", False), ("triton", False), ("triton", True)])
def test_duplicates_summed_in_backward(impl, deterministic, dtype, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    weight, ids, alt, _, mask, grad_out = _case(v=5, d=9, shape=(5, 11), dtype=dtype, device=device)
    ids[:2] = 2  # a row hit by more positions than the sorted kernel's CHUNK (16)
    rows = torch.where(mask, alt, ids)
    assert torch.bincount(rows.reshape(-1)).max() > 16
    _, grad = _weight_grad(weight, lambda w: gapfix.mix_embedding(
        w, ids, alt, mask=mask, impl=impl, deterministic=deterministic)[0], grad_out)
    grad64 = torch.zeros(5, 9, dtype=torch.float64, device=device).index_add_(
        0, rows.reshape(-1), grad_out.reshape(-1, 9).double())
    _, grad_lowp = _weight_grad(weight, lambda w: F.embedding(rows, w), grad_out)
    _assert_close_to_fp64(grad, grad_lowp, grad64)


@pytest.mark.parametrize("impl,deterministic",
                         [("torch_fast", False), ("torch", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("padding_idx", [3, -2])
def test_padding_idx_rows_get_no_gradient(impl, deterministic, padding_idx, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    weight, ids, alt, _, mask, grad_out = _case(v=7, shape=(5, 6), device=device)
    ids[:, 0], alt[:, 1] = 3, 5  # both as reference and as alternative
    mask[:, 1] = True
    pad = padding_idx % 7
    embeds, grad = _weight_grad(weight, lambda w: gapfix.mix_embedding(
        w, ids, alt, mask=mask, padding_idx=padding_idx, impl=impl, deterministic=deterministic)[0],
        grad_out)
    expected, expected_grad = _weight_grad(
        weight, lambda w: F.embedding(torch.where(mask, alt, ids), w, padding_idx=pad), grad_out)
    assert torch.equal(embeds, expected)  # the padding row is still read in the forward
    assert not grad[pad].any()
    torch.testing.assert_close(grad, expected_grad)


def test_deterministic_backward_is_bitwise_repeatable(triton_device):
    weight, ids, alt, _, mask, grad_out = _case(v=4, d=33, shape=(6, 9), device=triton_device)
    grads = [_weight_grad(weight, lambda w: gapfix.mix_embedding(
        w, ids, alt, mask=mask, impl="triton", deterministic=True)[0], grad_out)[1] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])
    _, cpu_grad = _weight_grad(weight.cpu(), lambda w: gapfix.mix_embedding(
        w, ids.cpu(), alt.cpu(), mask=mask.cpu(), impl="torch_fast")[0], grad_out.cpu())
    torch.testing.assert_close(grads[0].cpu(), cpu_grad)


# ---------------------------------------------------------------------------- soft mode

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl,deterministic",
                         [("torch_fast", False), ("torch", False), ("triton", False), ("triton", True)])
def test_soft_mode_against_fp64_reference(impl, deterministic, dtype, triton_device):
    device = triton_device if impl == "triton" else "cpu"
    weight, ids, alt, probs, _, grad_out = _case(v=23, d=17, shape=(3, 5), k=3, dtype=dtype,
                                                 device=device)
    probs = probs.requires_grad_(True)
    eligible = torch.ones_like(ids, dtype=torch.bool)
    eligible[:, 0] = False
    w = weight.detach().clone().requires_grad_(True)
    embeds, mixed = gapfix.mix_embedding(w, ids, alt, alt_probs=probs, beta=0.6, seed=11,
                                         eligible=eligible, impl=impl, deterministic=deterministic,
                                         padding_idx=4)
    grad_w, grad_p = torch.autograd.grad(embeds, (w, probs), grad_out)
    assert mixed.any() and not mixed.all() and not mixed[:, 0].any()

    def reference(dt):
        w_ref = weight.detach().to(dt).requires_grad_(True)
        p_ref = probs.detach().to(dt if dt == torch.float64 else probs.dtype).requires_grad_(True)
        out = mix_embedding_reference(w_ref, ids, alt, mixed, p_ref, padding_idx=4)
        return (out, *torch.autograd.grad(out, (w_ref, p_ref), grad_out.to(dt)))

    ref64, lowp = reference(torch.float64), reference(dtype)
    for ours, low, exact in zip((embeds, grad_w, grad_p), lowp, ref64):
        _assert_close_to_fp64(ours.detach(), low.detach(), exact)
    assert not grad_w[4].any()
    assert not grad_p[~mixed].any()


def test_soft_mode_one_hot_equals_hard_mode():
    weight, ids, alt, _, mask, _ = _case(shape=(4, 6))
    alt_k = torch.stack([alt, ids], -1)
    probs = torch.tensor([1.0, 0.0]).expand(4, 6, 2)
    soft = gapfix.mix_embedding(weight, ids, alt_k, alt_probs=probs, mask=mask)[0]
    hard = gapfix.mix_embedding(weight, ids, alt, mask=mask)[0]
    assert torch.equal(soft, hard)


# ---------------------------------------------------------------------------- tracing

@pytest.mark.parametrize("backend", ["torch_fast", "triton"])
def test_custom_ops_pass_opcheck(backend, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    weight, ids, alt, probs, mask, grad_out = _case(v=13, d=5, shape=(2, 7), k=2, device=device)
    for alt_ids, alt_probs in ((alt[..., 0].contiguous(), None), (alt, probs)):
        for row_seeds in (None, torch.tensor([5, 2**62 + 1], device=device)):
            args = (weight.requires_grad_(True), ids, alt_ids, alt_probs, None, mask, mixing_threshold(0.5),
                    9, row_seeds, -1, False, backend)
            torch.library.opcheck(torch.ops.gapfix.mix_embedding.default, args)
            mixed = torch.ops.gapfix.mix_embedding(*args)[1]
            expected = mixing_mask(ids.shape, beta=0.5, seed=9 if row_seeds is None else row_seeds,
                                   eligible=mask)
            assert torch.equal(mixed, expected)
            torch.library.opcheck(torch.ops.gapfix.mix_embedding_backward.default,
                                  (grad_out, ids, alt_ids, alt_probs, mixed, 13, 2, True, backend))


def test_traces_under_torch_compile():
    weight, ids, alt, _, mask, grad_out = _case(shape=(3, 8))

    def step(w):
        embeds, mixed = gapfix.mix_embedding(w, ids, alt, beta=0.5, seed=5)
        return embeds, mixed

    w = weight.clone().requires_grad_(True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    embeds, mixed = compiled(w)
    (grad,) = torch.autograd.grad(embeds, w, grad_out)
    expected, expected_grad = _weight_grad(weight, lambda v: step(v)[0], grad_out)
    assert torch.equal(embeds, expected) and torch.equal(grad, expected_grad)
    assert torch.equal(mixed, mixing_mask(ids.shape, beta=0.5, seed=5))


def test_int32_ids_and_empty_input():
    weight, ids, alt, _, mask, _ = _case()
    a = gapfix.mix_embedding(weight, ids.int(), alt, mask=mask)[0]
    assert torch.equal(a, gapfix.mix_embedding(weight, ids, alt, mask=mask)[0])
    empty = torch.zeros(2, 0, dtype=torch.long)
    embeds, mixed = gapfix.mix_embedding(weight, empty, empty, beta=0.5, seed=0)
    assert embeds.shape == (2, 0, weight.shape[1]) and mixed.shape == (2, 0)


# ---------------------------------------------------------------------------- bad input

def _bad_cases():
    weight, ids, alt, probs, mask, _ = _case(k=None)
    _, _, alt_k, probs_k, _, _ = _case(k=3)
    ok = dict(beta=0.5, seed=0)
    return [
        ("beta", (weight, ids, alt), dict(beta=1.5, seed=0)),
        ("beta", (weight, ids, alt), dict(beta=-0.1, seed=0)),
        ("beta", (weight, ids, alt), dict(beta=float("nan"), seed=0)),
        ("beta", (weight, ids, alt), {}),
        ("beta", (weight, ids, alt), dict(beta=0.5, mask=mask)),
        ("seed", (weight, ids, alt), dict(beta=0.5, seed=-1)),
        ("seed", (weight, ids, alt), dict(beta=0.5, seed=1.5)),
        ("seed", (weight, ids, alt), dict(beta=0.5, seed=torch.tensor([0, 1]))),
        ("seed", (weight, ids, alt), dict(beta=0.5, seed=torch.zeros(3, 7, dtype=torch.long))),
        ("seed", (weight, ids, alt), dict(beta=0.5, seed=torch.tensor(5))),
        ("seed", (weight, ids, alt), dict(beta=0.5, seed=torch.tensor([0, 1, 2], dtype=torch.int32))),
        ("seed", (weight, ids, alt), dict(beta=0.5, seed=torch.tensor([0.0, 1.0, 2.0]))),
        ("seed", (weight, ids, alt), dict(beta=0.5, seed=torch.tensor([0, -1, 2]))),
        ("seed", (weight, ids, alt), dict(beta=0.5, seed=torch.tensor([0, 1, 2], device="meta"))),
        ("seed", (weight, ids[0, 0], alt[0, 0]), dict(beta=0.5, seed=torch.tensor([0]))),
        ("ids", (weight, ids - 1 - ids.max(), alt), ok),
        ("ids", (weight, ids + weight.shape[0], alt), ok),
        ("alt_ids", (weight, ids, alt.clone().fill_(-3)), ok),
        ("alt_ids", (weight, ids, alt + weight.shape[0]), ok),
        ("ids", (weight, ids.float(), alt), ok),
        ("alt_ids", (weight, ids, alt[:, :5]), ok),
        ("weight", (weight[0], ids, alt), ok),
        ("weight", (weight.long(), ids, alt), ok),
        ("mask", (weight, ids, alt), dict(mask=mask[:, :3])),
        ("mask", (weight, ids, alt), dict(mask=mask.long())),
        ("eligible", (weight, ids, alt), dict(eligible=mask[:2], **ok)),
        ("alt_probs", (weight, ids, alt_k), ok),
        ("alt_probs", (weight, ids, alt_k), dict(alt_probs=probs_k[..., :2], **ok)),
        ("alt_probs", (weight, ids, alt), dict(alt_probs=probs_k, **ok)),
        ("alt_probs", (weight, ids, alt_k), dict(alt_probs=alt_k, **ok)),
        ("padding_idx", (weight, ids, alt), dict(padding_idx=weight.shape[0], **ok)),
        ("impl", (weight, ids, alt), dict(impl="cuda", **ok)),
        ("ids", (weight, ids.to("meta"), alt), ok),
    ]


@pytest.mark.parametrize("name,args,kwargs", _bad_cases(),
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_cases())])
def test_bad_input_raises_value_error_naming_argument(name, args, kwargs):
    snapshot = [a.clone() if a.device.type != "meta" else a for a in args]
    with pytest.raises(ValueError, match=name):
        gapfix.mix_embedding(*args, **kwargs)
    for before, after in zip(snapshot, args):
        if after.device.type != "meta":
            assert torch.equal(before, after)


# ---------------------------------------------------------------------------- GPU

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # few variants: each one compiles
def test_cuda_matches_cpu(dtype):
    """The GPU draws the CPU's mask; its outputs and gradients are as close to fp64 as PyTorch's."""
    weight, ids, alt, probs, _, grad_out = _case(v=1000, d=300, shape=(8, 257), k=4, dtype=dtype)
    mixed = mixing_mask(ids.shape, beta=0.3, seed=9)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    for alt_ids, alt_probs in ((alt[..., 0], None), (alt, probs)):
        reference = lambda w: mix_embedding_reference(w, ids, alt_ids, mixed, alt_probs)  # noqa: E731
        exact = _weight_grad(weight.double(), reference, grad_out.double())
        lowp = _weight_grad(weight, reference, grad_out)
        for deterministic in (False, True):
            embeds, grad = _weight_grad(weight.cuda(), lambda w: gapfix.mix_embedding(
                w, cuda(ids), cuda(alt_ids), alt_probs=cuda(alt_probs), beta=0.3, seed=9,
                deterministic=deterministic)[0], grad_out.cuda())
            gpu_mixed = gapfix.mix_embedding(weight.cuda(), cuda(ids), cuda(alt_ids),
                                             alt_probs=cuda(alt_probs), beta=0.3, seed=9)[1]
            assert torch.equal(gpu_mixed.cpu(), mixed)
            if alt_probs is None:
                assert torch.equal(embeds.cpu(), lowp[0])
            _assert_close_to_fp64(embeds.cpu(), lowp[0], exact[0])
            _assert_close_to_fp64(grad.cpu(), lowp[1], exact[1])


@pytest.mark.parametrize("impl", ["torch", "torch_fast", "triton"])
@pytest.mark.parametrize("name,args,kwargs", _bad_cases(),
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_cases())])
def test_every_impl_refuses_the_same_bad_input(name, args, kwargs, impl, triton_device):
    """Validation happens once, before the impl is chosen: the reference refuses what the
    fast paths refuse (an explicit impl in the case wins)."""
    if impl == "triton" and triton_device != "cpu":
        pytest.skip("the cases are CPU tensors")
    with pytest.raises(ValueError, match=name):
        gapfix.mix_embedding(*args, **{"impl": impl, **kwargs})


def test_triton_on_cpu_tensors_without_the_interpreter_is_a_value_error(monkeypatch):
    weight, ids, alt, _, _, _ = _case()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        gapfix.mix_embedding(weight, ids, alt, beta=0.5, seed=0, impl="triton")


def test_old_cpu_spelling_is_refused():
    weight, ids, alt, _, _, _ = _case()
    with pytest.raises(ValueError, match="torch_fast"):
        gapfix.mix_embedding(weight, ids, alt, beta=0.5, seed=0, impl="cpu")


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_never_writes_past_grad_weight(monkeypatch, triton_device, soft, deterministic):
    """An id outside [0, V) that escaped validation (check_ids=False) reads a NaN row in the
    forward; the backward must skip it, in the atomic and in the sorted kernel, and add
    exactly the other positions' gradients."""
    import gapfix.ops.mix_embedding as op

    v, d, guard = 9, 6, 4
    weight, ids, alt, probs, mask, grad_out = _case(v=v, d=d, shape=(3, 5), k=3 if soft else None,
                                                    device=triton_device)
    ids[0, 1], ids[2, 3] = v + 1, -3  # past the end, before the start
    mask[0, 1] = mask[2, 3] = False  # these positions read ids
    alt[1, 2], alt[2, 0] = v, -1  # the same through alt_ids, where mixed
    mask[1, 2] = mask[2, 0] = True
    # rows guard..guard+V of a larger zeroed buffer: a stray write lands in the guard rows
    buffers = []

    def padded_grad_weight(num_embeddings, dim, dtype, device):
        buffers.append(torch.zeros(num_embeddings + 2 * guard, dim, dtype=dtype, device=device))
        return buffers[-1][guard:guard + num_embeddings]

    monkeypatch.setattr(op, "_new_grad_weight", padded_grad_weight)
    w = weight.clone().requires_grad_(True)
    embeds, mixed = gapfix.mix_embedding(w, ids, alt, mask=mask, alt_probs=probs, check_ids=False,
                                         impl="triton", deterministic=deterministic)
    assert embeds[0, 1].isnan().all() and embeds[2, 3].isnan().all()
    embeds.backward(grad_out)
    assert len(buffers) == 1
    assert not buffers[0][:guard].any() and not buffers[0][guard + v:].any()
    # expected: every valid (row, coefficient) entry, in fp64
    g = grad_out.reshape(-1, d).double()
    rows, coef = (torch.where(mixed, alt, ids), None) if not soft else (
        torch.where(mixed[..., None], alt, ids[..., None]),
        torch.where(mixed[..., None], probs.double(), torch.tensor([1.0, 0, 0], dtype=torch.float64,
                                                                    device=triton_device)))
    k = 1 if not soft else rows.shape[-1]
    rows = rows.reshape(-1)
    src = g.repeat_interleave(k, 0) * (1.0 if coef is None else coef.reshape(-1, 1))
    valid = (rows >= 0) & (rows < v)
    want = torch.zeros(v, d, dtype=torch.float64, device=triton_device).index_add_(0, rows[valid], src[valid])
    torch.testing.assert_close(w.grad.double(), want, rtol=1e-5, atol=1e-5)


try:
    import triton
    import triton.language as tl

    from gapfix.kernels.mix_embedding import _soft_index

    @triton.jit
    def _soft_indices_kernel(out_ptr, first, K: tl.constexpr, BLOCK: tl.constexpr):
        offs_n = first + tl.arange(0, BLOCK)  # int32, as in the kernels
        for k in tl.static_range(K):
            tl.store(out_ptr + tl.arange(0, BLOCK) * K + k, _soft_index(offs_n, K, k))
except ImportError:
    _soft_indices_kernel = None


def test_soft_index_is_int64_past_2_to_the_31(triton_device):
    """The (N, K) alt_ids / alt_probs are indexed n * K + k; n is a program id
    times BLOCK_N plus a lane (int32), and N * K may pass 2**31 (a 2**31-element tensor is too
    big for a test: the index helper runs on positions near 2**30 instead)."""
    first, k, block = 2**30 + 5, 4, 8
    out = torch.zeros(block * k, dtype=torch.int64, device=triton_device)
    _soft_indices_kernel[(1,)](out, first, K=k, BLOCK=block)
    want = (first + torch.arange(block))[:, None] * k + torch.arange(k)
    assert int(want.max()) > 2**32
    assert torch.equal(out.cpu(), want.reshape(-1))


_LOWER_SOFT_SM90 = r'''
import re
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(77)
from gapfix.kernels import mix_embedding as M

common = {"weight_ptr": "*bf16", "ids_ptr": "*i64", "alt_ptr": "*i64", "probs_ptr": "*fp32"}
kernels = (
    (M.mix_embedding_fwd_kernel, dict(common, mask_ptr="*u8", eligible_ptr="*u8", out_ptr="*bf16",
                                      mixed_ptr="*u8", seeds_ptr="*i64", N="i32", D="i32", V="i32",
                                      threshold="i64", seed="i64", ROW_LEN="i32"),
     dict(K=4, SOFT=True, HAS_MASK=True, HAS_ELIGIBLE=False, ROW_SEEDS=False, BLOCK_N=8, BLOCK_D=512)),
    (M.mix_embedding_bwd_atomic_kernel, dict(grad_ptr="*bf16", ids_ptr="*i64", alt_ptr="*i64",
                                             probs_ptr="*fp32", mixed_ptr="*u8", grad_weight_ptr="*bf16",
                                             N="i32", D="i32", V="i32", padding_idx="i32"),
     dict(K=4, SOFT=True, BLOCK_N=8, BLOCK_D=512)),
)
for fn, sig, constexprs in kernels:
    sig = {p.name: sig[p.name] if p.name in sig else "constexpr" for p in fn.params}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" in str(exc):
            sys.exit(77)
        raise
    # probs_ptr is the kernels' only fp32 pointer: every offset added to it must be 64-bit
    adds = re.findall(r"tt\.addptr .*: tensor<\d+x!tt\.ptr<f32>>, tensor<\d+x(i\d+)>", compiled.asm["ttir"])
    assert adds and set(adds) == {"i64"}, (fn.__name__, adds)
print("ok")
'''


@pytest.mark.slow
def test_soft_kernels_index_alt_ids_in_int64_when_lowered_for_sm90():
    """The soft forward and atomic backward, lowered for an H100: the alt_probs loads take
    int64 offsets (the TTIR of the real kernels, not only the helper)."""
    from sm90_lowering import run_lowering_script

    assert run_lowering_script(_LOWER_SOFT_SM90).strip().endswith("ok")
