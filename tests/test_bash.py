"""gapfix.methods.bash on tiny transformers models (random init from configs; nothing downloaded)."""
import pytest
import torch
import torch.nn as nn

from gapfix.methods.bash import Alternatives, build_bash_batch, mixed_inputs_embeds, predict_alternatives
from gapfix.ops.mix_embedding import mixing_mask

transformers = pytest.importorskip("transformers")

FAMILIES = ["llama", "qwen2", "gemma", "gpt2"]
VOCAB, B, T = 300, 3, 12


def tiny_model(family, seed=0):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128)
    if family == "llama":
        config, cls = transformers.LlamaConfig(**common, num_key_value_heads=2), \
            transformers.LlamaForCausalLM
    elif family == "qwen2":
        config, cls = transformers.Qwen2Config(**common, num_key_value_heads=2), \
            transformers.Qwen2ForCausalLM
    elif family == "gemma":  # scaled embedding (sqrt(d)), tied input/output weights
        config, cls = transformers.GemmaConfig(**common, num_key_value_heads=1, head_dim=16), \
            transformers.GemmaForCausalLM
    else:  # tied weights, learned positions
        config, cls = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                              n_positions=64, bos_token_id=0, eos_token_id=0,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), \
            transformers.GPT2LMHeadModel
    torch.manual_seed(seed)
    return cls(config)


def batch(seed=0):
    """Right-padded prompt+answer rows: prompt lengths 3..5, answer lengths 4..7."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (B, T), generator=gen)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for row, (prompt, answer) in enumerate([(3, 7), (5, 4), (4, 6)]):
        attention_mask[row, :prompt + answer] = 1
        labels[row, prompt:prompt + answer] = input_ids[row, prompt:prompt + answer]
    input_ids[attention_mask == 0] = 0
    alt_ids = torch.randint(1, VOCAB, (B, T), generator=gen)
    return input_ids, attention_mask, labels, alt_ids


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------- integration

@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_mixed_equals_model_embedding(family):
    model = tiny_model(family)
    input_ids, _, _, alt_ids = batch()
    embeds, mixed = mixed_inputs_embeds(model, input_ids, alt_ids,
                                        mask=torch.zeros_like(input_ids, dtype=torch.bool))
    assert not mixed.any()
    assert torch.equal(embeds, model.get_input_embeddings()(input_ids))


def _assert_mixed_embeds_train_like_mixed_ids(family, device):
    """Loss and every gradient (tied weights included) equal those of model(input_ids=where(...))."""
    input_ids, attention_mask, labels, alt_ids = (t.to(device) for t in batch())
    mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(2)) < 0.5).to(device)
    eligible = labels != -100
    runs = []
    for use_embeds in (True, False):
        model = tiny_model(family).to(device)
        if use_embeds:
            embeds, mixed = mixed_inputs_embeds(model, input_ids, alt_ids, mask=mask, eligible=eligible)
            assert torch.equal(mixed, mask & eligible)
            out = model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
        else:
            out = model(input_ids=torch.where(mask & eligible, alt_ids, input_ids),
                        attention_mask=attention_mask, labels=labels)
        out.loss.backward()
        runs.append((out.loss.detach(), grads(model)))
    (loss, grad), (loss_ref, grad_ref) = runs
    torch.testing.assert_close(loss, loss_ref)
    assert grad.keys() == grad_ref.keys()
    for name in grad:
        torch.testing.assert_close(grad[name], grad_ref[name], msg=name)
    return model, input_ids, attention_mask, eligible


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_embeds_train_like_mixed_ids(family):
    _assert_mixed_embeds_train_like_mixed_ids(family, "cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_runs(family):
    model = tiny_model(family)
    input_ids, attention_mask, labels, _ = batch()
    answer_mask = labels != -100
    alts = predict_alternatives(model, input_ids, attention_mask, answer_mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.get_input_embeddings().weight.detach().clone()
    step = build_bash_batch(model, input_ids, labels, alts.alt_ids, beta=0.5, seed=1,
                            attention_mask=attention_mask)
    assert step.labels is labels and step.mixed.any()
    assert not (step.mixed & ~answer_mask).any()
    loss = model(**step.model_inputs()).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.get_input_embeddings().weight)


def test_gemma_soft_mode_applies_the_embedding_scale():
    model = tiny_model("gemma")
    input_ids, _, labels, alt_ids = batch()
    eligible = labels != -100
    alt_k = torch.stack([alt_ids, input_ids], -1)
    probs = torch.tensor([0.75, 0.25]).expand(B, T, 2)
    embeds, mixed = mixed_inputs_embeds(model, input_ids, alt_k, alt_probs=probs, beta=1.0, seed=0,
                                        eligible=eligible)
    module = model.get_input_embeddings()
    expected = torch.where(mixed[..., None], 0.75 * module(alt_ids) + 0.25 * module(input_ids),
                           module(input_ids))
    torch.testing.assert_close(embeds, expected)


class NormedEmbedding(nn.Module):
    """An input embedding the fused kernel cannot reproduce (a norm after the lookup)."""

    def __init__(self, vocab, dim):
        super().__init__()
        self.table = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids):
        return self.norm(self.table(ids))


def test_unknown_embedding_module_mixes_ids():
    model = tiny_model("llama")
    model.set_input_embeddings(NormedEmbedding(VOCAB, 64))
    input_ids, attention_mask, labels, alt_ids = batch()
    eligible = labels != -100
    embeds, mixed = mixed_inputs_embeds(model, input_ids, alt_ids, beta=0.5, seed=4, eligible=eligible)
    assert torch.equal(mixed, mixing_mask(input_ids.shape, beta=0.5, seed=4, eligible=eligible))
    module = model.get_input_embeddings()
    assert torch.equal(embeds, module(torch.where(mixed, alt_ids, input_ids)))
    model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss.backward()
    assert module.table.weight.grad is not None
    alt_k = torch.stack([alt_ids, input_ids], -1)
    soft, _ = mixed_inputs_embeds(model, input_ids, alt_k, alt_probs=torch.tensor([0.5, 0.5]).expand(B, T, 2),
                                  beta=0.5, seed=4, eligible=eligible)
    expected = torch.where(mixed[..., None], 0.5 * module(alt_ids) + 0.5 * module(input_ids),
                           module(input_ids))
    torch.testing.assert_close(soft, expected)
    with pytest.raises(ValueError, match="beta"):
        mixed_inputs_embeds(model, input_ids, alt_ids, beta=2.0, seed=4)


# ---------------------------------------------------------------------------- prediction pass

@pytest.mark.parametrize("family", FAMILIES)
def test_argmax_prediction_equals_full_logits(family):
    model = tiny_model(family)
    input_ids, attention_mask, labels, _ = batch()
    answer_mask = labels != -100
    model.train()
    alts = predict_alternatives(model, input_ids, attention_mask, answer_mask, chunk_size=5)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    assert alts.alt_probs is None and not alts.alt_ids.requires_grad
    model.eval()
    with torch.no_grad():
        guess = model(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)
    expected = input_ids.clone()
    expected[:, 1:] = torch.where(answer_mask[:, 1:], guess[:, :-1], input_ids[:, 1:])
    assert torch.equal(alts.alt_ids, expected)
    # eval mode is restored too
    assert not model.training
    predict_alternatives(model, input_ids, attention_mask, answer_mask)
    assert not model.training


def test_topk_prediction():
    model = tiny_model("qwen2")
    input_ids, attention_mask, labels, _ = batch()
    answer_mask = labels != -100
    alts = predict_alternatives(model, input_ids, attention_mask, answer_mask, mode="topk", top_k=3,
                                temperature=0.7, chunk_size=4)
    assert alts.alt_ids.shape == (B, T, 3) and alts.alt_probs.shape == (B, T, 3)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    values, ids = logits.topk(3, dim=-1)
    predicts = answer_mask[:, 1:]
    assert torch.equal(alts.alt_ids[:, 1:][predicts], ids[predicts])
    torch.testing.assert_close(alts.alt_probs[:, 1:][predicts], torch.softmax(values / 0.7, -1)[predicts])
    keep = ~answer_mask
    keep[:, 0] = True
    assert torch.equal(alts.alt_ids[keep][:, 0], input_ids[keep])
    assert torch.equal(alts.alt_probs[keep], torch.tensor([1.0, 0.0, 0.0]).expand(int(keep.sum()), 3))
    # the top-k batch feeds the soft mode
    step = build_bash_batch(model, input_ids, labels, alts.alt_ids, alt_probs=alts.alt_probs, beta=0.5,
                            seed=0, attention_mask=attention_mask)
    assert torch.isfinite(model(**step.model_inputs()).loss)


def test_sample_prediction_is_seeded():
    model = tiny_model("llama")
    input_ids, attention_mask, labels, _ = batch()
    answer_mask = labels != -100
    draw = lambda seed, t=1.0: predict_alternatives(  # noqa: E731
        model, input_ids, attention_mask, answer_mask, mode="sample", seed=seed, temperature=t).alt_ids
    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[~answer_mask], input_ids[~answer_mask])
    # a near-zero temperature samples the argmax
    argmax = predict_alternatives(model, input_ids, attention_mask, answer_mask).alt_ids
    assert torch.equal(draw(0, 1e-6), argmax)


class TrunklessLM(nn.Module):
    """A causal LM with no separate trunk / head: the micro-batch path."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model("llama")
        self.config = self.inner.config

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_model_without_base_model_uses_micro_batches():
    model = TrunklessLM()
    input_ids, attention_mask, labels, _ = batch()
    answer_mask = labels != -100
    ours = predict_alternatives(model, input_ids, attention_mask, answer_mask, chunk_size=T)
    expected = predict_alternatives(model.inner, input_ids, attention_mask, answer_mask)
    assert torch.equal(ours.alt_ids, expected.alt_ids)


@pytest.mark.parametrize("kwargs,name", [
    (dict(mode="beam"), "mode"),
    (dict(mode="topk", top_k=0), "top_k"),
    (dict(mode="sample", temperature=0.0), "temperature"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(answer_mask=torch.ones(B, T - 1, dtype=torch.bool)), "answer_mask"),
    (dict(attention_mask=torch.ones(B, T + 1)), "attention_mask"),
])
def test_prediction_bad_input(kwargs, name):
    model = tiny_model("llama")
    input_ids, _, _, _ = batch()
    with pytest.raises(ValueError, match=name):
        predict_alternatives(model, input_ids, **kwargs)


def test_batch_builder_bad_input():
    model = tiny_model("gpt2")
    input_ids, attention_mask, labels, alt_ids = batch()
    with pytest.raises(ValueError, match="labels"):
        build_bash_batch(model, input_ids, labels[:, 1:], alt_ids, beta=0.1, seed=0)
    with pytest.raises(ValueError, match="alt_ids"):
        build_bash_batch(model, input_ids, labels, alt_ids[:, 1:], beta=0.1, seed=0)
    with pytest.raises(ValueError, match="alt_ids"):
        build_bash_batch(model, input_ids, labels, alt_ids + VOCAB, beta=0.1, seed=0)
    assert isinstance(predict_alternatives(model, input_ids), Alternatives)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_cuda_model_integration(family):
    """On the GPU: the Triton path inside a real model matches id-level mixing; the pass matches argmax."""
    model, input_ids, attention_mask, eligible = _assert_mixed_embeds_train_like_mixed_ids(family, "cuda")
    model.eval()
    alts = predict_alternatives(model, input_ids, attention_mask, eligible, chunk_size=7)
    with torch.no_grad():
        guess = model(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)
    assert torch.equal(alts.alt_ids[:, 1:][eligible[:, 1:]], guess[:, :-1][eligible[:, 1:]])
