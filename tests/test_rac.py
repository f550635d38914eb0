"""The RAC row builder (gapfix.methods.rac): the label convention (HF, aligned), prompt
masking, the EOS label, truncated answers, divergence, soft rows, statistics,
and mixing with SFT rows."""
import pytest

from gapfix.data import IGNORE_INDEX as IGN
from gapfix.data import Example, collate, sft_row
from gapfix.methods.rac import build_rac_rows, mix_with_sft, to_soft_row

EOS, PAD = 1000, 1001


def _chars(s):
    return [ord(c) for c in s]


def _decode(values):
    return "".join("$" if v == EOS else "_" if v == IGN else "#" if v == PAD else chr(v) for v in values)


PROMPTS = [[7, 8, 9], [5]]
GENERATED = [_chars("60/2=30") + [EOS], _chars("abXc")]  # the second was cut at the length limit
REFERENCES = [_chars("60/2+4=34") + [EOS], _chars("abc") + [EOS]]


def test_shift_convention_and_paper_labels():
    rows, stats = build_rac_rows(PROMPTS, GENERATED, REFERENCES, eos_id=EOS, pad_id=PAD, impl="torch")
    first, second = rows
    # input: prompt + g + (its EOS, or the pad after a cut answer)
    assert first["input_ids"] == PROMPTS[0] + _chars("60/2=30") + [EOS]
    assert second["input_ids"] == PROMPTS[1] + _chars("abXc") + [PAD]
    # labels aligned with input_ids (HF convention): the label after g_<t on position len(prompt) + t
    assert _decode(first["labels"]) == "___" + "60/2+34" + "$"
    assert _decode(second["labels"]) == "_abcc$"
    assert len(first["labels"]) == len(first["input_ids"])
    assert stats["rows"] == 2 and stats["trained_positions"] == 8 + 5
    # agreement: 6/8 on the first (t = 4 and 6 corrected); 3/4 on the second (t = 2;
    # t = 4 comes after a cut answer, where the model emitted nothing)
    assert stats["label_agreement"] == pytest.approx(9 / 12)
    assert stats["mean_edit_distance"] == pytest.approx((3 + 1) / 2)
    assert stats["finished"] == 0.5 and stats["exact_match"] == 0.0


def test_identical_answers_match_sft_rows():
    prompts = [[3, 4], [6], [2, 2, 2]]
    answers = [[10, 11, 12], [13], []]
    examples = [Example(p, a + [EOS]) for p, a in zip(prompts, answers)]
    rows, stats = build_rac_rows(prompts, [a + [EOS] for a in answers], [a + [EOS] for a in answers],
                                 eos_id=EOS, pad_id=PAD, impl="torch")
    assert rows == [sft_row(ex) for ex in examples]  # g = y: RAC reduces to SFT
    assert stats["label_agreement"] == 1.0 and stats["exact_match"] == 1.0 and stats["mean_edit_distance"] == 0


def test_eos_handling():
    # a reference with or without its trailing EOS gives the same rows
    with_eos, _ = build_rac_rows(PROMPTS, GENERATED, REFERENCES, eos_id=EOS, pad_id=PAD, impl="torch")
    bare, _ = build_rac_rows(PROMPTS, GENERATED, [r[:-1] for r in REFERENCES], eos_id=EOS, pad_id=PAD, impl="torch")
    assert with_eos == bare
    # anything the generator emitted after its first EOS is not part of the answer
    trailing, _ = build_rac_rows(PROMPTS, [GENERATED[0] + [33, 34], GENERATED[1]], REFERENCES,
                                 eos_id=EOS, pad_id=PAD, impl="torch")
    assert trailing == with_eos
    # pad_id defaults to eos_id; an empty answer is trained on the prompt's last token only
    rows, stats = build_rac_rows([[1, 2]], [[]], [[40, 41]], eos_id=EOS, impl="torch")
    assert rows == [{"input_ids": [1, 2, EOS], "labels": [IGN, IGN, 40]}]
    assert stats["label_agreement"] != stats["label_agreement"]  # nan: no known next token


def test_only_until_divergence():
    rows, stats = build_rac_rows(PROMPTS, GENERATED, REFERENCES, eos_id=EOS, pad_id=PAD,
                                 only_until_divergence=True, impl="torch")
    # the first correction is trained, nothing after it
    assert _decode(rows[0]["labels"]) == "___60/2+___"
    assert _decode(rows[1]["labels"]) == "_abc__"
    assert stats["trained_positions"] == 5 + 3
    assert stats["label_agreement"] == pytest.approx(6 / 8)
    same, _ = build_rac_rows([[1]], [[4, 5, EOS]], [[4, 5]], eos_id=EOS, only_until_divergence=True, impl="torch")
    assert same[0]["labels"] == [IGN, 4, 5, EOS]  # no divergence: every prefix trained


def test_soft_rows():
    rows, stats = build_rac_rows(PROMPTS, GENERATED, REFERENCES, eos_id=EOS, pad_id=PAD, mode="all",
                                 max_targets=3, impl="torch")
    second = rows[1]
    assert len(second["target_ids"]) == len(second["input_ids"]) and len(second["target_ids"][0]) == 3
    # after "abX" the optimal completions owe "c" or the end of the reference
    assert second["target_ids"][4] == [ord("c"), EOS, IGN]
    assert second["target_weights"][4] == [0.5, 0.5, 0.0]
    assert second["target_ids"][0] == [IGN] * 3 and second["target_weights"][0] == [0.0] * 3
    for row in rows:  # labels = the first target; weights sum to 1 exactly where trained
        for label, ids, weights in zip(row["labels"], row["target_ids"], row["target_weights"]):
            assert label == ids[0]
            assert sum(weights) == pytest.approx(0.0 if label == IGN else 1.0)
    batch = collate(rows, pad_id=PAD)
    assert tuple(batch["target_ids"].shape) == (2, 11, 3)


def test_soft_agreement_counts_any_target():
    # after "X" (reference "ab") both "a" and "b" are optimal; the model said "b"
    kwargs = dict(eos_id=EOS, impl="torch")
    _, first = build_rac_rows([[1]], [_chars("Xb") + [EOS]], [_chars("ab")], mode="first", **kwargs)
    _, soft = build_rac_rows([[1]], [_chars("Xb") + [EOS]], [_chars("ab")], mode="all", **kwargs)
    assert first["label_agreement"] == pytest.approx(1 / 3)  # only EOS after "Xb"
    assert soft["label_agreement"] == pytest.approx(2 / 3)


def test_one_alignment_and_label_call(monkeypatch):
    import gapfix.ops.rac_labels as module

    calls = []
    original = module.rac_labels

    def counting(gen, *args, **kwargs):
        calls.append(tuple(gen.shape))
        return original(gen, *args, **kwargs)

    monkeypatch.setattr(module, "rac_labels", counting)
    build_rac_rows(PROMPTS * 3, GENERATED * 3, REFERENCES * 3, eos_id=EOS, impl="torch")
    assert calls == [(6, 7)]  # every pair in one padded call


@pytest.mark.parametrize("mode", ["path", "first", "last", "all"])
def test_triton_rows_equal_torch_rows(triton_device, mode):
    kwargs = dict(eos_id=EOS, pad_id=PAD, mode=mode, max_targets=2)
    want = build_rac_rows(PROMPTS, GENERATED, REFERENCES, impl="torch", **kwargs)
    got = build_rac_rows(PROMPTS, GENERATED, REFERENCES, impl="triton", device=triton_device, **kwargs)
    assert got == want


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(prompts=[[], [5]]), "prompts"),
        (dict(prompts="abc"), "prompts"),
        (dict(generated=GENERATED[:1]), "generated"),
        (dict(references=[[1.5], [2]]), "references"),
        (dict(generated=[[-3], [2]]), "generated"),
        (dict(eos_id=-1), "eos_id"),
        (dict(pad_id=-2), "pad_id"),
        (dict(mode="greedy"), "mode"),
    ],
)
def test_bad_inputs(change, name):
    kwargs = dict(prompts=PROMPTS, generated=GENERATED, references=REFERENCES, eos_id=EOS, impl="torch")
    kwargs.update(change)
    with pytest.raises(ValueError, match=name):
        build_rac_rows(kwargs.pop("prompts"), kwargs.pop("generated"), kwargs.pop("references"), **kwargs)


# ---------------------------------------------------------------- mixing


def _rows(tag, count):
    return [{"input_ids": [tag, i], "labels": [i, IGN]} for i in range(count)]


@pytest.mark.parametrize("ratio, wanted", [(0, 0), (0.5, 5), (1, 10), (2.5, 25)])
def test_mix_ratio(ratio, wanted):
    rac, sft = _rows(1, 10), _rows(2, 7)
    mixed = mix_with_sft(rac, sft, ratio, seed=3)
    assert len(mixed) == 10 + wanted
    assert sorted(r["labels"][0] for r in mixed if r["input_ids"][0] == 1) == list(range(10))
    drawn = [r["labels"][0] for r in mixed if r["input_ids"][0] == 2]
    assert len(drawn) == wanted
    # without replacement: each SFT row is used floor or ceil of wanted / 7 times
    counts = [drawn.count(i) for i in range(7)]
    assert max(counts) - min(counts) <= 1


def test_mix_is_seeded_and_shuffled():
    rac, sft = _rows(1, 20), _rows(2, 20)
    a, b, c = (mix_with_sft(rac, sft, 1.0, seed=s) for s in (5, 5, 6))
    assert a == b and a != c
    assert [r["input_ids"][0] for r in a] != [1] * 20 + [2] * 20  # interleaved, not appended


def test_mix_converts_sft_rows_to_soft():
    rac, _ = build_rac_rows(PROMPTS, GENERATED, REFERENCES, eos_id=EOS, mode="all", max_targets=3, impl="torch")
    sft = [sft_row(Example([1, 2], [40, EOS]))]
    mixed = mix_with_sft(rac, sft, 0.5, seed=0)
    soft_sft = to_soft_row(sft[0], 3)
    assert soft_sft in mixed and soft_sft["target_ids"][2] == [40, IGN, IGN]
    assert soft_sft["target_weights"][2] == [1.0, 0.0, 0.0] and soft_sft["target_weights"][0] == [0.0] * 3
    assert all("target_ids" in r for r in mixed)
    collate(mixed, pad_id=PAD)  # one batch holds both kinds


@pytest.mark.parametrize("ratio", [-0.5, float("nan"), float("inf"), "1", True])
def test_mix_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        mix_with_sft(_rows(1, 3), _rows(2, 3), ratio, seed=0)


def test_mix_needs_sft_rows():
    with pytest.raises(ValueError, match="sft_rows"):
        mix_with_sft(_rows(1, 3), [], 1.0, seed=0)
    assert len(mix_with_sft(_rows(1, 3), [], 0.0, seed=0)) == 3
