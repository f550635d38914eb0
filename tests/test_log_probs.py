"""gapfix.ops.cross_entropy.linear_log_probs (TRL's fused-head fields) against an fp64 reference.

Same tolerance scheme as test_cross_entropy.py: the fast path and the reference in the same
dtype are both compared with the fp64 reference, and the fast path may be off by at most a
small multiple of the reference's own error in that dtype (plus a few fp32 ulps).
"""
import pytest
import torch

import gapfix.ops.cross_entropy.log_probs as log_probs_module
from gapfix.ops.cross_entropy import linear_log_probs, linear_log_probs_reference
from gapfix.ops.cross_entropy.log_probs import STATS, log_probs_of_logits

FACTOR = 3.0
ALL = ("log_probs",) + STATS


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def assert_like_reference(fast, same_dtype, ref64, what):
    assert torch.isfinite(fast).all(), f"{what}: non-finite values"
    floor = 8 * torch.finfo(torch.float32).eps * max(1.0, ref64.abs().max().item())
    err, base = _err(fast, ref64), _err(same_dtype, ref64)
    assert err <= FACTOR * base + floor, f"{what}: error {err:.3e} vs the reference's own {base:.3e}"


def _case(dtype, n=45, hdim=24, vocab=157, bias=True, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=gen, dtype=torch.float64) * scale
    weight = torch.randn(vocab, hdim, generator=gen, dtype=torch.float64) * 0.3
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.1 if bias else None
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < 0.25] = -100
    upstream = (torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64))
    return hidden, weight, b, target, upstream


def _run(impl, dtype, hidden, weight, b, target, upstream, softcap, uniform=False, device="cpu", chunk_size=None):
    x = hidden.to(device, dtype, copy=True).requires_grad_()
    w = weight.to(device, dtype, copy=True).requires_grad_()
    bb = None if b is None else b.to(device, dtype, copy=True).requires_grad_()
    t = target.to(device)
    fn = linear_log_probs_reference if impl is None else linear_log_probs
    kw = {} if impl is None else {"impl": impl, "outputs": ALL, "chunk_size": chunk_size}
    out = fn(x, w, t, bias=bb, softcap=softcap, **kw)
    if uniform:  # the SFT loss: the forward's precomputed gradients serve
        loss = -out.log_probs.sum() / 7.0
    else:
        a, c = (u.to(device, out.log_probs.dtype) for u in upstream)
        loss = (out.log_probs * a).sum() + (out.entropy * c).sum()
    loss.backward()
    grads = [x.grad, w.grad] + ([] if bb is None else [bb.grad])
    return out, grads


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_fast_matches_the_reference(dtype, uniform, bias, softcap, chunked, monkeypatch):
    # chunked: 7-row chunks (the last one short), the entropy's scratch 3 rows of a chunk
    if chunked:
        monkeypatch.setattr(log_probs_module, "_SCRATCH_ELEMENTS", 3 * 157)
    case = _case(dtype, bias=bias, seed=1 + bias)
    _check("torch_fast", dtype, case, softcap, uniform, chunk_size=7 if chunked else None)


def _check(impl, dtype, case, softcap, uniform, device="cpu", chunk_size=None):
    ref64, g64 = _run(None, torch.float64, *case, softcap, uniform)
    same, g_same = _run(None, dtype, *case, softcap, uniform)
    fast, g_fast = _run(impl, dtype, *case, softcap, uniform, device=device, chunk_size=chunk_size)
    with torch.no_grad():  # the forward without gradients (statistics only)
        hidden, weight, b, target, _ = case
        stats = linear_log_probs(hidden.to(device, dtype), weight.to(device, dtype), target.to(device),
                                 bias=None if b is None else b.to(device, dtype), softcap=softcap, outputs=ALL,
                                 impl=impl, chunk_size=chunk_size)
    for out in (fast, stats):
        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
            assert_like_reference(getattr(out, name).cpu(), getattr(same, name), getattr(ref64, name), name)
        if dtype != torch.bfloat16:  # a bf16 near-tie may pick another argmax than fp64 does
            assert torch.equal(out.is_top1.cpu(), ref64.is_top1)
        assert out.is_top1.dtype == torch.bool
    for name, a, b_, c in zip(("dhidden", "dW", "dbias"), g_fast, g_same, g64):
        assert_like_reference(a.cpu(), b_, c, name)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_the_reference(triton_device, dtype, uniform, softcap):
    case = _case(dtype, n=37, hdim=20, vocab=83, seed=3)
    _check("triton", dtype, case, softcap, uniform, device=triton_device)


def test_fields_at_known_values():
    # one row of logits (0, log 3): p = (1/4, 3/4)
    hidden = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0], [3.0]], dtype=torch.float64).log().nan_to_num(neginf=0.0)
    weight[1, 0] = torch.log(torch.tensor(3.0, dtype=torch.float64))
    target = torch.tensor([1, -100])
    for impl in ("torch", "torch_fast"):
        out = linear_log_probs(hidden, weight, target, outputs=ALL, impl=impl)
        p = torch.tensor([0.25, 0.75], dtype=torch.float64)
        torch.testing.assert_close(out.log_probs, torch.tensor([p[1].log(), 0.0], dtype=torch.float64))
        torch.testing.assert_close(out.entropy[0], -(p * p.log()).sum())
        torch.testing.assert_close(out.log_sum_sq_probs[0], (p * p).sum().log())
        torch.testing.assert_close(out.mean_logits[0], weight[1, 0] / 2)
        assert out.is_top1.tolist() == [True, False]


def test_a_tie_with_an_earlier_id_is_not_top1():
    hidden = torch.ones(2, 1)
    weight = torch.tensor([[2.0], [2.0], [1.0]])
    target = torch.tensor([1, 0])
    for impl in ("torch", "torch_fast"):
        assert linear_log_probs(hidden, weight, target, outputs=("is_top1",), impl=impl).is_top1.tolist() == \
            [False, True]


def test_triton_tie_and_ignored_rows(triton_device):
    hidden = torch.ones(3, 16, device=triton_device)
    weight = torch.zeros(40, 16, device=triton_device)
    weight[5] = weight[33] = 1.0  # two maxima, in different vocabulary tiles
    target = torch.tensor([33, 5, -100], device=triton_device)
    out = linear_log_probs(hidden, weight, target, outputs=ALL, impl="triton")
    assert out.is_top1.tolist() == [False, True, False]
    assert out.log_probs[2].item() == 0.0 and out.entropy[2].item() == 0.0


def test_unrequested_fields_are_none_and_stats_carry_no_gradient():
    hidden, weight, b, target, _ = _case(torch.float32, n=9, vocab=31)
    x = hidden.float().requires_grad_()
    out = linear_log_probs(x, weight.float(), target, outputs=("log_probs", "mean_logits"), impl="torch_fast")
    assert out.entropy is None and out.is_top1 is None and out.log_sum_sq_probs is None
    assert not out.mean_logits.requires_grad and out.log_probs.requires_grad


def test_logits_form_matches_the_linear_reference():
    hidden, weight, b, target, _ = _case(torch.float64, n=11, vocab=29)
    linear = linear_log_probs_reference(hidden, weight, target, bias=b, softcap=2.0)
    logits = log_probs_of_logits(torch.nn.functional.linear(hidden, weight, b), target, softcap=2.0)
    for a, c in zip(linear, logits):
        assert torch.equal(a, c)


def test_bad_inputs_are_refused():
    hidden, weight = torch.randn(4, 3), torch.randn(7, 3)
    with pytest.raises(ValueError, match="outputs"):
        linear_log_probs(hidden, weight, torch.zeros(4, dtype=torch.long), outputs=("logits",))
    with pytest.raises(ValueError, match="target"):
        linear_log_probs(hidden, weight, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match="target"):
        linear_log_probs(hidden, weight, (torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)))
    with pytest.raises(ValueError, match="lm_weight"):
        linear_log_probs(hidden, torch.randn(7, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="softcap"):
        linear_log_probs(hidden, weight, torch.zeros(4, dtype=torch.long), softcap=-1.0)


def test_compile_traces_the_op():
    hidden, weight, b, target, _ = _case(torch.float32, n=13, vocab=37)
    x, w = hidden.float(), weight.float()

    def fields(x, w, t):
        out = linear_log_probs(x, w, t, outputs=("log_probs", "entropy"), impl="torch_fast")
        return out.log_probs, out.entropy

    eager = fields(x, w, target)
    compiled = torch.compile(fields, backend="aot_eager", fullgraph=True)(x, w, target)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(a, c)


def test_a_second_backward_recomputes_what_the_first_consumed():
    hidden, weight, b, target, _ = _case(torch.float64, n=10, vocab=23)
    grads = []
    for impl in ("torch", "torch_fast"):
        x = hidden.clone().requires_grad_()
        out = linear_log_probs(x, weight, target, impl=impl)
        loss = -out.log_probs.sum() / 3.0
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])
