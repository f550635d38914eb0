"""The method settings inside the training arguments (BashSFTConfig, RacTrainingArguments, ... in TRL's
convention), and the rough edges of the gapfix.hf trainers, with real transformers and TRL."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import hf_worker as W

from gapfix import hf
from gapfix.hf import bash as hf_bash


def _sft_args(out, trl, **extra):
    return dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, max_length=64,
                completion_only_loss=True, **extra)


def test_bash_sft_config_parsed_by_trl_saved_and_reported(tmp_path):
    trl = pytest.importorskip("trl")
    parser = trl.TrlParser((hf.BashSFTConfig,))
    (args,) = parser.parse_args_and_config(args=[
        "--output_dir", str(tmp_path), "--bash_beta", "0.35", "--bash_mode", "topk", "--bash_top_k", "3",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none",
        "--save_strategy", "steps", "--save_steps", "2", "--completion_only_loss", "true", "--logging_steps", "1"])
    assert isinstance(args, trl.SFTConfig) and args.bash_config() == hf.BashConfig(beta=0.35, mode="topk", top_k=3)
    assert args.to_dict()["bash_beta"] == 0.35  # what report_to integrations log as the run's config
    tok = W.tokenizer()
    trainer = hf.BashSFTTrainer(model=W.model(tok), args=args, train_dataset=W.prompt_completion_dataset(8),
                                processing_class=tok)
    assert trainer.bash_config == args.bash_config()
    trainer.train()
    saved = torch.load(tmp_path / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert type(saved) is hf.BashSFTConfig and saved.bash_config() == args.bash_config()
    with pytest.raises(ValueError, match="bash_beta"):
        hf.BashSFTConfig(**_sft_args(tmp_path, trl), bash_beta=2.0)


def test_rac_training_arguments_parsed_by_hf_argument_parser(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(hf.RacTrainingArguments).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--rac_sft_ratio", "0.5", "--rac_mode", "first", "--rac_backend", "hf",
        "--rac_max_new_tokens", "6", "--rac_prompts_per_iteration", "4", "--use_cpu", "true", "--max_steps", "1",
        "--report_to", "none", "--logging_steps", "1"])
    assert args.rac_config() == hf.RacConfig(sft_ratio=0.5, mode="first", backend="hf", max_new_tokens=6,
                                             prompts_per_iteration=4)
    tok = W.tokenizer()
    trainer = hf.RacTrainer(model=W.model(tok), args=args, train_dataset=W.dataset(tok, 8), processing_class=tok,
                            data_collator=W.collator(tok))
    assert trainer.rac_config == args.rac_config()
    trainer.train()
    assert W.logged(trainer, "rac_rows") == [4] and W.logged(trainer, "rac_sft_rows") == [2]


def test_bash_config_keyword_still_works_and_a_conflict_is_named(tmp_path):
    trl = pytest.importorskip("trl")
    tok = W.tokenizer()
    plain = trl.SFTConfig(**_sft_args(tmp_path, trl, save_strategy="no"))
    trainer = hf.BashSFTTrainer(model=W.model(tok), args=plain, train_dataset=W.prompt_completion_dataset(8),
                                processing_class=tok, bash_config=hf.BashConfig(beta=0.25))
    assert trainer.bash_config.beta == 0.25
    args = hf.BashSFTConfig(**_sft_args(tmp_path, trl, save_strategy="no"), bash_beta=0.3)
    with pytest.raises(ValueError, match="bash_config and args"):
        hf.BashSFTTrainer(model=W.model(tok), args=args, train_dataset=W.prompt_completion_dataset(8),
                          processing_class=tok, bash_config=hf.BashConfig(beta=0.25))


def _bash(tmp_path, config, *, dataset=None, collator=None, **overrides):
    tok = W.tokenizer()
    return hf.BashTrainer(model=W.model(tok), bash_config=config, train_dataset=dataset or W.dataset(tok, 12),
                          data_collator=collator or W.collator(tok), args=W.args(tmp_path, **overrides))


def test_bash_without_labels_or_with_shifted_labels_is_refused(tmp_path):
    import datasets
    from transformers import DataCollatorWithPadding

    tok = W.tokenizer()
    no_labels = datasets.Dataset.from_list([{"input_ids": r["input_ids"]} for r in W.rows(tok, 8)])
    trainer = _bash(tmp_path / "a", hf.BashConfig(), dataset=no_labels, collator=DataCollatorWithPadding(tok))
    with pytest.raises(ValueError, match="BASH needs labels"):
        trainer.train()
    shifted = []
    for row in W.rows(tok, 8):
        labels = row["labels"][1:] + [-100]
        shifted.append({"input_ids": row["input_ids"], "labels": labels})
    trainer = _bash(tmp_path / "b", hf.BashConfig(), dataset=datasets.Dataset.from_list(shifted))
    with pytest.raises(ValueError, match="shifted convention"):
        trainer.train()


def test_a_resume_with_changed_settings_names_them_and_can_be_allowed(tmp_path):
    config = hf.BashConfig(beta=0.5, refresh=3)
    _bash(tmp_path / "a", config, max_steps=2, save_strategy="steps", save_steps=2).train()
    checkpoint = str(tmp_path / "a" / "checkpoint-2")
    changed = hf.BashConfig(beta=0.4, refresh=3)
    with pytest.raises(ValueError, match=r"beta: 0\.5 -> 0\.4.*resume_with_changed_config=True"):
        _bash(tmp_path / "b", changed, max_steps=3).train(resume_from_checkpoint=checkpoint)
    allowed = _bash(tmp_path / "c", changed, max_steps=3)
    allowed.resume_with_changed_config = True
    allowed.train(resume_from_checkpoint=checkpoint)
    assert allowed.state.global_step == 3


def test_the_changed_fraction_is_logged_beside_the_mixed_one(tmp_path):
    trainer = _bash(tmp_path, hf.BashConfig(beta=0.5, mode="argmax", refresh=2), max_steps=4)
    trainer.train()
    mixed, changed = W.logged(trainer, "bash_mixed_fraction"), W.logged(trainer, "bash_changed_fraction")
    assert len(mixed) == len(changed) == 4
    assert all(c <= m for c, m in zip(changed, mixed)) and sum(mixed) > 0


def test_a_head_size_vllm_cannot_run_is_refused_at_construction(tmp_path):
    pytest.importorskip("vllm")
    if torch.cuda.is_available():
        pytest.skip("the CPU attention's head sizes")
    tok = W.tokenizer()
    with pytest.raises(ValueError, match="head size 16"):
        hf.RacTrainer(model=W.model(tok), args=W.args(tmp_path), train_dataset=W.dataset(tok, 4),
                      processing_class=tok, data_collator=W.collator(tok), rac_config=hf.RacConfig(backend="vllm"))


def test_bash_top_k_beyond_the_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="top_k 1000 exceeds the model's vocabulary"):
        _bash(tmp_path, hf.BashConfig(mode="topk", top_k=1000))
    assert hf_bash.ROWS_KEY == "gapfix_rows"
