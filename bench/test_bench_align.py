"""Benchmarks: gapfix.align (batched prefix alignment) against per-pair
Levenshtein libraries on the same pairs, in the same run.

    python -m pytest bench/test_bench_align.py --benchmark-only

CPU: 256 pairs x {256, 1024, 4096} tokens x {10%, 50%} edits, ids from a
256k vocabulary. gapfix.align (all outputs: distance, path, prefix minima) is
timed by pytest-benchmark; the baselines are timed in the same test, each a
Python loop over pairs already converted to lists of ints:
rapidfuzz.distance.Levenshtein.editops (an alignment, like ours) and .distance
(the distance alone), and edlib.align(task="path"), which refuses more than 256
distinct ids per pair (recorded when it does). extra_info holds pairs/s, cell
updates/s (n*m per pair) and the ratios, with gapfix at the default torch
thread count and at one thread (the baselines are single-threaded).

GPU (marked cuda): 4096 pairs of 1024 x 1024, GCUPS, against the CPU kernel on
the same pairs.
"""

import numpy as np
import pytest
import torch

import gapfix

from _timing import median_seconds

VOCAB = 256_000
PAIRS = 256


def make_pairs(pairs, length, edit_rate, seed=0):
    """References of `length` ids and generated answers derived from them by
    deleting, substituting or inserting after each token, each with
    probability edit_rate / 3."""
    rng = np.random.default_rng(seed)
    gens, refs = [], []
    for _ in range(pairs):
        ref = rng.integers(0, VOCAB, length)
        r = rng.random(length)
        third = edit_rate / 3
        kept = ref.copy()
        substituted = (r >= third) & (r < 2 * third)
        kept[substituted] = rng.integers(0, VOCAB, int(substituted.sum()))
        emit = np.where(r < third, 0, np.where(r > 1 - third, 2, 1))
        out = np.repeat(kept, emit)
        inserted = np.cumsum(emit)[emit == 2] - 1  # the second copy of each doubled token
        out[inserted] = rng.integers(0, VOCAB, len(inserted))
        gens.append(out.tolist())
        refs.append(ref.tolist())
    return gens, refs


def pad(rows):
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out, torch.tensor([len(r) for r in rows])


def with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("edit_rate", [0.1, 0.5])
@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_bench_align_cpu(benchmark, length, edit_rate):
    Levenshtein = pytest.importorskip("rapidfuzz.distance", reason="the baseline is rapidfuzz").Levenshtein

    gens, refs = make_pairs(PAIRS, length, edit_rate)
    gen, gen_lens = pad(gens)
    ref, ref_lens = pad(refs)
    cells = sum(len(g) * len(y) for g, y in zip(gens, refs))

    def run():
        return gapfix.align(gen, ref, gen_lens, ref_lens)

    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    t_gapfix = median_seconds(run)
    t_gapfix_1 = with_threads(1, lambda: median_seconds(run))
    t_editops = median_seconds(lambda: [Levenshtein.editops(g, y) for g, y in zip(gens, refs)])
    t_distance = median_seconds(lambda: [Levenshtein.distance(g, y) for g, y in zip(gens, refs)])
    # Same pairs, same answer.
    sample = range(0, PAIRS, 37)
    assert [int(out.distance[i]) for i in sample] == [Levenshtein.distance(gens[i], refs[i]) for i in sample]

    info = benchmark.extra_info
    info.update(
        case=f"{PAIRS} pairs x {length} tokens, {int(edit_rate * 100)}% edits, vocab {VOCAB}",
        threads=torch.get_num_threads(),
        gapfix_pairs_per_s=PAIRS / t_gapfix,
        gapfix_cells_per_s=cells / t_gapfix,
        gapfix_1thread_pairs_per_s=PAIRS / t_gapfix_1,
        rapidfuzz_editops_pairs_per_s=PAIRS / t_editops,
        rapidfuzz_distance_pairs_per_s=PAIRS / t_distance,
        ratio_vs_editops=t_editops / t_gapfix,
        ratio_vs_distance=t_distance / t_gapfix,
        ratio_vs_editops_1thread=t_editops / t_gapfix_1,
        ratio_vs_distance_1thread=t_distance / t_gapfix_1,
        throughput=PAIRS / t_gapfix,
        baseline="rapidfuzz Levenshtein.editops",
        ratio=t_editops / t_gapfix,
    )
    try:
        import edlib
    except ImportError:
        info["edlib"] = "not installed"
    else:
        try:
            t_edlib = median_seconds(lambda: [edlib.align(g, y, task="path") for g, y in zip(gens, refs)], repeat=1)
        except ValueError as exc:
            info["edlib"] = f"cannot run: {exc}"
        else:
            info["edlib_pairs_per_s"] = PAIRS / t_edlib
            info["ratio_vs_edlib"] = t_edlib / t_gapfix


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_align_cuda_gcups(benchmark):
    from gapfix.ops.align import _has_native_kernel

    if not _has_native_kernel("cuda"):
        pytest.skip("gapfix._C was built without CUDA")
    pairs, length = 4096, 1024
    gens, refs = make_pairs(pairs, length, 0.1, seed=1)
    gens = [g[:length] + [0] * (length - len(g[:length])) for g in gens]  # exactly 1024 x 1024
    gen, _ = pad(gens)
    ref, _ = pad(refs)
    gen_c, ref_c = gen.cuda(), ref.cuda()
    cells = pairs * length * length

    def run():
        out = gapfix.align(gen_c, ref_c)
        torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    t_gpu = median_seconds(run, repeat=10)
    t_cpu = median_seconds(lambda: gapfix.align(gen, ref), repeat=1)
    cpu = gapfix.align(gen, ref)
    for field in ("distance", "path", "cost", "first", "last"):
        assert torch.equal(getattr(out, field).cpu(), getattr(cpu, field)), field
    benchmark.extra_info.update(
        case=f"{pairs} pairs x {length} x {length}, 10% edits",
        device=torch.cuda.get_device_name(),
        gcups=cells / t_gpu / 1e9,
        pairs_per_s=pairs / t_gpu,
        cpu_threads=torch.get_num_threads(),
        cpu_gcups=cells / t_cpu / 1e9,
        throughput=cells / t_gpu / 1e9,
        throughput_unit="GCUPS",
        baseline=f"gapfix CPU kernel, {torch.get_num_threads()} threads",
        ratio=t_cpu / t_gpu,
    )
