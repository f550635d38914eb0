"""The transformers backend: batched `generate` with left padding, in eval mode under no_grad,
greedy when temperature == 0."""
from __future__ import annotations

from gapfix.generation.common import _is_model_path, _model_dir, _torch_dtype, derive_seed


def _split_finished(tokens, eos_ids):
    """(token_ids before the first EOS, finish reason, the EOS token or None)."""
    eos = set(eos_ids)
    for k, token in enumerate(tokens):
        if token in eos:
            return tokens[:k], "eos", token
    return tokens, "length", None


class _HFBackend:
    name = "hf"
    default_batch_size = 32

    def __init__(self, model, *, dtype=None):
        import torch

        if _is_model_path(model):
            from transformers import AutoModelForCausalLM

            from gapfix.models import LOCAL_ONLY

            model = AutoModelForCausalLM.from_pretrained(
                _model_dir(model), **LOCAL_ONLY,
                dtype="auto" if dtype is None else _torch_dtype(dtype),
            )
        elif dtype is not None and next(model.parameters()).dtype != _torch_dtype(dtype):
            raise ValueError(f"dtype={dtype!r} differs from the in-memory model's "
                             f"{next(model.parameters()).dtype}; cast the model instead")
        if not hasattr(model, "generate"):
            raise ValueError(f"model must be a transformers causal LM, got {type(model).__name__}")
        from gapfix.models import merged_for_inference

        self.model = merged_for_inference(model)  # a PEFT model: its adapter merged, in a copy
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.torch = torch

    def generate(self, prompt_ids, first_index, *, n, temperature, top_p, max_new_tokens,
                 seed, logprobs, eos_ids, pad_id):
        torch = self.torch
        from transformers import GenerationConfig

        model = self.model
        device = next(model.parameters()).device
        width = max(map(len, prompt_ids))
        input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, prompt in enumerate(prompt_ids):  # left padding
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        sample = temperature > 0
        options = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=sample,
            num_beams=1,
            num_return_sequences=n if sample else 1,
            eos_token_id=eos_ids or None,
            pad_token_id=pad_id,
            return_dict_in_generate=True,
            output_logits=logprobs,
        )
        if sample:
            options.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        config = GenerationConfig(**options)
        was_training = model.training
        # generate() fills every option left at its default from the model's
        # own generation_config (a checkpoint's top_p, repetition penalty,
        # ...): hide it for the call, so that only the options above apply.
        model_config = model.generation_config
        model.generation_config = GenerationConfig()
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(
                devices=[device] if device.type == "cuda" else []
            ):
                if sample and seed is not None:
                    torch.manual_seed(derive_seed(seed, first_index))
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                )
        finally:
            model.train(was_training)
            model.generation_config = model_config
        new_tokens = out.sequences[:, width:].cpu()
        token_logprobs = None
        if logprobs:
            steps = torch.stack(out.logits, dim=1).float()  # (rows, steps, V), raw logits
            token_logprobs = steps.log_softmax(-1).gather(
                -1, new_tokens[:, : steps.shape[1]].to(steps.device).unsqueeze(-1)
            ).squeeze(-1).cpu()
        results = []
        rows_per_prompt = n if sample else 1
        for p in range(len(prompt_ids)):
            for s in range(n):
                row = p * rows_per_prompt + (s if sample else 0)
                tokens, reason, stop = _split_finished(new_tokens[row].tolist(), eos_ids)
                lp = token_logprobs[row, : len(tokens)].tolist() if logprobs else None
                results.append((tokens, reason, lp, stop))
        return results
