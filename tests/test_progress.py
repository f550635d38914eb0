"""gapfix._progress: the one progress bar of generation and the trainer, with tqdm and without."""
import sys

import pytest

from gapfix._progress import Progress, step_progress


@pytest.fixture(params=["tqdm", "plain"])
def bar_kind(request, monkeypatch):
    if request.param == "tqdm":
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: the plain bar
    return request.param


def test_disabled_prints_nothing(bar_kind, capfd):
    bar = Progress(5, enabled=False, desc="generate", unit="prompt")
    bar.update(2)
    bar.update(3, postfix="loss=1.0")
    bar.close()
    advance = step_progress(4, 1, "sft iter 0", False)
    advance("loss=0.5")
    advance(None)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_counts_resume_from_initial_and_show_the_postfix(bar_kind, capfd):
    bar = Progress(5, initial=2, desc="bash iter 1", unit="step")  # tqdm redraws the kept bar on close
    bar.update(1, postfix="loss=0.25")
    bar.close()
    out, err = capfd.readouterr()
    assert out == ""
    assert "bash iter 1" in err and "3/5" in err and "loss=0.25" in err


def test_step_progress_without_tqdm_counts_steps_from_done(monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    advance = step_progress(5, 2, "bash iter 1", True)
    advance("loss=0.25")
    advance(None)
    err = capfd.readouterr().err
    assert err.endswith("] 3/5 steps loss=0.25\n") and "bash iter 1 [" in err


def test_plain_bar_line_and_a_second_close_prints_nothing(monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bar = Progress(4, initial=1, desc="generate", unit="prompt")
    bar.update(2)
    bar.close()
    err = capfd.readouterr().err
    assert err.endswith("\rgenerate [" + "#" * 22 + "." * 8 + "] 3/4 prompts\n")
    bar.close()
    assert capfd.readouterr().err == ""


def test_the_trainer_draws_its_steps_with_the_shared_bar(monkeypatch, capfd):
    """A real one-step training run without tqdm: the plain bar counts its optimizer steps."""
    pytest.importorskip("transformers")
    from gapfix.data import encode_example, math_task
    from gapfix.models import tiny_llama
    from gapfix.trainer import train

    tokenizer = math_task.math_tokenizer()
    examples = [encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 8, seed=3)]
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=128,
                       seed=0)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # after transformers loaded (it imports tqdm)
    train(model, tokenizer, examples, method="sft", steps_per_iteration=1, batch_size=4, lr=1e-3,
          progress=True, device="cpu")
    err = capfd.readouterr().err
    assert "sft iter 0" in err and "1/1 steps" in err


def test_generate_draws_its_prompts_with_the_shared_bar(monkeypatch, capfd):
    pytest.importorskip("transformers")
    from gapfix.generation import generate
    from gapfix.models import tiny_llama

    model = tiny_llama(64, seed=0)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # after transformers loaded (it imports tqdm)
    generate(model, [[5, 6], [7], [8, 9, 10]], backend="hf", max_new_tokens=2,
             batch_size=2, progress=True)
    err = capfd.readouterr().err
    assert "generate" in err and "2/3 prompts" in err and "3/3 prompts" in err
    generate(model, [[5, 6]], backend="hf", max_new_tokens=2, progress=False)
    assert capfd.readouterr().err == ""
