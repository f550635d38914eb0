"""TRL's fused LM head (fused_lm_head=True) served by gapfix's kernel on a patched model, with
real TRL trainers (SFT, GRPO, RLOO, KTO) against TRL's own head on tiny models."""
import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

import hf_worker as W  # noqa: E402

from gapfix import hf  # noqa: E402
from gapfix.hf.trl_head import CONTRACT_PARAMETERS, check_contract  # noqa: E402

# the patch's state on the model (importing gapfix.hf.patch by name here would shadow hf.patch)
_STATE = "_gapfix_patch"
ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _twin(net):
    twin = type(net)(net.config)
    twin.load_state_dict(net.state_dict())
    return twin.train()


def _batch(tok, count=5):
    return dict(W.collator(tok)(W.rows(tok, count, seed=3)))


def _trl_head_forward(net, batch, settings, **extra):
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(net, **settings)
    return net(**batch, fused_lm_head=True, **extra)


def _fields_and_grads(net, batch, settings, patched, **extra):
    net.zero_grad()
    if patched:
        hf.patch(net)
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(net, **settings)  # what a TRL trainer does: gapfix records it
        assert net.__dict__[_STATE]["trl_head"]["outputs"] == tuple(settings["outputs"])
        out = net(**batch, fused_lm_head=True, **extra)
    else:
        out = _trl_head_forward(net, batch, settings, **extra)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(out.log_probs.shape, generator=gen)
    c = torch.randn(out.log_probs.shape, generator=gen)
    (out.loss + (out.log_probs * a).sum() + (out.entropy * c).sum()).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("settings, shifted", [
    ({"outputs": ALL}, False),
    ({"temperature": 0.7, "outputs": ALL}, False),
    ({"temperature": 1.3, "cast_lm_head_to_fp32": True, "outputs": ("log_probs", "entropy")}, False),
    ({"outputs": ALL}, True),
])
def test_fields_and_gradients_match_trl_head(settings, shifted):
    tok = W.tokenizer()
    net = W.model(tok)
    batch = _batch(tok)
    extra = {"num_items_in_batch": torch.tensor(17)}
    if shifted:
        labels = batch.pop("labels")
        batch["shift_labels"] = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    ref, ref_grads = _fields_and_grads(_twin(net), batch, settings, patched=False, **extra)
    out, grads = _fields_and_grads(net, batch, settings, patched=True, **extra)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.label_mask, ref.label_mask)
    for name in ALL:
        a, b = getattr(out, name), getattr(ref, name)
        if name not in settings["outputs"]:
            assert a is None and b is None
        elif name == "is_top1":
            assert torch.equal(a, b)
        else:
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_matches_trl_head():
    tok = W.tokenizer()
    net = W.model(tok)
    batch = _batch(tok)
    settings = {"outputs": ("log_probs", "entropy")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _trl_head_forward(_twin(net), batch, settings)
        hf.patch(net)
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(net, **settings)
        out = net(**batch, fused_lm_head=True)
    for name in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=2e-2, atol=2e-2)


def _sft(tmp_path, net, tok, name, **config):
    config = {"learning_rate": 1e-2, "max_steps": 3, **config}
    args = trl.SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         seed=0, disable_tqdm=True, max_length=64, completion_only_loss=True, **config)
    trainer = trl.SFTTrainer(model=net, args=args, processing_class=tok,
                             train_dataset=W.prompt_completion_dataset(12))
    trainer.train()
    return trainer


def _trl_kernel_calls(monkeypatch):
    """Counts calls of TRL's own fused-head kernel (a spy around the real function)."""
    import trl.trainer.utils as utils

    calls = []
    real = utils._ChunkedLogProbFunction

    class Spy:
        @staticmethod
        def apply(*args):
            calls.append(1)
            return real.apply(*args)

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", Spy)
    return calls


def test_sft_trainer_on_a_patched_model_logs_trl_metrics(tmp_path, monkeypatch):
    tok = W.tokenizer()
    net = W.model(tok)
    calls = _trl_kernel_calls(monkeypatch)
    # learning rate 0: every step sees the same weights, so the metrics must agree exactly
    plain = _sft(tmp_path, _twin(net), tok, "plain", learning_rate=0.0)
    assert calls, "TRL's own head ran for the unpatched model"
    calls.clear()
    patched = _sft(tmp_path, hf.patch(net), tok, "patched", learning_rate=0.0)
    assert not calls, "TRL's kernel ran on a patched model"
    assert net.__dict__[_STATE]["trl_head"]["outputs"] == ("log_probs", "entropy", "is_top1")
    assert W.logged(patched, "mean_token_accuracy") == W.logged(plain, "mean_token_accuracy")
    assert W.logged(patched, "loss") == pytest.approx(W.logged(plain, "loss"), rel=1e-6, abs=1e-6)
    # float tolerance: the per-token entropies agree to ~5e-7 (test_fields_and_gradients_match_trl_head)
    assert W.logged(patched, "entropy") == pytest.approx(W.logged(plain, "entropy"), rel=1e-4)


def test_unpatch_hands_trl_its_own_head_back(tmp_path, monkeypatch):
    tok = W.tokenizer()
    net = W.model(tok)
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=64)
    trl.SFTTrainer(model=hf.patch(net), args=args, processing_class=tok, train_dataset=W.prompt_completion_dataset(4))
    calls = _trl_kernel_calls(monkeypatch)
    hf.unpatch(net)
    assert not hf.is_patched(net)
    out = net(**_batch(tok), fused_lm_head=True)
    assert out.is_top1 is not None and out.entropy is not None and calls  # TRL's head, SFTTrainer's settings


def test_sft_trainer_trains_the_same_on_a_patched_model(tmp_path):
    tok = W.tokenizer()
    net = W.model(tok)
    plain = _sft(tmp_path, _twin(net), tok, "plain", learning_rate=1e-3)
    patched = _sft(tmp_path, hf.patch(net), tok, "patched", learning_rate=1e-3)
    assert W.losses(patched) == pytest.approx(W.losses(plain), rel=1e-4)


def test_patch_after_the_trainer_added_its_head_is_refused(tmp_path):
    tok = W.tokenizer()
    net = W.model(tok)
    _sft(tmp_path, net, tok, "plain", max_steps=1)  # training adds accelerate's wrapper on top
    with pytest.raises(ValueError, match="before creating the trainer"):
        hf.patch(net)


def test_loss_options_that_cannot_apply_to_log_probs_are_refused(tmp_path):
    tok = W.tokenizer()
    with pytest.raises(ValueError, match="label_smoothing"):
        _sft(tmp_path, hf.patch(W.model(tok), label_smoothing=0.1), tok, "smoothed", max_steps=1)


def test_patch_validates_option_values_at_construction():
    tok = W.tokenizer()
    net = W.model(tok)
    for options, name in (({"label_smoothing": 2.0}, "label_smoothing"), ({"z_loss": -1.0}, "z_loss"),
                          ({"impl": "fast"}, "impl"), ({"chunk_size": 0}, "chunk_size"),
                          ({"filter_eps": -1.0}, "filter_eps"),
                          ({"grad_weight_dtype": torch.int8}, "grad_weight_dtype")):
        with pytest.raises(ValueError, match=name):
            hf.patch(net, **options)
    assert not hf.is_patched(net)


def test_an_unknown_trl_contract_is_refused_by_name():
    def add_fused_lm_head(model, temperature=1.0, outputs=("log_probs",), chunk_size=4096):
        pass

    with pytest.raises(ValueError, match=f"trl {trl.__version__}"):
        check_contract(add_fused_lm_head)
    from trl.trainer.utils import add_fused_lm_head as installed

    check_contract(getattr(installed, "__gapfix_original__", installed))
    assert CONTRACT_PARAMETERS[0] == "model"


def _reward(completions, **kwargs):
    return [float(len(str(c))) for c in completions]


def _online(kind, tmp_path, net, tok, name):
    import datasets

    prompts = datasets.Dataset.from_list([{"prompt": p["prompt"]} for p in W.prompt_completion_dataset(4)])
    common = dict(output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=6, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                  use_cpu=True, seed=0, disable_tqdm=True, temperature=0.8, beta=0.0)
    if kind == "grpo":
        trainer = trl.GRPOTrainer(model=net, reward_funcs=_reward, args=trl.GRPOConfig(**common),
                                  train_dataset=prompts, processing_class=tok)
    else:
        trainer = trl.RLOOTrainer(model=net, reward_funcs=_reward, args=trl.RLOOConfig(**common),
                                  train_dataset=prompts, processing_class=tok)
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_grpo_and_rloo_train_on_the_patched_head(kind, tmp_path, monkeypatch):
    tok = W.tokenizer()
    net = W.model(tok)
    calls = _trl_kernel_calls(monkeypatch)
    plain = _online(kind, tmp_path, _twin(net), tok, "plain")
    assert calls
    calls.clear()
    patched = _online(kind, tmp_path, hf.patch(net), tok, "patched")
    assert not calls
    assert net.__dict__[_STATE]["trl_head"]["temperature"] == 0.8
    for key in ("loss", "entropy"):
        a, b = W.logged(patched, key), W.logged(plain, key)
        assert a and a == pytest.approx(b, rel=1e-4, abs=1e-5), key


def test_kto_trains_on_the_patched_head(tmp_path, monkeypatch):
    import datasets

    tok = W.tokenizer()
    net = W.model(tok)
    pairs = W.prompt_completion_dataset(8)
    data = datasets.Dataset.from_list([{**row, "label": i % 2 == 0} for i, row in enumerate(pairs)])
    runs = []
    calls = _trl_kernel_calls(monkeypatch)
    for name, model in (("plain", _twin(net)), ("patched", hf.patch(net))):
        calls.clear()
        args = trl.KTOConfig(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, max_length=64)
        trainer = trl.KTOTrainer(model=model, ref_model=_twin(net), args=args, train_dataset=data,
                                 processing_class=tok)
        trainer.train()
        runs.append((trainer, len(calls)))
    (plain, plain_calls), (patched, patched_calls) = runs
    # the reference model keeps TRL's head; the trained model's head is gapfix's
    assert patched_calls < plain_calls
    assert net.__dict__[_STATE]["trl_head"]["outputs"] == ("log_probs", "entropy", "mean_logits")
    # Adam turns last-bit gradient differences into small weight differences after step 1
    assert W.losses(patched) == pytest.approx(W.losses(plain), rel=1e-3)
