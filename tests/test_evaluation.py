"""gapfix.evaluation: hand-worked diagnostics, and the metrics on a copying and a random model."""
import json
import math
import random

import pytest

from gapfix.evaluation import (
    answers_match,
    divergence_curve,
    extract_answer,
    label_diagnostic,
    recovery_scores,
)

pytest.importorskip("transformers")


def test_answer_regex_takes_the_last_match_and_its_group():
    assert extract_answer("12 + 7 = 19 ; answer 19", r"answer (\d+)") == "19"
    assert extract_answer("#### 3 then #### 4", r"#### (\S+)") == "4"
    assert extract_answer("no answer here", r"#### (\S+)") is None
    assert answers_match("so \\boxed{42}.", "work \\boxed{42}", r"\\boxed\{([^}]*)\}")
    assert not answers_match("so \\boxed{41}.", "work \\boxed{42}", r"\\boxed\{([^}]*)\}")
    assert answers_match(" a  b ", "a b")  # exact match, whitespace-normalised
    with pytest.raises(ValueError, match="answer_regex"):
        extract_answer("x", "(")


def test_divergence_curve_hand_worked():
    # example 0: ref 5 6 7 EOS(2); the model's greedy answer 5 6 8 EOS; teacher-forced misses only 7
    # example 1: ref 5 EOS; greedy answer 5 cut by the length budget (no EOS)
    curve = divergence_curve([[True, True, False, True], [True, False]],
                             [[5, 6, 8, 2], [5]], [[5, 6, 7, 2], [5, 2]])
    assert curve["count"] == [2, 2, 1, 1]
    assert curve["teacher_forced"] == [1.0, 0.5, 0.0, 1.0]
    assert curve["free_running"] == [1.0, 0.5, 0.0, 1.0]
    assert curve["still_on_reference"] == [1.0, 0.5, 0.0, 0.0]
    assert curve["first_divergence"] == [2, 1]
    assert curve["teacher_forced_mean"] == pytest.approx(4 / 6)
    assert curve["free_running_mean"] == pytest.approx(4 / 6)


def test_recovery_scores_hand_worked():
    # error injected at k=1 of ref 4 5 6 7: the reference after it is 6 7
    result = recovery_scores(perturbed=[[6, 7], [9, 9, 7]], perturbed_suffix=[[6, 7], [6, 7]],
                             unperturbed=[[5, 6, 7], [5, 6, 8]], unperturbed_suffix=[[5, 6, 7], [5, 6, 7]],
                             ends_right=[True, False], unperturbed_ends_right=[True, True])
    assert result["per_example"]["recovery_distance"] == [0.0, 2.0]  # 9 9 7 vs 6 7: drop a 9, 9 -> 6
    assert result["per_example"]["unperturbed_distance"] == [0.0, 1.0]
    assert result["distance"] == 1.0 and result["unperturbed_distance"] == 0.5
    assert result["ends_right"] == 0.5 and result["unperturbed_ends_right"] == 1.0


def test_label_diagnostic_hand_worked():
    # gen "a b X c" against ref "a b c": path labels a b c c EOS (docs/design.md's example)
    a, b, c, x, eos = 1, 2, 3, 9, 0
    result = label_diagnostic([[a, b, x, c]], [[a, b, c]], eos_id=eos, correct=[True])
    path = result["path"]
    assert path["label_differs"] == pytest.approx(1 / 4)  # only after "a b": label c, generated X
    assert path["after_divergence"] == pytest.approx(2 / 5)  # prefixes "a b X" and "a b X c"
    assert path["after_divergence_differs"] == 0.0  # there the label c equals the generated c
    assert path["label_differs_on_correct"] == pytest.approx(1 / 4)
    assert result["path_positions"] == 5 and result["until_divergence_positions"] == 3
    assert result["correct_but_different"] == 1
    # an answer equal to its reference: every label is the generated token (the RAC row is an SFT row)
    same = label_diagnostic([[a, b, c]], [[a, b, c]], eos_id=eos)
    assert same["path"]["label_differs"] == 0.0 and same["path"]["after_divergence"] == 0.0


def _copy_task(n, seed=0):
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        s = "".join(rng.choice("abcdef") for _ in range(4))
        records.append({"prompt": s + "=", "response": s})
    return records


@pytest.fixture(scope="module")
def copy_setup():
    import torch

    from gapfix.data import encode_example
    from gapfix.models import tiny_llama, train_tokenizer
    from gapfix.trainer import TrainConfig, train

    records = _copy_task(512)
    tokenizer = train_tokenizer([r["prompt"] + r["response"] for r in records], kind="char", add_bos=True)
    examples = [encode_example(tokenizer, r["prompt"], r["response"], r) for r in records]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64,
                           seed=0)
        train(model, tokenizer, examples, TrainConfig(steps_per_iteration=150, lr=1e-2, batch_size=32,
                                                       warmup_steps=10, progress=False))
    finally:
        torch.set_num_threads(threads)
    held_out = [encode_example(tokenizer, r["prompt"], r["response"], r) for r in _copy_task(48, seed=1)]
    return model, tokenizer, held_out


def test_copying_model_agrees_near_one(copy_setup):
    from gapfix.evaluation import evaluate_model

    model, tokenizer, examples = copy_setup
    report = evaluate_model(model, tokenizer, examples, max_new_tokens=8, backend="hf", embed=None,
                            answer_regex=r"^(\w+)")
    assert report["accuracy"] > 0.9
    assert report["teacher_forced_accuracy"] > 0.9 and report["free_running_agreement"] > 0.9
    assert min(report["divergence"]["still_on_reference"]) > 0.85
    assert report["rac_labels"]["path"]["label_differs"] < 0.05
    rec = report["recovery"]
    assert rec["count"] == len(examples) and rec["unperturbed_distance"] < 0.2
    for probe in rec["probes"]:  # the injected token is never the reference one
        assert examples[probe["example"]].answer_ids[probe["position"]] != probe["wrong_token"]


def test_a_lora_model_is_evaluated_merged_and_left_unchanged(copy_setup):
    """A PEFT model is scored through a merged copy (one plain forward per layer): the same answers
    and teacher-forced hits as the adapted model, and the caller's adapter and weights untouched."""
    import copy

    import torch

    from gapfix.evaluation import evaluate_model
    from gapfix.models import apply_lora, merged_for_inference

    model, tokenizer, examples = copy_setup
    adapted = apply_lora(copy.deepcopy(model), r=4)
    with torch.no_grad():  # a non-zero adapter, so that merging changes the weights
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    merged = merged_for_inference(adapted)
    assert not hasattr(merged, "peft_config") and merged is not adapted
    assert merged_for_inference(model) is model
    ids = torch.tensor([examples[0].prompt_ids + examples[0].answer_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)
    report = evaluate_model(adapted, tokenizer, examples[:8], max_new_tokens=8, backend="hf", embed=None,
                            recovery=False)
    unmerged = evaluate_model(adapted.base_model.model, tokenizer, examples[:8], max_new_tokens=8,
                              backend="hf", embed=None, recovery=False)  # the LoRA layers in place, unwrapped
    assert report["answers"] == unmerged["answers"]
    assert report["teacher_forced_accuracy"] == unmerged["teacher_forced_accuracy"]
    assert "merge" in report["phase_seconds"]
    after = adapted.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_random_model_agrees_near_chance(copy_setup):
    from gapfix.evaluation import evaluate_model
    from gapfix.models import tiny_llama

    _, tokenizer, examples = copy_setup
    vocab = len(tokenizer)
    rates = []
    for seed in range(3):
        model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64,
                           seed=100 + seed)
        report = evaluate_model(model, tokenizer, examples, max_new_tokens=8, backend="hf", embed=None,
                                recovery=False)
        rates.append((report["teacher_forced_accuracy"], report["free_running_agreement"]))
    tf = sum(r[0] for r in rates) / len(rates)
    fr = sum(r[1] for r in rates) / len(rates)
    assert tf < 3 / vocab and fr < 3 / vocab, (tf, fr, vocab)


def test_eval_command_writes_report(copy_setup, tmp_path, capsys):
    from gapfix.cli import main
    from gapfix.models import save_model

    model, tokenizer, examples = copy_setup
    folder = save_model(model, tokenizer, tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(ex.record) + "\n" for ex in examples[:12]))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--data", str(data), "--answer-regex", r"^(\w+)",
                 "--max-new-tokens", "8", "--out", str(out), "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["count"] == 12 and report["answer_regex"] == r"^(\w+)"
    assert 0 <= report["recovery"]["ends_right"] <= 1
    assert len(report["per_example"]["accuracy"]) == 12
    assert all(v is None or math.isfinite(v) for v in report["per_example"]["recovery_distance"])
    assert (out / "report.png").stat().st_size > 1000
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("method, options, match", [
    ("bash", dict(bash_mode="argmax", beta=0.5), "BASH iteration 0: every predicted token equals"),
    ("rac", dict(rac_temperature=0.0, rac_prompts=16), "RAC iteration 0: all 16 generated answers equal"),
])
def test_trainer_warns_when_an_iteration_is_sft(copy_setup, tmp_path, method, options, match):
    """On a model that copies perfectly, greedy RAC answers and argmax BASH predictions are the
    references: the trainer says so, and its offline log counts what was predicted/generated."""
    import copy

    from gapfix.trainer import TrainConfig, train

    model, tokenizer, examples = copy_setup
    model = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=match):
        train(model, tokenizer, examples[:32], TrainConfig(
            method=method, steps_per_iteration=1, batch_size=8, lr=1e-6, progress=False,
            max_new_tokens=8, generation_backend="hf", bash_rows=12, out_dir=str(tmp_path), **options))
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if method == "bash":
        offline = next(e for e in events if e["event"] == "bash_offline")
        assert offline["predicted_rows"] == 12 and offline["equal_to_input"] == 1.0
    else:
        offline = next(e for e in events if e["event"] == "rac_offline")
        assert offline["generated"] == 16 and offline["mean_edit_distance"] == 0.0


def test_bash_noise_control_mixes_random_tokens(copy_setup, tmp_path):
    import copy

    from gapfix.trainer import TrainConfig, train

    model, tokenizer, examples = copy_setup
    train(copy.deepcopy(model), tokenizer, examples[:32], TrainConfig(
        method="bash", bash_mode="random", beta=0.5, steps_per_iteration=1, batch_size=8, lr=1e-6,
        progress=False, bash_rows=16, out_dir=str(tmp_path)))
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    offline = next(e for e in events if e["event"] == "bash_offline")
    # uniform random tokens hit the reference about 1/V of the time, the copying model's argmax always
    assert offline["equal_to_input"] < 0.4
    assert any(e.get("mixed_fraction", 0) > 0.2 for e in events if e["event"] == "step")


def test_generate_command_continues_a_response_prefix(copy_setup, tmp_path):
    """{"prompt", "prefix"}: the prefix is tokenized apart from the prompt, as in training, and the
    answer is the continuation after it; it equals generating from the hand-built token ids."""
    from gapfix.cli import main
    from gapfix.generation import generate, read_generations_jsonl
    from gapfix.models import save_model

    model, tokenizer, examples = copy_setup
    folder = save_model(model, tokenizer, tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "abcd=", "prefix": "ab"}, {"prompt": "cafe="}, {"prompt": "bead=", "prefix": "be"}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--model", str(folder), "--prompts", str(prompts), "--out", str(out),
                 "--backend", "hf", "--max-new-tokens", "6", "--no-progress", "--threads", "1"]) == 0
    answers = read_generations_jsonl(out)
    hand_built = [tokenizer("abcd=")["input_ids"] + tokenizer("ab", add_special_tokens=False)["input_ids"],
                  tokenizer("cafe=")["input_ids"],
                  tokenizer("bead=")["input_ids"] + tokenizer("be", add_special_tokens=False)["input_ids"]]
    expected = generate(model, hand_built, tokenizer=tokenizer, max_new_tokens=6, backend="hf")
    assert [a.token_ids for a in answers] == [e.token_ids for e in expected]
    assert [a.text for a in answers] == ["cd", "cafe", "ad"]


def test_generate_command_rejects_a_bad_prefix(tmp_path):
    from gapfix.generation import read_prompts_jsonl

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "x", "prefix": 3}) + "\n")
    with pytest.raises(ValueError, match="line 1: prefix is not a string"):
        read_prompts_jsonl(path, prefixes=[])


def test_teacher_forced_pass_is_the_same_in_small_batches(copy_setup):
    """The logits budget cuts batches down (one row at a time here); results do not change."""
    from gapfix.evaluation import _teacher_forced

    model, _, examples = copy_setup
    positions = [1] * 10
    big = _teacher_forced(model, examples[:10], positions, top_k=3)
    small = _teacher_forced(model, examples[:10], positions, top_k=3, logits_budget=1)
    assert big[0] == small[0]
    assert [t[0] for t in big[1]] == [t[0] for t in small[1]]


def test_bash_offline_log_counts_only_the_scheduled_rows(copy_setup, tmp_path):
    """Without bash_rows BASH predicts only the rows its steps draw: the log says how many."""
    import copy

    from gapfix.trainer import TrainConfig, train

    model, tokenizer, examples = copy_setup
    train(copy.deepcopy(model), tokenizer, examples[:40], TrainConfig(
        method="bash", steps_per_iteration=1, batch_size=8, lr=1e-6, progress=False, bash_mode="random",
        out_dir=str(tmp_path)))
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    offline = next(e for e in events if e["event"] == "offline")
    assert offline["rows"] == 40 and offline["predicted_rows"] == 8
    assert next(e for e in events if e["event"] == "bash_offline")["predicted_rows"] == 8


def test_evaluating_no_examples_is_a_named_error(copy_setup):
    """An empty eval set is a ValueError naming it, not a ZeroDivisionError."""
    from gapfix.evaluation import evaluate, evaluate_model

    model, tokenizer = copy_setup[0], copy_setup[1]
    for fn in (evaluate, evaluate_model):
        with pytest.raises(ValueError, match="examples is empty"):
            fn(model, tokenizer, [], max_new_tokens=4, backend="hf")
