"""Offline generation: the model's own answers for RAC and for evaluation.

    results = gapfix.generate("ckpt/", prompts, max_new_tokens=64)       # vLLM if installed
    results = gapfix.generate(model, prompt_ids, backend="hf", max_new_tokens=64)
    generate_to_jsonl("ckpt/", prompts, "answers.jsonl", max_new_tokens=64)   # resumable

Two backends compute the same thing:
- "vllm": vLLM's offline engine (`vllm.LLM`), from a local model folder. One
  engine is kept per (folder, dtype, engine options) so that a trainer that
  saves a checkpoint and regenerates every iteration pays start-up once: when
  the folder's weight files change, the engine reloads the weights in place
  (and drops its prefix cache), and `release_engines()` frees it.
- "hf": batched `transformers` generate with left padding, in eval mode under
  no_grad, greedy when temperature == 0.
With the same model in float32, greedy outputs of both are identical token for
token. A result's token_ids never include the prompt nor the final EOS: the
answer is what the model said before it stopped. finish_reason "eos" says it
stopped on an EOS token, and stop_token_id which one (a model can have several,
e.g. a chat model's end-of-turn beside its EOS); "length" means max_new_tokens
ran out (stop_token_id None). `Generation.finished` and
`Generation.token_ids_with_stop()` give RAC (gapfix.methods.rac.build_rac_rows
takes Generation objects) what it needs to tell finished answers from cut ones.
Logprobs are those of the model's own distribution (temperature 1, no top-p),
the quantity training uses; both backends report the same.

Seeds: with seed set, prompt i samples from a stream derived from (seed, i)
on vLLM, so its answers do not depend on batching; the hf backend seeds each
batch from (seed, index of its first prompt), so its answers depend on the
batch size too (a resumed run uses the same batches, so it reproduces).

Layout: common (the Generation record, argument checks, model / tokenizer / prompt resolution),
hf_backend (transformers), vllm_backend (vLLM and its engine cache), runner (backend choice,
batches, `generate`), jsonl (`generate_to_jsonl`, resumable, and the JSONL readers).
"""
from __future__ import annotations

# The public names (__all__), and with a redundant alias the internal ones that train_cli,
# hf.rac and the tests reach through the package.
from gapfix.generation.common import BACKENDS, FINISH_REASONS, Generation, derive_seed
from gapfix.generation.common import _context_length as _context_length
from gapfix.generation.common import _eos_ids as _eos_ids
from gapfix.generation.jsonl import (
    generate_to_jsonl,
    read_generations_jsonl,
    read_prompts_jsonl,
    with_prefixes,
)
from gapfix.generation.runner import _progress as _progress
from gapfix.generation.runner import _Run as _Run
from gapfix.generation.runner import generate, vllm_available
from gapfix.generation.vllm_backend import _ENGINES as _ENGINES
from gapfix.generation.vllm_backend import MODEL_COPY_PREFIX, release_engines, remove_stale_model_copies
from gapfix.generation.vllm_backend import _saved_copy as _saved_copy

__all__ = [
    "BACKENDS",
    "FINISH_REASONS",
    "MODEL_COPY_PREFIX",
    "Generation",
    "derive_seed",
    "generate",
    "generate_to_jsonl",
    "read_generations_jsonl",
    "read_prompts_jsonl",
    "release_engines",
    "remove_stale_model_copies",
    "vllm_available",
    "with_prefixes",
]
