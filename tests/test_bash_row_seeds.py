"""BASH in the trainer mixes each row by its own seed (config.seed, iteration, step, row index):
the same global batch trains alike whatever the micro-batch size (and world size: see
tests/test_distributed.py and tests/test_multinode.py)."""
import pytest
import torch

from gapfix.data import encode_example, math_task
from gapfix.trainer import _row_mix_seeds, train

pytest.importorskip("transformers")


def _examples(tokenizer):
    return [encode_example(tokenizer, p["prompt"], p["response"], p)
            for p in math_task.make_split("train", 32, seed=3)]


def _one_step(tokenizer, examples, micro_batch_size):
    from gapfix.models import tiny_llama

    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=128,
                       seed=0).train()
    records = []
    train(model, tokenizer, examples, method="bash", beta=0.5, bash_mode="sample", steps_per_iteration=1,
          batch_size=8, micro_batch_size=micro_batch_size, lr=1e-2, progress=False, device="cpu",
          on_step=records.append)
    return records[0], {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_micro_batch_size_does_not_change_the_bash_step():
    """8 rows as one micro-batch and as 3 + 3 + 2 (other paddings, other micro-batch indices):
    the same rows mixed, so the same loss, mixed fraction and weights after the step."""
    tokenizer = math_task.math_tokenizer()
    examples = _examples(tokenizer)
    whole, whole_params = _one_step(tokenizer, examples, None)
    split, split_params = _one_step(tokenizer, examples, 3)
    assert 0.2 < whole["mixed_fraction"] < 0.8
    assert split["mixed_fraction"] == whole["mixed_fraction"]
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    for key in whole_params:
        torch.testing.assert_close(split_params[key], whole_params[key], rtol=1e-4, atol=1e-5)


def test_row_seeds_depend_on_the_row_not_on_its_neighbours():
    seeds = _row_mix_seeds(0, 1, 2, [5, 9, 13])
    assert seeds.dtype == torch.int64 and seeds.shape == (3,) and bool((seeds >= 0).all())
    assert torch.equal(_row_mix_seeds(0, 1, 2, [13, 5]), seeds[[2, 0]])
    assert len(set(seeds.tolist())) == 3
    for other in (_row_mix_seeds(1, 1, 2, [5]), _row_mix_seeds(0, 2, 2, [5]), _row_mix_seeds(0, 1, 3, [5])):
        assert int(other[0]) != int(seeds[0])  # the seed, the iteration and the step all count
