"""gapfix.cross_entropy / gapfix.linear_cross_entropy against an fp64 PyTorch reference.

Tolerance scheme (as Cut Cross-Entropy's tests): the fast path and PyTorch in the
same dtype are both compared with the fp64 reference; the fast path may be off by
at most a small multiple of PyTorch's own error in that dtype (plus a floor of a
few fp32 ulps, since the losses are accumulated in fp32).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import gapfix
from gapfix.ops.cross_entropy import (
    cross_entropy_reference,
    linear_cross_entropy_reference,
)

FACTOR = 3.0


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def assert_like_torch(fast, torch_same_dtype, ref64, what):
    """|fast - fp64| <= FACTOR * |torch in the same dtype - fp64| + floor."""
    assert torch.isfinite(fast).all(), f"{what}: non-finite values"
    floor = 8 * torch.finfo(torch.float32).eps * max(1.0, ref64.abs().max().item())
    err, base = _err(fast, ref64), _err(torch_same_dtype, ref64)
    assert err <= FACTOR * base + floor, f"{what}: error {err:.3e} vs PyTorch's own {base:.3e} (floor {floor:.1e})"


def _make_targets(gen, lead, vocab, kind, ignore_frac=0.2):
    n = math.prod(lead)
    if kind == "hard":
        ids = torch.randint(0, vocab, (n,), generator=gen)
        ids[torch.rand(n, generator=gen) < ignore_frac] = -100
        return ids.reshape(lead)
    k = 3
    ids = torch.randint(0, vocab, (n, k), generator=gen)
    ids[torch.rand(n, k, generator=gen) < 0.3] = -100  # some slots unused
    ids[torch.rand(n, generator=gen) < ignore_frac] = -100  # some rows ignored
    weights = torch.rand(n, k, generator=gen)
    weights = weights / weights.sum(-1, keepdim=True)
    return ids.reshape(*lead, k), weights.reshape(*lead, k)


def _to64(target):
    return target if isinstance(target, torch.Tensor) else (target[0], target[1].double())


def _linear_case(dtype, lead=(3, 423), hdim=32, vocab=501, bias=True, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    hidden = (torch.randn(*lead, hdim, generator=gen) * scale).to(dtype)
    weight = (torch.randn(vocab, hdim, generator=gen) / math.sqrt(hdim) * 2).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    grad_none = torch.randn(lead, generator=gen)
    token_weight = torch.rand(lead, generator=gen) * 2
    return hidden, weight, b, grad_none, token_weight, gen, n


def _run_linear(hidden, weight, bias, target, grad_out, fn, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = fn(leaves[0], leaves[1], target, bias=leaves[2] if bias is not None else None, **kw)
    g = grad_out.to(loss.device, loss.dtype) if loss.dim() else torch.tensor(1.7, dtype=loss.dtype,
                                                                               device=loss.device)
    grads = torch.autograd.grad(loss, leaves, g)
    return (loss.detach(),) + tuple(grads)


def _reference_fn(hidden, weight, target, bias=None, **kw):
    kw.pop("impl", None), kw.pop("chunk_size", None)
    return linear_cross_entropy_reference(hidden, weight, target, bias=bias, **kw)[0]


def _check_linear(dtype, target_kind, options, reduction, impl, lead=(3, 423), hdim=32, vocab=501,
                  chunk_size=97, seed=0):
    hidden, weight, bias, grad_none, token_weight, gen, n = _linear_case(dtype, lead, hdim, vocab, seed=seed)
    target = _make_targets(gen, lead, vocab, target_kind)
    kw = dict(options, reduction=reduction)
    if kw.pop("token_weight", False):
        kw["token_weight"] = token_weight
    fast = _run_linear(hidden, weight, bias, target, grad_none, gapfix.linear_cross_entropy, impl=impl,
                       chunk_size=chunk_size, **kw)
    same = _run_linear(hidden, weight, bias, target, grad_none, _reference_fn, **kw)
    kw64 = dict(kw)
    if "token_weight" in kw64:
        kw64["token_weight"] = kw64["token_weight"].double()
    ref = _run_linear(hidden.double(), weight.double(), bias.double(), _to64(target), grad_none, _reference_fn,
                      **kw64)
    for name, f, s, r in zip(("loss", "dhidden", "dweight", "dbias"), fast, same, ref):
        assert f.shape == r.shape and f.dtype == (s.dtype if name != "loss" else torch.float32), name
        assert_like_torch(f, s, r, f"{name} ({dtype}, {target_kind}, {options}, {reduction})")


OPTION_CASES = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 3.0},
    {"token_weight": True},
    {"label_smoothing": 0.05, "z_loss": 1e-2, "softcap": 5.0, "token_weight": True},
    {"num_tokens": 1000},
]


# ---------------------------------------------------------------- the oracle itself


def test_reference_matches_pytorch_hard_targets():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 37, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 37, (50,), generator=gen)
    target[::7] = -100
    for reduction in ("mean", "sum", "none"):
        for eps in (0.0, 0.2):
            ours, _ = cross_entropy_reference(logits, target, label_smoothing=eps, reduction=reduction)
            theirs = F.cross_entropy(logits, target, label_smoothing=eps, reduction=reduction)
            torch.testing.assert_close(ours, theirs)


def test_reference_matches_pytorch_soft_targets_and_z_loss():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 29, generator=gen, dtype=torch.float64)
    ids, weights = _make_targets(gen, (40,), 29, "soft", ignore_frac=0.0)
    weights = weights.double()
    dense = torch.zeros_like(logits).scatter_add_(1, ids.clamp_min(0), torch.where(ids >= 0, weights, 0))
    lse = torch.logsumexp(logits, -1)
    expected = F.cross_entropy(logits, dense, reduction="none") + 0.01 * lse ** 2
    expected = torch.where((ids >= 0).any(-1), expected, 0.0)  # a row with every slot unused is ignored
    ours, _ = cross_entropy_reference(logits, (ids, weights), z_loss=0.01, reduction="none")
    torch.testing.assert_close(ours, expected)


# ---------------------------------------------------------------- chunked (CPU) path


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: "-".join(o) or "plain")
def test_linear_cpu_fp32(options, reduction):
    if "num_tokens" in options and reduction != "mean":
        pytest.skip("num_tokens is the denominator of 'mean'")
    _check_linear(torch.float32, "hard", options, reduction, "torch_fast")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}],
                         ids=["plain", "all"])
def test_linear_cpu_soft_targets(options, reduction):
    _check_linear(torch.float32, "soft", options, reduction, "torch_fast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target_kind", ["hard", "soft"])
def test_linear_cpu_low_precision(dtype, target_kind):
    _check_linear(dtype, target_kind, {"z_loss": 1e-3, "softcap": 6.0}, "mean", "torch_fast", lead=(2, 61), hdim=32,
                  vocab=333)


def test_linear_cpu_single_chunk_and_one_row_chunks():
    for chunk_size in (1, 10_000):
        _check_linear(torch.float32, "hard", {"label_smoothing": 0.1}, "sum", "torch_fast", lead=(13,), hdim=8,
                      vocab=51, chunk_size=chunk_size)


def _logits_case(dtype, n=211, vocab=301, seed=3):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * 3).to(dtype)
    return logits, gen


def _run_ce(logits, target, grad_out, fn, **kw):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, target, **kw)
    g = grad_out.to(loss.device, loss.dtype) if loss.dim() else torch.tensor(0.6, dtype=loss.dtype,
                                                                               device=loss.device)
    return loss.detach(), torch.autograd.grad(loss, leaf, g)[0]


def _ref_ce(logits, target, **kw):
    kw.pop("impl", None), kw.pop("chunk_size", None)
    return cross_entropy_reference(logits, target, **kw)[0]


def _check_ce(dtype, target_kind, options, reduction, impl, n=211, vocab=301, neg_inf=False):
    logits, gen = _logits_case(dtype, n, vocab)
    target = _make_targets(gen, (n,), vocab, target_kind)
    if neg_inf:
        # a masked vocabulary: the last fifth of the classes at -inf, targets never there
        logits[:, -(vocab // 5):] = float("-inf")
        ids = target if isinstance(target, torch.Tensor) else target[0]
        ids[ids >= vocab - vocab // 5] = 0
    grad_none = torch.randn(n, generator=gen)
    kw = dict(options, reduction=reduction)
    if kw.pop("token_weight", False):
        kw["token_weight"] = torch.rand(n, generator=gen)
    fast = _run_ce(logits, target, grad_none, gapfix.cross_entropy, impl=impl, chunk_size=50, **kw)
    same = _run_ce(logits, target, grad_none, _ref_ce, **kw)
    kw64 = dict(kw)
    if "token_weight" in kw64:
        kw64["token_weight"] = kw64["token_weight"].double()
    ref = _run_ce(logits.double(), _to64(target), grad_none, _ref_ce, **kw64)
    for name, f, s, r in zip(("loss", "dlogits"), fast, same, ref):
        assert f.shape == r.shape, name
        assert_like_torch(f, s, r, f"{name} ({dtype}, {target_kind}, {options}, {reduction})")
    assert fast[1].dtype == dtype


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: "-".join(o) or "plain")
def test_ce_cpu_fp32(options, reduction):
    if "num_tokens" in options and reduction != "mean":
        pytest.skip("num_tokens is the denominator of 'mean'")
    _check_ce(torch.float32, "hard", options, reduction, "torch_fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target_kind", ["hard", "soft"])
def test_ce_cpu_dtypes_and_soft(dtype, target_kind):
    _check_ce(dtype, target_kind, {"label_smoothing": 0.1, "z_loss": 1e-3}, "none", "torch_fast")


@pytest.mark.parametrize("impl", ["torch_fast", "torch"])
def test_ce_logits_at_minus_inf(impl):
    _check_ce(torch.float32, "hard", {"z_loss": 1e-3}, "mean", impl, neg_inf=True)
    _check_ce(torch.float32, "soft", {"softcap": 4.0}, "none", impl, neg_inf=True)


def test_ce_matches_torch_functional():
    logits, gen = _logits_case(torch.float32)
    target = _make_targets(gen, (logits.shape[0],), logits.shape[1], "hard")
    for reduction in ("mean", "sum", "none"):
        ours = gapfix.cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction, impl="torch_fast")
        theirs = F.cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- contracts


@pytest.mark.parametrize("impl", ["torch_fast", "torch"])
@pytest.mark.parametrize("soft", [False, True])
def test_every_token_ignored_gives_zero_loss_and_zero_grads(impl, soft):
    hidden, weight, bias, _, _, _, n = _linear_case(torch.float32, (5, 7), 16, 50)
    target = torch.full((5, 7), -100)
    if soft:
        target = (torch.full((5, 7, 2), -100), torch.rand(5, 7, 2))
    for reduction in ("mean", "sum", "none"):
        loss, dx, dw, db = _run_linear(hidden, weight, bias, target, torch.randn(5, 7), gapfix.linear_cross_entropy,
                                       impl=impl, reduction=reduction, z_loss=1e-2, label_smoothing=0.1)
        for t in (loss, dx, dw, db):
            assert torch.equal(t, torch.zeros_like(t))


def test_ignored_rows_with_all_minus_inf_logits_stay_finite():
    logits, _ = _logits_case(torch.float32, n=6, vocab=20)
    logits[2] = float("-inf")
    target = torch.tensor([1, 2, -100, 3, 4, 5])
    for impl in ("torch_fast", "torch"):
        loss, grad = _run_ce(logits, target, torch.randn(6), gapfix.cross_entropy, impl=impl, z_loss=1e-2)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[2].abs().max() == 0


@pytest.mark.parametrize("impl", ["torch_fast", "torch"])
def test_num_tokens_makes_micro_batches_add_up(impl):
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float64, (64,), 12, 70, seed=5)
    target = _make_targets(gen, (64,), 70, "hard", ignore_frac=0.4)
    full = _run_linear(hidden, weight, bias, target, None, gapfix.linear_cross_entropy, impl=impl)
    count = int((target != -100).sum())
    parts = [
        _run_linear(hidden[s], weight, bias, target[s], None, gapfix.linear_cross_entropy, impl=impl,
                    num_tokens=torch.tensor(float(count)) if i else count)
        for i, s in enumerate((slice(0, 20), slice(20, 64)))
    ]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full[0])
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full[1])
    torch.testing.assert_close(parts[0][2] + parts[1][2], full[2])
    torch.testing.assert_close(parts[0][3] + parts[1][3], full[3])


@pytest.mark.parametrize("impl", ["torch_fast", "torch"])
def test_return_lse(impl):
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (4, 9), 16, 40)
    target = _make_targets(gen, (4, 9), 40, "hard")
    loss, lse = gapfix.linear_cross_entropy(hidden, weight, target, bias=bias, softcap=2.0, return_lse=True,
                                            reduction="none", impl=impl)
    logits = F.linear(hidden, weight, bias)
    torch.testing.assert_close(lse, torch.logsumexp(2.0 * torch.tanh(logits / 2.0), -1))
    assert loss.shape == lse.shape == (4, 9) and not lse.requires_grad
    # asking for the lse of every row (ignored ones too) changes no gradient
    for softcap in (None, 2.0):
        plain = _run_linear(hidden, weight, bias, target, None, gapfix.linear_cross_entropy, impl=impl,
                            softcap=softcap, label_smoothing=0.1)
        with_lse = _run_linear(hidden, weight, bias, target, None, lambda *a, **k: gapfix.linear_cross_entropy(
            *a, **k, return_lse=True)[0], impl=impl, softcap=softcap, label_smoothing=0.1)
        for a, b in zip(plain, with_lse):
            torch.testing.assert_close(a, b)


def test_modules():
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (3, 5), 8, 30)
    target = _make_targets(gen, (3, 5), 30, "hard")
    lin = gapfix.LinearCrossEntropyLoss(label_smoothing=0.1, reduction="sum")
    expected = gapfix.linear_cross_entropy(hidden, weight, target, bias=bias, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(lin(hidden, weight, target, bias), expected)
    ce = gapfix.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(ce(F.linear(hidden, weight, bias), target), expected, rtol=1e-5, atol=1e-4)
    assert "label_smoothing=0.1" in repr(lin)


def test_autocast_casts_the_projection_like_f_linear():
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (9,), 16, 40)
    target = _make_targets(gen, (9,), 40, "hard")
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = gapfix.linear_cross_entropy(hidden.bfloat16(), w, target, impl="torch_fast")
        theirs = F.cross_entropy(F.linear(hidden.bfloat16(), weight).float(), target)
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)
    ours.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_no_grad_skips_the_gradient_work():
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (6,), 8, 30)
    target = _make_targets(gen, (6,), 30, "hard")
    with torch.no_grad():
        loss = gapfix.linear_cross_entropy(hidden.requires_grad_(), weight, target, impl="torch_fast")
    assert not loss.requires_grad


def test_torch_compile_fullgraph_traces_the_cpu_path():
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (3, 11), 16, 45)
    target = _make_targets(gen, (3, 11), 45, "soft")

    def step(h, w, b):
        return gapfix.linear_cross_entropy(h, w, target, bias=b, z_loss=1e-3, impl="torch_fast", reduction="mean")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = _run_linear(hidden, weight, bias, target, None, lambda h, w, t, bias: step(h, w, bias))
    traced = _run_linear(hidden, weight, bias, target, None, lambda h, w, t, bias: compiled(h, w, bias))
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)


def test_custom_ops_pass_opcheck():
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (7,), 16, 40)
    ids = _make_targets(gen, (7,), 40, "hard").reshape(7, 1)
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), ids, None, None, None, 0.0,
            -100, 0.1, 1e-3, None, "mean", "torch_fast", 3, None, 0.0, True, True, True, False)
    torch.library.opcheck(torch.ops.gapfix.linear_cross_entropy_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---------------------------------------------------------------- bad input


def _good():
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (6,), 8, 30)
    return hidden, weight, bias, torch.randint(0, 30, (6,), generator=gen)


@pytest.mark.parametrize("change, word", [
    (lambda a: dict(a, hidden=a["hidden"].long()), "hidden"),
    (lambda a: dict(a, lm_weight=a["lm_weight"][:, :5]), "lm_weight"),
    (lambda a: dict(a, lm_weight=a["lm_weight"].double()), "lm_weight"),
    (lambda a: dict(a, lm_weight=a["lm_weight"].to("meta")), "lm_weight"),
    (lambda a: dict(a, bias=a["bias"][:4]), "bias"),
    (lambda a: dict(a, target=a["target"][:5]), "target"),
    (lambda a: dict(a, target=a["target"].float()), "target"),
    (lambda a: dict(a, target=a["target"].to("meta")), "target"),
    (lambda a: dict(a, target=torch.tensor([0, 1, 2, 30, 4, 5])), "target"),
    (lambda a: dict(a, target=torch.tensor([0, 1, -2, 3, 4, 5])), "target"),
    (lambda a: dict(a, target=(torch.zeros(6, 3, dtype=torch.long), torch.ones(6, 2))), "target"),
    (lambda a: dict(a, target=(torch.zeros(6, 2, dtype=torch.long), -torch.ones(6, 2))), "target"),
    (lambda a: dict(a, token_weight=-torch.ones(6)), "token_weight"),
    (lambda a: dict(a, token_weight=torch.ones(5)), "token_weight"),
    (lambda a: dict(a, reduction="avg"), "reduction"),
    (lambda a: dict(a, label_smoothing=1.5), "label_smoothing"),
    (lambda a: dict(a, z_loss=-1.0), "z_loss"),
    (lambda a: dict(a, softcap=0.0), "softcap"),
    (lambda a: dict(a, num_tokens=0), "num_tokens"),
    (lambda a: dict(a, num_tokens=5, reduction="sum"), "num_tokens"),
    (lambda a: dict(a, impl="cuda"), "impl"),
    (lambda a: dict(a, chunk_size=0), "chunk_size"),
    (lambda a: dict(a, chunk_size=-1), "chunk_size"),
    (lambda a: dict(a, num_tokens=float("inf")), "num_tokens"),
    (lambda a: dict(a, num_tokens=torch.tensor(0.0)), "num_tokens"),
    (lambda a: dict(a, num_tokens=torch.tensor(-5)), "num_tokens"),
    (lambda a: dict(a, num_tokens=torch.tensor([3.0, 3.0])), "num_tokens"),
    (lambda a: dict(a, num_tokens=torch.tensor(True)), "num_tokens"),
    (lambda a: dict(a, num_tokens=torch.tensor(6.0, requires_grad=True)), "num_tokens"),
    (lambda a: dict(a, num_tokens=torch.tensor(6.0, device="meta")), "num_tokens"),
])
@pytest.mark.parametrize("impl", ["torch_fast", "torch"])
def test_bad_input_raises_value_error_naming_the_argument(change, word, impl):
    hidden, weight, bias, target = _good()
    args = change(dict(hidden=hidden.requires_grad_(), lm_weight=weight, target=target, bias=bias))
    before = [t.clone() for t in (hidden, weight, bias)]
    args.setdefault("impl", impl)
    with pytest.raises(ValueError, match=word):
        gapfix.linear_cross_entropy(args.pop("hidden"), args.pop("lm_weight"), args.pop("target"), **args)
    for a, b in zip(before, (hidden, weight, bias)):
        assert torch.equal(a, b)
    assert hidden.grad is None


def test_bad_logits_input():
    with pytest.raises(ValueError, match="logits"):
        gapfix.cross_entropy(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        gapfix.cross_entropy(torch.zeros(3, 4), torch.tensor([0, 4, 1]))


@pytest.mark.parametrize("impl", ["torch_fast", "torch"])
@pytest.mark.parametrize("change, word", [
    (dict(impl="native"), "impl"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=-1), "chunk_size"),
    (dict(num_tokens=torch.tensor(0.0)), "num_tokens"),
    (dict(num_tokens=torch.tensor(-5.0)), "num_tokens"),
    (dict(target=torch.tensor([0, 1, 2, 30, 4, 5])), "target"),
    (dict(target=(torch.zeros(6, 2, dtype=torch.long), -torch.ones(6, 2))), "target"),
    (dict(token_weight=-torch.ones(6)), "token_weight"),
])
def test_bad_logits_options_raise_for_every_impl(impl, change, word):
    # impl="torch" validates like the fast path; chunk_size <= 0 and a count num_tokens <= 0
    # are refused (a zero count would give inf, a negative one a negative loss)
    logits = torch.randn(6, 30, requires_grad=True)
    args = dict(target=torch.randint(0, 30, (6,)), impl=impl)
    args.update(change)
    with pytest.raises(ValueError, match=word):
        gapfix.cross_entropy(logits, args.pop("target"), **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("impl", ["torch_fast", "torch"])
def test_num_tokens_tensor_in_every_dtype(impl, dtype):
    # num_tokens as a tensor in any floating dtype gives the loss of the same count as a number
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (2, 9), 8, 30)
    target = _make_targets(gen, (2, 9), 30, "hard")
    by_number = _run_linear(hidden, weight, bias, target, None, gapfix.linear_cross_entropy, impl=impl,
                            num_tokens=40)
    by_tensor = _run_linear(hidden, weight, bias, target, None, gapfix.linear_cross_entropy, impl=impl,
                            num_tokens=torch.tensor([40], dtype=dtype))
    for a, b in zip(by_number, by_tensor):
        torch.testing.assert_close(a, b)
    logits = F.linear(hidden, weight, bias)
    by_number = _run_ce(logits, target, None, gapfix.cross_entropy, impl=impl, num_tokens=40)
    by_tensor = _run_ce(logits, target, None, gapfix.cross_entropy, impl=impl,
                        num_tokens=torch.tensor(40, dtype=dtype))
    for a, b in zip(by_number, by_tensor):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_num_tokens_tensor_triton(triton_device, dtype):
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (11,), 16, 40)
    hidden, weight, bias = hidden.to(triton_device), weight.to(triton_device), bias.to(triton_device)
    target = _make_targets(gen, (11,), 40, "hard").to(triton_device)
    by_number = _run_linear(hidden, weight, bias, target, None, gapfix.linear_cross_entropy, impl="triton",
                            num_tokens=20)
    by_tensor = _run_linear(hidden, weight, bias, target, None, gapfix.linear_cross_entropy, impl="triton",
                            num_tokens=torch.tensor(20, dtype=dtype, device=triton_device))
    for a, b in zip(by_number, by_tensor):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", ["torch_fast", "torch"])
def test_invalid_values_give_nan_where_they_cannot_be_read(monkeypatch, impl):
    # on a GPU (and in a trace) a check would be a host sync: a count <= 0 or an
    # out-of-range id makes the loss NaN instead, on every impl alike; here the CPU takes
    # the device route by pretending to trace
    from gapfix.ops.cross_entropy import validation

    monkeypatch.setattr(validation, "tracing", lambda: True)
    logits = torch.randn(6, 30)
    good = torch.tensor([0, 1, 2, 3, 4, 5])
    assert torch.isnan(gapfix.cross_entropy(logits, good, num_tokens=torch.tensor(0.0), impl=impl))
    assert torch.isnan(gapfix.cross_entropy(logits, good, num_tokens=torch.tensor(-5), impl=impl))
    loss = gapfix.cross_entropy(logits, torch.tensor([0, 1, 2, 30, 4, 5]), reduction="none", impl=impl)
    assert torch.isnan(loss[3]) and torch.isfinite(loss[[0, 1, 2, 4, 5]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_order_gradients_are_refused_not_zero(dtype, reduction):
    # create_graph=True through the fast path is refused, never a silent second-order gradient of 0
    logits = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 7, (5,))
    ref = F.cross_entropy(logits.float(), target, reduction=reduction).sum()
    (g_ref,) = torch.autograd.grad(ref, logits, create_graph=True)
    assert g_ref.pow(2).sum().requires_grad  # the reference is differentiable twice
    loss = gapfix.cross_entropy(logits, target, impl="torch", reduction=reduction).sum()
    (g,) = torch.autograd.grad(loss, logits, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), logits)
    assert gg.abs().sum() > 0
    hidden = torch.randn(5, 4, dtype=dtype, requires_grad=True)
    weight = torch.randn(7, 4, dtype=dtype, requires_grad=True)
    fast = dict(impl="torch_fast", reduction=reduction)
    for fn, leaf in ((lambda: gapfix.cross_entropy(logits, target, **fast), logits),
                     (lambda: gapfix.linear_cross_entropy(hidden, weight, target, **fast), hidden)):
        with pytest.raises(NotImplementedError, match="create_graph"):
            torch.autograd.grad(fn().sum(), leaf, create_graph=True)
        (first,) = torch.autograd.grad(fn().sum(), leaf)  # first order: unchanged
        assert torch.isfinite(first).all()


def _weight_grads(fn, inputs, ids, soft_w, token_weight, grad_none, **kw):
    soft_w, token_weight = soft_w.detach().clone().requires_grad_(), token_weight.detach().clone().requires_grad_()
    loss = fn(*inputs, (ids, soft_w), token_weight=token_weight, **kw)
    g = grad_none.to(loss.device, loss.dtype) if loss.dim() else torch.tensor(1.7, dtype=loss.dtype, device=loss.device)
    return (loss.detach(),) + torch.autograd.grad(loss, (soft_w, token_weight), g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}],
                         ids=["plain", "all"])
def test_target_and_token_weight_gradients_match_the_reference(dtype, reduction, options):
    # soft-target weights and token_weight that require grad get the reference's gradient on
    # the fast path, in the linear and the logits forms
    hidden, weight, bias, grad_none, token_weight, gen, n = _linear_case(dtype, (3, 17), 16, 50)
    ids, soft_w = _make_targets(gen, (3, 17), 50, "soft")
    kw = dict(options, reduction=reduction)
    lin = (hidden, weight)
    fast = _weight_grads(gapfix.linear_cross_entropy, lin, ids, soft_w, token_weight, grad_none, bias=bias,
                         impl="torch_fast", **kw)
    same = _weight_grads(_reference_fn, lin, ids, soft_w, token_weight, grad_none, bias=bias, **kw)
    ref = _weight_grads(_reference_fn, (hidden.double(), weight.double()), ids, soft_w.double(),
                        token_weight.double(), grad_none, bias=bias.double(), **kw)
    for name, f, s, r in zip(("loss", "d target weights", "d token_weight"), fast, same, ref):
        assert f.grad_fn is None and f.shape == r.shape
        assert_like_torch(f, s, r, f"linear {name} ({dtype}, {options}, {reduction})")
    logits = F.linear(hidden, weight, bias)
    fast = _weight_grads(gapfix.cross_entropy, (logits,), ids, soft_w, token_weight, grad_none, impl="torch_fast",
                         **kw)
    same = _weight_grads(_ref_ce, (logits,), ids, soft_w, token_weight, grad_none, **kw)
    ref = _weight_grads(_ref_ce, (logits.double(),), ids, soft_w.double(), token_weight.double(), grad_none, **kw)
    for name, f, s, r in zip(("loss", "d target weights", "d token_weight"), fast, same, ref):
        assert_like_torch(f, s, r, f"logits {name} ({dtype}, {options}, {reduction})")


def test_target_and_token_weight_gradients_triton(triton_device):
    hidden, weight, bias, grad_none, token_weight, gen, n = _linear_case(torch.float32, (19,), 16, 40)
    ids, soft_w = _make_targets(gen, (19,), 40, "soft")
    dev = triton_device
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction="mean")
    fast = _weight_grads(gapfix.linear_cross_entropy, (hidden.to(dev), weight.to(dev)), ids.to(dev), soft_w.to(dev),
                         token_weight.to(dev), grad_none.to(dev), bias=bias.to(dev), impl="triton", **kw)
    ref = _weight_grads(_reference_fn, (hidden, weight), ids, soft_w, token_weight, grad_none, bias=bias, **kw)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f.cpu(), r, rtol=1e-4, atol=1e-5)


def test_deprecated_impl_spellings_run_the_chunked_path():
    # docs/ops.md: "cpu" and "chunked" are the old names of "torch_fast"
    hidden, weight, bias, target = _good()
    expected = gapfix.linear_cross_entropy(hidden, weight, target, bias=bias, impl="torch_fast")
    for old in ("cpu", "chunked"):
        torch.testing.assert_close(gapfix.linear_cross_entropy(hidden, weight, target, bias=bias, impl=old), expected,
                                   rtol=0, atol=0)


def test_triton_impl_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, bias, target = _good()
    with pytest.raises(ValueError, match="impl"):
        gapfix.linear_cross_entropy(hidden, weight, target, impl="triton")


# ---------------------------------------------------------------- Triton (interpreter on CPU; few, tiny)


@pytest.mark.parametrize("dtype, target_kind, options, reduction", [
    (torch.float32, "hard", {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0, "token_weight": True}, "mean"),
    (torch.float32, "soft", {}, "none"),
    (torch.bfloat16, "hard", {}, "sum"),
    (torch.float16, "soft", {"z_loss": 1e-3}, "mean"),
])
def test_linear_triton(triton_device, dtype, target_kind, options, reduction):
    if triton_device != "cpu":
        pytest.skip("covered at larger shapes by the cuda tests")
    _check_linear(dtype, target_kind, options, reduction, "triton", lead=(37,), hdim=24, vocab=77)


def test_linear_triton_half_precision_weight_accumulator(triton_device):
    # grad_weight_dtype: dW accumulated atomically in fp16 (bf16 needs a GPU: no bf16 atomics
    # in the interpreter); the loss is unchanged and dW is within fp16 rounding of fp32's
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (21,), 16, 40)
    hidden, weight = hidden.to(triton_device), weight.to(triton_device)
    target = _make_targets(gen, (21,), 40, "hard").to(triton_device)
    exact = _run_linear(hidden, weight, None, target, None, gapfix.linear_cross_entropy, impl="triton")
    half = _run_linear(hidden, weight, None, target, None, gapfix.linear_cross_entropy, impl="triton",
                       grad_weight_dtype=torch.float16)
    torch.testing.assert_close(half[0], exact[0])
    torch.testing.assert_close(half[1], exact[1])
    torch.testing.assert_close(half[2], exact[2], rtol=4e-3, atol=4e-3)
    assert not torch.equal(half[2], exact[2])  # it did accumulate in fp16
    if triton_device == "cpu":
        with pytest.raises(ValueError, match="grad_weight_dtype"):
            gapfix.linear_cross_entropy(hidden, weight, target, impl="triton", grad_weight_dtype=torch.bfloat16)


def test_linear_triton_all_ignored(triton_device):
    hidden, weight, bias, _, _, _, n = _linear_case(torch.float32, (19,), 16, 40)
    hidden, weight, bias = hidden.to(triton_device), weight.to(triton_device), bias.to(triton_device)
    target = torch.full((19,), -100, device=triton_device)
    loss, dx, dw, db = _run_linear(hidden, weight, bias, target, None, gapfix.linear_cross_entropy, impl="triton")
    for t in (loss, dx, dw, db):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_rows(triton_device, reduction):
    # N = 0 rows (the vocabulary-split heuristic must not divide by N)
    dev = triton_device
    for impl in ("triton", "torch_fast", "torch"):
        hidden = torch.randn(0, 16, device=dev, requires_grad=True)
        weight = torch.randn(40, 16, device=dev, requires_grad=True)
        bias = torch.randn(40, device=dev, requires_grad=True)
        target = torch.zeros(0, dtype=torch.long, device=dev)
        loss = gapfix.linear_cross_entropy(hidden, weight, target, bias=bias, reduction=reduction, impl=impl,
                                           label_smoothing=0.1)
        assert loss.shape == ((0,) if reduction == "none" else ()) and (loss == 0).all()
        loss.sum().backward()
        assert hidden.grad.shape == (0, 16)
        for g in (weight.grad, bias.grad):
            assert torch.equal(g, torch.zeros_like(g))
        logits = torch.randn(0, 40, device=dev, requires_grad=True)
        loss = gapfix.cross_entropy(logits, target, reduction=reduction, impl=impl, label_smoothing=0.1)
        loss.sum().backward()
        assert logits.grad.shape == (0, 40) and (loss == 0).all()


def test_linear_triton_gradient_filter(triton_device):
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (21,), 16, 70)
    hidden, weight, bias = hidden.to(triton_device), weight.to(triton_device), bias.to(triton_device)
    target = _make_targets(gen, (21,), 70, "hard").to(triton_device)
    run = lambda eps: _run_linear(hidden, weight, bias, target, None, gapfix.linear_cross_entropy,  # noqa: E731
                                  impl="triton", filter_eps=eps)
    exact, tiny, huge = run(None), run(1e-30), run(1e9)
    for a, b in zip(exact[1:], tiny[1:]):
        torch.testing.assert_close(a, b)  # nothing under 1e-30: nothing dropped
    for t in huge[1:]:
        assert torch.equal(t, torch.zeros_like(t))  # every tile under 1e9: all dropped


@pytest.mark.parametrize("target_kind, options, reduction", [
    ("hard", {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}, "mean"),
    ("soft", {"token_weight": True}, "none"),
])
def test_ce_triton(triton_device, target_kind, options, reduction):
    if triton_device != "cpu":
        pytest.skip("covered at larger shapes by the cuda tests")
    _check_ce(torch.float32, target_kind, options, reduction, "triton", n=23, vocab=101, neg_inf=True)


# ---------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target_kind", ["hard", "soft"])
def test_linear_triton_cuda(dtype, target_kind):
    _check_linear_cuda(dtype, target_kind, {"z_loss": 1e-4, "label_smoothing": 0.1, "token_weight": True}, "mean")
    _check_linear_cuda(dtype, target_kind, {"softcap": 20.0}, "none")


def _check_linear_cuda(dtype, target_kind, options, reduction, **extra):
    lead, hdim, vocab = (3, 423), 200, 5003
    hidden, weight, bias, grad_none, token_weight, gen, n = _linear_case(torch.float32, lead, hdim, vocab)
    target = _make_targets(gen, lead, vocab, target_kind)
    dev = "cuda"
    target = target.to(dev) if isinstance(target, torch.Tensor) else (target[0].to(dev), target[1].to(dev))
    kw = dict(options, reduction=reduction)
    if kw.pop("token_weight", False):
        kw["token_weight"] = token_weight.to(dev)
    h, w, b, g = hidden.to(dev, dtype), weight.to(dev, dtype), bias.to(dev, dtype), grad_none.to(dev)
    fast = _run_linear(h, w, b, target, g, gapfix.linear_cross_entropy, impl="triton", **kw, **extra)
    same = _run_linear(h, w, b, target, g, _reference_fn, **kw)
    kw64 = dict(kw)
    if "token_weight" in kw64:
        kw64["token_weight"] = kw64["token_weight"].double()
    ref = _run_linear(h.double(), w.double(), b.double(), _to64(target), g, _reference_fn, **kw64)
    for name, f, s, r in zip(("loss", "dhidden", "dweight", "dbias"), fast, same, ref):
        if name == "dweight" and extra.get("grad_weight_dtype") in (torch.bfloat16, torch.float16):
            # rounding in the accumulator, beyond PyTorch's one rounding of the result
            from gapfix.kernels import cross_entropy as K

            logits = F.linear(h.double(), w.double(), b.double()).requires_grad_()
            loss64 = _ref_ce(logits, _to64(target), **kw64)
            upstream = g.double() if loss64.dim() else torch.tensor(1.7, dtype=torch.float64, device=dev)
            (g_logits,) = torch.autograd.grad(loss64, logits, upstream)  # as _run_linear
            block_n = K.linear_config(dtype, n, vocab, hdim, dev == "cuda", backward=True)["BLOCK_N"]
            bound = accumulation_bound(g_logits, h.double(), block_n, extra["grad_weight_dtype"])
            err = (f.double() - r.double()).abs()
            slack = FACTOR * _err(s, r) + 8 * torch.finfo(torch.float32).eps * max(1.0, r.abs().max().item())
            assert (err <= bound + slack).all(), f"dweight: {(err - bound).max():.3e} over the bound"
            continue
        assert_like_torch(f, s, r, f"{name} ({dtype}, {target_kind}, {options}, {reduction}, {extra})")


def accumulation_bound(g_logits, hidden, block_n, dtype):
    """Worst-case error of dW = G^T X summed atomically, one (V, H) partial P_b per block of
    block_n rows, in `dtype` (unit roundoff u = eps / 2), in any order: each P_b is rounded
    once (u |P_b|) and each of the n additions rounds a partial sum s_k (u |s_k|), plus half
    a subnormal step per rounding near 0. Any s_k is a sum over a subset of the blocks, so
    |s_k| <= M = max(sum of the positive P_b, -sum of the negative P_b).
    Bound: u (n M + sum_b |P_b|) + n * subnormal step, elementwise."""
    info = torch.finfo(dtype)
    u = info.eps / 2
    n_rows = g_logits.shape[0]
    pos = torch.zeros(g_logits.shape[1], hidden.shape[1], dtype=torch.float64, device=g_logits.device)
    neg, total_abs = torch.zeros_like(pos), torch.zeros_like(pos)
    n_blocks = 0
    for start in range(0, n_rows, block_n):
        part = g_logits[start:start + block_n].t() @ hidden[start:start + block_n]
        pos += part.clamp_min(0)
        neg -= part.clamp_max(0)
        total_abs += part.abs()
        n_blocks += 1
    return u * (n_blocks * torch.maximum(pos, neg) + total_abs) + n_blocks * info.smallest_normal * info.eps


def test_accumulation_bound_holds_for_a_simulated_low_precision_sum():
    # the bound used for the bf16 dW accumulator on the GPU, checked here against an fp16
    # sum in a random order (CPU), and not trivially loose: within 30x of the actual error
    gen = torch.Generator().manual_seed(0)
    g_logits = torch.randn(300, 7, generator=gen, dtype=torch.float64) / 50
    hidden = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    bound = accumulation_bound(g_logits, hidden, 32, torch.float16)
    parts = [(g_logits[s:s + 32].t() @ hidden[s:s + 32]).half() for s in range(0, 300, 32)]
    worst = torch.zeros_like(bound)
    for _ in range(20):
        acc = torch.zeros(7, 5, dtype=torch.float16)
        for i in torch.randperm(len(parts), generator=gen).tolist():
            acc = acc + parts[i]
        worst = torch.maximum(worst, (acc.double() - g_logits.t() @ hidden).abs())
    assert (worst <= bound).all()
    assert (bound <= 30 * worst.clamp_min(bound.max() / 100)).all()


@pytest.mark.cuda
def test_linear_triton_cuda_bf16_weight_accumulator():
    _check_linear_cuda(torch.bfloat16, "hard", {}, "mean", grad_weight_dtype=torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_triton_cuda(dtype):
    n, vocab = 1000, 50_257
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, vocab, generator=gen) * 3).to("cuda", dtype)
    target = _make_targets(gen, (n,), vocab, "hard").cuda()
    fast = _run_ce(logits, target, torch.randn(n, device="cuda"), gapfix.cross_entropy, impl="triton",
                   label_smoothing=0.1, z_loss=1e-4)
    same = _run_ce(logits, target, None, _ref_ce, label_smoothing=0.1, z_loss=1e-4)
    ref = _run_ce(logits.double(), target, None, _ref_ce, label_smoothing=0.1, z_loss=1e-4)
    for name, f, s, r in zip(("loss", "dlogits"), fast, same, ref):
        assert_like_torch(f, s, r, name)


@pytest.mark.cuda
def test_cuda_paths_do_not_synchronize():
    dev = "cuda"
    h = torch.randn(300, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1000, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 1000, (300,), device=dev)
    logits = torch.randn(300, 1000, device=dev, requires_grad=True)
    gapfix.linear_cross_entropy(h, w, t).backward()  # warm-up: compile kernels
    gapfix.cross_entropy(logits, t).backward()
    num_tokens = torch.tensor(300.0, device=dev)  # (a host-to-device copy: made before the check)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gapfix.linear_cross_entropy(h, w, t, num_tokens=num_tokens).backward()
        gapfix.cross_entropy(logits, t, reduction="none").sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_invalid_ids_give_nan_not_an_error():
    h = torch.randn(8, 16, device="cuda")
    w = torch.randn(10, 16, device="cuda")
    t = torch.tensor([0, 1, 2, 3, 4, 5, 6, 12], device="cuda")
    loss = gapfix.linear_cross_entropy(h, w, t, reduction="none")
    assert torch.isnan(loss[7]) and torch.isfinite(loss[:7]).all()


@pytest.mark.cuda
def test_cuda_64bit_offsets():
    # (N, V) with N * V > 2**31 elements: offsets into the logits must not wrap
    n, vocab = 8200, 262_144
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, vocab, (n,), device="cuda")
    loss = gapfix.cross_entropy(logits, target, reduction="none", impl="triton")
    tail = slice(n - 50, n)
    expected = F.cross_entropy(logits[tail].float(), target[tail], reduction="none")
    torch.testing.assert_close(loss[tail], expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- lowering for an H100 without one

_COMPILE_SM90 = r'''
import sys
import torch
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(77)
from gapfix.kernels import cross_entropy as K

TARGET = GPUTarget("cuda", 90, 32)
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(fn, signature, constexprs, options):
    signature = dict(signature, **{k: "constexpr" for k in constexprs})
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                                  options=options)
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" in str(exc):
            sys.exit(77)
        raise
    assert f".entry {fn.__name__}" in compiled.asm["ptx"], (fn.__name__, constexprs)
    return compiled.asm["ptx"]


def launch_options(cfg):
    return {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}


for dt in ("bf16", "fp32"):  # fp16 lowers like bf16
    for slots, extra in ((1, False), (4, True)):
        flags = dict(NUM_SLOTS=slots, HAS_BIAS=extra, SOFTCAP=extra, SMOOTH=extra,
                     DOT_PRECISION="ieee" if dt == "fp32" else "tf32", DOT_FP32=False)
        cfg = K.linear_config(TORCH[dt], 8192, 256000, 2304, True)
        opts = launch_options(cfg)
        sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "ids_ptr": "*i64", "slot_w_ptr": "*fp32",
               "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_target_ptr": "*fp32",
               "part_logit_sum_ptr": "*fp32", "part_xs_ptr": "*fp32", "part_sq_ptr": "*fp32",
               "part_before_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32", "stride_x": "i32",
               "stride_w": "i32", "v_per_split": "i32", "softcap": "fp32"}
        # the per-token statistics of linear_log_probs (entropy, sum of p^2, top-1) ride along
        build(K.linear_ce_forward_kernel, sig, dict(flags, ENTROPY=extra, SQ=extra, TOP1=extra, **cfg), opts)
        for dw in ("fp32", dt) if dt != "fp32" else ("fp32",):
            cfg = K.linear_config(TORCH[dt], 8192, 256000, 2304, True, backward=True)
            opts = launch_options(cfg)
            sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "ids_ptr": "*i64",
                   "slot_w_ptr": "*fp32", "lse_ptr": "*fp32", "coef_p_ptr": "*fp32", "coef_t_ptr": "*fp32",
                   "coef_s_ptr": "*fp32", "row_scale_ptr": "*fp32", "entropy_ptr": "*fp32",
                   "coef_e_ptr": "*fp32", "dx_ptr": "*fp32", "dw_ptr": f"*{dw}",
                   "db_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32", "stride_x": "i32", "stride_w": "i32",
                   "softcap": "fp32", "filter_eps": "fp32"}
            ptx = build(K.linear_ce_backward_kernel, sig,
                        dict(flags, ENTROPY=extra, NEED_DX=True, NEED_DW=True, NEED_DB=extra, FILTER=extra,
                             **cfg), opts)
            # the dx/dW/db sums need no ordering: relaxed atomics, no acquire-release fences
            assert ".acq_rel" not in ptx and ".relaxed" in ptx, (dt, dw)
        flags = dict(NUM_SLOTS=slots, SOFTCAP=extra, SMOOTH=extra, BLOCK_V=K.row_block(256000))
        sig = {"logits_ptr": f"*{dt}", "ids_ptr": "*i64", "slot_w_ptr": "*fp32", "lse_ptr": "*fp32",
               "target_ptr": "*fp32", "logit_sum_ptr": "*fp32", "V": "i32", "stride_row": "i64", "softcap": "fp32"}
        build(K.ce_forward_kernel, sig, flags, {"num_warps": K.ROW_WARPS})
        sig = {"logits_ptr": f"*{dt}", "ids_ptr": "*i64", "slot_w_ptr": "*fp32", "lse_ptr": "*fp32",
               "coef_p_ptr": "*fp32", "coef_t_ptr": "*fp32", "coef_s_ptr": "*fp32", "dlogits_ptr": f"*{dt}",
               "V": "i32", "stride_row": "i64", "stride_grad": "i64", "softcap": "fp32"}
        build(K.ce_backward_kernel, sig, flags, {"num_warps": K.ROW_WARPS})
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Lowers every kernel variant (dtypes, options, the bf16/fp16 dW accumulator) to PTX
    for an H100 with the GPU tile configs: catches what the interpreter accepts but the
    compiler rejects. In a fresh process, since the interpreter patches triton.language."""
    from sm90_lowering import run_lowering_script

    run_lowering_script(_COMPILE_SM90)


try:
    import triton
    import triton.language as tl

    from gapfix.kernels.cross_entropy import _tanh

    @triton.jit
    def _tanh_kernel(u_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, _tanh(tl.load(u_ptr + offs, mask=mask, other=0.0)), mask=mask)
except ImportError:
    _tanh_kernel = None


def test_softcap_tanh_is_accurate_near_zero(triton_device):
    # 1 - 2 / (exp(2u) + 1) cancels for small |u| (relative error ~eps / |u|,
    # 1.3e-5 at u = 1e-3), which the soft cap multiplies; the kernels' tanh stays within a
    # few fp32 ulp relative of the exact value over the whole range
    u = torch.cat([torch.logspace(-8, 1.5, 2000), torch.linspace(-1, 1, 2001), torch.tensor([0.0, 0.5, 40.0])])
    u = torch.cat([u, -u]).float().to(triton_device)
    out = torch.empty_like(u)
    _tanh_kernel[(-(-u.numel() // 1024),)](u, out, u.numel(), BLOCK=1024)
    exact = torch.tanh(u.double())
    rel = ((out.double() - exact).abs() / exact.abs().clamp_min(1e-300)).nan_to_num(0.0)
    # 8 eps: compiled, exp is ex2.approx (~2 ulp) of a rounded argument 2u log2(e) (relative
    # error up to ~2|u| ulp of exp(2u), damped by 2 exp(2u) / (exp(2u) + 1)^2 in tanh), plus
    # three roundings; the cancelling form was ~100 eps off at u = 1e-3
    assert rel.max() <= 8 * torch.finfo(torch.float32).eps, rel.max()


def test_every_launch_enters_the_tensors_device_context(monkeypatch, triton_device):
    # Triton launches on the current CUDA device; with a model spread over GPUs the
    # tensors may be on another one. Every kernel launch happens inside
    # _common.device_guard(the tensors' device), which enters torch.cuda.device(that device)
    # (faked here where there is no GPU)
    import contextlib

    from gapfix.kernels import cross_entropy as K
    from gapfix.ops import _common

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda dev: entered.append(dev) or contextlib.nullcontext())
    with _common.device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]

    depth, launches = [0], []
    real_guard = _common.device_guard

    @contextlib.contextmanager
    def counting(device):
        assert device == torch.device(triton_device) or device.type == triton_device
        depth[0] += 1
        with real_guard(device):
            yield
        depth[0] -= 1

    monkeypatch.setattr(_common, "device_guard", counting)
    for name in ("linear_ce_forward_kernel", "linear_ce_backward_kernel", "ce_forward_kernel", "ce_backward_kernel"):
        monkeypatch.setattr(K, name, _LaunchSpy(name, getattr(K, name), depth, launches))
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (9,), 16, 40)
    target = _make_targets(gen, (9,), 40, "hard").to(triton_device)
    _run_linear(hidden.to(triton_device), weight.to(triton_device), None, target, None, gapfix.linear_cross_entropy,
                impl="triton")
    _run_ce(F.linear(hidden, weight).to(triton_device), target, None, gapfix.cross_entropy, impl="triton")
    assert sorted(launches) == sorted([("linear_ce_forward_kernel", 1), ("linear_ce_backward_kernel", 1),
                                       ("ce_forward_kernel", 1), ("ce_backward_kernel", 1)])


class _LaunchSpy:
    """Stands for a Triton kernel: records (name, device-context depth) at each launch."""

    def __init__(self, name, kernel, depth, launches):
        self.name, self.kernel, self.depth, self.launches = name, kernel, depth, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, self.depth[0]))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_backward_allocates_only_the_accumulators_it_needs(monkeypatch, triton_device):
    # each fp32 accumulator (dx, dW, db) is allocated only when its gradient is needed
    from gapfix.kernels import cross_entropy as K

    launches, depth = [], [0]
    seen = []

    class Recording(_LaunchSpy):
        def __getitem__(self, grid):
            launch = super().__getitem__(grid)

            def record(*args, **kwargs):
                seen.append(args[12:15])  # dx, dW, db accumulators (after the entropy pointers)
                return launch(*args, **kwargs)
            return record

    monkeypatch.setattr(K, "linear_ce_backward_kernel",
                        Recording("linear_ce_backward_kernel", K.linear_ce_backward_kernel, depth, launches))
    hidden, weight, bias, _, _, gen, n = _linear_case(torch.float32, (13,), 16, 40)
    hidden, weight = hidden.to(triton_device), weight.to(triton_device)
    target = _make_targets(gen, (13,), 40, "hard").to(triton_device)
    w = weight.clone().requires_grad_()
    gapfix.linear_cross_entropy(hidden, w, target, impl="triton").backward()
    (dx_arg, dw_arg, db_arg), = seen
    assert dw_arg.shape == (40, 16) and dx_arg.numel() < 13 * 16 and db_arg.numel() < 40
    w_chunked = weight.clone().requires_grad_()
    gapfix.linear_cross_entropy(hidden, w_chunked, target, impl="torch_fast").backward()
    torch.testing.assert_close(w.grad, w_chunked.grad)
