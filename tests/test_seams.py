"""The seams between gapfix and the components on its other side (issue 9): the model's own
logit post-processing, packed batches, PEFT models, the label convention, EOS in generated
answers, chat templates, DDP. Every test runs the real counterpart (transformers models,
peft LoRA, tokenizers with chat templates, torchrun)."""
import pytest
import torch
import torch.nn.functional as F

from gapfix.methods.bash import predict_alternatives
from gapfix.trainer import CausalLMLoss

transformers = pytest.importorskip("transformers")

VOCAB = 300


def tiny_family(family, seed=0):
    """A tiny random model whose forward post-processes its logits (or not, for llama)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128)
    if family == "cohere":  # logits * logit_scale
        config, cls = transformers.CohereConfig(**common, logit_scale=3.0), transformers.CohereForCausalLM
    elif family == "granite":  # logits / logits_scaling
        config, cls = transformers.GraniteConfig(**common, logits_scaling=0.25), \
            transformers.GraniteForCausalLM
    elif family == "gemma2":  # softcap(logits)
        config, cls = transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=2.0), \
            transformers.Gemma2ForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    config._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    torch.manual_seed(seed)
    return cls(config).eval()


def prompt_answer_rows(lengths=((3, 7), (5, 4), (4, 6)), seed=0):
    """(input_ids lists, prompt lengths): random prompt+answer rows of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(4, VOCAB, (p + a,), generator=gen).tolist() for p, a in lengths]
    return rows, [p for p, _ in lengths]


def padded(rows, prompts):
    """Right-padded (input_ids, attention_mask, answer_mask) of the rows."""
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    answer = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (row, p) in enumerate(zip(rows, prompts)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        answer[i, p:len(row)] = True
    return input_ids, attention_mask, answer


def packed(rows, prompts):
    """One packed row: (input_ids, position_ids, answer_mask), positions restarting per example."""
    ids = torch.tensor([sum(rows, [])])
    positions = torch.tensor([sum((list(range(len(r))) for r in rows), [])])
    answer = torch.tensor([sum(([False] * p + [True] * (len(r) - p) for r, p in zip(rows, prompts)), [])])
    return ids, positions, answer


# ------------------------------------------------------------------ (a) one hidden-to-logits map

@pytest.mark.parametrize("family", ["llama", "cohere", "granite", "gemma2"])
@pytest.mark.parametrize("fused", [True, False])
def test_training_loss_uses_the_models_own_logits(family, fused):
    """The trainer's loss equals the cross-entropy of the logits the model's forward returns
    (Cohere's logit_scale, Granite's logits_scaling, Gemma 2's softcap all applied)."""
    model = tiny_family(family)
    rows, prompts = prompt_answer_rows()
    input_ids, attention_mask, answer = padded(rows, prompts)
    labels = torch.where(answer, input_ids, -100)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    loss, _ = CausalLMLoss(model, fused)({"input_ids": input_ids, "attention_mask": attention_mask,
                                          "labels": shifted})
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["cohere", "granite", "gemma2"])
def test_prediction_pass_uses_the_models_own_logits(family):
    """topk probabilities of the prediction pass are the model's own softmax (scale and softcap
    change them, unlike the argmax)."""
    model = tiny_family(family)
    rows, prompts = prompt_answer_rows()
    input_ids, attention_mask, answer = padded(rows, prompts)
    alts = predict_alternatives(model, input_ids, attention_mask, answer, mode="topk", top_k=3,
                                temperature=0.7, chunk_size=5)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()[:, :-1]
    values, ids = logits.topk(3, dim=-1)
    probs = F.softmax(values / 0.7, dim=-1)
    where = answer[:, 1:]
    assert torch.equal(alts.alt_ids[:, 1:][where], ids[where])
    torch.testing.assert_close(alts.alt_probs[:, 1:][where], probs[where], rtol=1e-4, atol=1e-5)


def test_packed_predictions_match_unpacked():
    """A packed batch (position_ids restarting per example, no attention mask) predicts what the
    examples predict run padded side by side (transformers' sdpa keeps them apart)."""
    model = tiny_family("llama")
    rows, prompts = prompt_answer_rows(((3, 7), (5, 4), (4, 6), (2, 9)))
    input_ids, attention_mask, answer = padded(rows, prompts)
    unpacked = predict_alternatives(model, input_ids, attention_mask, answer)
    ids, positions, packed_answer = packed(rows, prompts)
    got = predict_alternatives(model, ids, None, packed_answer, position_ids=positions)
    expected = torch.cat([unpacked.alt_ids[i, :len(r)] for i, r in enumerate(rows)])
    assert torch.equal(got.alt_ids[0], expected)


def lora_model(seed=0, targets=("q_proj", "v_proj")):
    """A real peft LoRA model whose adapter changes the outputs (B initialised non-zero)."""
    peft = pytest.importorskip("peft")
    base = tiny_family("llama", seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(base, config)


def test_prediction_pass_through_a_peft_model():
    model = lora_model(targets=("q_proj", "v_proj", "lm_head"))
    rows, prompts = prompt_answer_rows()
    input_ids, attention_mask, answer = padded(rows, prompts)
    alts = predict_alternatives(model, input_ids, attention_mask, answer, mode="topk", top_k=2)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()[:, :-1]
        plain = model.get_base_model()
        with model.disable_adapter():
            without = plain(input_ids=input_ids, attention_mask=attention_mask).logits.float()[:, :-1]
    where = answer[:, 1:]
    assert not torch.equal(logits.argmax(-1)[where], without.argmax(-1)[where])  # the adapter matters
    assert torch.equal(alts.alt_ids[:, 1:][where], logits.topk(2, dim=-1).indices[where])
