# ruff: noqa: F811  (pytest fixtures imported from test_trainer are parameters here)
"""The trainer/method interface (gapfix.methods.base): a method defined in one file, registered by
name, trains through the unchanged trainer; the built-in ones are found by name and by batch fields."""
import json

import pytest
import torch
from test_trainer import FAST, examples, tiny_model, tokenizer  # noqa: F401 (fixtures)

from gapfix.data import IGNORE_INDEX, sft_row
from gapfix.methods.base import Method, get_method, method_for_batch, method_names, register, unregister
from gapfix.methods.rac import RAC
from gapfix.trainer import TrainConfig, build_rows, train

pytest.importorskip("transformers")


class FirstHalf(Method):
    """A toy method: SFT that trains only the first half of each answer (no model pass)."""
    name = "first_half"

    def build_shard(self, ctx):
        from gapfix.data.arrow import shard_range

        share = shard_range(len(ctx.examples), ctx.rank, ctx.world)
        rows = []
        for example in ctx.gather(share):
            row = sft_row(example)
            trained = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
            for i in trained[len(trained) // 2:]:
                row["labels"][i] = IGNORE_INDEX
            rows.append(row)
        with ctx.writer(share.start) as writer:
            writer.write(rows)
        return {"halved": len(rows)}


class SoftRAC(RAC):
    """RAC with soft "all" labels as its own method, whatever rac_mode says."""
    name = "rac_soft"
    soft = True


@pytest.fixture
def registered():
    register(FirstHalf)
    register(SoftRAC)
    yield
    unregister(FirstHalf.name)
    unregister(SoftRAC.name)


def test_a_registered_method_trains_through_the_trainer(tokenizer, examples, tmp_path, registered):
    assert {"first_half", "rac_soft"} <= set(method_names())
    records = []
    train(tiny_model(tokenizer), tokenizer, examples, method="first_half", steps_per_iteration=3,
          out_dir=str(tmp_path), on_step=records.append, **FAST)
    assert len(records) == 3 and all(r["loss"] > 0 for r in records)
    full = sum(label != IGNORE_INDEX for ex in examples for label in sft_row(ex)["labels"][1:])
    events = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    offline = next(e for e in events if e["event"] == "offline")
    assert offline["halved"] == len(examples) and offline["rows"] == len(examples)
    rows = build_rows("first_half", tiny_model(tokenizer), tokenizer, examples, TrainConfig())
    halved = sum(label != IGNORE_INDEX for r in rows for label in r["labels"][1:])
    assert 0.4 * full <= halved <= 0.6 * full  # the method's rows, not SFT's, were built


def test_soft_rac_as_its_own_method(tokenizer, examples, registered):
    config = TrainConfig(rac_mode="path", rac_prompts=4, rac_sft_ratio=1.0, max_new_tokens=16,
                         generation_backend="hf")
    rows = build_rows("rac_soft", tiny_model(tokenizer), tokenizer, examples, config)
    assert len(rows) == 8 and all("target_ids" in r and "target_weights" in r for r in rows)
    plain = build_rows("rac", tiny_model(tokenizer), tokenizer, examples, config)
    assert all("target_ids" not in r for r in plain)
    losses = []
    train(tiny_model(tokenizer), tokenizer, examples, method="rac_soft", steps_per_iteration=2, rac_prompts=8,
          on_step=lambda r: losses.append(r["loss"]), **FAST)
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match="method must be one of .*'sft'.*'bash'.*'rac'"):
        get_method("dpo")


def test_loss_module_finds_the_method_from_the_batch_fields():
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "alt_ids": torch.zeros(1, 3, dtype=torch.long),
             "eligible": torch.zeros(1, 3, dtype=torch.bool)}
    assert method_for_batch(batch).name == "bash"
    assert method_for_batch({"input_ids": batch["input_ids"]}) is None


def test_row_seeds_sample_a_row_alike_whatever_shares_its_batch(tokenizer, examples):
    """predict_alternatives(row_seeds=...): a row's sampled tokens depend on its own seed only."""
    from gapfix.data import collate
    from gapfix.methods.bash import predict_alternatives

    model = tiny_model(tokenizer)
    rows = [sft_row(ex) for ex in examples[:3]]

    def sample(chosen, seeds):
        batch = collate([rows[i] for i in chosen], pad_id=0)
        answer = batch["labels"] != IGNORE_INDEX
        alts = predict_alternatives(model, batch["input_ids"], batch["attention_mask"], answer, mode="sample",
                                    temperature=3.0, row_seeds=seeds).alt_ids
        return [alts[k, :len(rows[i]["input_ids"])].tolist() for k, i in enumerate(chosen)]

    together = sample([0, 1, 2], [11, 22, 33])
    assert sample([2], [33]) == together[2:] and sample([1, 0], [22, 11]) == [together[1], together[0]]
    assert sample([2], [34]) != together[2:]  # the seed is what decides
    with pytest.raises(ValueError, match="row_seeds"):
        sample([0, 1], [1])
