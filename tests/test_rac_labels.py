"""gapfix.rac_labels: label construction (reference vs Triton kernel), the
paper's examples end to end, bad inputs.

A small pure-Python Levenshtein DP written from docs/design.md ("The alignment",
"Label convention") stands in for gapfix.align where a hand-made alignment is
wanted; the end-to-end tests through gapfix.align itself are at the bottom.
"""
from typing import NamedTuple, Optional

import pytest
import torch

from gapfix.ops.rac_labels import (
    RacTargets,
    rac_labels,
    rac_labels_reference,
    rac_labels_triton,
)

EOS = 1000  # outside the ASCII ids of the text examples
IGN = -100


class PyAlignment(NamedTuple):
    distance: torch.Tensor
    path: torch.Tensor
    cost: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor
    targets: Optional[torch.Tensor]


def _dp_one(g, y):
    n, m = len(g), len(y)
    dist = [[0] * (m + 1) for _ in range(n + 1)]
    for t in range(n + 1):
        for j in range(m + 1):
            if t == 0 or j == 0:
                dist[t][j] = t + j
            else:
                dist[t][j] = min(dist[t - 1][j - 1] + (g[t - 1] != y[j - 1]),
                                 dist[t - 1][j] + 1, dist[t][j - 1] + 1)
    # canonical path: from (n, m), prefer diagonal, then up, then left
    path = {n: m}
    t, j = n, m
    while (t, j) != (0, 0):
        if t and j and dist[t][j] == dist[t - 1][j - 1] + (g[t - 1] != y[j - 1]):
            t, j = t - 1, j - 1
        elif t and dist[t][j] == dist[t - 1][j] + 1:
            t -= 1
        else:
            j -= 1
        path[t] = min(path.get(t, j), j)
    return dist, path


def python_alignment(gens, refs, width=None, k=4):
    """Alignment-shaped tensors for lists of token lists (padding -1)."""
    batch = len(gens)
    width = max(map(len, gens)) if width is None else width
    path = torch.full((batch, width + 1), -1, dtype=torch.int32)
    cost, first, last = path.clone(), path.clone(), path.clone()
    targets = torch.full((batch, width + 1, k), -1, dtype=torch.int32)
    distance = torch.zeros(batch, dtype=torch.int32)
    for b, (g, y) in enumerate(zip(gens, refs)):
        dist, pth = _dp_one(g, y)
        distance[b] = dist[len(g)][len(y)]
        for t in range(len(g) + 1):
            c = min(dist[t])
            opt = [j for j in range(len(y) + 1) if dist[t][j] == c]
            path[b, t], cost[b, t], first[b, t], last[b, t] = pth[t], c, opt[0], opt[-1]
            seen, picks = set(), []
            for j in opt:
                tok = ("eos",) if j == len(y) else y[j]
                if tok not in seen:
                    seen.add(tok)
                    picks.append(j)
            for s, j in enumerate(picks[:k]):
                targets[b, t, s] = j
    return PyAlignment(distance, path, cost, first, last, targets)


def _pad(rows, dtype=torch.int64, value=0):
    width = max([len(r) for r in rows] + [0])
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out, torch.tensor([len(r) for r in rows], dtype=dtype)


def _chars(s):
    return [ord(c) for c in s]


def _random_case(seed, batch, ref_width, rows, k, index_dtype, vocab=6, eos=EOS):
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randint(0, vocab, (batch, ref_width), generator=gen)
    ref[0, : min(2, ref_width)] = eos  # the reference may contain the EOS id itself
    ref_lens = torch.randint(0, ref_width + 1, (batch,), generator=gen)
    shape = (batch, rows) if k is None else (batch, rows, k)
    # positions in [-1, m] with m = this row's length: padding, tokens, and the end
    span = (ref_lens + 2).view((batch,) + (1,) * (len(shape) - 1))
    index = (torch.rand(shape, generator=gen) * span).long() - 1
    return ref, ref_lens, index.to(index_dtype)


# --------------------------------------------------------------------------
# The reference, by hand
# --------------------------------------------------------------------------


def test_reference_hard_by_hand():
    ref = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    ref_lens = torch.tensor([3, 2])
    index = torch.tensor([[0, 1, 2, 3, -1], [2, 1, 0, -1, -1]], dtype=torch.int32)
    labels = rac_labels_reference(ref, index, ref_lens, eos_id=EOS)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[5, 6, 7, EOS, IGN], [EOS, 9, 8, IGN, IGN]]
    # without ref_lens every row is full width: j = 4 is the end for both
    labels = rac_labels_reference(ref, torch.tensor([[3, 4], [2, 4]]), eos_id=EOS, ignore_index=-1)
    assert labels.tolist() == [[0, EOS], [0, EOS]]


def test_reference_soft_by_hand():
    ref = torch.tensor([[4, EOS, 4, 5]])
    ref_lens = torch.tensor([3])
    # candidates: 4 (j=0), EOS token in the text (j=1), 4 again (j=2), the end (j=3 -> EOS)
    index = torch.tensor([[[0, 1, 2, 3], [2, 3, -1, -1], [-1, -1, -1, -1]]])
    ids, weights = rac_labels_reference(ref, index, ref_lens, eos_id=EOS, soft=True)
    assert ids.tolist() == [[[4, EOS, IGN, IGN], [4, EOS, IGN, IGN], [IGN] * 4]]
    assert weights.dtype == torch.float32
    assert weights.tolist() == [[[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 0]]]


# --------------------------------------------------------------------------
# Triton kernel vs reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("ref_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("with_lens", [True, False])
@pytest.mark.parametrize("block_rows", [None, 4])
def test_triton_hard_matches_reference(triton_device, index_dtype, ref_dtype, with_lens, block_rows):
    ref, ref_lens, index = _random_case(1, batch=3, ref_width=7, rows=9, k=None, index_dtype=index_dtype)
    ref = ref.to(ref_dtype)
    ref_lens = ref_lens.to(index_dtype) if with_lens else None
    if not with_lens:
        index = index.clamp(max=ref.shape[1])
    want = rac_labels_reference(ref, index, ref_lens, eos_id=EOS)
    args = [x.to(triton_device) if x is not None else None for x in (ref, index, ref_lens)]
    got = rac_labels_triton(*args, eos_id=EOS, block_rows=block_rows)
    assert got.dtype == torch.int64 and got.shape == index.shape
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    assert (want == EOS).any() and (want == IGN).any()  # the case covers both ends


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block_rows", [None, 4])
def test_triton_soft_matches_reference(triton_device, k, index_dtype, block_rows):
    ref, ref_lens, index = _random_case(2, batch=2, ref_width=5, rows=7, k=k, index_dtype=index_dtype, vocab=3)
    want_ids, want_w = rac_labels_reference(ref, index, ref_lens, eos_id=EOS, soft=True)
    got_ids, got_w = rac_labels_triton(ref.to(triton_device), index.to(triton_device),
                                       ref_lens.to(triton_device), eos_id=EOS, soft=True,
                                       block_rows=block_rows)
    torch.testing.assert_close(got_ids.cpu(), want_ids, rtol=0, atol=0)
    torch.testing.assert_close(got_w.cpu(), want_w, rtol=0, atol=0)
    filled = want_w > 0
    sums = want_w.sum(-1)
    assert torch.allclose(sums[filled.any(-1)], torch.ones(())) and (sums[~filled.any(-1)] == 0).all()


def test_triton_strided_inputs(triton_device):
    ref, ref_lens, index = _random_case(3, batch=3, ref_width=6, rows=5, k=None, index_dtype=torch.int64)
    want = rac_labels_reference(ref, index, ref_lens, eos_id=EOS)
    # non-contiguous views: every other column of a wider ref, a transposed index
    wide = torch.zeros(3, 12, dtype=ref.dtype)
    wide[:, ::2] = ref
    index_t = index.t().contiguous().t()
    got = rac_labels_triton(wide[:, ::2].to(triton_device), index_t.to(triton_device),
                            ref_lens.to(triton_device), eos_id=EOS)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def test_triton_empty(triton_device):
    ref = torch.zeros(2, 0, dtype=torch.int64, device=triton_device)
    index = torch.zeros(2, 0, dtype=torch.int64, device=triton_device)
    assert rac_labels_triton(ref, index, eos_id=EOS).shape == (2, 0)
    # empty references: position 0 is the end (EOS), -1 padding
    index = torch.tensor([[0, -1], [0, 0]], device=triton_device)
    assert rac_labels_triton(ref, index, eos_id=EOS).tolist() == [[EOS, IGN], [EOS, EOS]]
    ids, weights = rac_labels_triton(ref, index[..., None], torch.zeros(2, dtype=torch.int32, device=triton_device),
                                     eos_id=EOS, soft=True)
    assert ids[..., 0].tolist() == [[EOS, IGN], [EOS, EOS]] and weights.sum().item() == 3


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ref = torch.empty(3, 7, dtype=torch.int32)
        index = torch.empty(3, 5, 4, dtype=torch.int32)
        ids, weights = torch.ops.gapfix.rac_labels_soft(ref, None, index, EOS, IGN, -1)
        labels = torch.ops.gapfix.rac_labels_hard(ref, None, index[..., 0], EOS, IGN, -1)
    assert ids.shape == weights.shape == (3, 5, 4)
    assert (ids.dtype, weights.dtype, labels.dtype) == (torch.int64, torch.float32, torch.int64)
    assert labels.shape == (3, 5)


# --------------------------------------------------------------------------
# The public function on the paper's examples (hand-made alignment)
# --------------------------------------------------------------------------

PAPER = [("60/2=30", "60/2+4=34"), ("abXc", "abc")]


def _paper_batch():
    gens = [_chars(g) for g, _ in PAPER]
    refs = [_chars(y) for _, y in PAPER]
    gen, gen_lens = _pad(gens)
    ref, ref_lens = _pad(refs, dtype=torch.int32)
    return gens, refs, gen, gen_lens, ref, ref_lens


def _decode(row):
    return [("EOS" if v == EOS else "-" if v == IGN else chr(v)) for v in row]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_paper_examples_given_alignment(impl, triton_device):
    gens, refs, gen, gen_lens, ref, ref_lens = _paper_batch()
    alignment = python_alignment(gens, refs, width=gen.shape[1])
    kw = dict(eos_id=EOS, alignment=alignment, impl=impl)
    path = rac_labels(gen, ref, gen_lens, ref_lens, **kw)
    assert _decode(path[0]) == list("60/2+34") + ["EOS"]
    assert _decode(path[1]) == list("abcc") + ["EOS", "-", "-", "-"]
    first = rac_labels(gen, ref, gen_lens, ref_lens, mode="first", **kw)
    last = rac_labels(gen, ref, gen_lens, ref_lens, mode="last", **kw)
    assert _decode(first[1])[:5] == ["a", "b", "c", "c", "EOS"]
    assert _decode(last[1])[:5] == ["a", "b", "c", "EOS", "EOS"]  # after "abX": y_2 or the end
    soft = rac_labels(gen, ref, gen_lens, ref_lens, mode="all", max_targets=2, **kw)
    assert isinstance(soft, RacTargets)
    assert torch.equal(soft.labels, first)
    assert _decode(soft.target_ids[1, 3]) == ["c", "EOS"]
    assert soft.target_weights[1, 3].tolist() == [0.5, 0.5]
    assert soft.target_weights[1, 5:].sum() == 0 and (soft.target_ids[1, 5:] == IGN).all()


def test_all_mode_truncates_to_max_targets():
    gens, refs = [[1, 2, 3]], [[4, 5, 6, 7]]  # nothing matches: many optimal positions
    gen, _ = _pad(gens)
    ref, _ = _pad(refs)
    alignment = python_alignment(gens, refs, k=4)
    out = rac_labels(gen, ref, eos_id=EOS, mode="all", max_targets=2, alignment=alignment, impl="torch")
    full = rac_labels(gen, ref, eos_id=EOS, mode="all", max_targets=4, alignment=alignment, impl="torch")
    assert out.target_ids.shape == (1, 4, 2)
    assert torch.equal(out.target_ids, full.target_ids[..., :2])
    # prefixes 1..3 have 2, 3 and 4 optimal positions, all distinct tokens: two kept
    assert (out.target_weights[0, 1:] == 0.5).all() and out.target_weights[0, 0].tolist() == [1.0, 0.0]
    assert full.target_weights[0, 3].tolist() == [0.25] * 4


# --------------------------------------------------------------------------
# Bad inputs: a ValueError naming the argument
# --------------------------------------------------------------------------


def _good():
    gens, refs, gen, gen_lens, ref, ref_lens = _paper_batch()
    return dict(gen=gen, ref=ref, gen_lens=gen_lens, ref_lens=ref_lens,
                eos_id=EOS, alignment=python_alignment(gens, refs))


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(gen=torch.zeros(2, 3, 1, dtype=torch.long)), "gen"),
        (dict(gen=torch.zeros(2, 9)), "gen"),
        (dict(gen=[[1, 2]]), "gen"),
        (dict(ref=torch.zeros(3, 9, dtype=torch.long)), "ref"),
        (dict(ref=torch.zeros(2, 9, dtype=torch.int16)), "ref"),
        (dict(gen_lens=torch.tensor([1, 2, 3])), "gen_lens"),
        (dict(gen_lens=torch.tensor([1.0, 2.0])), "gen_lens"),
        (dict(gen_lens=torch.tensor([8, 99])), "gen_lens"),
        (dict(ref_lens=torch.tensor([-1, 2])), "ref_lens"),
        (dict(eos_id=-1), "eos_id"),
        (dict(eos_id=3.0), "eos_id"),
        (dict(eos_id=True), "eos_id"),
        (dict(ignore_index=EOS), "ignore_index"),
        (dict(ignore_index="x"), "ignore_index"),
        (dict(mode="best"), "mode"),
        (dict(mode="all", max_targets=0), "max_targets"),
        (dict(max_targets=2.5), "max_targets"),
        (dict(impl="cuda"), "impl"),
        (dict(mode="all", max_targets=5), "alignment.targets"),
        (dict(alignment=PyAlignment(*[None] * 6)), "alignment.path"),
    ],
)
@pytest.mark.parametrize("impl", ["auto", "torch", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="the cases are CPU tensors"))])
def test_bad_inputs(change, name, impl):
    kwargs = {"impl": impl, **_good(), **change}
    gen, ref, gen_lens, ref_lens = (kwargs.pop(k) for k in ("gen", "ref", "gen_lens", "ref_lens"))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        rac_labels(gen, ref, gen_lens, ref_lens, **kwargs)


@pytest.mark.parametrize("value", [2**70, -(2**70), 2**63])
def test_huge_ignore_index_or_eos_id_is_a_value_error(value):
    """Labels are int64: a value outside it is refused by name, never an OverflowError."""
    kwargs = _good()
    with pytest.raises(ValueError, match="ignore_index"):
        rac_labels(**{**kwargs, "ignore_index": value})
    with pytest.raises(ValueError, match="eos_id"):
        rac_labels(**{**kwargs, "eos_id": abs(value)})


def test_missing_targets_message_names_the_count():
    kwargs = _good()
    kwargs["alignment"] = kwargs["alignment"]._replace(targets=None)
    with pytest.raises(ValueError, match=r"alignment\.targets is missing .*max_targets >= 3\)"):
        rac_labels(**kwargs, mode="all", max_targets=3)


@pytest.mark.parametrize("impl", ["auto", "torch", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="the cases are CPU tensors"))])
def test_negative_reference_ids_with_an_alignment_are_refused(impl):
    """A negative id inside ref_lens would become a label (maybe equal to ignore_index);
    align refuses it, and so does the path that reuses a caller's alignment."""
    kwargs = _good()
    ref = kwargs["ref"].clone()
    ref[1, 0] = IGN
    with pytest.raises(ValueError, match="ref holds negative"):
        rac_labels(**{**kwargs, "ref": ref, "impl": impl})
    ref[1, 0], ref[1, -1] = 5, IGN  # in the padding: allowed
    rac_labels(**{**kwargs, "ref": ref, "impl": impl})


@pytest.mark.parametrize("impl", ["auto", "torch", "triton"])
@pytest.mark.parametrize("mode", ["path", "all"])
def test_empty_batch(impl, mode, triton_device):
    """B = 0 (align handles it): empty labels, not 'cannot reshape tensor of 0 elements'."""
    gen = torch.zeros(0, 4, dtype=torch.long, device=triton_device)
    ref = torch.zeros(0, 3, dtype=torch.long, device=triton_device)
    out = rac_labels(gen, ref, eos_id=EOS, mode=mode, max_targets=2, impl=impl)
    if mode == "all":
        assert out.labels.shape == (0, 5) and out.target_ids.shape == out.target_weights.shape == (0, 5, 2)
    else:
        assert out.shape == (0, 5) and out.dtype == torch.long
    for soft, index in ((False, torch.zeros(0, 5, dtype=torch.long)), (True, torch.zeros(0, 5, 2, dtype=torch.long))):
        got = rac_labels_reference(ref.cpu(), index, eos_id=EOS, soft=soft)
        assert (got[0] if soft else got).shape == index.shape


def test_bad_alignment_positions():
    kwargs = _good()
    path = kwargs["alignment"].path.clone()
    path[1, 0] = 4  # row 1's reference has length 3: position 4 does not exist
    kwargs["alignment"] = kwargs["alignment"]._replace(path=path)
    snapshot = [(v, v.clone()) for v in kwargs.values() if isinstance(v, torch.Tensor)]
    with pytest.raises(ValueError, match="alignment.path"):
        rac_labels(**kwargs)
    for tensor, copy in snapshot:  # nothing written to the caller's tensors
        assert torch.equal(tensor, copy)
    kwargs["alignment"] = kwargs["alignment"]._replace(path=path[:, :-1])
    with pytest.raises(ValueError, match="alignment.path"):
        rac_labels(**kwargs)


def test_opcheck(triton_device):
    ref, ref_lens, index = _random_case(4, batch=2, ref_width=4, rows=3, k=2, index_dtype=torch.int32)
    ref, ref_lens, index = ref.to(triton_device), ref_lens.to(triton_device), index.to(triton_device)
    torch.library.opcheck(torch.ops.gapfix.rac_labels_soft, (ref, ref_lens, index, EOS, IGN, -1))
    torch.library.opcheck(torch.ops.gapfix.rac_labels_hard, (ref, None, index[..., 0].clamp(max=4), EOS, IGN, -1))


@pytest.mark.parametrize("mode", ["path", "all"])
def test_torch_compile_traces_without_breaks(triton_device, mode):
    # aot_eager: dynamo + AOT tracing through align's native op, the label op's
    # fake implementation and the reference, with no graph break
    g = torch.Generator().manual_seed(9)
    gen, ref = torch.randint(0, 5, (3, 7), generator=g), torch.randint(0, 5, (3, 6), generator=g)
    lens = (torch.tensor([7, 2, 0]), torch.tensor([6, 6, 1]))
    args = [x.to(triton_device) for x in (gen, ref, *lens)]

    def build(*a):
        return rac_labels(*a, eos_id=EOS, mode=mode, impl="triton")

    want = build(*args)
    got = torch.compile(build, backend="aot_eager", fullgraph=True)(*args)
    for w, o in zip(want if mode == "all" else [want], got if mode == "all" else [got]):
        torch.testing.assert_close(o, w, rtol=0, atol=0)


def test_reference_compiles_without_breaks():
    ref, ref_lens, index = _random_case(6, batch=3, ref_width=5, rows=6, k=3, index_dtype=torch.int64)
    compiled = torch.compile(rac_labels_reference, backend="aot_eager", fullgraph=True)
    for idx, soft in ((index[..., 0], False), (index, True)):
        want = rac_labels_reference(ref, idx, ref_lens, eos_id=EOS, soft=soft)
        got = compiled(ref, idx, ref_lens, eos_id=EOS, soft=soft)
        for w, o in zip(want if soft else [want], got if soft else [got]):
            torch.testing.assert_close(o, w, rtol=0, atol=0)


@pytest.mark.cuda
def test_compile_fullgraph_matches_eager():
    ref, ref_lens, index = _random_case(5, batch=4, ref_width=33, rows=41, k=4, index_dtype=torch.int32)
    ref, ref_lens, index = ref.cuda(), ref_lens.cuda(), index.cuda()

    def build(r, lens, idx):
        return rac_labels_triton(r, idx, lens, eos_id=EOS, soft=True)

    want = rac_labels_reference(ref, index, ref_lens, eos_id=EOS, soft=True)
    got = torch.compile(build, fullgraph=True)(ref, ref_lens, index)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------
# End to end through gapfix.align
# --------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "auto", "triton"])
def test_paper_examples_through_align(impl, triton_device):
    _, _, gen, gen_lens, ref, ref_lens = _paper_batch()
    path = rac_labels(gen, ref, gen_lens, ref_lens, eos_id=EOS, impl=impl)
    assert _decode(path[0]) == list("60/2+34") + ["EOS"]
    assert _decode(path[1]) == list("abcc") + ["EOS", "-", "-", "-"]


@pytest.mark.parametrize("seed", range(3))
def test_random_batches_match_python_dp(seed):
    # small vocabulary: many ties, repeated tokens, several optimal positions per prefix
    g = torch.Generator().manual_seed(seed)
    gens = [torch.randint(0, 3, (int(n),), generator=g).tolist() for n in torch.randint(0, 9, (5,), generator=g)]
    refs = [torch.randint(0, 3, (int(n),), generator=g).tolist() for n in torch.randint(0, 9, (5,), generator=g)]
    gen, gen_lens = _pad(gens, dtype=torch.int32)
    ref, ref_lens = _pad(refs)
    want = python_alignment(gens, refs, width=gen.shape[1], k=3)
    for mode in ("path", "first", "last"):
        expected = rac_labels_reference(ref, getattr(want, mode), ref_lens, eos_id=EOS)
        got = rac_labels(gen, ref, gen_lens, ref_lens, eos_id=EOS, mode=mode, impl="torch")
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=mode)
    ids, weights = rac_labels_reference(ref, want.targets, ref_lens, eos_id=EOS, soft=True)
    soft = rac_labels(gen, ref, gen_lens, ref_lens, eos_id=EOS, mode="all", max_targets=3, impl="torch")
    torch.testing.assert_close(soft.target_ids, ids, rtol=0, atol=0)
    torch.testing.assert_close(soft.target_weights, weights, rtol=0, atol=0)
    first = rac_labels(gen, ref, gen_lens, ref_lens, eos_id=EOS, mode="first", impl="torch")
    torch.testing.assert_close(soft.labels, first, rtol=0, atol=0)  # the hard label of "all"


@pytest.mark.parametrize("mode", ["path", "last", "all"])
def test_triton_through_align_matches_torch(triton_device, mode):
    g = torch.Generator().manual_seed(11)
    gen = torch.randint(0, 4, (3, 6), generator=g)
    ref = torch.randint(0, 4, (3, 5), generator=g)
    gen_lens, ref_lens = torch.tensor([6, 0, 3]), torch.tensor([5, 2, 0])
    want = rac_labels(gen, ref, gen_lens, ref_lens, eos_id=EOS, mode=mode, max_targets=3, impl="torch")
    dev = [x.to(triton_device) for x in (gen, ref, gen_lens, ref_lens)]
    got = rac_labels(*dev, eos_id=EOS, mode=mode, max_targets=3, impl="triton")
    for w, o in zip(want if mode == "all" else [want], got if mode == "all" else [got]):
        torch.testing.assert_close(o.cpu(), w, rtol=0, atol=0)


_COMPILE_SM90 = """
import sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(77)
from gapfix.kernels.rac_labels import rac_labels_kernel
ints = ["n_rows", "T", "K", "ref_width", "stride_rb", "stride_rt", "stride_ib", "stride_it",
        "stride_ik", "stride_ob", "stride_ot", "stride_ok", "eos_id", "ignore_index"]
signature = {"ref_ptr": "*i32", "ref_lens_ptr": "*i64", "index_ptr": "*i32", "ids_ptr": "*i64",
             "weights_ptr": "*fp32", **{name: "i32" for name in ints},
             **{name: "constexpr" for name in ("HAS_REF_LENS", "SOFT", "BLOCK_ROWS", "BLOCK_K")}}
for soft, block_k, has_lens in ((False, 1, True), (True, 1, False), (True, 4, True), (True, 8, True)):
    constexprs = {"HAS_REF_LENS": has_lens, "SOFT": soft, "BLOCK_ROWS": 2048 // block_k ** 2, "BLOCK_K": block_k}
    source = ASTSource(fn=rac_labels_kernel, signature=signature, constexprs=constexprs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" in str(exc):
            sys.exit(77)
        raise
    assert ".entry rac_labels_kernel" in compiled.asm["ptx"], (soft, block_k)
"""


def test_kernel_compiles_for_sm90():
    """Lowers every kernel variant to PTX for an H100 without a GPU: catches what
    the interpreter accepts but the compiler rejects. In a fresh process, since
    the interpreter patches triton.language while this one runs kernels."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode == 77:
        pytest.skip("this Triton cannot compile for NVIDIA ahead of time")
    assert done.returncode == 0, done.stderr[-3000:]
