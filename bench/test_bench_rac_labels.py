"""Benchmarks: RAC label construction and the RAC row builder.

Each benchmark times the fast path with pytest-benchmark and its baseline in
the same run, and records both and their ratio in extra_info:

    python -m pytest bench/test_bench_rac_labels.py --benchmark-only

- build_rac_rows over a batch (one align + one rac_labels call) vs the same
  pairs one call each (CPU).
- the Triton label kernel vs the PyTorch reference on the same CUDA tensors
  (hard and soft layouts; GPU only).
"""

import pytest
import torch

from gapfix.methods.rac import build_rac_rows
from gapfix.ops.rac_labels import rac_labels_reference, rac_labels_triton

from _timing import median_seconds

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
EOS = 2


def _answers(count, length, vocab=500, edit_rate=0.1, seed=0):
    """References and noisy copies of them (substitutions, insertions, deletions)."""
    g = torch.Generator().manual_seed(seed)
    prompts, generated, references = [], [], []
    for _ in range(count):
        ref = torch.randint(3, vocab, (length,), generator=g).tolist()
        out = []
        for tok in ref:
            r = float(torch.rand((), generator=g))
            if r < edit_rate / 3:
                continue  # deletion
            out.append(int(torch.randint(3, vocab, (), generator=g)) if r < 2 * edit_rate / 3 else tok)
            if r > 1 - edit_rate / 3:
                out.append(int(torch.randint(3, vocab, (), generator=g)))  # insertion
        prompts.append(torch.randint(3, vocab, (16,), generator=g).tolist())
        generated.append(out + [EOS])
        references.append(ref + [EOS])
    return prompts, generated, references


@pytest.mark.parametrize("mode", ["path", "all"])
def test_bench_build_rows_batched_vs_per_pair(benchmark, mode):
    prompts, generated, references = _answers(count=64, length=96)
    kwargs = dict(eos_id=EOS, mode=mode)

    def batched():
        return build_rac_rows(prompts, generated, references, **kwargs)

    def per_pair():
        return [build_rac_rows([p], [g], [y], **kwargs) for p, g, y in zip(prompts, generated, references)]

    baseline = median_seconds(per_pair)
    rows, _ = benchmark(batched)
    assert [r for one in per_pair() for r in one[0]] == rows
    benchmark.extra_info.update(pairs=64, length=96, baseline_per_pair_s=baseline,
                                speedup=baseline / benchmark.stats.stats.median)


def _cuda_case(batch, rows, k, ref_width=512, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ref = torch.randint(0, 32000, (batch, ref_width), device="cuda", generator=g, dtype=torch.int32)
    ref_lens = torch.randint(ref_width // 2, ref_width + 1, (batch,), device="cuda", generator=g, dtype=torch.int32)
    span = (ref_lens.long() + 2).view(batch, 1, 1)
    index = (torch.rand((batch, rows, k), device="cuda", generator=g) * span).long() - 1
    return ref, ref_lens, index.to(torch.int32)


def _cuda_seconds(fn):
    torch.cuda.synchronize()

    def timed():
        fn()
        torch.cuda.synchronize()

    return median_seconds(timed, repeat=20)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("rows", [512, 2049])
def test_bench_label_kernel_vs_reference_cuda(benchmark, soft, rows):
    batch, k = 256, (4 if soft else 1)
    ref, ref_lens, index = _cuda_case(batch, rows, k)
    if not soft:
        index = index[..., 0]
    kwargs = dict(eos_id=EOS, soft=soft)
    want = rac_labels_reference(ref, index, ref_lens, **kwargs)
    got = rac_labels_triton(ref, index, ref_lens, **kwargs)
    for w, o in zip(want if soft else [want], got if soft else [got]):
        torch.testing.assert_close(o, w, rtol=0, atol=0)
    baseline = _cuda_seconds(lambda: rac_labels_reference(ref, index, ref_lens, **kwargs))

    def fast():
        rac_labels_triton(ref, index, ref_lens, **kwargs)
        torch.cuda.synchronize()

    benchmark(fast)
    moved = index.numel() * (4 + 4 + 8 + (4 if soft else 0))  # index, token, id, weight
    benchmark.extra_info.update(batch=batch, rows=rows, k=k, reference_s=baseline,
                                speedup=baseline / benchmark.stats.stats.median,
                                gbytes_per_s=moved / benchmark.stats.stats.median / 1e9)
