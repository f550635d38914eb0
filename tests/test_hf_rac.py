"""RacTrainer / RacSFTTrainer / build_rac_dataset with a real Trainer, TRL SFTTrainer and PEFT."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import hf_worker as W

from gapfix import hf
from gapfix.hf import rac as hf_rac


def _eager_model(tok, boost=6.0):
    """A tiny model whose EOS logit is raised, so that some sampled answers finish and some are cut."""
    net = W.model(tok)
    with torch.no_grad():
        net.lm_head.weight[tok.eos_token_id] *= boost
    return net


@pytest.fixture
def spy(monkeypatch):
    """Records every Generation gapfix.generate returns to the RAC code."""
    from gapfix import generation

    seen = []
    real = generation.generate

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(generation, "generate", recording)
    return seen


def _config(**overrides):
    options = {"samples": 2, "temperature": 1.0, "max_new_tokens": 10, "prompts_per_iteration": 6,
               "backend": "hf", "sft_ratio": 0.5}
    options.update(overrides)
    return hf.RacConfig(**options)


def test_build_rac_dataset_rows_follow_the_answers(spy):
    from gapfix.methods.rac import build_rac_rows

    tok = W.tokenizer()
    net = _eager_model(tok)
    data = W.dataset(tok, 10)
    # seed 0: under the seeding rule both drivers share (gapfix.methods.rac.generation_seed) it draws
    # finished and cut answers; seed 3, used before that rule, now draws none that finish
    out = hf.build_rac_dataset(net, tok, data, config=_config(), seed=0)
    answers = [g for call in spy for g in call]
    assert len(answers) == 12  # 6 prompts x 2 samples
    rac = [r for r in out if r["finish_reason"]]
    sft = [r for r in out if not r["finish_reason"]]
    assert len(rac) == 12 and len(sft) == 6
    assert sorted(r["finish_reason"] for r in rac) == sorted(g.finish_reason for g in answers)
    assert 0 < sum(g.finish_reason == "eos" for g in answers) < 12  # both kinds present
    # each RAC row, shifted back, is build_rac_rows' row for its prompt and answer
    references = {tuple(r["input_ids"][:next(i for i, x in enumerate(r["labels"]) if x != -100)]): r
                  for r in W.rows(tok, 10)}
    for row in rac:
        prompt_len = next(i for i, lab in enumerate(row["labels"]) if lab != -100)
        prompt = tuple(row["input_ids"][:prompt_len])
        source = references[prompt]
        reference = source["input_ids"][len(prompt):]
        answer = row["input_ids"][prompt_len:-1]
        (expected,), _ = build_rac_rows([list(prompt)], [answer], [reference], eos_id=tok.eos_token_id,
                                        pad_id=tok.pad_token_id, finished=[row["finish_reason"] == "eos"])
        assert row["input_ids"] == expected["input_ids"]
        assert row["labels"] == expected["labels"]
        assert row["input_ids"][-1] == (tok.eos_token_id if row["finish_reason"] == "eos" else tok.pad_token_id)
    for row in sft:
        assert {"input_ids": row["input_ids"], "labels": row["labels"]} in W.rows(tok, 10)


def _rac_trainer(tmp_path, tok, net, config, **overrides):
    options = {"max_steps": 4, "per_device_train_batch_size": 3}
    options.update(overrides)
    return hf.RacTrainer(model=net, args=W.args(tmp_path, **options), train_dataset=W.dataset(tok, 10),
                         processing_class=tok, data_collator=W.collator(tok), rac_config=config)


def test_trainer_logs_the_finished_fraction_of_the_answers_and_keeps_one_global_step(tmp_path, spy):
    tok = W.tokenizer()
    net = _eager_model(tok)
    trainer = _rac_trainer(tmp_path, tok, net, _config(refresh=2), max_steps=4)
    optimizer_ids = []
    original = trainer.create_optimizer

    def create_optimizer(*args, **kwargs):
        optimizer_ids.append(1)
        return original(*args, **kwargs)

    trainer.create_optimizer = create_optimizer
    trainer.train()
    assert trainer.state.global_step == 4 and len(optimizer_ids) == 1
    assert [s["iteration"] for s in trainer.rac_history] == [0, 1]  # two iterations, steps 0-1 and 2-3
    assert len(spy) == 2  # one generation call per iteration (6 prompts, one chunk)
    finished = W.logged(trainer, "rac_finished")
    assert len(finished) == 2
    for logged, answers in zip(finished, spy):
        assert len(answers) == 12
        assert logged == pytest.approx(sum(g.finish_reason == "eos" for g in answers) / len(answers))
    assert any(0 < f < 1 for f in finished)
    assert len(W.losses(trainer)) == 4


def test_resume_mid_iteration_gives_the_uninterrupted_weights(tmp_path):
    tok = W.tokenizer()
    config = _config(refresh=3)
    straight_net = _eager_model(tok)
    straight = _rac_trainer(tmp_path / "a", tok, straight_net, config, max_steps=5, save_strategy="steps",
                            save_steps=2)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / hf_rac.STATE_FILE).is_file()
    resumed_net = _eager_model(tok)
    resumed = _rac_trainer(tmp_path / "b", tok, resumed_net, config, max_steps=5)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert [s["iteration"] for s in resumed.rac_history] == [1]  # iteration 0 came from the checkpoint
    assert W.checksums(resumed_net) == W.checksums(straight_net)


def test_a_checkpoint_saved_before_the_vllm_fields_resumes_with_their_defaults(tmp_path):
    """gapfix_rac.json of a version without vllm_tensor_parallel_size / vllm_gpu_memory_utilization:
    resumed with those at their defaults, it continues on its rows; with another value it is refused."""
    import json

    tok = W.tokenizer()
    config = _config(refresh=3)
    _rac_trainer(tmp_path / "a", tok, _eager_model(tok), config, max_steps=2, save_strategy="steps",
                 save_steps=2).train()
    state_file = tmp_path / "a" / "checkpoint-2" / hf_rac.STATE_FILE
    state = json.loads(state_file.read_text())
    for key in ("vllm_tensor_parallel_size", "vllm_gpu_memory_utilization"):
        del state["config"][key]
    state_file.write_text(json.dumps(state))
    resumed = _rac_trainer(tmp_path / "b", tok, _eager_model(tok), config, max_steps=3)
    resumed.train(resume_from_checkpoint=str(state_file.parent))
    assert resumed.rac_history == []  # iteration 0's rows came from the checkpoint
    other = hf.RacConfig(**{**config.to_dict(), "vllm_gpu_memory_utilization": 0.5})
    refused = _rac_trainer(tmp_path / "c", tok, _eager_model(tok), other, max_steps=3)
    with pytest.raises(ValueError, match="saved with RacConfig"):
        refused.train(resume_from_checkpoint=str(state_file.parent))


def test_rac_sft_trainer_trains_a_lora_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    tok = W.tokenizer()
    net = _eager_model(tok)
    before = W.checksums(net)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                         disable_tqdm=True, max_length=64, completion_only_loss=True)
    trainer = hf.RacSFTTrainer(model=net, args=args, train_dataset=W.prompt_completion_dataset(12),
                               processing_class=tok, rac_config=_config(),
                               peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    assert len(W.losses(trainer)) == 3 and len(W.logged(trainer, "rac_finished")) >= 1
    adapted = trainer.model
    assert isinstance(adapted, peft.PeftModel)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in adapted.named_parameters() if "lora_B" in n)
    for name, p in adapted.get_base_model().named_parameters():
        if "lora" not in name and name in before:
            assert float(p.detach().double().sum()) == before[name], name


def test_bad_inputs_are_refused(tmp_path):
    import datasets

    tok = W.tokenizer()
    net = W.model(tok)
    # RacConfig is the reference trainer's too, where soft "all" labels are valid: gapfix.hf refuses
    # them when it runs, since Trainer's labels carry one token per position
    with pytest.raises(ValueError, match="mode"):
        hf.build_rac_dataset(net, tok, W.dataset(tok, 4), config=hf.RacConfig(mode="all", backend="hf"))
    with pytest.raises(ValueError, match="mode"):
        hf.RacConfig(mode="soft")
    with pytest.raises(ValueError, match="samples"):
        hf.RacConfig(samples=0)
    no_prompt = datasets.Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}])
    with pytest.raises(ValueError, match="no prompt"):
        hf.build_rac_dataset(net, tok, no_prompt)
    packed = datasets.Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "seq_lengths": [3]}])
    with pytest.raises(ValueError, match="packed"):
        hf.build_rac_dataset(net, tok, packed)
    with pytest.raises(ValueError, match="rac_config"):
        _rac_trainer(tmp_path, tok, net, {"samples": 2})


def test_two_gloo_processes_split_generation_and_stay_equal(tmp_path):
    """Each rank answers its prompt chunks; the iteration's rows equal one process's, and the
    replicas end with equal parameters."""
    ranks = W.torchrun(tmp_path, "rac")
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["wrapper"] == "DistributedDataParallel"
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["first"]["rows"] == ranks[1]["first"]["rows"]
    tok = W.tokenizer()
    rows, _, _ = hf_rac.iteration_rows(W.model(tok), tok, hf_rac._Sources(W.dataset(tok, 16)), W.rac_config(),
                                       seed=0, iteration=0)
    assert rows == ranks[0]["first"]["rows"]


def test_vllm_options_are_checked_by_name():
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="vllm_tensor_parallel_size"):
            hf.RacConfig(vllm_tensor_parallel_size=bad)
    for bad in (0, 0.0, 1.5, -0.2, float("nan"), "0.4"):
        with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
            hf.RacConfig(vllm_gpu_memory_utilization=bad)
    tok = W.tokenizer()
    config = W.rac_config(backend="vllm", vllm_tensor_parallel_size=2)
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size 2 needs torchrun"):
        hf.build_rac_dataset(W.model(tok), tok, W.dataset(tok, 4), config=config)


def test_fsdp_is_refused_by_name(tmp_path):
    tok = W.tokenizer()
    trainer = _rac_trainer(tmp_path, tok, W.model(tok), _config())
    trainer.is_fsdp_enabled = True  # as Trainer sets it under torchrun with fsdp=...
    with pytest.raises(ValueError, match="FSDP"):
        trainer._rac_rows_for(0)
    assert trainer.rac_history == []


def test_the_end_token_is_the_stop_token_each_reference_ends_with():
    """A stop token (here id 5, added to the generation config as a chat model's end-of-turn) that
    differs from the tokenizer's EOS (2): each reference ends with its own (gapfix.methods.rac's
    rule, which RacTrainer and gapfix's trainer share; tests/test_rac_chat.py)."""
    from gapfix.methods.rac import answer_stop_ids, reference_ends

    tok = W.tokenizer()
    net = W.model(tok)
    eos = tok.eos_token_id
    assert reference_ends([[7, 8, 2], [9, 2]], tok, answer_stop_ids(net, tok)) == [(2, eos), (1, eos)]
    # 5 is neither a stop token nor a special token: the whole reference, EOS implied
    assert reference_ends([[7, 8, 5], [9, 5]], tok, answer_stop_ids(net, tok)) == [(3, eos), (2, eos)]
    net.generation_config.eos_token_id = [eos, 5]
    assert reference_ends([[7, 8, 5], [9, 5], [3, 2]], tok, answer_stop_ids(net, tok)) == [(2, 5), (1, 5), (1, eos)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rac-vllm", "rac-vllm-tp2"])
def test_two_gloo_processes_generate_with_the_colocated_vllm_engine(tmp_path, kind):
    """Under torchrun backend "vllm" generates with each process's colocated engine (an ordinary
    one would hang): float32 greedy, its answers are transformers', so world 2 builds the rows of
    backend "hf" in both iterations (the second after a weight push) and ends with its weights.
    rac-vllm-tp2: the two ranks hold one tensor-parallel engine and both generate every chunk."""
    pytest.importorskip("vllm")
    vllm_ranks = W.torchrun(tmp_path, kind, timeout=300)
    hf_ranks = W.torchrun(tmp_path, "rac-hf", timeout=300)
    for ranks in (vllm_ranks, hf_ranks):
        assert [r["world"] for r in ranks] == [2, 2]
        assert ranks[0]["weights"] == ranks[1]["weights"]
        assert ranks[0]["first"]["iterations"] == ranks[1]["first"]["iterations"]
        assert sorted(ranks[0]["first"]["iterations"]) == ["0", "1"]
    assert vllm_ranks[0]["first"]["iterations"] == hf_ranks[0]["first"]["iterations"]
    for rank in vllm_ranks:  # each iteration pushed the trained weights into this process's engine
        calls = [c for c in rank["first"]["engine_calls"] if c == "push"]
        assert calls == ["push", "push"]
        assert rank["first"]["engine_tp"] == (2 if kind.endswith("-tp2") else 1)
    assert hf_ranks[0]["first"]["engine_calls"] is None
    assert vllm_ranks[0]["weights"] == hf_ranks[0]["weights"]  # the same rows, the same training
