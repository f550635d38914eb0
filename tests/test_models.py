"""gapfix.models: locally trained tokenizers, tiny Llama models, save/load."""
import pytest
import torch

from gapfix.models import has_tokenizer, load_model, save_model, tiny_llama, train_tokenizer

TEXTS = [f"Q: what is {a}+{b}? A: {a}+{b}={a + b}" for a in range(12) for b in range(7)]


def test_bpe_round_trips_any_text_and_has_specials_first():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    assert 260 < len(tok) <= 300  # the small corpus runs out of merges before 300
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for text in ["Q: what is 3+4? A: 3+4=7", "never seen: ünïcode ∑ \t\n!"]:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
        assert tok.decode(ids) == text
    # merges were learned: a frequent word is shorter than its bytes
    assert len(tok("what")["input_ids"]) < len("what")


def test_word_level_one_token_per_number_word_and_symbol():
    tok = train_tokenizer(TEXTS + ["60/2+4=34"], kind="word", vocab_size=1000)
    ids = tok("60/2+4=34")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["60", "/", "2", "+", "4", "=", "34"]
    text = "Q: what is 11+6? A: 11+6=17"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert "17" in tok.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(tok("zebra")["input_ids"]) == ["<unk>"]


def test_word_level_vocab_size_caps_vocabulary():
    tok = train_tokenizer(TEXTS, kind="word", vocab_size=20)
    assert len(tok) == 20


def test_add_bos_and_chat_template():
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = train_tokenizer(TEXTS, vocab_size=300, add_bos=True, chat_template=template)
    assert tok("Q: 1")["input_ids"][0] == tok.bos_token_id
    assert tok.chat_template == template


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="sentencepiece"), "kind"),
    (dict(vocab_size=100), "vocab_size"),
    (dict(kind="word", vocab_size=3), "vocab_size"),
    (dict(pad_token="<s>"), "distinct"),
])
def test_train_tokenizer_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_tokenizer(TEXTS, **kwargs)


def test_train_tokenizer_rejects_a_single_string():
    with pytest.raises(ValueError, match="texts"):
        train_tokenizer("just one string")
    with pytest.raises(ValueError, match="texts"):
        train_tokenizer([])


def test_tiny_llama_takes_the_tokenizer_specials_and_is_reproducible():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    state = torch.get_rng_state()
    a = tiny_llama(tok, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    b = tiny_llama(tok, seed=3)
    c = tiny_llama(tok, seed=4)
    assert a.config.vocab_size == len(tok)
    assert (a.config.pad_token_id, a.config.bos_token_id, a.config.eos_token_id) == (0, 1, 2)
    assert a.generation_config.eos_token_id == 2
    assert a.config.hidden_size // a.config.num_attention_heads == 32  # vLLM-CPU needs >= 32
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert next(a.parameters()).dtype == torch.float32
    assert not a.training


def test_tiny_llama_shapes_and_bad_arguments():
    model = tiny_llama(50, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                       intermediate_size=96, max_position_embeddings=64)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 50)
    with pytest.raises(ValueError, match="num_heads"):
        tiny_llama(50, hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_llama(50, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="tokenizer_or_vocab_size"):
        tiny_llama("gpt2")
    with pytest.raises(ValueError, match="num_layers"):
        tiny_llama(50, num_layers=0)


def test_save_and_load_round_trip(tmp_path):
    tok = train_tokenizer(TEXTS, kind="word", vocab_size=200)
    model = tiny_llama(tok, seed=0)
    folder = save_model(model, tok, tmp_path / "ckpt")
    assert (folder / "config.json").is_file() and has_tokenizer(folder)
    loaded, loaded_tok = load_model(folder)
    ids = torch.tensor([tok("Q: what is 3+4?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert next(loaded.parameters()).dtype == torch.float32
    assert loaded_tok("60/2+4=34")["input_ids"] == tok("60/2+4=34")["input_ids"]
    assert loaded_tok.eos_token_id == tok.eos_token_id


def test_save_without_tokenizer_and_load_errors(tmp_path):
    folder = save_model(tiny_llama(40, seed=0), None, tmp_path / "m")
    model, tok = load_model(folder)
    assert tok is None and model.config.vocab_size == 40
    with pytest.raises(ValueError, match="path"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="model"):
        save_model(object(), None, tmp_path / "x")
