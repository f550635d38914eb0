"""One path per method: gapfix train (gapfix.trainer) and gapfix.hf run the same method file, with one
config class, one set of defaults and one seeding rule, so the same model, data, config and seed
give the same predictions, rows and mixed inputs under either driver."""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import hf_worker as W

from gapfix import hf
from gapfix.data import Example
from gapfix.methods.bash import BASH, BashConfig, mixing_seeds
from gapfix.methods.rac import RacConfig, mix_with_sft
from gapfix.trainer import TrainConfig, build_rows


def _patch_module():
    """The module behind gapfix.hf.patch (gapfix.hf.patching: a module of the function's own name would
    replace the function on the package once something imported it)."""
    import gapfix.hf.patching

    return gapfix.hf.patching


def _examples(tok, count):
    rows = W.rows(tok, count)
    return [Example(prompt_ids=[t for t, lab in zip(r["input_ids"], r["labels"]) if lab == -100],
                    answer_ids=[lab for lab in r["labels"] if lab != -100]) for r in rows]


def test_the_hf_configs_are_the_methods_and_the_flags_come_from_them():
    assert hf.BashConfig is BashConfig and hf.RacConfig is RacConfig
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for config_class in (BashConfig, RacConfig):
        for field in dataclasses.fields(config_class):
            flag = field.metadata["flag"]
            if flag is not None:  # a gapfix train flag: the same default and help text
                assert fields[flag].default == field.default and fields[flag].metadata["help"] == field.metadata["help"]


def test_one_set_of_defaults():
    """The defaults both drivers now share; before, gapfix.hf had beta 0.1, mode argmax and sft_ratio 0.0,
    and gapfix train rac_temperature 0.0 (docs/methods.md says why these)."""
    bash, rac, train = BashConfig(), RacConfig(), TrainConfig()
    assert (bash.beta, bash.mode, rac.temperature, rac.sft_ratio) == (0.2, "sample", 1.0, 1.0)
    assert (train.beta, train.bash_mode, train.rac_temperature, train.rac_sft_ratio) == (0.2, "sample", 1.0, 1.0)


def test_bash_predictions_and_mixed_inputs_are_the_same_under_both_drivers(tmp_path):
    tok = W.tokenizer()
    examples = _examples(tok, 6)
    config = BashConfig(beta=0.5, mode="sample", temperature=3.0, refresh=10)
    settings = dict(beta=config.beta, bash_mode=config.mode, bash_temperature=config.temperature, seed=5)
    rows = build_rows("bash", W.model(tok), tok, examples, TrainConfig(**settings))
    trainer = hf.BashTrainer(model=W.model(tok), bash_config=config, train_dataset=W.dataset(tok, 6),
                             data_collator=W.collator(tok), args=W.args(tmp_path, seed=5, max_steps=1))
    trainer._bash_refresh(0)
    for r, row in enumerate(rows):
        start, stop = trainer._bash_rows.span(r)
        assert trainer._bash_alt_ids[start:stop].tolist() == row["alt_ids"], r
    assert any(row["alt_ids"] != row["input_ids"] for row in rows)  # sampling changed something

    # the same rows at the same step mix alike: the hf embedding hook and the trainer's loss inputs
    batch = trainer.data_collator([{**trainer.train_dataset[i]} for i in (4, 1)])
    held = batch["gapfix_rows"]
    assert held == [(4,), (1,)]
    trainer.state.global_step = 0
    seeds = trainer._bash_seeds(held, torch.device("cpu"))
    assert seeds.tolist() == mixing_seeds(5, 0, 0, [4, 1]).tolist()
    index, ids = batch["gapfix_token_index"], batch["input_ids"]
    eligible = (index >= 0) & (batch["labels"] != -100) & trainer._bash_rows.answer[index.clamp_min(0)]
    alt = torch.where(index >= 0, trainer._bash_alt_ids[index.clamp_min(0)], ids)
    with trainer._bash_mixing(alt, None, eligible, seeds):
        hooked = trainer.model.get_input_embeddings()(ids)
    reference, _ = BASH().model_inputs(trainer.model, {"input_ids": ids, "alt_ids": alt, "eligible": eligible},
                                       impl="torch", mix_seed=seeds, beta=config.beta)
    torch.testing.assert_close(hooked, reference["inputs_embeds"], rtol=0, atol=0)
    assert not torch.equal(hooked, trainer.model.get_input_embeddings()(ids))  # something was mixed


def test_rac_rows_are_the_same_under_both_drivers():
    from gapfix.hf import rac as hf_rac

    tok = W.tokenizer()
    examples = _examples(tok, 10)
    rac = RacConfig(samples=2, temperature=1.0, max_new_tokens=8, prompts_per_iteration=6, sft_ratio=0.5,
                    backend="hf")
    flat = dict(rac_samples=2, rac_temperature=1.0, max_new_tokens=8, rac_prompts=6, rac_sft_ratio=0.5,
                generation_backend="hf", seed=3)
    reference = build_rows("rac", W.model(tok), tok, examples, TrainConfig(**flat), iteration=1)
    rows, _, _ = hf_rac.iteration_rows(W.model(tok), tok, hf_rac._Sources(W.dataset(tok, 10)), rac, seed=3,
                                       iteration=1)
    assert len(rows) == len(reference) == 18
    assert [(r["input_ids"], r["labels"]) for r in rows] == [(r["input_ids"], r["labels"]) for r in reference]


def test_a_huge_sft_ratio_is_refused_before_anything_is_allocated():
    with pytest.raises(ValueError, match="rac_sft_ratio"):
        TrainConfig(rac_sft_ratio=1e30).validate()
    with pytest.raises(ValueError, match="sft_ratio"):
        RacConfig(sft_ratio=1e300)
    with pytest.raises(ValueError, match="ratio"):
        mix_with_sft([{"input_ids": [1]}], [{"input_ids": [2]}], 1e30, seed=0)
    with pytest.raises(ValueError, match="epochs_per_iteration"):
        TrainConfig(epochs_per_iteration=1e30).validate()
    with pytest.raises(ValueError, match="samples"):
        RacConfig(samples=10**9)


def test_gapfix_hf_bounds():
    with pytest.raises(ValueError, match="top_k"):
        BashConfig(top_k=10**12)
    with pytest.raises(ValueError, match="bash_top_k"):
        TrainConfig(bash_top_k=10**12).validate()
    tok = W.tokenizer()
    net = W.model(tok)
    short = W.rows(tok, 4)
    short[2]["labels"] = short[2]["labels"][:-3]
    import datasets

    with pytest.raises(ValueError, match="row 2: labels has"):
        hf.build_rac_dataset(net, tok, datasets.Dataset.from_list(short), config=RacConfig(backend="hf"))
    _check_item_count = _patch_module()._check_item_count
    for bad in (0, -3, torch.tensor(0), torch.tensor(-1.0), 0.0):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            _check_item_count(bad)
    _check_item_count(torch.tensor(5))


def test_num_items_in_batch_of_zero_is_refused_by_the_patched_model():
    tok = W.tokenizer()
    net = hf.patch(W.model(tok))
    row = W.rows(tok, 1)[0]
    ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
    for bad in (0, -2, torch.tensor(0)):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            net(input_ids=ids, labels=labels, num_items_in_batch=bad)


# -- any registered method, by its one file: gapfix train and gapfix.hf.MethodTrainer ----------------

@pytest.fixture
def first_half():
    """tests/test_methods.py's toy method (SFT on the first half of each answer), registered."""
    from test_methods import FirstHalf

    from gapfix.methods.base import register, unregister

    register(FirstHalf)
    yield FirstHalf.name
    unregister(FirstHalf.name)


def _method_trainer(tmp_path, tok, method, count=6, **kwargs):
    return hf.MethodTrainer(model=W.model(tok), args=W.args(tmp_path, seed=5, max_steps=2), processing_class=tok,
                            train_dataset=W.dataset(tok, count), data_collator=W.collator(tok), method=method,
                            **kwargs)


@pytest.mark.parametrize("method", ["first_half", "bash"])
def test_a_method_builds_the_same_rows_under_both_drivers(tmp_path, first_half, method):
    tok = W.tokenizer()
    config = BashConfig(beta=0.5, temperature=3.0) if method == "bash" else None
    flags = dict(beta=0.5, bash_temperature=3.0) if method == "bash" else {}
    reference = build_rows(method, W.model(tok), tok, _examples(tok, 6), TrainConfig(seed=5, **flags), iteration=1)
    trainer = _method_trainer(tmp_path, tok, method, method_config=config)
    rows, stats = trainer._build_iteration(1)
    assert rows == reference and stats["rows"] == 6
    if method == "first_half":
        assert stats["halved"] == 6
    else:
        assert any(row["alt_ids"] != row["input_ids"] for row in rows)


def test_both_drivers_predict_bash_in_chunks_of_one_setting(tmp_path, monkeypatch):
    """gapfix train and gapfix.hf cut BASH's prediction pass into chunks of BashConfig.prediction_batch_size."""
    from gapfix.methods import bash

    assert TrainConfig().bash_prediction_batch_size == BashConfig().prediction_batch_size == \
        bash.PREDICTION_BATCH_SIZE
    sizes = {}
    real = bash.predict_rows

    def recording(model, ids, *args, **kwargs):
        sizes.setdefault(driver, []).append(len(ids))
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(bash, "predict_rows", recording)
    tok = W.tokenizer()
    driver = "train"
    build_rows("bash", W.model(tok), tok, _examples(tok, 7), TrainConfig(bash_prediction_batch_size=3))
    driver = "hf"
    trainer = hf.BashTrainer(model=W.model(tok), bash_config=BashConfig(prediction_batch_size=3),
                             train_dataset=W.dataset(tok, 7), data_collator=W.collator(tok),
                             args=W.args(tmp_path, max_steps=1))
    trainer._bash_refresh(0)
    assert sizes == {"train": [3, 3, 1], "hf": [3, 3, 1]}


def test_a_registered_method_trains_under_trainer_and_sft_trainer(tmp_path, first_half):
    trl = pytest.importorskip("trl")
    tok = W.tokenizer()
    trainer = _method_trainer(tmp_path / "hf", tok, first_half, count=8)
    trainer.train()
    assert len(W.losses(trainer)) == 2 and all(loss > 0 for loss in W.losses(trainer))
    assert W.logged(trainer, "first_half_halved") == [8] and W.logged(trainer, "first_half_rows") == [8]

    mixed = _method_trainer(tmp_path / "bash", tok, "bash", count=8,
                            method_config=BashConfig(beta=0.5, temperature=3.0))
    mixed.train()  # the batch transform (BASH's mixing) in the model's input embedding
    assert len(W.losses(mixed)) == 2 and all(0 < f <= 1 for f in W.logged(mixed, "bash_mixed_fraction"))

    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         seed=0, disable_tqdm=True, max_length=64, completion_only_loss=True)
    sft = hf.MethodSFTTrainer(model=W.model(tok), args=args, train_dataset=W.prompt_completion_dataset(8),
                              processing_class=tok, method=first_half)
    sft.train()
    assert len(W.losses(sft)) == 2 and W.logged(sft, "first_half_rows") == [8]
