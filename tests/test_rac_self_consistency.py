"""RAC's rows pair each generated answer with its own prompt and reference, label it by the
alignment, and end it with the token generation stopped on: a defect in any of these (rows
shuffled against prompts, labels of another row, a missing or wrong stop token) would show as a
falling exact match of RAC's own answers on its training prompts, and fails here instead."""
import random

import pytest

pytest.importorskip("transformers")


def _fake_answers(examples, eos_id, rng_seed=0):
    """Per example a deterministic answer: its reference (a third), the reference with one token
    changed (a third), or the reference cut short without EOS (the rest, as at the length limit)."""
    rng = random.Random(rng_seed)
    answers = {}
    for index, ex in enumerate(examples):
        reference = [t for t in ex.answer_ids if t != eos_id]
        kind = index % 3
        if kind == 0:
            answers[tuple(ex.prompt_ids)] = (reference, True)
        elif kind == 1:
            wrong = list(reference)
            k = rng.randrange(len(wrong))
            wrong[k] = next(t for t in reference if t != wrong[k])  # another token of the answer
            answers[tuple(ex.prompt_ids)] = (wrong, True)
        else:
            answers[tuple(ex.prompt_ids)] = (reference[: max(1, len(reference) // 2)], False)
    return answers


def test_rac_rows_pair_answers_with_their_prompts_labels_and_stop_token(monkeypatch):
    import torch

    from gapfix import generation
    from gapfix.data import encode_example, math_task
    from gapfix.generation import Generation
    from gapfix.models import tiny_llama
    from gapfix.ops.rac_labels import rac_labels
    from gapfix.trainer import TrainConfig, build_rows

    tok = math_task.math_tokenizer()
    problems = math_task.make_split("train", 40, seed=3)
    examples = [encode_example(tok, p["prompt"], p["response"], p) for p in problems]
    eos = tok.eos_token_id
    answers = _fake_answers(examples, eos)

    def fake_generate(model, prompts, **kwargs):
        out = []
        for i, prompt in enumerate(prompts):
            tokens, finished = answers[tuple(prompt)]
            out.append(Generation(i, 0, list(tokens), "eos" if finished else "length",
                                  stop_token_id=eos if finished else None))
        return out

    monkeypatch.setattr(generation, "generate", fake_generate)
    model = tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    logs = []
    config = TrainConfig(rac_prompts=30, rac_sft_ratio=1.0, rac_temperature=0.0, max_new_tokens=48,
                         generation_backend="hf", seed=5)
    rows = build_rows("rac", model, tok, examples, config, log=logs.append)
    (stats,) = [r for r in logs if r.get("event") == "rac_offline"]
    by_prompt = {tuple(ex.prompt_ids): ex for ex in examples}
    rac_rows = sft_rows = 0
    for row in rows:
        prompt = next(p for p in by_prompt if tuple(row["input_ids"][:len(p)]) == p)
        ex = by_prompt[prompt]
        generated = row["input_ids"][len(prompt):]
        if generated == list(ex.answer_ids):  # an SFT row (or an exact answer, whose row is one)
            assert row["labels"][len(prompt):] == list(ex.answer_ids)
            sft_rows += 1
            continue
        rac_rows += 1
        tokens, finished = answers[prompt]
        assert generated[:-1] == tokens  # the answer generated for this prompt, no other's
        assert generated[-1] == (eos if finished else tok.pad_token_id)  # the stop token, or pad when cut
        reference = [t for t in ex.answer_ids if t != eos]
        expected = rac_labels(torch.tensor([tokens]), torch.tensor([reference]), eos_id=eos)[0].tolist()
        assert row["labels"][len(prompt):] == expected
        assert row["labels"][:len(prompt)] == [-100] * len(prompt)
    assert rac_rows >= 15 and sft_rows >= 30
    chosen = [by_prompt[p] for p in answers]
    exact = sum(1 for i, _ in enumerate(chosen) if i % 3 == 0) / len(chosen)
    assert 0.15 < stats["exact_match"] < 0.55, (stats["exact_match"], exact)  # the exact third, of 30 drawn
