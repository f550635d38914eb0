"""The seams between gapfix and the components on its other side: the model's own
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
    loss, _ = CausalLMLoss(model, fused)({"input_ids": input_ids, "attention_mask": attention_mask,
                                          "labels": labels})
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


# ------------------------------------------------------------------ (b) one label convention

def sft_rows(count=6, seed=0):
    from gapfix.data import Example, sft_row

    rows, prompts = prompt_answer_rows(tuple((2 + i % 3, 3 + i % 4) for i in range(count)), seed)
    return [sft_row(Example(r[:p], r[p:] + [2])) for r, p in zip(rows, prompts)]


def rac_rows():
    from gapfix.methods.rac import build_rac_rows

    rows, prompts = prompt_answer_rows(((3, 6), (4, 5), (2, 7)), seed=3)
    generated = [r[p:-2] + [r[-1]] + [2] for r, p in zip(rows, prompts)]  # a token dropped, one wrong
    generated[1] = generated[1][:-1]  # cut at the length limit
    out, _ = build_rac_rows([r[:p] for r, p in zip(rows, prompts)], generated,
                            [r[p:] for r, p in zip(rows, prompts)], eos_id=2, pad_id=0, impl="torch")
    return out


@pytest.mark.parametrize("kind", ["sft", "rac"])
def test_rows_train_what_a_transformers_trainer_trains(tmp_path, kind):
    """gapfix's rows, collated by gapfix, give a real transformers Trainer's loss the same
    value as gapfix's own loss: both read labels in the Hugging Face convention."""
    from gapfix.data import collate

    model = tiny_family("llama")
    rows = sft_rows() if kind == "sft" else rac_rows()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                          per_device_train_batch_size=len(rows))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   data_collator=lambda items: collate(items, pad_id=0))
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = trainer.compute_loss(model, dict(batch))
        ours, _ = CausalLMLoss(model, fused=True)(batch)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(ours / trained, theirs, rtol=1e-5, atol=1e-5)


def test_bash_batch_and_trainer_loss_agree():
    """build_bash_batch's labels (HF convention) and the trainer's loss on the same rows."""
    from gapfix.data import collate
    from gapfix.methods.bash import build_bash_batch

    model = tiny_family("llama")
    batch = collate(sft_rows(), pad_id=0)
    step = build_bash_batch(model, batch["input_ids"], batch["labels"], batch["input_ids"], beta=0.0,
                            seed=0, attention_mask=batch["attention_mask"])
    with torch.no_grad():
        theirs = model(**step.model_inputs()).loss
        ours, _ = CausalLMLoss(model, fused=True)(batch)
    torch.testing.assert_close(ours / int((batch["labels"][:, 1:] != -100).sum()), theirs,
                               rtol=1e-5, atol=1e-5)


def shifted_like_before(row):
    """A row in the other convention: labels[i] the target of position i (pre-shifted)."""
    return {**row, "labels": row["labels"][1:] + [-100]}


def test_rows_in_the_shifted_convention_are_refused():
    from gapfix.data import collate, pack_rows
    from gapfix.methods.bash import build_bash_batch

    rows = sft_rows()
    old = [shifted_like_before(r) for r in rows]
    with pytest.raises(ValueError, match="shifted convention"):
        collate(old, pad_id=0)
    with pytest.raises(ValueError, match="shifted convention"):
        pack_rows(old)
    batch = collate(rows, pad_id=0)
    shifted = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)
    with pytest.raises(ValueError, match="shifted convention"):
        build_bash_batch(tiny_family("llama"), batch["input_ids"], shifted, batch["input_ids"], beta=0.1,
                         seed=0, attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="exactly one"):  # both conventions in one row
        collate([{**rows[0], "shift_labels": old[0]["labels"]}], pad_id=0)
    collate(rac_rows(), pad_id=0)  # corrections (labels unlike their inputs) are not mistaken for shifted


def test_shift_labels_are_the_explicit_other_convention():
    """Already shifted targets pass under transformers' name for them, shift_labels, and train
    the same loss as the aligned labels they came from."""
    from gapfix.data import collate

    model = tiny_family("llama")
    rows = sft_rows()
    aligned = collate(rows, pad_id=0)
    explicit = collate([{"input_ids": r["input_ids"], "shift_labels": shifted_like_before(r)["labels"]}
                        for r in rows], pad_id=0)
    with torch.no_grad():
        a, _ = CausalLMLoss(model, fused=True)(aligned)
        b, _ = CausalLMLoss(model, fused=True)(explicit)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ (c) EOS in generated answers

def test_generation_records_its_stop_token():
    from gapfix.generation import Generation

    done = Generation(0, 0, [5, 6], "eos", stop_token_id=7)
    cut = Generation(0, 0, [5, 6], "length")
    assert done.finished and not cut.finished
    assert done.token_ids_with_stop() == [5, 6, 7] and cut.token_ids_with_stop() == [5, 6]
    assert Generation.from_record(done.to_record()) == done


@pytest.fixture(scope="module")
def finishing_model():
    """A tiny model trained on the math task until it ends every answer with EOS."""
    from gapfix.data import encode_example, math_task
    from gapfix.models import tiny_llama
    from gapfix.trainer import train

    tokenizer = math_task.math_tokenizer()
    examples = [encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 96, seed=5)]
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=128,
                       seed=0).train()
    train(model, tokenizer, examples, method="sft", steps_per_iteration=300, batch_size=16, lr=1e-2,
          progress=False)
    return model, tokenizer, examples


def test_rac_statistics_see_finished_answers(finishing_model, tmp_path):
    """`gapfix train --method rac`'s offline statistics: finished and exact_match counted from
    what the model really generated (not 0.0 and 0.0, as when every answer is taken as cut)."""
    import copy
    import json

    from gapfix.generation import generate
    from gapfix.methods.rac import build_rac_rows
    from gapfix.trainer import train

    model, tokenizer, examples = finishing_model
    outputs = generate(model, [e.prompt_ids for e in examples], tokenizer=tokenizer, max_new_tokens=40,
                       backend="hf")
    finished = sum(o.finish_reason == "eos" for o in outputs) / len(outputs)
    exact = sum(o.finish_reason == "eos" and o.token_ids == e.answer_ids[:-1]
                for o, e in zip(outputs, examples)) / len(outputs)
    assert finished > 0.9 and exact > 0.2  # the model finishes its answers, and is often right
    # greedy answers, as generate above (rac_temperature's default is 1.0 since one set of defaults
    # serves both drivers)
    train(copy.deepcopy(model), tokenizer, examples, method="rac", steps_per_iteration=1, batch_size=8,
          progress=False, max_new_tokens=40, generation_backend="hf", out_dir=str(tmp_path), rac_temperature=0.0)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    stats = next(r for r in records if r.get("event") == "rac_offline")
    assert stats["finished"] == pytest.approx(finished)
    assert stats["exact_match"] == pytest.approx(exact)
    assert all(o.stop_token_id == tokenizer.eos_token_id for o in outputs if o.finished)
    rows, _ = build_rac_rows([e.prompt_ids for e in examples], outputs, [e.answer_ids for e in examples],
                             eos_id=tokenizer.eos_token_id, impl="torch")
    eos = tokenizer.eos_token_id
    for row, output, example in zip(rows, outputs, examples):  # a finished answer's row ends in its EOS
        assert (row["input_ids"][-1] == eos) == output.finished
        if output.finished and output.token_ids == example.answer_ids[:-1]:
            assert row["labels"][-1] == eos


def test_build_rac_rows_takes_generations_or_finished_flags():
    from gapfix.generation import Generation
    from gapfix.methods.rac import build_rac_rows

    prompts, refs = [[1, 2], [3]], [[10, 11, 2], [12, 2]]
    with_eos, stats = build_rac_rows(prompts, [[10, 11, 2], [12, 13]], refs, eos_id=2, pad_id=0)
    flags, _ = build_rac_rows(prompts, [[10, 11], [12, 13]], refs, eos_id=2, pad_id=0, finished=[True, False])
    objects, _ = build_rac_rows(prompts, [Generation(0, 0, [10, 11], "eos", stop_token_id=2),
                                          Generation(1, 0, [12, 13], "length")], refs, eos_id=2, pad_id=0)
    assert with_eos == flags == objects
    assert stats["finished"] == 0.5 and stats["exact_match"] == 0.5
    with pytest.raises(ValueError, match="finished"):
        build_rac_rows(prompts, [[10], [12]], refs, eos_id=2, finished=[True])


# ------------------------------------------------------------------ (d) chat turns

CHATML = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
          "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
          "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_PLAIN = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
CONVERSATION = [{"role": "system", "content": "you add numbers"},
                {"role": "user", "content": "12 plus 30"}, {"role": "assistant", "content": "it is 42"},
                {"role": "user", "content": "and 7 plus 8"}, {"role": "assistant", "content": "it is 15"}]


def chat_tokenizer(template):
    """A word-level tokenizer with a BOS it adds itself, and ChatML turns whose end-of-turn
    (<|im_end|>) is not its EOS (</s>)."""
    from gapfix.models import train_tokenizer

    texts = [m["content"] for m in CONVERSATION] + ["system user assistant\n"]
    tok = train_tokenizer(texts, kind="word", add_bos=True, chat_template=template)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def chat_example(tmp_path, template):
    import json

    from gapfix.data import load_examples, sft_row

    tok = chat_tokenizer(template)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    (example,) = load_examples(str(path), tok)
    return tok, example, sft_row(example)


@pytest.mark.parametrize("template", [CHATML, CHATML_PLAIN], ids=["generation-block", "rendered-diff"])
def test_every_assistant_turn_trained_with_its_end_of_turn(tmp_path, template):
    """The trained tokens are exactly those transformers marks as the assistant's (every turn,
    each closed by <|im_end|> and its newline, never the tokenizer's EOS); one BOS."""
    tok, example, row = chat_example(tmp_path, template)
    reference = chat_tokenizer(CHATML).apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert row["input_ids"] == list(reference["input_ids"])
    expected = [t if m else -100 for t, m in zip(reference["input_ids"], reference["assistant_masks"])]
    assert row["labels"] == expected
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    trained = [t for t in row["labels"] if t != -100]
    assert trained.count(im_end) == 2 and tok.eos_token_id not in trained
    assert tok.decode(example.answer_ids) == "it is 15<|im_end|>\n"
    assert row["input_ids"].count(tok.bos_token_id) == 1
    # the prompt is what generation is given: the context and the assistant header
    prompt = tok.apply_chat_template(CONVERSATION[:-1], tokenize=True, add_generation_prompt=True)
    assert example.prompt_ids == list(prompt if isinstance(prompt, list) else prompt["input_ids"])


def test_chat_rows_bash_eligible_covers_every_turn(tmp_path):
    """BASH mixes every trained (assistant) token, earlier turns included."""
    from gapfix.models import tiny_llama
    from gapfix.trainer import TrainConfig, build_rows

    tok, example, row = chat_example(tmp_path, CHATML)
    model = tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    (bash_row,) = build_rows("bash", model, tok, [example], TrainConfig(bash_mode="argmax"))
    assert bash_row["eligible"] == [label != -100 for label in row["labels"]]


# ------------------------------------------------------------------ (e) packing under sdpa

def test_packed_and_unpacked_losses_agree_under_sdpa():
    """transformers' sdpa path keeps packed examples apart given position_ids: the packed batch's
    loss and gradients are the padded batch's (rows with chat-style trained prompts included)."""
    from gapfix.data import collate, pack_rows
    from gapfix.trainer import packing_supported

    model = tiny_family("llama").train()
    assert model.config._attn_implementation == "sdpa" and packing_supported(model)
    rows = sft_rows(5) + rac_rows()
    losses, grads = [], []
    for batch in (collate(rows, pad_id=0), pack_rows(rows)):
        model.zero_grad()
        loss, _ = CausalLMLoss(model, fused=True)(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["sft", "bash"])
def test_trainer_packs_under_sdpa(method):
    """Packed micro-batches train as padded ones (BASH at beta 0: its mixing mask is drawn per
    position of the batch layout, which packing changes)."""
    from gapfix.data import encode_example, math_task
    from gapfix.models import tiny_llama
    from gapfix.trainer import train

    tokenizer = math_task.math_tokenizer()
    examples = [encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 32, seed=5)]
    runs = []
    for packing in (False, True):
        model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=128,
                           seed=0).train()
        losses = []
        train(model, tokenizer, examples, method=method, beta=0.0, steps_per_iteration=2, batch_size=8,
              lr=3e-3, micro_batch_size=3, progress=False, packing=packing,
              on_step=lambda r: losses.append(r["loss"]))
        runs.append((losses, model.lm_head.weight.detach().clone()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-5)
    model.config._attn_implementation = "an_attention_without_packing"
    with pytest.raises(ValueError, match="packing"):
        train(model, tokenizer, examples, method="sft", steps_per_iteration=1, batch_size=8, progress=False,
              packing=True)


# ------------------------------------------------------------------ (f) PEFT

@pytest.fixture(scope="module")
def math_data():
    from gapfix.data import encode_example, math_task

    tokenizer = math_task.math_tokenizer()
    examples = [encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 32, seed=5)]
    return tokenizer, examples


def math_lora_model(tokenizer, targets=("q_proj", "v_proj")):
    peft = pytest.importorskip("peft")
    from gapfix.models import tiny_llama

    base = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=128, seed=0)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))


@pytest.mark.parametrize("method", ["sft", "bash", "rac"])
def test_train_a_peft_model(math_data, method):
    """gapfix.train on a real peft LoRA model trains the adapter and leaves the base as it was."""
    from gapfix.trainer import train

    tokenizer, examples = math_data
    model = math_lora_model(tokenizer)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = []
    result = train(model, tokenizer, examples, method=method, steps_per_iteration=2, batch_size=8, lr=1e-2,
                   progress=False, max_new_tokens=30, on_step=lambda r: losses.append(r["loss"]))
    assert result.model is model and len(losses) == 2 and all(loss == loss for loss in losses)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)  # only the adapter moved
    assert any("lora_B" in k for k in changed)


def test_resume_a_peft_run_is_exact(math_data, tmp_path):
    """A LoRA run killed after a checkpoint and resumed ends with the adapter of an uninterrupted
    run (the checkpoint holds the adapter in PEFT's format, loaded the PEFT way)."""
    from test_trainer import train_killed_after

    from gapfix.trainer import latest_checkpoint, train

    tokenizer, examples = math_data
    config = dict(method="sft", steps_per_iteration=4, batch_size=8, lr=1e-2, progress=False)
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
    straight = math_lora_model(tokenizer)
    train(straight, tokenizer, examples, out_dir=str(tmp_path / "straight"), **config)

    torch.manual_seed(0)
    train_killed_after(3, math_lora_model(tokenizer), tokenizer, examples, out_dir=str(tmp_path / "resumed"),
                       save_every=2, **config)
    assert latest_checkpoint(str(tmp_path / "resumed")).endswith("step0000002")
    torch.manual_seed(1)  # another adapter: its weights must come from the checkpoint
    resumed = math_lora_model(tokenizer)
    train(resumed, tokenizer, examples, out_dir=str(tmp_path / "resumed"), save_every=2, **config)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def run_cli(*args):
    from gapfix.cli import main

    return main(["train", *map(str, args)])


def test_cli_trains_a_lora_adapter_in_peft_format(tmp_path):
    peft = pytest.importorskip("peft")
    from gapfix.data import math_task

    data = math_task.write_splits(str(tmp_path / "data"), train=32, test=4, hard=2)
    out = tmp_path / "run"
    assert run_cli("--model", "tiny", "--train", data["train"], "--method", "sft", "--steps-per-iteration", 2,
                   "--batch-size", 8, "--progress", "false", "--out", out,
                   "--lora-r", 4, "--lora-alpha", 16, "--lora-targets", "q_proj,v_proj") == 0
    final = out / "final"
    config = peft.PeftConfig.from_pretrained(str(final))
    assert config.r == 4 and config.lora_alpha == 16 and set(config.target_modules) == {"q_proj", "v_proj"}
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()


def test_cli_trains_from_an_adapter_folder(tmp_path):
    """`gapfix train --model <adapter folder>`: the adapter on its base, trainable (its parameters
    require grad), saved back as an adapter."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from gapfix.data import math_task
    from gapfix.models import save_model

    data = math_task.write_splits(str(tmp_path / "data"), train=32, test=4, hard=2)
    tokenizer = math_task.math_tokenizer()
    model = math_lora_model(tokenizer)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    save_model(model.get_base_model(), tokenizer, base_dir)  # LoRA layers are not saved by the base
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    out = tmp_path / "run"
    assert run_cli("--model", adapter_dir, "--train", data["train"], "--method", "sft",
                   "--steps-per-iteration", 2, "--batch-size", 8, "--lr", "0.01", "--progress", "false",
                   "--out", out) == 0
    before = load_file(str(adapter_dir / "adapter_model.safetensors"))
    after = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert peft.PeftConfig.from_pretrained(str(out / "final")).r == 4


# ------------------------------------------------------------------ (g) the DDP recipe of docs/ops.md

def run_recipe(tmp_path, recipe):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / f"{recipe}.json"
    worker = os.path.join(os.path.dirname(__file__), "distributed_recipe_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               worker, str(out), recipe]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_ddp_recipe_keeps_replicas_identical(tmp_path):
    """Two gloo processes follow the recipe of docs/ops.md on different shards: their parameters are
    equal after training (and did train)."""
    result = run_recipe(tmp_path, "inside")
    assert result["moved"] > 1e-3
    assert result["max_rank_difference"] <= 1e-6, result


def test_trunk_beside_ddp_lets_replicas_drift(tmp_path):
    """Why the recipe runs the trunk inside the DDP-wrapped forward: with the trunk called beside
    it, the replicas silently drift apart."""
    result = run_recipe(tmp_path, "outside")
    assert result["max_rank_difference"] > 1e-3, result
