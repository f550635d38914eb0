"""RAC on chat data: references end with the chat template's end-of-turn (ChatML `<|im_end|>` and its
newline), not the tokenizer's EOS. gapfix's trainer and gapfix.hf's RacTrainer share one rule
(gapfix.methods.rac.reference_ends) for the token each reference ends with: RAC labels it, generation
stops on it, and finished / exact_match count answers that end with it."""
import json

import pytest
import torch
from test_seams import CHATML, CHATML_PLAIN, chat_tokenizer

TEMPLATES = pytest.mark.parametrize("template", [CHATML, CHATML_PLAIN], ids=["generation-block", "rendered-diff"])
CHATS = [[{"role": "user", "content": "7 plus 8"}, {"role": "assistant", "content": "15"}],
         [{"role": "user", "content": "12 plus 30"}, {"role": "assistant", "content": "42"}]]


def chat_examples(tmp_path, template):
    from gapfix.data import load_examples

    tok = chat_tokenizer(template)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    return tok, load_examples(str(path), tok)


def bigram_model(tok, transitions: dict):
    """A tiny Llama whose greedy next token depends on the last token only, as `transitions` says:
    attention and MLP outputs are zero, embeddings one-hot, lm_head the transition table."""
    from gapfix.models import tiny_llama

    vocab = len(tok)
    model = tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    assert model.config.hidden_size >= vocab
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for current, following in transitions.items():
            model.lm_head.weight[following, current] = 1.0
    return model


def answering_15(tok):
    """After the assistant header's newline the model says "15", then <|im_end|>, then a newline and
    "15" again (so it runs to the length limit unless generation stops at <|im_end|>)."""
    ids = tok.convert_tokens_to_ids
    return bigram_model(tok, {ids("\n"): ids("15"), ids("15"): ids("<|im_end|>"), ids("<|im_end|>"): ids("\n")})


@pytest.fixture
def stop_spy(monkeypatch):
    """Records the stop tokens gapfix.generate stops on, per call (as its runner reads them)."""
    from gapfix import generation

    seen, real = [], generation.generate

    def recording(model, prompts, **kwargs):
        stops = generation._eos_ids(model.config, kwargs.get("tokenizer"), model.generation_config)
        seen.append(stops + [t for t in kwargs.get("stop_token_ids", ()) if t not in stops])
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate", recording)
    return seen


def _config(**overrides):
    from gapfix.trainer import TrainConfig

    options = dict(rac_temperature=0.0, rac_samples=1, rac_sft_ratio=0.0, max_new_tokens=6,
                   generation_backend="hf")
    options.update(overrides)
    return TrainConfig(**options)


def _by_prompt(rows, examples):
    """Each example's row (the row whose input starts with its prompt)."""
    out = []
    for ex in examples:
        (row,) = [r for r in rows if r["input_ids"][:len(ex.prompt_ids)] == ex.prompt_ids]
        out.append(row)
    return out


@TEMPLATES
def test_trainer_rac_ends_chat_answers_with_the_end_of_turn(tmp_path, template, stop_spy):
    """Generation stops at <|im_end|> (not the tokenizer's </s>), each row's input and last label are
    <|im_end|>, and finished / exact_match count the answer that is its reference ("15")."""
    from gapfix.trainer import build_rows

    tok, examples = chat_examples(tmp_path, template)
    im_end, fifteen = tok.convert_tokens_to_ids(["<|im_end|>", "15"])
    assert im_end != tok.eos_token_id
    assert tok.decode(examples[0].answer_ids) == "15<|im_end|>\n"
    model = answering_15(tok)
    eos_before = model.generation_config.eos_token_id
    logs = []
    rows = build_rows("rac", model, tok, examples, _config(), log=logs.append)
    assert stop_spy and all(im_end in stops for stops in stop_spy)
    assert model.generation_config.eos_token_id == eos_before  # the model's own config is left as it was
    (stats,) = [r for r in logs if r.get("event") == "rac_offline"]
    assert stats["finished"] == 1.0 and stats["exact_match"] == 0.5
    assert stats["mean_edit_distance"] == 0.5  # "15" for "42": one substitution
    for row, ex, reference in zip(_by_prompt(rows, examples), examples, (fifteen, tok.convert_tokens_to_ids("42"))):
        assert row["input_ids"] == ex.prompt_ids + [fifteen, im_end]
        assert row["labels"] == [-100] * len(ex.prompt_ids) + [reference, im_end]


@pytest.mark.parametrize("mode", ["first", "all"])
def test_trainer_rac_labels_end_of_turn_in_every_mode(tmp_path, mode):
    """The answer that is its reference is labelled <|im_end|> at its end; </s> appears nowhere."""
    from gapfix.trainer import build_rows

    tok, examples = chat_examples(tmp_path, CHATML)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = build_rows("rac", answering_15(tok), tok, examples, _config(rac_mode=mode))
    assert all(row["input_ids"][-1] == im_end for row in rows)
    assert all(tok.eos_token_id not in row["labels"] + row["input_ids"] for row in rows)
    exact = _by_prompt(rows, examples)[0]
    assert exact["labels"][-1] == im_end
    if mode == "all":
        assert exact["target_ids"][-1][0] == im_end


def test_hf_rac_and_trainer_rac_build_the_same_chat_rows(tmp_path, stop_spy):
    """gapfix.hf's RAC on the same chat rows (SFT rows: prompt -100, answer trained) builds the rows
    gapfix's trainer builds: one rule for the end token, in both."""
    import datasets

    from gapfix import hf
    from gapfix.data import sft_row
    from gapfix.trainer import build_rows

    tok, examples = chat_examples(tmp_path, CHATML)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = answering_15(tok)
    ours = build_rows("rac", model, tok, examples, _config())
    data = datasets.Dataset.from_list([{k: sft_row(ex)[k] for k in ("input_ids", "labels")} for ex in examples])
    config = hf.RacConfig(samples=1, temperature=0.0, max_new_tokens=6, backend="hf", sft_ratio=0.0)
    theirs = hf.build_rac_dataset(model, tok, data, config=config, seed=0)
    assert all(im_end in stops for stops in stop_spy)
    assert sorted(r["finish_reason"] for r in theirs) == ["eos", "eos"]
    assert sorted((r["input_ids"], r["labels"]) for r in theirs) == \
        sorted((r["input_ids"], r["labels"]) for r in ours)


# ----------------------------------------------------------------- the shared rule, directly

def test_reference_ends_finds_the_end_token_behind_the_template_newline():
    from gapfix.methods.rac import answer_stop_ids, reference_ends

    tok = chat_tokenizer(CHATML)
    model = answering_15(tok)
    ids = tok.convert_tokens_to_ids
    eos, im_end, nl, fifteen, word = tok.eos_token_id, ids("<|im_end|>"), ids("\n"), ids("15"), ids("plus")
    stops = answer_stop_ids(model, tok)
    assert stops == [eos]  # <|im_end|> is no stop token of this model: the rule finds it all the same
    refs = [[fifteen, eos], [fifteen, im_end, nl], [fifteen, im_end, nl, nl], [fifteen, im_end],
            [fifteen, word], [fifteen, nl], [], [im_end, nl]]
    assert reference_ends(refs, tok, stops) == [
        (1, eos), (1, im_end), (1, im_end), (1, im_end),
        (2, eos), (2, eos), (0, eos),  # no end token: the whole reference, EOS implied (as before)
        (0, im_end)]
    with pytest.raises(ValueError, match="stop_ids"):
        reference_ends(refs, tok, [])


def test_references_with_different_end_tokens_each_get_their_own():
    """A batch mixing a plain record (</s>) and a chat record (<|im_end|>): each row is the row
    build_rac_rows makes with its own end token; the statistics are those of all rows together."""
    from gapfix.generation import Generation
    from gapfix.methods.rac import build_rac_rows, build_rac_rows_to_ends, reference_ends

    tok = chat_tokenizer(CHATML)
    ids = tok.convert_tokens_to_ids
    eos, im_end, nl = tok.eos_token_id, ids("<|im_end|>"), ids("\n")
    a, b, c = ids("15"), ids("42"), ids("plus")
    prompts = [[1, 4], [1, 5, 6], [1, 7], [1, 8], [1, 9]]
    refs = [[a, b, eos], [a, im_end, nl], [b, c, im_end, nl], [a, eos], [c, im_end, nl]]
    generated = [Generation(0, 0, [a, b], "eos", stop_token_id=eos),        # exact
                 Generation(1, 0, [a], "eos", stop_token_id=im_end),        # exact
                 Generation(2, 0, [b, a, a], "length"),                     # cut
                 Generation(3, 0, [b], "eos", stop_token_id=eos),           # wrong
                 Generation(4, 0, [c], "eos", stop_token_id=eos)]           # right words, wrong end token
    ends = reference_ends(refs, tok, [eos, im_end])
    assert [e for _, e in ends] == [eos, im_end, im_end, eos, im_end]
    for mode in ("path", "all"):
        rows, stats = build_rac_rows_to_ends(prompts, generated, refs, ends, pad_id=0, mode=mode)
        for i, (length, end) in enumerate(ends):
            (alone,), _ = build_rac_rows([prompts[i]], [generated[i]], [refs[i][:length]], eos_id=end, pad_id=0,
                                         mode=mode)
            assert rows[i] == alone
        assert rows[4]["input_ids"][-1] == eos and rows[4]["labels"][-1] == im_end  # corrected to its end
        assert stats["rows"] == 5 and stats["finished"] == 0.8
        assert stats["exact_match"] == 0.4  # not row 4: it closed with </s>, its reference with <|im_end|>
        trained = [sum(label != -100 for label in r["labels"]) for r in rows]
        assert stats["trained_positions"] == sum(trained)
        # label agreement from the rows themselves: the label (or a target) is the token the model put
        # there; the position after the cut answer (row 2) has none
        agree = known = 0
        for i, row in enumerate(rows):
            for pos in range(len(prompts[i]), len(row["input_ids"])):
                if row["labels"][pos] == -100 or (i == 2 and pos == len(row["input_ids"]) - 1):
                    continue
                known += 1
                options = row["target_ids"][pos] if mode == "all" else [row["labels"][pos]]
                agree += row["input_ids"][pos] in options
        assert stats["label_agreement"] == pytest.approx(agree / known)


def test_build_rac_rows_to_ends_refuses_bad_ends_by_name():
    from gapfix.methods.rac import build_rac_rows_to_ends

    prompts, generated, refs = [[1, 4], [1, 5]], [[6], [7]], [[6, 2], [7, 2]]
    for ends, match in (([(1, 2)], "ends must be a list of 2"), ([(1, 2), (3, 2)], r"ends\[1\]"),
                        ([(1, 2), (1, -2)], r"ends\[1\]"), ([(1, 2), 2], r"ends\[1\]")):
        with pytest.raises(ValueError, match=match):
            build_rac_rows_to_ends(prompts, generated, refs, ends, pad_id=0)
    with pytest.raises(ValueError, match="generated has 1"):
        build_rac_rows_to_ends(prompts, generated[:1], refs, [(1, 2), (1, 2)], pad_id=0)
    with pytest.raises(ValueError, match="finished"):
        build_rac_rows_to_ends(prompts, generated, refs, [(1, 2), (1, 2)], pad_id=0, finished=[True])
    assert build_rac_rows_to_ends([], [], [], [], pad_id=0)[0] == []


def test_generate_stops_on_stop_token_ids_for_the_call_only():
    """stop_token_ids ends answers on the end-of-turn without touching the model's generation config."""
    from gapfix.generation import generate

    tok = chat_tokenizer(CHATML)
    model = answering_15(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    before = model.generation_config.eos_token_id
    prompt = [tok.convert_tokens_to_ids("\n")]
    plain = generate(model, [prompt], tokenizer=tok, max_new_tokens=6, backend="hf")[0]
    assert plain.finish_reason == "length" and im_end in plain.token_ids  # runs past the end-of-turn
    stopped = generate(model, [prompt], tokenizer=tok, max_new_tokens=6, backend="hf",
                       stop_token_ids=[im_end])[0]
    assert stopped.finish_reason == "eos" and stopped.stop_token_id == im_end
    assert stopped.token_ids == plain.token_ids[:plain.token_ids.index(im_end)]
    assert model.generation_config.eos_token_id == before
    for bad in ([-1], [tok.vocab_size + 1000], ["<|im_end|>"], 5):
        with pytest.raises(ValueError, match="stop_token_ids"):
            generate(model, [prompt], tokenizer=tok, max_new_tokens=2, backend="hf", stop_token_ids=bad)


# ----------------------------------------------------------------- plain data: unchanged

@pytest.mark.parametrize("mode", ["path", "all"])
def test_plain_prompt_answer_rows_are_those_of_eos(mode, monkeypatch):
    """The bundled math task (prompt/answer records, answers ending in EOS): the trainer's RAC rows
    and statistics are exactly build_rac_rows' with eos_id = the tokenizer's EOS on the same answers
    (what RAC did before references got their own end token), and generation stops where it did."""
    from gapfix import generation
    from gapfix.data import encode_example, math_task
    from gapfix.methods.rac import build_rac_rows
    from gapfix.models import tiny_llama
    from gapfix.trainer import build_rows

    tok = math_task.math_tokenizer()
    examples = [encode_example(tok, p["prompt"], p["response"], p) for p in math_task.make_split("train", 12, seed=5)]
    model = tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 6.0  # some answers finish, some are cut
    calls, real = [], generation.generate

    def recording(model, prompts, **kwargs):
        calls.append((prompts, generation._eos_ids(model.config, tok, model.generation_config)))
        out = real(model, prompts, **kwargs)
        calls[-1] += (out,)
        return out

    monkeypatch.setattr(generation, "generate", recording)
    logs = []
    rows = build_rows("rac", model, tok, examples, _config(rac_mode=mode, rac_temperature=1.0, rac_samples=2,
                                                            max_new_tokens=10), log=logs.append)
    ((prompts, stops, outputs),) = calls
    assert stops == [tok.eos_token_id]
    assert {o.finish_reason for o in outputs} == {"eos", "length"}
    by_prompt = {tuple(ex.prompt_ids): ex for ex in examples}
    owners = [by_prompt[tuple(prompts[o.prompt_index])] for o in outputs]
    expected, stats = build_rac_rows([ex.prompt_ids for ex in owners], outputs, [ex.answer_ids for ex in owners],
                                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, mode=mode)
    assert sorted(json.dumps(r, sort_keys=True) for r in rows) == \
        sorted(json.dumps(r, sort_keys=True) for r in expected)
    (logged,) = [r for r in logs if r.get("event") == "rac_offline"]
    for key, value in stats.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key


# ----------------------------------------------------------------- evaluation on chat data

def test_evaluation_stops_chat_answers_at_the_end_of_turn(tmp_path):
    """gapfix eval's greedy answers stop at <|im_end|> (not </s>): "15" is right for "7 plus 8" and
    the label diagnostic compares "15" with the reference's content, without the end-of-turn."""
    from gapfix.evaluation import evaluate, evaluate_model

    tok, examples = chat_examples(tmp_path, CHATML)
    model = answering_15(tok)
    report = evaluate_model(model, tok, examples, max_new_tokens=6, backend="hf", embed=None, recovery=False)
    assert report["answers"] == ["15", "15"]
    assert report["accuracy"] == 0.5
    assert report["rac_labels"]["path"]["label_differs"] == 0.5  # "15" labelled "42"; "15" labelled "15"
    assert evaluate(model, tok, examples, max_new_tokens=6, backend="hf")["accuracy"] == 0.5
