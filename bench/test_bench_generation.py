"""Benchmark: generated tokens/s of gapfix.generate's vLLM backend vs its
transformers (hf) backend, same model, same prompts, same process.

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_generation.py --benchmark-only -s   # CPU
    python -m pytest bench/test_bench_generation.py --benchmark-only -s -m cuda  # GPU

pytest-benchmark times the vLLM backend (engine start-up excluded: the engine
is built and warmed first, as in a trainer that regenerates every iteration);
the hf backend is timed in the same test, interleaved round by round with the
vLLM one so that both see the same machine load. extra_info records both
median tokens/s, every round's, their ratio (vllm / hf; the target is >= 5 at
batch 64) and the machine's load average (on a shared machine, rounds vary a
lot: read the ratio with the rounds).

Greedy cases use a model saved without an EOS id, so that every answer runs
to max_new_tokens: the same token count for both. The sampled case stops
answers at different lengths (as RAC's regenerated answers do); each backend's
rate counts the tokens it generated. The model is a
Llama with random weights built locally (nothing downloaded), in float32 on
CPU and bfloat16 on GPU.
"""
import os
import statistics
import time

import pytest
import torch

from gapfix.generation import generate, release_engines, vllm_available
from gapfix.models import save_model, tiny_llama

HAS_CUDA = torch.cuda.is_available()

_SMALL = dict(vocab=8192, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704,
              dtype=torch.float32)
# CPU, 64 prompts of 32 tokens, greedy, every answer max_new_tokens long (no
# EOS) unless said otherwise: the demo's size (2 layers, width 128: per-step
# overhead dominates) and a ~7M-parameter Llama (4 layers, width 256, 8k vocab:
# compute dominates on 2 cores), with 32 and 256 new tokens; then the RAC
# regeneration case: sampling at temperature 1 with 60 stop ids (each step
# stops with p ~ 0.7%), so answers end at different lengths (~100 tokens on
# average, at most 256), as real answers do.
CPU_CASES = {
    "demo-size": dict(model=dict(vocab=512, hidden_size=128, num_layers=2, num_heads=4,
                                 intermediate_size=512, dtype=torch.float32),
                      prompts=64, prompt_len=32, new_tokens=32, rounds=5),
    "7M": dict(model=_SMALL, prompts=64, prompt_len=32, new_tokens=32, rounds=3),
    "7M-256-new": dict(model=_SMALL, prompts=64, prompt_len=32, new_tokens=256, rounds=3),
    "7M-sampled-variable-length": dict(model=_SMALL, prompts=64, prompt_len=32, new_tokens=256,
                                       rounds=3, temperature=1.0, stop_ids=60),
}
# GPU: a ~1B-parameter Llama (16 layers, width 2048, head_dim 64, 32k vocab);
# 64 prompts of 128 tokens, 256 new tokens each.
GPU_CASE = dict(model=dict(vocab=32000, hidden_size=2048, num_layers=16, num_heads=32,
                           intermediate_size=5632, dtype=torch.bfloat16),
                prompts=64, prompt_len=128, new_tokens=256, rounds=3)
FIRST_PROMPT_ID = 200  # prompts avoid the stop ids (100 ...)


def _vllm_or_skip():
    if not vllm_available():
        pytest.skip("vllm is not installed")


def _model_dir(case, tmp_path):
    spec = dict(case["model"])
    vocab = spec.pop("vocab")
    model = tiny_llama(vocab, max_position_embeddings=1024, seed=0, **spec)
    # Greedy cases have no EOS: a random model would stop at different points
    # on each backend's rounding; without one every answer is new_tokens long.
    stops = list(range(100, 100 + case["stop_ids"])) if case.get("stop_ids") else None
    model.config.eos_token_id = stops
    model.generation_config.eos_token_id = stops
    return save_model(model, None, tmp_path / "bench-model")


def _prompts(case, vocab):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(FIRST_PROMPT_ID, vocab, (case["prompts"], case["prompt_len"]),
                         generator=gen).tolist()


def _run(model, prompts, case, backend, **extra):
    """Generated tokens (a final stop token counts: it took a decoding step)."""
    results = generate(model, prompts, backend=backend, max_new_tokens=case["new_tokens"],
                       batch_size=len(prompts), tokenizer=False,
                       temperature=case.get("temperature", 0.0), seed=0, **extra)
    tokens = sum(len(r.token_ids) + (r.finish_reason == "eos") for r in results)
    if not case.get("stop_ids"):
        assert tokens == len(prompts) * case["new_tokens"]
    return tokens


def _compare(benchmark, case, tmp_path, hf_model, model_dir, engine_kwargs=None):
    prompts = _prompts(case, case["model"]["vocab"])
    small = prompts[:2]
    # warm both: build and cache the vLLM engine, run transformers once
    _run(model_dir, small, dict(case, new_tokens=4), "vllm", engine_kwargs=engine_kwargs)
    _run(hf_model, small, dict(case, new_tokens=4), "hf")

    hf_rounds, vllm_rounds = [], []  # (tokens, seconds)

    def hf_round():
        # pedantic's untimed set-up: one hf round right before each vLLM round,
        # timed here, so that both see the same machine load
        start = time.perf_counter()
        tokens = _run(hf_model, prompts, case, "hf")
        hf_rounds.append((tokens, time.perf_counter() - start))

    def vllm_round():
        start = time.perf_counter()
        tokens = _run(model_dir, prompts, case, "vllm", engine_kwargs=engine_kwargs)
        vllm_rounds.append((tokens, time.perf_counter() - start))

    benchmark.pedantic(vllm_round, setup=hf_round, rounds=case["rounds"], iterations=1)
    hf_rates = [tokens / seconds for tokens, seconds in hf_rounds]
    vllm_rates = [tokens / seconds for tokens, seconds in vllm_rounds]
    hf_rate, vllm_rate = statistics.median(hf_rates), statistics.median(vllm_rates)
    benchmark.extra_info.update(
        batch=len(prompts), prompt_tokens=case["prompt_len"], max_new_tokens=case["new_tokens"],
        temperature=case.get("temperature", 0.0),
        mean_answer_tokens=[round(t / len(prompts), 1) for t, _ in hf_rounds[:1] + vllm_rounds[:1]],
        params_m=round(sum(p.numel() for p in hf_model.parameters()) / 1e6, 1),
        hf_tokens_per_s=round(hf_rate, 1), vllm_tokens_per_s=round(vllm_rate, 1),
        ratio_vllm_over_hf=round(vllm_rate / hf_rate, 2), torch_threads=torch.get_num_threads(),
        hf_round_tokens_per_s=[round(r) for r in hf_rates],
        vllm_round_tokens_per_s=[round(r) for r in vllm_rates],
        load_average_1min=round(os.getloadavg()[0], 2),
    )
    info = benchmark.extra_info
    print(f"\ngeneration, batch {len(prompts)}, {info['params_m']}M params: "
          f"hf {hf_rate:.0f} tok/s (rounds {info['hf_round_tokens_per_s']}), "
          f"vllm {vllm_rate:.0f} tok/s (rounds {info['vllm_round_tokens_per_s']}), "
          f"ratio {vllm_rate / hf_rate:.2f}x, mean answer {info['mean_answer_tokens']} tokens, "
          f"load average {info['load_average_1min']}")
    release_engines()
    return vllm_rate / hf_rate


@pytest.mark.benchmark(group="generation")
@pytest.mark.parametrize("size", list(CPU_CASES))
def test_generation_tokens_per_s_cpu(benchmark, tmp_path, size):
    _vllm_or_skip()
    case = CPU_CASES[size]
    model_dir = _model_dir(case, tmp_path)
    from gapfix.models import load_model

    hf_model, _ = load_model(model_dir)
    _compare(benchmark, case, tmp_path, hf_model, model_dir)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.benchmark(group="generation")
def test_generation_tokens_per_s_cuda(benchmark, tmp_path):
    _vllm_or_skip()
    model_dir = _model_dir(GPU_CASE, tmp_path)
    from gapfix.models import load_model

    hf_model, _ = load_model(model_dir, device="cuda")
    _compare(benchmark, GPU_CASE, tmp_path, hf_model, model_dir,
             engine_kwargs=dict(gpu_memory_utilization=0.5))
