"""rac_labels(impl="auto") on CPU tensors aligns with align's "auto" (the native kernel), not
the O(Tg * Tr) PyTorch reference: "auto" resolving to the "torch" labels on CPU would drag the
alignment down to the reference too (~100x slower at 256 x 256 tokens; bench/RESULTS.md,
"0.1.0 vs this version"). Only an explicit impl="torch" means the reference alignment.
"""
import pytest
import torch

import gapfix.ops.align as align_module
from gapfix.ops.align import _has_native_kernel
from gapfix.ops.rac_labels import rac_labels

EOS = 1000


def _pairs():
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 50, (3, 9), generator=g)
    gen = ref.clone()
    gen[:, 4] = torch.randint(0, 50, (3,), generator=g)
    return gen, ref, torch.tensor([9, 7, 5]), torch.tensor([9, 8, 6])


@pytest.fixture
def reference_calls(monkeypatch):
    calls = []
    real = align_module._reference_impl

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(align_module, "_reference_impl", counted)
    return calls


@pytest.mark.skipif(not _has_native_kernel("cpu"), reason="gapfix._C built without the CPU align kernel")
@pytest.mark.parametrize("mode", ["path", "first", "last", "all"])
def test_auto_on_cpu_aligns_natively(reference_calls, mode):
    gen, ref, gen_lens, ref_lens = _pairs()
    got = rac_labels(gen, ref, gen_lens, ref_lens, eos_id=EOS, mode=mode, max_targets=3)
    assert reference_calls == []  # the native kernel aligned
    want = rac_labels(gen, ref, gen_lens, ref_lens, eos_id=EOS, mode=mode, max_targets=3, impl="torch")
    assert reference_calls == [1]  # "torch" still means the reference alignment
    for w, o in zip(want if mode == "all" else [want], got if mode == "all" else [got]):
        torch.testing.assert_close(o, w, rtol=0, atol=0)
