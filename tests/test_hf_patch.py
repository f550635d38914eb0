"""gapfix.hf.patch: the fused loss inside a transformers model's forward, with a real Trainer and PEFT."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import hf_worker as W

from gapfix import hf


def _batch(tok, count=5, seed=3):
    batch = W.collator(tok)(W.rows(tok, count, seed=seed))
    return {k: v for k, v in batch.items()}


def _twin(net):
    twin = type(net)(net.config)
    twin.load_state_dict(net.state_dict())
    return twin.train()


def _loss_and_grads(net, batch, **extra):
    net.zero_grad()
    out = net(**batch, **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(out_a, grads_a, out_b, grads_b, tol=1e-5):
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_import_gapfix_hf_is_light():
    code = "import sys, gapfix, gapfix.hf; print(any(m in sys.modules for m in ('transformers', 'trl')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_patch_stays_the_function_whatever_is_imported_first():
    """Importing the module that implements patch, before gapfix.hf.patch is looked up, leaves
    gapfix.hf.patch the function (a module named like the function would replace it)."""
    code = ("import gapfix.hf.patching, gapfix.hf.trl_head, gapfix.hf as hf; "
            "assert callable(hf.patch) and hf.patch is gapfix.hf.patching.patch, hf.patch")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_and_gradients_match_the_model_own(num_items):
    tok = W.tokenizer()
    net = W.model(tok)
    batch = _batch(tok)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    reference = _loss_and_grads(_twin(net), batch, **extra)
    patched_out, patched_grads = _loss_and_grads(hf.patch(net), batch, **extra)
    assert patched_out.logits is None  # the (B, T, V) logits were never formed
    _assert_same(*reference, patched_out, patched_grads)


def test_without_labels_the_original_forward_runs_and_unpatch_restores():
    tok = W.tokenizer()
    net = W.model(tok)
    batch = _batch(tok)
    plain = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hf.patch(net, impl="torch")
    assert hf.is_patched(net) and net.accepts_loss_kwargs is True
    torch.testing.assert_close(net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               plain)
    hf.unpatch(net)
    assert not hf.is_patched(net) and "forward" not in net.__dict__
    assert net(**batch).logits is not None
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(net)


def test_bad_options_are_refused():
    tok = W.tokenizer()
    net = W.model(tok)
    with pytest.raises(ValueError, match="reduction"):
        hf.patch(net, reduction="sum")
    with pytest.raises(ValueError, match="unknown loss option 'smoothing'"):
        hf.patch(net, smoothing=0.1)
    with pytest.raises(ValueError, match="model"):
        hf.patch(torch.nn.Linear(2, 2))
    assert not hf.is_patched(net)


def test_label_smoothing_option_reaches_the_loss():
    tok = W.tokenizer()
    net = W.model(tok)
    batch = _batch(tok)
    plain = hf.patch(_twin(net))(**batch).loss
    smoothed = hf.patch(net, label_smoothing=0.1)(**batch).loss
    assert smoothed > plain + 1e-3


def test_tied_embeddings():
    tok = W.tokenizer()
    net = W.model(tok, tie_word_embeddings=True)
    assert net.lm_head.weight is net.get_input_embeddings().weight
    batch = _batch(tok)
    reference = _loss_and_grads(_twin(net), batch)
    _assert_same(*reference, *_loss_and_grads(hf.patch(net), batch))


def _tiny(config_name, model_name, tok, **extra):
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).train()


@pytest.mark.parametrize("config_name,model_name,extra", [
    ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 3.0}),
    ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 0.25}),
    ("CohereConfig", "CohereForCausalLM", {"logit_scale": 2.5}),
])
def test_softcapping_and_logit_scaling_follow_the_config(config_name, model_name, extra):
    tok = W.tokenizer()
    net = _tiny(config_name, model_name, tok, **extra)
    batch = _batch(tok)
    reference = _loss_and_grads(_twin(net), batch)
    _assert_same(*reference, *_loss_and_grads(hf.patch(net), batch), tol=1e-4)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_peft_lora_model(targets):
    peft = pytest.importorskip("peft")
    tok = W.tokenizer()
    base = W.model(tok)
    batch = _batch(tok)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    lora = peft.get_peft_model(base, config)
    reference = _loss_and_grads(lora, batch)
    hf.patch(lora)
    assert hf.is_patched(lora)
    out, grads = _loss_and_grads(lora, batch)
    assert out.logits is None and all("lora" in n for n in grads)
    _assert_same(*reference, out, grads)
    hf.unpatch(lora)
    assert lora(**batch).logits is not None


def test_bf16_autocast_and_bf16_trunk_with_fp32_head():
    tok = W.tokenizer()
    net = W.model(tok)
    batch = _batch(tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = _loss_and_grads(_twin(net), batch)
        patched = _loss_and_grads(hf.patch(_twin(net)), batch)
    torch.testing.assert_close(patched[0].loss, reference[0].loss, rtol=2e-2, atol=2e-2)
    # a bf16 model whose head stays fp32: no dtype error, the loss of the fp32 head
    mixed = _twin(net).to(torch.bfloat16)
    mixed.lm_head.float()
    hidden_run = _twin(net).to(torch.bfloat16)
    hidden = hidden_run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    expected = torch.nn.functional.cross_entropy(
        (hidden.float() @ net.lm_head.weight.T)[:, :-1].reshape(-1, len(tok)), batch["labels"][:, 1:].reshape(-1))
    loss = hf.patch(mixed)(**batch).loss
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    loss.backward()
    assert mixed.lm_head.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_logs_the_losses_of_the_unpatched_model(tmp_path, accumulation):
    from transformers import Trainer

    tok = W.tokenizer()
    runs = []
    for patched in (False, True):
        net = W.model(tok)
        trainer = Trainer(model=hf.patch(net) if patched else net, train_dataset=W.dataset(tok, 24),
                          data_collator=W.collator(tok),
                          args=W.args(tmp_path / str(patched), max_steps=4, gradient_accumulation_steps=accumulation,
                                      per_device_train_batch_size=4 // accumulation))
        trainer.train()
        runs.append((W.losses(trainer), W.checksums(net)))
    (plain, plain_weights), (fused, fused_weights) = runs
    assert len(plain) == len(fused) == 4
    for a, b in zip(plain, fused):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (plain, fused)
    for name in plain_weights:
        assert abs(plain_weights[name] - fused_weights[name]) <= 1e-3 * max(1.0, abs(plain_weights[name])), name
    assert plain[-1] < plain[0]


def test_two_gloo_processes_end_with_equal_parameters(tmp_path):
    ranks = W.torchrun(tmp_path, "patch")
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["wrapper"] == "DistributedDataParallel"
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]


def test_sft_trainer_trains_a_patched_model_on_gapfix_head(tmp_path):
    """TRL's SFTTrainer asks for its fused LM head (fused_lm_head=True); on a patched model
    gapfix serves it (tests/test_trl_head.py has the field-by-field checks). The first step
    sees the same weights: the same loss; later steps agree to Adam's amplification of
    last-bit gradient differences. unpatch still refuses to strip a wrapper added on top
    (accelerate's, while training)."""
    trl = pytest.importorskip("trl")
    tok = W.tokenizer()
    runs = []
    for patched in (False, True):
        net = W.model(tok)
        args = trl.SFTConfig(output_dir=str(tmp_path / str(patched)), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, max_length=64, completion_only_loss=True)
        trainer = trl.SFTTrainer(model=hf.patch(net) if patched else net, args=args, processing_class=tok,
                                 train_dataset=W.prompt_completion_dataset(12))
        trainer.train()
        runs.append(W.losses(trainer))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    assert runs[0] == pytest.approx(runs[1], rel=1e-3)
    with pytest.raises(ValueError, match="wrapped again"):
        hf.unpatch(net)
    assert hf.is_patched(net)
