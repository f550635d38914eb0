"""Benchmarks: the token-mixing embedding and the BASH prediction pass.

    python -m pytest bench/test_bench_mix_embedding.py --benchmark-only            # CPU
    python -m pytest bench/test_bench_mix_embedding.py --benchmark-only -m cuda    # GPU

pytest-benchmark times gapfix; the baseline is timed in the same test,
interleaved with gapfix round by round, in alternating order (the machine may
be shared, so both see the same load), and extra_info records both medians and
minima, their ratios (gapfix / baseline: below 1 is faster), the bytes the op
must move and the achieved bandwidth (from the medians).

- forward and forward+backward of gapfix.mix_embedding vs torch.where +
  F.embedding: with an explicit mask (both get the same mask), and with beta
  (gapfix draws its Philox mask; the baseline draws torch.rand(N) < beta);
- per-row seeds (one Philox key per row, as the trainer's BASH step passes) vs one int
  seed, forward and the mask draw alone (CPU): the cost of a world-size-independent mask;
- GPU forward bandwidth vs a measured device-to-device copy (target >= 85%);
- GPU backward vs PyTorch's embedding backward (atomic and deterministic);
- predict_alternatives vs one plain forward of the model (target: <= 1x).
"""
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import gapfix
from gapfix.methods.bash import predict_alternatives
from gapfix.ops.mix_embedding import mixing_mask

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

# CPU: 8 x 1024 tokens, a 32k vocabulary, width 512
CPU_SHAPE = dict(num_tokens=8 * 1024, vocab=32_000, dim=512)
# GPU: 8 x 2048 tokens, a Llama-3 vocabulary, width 4096
GPU_SHAPE = dict(num_tokens=8 * 2048, vocab=128_256, dim=4096)
BETA = 0.2


def _inputs(num_tokens, vocab, dim, dtype, device, seed=0):
    # drawn on the device: a 128k x 4096 table drawn on the host would take seconds
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=gen, device=device).to(dtype)
    ids = torch.randint(0, vocab, (num_tokens,), generator=gen, device=device)
    alt = torch.randint(0, vocab, (num_tokens,), generator=gen, device=device)
    mask = torch.rand(num_tokens, generator=gen, device=device) < BETA
    grad = torch.randn(num_tokens, dim, generator=gen, device=device).to(dtype)
    return weight, ids, alt, mask, grad


def _synced(fn, device):
    if device == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        return run
    return fn


def _interleaved_times(fns, rounds, warmup=2):
    """Per-function (median, min) seconds; the call order alternates between rounds."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for r in range(rounds):
        order = list(range(len(fns)))
        if r % 2:
            order.reverse()
        for i in order:
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), min(t)) for t in times]


def _compare(benchmark, ours, baseline, *, device, rounds, bytes_moved=None):
    ours, baseline = _synced(ours, device), _synced(baseline, device)
    (t_ours, min_ours), (t_base, min_base) = _interleaved_times([ours, baseline], rounds)
    info = benchmark.extra_info
    info.update(gapfix_ms=round(t_ours * 1e3, 3), baseline_ms=round(t_base * 1e3, 3),
                ratio=round(t_ours / t_base, 3), gapfix_min_ms=round(min_ours * 1e3, 3),
                baseline_min_ms=round(min_base * 1e3, 3), ratio_of_mins=round(min_ours / min_base, 3))
    if bytes_moved is not None:
        info.update(bytes_moved=bytes_moved, gapfix_GBps=round(bytes_moved / t_ours / 1e9, 1),
                    baseline_GBps=round(bytes_moved / t_base / 1e9, 1))
    benchmark.pedantic(ours, rounds=rounds, iterations=1, warmup_rounds=1)
    return t_ours, t_base


def _baseline_rows(mode, mask, ids, alt):
    """The rows torch.where + F.embedding reads: the given mask, or a fresh torch.rand draw."""
    if mode == "mask":
        return lambda: torch.where(mask, alt, ids)
    return lambda: torch.where(torch.rand(ids.shape, device=ids.device) < BETA, alt, ids)


def _forward_bytes(num_tokens, dim, elt, mask_given):
    # ids + alt ids (int64) + mask in (if given) + mask out, and one row read + written per token
    return num_tokens * (8 + 8 + (1 if mask_given else 0) + 1) + 2 * num_tokens * dim * elt


def _backward_bytes(num_tokens, vocab, dim, elt):
    # the forward's reads, then: grad read, touched rows written, the rest of dW zeroed
    return num_tokens * (8 + 8 + 1) + num_tokens * dim * elt + vocab * dim * elt


# ---------------------------------------------------------------------------- CPU

def _forward(benchmark, mode, dtype, device, shape, rounds):
    """gapfix forward vs torch.where + F.embedding; returns (gapfix seconds, bytes moved)."""
    weight, ids, alt, mask, _ = _inputs(**shape, dtype=dtype, device=device)
    kwargs = {"mask": mask} if mode == "mask" else {"beta": BETA, "seed": 7}
    rows = _baseline_rows(mode, mask, ids, alt)
    moved = _forward_bytes(shape["num_tokens"], shape["dim"], weight.element_size(), mode == "mask")
    benchmark.group = f"mix_embedding forward {device} {dtype}"
    t_ours, _ = _compare(benchmark, lambda: gapfix.mix_embedding(weight, ids, alt, **kwargs),
                         lambda: F.embedding(rows(), weight), device=device, rounds=rounds,
                         bytes_moved=moved)
    return t_ours, moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["mask", "beta"])
def test_forward_cpu(benchmark, mode, dtype):
    _forward(benchmark, mode, dtype, "cpu", CPU_SHAPE, rounds=41)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["mask", "beta"])
def test_forward_backward_cpu(benchmark, mode, dtype):
    s = CPU_SHAPE
    weight, ids, alt, mask, grad = _inputs(**s, dtype=dtype, device="cpu")
    weight.requires_grad_(True)
    kwargs = {"mask": mask} if mode == "mask" else {"beta": BETA, "seed": 7}
    rows = _baseline_rows(mode, mask, ids, alt)
    benchmark.group = f"mix_embedding forward+backward cpu {dtype}"
    _compare(benchmark,
             lambda: torch.autograd.grad(gapfix.mix_embedding(weight, ids, alt, **kwargs)[0], weight, grad),
             lambda: torch.autograd.grad(F.embedding(rows(), weight), weight, grad),
             device="cpu", rounds=15,
             bytes_moved=_forward_bytes(s["num_tokens"], s["dim"], weight.element_size(), mode == "mask")
             + _backward_bytes(s["num_tokens"], s["vocab"], s["dim"], weight.element_size()))


@pytest.mark.parametrize("what", ["forward", "mask"])
def test_row_seeds_vs_int_seed_cpu(benchmark, what):
    """Per-row seeds (8 rows of 1024) against one int seed on the same tokens, fp32; the
    baseline here is gapfix with the int seed, so the ratio is the cost of per-row keys."""
    s = CPU_SHAPE
    rows = 8
    weight, ids, alt, _, _ = _inputs(**s, dtype=torch.float32, device="cpu")
    ids, alt = ids.view(rows, -1), alt.view(rows, -1)
    seeds = torch.randint(0, 2**62, (rows,), generator=torch.Generator().manual_seed(3))
    if what == "forward":
        run = lambda seed: lambda: gapfix.mix_embedding(weight, ids, alt, beta=BETA, seed=seed)  # noqa: E731
    else:
        run = lambda seed: lambda: mixing_mask(ids.shape, beta=BETA, seed=seed)  # noqa: E731
    benchmark.group = f"mix_embedding per-row seeds cpu {what}"
    benchmark.extra_info.update(rows=rows, tokens=s["num_tokens"])
    _compare(benchmark, run(seeds), run(7), device="cpu", rounds=41)


def _tiny_llama(hidden, layers, vocab, dtype, device):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=max(1, hidden // 64),
                                      num_key_value_heads=max(1, hidden // 256),
                                      intermediate_size=4 * hidden, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs
        return transformers.LlamaForCausalLM(config).to(dtype=dtype).eval()


def _prediction_pass(benchmark, model, batch, seq, device, rounds):
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    answer_mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    answer_mask[:, seq // 4:] = True  # the last three quarters are the answer

    def plain_forward():
        with torch.no_grad():
            return model(input_ids=input_ids).logits

    benchmark.extra_info.update(batch=batch, seq=seq, vocab=vocab, hidden=model.config.hidden_size)
    _compare(benchmark, lambda: predict_alternatives(model, input_ids, None, answer_mask),
             plain_forward, device=device, rounds=rounds)


def test_prediction_pass_cpu(benchmark):
    benchmark.group = "bash prediction pass cpu"
    model = _tiny_llama(hidden=256, layers=4, vocab=32_000, dtype=torch.float32, device="cpu")
    _prediction_pass(benchmark, model, batch=4, seq=256, device="cpu", rounds=7)


# ---------------------------------------------------------------------------- GPU

def _copy_seconds(num_bytes):
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ((t, _),) = _interleaved_times([_synced(lambda: dst.copy_(src), "cuda")], rounds=20)
    return t


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["mask", "beta"])
def test_forward_cuda(benchmark, mode, dtype):
    t_ours, moved = _forward(benchmark, mode, dtype, "cuda", GPU_SHAPE, rounds=30)
    s = GPU_SHAPE
    row_bytes = s["num_tokens"] * s["dim"] * dtype.itemsize
    copy_gbps = 2 * row_bytes / _copy_seconds(row_bytes) / 1e9  # a copy reads and writes
    benchmark.extra_info.update(copy_GBps=round(copy_gbps, 1),
                                fraction_of_copy=round(moved / t_ours / 1e9 / copy_gbps, 3))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype,deterministic", [(torch.bfloat16, False), (torch.float32, False),
                                                 (torch.float32, True)],
                         ids=["bf16", "fp32-atomic", "fp32-deterministic"])
def test_backward_cuda(benchmark, dtype, deterministic):
    s = GPU_SHAPE
    weight, ids, alt, mask, grad = _inputs(**s, dtype=dtype, device="cuda")
    weight.requires_grad_(True)
    embeds, _ = gapfix.mix_embedding(weight, ids, alt, mask=mask, deterministic=deterministic)
    reference = F.embedding(torch.where(mask, alt, ids), weight)
    benchmark.group = f"mix_embedding backward cuda {dtype}"
    _compare(benchmark,
             lambda: torch.autograd.grad(embeds, weight, grad, retain_graph=True),
             lambda: torch.autograd.grad(reference, weight, grad, retain_graph=True),
             device="cuda", rounds=20,
             bytes_moved=_backward_bytes(s["num_tokens"], s["vocab"], s["dim"], weight.element_size()))


@pytest.mark.cuda
@needs_cuda
def test_prediction_pass_cuda(benchmark):
    benchmark.group = "bash prediction pass cuda"
    model = _tiny_llama(hidden=1024, layers=8, vocab=128_256, dtype=torch.bfloat16, device="cuda")
    _prediction_pass(benchmark, model, batch=8, seq=1024, device="cuda", rounds=10)
