"""gapfix/ops/_common.py: the impl= vocabulary, the validators, and the device guard of every
Triton launch (tested with torch.cuda faked where there is no GPU)."""
import contextlib

import pytest
import torch

import gapfix
from gapfix.ops import _common

# ---------------------------------------------------------------------------- helpers

def test_cdiv_and_next_pow2():
    assert [_common.cdiv(a, 4) for a in (0, 1, 4, 5, 9)] == [0, 1, 1, 2, 3]
    assert [_common.next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 17, 64)] == [1, 1, 2, 4, 4, 8, 32, 64]


def test_resolve_impl_names_the_argument_and_the_accepted_names():
    cpu = torch.device("cpu")
    kw = dict(op="op", device=cpu, supported=("auto", "torch"), auto=lambda d: "torch")
    assert _common.resolve_impl("auto", **kw) == "torch"
    assert _common.resolve_impl("torch", **kw) == "torch"
    for bad in ("cpu", "cuda", None, 3):
        with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'torch'\)"):
            _common.resolve_impl(bad, **kw)
    assert _common.resolve_impl("old", aliases={"old": "torch"}, **kw) == "torch"


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _common.triton_runs_on(torch.device("cpu"))
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        _common.check_triton_device(torch.device("cpu"), "op")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common.triton_runs_on(torch.device("cpu")) == _common.triton_available()


@pytest.mark.parametrize("value, word", [
    ([[1, 2]], "torch.Tensor"),
    (torch.zeros(2, 3), "int32 or int64"),
    (torch.zeros(2, 3, 1, dtype=torch.long), "2-D"),
    (torch.zeros(3, 3, dtype=torch.long), "batch size"),
    (torch.zeros(2, 3, dtype=torch.long, device="meta"), "device"),
])
def test_check_ids(value, word):
    with pytest.raises(ValueError, match=f"^ids .*{word}"):
        _common.check_ids("ids", value, device=torch.device("cpu"), batch=2)


def test_check_lengths_and_values():
    cpu = torch.device("cpu")
    kw = dict(batch=2, width=5, device=cpu)
    assert _common.check_lengths("lens", None, **kw).tolist() == [5, 5]
    assert _common.check_lengths("lens", [1, 2], **kw).dtype == torch.int64
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([1, 2, 3]), "ab", [[1], [2, 3]]):
        with pytest.raises(ValueError, match="^lens"):
            _common.check_lengths("lens", bad, **kw)
    with pytest.raises(ValueError, match=r"lens\[1\] = 6 outside \[0, 5\]"):
        _common.check_length_values("lens", torch.tensor([5, 6]), 5)


def test_check_int_bounds_huge_values():
    assert _common.check_int("k", 3, low=0, high=4) == 3
    for bad in (5, -1, 2**70, True, 1.0, "3"):
        with pytest.raises(ValueError, match=r"^k must be an int in \[0, 4\]"):
            _common.check_int("k", bad, low=0, high=4)


# ---------------------------------------------------------------------------- device guard

class _FakeCuda:
    """Stands in for torch.cuda.device: tracks the 'current device' that a launch would use."""

    def __init__(self):
        self.current = "default"

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, device
        try:
            yield
        finally:
            self.current = previous


def test_launch_enters_the_tensors_cuda_device(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append((grid, args, meta, fake.current))

    cuda1 = torch.device("cuda", 1)
    _common.launch(Kernel(), (3, 1), "x", device=cuda1, BLOCK=4)
    assert seen == [((3, 1), ("x",), {"BLOCK": 4}, cuda1)]
    assert fake.current == "default"  # restored after the launch
    _common.launch(Kernel(), (2,), device=torch.device("cpu"))
    assert seen[-1][3] == "default"  # no CUDA context for CPU tensors (the interpreter)
    _common.launch(Kernel(), (0, 4), device=cuda1)
    assert len(seen) == 2  # an empty grid launches nothing


class _KernelSpy:
    """Wraps a Triton kernel; records the device made current by the guard at each launch."""

    def __init__(self, kernel, guard):
        self.kernel, self.guard, self.launches = kernel, guard, []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.launches.append(self.guard.current)
            return self.kernel[grid](*args, **meta)
        return run


def _spy_launches(monkeypatch, module, names):
    """Fakes the guard (CPU tensors under the interpreter have no CUDA device) and spies on
    the kernels: every launch must happen inside the guard of its tensors' device."""
    fake = _FakeCuda()
    monkeypatch.setattr(_common, "device_guard", fake.device)
    spies = {name: _KernelSpy(getattr(module, name), fake) for name in names}
    for name, spy in spies.items():
        monkeypatch.setattr(module, name, spy)
    return spies


@pytest.mark.parametrize("deterministic", [False, True])
def test_mix_embedding_launches_inside_the_device_guard(monkeypatch, triton_device, deterministic):
    from gapfix.kernels import mix_embedding as kernels

    names = ["mix_embedding_fwd_kernel", "mix_embedding_bwd_atomic_kernel", "mix_embedding_bwd_sorted_kernel"]
    spies = _spy_launches(monkeypatch, kernels, names)
    weight = torch.randn(11, 5, device=triton_device, requires_grad=True)
    ids = torch.randint(0, 11, (2, 3), device=triton_device)
    embeds, _ = gapfix.mix_embedding(weight, ids, ids.flip(1), beta=0.5, seed=1, impl="triton",
                                     deterministic=deterministic)
    embeds.sum().backward()
    backward = names[2] if deterministic else names[1]
    assert spies[names[0]].launches == [weight.device]
    assert spies[backward].launches == [weight.device]


def test_rac_labels_launches_inside_the_device_guard(monkeypatch, triton_device):
    from gapfix.kernels import rac_labels as kernels

    spies = _spy_launches(monkeypatch, kernels, ["rac_labels_kernel"])
    gen = torch.tensor([[1, 2, 3], [4, 5, 6]], device=triton_device)
    gapfix.rac_labels(gen, gen.flip(1), eos_id=0, impl="triton")
    gapfix.rac_labels(gen, gen.flip(1), eos_id=0, mode="all", impl="triton")
    assert spies["rac_labels_kernel"].launches == [gen.device, gen.device]
