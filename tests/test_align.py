"""gapfix.align against the plain-Python oracle (tests/align_oracle.py), the
PyTorch reference against the native kernels, and argument checking."""
import os
import random

import pytest
import torch

import gapfix
from gapfix.ops.align import align_reference

import align_oracle

FIELDS = ("path", "cost", "first", "last")
EDGE_LENGTHS = (0, 1, 2, 63, 64, 65, 127, 128, 129)


def native_available(device="cpu"):
    from gapfix.ops.align import _has_native_kernel

    return _has_native_kernel(device)


needs_native = pytest.mark.skipif(not native_available(), reason="gapfix._C not built")


def chars(s):
    return [ord(c) for c in s]


def mutate(rng, g, edits, vocab):
    y = list(g)
    for _ in range(edits):
        op = rng.randrange(3)
        if op == 0 and y:
            y.pop(rng.randrange(len(y)))
        elif op == 1:
            y.insert(rng.randrange(len(y) + 1), rng.randrange(vocab))
        elif y:
            y[rng.randrange(len(y))] = rng.randrange(vocab)
    return y


def random_pair(rng, vocab, n, m=None):
    """A generated row of length n and a reference: either a mutation of it
    (the realistic case) or independent tokens."""
    g = [rng.randrange(vocab) for _ in range(n)]
    if m is None and rng.random() < 0.6:
        return g, mutate(rng, g, rng.randint(0, max(1, n // 4)), vocab)
    m = rng.choice(EDGE_LENGTHS + (rng.randint(0, 160),)) if m is None else m
    return g, [rng.randrange(vocab) for _ in range(m)]


def pad_batch(rows, dtype, rng, junk=True):
    """Right-pads rows into a (B, width) tensor; padding holds junk (negative
    ids included) because the kernels must never read it."""
    width = max([len(r) for r in rows] + [0]) + rng.randint(0, 3)
    out = []
    for r in rows:
        pad = [rng.choice([-100, -1, 0, 7]) if junk else 0 for _ in range(width - len(r))]
        out.append(r + pad)
    return torch.tensor(out, dtype=dtype).reshape(len(rows), width), torch.tensor([len(r) for r in rows])


def check_against_oracle(result, gens, refs, max_targets):
    for b, (g, y) in enumerate(zip(gens, refs)):
        expect = align_oracle.align_pair(g, y, max_targets)
        n = len(g)
        assert int(result.distance[b]) == expect["distance"], (b, g, y)
        for field in FIELDS:
            row = getattr(result, field)[b].tolist()
            assert row[: n + 1] == expect[field], (field, b, g, y)
            assert all(v == -1 for v in row[n + 1 :]), (field, b)
        if max_targets:
            got = result.targets[b].tolist()
            assert got[: n + 1] == expect["targets"], (b, g, y)
            assert all(v == -1 for row in got[n + 1 :] for v in row)
        else:
            assert result.targets is None


def assert_same(a, b):
    for field in a._fields:
        x, y = getattr(a, field), getattr(b, field)
        if x is None or y is None:
            assert x is None and y is None, field
            continue
        assert x.dtype == torch.int32 and y.dtype == torch.int32, field
        assert torch.equal(x.cpu(), y.cpu()), field


# ---------------------------------------------------------------------------
# The paper's examples


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_paper_examples(impl):
    gen = torch.tensor([chars("60/2=30") + [0, 0], chars("abXc") + [0] * 5])
    ref = torch.tensor([chars("60/2+4=34"), chars("abc") + [0] * 6])
    out = gapfix.align(gen, ref, torch.tensor([7, 4]), torch.tensor([9, 3]), max_targets=2, impl=impl)
    assert out.path[0].tolist() == [0, 1, 2, 3, 4, 7, 8, 9, -1, -1]
    assert out.path[1].tolist() == [0, 1, 2, 2, 3, -1, -1, -1, -1, -1]
    assert out.distance.tolist() == [3, 1]
    # Labels y_j(t) with y_m = EOS: "6 0 / 2 + 3 4 EOS" and "a b c c EOS".
    labels = ["".join((ref_s + "$")[j] for j in out.path[b, : n + 1].tolist())
              for b, (ref_s, n) in enumerate([("60/2+4=34", 7), ("abc", 4)])]
    assert labels == ["60/2+34$", "abcc$"]
    assert out.cost[1].tolist()[:5] == [0, 0, 0, 1, 1]
    assert out.first[1].tolist()[:5] == [0, 1, 2, 2, 3]
    assert out.last[1].tolist()[:5] == [0, 1, 2, 3, 3]
    # After "abX" both "c" (j=2) and EOS (j=3) are prefix-optimal.
    assert out.targets[1, 3].tolist() == [2, 3]


# ---------------------------------------------------------------------------
# Oracle comparisons


@pytest.mark.parametrize("impl", [pytest.param("native", marks=needs_native), "torch"])
@pytest.mark.parametrize("vocab", [2, 3, 16, 256_000])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_random_pairs_match_oracle(impl, vocab, dtype):
    rng = random.Random(f"{impl}/{vocab}/{dtype}")  # str seeds hash stably across processes
    batches = 80 if impl == "native" else 6  # ~3,000 native pairs in all
    for _ in range(batches):
        batch = rng.randint(1, 9)
        pairs = [random_pair(rng, vocab, rng.choice(EDGE_LENGTHS + (rng.randint(0, 140),))) for _ in range(batch)]
        gens, refs = [p[0] for p in pairs], [p[1] for p in pairs]
        # Spread the ids over the whole non-negative int32 range.
        ids = {v: rng.randrange(2**31) for v in range(vocab)} if vocab <= 16 else None
        if ids:
            gens = [[ids[v] for v in g] for g in gens]
            refs = [[ids[v] for v in y] for y in refs]
        gen, gen_lens = pad_batch(gens, dtype, rng)
        ref, ref_lens = pad_batch(refs, dtype, rng)
        max_targets = rng.choice([0, 1, 2, 5])
        out = gapfix.align(gen, ref, gen_lens, ref_lens, max_targets=max_targets, impl=impl)
        check_against_oracle(out, gens, refs, max_targets)


@needs_native
def test_special_rows_match_oracle():
    rng = random.Random(5)
    rows = []
    for n in (0, 1, 5, 63, 64, 65, 128, 129):
        g = [rng.randrange(4) for _ in range(n)]
        rows.append((g, list(g)))  # identical
        rows.append((g, [v + 10 for v in g]))  # disjoint vocabularies
        rows.append((g, []))  # empty reference
        rows.append(([], g))  # empty generation
        rows.append(([3] * n, [3] * (n // 2)))  # one repeated token
        rows.append(([1] * n, [2] * (n + 3)))  # repeated, all mismatched: wide argmin sets
    gens, refs = [r[0] for r in rows], [r[1] for r in rows]
    gen, gen_lens = pad_batch(gens, torch.int64, rng)
    ref, ref_lens = pad_batch(refs, torch.int64, rng)
    for max_targets in (0, 3):
        out = gapfix.align(gen, ref, gen_lens, ref_lens, max_targets=max_targets)
        check_against_oracle(out, gens, refs, max_targets)


@needs_native
def test_identical_rows_structure():
    gen = torch.randint(0, 50, (3, 200))
    out = gapfix.align(gen, gen.clone())
    steps = torch.arange(201, dtype=torch.int32).expand(3, -1)
    assert out.distance.tolist() == [0, 0, 0]
    assert torch.equal(out.path, steps) and torch.equal(out.first, steps) and torch.equal(out.last, steps)
    assert not out.cost.any()


@needs_native
def test_long_rows_match_reference():
    """Lengths up to 4096, all banding regimes: native == PyTorch reference."""
    rng = random.Random(11)
    cases = [(4096, 0.02, 256_000, 0), (1500, 0.1, 256_000, 3), (700, 0.5, 4, 2), (1025, 0.3, 2, 0),
             (300, 0.0, 256_000, 2)]
    for n, rate, vocab, max_targets in cases:
        gens, refs = [], []
        for _ in range(2):
            g = [rng.randrange(vocab) for _ in range(rng.randint(n // 2, n))]
            gens.append(g)
            refs.append(mutate(rng, g, int(rate * len(g)), vocab))
        gen, gen_lens = pad_batch(gens, torch.int64, rng)
        ref, ref_lens = pad_batch(refs, torch.int64, rng)
        native = gapfix.align(gen, ref, gen_lens, ref_lens, max_targets=max_targets, impl="native")
        reference = gapfix.align(gen, ref, gen_lens, ref_lens, max_targets=max_targets, impl="torch")
        assert_same(native, reference)


@needs_native
def test_long_rows_distance_and_invariants():
    """Long rows, checked against Levenshtein distances and the structure every
    output must have (monotone path ending at m, c_t non-decreasing by 0/1)."""
    Levenshtein = pytest.importorskip("rapidfuzz.distance.Levenshtein")
    rng = random.Random(3)
    gens, refs = [], []
    for n in (4096, 3000, 2049, 1024, 129, 0):
        for rate in (0.01, 0.1, 0.6):
            vocab = rng.choice([2, 7, 256_000])
            g = [rng.randrange(vocab) for _ in range(n)]
            gens.append(g)
            refs.append(mutate(rng, g, int(rate * n), vocab))
    gen, gen_lens = pad_batch(gens, torch.int32, rng, junk=False)
    ref, ref_lens = pad_batch(refs, torch.int32, rng, junk=False)
    out = gapfix.align(gen, ref, gen_lens, ref_lens, max_targets=4)
    for b, (g, y) in enumerate(zip(gens, refs)):
        n, m = len(g), len(y)
        d = int(out.distance[b])
        assert d == Levenshtein.distance(g, y)
        path, cost = out.path[b, : n + 1], out.cost[b, : n + 1]
        first, last = out.first[b, : n + 1], out.last[b, : n + 1]
        assert int(path[0]) == 0 and 0 <= int(path[-1]) <= m
        assert bool((path.diff() >= 0).all())
        steps = cost.diff()
        assert bool(((steps == 0) | (steps == 1)).all()) and int(cost[0]) == 0 and int(cost[-1]) <= d
        assert bool((first <= last).all()) and int(last.max()) <= m
        # c_t is the prefix distance at first/last: Levenshtein of prefixes.
        for t in rng.sample(range(n + 1), min(5, n + 1)):
            assert Levenshtein.distance(g[:t], y[: int(first[t])]) == int(cost[t])
            assert Levenshtein.distance(g[:t], y[: int(last[t])]) == int(cost[t])
        assert bool((out.targets[b, : n + 1, 0] == first).all())


@needs_native
def test_dtypes_threads_and_padding_do_not_change_results():
    rng = random.Random(8)
    pairs = [random_pair(rng, 100, rng.randint(0, 300)) for _ in range(40)]
    gens, refs = [p[0] for p in pairs], [p[1] for p in pairs]
    gen32, gl = pad_batch(gens, torch.int32, rng)
    ref32, rl = pad_batch(refs, torch.int32, rng)
    base = gapfix.align(gen32, ref32, gl, rl, max_targets=3)
    assert_same(base, gapfix.align(gen32.long(), ref32.long(), gl, rl, max_targets=3))
    assert_same(base, gapfix.align(gen32, ref32.long(), gl.int(), rl.int(), max_targets=3))
    wide = torch.cat([gen32, torch.full((len(gens), 5), 9, dtype=torch.int32)], dim=1)
    wider = gapfix.align(wide, ref32, gl, rl, max_targets=3)
    assert_same(base, type(base)(*(x[:, : gen32.shape[1] + 1] if x.dim() > 1 else x for x in wider)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert_same(base, gapfix.align(gen32, ref32, gl, rl, max_targets=3))
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_largest_ids():
    top = 2**31 - 1
    gen = torch.tensor([[top, 0, top - 1, 5]], dtype=torch.int32)
    ref = torch.tensor([[top, top - 1, 5, top]], dtype=torch.int32)
    out = gapfix.align(gen, ref, max_targets=2)
    check_against_oracle(out, gen.tolist(), ref.tolist(), 2)
    big = torch.tensor([[2**40, 2**40 + 1]]), torch.tensor([[2**40 + 1]])
    assert gapfix.align(*big).distance.tolist() == [1]


def test_empty_batch_and_widths():
    for impl in ["torch"] + (["native"] if native_available() else []):
        out = gapfix.align(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long), impl=impl)
        assert out.distance.shape == (0,) and out.path.shape == (0, 5)
        out = gapfix.align(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), impl=impl)
        assert out.distance.tolist() == [0, 0] and out.path.tolist() == [[0], [0]]
        # one side zero-width, the other not (the traceback must not index the empty side)
        out = gapfix.align(torch.tensor([[5, 7, 9]]), torch.zeros(1, 0, dtype=torch.long), max_targets=2, impl=impl)
        assert out.distance.tolist() == [3] and out.path.tolist() == [[0, 0, 0, 0]]
        assert out.targets[0, :, 0].tolist() == [0, 0, 0, 0]
        out = gapfix.align(torch.zeros(1, 0, dtype=torch.long), torch.tensor([[5, 7]]), impl=impl)
        assert out.distance.tolist() == [2] and out.path.tolist() == [[0]] and out.last.tolist() == [[0]]


@needs_native
def test_torch_compile_fullgraph():
    def labels(gen, ref, gen_lens, ref_lens):
        out = gapfix.align(gen, ref, gen_lens, ref_lens, max_targets=2)
        return out.path + 1, out.distance, out.targets

    rng = random.Random(2)
    pairs = [random_pair(rng, 9, rng.randint(0, 70)) for _ in range(6)]
    gen, gl = pad_batch([p[0] for p in pairs], torch.int64, rng)
    ref, rl = pad_batch([p[1] for p in pairs], torch.int64, rng)
    compiled = torch.compile(labels, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(gen, ref, gl, rl), labels(gen, ref, gl, rl)):
        assert torch.equal(got, want)


@needs_native
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    """Schema, fake (meta) kernel and dynamic-shape tracing of gapfix::align."""
    if not native_available(device):
        pytest.skip(f"no native {device} kernel")
    gen = torch.randint(0, 5, (3, 17), device=device)
    ref = torch.randint(0, 5, (3, 11), device=device)
    lens = torch.tensor([17, 3, 0], device=device), torch.tensor([11, 0, 5], device=device)
    result = torch.library.opcheck(torch.ops.gapfix.align.default, (gen, ref, *lens, 2))
    assert all(v == "SUCCESS" for v in result.values()), result


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_bad_inputs_raise_value_error(impl):
    gen = torch.randint(0, 9, (2, 5))
    ref = torch.randint(0, 9, (2, 4))
    cases = [
        (dict(gen=gen.float()), "gen"),
        (dict(ref=ref.to(torch.int16)), "ref"),
        (dict(gen=gen[0]), "gen"),
        (dict(ref=ref[None]), "ref"),
        (dict(ref=ref[:1]), "batch"),
        (dict(gen_lens=torch.tensor([5, 6])), "gen_lens"),
        (dict(gen_lens=torch.tensor([-1, 2])), "gen_lens"),
        (dict(ref_lens=torch.tensor([1, 5])), "ref_lens"),
        (dict(ref_lens=torch.tensor([1.0, 2.0])), "ref_lens"),
        (dict(ref_lens=torch.tensor([1, 2, 3])), "ref_lens"),
        (dict(gen=torch.tensor([[1, -3, 2, 0, 0], [1, 2, 3, 4, 5]])), "gen"),
        (dict(ref=torch.tensor([[1, 2, 3, -5], [1, 2, 3, 4]])), "ref"),
        (dict(max_targets=-1), "max_targets"),
        (dict(impl_override="triton"), "impl"),
    ]
    if torch.device("meta") is not None:
        cases.append((dict(ref=ref.to("meta")), "device"))
    for kwargs, word in cases:
        args = dict(gen=gen, ref=ref, gen_lens=None, ref_lens=None, max_targets=0)
        chosen_impl = kwargs.pop("impl_override", impl)
        args.update(kwargs)
        snapshot = (gen.clone(), ref.clone())
        with pytest.raises(ValueError, match=word):
            gapfix.align(args["gen"], args["ref"], args["gen_lens"], args["ref_lens"],
                         max_targets=args["max_targets"], impl=chosen_impl)
        assert torch.equal(gen, snapshot[0]) and torch.equal(ref, snapshot[1])


def test_negative_ids_in_padding_are_allowed():
    gen = torch.tensor([[1, 2, -100], [3, -1, -1]])
    ref = torch.tensor([[1, 2], [3, -100]])
    out = align_reference(gen, ref, torch.tensor([2, 1]), torch.tensor([2, 1]))
    assert out.distance.tolist() == [0, 0]


@needs_native
def test_native_op_checks_lengths_itself():
    gen = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="gen_lens"):
        torch.ops.gapfix.align(gen, gen, torch.tensor([4]), torch.tensor([3]), 0)


@needs_native
def test_native_cpu_kernel_device_check_is_a_value_error():
    """The CPU binding's device checks raise ValueError, like the CUDA binding's (they raised
    RuntimeError). The CPU kernel is called by redispatch: a mixed-device call would
    otherwise be routed to the other device's kernel."""
    gen = torch.zeros(1, 3, dtype=torch.long)
    lens = torch.tensor([3])
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(ValueError, match="ref_lens must be a CPU tensor"):
        torch.ops.gapfix.align.default.redispatch(cpu_only, gen, gen, lens, lens.to("meta"), 0)


# ---------------------------------------------------------------------------
# CUDA: identical to the CPU kernel


@pytest.mark.cuda
@pytest.mark.parametrize("max_targets", [0, 3])
def test_cuda_matches_cpu(max_targets):
    if not native_available("cuda"):
        pytest.skip("gapfix._C was built without CUDA")
    rng = random.Random(21)
    pairs = [random_pair(rng, rng.choice([2, 5, 256_000]), rng.choice(EDGE_LENGTHS + (rng.randint(0, 2100),)))
             for _ in range(300)]
    for dtype in (torch.int32, torch.int64):
        gen, gl = pad_batch([p[0] for p in pairs], dtype, rng)
        ref, rl = pad_batch([p[1] for p in pairs], dtype, rng)
        cpu = gapfix.align(gen, ref, gl, rl, max_targets=max_targets)
        cuda = gapfix.align(gen.cuda(), ref.cuda(), gl.cuda(), rl.cuda(), max_targets=max_targets)
        assert cuda.distance.device.type == "cuda"
        assert_same(cpu, cuda)


@pytest.mark.cuda
def test_cuda_long_rows_and_examples():
    if not native_available("cuda"):
        pytest.skip("gapfix._C was built without CUDA")
    rng = random.Random(22)
    gens, refs = [], []
    for n in (4096, 4000, 1024, 1023, 65, 0):
        g = [rng.randrange(256_000) for _ in range(n)]
        gens.append(g)
        refs.append(mutate(rng, g, rng.choice([0, n // 10, n // 2]), 256_000))
    gens.append(chars("60/2=30"))
    refs.append(chars("60/2+4=34"))
    gen, gl = pad_batch(gens, torch.int64, rng)
    ref, rl = pad_batch(refs, torch.int64, rng)
    cpu = gapfix.align(gen, ref, gl, rl, max_targets=4)
    cuda = gapfix.align(gen.cuda(), ref.cuda(), gl.cuda(), rl.cuda(), max_targets=4)
    assert_same(cpu, cuda)
    assert cuda.path[-1, :8].tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    with pytest.raises(ValueError, match="device"):
        gapfix.align(gen.cuda(), ref)


@pytest.mark.cuda
def test_cuda_chunked_scratch_matches_cpu():
    """A scratch budget of 1 MiB forces one launch per few pairs."""
    import subprocess
    import sys

    if not native_available("cuda"):
        pytest.skip("gapfix._C was built without CUDA")
    code = """
import torch, gapfix
torch.manual_seed(4)
gen = torch.randint(0, 30, (37, 300), dtype=torch.int64)
ref = torch.where(torch.rand(37, 290) < 0.2, torch.randint(0, 30, (37, 290)), gen[:, :290])
gl = torch.randint(0, 301, (37,)); rl = torch.randint(0, 291, (37,))
cpu = gapfix.align(gen, ref, gl, rl, max_targets=2)
cuda = gapfix.align(gen.cuda(), ref.cuda(), gl.cuda(), rl.cuda(), max_targets=2)
for a, b in zip(cpu, cuda):
    assert torch.equal(a, b.cpu())
print("ok")
"""
    env = dict(os.environ, GAPFIX_ALIGN_SCRATCH_MB="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_max_targets_is_bounded(impl):
    """K slots are allocated for every prefix: max_targets=10**9 on a 1x4 input asked for
    20 GB; it is refused by name, and the limit itself works."""
    from gapfix.ops.align import MAX_TARGETS_LIMIT

    gen, ref = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3]])
    for bad in (10**9, MAX_TARGETS_LIMIT + 1, 2**70):
        with pytest.raises(ValueError, match=rf"max_targets must be an int in \[0, {MAX_TARGETS_LIMIT}\]"):
            gapfix.align(gen, ref, max_targets=bad, impl=impl)
    out = gapfix.align(gen, ref, max_targets=MAX_TARGETS_LIMIT, impl=impl)
    assert out.targets.shape == (1, 5, MAX_TARGETS_LIMIT)
    assert torch.equal(out.targets[..., :2], gapfix.align(gen, ref, max_targets=2, impl=impl).targets)


def test_old_device_spellings_are_refused():
    gen = torch.tensor([[1, 2]])
    for old in ("cpu", "cuda", "triton"):
        with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'native', 'torch'\)"):
            gapfix.align(gen, gen, impl=old)
