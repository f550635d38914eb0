"""torch.func transforms: the losses differentiate under torch.func.grad ("auto" runs the
reference there); the ops that read tensor values refuse with FunctorchTransformError."""
import pytest
import torch

import gapfix
from gapfix.ops._common import FunctorchTransformError
from gapfix.ops.cross_entropy import cross_entropy, linear_cross_entropy, linear_log_probs


def _case():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=gen), torch.randn(9, 4, generator=gen), torch.tensor([1, 2, -100, 8, 0, 3])


@pytest.mark.parametrize("op", ["linear_cross_entropy", "cross_entropy", "linear_log_probs"])
def test_grad_of_the_losses_matches_autograd(op):
    x, w, t = _case()

    def loss(x):
        if op == "linear_cross_entropy":
            return linear_cross_entropy(x, w, t, label_smoothing=0.1)
        if op == "cross_entropy":
            return cross_entropy(x @ w.t(), t, z_loss=1e-3)
        out = linear_log_probs(x, w, t, outputs=("log_probs", "entropy"))
        return out.log_probs.sum() + out.entropy.sum()

    leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(loss(leaf), leaf)[0]
    torch.testing.assert_close(torch.func.grad(loss)(x), expected, rtol=1e-5, atol=1e-6)


def test_a_fast_impl_under_grad_is_refused_by_name():
    x, w, t = _case()
    with pytest.raises(FunctorchTransformError, match="impl='torch_fast'"):
        torch.func.grad(lambda x: linear_cross_entropy(x, w, t, impl="torch_fast"))(x)


def test_mix_embedding_under_grad_is_refused():
    weight = torch.randn(7, 4)
    ids, alt = torch.randint(0, 7, (2, 3)), torch.randint(0, 7, (2, 3))
    with pytest.raises(FunctorchTransformError, match="mix_embedding"):
        torch.func.grad(lambda w: gapfix.mix_embedding(w, ids, alt, beta=0.5, seed=1)[0].sum())(weight)
    assert isinstance(FunctorchTransformError("x"), NotImplementedError)


def test_vmap_of_align_and_rac_labels_is_refused():
    gen, ref = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 5))
    with pytest.raises(FunctorchTransformError, match="align"):
        torch.func.vmap(lambda g, r: gapfix.align(g[None], r[None]).distance)(gen, ref)
    with pytest.raises(FunctorchTransformError, match="rac_labels"):
        torch.func.vmap(lambda g, r: gapfix.rac_labels(g[None], r[None], eos_id=9))(gen, ref)
    assert gapfix.align(gen, ref).distance.shape == (3,)  # outside a transform: as before
