"""Benchmark: refreshing a vLLM engine's weights from an in-memory model, gapfix's push
(`push_weights`: tensors copied in, nothing on disk) vs the path it replaced (save_pretrained
into a folder, then vLLM's `reload_weights` from that folder).

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_vllm_push.py --benchmark-only -s

pytest-benchmark times the push; the save+reload baseline is timed in the same test, round by
round interleaved with it, on an engine loaded from that folder (engines built once, not
timed). extra_info records both medians, their ratio and every round's time. float32 Llamas
with random weights built locally: the demo's size (2 layers, width 128, 512-token vocabulary,
~0.7M parameters) and ~58M parameters (8 layers, width 512, 32k vocabulary, untied head).
"""
import statistics
import tempfile
import time

import pytest
import torch

from gapfix.generation import release_engines, vllm_available
from gapfix.generation.vllm_backend import _saved_copy, push_weights
from gapfix.models import save_model, tiny_llama

CASES = {
    "demo-size": dict(vocab=512, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, rounds=7),
    "50M": dict(vocab=32000, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408, rounds=5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_push_vs_save_and_reload(benchmark, name):
    if not vllm_available():
        pytest.skip("vllm is not installed")
    from gapfix.generation.vllm_backend import _engine_for, _pushed_engine_for

    spec = dict(CASES[name])
    rounds, vocab = spec.pop("rounds"), spec.pop("vocab")
    model = tiny_llama(vocab, max_position_embeddings=256, seed=0, dtype=torch.float32, **spec)
    params = sum(p.numel() for p in model.parameters())
    llm = _pushed_engine_for(model, _saved_copy(model, None), None, {}, False)[1].llm
    push_times, reload_times = [], []
    with tempfile.TemporaryDirectory() as folder:
        # the baseline's engine loads from disk (vLLM cannot reload a load_format="dummy" one so)
        disk_llm = _engine_for(save_model(model, None, folder), None, {}, False)[1].llm

        def save_and_reload():
            start = time.perf_counter()
            save_model(model, None, folder)
            disk_llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
            disk_llm.reset_prefix_cache()
            reload_times.append(time.perf_counter() - start)

        def push():
            save_and_reload()  # interleaved: both see the same machine load
            start = time.perf_counter()
            push_weights(llm, model)
            push_times.append(time.perf_counter() - start)

        benchmark.pedantic(push, rounds=rounds, iterations=1, warmup_rounds=1)
    push_times, reload_times = push_times[1:], reload_times[1:]  # without the warm-up round
    push_median, reload_median = statistics.median(push_times), statistics.median(reload_times)
    benchmark.extra_info.update(
        parameters=params, push_median_s=push_median, save_reload_median_s=reload_median,
        speedup=reload_median / push_median, push_rounds_s=push_times, save_reload_rounds_s=reload_times)
    print(f"\n{name} ({params / 1e6:.1f}M parameters): push {push_median * 1e3:.1f} ms, "
          f"save+reload {reload_median * 1e3:.1f} ms, {reload_median / push_median:.1f}x")
    release_engines()
