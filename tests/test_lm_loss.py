"""One model-level causal-LM loss (gapfix.lm_loss) for the reference trainer and gapfix.hf.patch,
with every loss option settable from `gapfix train`."""
import argparse

import pytest
import torch

pytest.importorskip("transformers")

import hf_worker as W  # noqa: E402

from gapfix import hf  # noqa: E402
from gapfix.lm_loss import LOSS_OPTIONS, causal_lm_loss, shift_labels  # noqa: E402
from gapfix.trainer import CausalLMLoss, TrainConfig, loss_options  # noqa: E402


def _batch(tok):
    return dict(W.collator(tok)(W.rows(tok, 4, seed=5)))


def _twin(net):
    twin = type(net)(net.config)
    twin.load_state_dict(net.state_dict())
    return twin.train()


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}])
def test_trainer_loss_and_patch_are_the_same_loss(options):
    tok = W.tokenizer()
    net = W.model(tok)
    batch = _batch(tok)
    count = (shift_labels(batch["labels"]) != -100).sum()
    summed, _ = CausalLMLoss(_twin(net), loss_options=options)(batch)
    patched = hf.patch(net, **options)(**batch, num_items_in_batch=count).loss
    torch.testing.assert_close(summed / count, patched, rtol=1e-6, atol=1e-6)


def test_options_reach_the_trainer_loss():
    tok = W.tokenizer()
    net = W.model(tok)
    batch = _batch(tok)
    plain, _ = CausalLMLoss(net)(batch)
    smoothed, _ = CausalLMLoss(net, loss_options={"label_smoothing": 0.2})(batch)
    assert abs(smoothed.item() - plain.item()) > 1e-3  # the option reached the kernel


def test_causal_lm_loss_takes_hf_labels_through_shift_labels():
    tok = W.tokenizer()
    net = W.model(tok)
    batch = _batch(tok)
    hidden = net.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    loss = causal_lm_loss(net, hidden, shift_labels(batch["labels"]), reduction="mean")
    torch.testing.assert_close(loss, net(**batch).loss, rtol=1e-5, atol=1e-6)


def test_every_loss_option_is_a_train_flag():
    from gapfix.train_cli import add_config_flags, config_values

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--label-smoothing", "0.1", "--z-loss", "0.001", "--loss-chunk-size", "64",
                              "--loss-filter-eps", "1e-6", "--loss-grad-weight-dtype", "bfloat16", "--fused", "false"])
    config = TrainConfig(**config_values(args))
    options = loss_options(config)
    assert options == {"label_smoothing": 0.1, "z_loss": 0.001, "chunk_size": 64, "filter_eps": 1e-6,
                       "grad_weight_dtype": torch.bfloat16}
    # impl follows --fused; ignore_index is the data's convention: the rest are flags
    assert set(LOSS_OPTIONS) - {"impl", "ignore_index"} == set(options)


@pytest.mark.parametrize("field, value", [("label_smoothing", 2.0), ("z_loss", -1.0), ("loss_chunk_size", 0),
                                          ("loss_grad_weight_dtype", "int8"), ("loss_filter_eps", -1.0)])
def test_bad_loss_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value}).validate()
