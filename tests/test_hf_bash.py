"""BashTrainer / BashSFTTrainer: BASH inside a real transformers Trainer and TRL SFTTrainer."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import hf_worker as W

from gapfix import hf
from gapfix.hf import bash as hf_bash


def _bash(tmp_path, config, *, steps=4, accumulation=1, collator=None, **overrides):
    tok = W.tokenizer()
    net = W.model(tok)
    trainer = hf.BashTrainer(model=net, bash_config=config, train_dataset=W.dataset(tok, 24),
                             data_collator=collator or W.collator(tok),
                             args=W.args(tmp_path, max_steps=steps, gradient_accumulation_steps=accumulation,
                                         **overrides))
    return trainer, net


def _plain(tmp_path, *, steps=4, accumulation=1):
    from transformers import Trainer

    tok = W.tokenizer()
    net = W.model(tok)
    trainer = Trainer(model=net, train_dataset=W.dataset(tok, 24), data_collator=W.collator(tok),
                      args=W.args(tmp_path, max_steps=steps, gradient_accumulation_steps=accumulation))
    trainer.train()
    return W.losses(trainer), W.checksums(net)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_beta_zero_reproduces_plain_trainer(tmp_path, accumulation):
    plain_losses, plain_weights = _plain(tmp_path / "plain", accumulation=accumulation)
    trainer, net = _bash(tmp_path / "bash", hf.BashConfig(beta=0.0), accumulation=accumulation)
    trainer.train()
    assert W.losses(trainer) == plain_losses
    assert W.checksums(net) == plain_weights
    assert W.logged(trainer, "bash_mixed_fraction") == [0.0] * 4


def test_bash_trainer_on_a_patched_model_trains_as_on_the_plain_one(tmp_path):
    """BASH mixes inside the embedding, patch computes the loss: they compose."""
    config = hf.BashConfig(beta=0.3, mode="sample", temperature=2.0)
    plain, _ = _bash(tmp_path / "plain", config)
    plain.train()
    fused, fused_net = _bash(tmp_path / "fused", config)
    hf.patch(fused_net)
    fused.train()
    assert W.logged(fused, "bash_mixed_fraction") == W.logged(plain, "bash_mixed_fraction")
    for a, b in zip(W.losses(plain), W.losses(fused)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))


@pytest.mark.parametrize("mode", ["argmax", "sample", "topk"])
def test_beta_logs_the_mixed_fraction(tmp_path, mode):
    plain_losses, _ = _plain(tmp_path / "plain", steps=6)
    trainer, _ = _bash(tmp_path / "bash", hf.BashConfig(beta=0.3, mode=mode, temperature=2.0), steps=6)
    trainer.train()
    fractions = W.logged(trainer, "bash_mixed_fraction")
    assert len(fractions) == 6
    assert 0.2 < sum(fractions) / len(fractions) < 0.4, fractions
    assert W.losses(trainer)[1:] != plain_losses[1:]  # the mixed inputs changed training


def record_refreshes(trainer) -> list:
    """(window, global step) of each prediction refresh the trainer makes, as they happen."""
    windows = []
    original = trainer._bash_refresh

    def refresh(window):
        windows.append((window, trainer.state.global_step))
        original(window)

    trainer._bash_refresh = refresh
    return windows


def test_predictions_come_from_the_model_frozen_at_each_window(tmp_path, monkeypatch):
    """refresh=2 over 5 steps: three prediction passes, at steps 0, 2 and 4, each with the weights
    of that moment (never per batch), and the batches mix exactly those predictions."""
    from gapfix.methods import bash as core

    calls = []
    real = core.predict_alternatives

    def spy(model, *args, **kwargs):
        calls.append(sum(float(p.detach().sum()) for p in model.parameters()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(core, "predict_alternatives", spy)
    trainer, net = _bash(tmp_path, hf.BashConfig(beta=0.5, refresh=2, prediction_batch_size=5), steps=5)
    windows = record_refreshes(trainer)
    trainer.train()
    assert windows == [(0, 0), (1, 2), (2, 4)]
    assert len(calls) == 3 * 5  # 24 rows in chunks of 5, per window
    assert len(set(calls[0:5])) == 1 and len(set(calls[5:10])) == 1 and calls[0] != calls[5]
    # the held predictions are the final model-at-step-4 argmax of every answer token
    rows = trainer._bash_rows
    start, stop = rows.span(3)
    ids = rows.tokens[start:stop][None]
    expected = real(net, ids, None, rows.answer[start:stop][None]).alt_ids[0]
    assert not torch.equal(trainer._bash_alt_ids[start:stop], expected)  # weights moved after step 4


def test_default_window_is_an_epoch(tmp_path):
    """refresh=None: 24 rows in batches of 4 are 6 steps per epoch; 7 steps predict at steps 0 and 6."""
    trainer, _ = _bash(tmp_path, hf.BashConfig(beta=0.3), steps=7)
    windows = record_refreshes(trainer)
    trainer.train()
    assert windows == [(0, 0), (1, 6)]


def test_collator_placement_survives_left_padding(tmp_path):
    from transformers import DataCollatorForSeq2Seq

    tok = W.tokenizer()
    tok.padding_side = "left"
    trainer, _ = _bash(tmp_path, hf.BashConfig(beta=0.3), steps=2,
                       collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    features = [trainer.train_dataset[i] for i in (0, 5, 9)]
    batch = trainer.data_collator(features)
    index = batch[hf_bash.INDEX_KEY]
    assert (index[:, 0] == -1).any()  # left padding holds no token
    known = index >= 0
    assert torch.equal(trainer._bash_rows.tokens[index[known]], batch["input_ids"][known])
    assert bool((batch["attention_mask"].bool() == known).all())
    trainer.train()
    assert len(W.logged(trainer, "bash_mixed_fraction")) == 2


def test_a_collator_that_changes_tokens_is_refused(tmp_path):
    tok = W.tokenizer()
    inner = W.collator(tok)

    def remapping(features):  # a token-level rewrite (as a vocabulary remap would be)
        batch = inner(features)
        ids = batch["input_ids"]
        batch["input_ids"] = torch.where(ids >= 0, (ids + 1) % len(tok), ids)
        return batch

    trainer, _ = _bash(tmp_path, hf.BashConfig(beta=0.3), collator=remapping)
    with pytest.raises(ValueError, match="data_collator"):
        trainer.data_collator([trainer.train_dataset[i] for i in range(3)])


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        hf.BashConfig(beta=1.5)
    with pytest.raises(ValueError, match="mode"):
        hf.BashConfig(mode="nucleus")
    with pytest.raises(ValueError, match="refresh"):
        hf.BashConfig(refresh=0)
    with pytest.raises(ValueError, match="bash_config"):
        _bash(tmp_path, {"beta": 0.1})


def test_resume_from_a_checkpoint_gives_the_uninterrupted_weights(tmp_path):
    """Checkpoints every 2 steps, predictions refreshed every 3: the run resumed at step 2 must use
    the predictions of step 0 (saved in the checkpoint), not recompute them with step-2 weights."""
    config = hf.BashConfig(beta=0.5, mode="sample", temperature=2.0, refresh=3)
    straight, straight_net = _bash(tmp_path / "a", config, steps=5, save_strategy="steps", save_steps=2)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / hf_bash.TENSOR_FILE).is_file() and (checkpoint / hf_bash.STATE_FILE).is_file()
    resumed, resumed_net = _bash(tmp_path / "b", config, steps=5, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert W.checksums(resumed_net) == W.checksums(straight_net)
    assert W.losses(resumed)[-3:] == W.losses(straight)[-3:]  # steps 3..5, after the resume
    # the same resume without the saved predictions recomputes them: another run
    (checkpoint / hf_bash.STATE_FILE).unlink()
    again, again_net = _bash(tmp_path / "c", config, steps=5)
    with pytest.warns(UserWarning, match="recomputed"):
        again.train(resume_from_checkpoint=str(checkpoint))
    assert W.checksums(again_net) != W.checksums(straight_net)


@pytest.mark.parametrize("packing", [False, True])
def test_bash_sft_trainer_trains_a_lora_adapter(tmp_path, packing):
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    tok = W.tokenizer()
    net = W.model(tok)
    before = W.checksums(net)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                         disable_tqdm=True, max_length=64, packing=packing,
                         padding_free=packing, completion_only_loss=True)
    trainer = hf.BashSFTTrainer(model=net, args=args, train_dataset=W.prompt_completion_dataset(24),
                                processing_class=tok, bash_config=hf.BashConfig(beta=0.4),
                                peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer._bash_rows.packed == packing
    trainer.train()
    fractions = W.logged(trainer, "bash_mixed_fraction")
    assert len(fractions) == 3 and 0.2 < sum(fractions) / 3 < 0.6, fractions
    adapted = trainer.model
    assert isinstance(adapted, peft.PeftModel)
    lora = {n: float(p.detach().sum()) for n, p in adapted.named_parameters() if "lora_B" in n}
    assert lora and any(v != 0.0 for v in lora.values())  # B starts at zero: it trained
    base = adapted.get_base_model()
    for name, p in base.named_parameters():
        if "lora" not in name and "base_layer" not in name and name in before:
            assert float(p.detach().double().sum()) == before[name], name


def test_two_gloo_processes_split_the_prediction_pass_and_stay_equal(tmp_path):
    """Each rank predicts its chunks; the shared predictions equal one process's (sample mode:
    each chunk seeded by itself), and the replicas end with equal parameters."""
    ranks = W.torchrun(tmp_path, "bash")
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["wrapper"] == "DistributedDataParallel"
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["first"]["alt_ids"] == ranks[1]["first"]["alt_ids"]
    tok = W.tokenizer()
    single = hf.BashTrainer(model=W.model(tok), bash_config=W.bash_config(), train_dataset=W.dataset(tok, 16),
                            data_collator=W.collator(tok), args=W.args(tmp_path / "one", max_steps=1))
    single._bash_refresh(0)
    assert single._bash_alt_ids.tolist() == ranks[0]["first"]["alt_ids"]


def test_lora_with_reentrant_gradient_checkpointing_still_trains(tmp_path):
    """PEFT makes the frozen embedding's output require grad for reentrant checkpointing; the
    mixed embeddings that replace it must too, or no gradient reaches the adapter."""
    peft = pytest.importorskip("peft")
    tok = W.tokenizer()
    net = peft.get_peft_model(W.model(tok), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = hf.BashTrainer(model=net, bash_config=hf.BashConfig(beta=0.5), train_dataset=W.dataset(tok, 12),
                             data_collator=W.collator(tok),
                             args=W.args(tmp_path, max_steps=2, gradient_checkpointing=True,
                                         gradient_checkpointing_kwargs={"use_reentrant": True}))
    trainer.train()
    assert any(float(p.detach().abs().sum()) > 0 for n, p in net.named_parameters() if "lora_B" in n)


def test_fsdp_is_refused_by_name(tmp_path):
    trainer, _ = _bash(tmp_path, hf.BashConfig(beta=0.3))
    trainer.is_fsdp_enabled = True  # as Trainer sets it under torchrun with fsdp=...
    with pytest.raises(ValueError, match="FSDP"):
        trainer._bash_refresh(0)
    assert trainer._bash_alt_ids is None
