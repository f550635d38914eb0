"""Data at scale: resident memory of examples and SFT rows, and tokenizing throughput.

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_data.py --benchmark-only
    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_data.py --benchmark-only -m slow   # 50M tokens

Memory: synthetic tokenized examples (ids from a 32k vocabulary, 500 tokens
each, the prompt 50-150 of them) saved with `Dataset.save_to_disk`. Each path
runs in a fresh process (`python bench/test_bench_data.py memory PATH FOLDER`)
that imports what it needs, reads RssAnon from /proc/self/status, then loads the
examples and builds one iteration's SFT rows:

- arrow: `load_tokenized(folder)` (memory-mapped), `write_sft_rows` to an Arrow
  row file, `RowTable.open` and one gathered batch of 32 rows;
- lists (today's path, the baseline): the same examples read into a list of
  `Example`s and `[sft_row(ex) for ex in examples]`.

Reported per token: RssAnon after minus before (and the peak, sampled every
10 ms). Memory-mapped pages are file-backed (RssFile), which the kernel drops
under pressure; RssAnon is what the process cannot give back.

`gapfix eval --data`: the same measure for loading a 10M-token JSONL (records of a 32k-word
word-level tokenizer) as `gapfix eval` did (`load_examples`, the baseline) and does
(`eval_cli.load_eval_examples`: load_tokenized into a fresh cache, an ExampleTable), then one pass
over the examples.

Throughput: `load_tokenized` of math-task JSONL (fresh cache each round, so it
tokenizes) with num_proc 1 and 2, beside `gapfix.data.load_examples` on the
same file, for the bundled word-level tokenizer and a byte-level BPE trained
here with `tokenizers`.
"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest

pytest.importorskip("datasets", reason="every benchmark here reads or writes a datasets.Dataset")
pytest.importorskip("pyarrow")

TOKENS_PER_EXAMPLE = 500
VOCAB = 32000
TARGET_BYTES_PER_TOKEN = 2.0
_results = {}


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """The largest RssAnon seen, sampled every `interval` seconds on a thread."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak = interval, rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def make_synthetic(folder: str, num_tokens: int, seed: int = 0) -> None:
    """Tokenized examples of TOKENS_PER_EXAMPLE ids each, written chunk by chunk with save_to_disk."""
    import datasets
    import numpy as np

    num_examples = num_tokens // TOKENS_PER_EXAMPLE

    def generate(chunks):  # datasets hands each shard a sub-list of `chunks`
        for chunk in chunks:
            rng = np.random.default_rng([seed, chunk])
            for _ in range(min(10_000, num_examples - chunk * 10_000)):
                ids = rng.integers(3, VOCAB, TOKENS_PER_EXAMPLE, dtype=np.int32)
                ids[-1] = 2  # EOS
                split = int(rng.integers(50, 151))
                yield {"prompt_ids": ids[:split], "answer_ids": ids[split:]}

    features = datasets.Features({name: datasets.List(datasets.Value("int32"))
                                  for name in ("prompt_ids", "answer_ids")})
    with tempfile.TemporaryDirectory() as cache:
        dataset = datasets.Dataset.from_generator(
            generate, features=features, cache_dir=cache,
            gen_kwargs={"chunks": list(range(-(-num_examples // 10_000)))})
        dataset.save_to_disk(folder)


def memory_child(path: str, folder: str) -> None:
    import datasets
    import pyarrow  # noqa: F401  (imported before the first reading, as the arrow path uses it)

    from gapfix.data import Example, sft_row
    from gapfix.data.arrow import RowTable, load_tokenized, write_sft_rows

    datasets.disable_progress_bars()
    before = rss_anon_bytes()
    started = time.perf_counter()
    with PeakSampler() as sampler:
        if path == "arrow":
            examples = load_tokenized(folder)
            num_tokens = sum(pa_lengths(examples.data.column(c)) for c in ("prompt_ids", "answer_ids"))
            with tempfile.TemporaryDirectory() as out:
                rows = RowTable.open(write_sft_rows(os.path.join(out, "rows.arrow"), examples, batch_rows=256))
                batch = rows.gather(range(32))
                after = rss_anon_bytes()
                del rows
        else:
            table = datasets.load_from_disk(folder).data
            examples = [Example(p, a) for p, a in zip(table.column("prompt_ids").to_pylist(),
                                                      table.column("answer_ids").to_pylist())]
            rows = [sft_row(ex) for ex in examples]
            batch = rows[:32]
            num_tokens = sum(len(r["input_ids"]) for r in rows)
            after = rss_anon_bytes()
    assert len(batch) == 32
    print(json.dumps({
        "tokens": int(num_tokens), "seconds": time.perf_counter() - started,
        "rss_anon_before_MiB": before / 2**20, "rss_anon_growth_MiB": (after - before) / 2**20,
        "bytes_per_token": (after - before) / num_tokens,
        "peak_bytes_per_token": (sampler.peak - before) / num_tokens,
    }))


EVAL_WORDS = [f"w{i}" for i in range(VOCAB - 4)]  # with 4 specials: a VOCAB-word tokenizer


def eval_tokenizer():
    """One token per word of EVAL_WORDS (ids up to 32k, as a real vocabulary's: CPython shares
    the int objects of small ids only, so a small vocabulary would flatter the lists baseline)."""
    from gapfix.data import math_task

    return math_task.word_tokenizer(EVAL_WORDS)


def make_eval_jsonl(path: str, num_tokens: int, seed: int = 0) -> None:
    """Prompt/response JSONL of EVAL_WORDS (eval_tokenizer encodes each as one token),
    TOKENS_PER_EXAMPLE tokens a record with BOS and EOS: prompts of 50-150 tokens."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(num_tokens // TOKENS_PER_EXAMPLE):
            words = rng.choices(EVAL_WORDS, k=TOKENS_PER_EXAMPLE - 2)  # + BOS and EOS
            split = rng.randint(49, 149)
            handle.write(json.dumps({"prompt": " ".join(words[:split]), "response": " ".join(words[split:])})
                         + "\n")


def eval_memory_child(path: str, jsonl: str) -> None:
    """`gapfix eval`'s loading of `jsonl`: "lists" as it was (gapfix.data.load_examples), "arrow" as it
    is (eval_cli.load_eval_examples: load_tokenized into a fresh cache under --out, read as an
    ExampleTable), then one pass over the examples, as the evaluation iterates them (the table
    decodes them a batch at a time)."""
    import datasets
    import pyarrow  # noqa: F401

    from gapfix.data import load_examples
    from gapfix.eval_cli import load_eval_examples

    datasets.disable_progress_bars()
    tokenizer = eval_tokenizer()
    with tempfile.TemporaryDirectory() as warm:  # modules loaded on first use (gapfix eval has loaded
        small = os.path.join(warm, "one.jsonl")  # torch and transformers for its model by then)
        make_eval_jsonl(small, TOKENS_PER_EXAMPLE)
        load_eval_examples(small, tokenizer, out=warm) if path == "arrow" else load_examples(small, tokenizer)
    before = rss_anon_bytes()
    started = time.perf_counter()
    with PeakSampler() as sampler, tempfile.TemporaryDirectory() as out:
        if path == "arrow":
            examples = load_eval_examples(jsonl, tokenizer, out=out)
            loaded = rss_anon_bytes()
            num_tokens = sum(len(ex.prompt_ids) + len(ex.answer_ids) for ex in examples)
        else:
            examples = load_examples(jsonl, tokenizer)
            loaded = rss_anon_bytes()
            num_tokens = sum(len(ex.prompt_ids) + len(ex.answer_ids) for ex in examples)
        after = rss_anon_bytes()
    print(json.dumps({
        "tokens": int(num_tokens), "examples": len(examples), "seconds": time.perf_counter() - started,
        "rss_anon_before_MiB": before / 2**20, "rss_anon_growth_MiB": (after - before) / 2**20,
        "bytes_per_token": (after - before) / num_tokens, "loaded_bytes_per_token": (loaded - before) / num_tokens,
        "peak_bytes_per_token": (sampler.peak - before) / num_tokens,
    }))


def _run_child(*args, timeout=1800):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folders = {}

    def get(num_tokens):
        if num_tokens not in folders:
            folder = str(tmp_path_factory.mktemp(f"synthetic_{num_tokens}"))
            _run_child("make", folder, str(num_tokens))
            folders[num_tokens] = folder
        return folders[num_tokens]

    return get


def _memory_case(benchmark, synthetic, num_tokens, path):
    folder = synthetic(num_tokens)
    measured = benchmark.pedantic(_run_child, args=("memory", path, folder), rounds=1, iterations=1)
    _results[(num_tokens, path)] = measured
    info = {k: round(v, 3) if isinstance(v, float) else v for k, v in measured.items()}
    baseline = _results.get((num_tokens, "lists"))
    if path == "arrow" and baseline:
        info["baseline_bytes_per_token"] = round(baseline["bytes_per_token"], 3)
        info["ratio_vs_baseline"] = round(baseline["bytes_per_token"] / max(measured["bytes_per_token"], 1e-9), 1)
    benchmark.extra_info.update(info)
    assert measured["tokens"] == num_tokens // TOKENS_PER_EXAMPLE * TOKENS_PER_EXAMPLE
    if path == "arrow":
        assert measured["bytes_per_token"] <= TARGET_BYTES_PER_TOKEN, measured


@pytest.mark.parametrize("path", ["lists", "arrow"])  # the baseline first: arrow reports the ratio
def test_memory_10m_tokens(benchmark, synthetic, path):
    _memory_case(benchmark, synthetic, 10_000_000, path)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["lists", "arrow"])
def test_memory_50m_tokens(benchmark, synthetic, path):
    _memory_case(benchmark, synthetic, 50_000_000, path)


@pytest.fixture(scope="module")
def eval_jsonl_10m(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eval") / "eval.jsonl")
    _run_child("make_jsonl", path, "10000000")
    return path


@pytest.mark.parametrize("path", ["lists", "arrow"])  # the baseline first: arrow reports the ratio
def test_eval_loading_memory_10m_tokens(benchmark, eval_jsonl_10m, path):
    """`gapfix eval --data` of a 10M-token JSONL: resident memory per token, before (lists) and after
    (memory-mapped through load_tokenized)."""
    measured = benchmark.pedantic(_run_child, args=("eval_memory", path, eval_jsonl_10m), rounds=1,
                                  iterations=1)
    _results[("eval", path)] = measured
    info = {k: round(v, 3) if isinstance(v, float) else v for k, v in measured.items()}
    baseline = _results.get(("eval", "lists"))
    if path == "arrow" and baseline:
        assert measured["tokens"] == baseline["tokens"]
        info["baseline_bytes_per_token"] = round(baseline["bytes_per_token"], 3)
        info["ratio_vs_baseline"] = round(baseline["bytes_per_token"] / max(measured["bytes_per_token"], 1e-9), 1)
    benchmark.extra_info.update(info)
    assert measured["tokens"] == 10_000_000 // TOKENS_PER_EXAMPLE * TOKENS_PER_EXAMPLE
    if path == "arrow":
        assert measured["bytes_per_token"] <= TARGET_BYTES_PER_TOKEN, measured


# -------------------------------------------------------------- tokenizing


def byte_level_bpe(texts, vocab_size=2048):
    """A byte-level BPE trained here on `texts`, as a transformers fast tokenizer with <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


NUM_PROBLEMS = 20_000


@pytest.fixture(scope="module")
def math_jsonl(tmp_path_factory):
    from gapfix.data import math_task

    problems = math_task.make_split("train", NUM_PROBLEMS, seed=0)
    path = str(tmp_path_factory.mktemp("math") / "train.jsonl")
    math_task.write_jsonl(problems, path)
    return path


@pytest.fixture(scope="module")
def tokenizers_by_name(math_jsonl):
    from gapfix.data import math_task, read_jsonl

    records = read_jsonl(math_jsonl)
    texts = [r["prompt"] + "\n" + r["response"] for r in records[:5000]]
    return {"word_level": math_task.math_tokenizer(), "byte_bpe": byte_level_bpe(texts)}


def _timed_load(math_jsonl, tokenizer, num_proc):
    from gapfix.data.arrow import load_tokenized

    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: every round tokenizes
        started = time.perf_counter()
        dataset = load_tokenized(math_jsonl, tokenizer, num_proc=num_proc, cache_dir=cache)
        seconds = time.perf_counter() - started
        table = dataset.data
        tokens = sum(pa_lengths(table.column(c)) for c in ("prompt_ids", "answer_ids"))
        started = time.perf_counter()
        load_tokenized(math_jsonl, tokenizer, num_proc=num_proc, cache_dir=cache)  # the rerun: a cache hit
        rerun_seconds = time.perf_counter() - started
        del dataset, table
    return tokens, seconds, rerun_seconds


def pa_lengths(column) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(column)).as_py())


@pytest.mark.parametrize("num_proc", ["baseline", 1, 2])  # baseline: gapfix.data.load_examples
@pytest.mark.parametrize("name", ["word_level", "byte_bpe"])
def test_tokenize_throughput(benchmark, math_jsonl, tokenizers_by_name, name, num_proc):
    import datasets

    from gapfix.data import load_examples

    datasets.disable_progress_bars()
    tokenizer = tokenizers_by_name[name]
    measured = {}

    def run():  # the best of the rounds (the machine is shared)
        if num_proc == "baseline":
            started = time.perf_counter()
            examples = load_examples(math_jsonl, tokenizer)
            seconds = time.perf_counter() - started
            measured["tokens"] = sum(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
        else:
            measured["tokens"], seconds, rerun = _timed_load(math_jsonl, tokenizer, num_proc)
            measured["rerun_s"] = min(measured.get("rerun_s", rerun), rerun)
        measured["seconds"] = min(measured.get("seconds", seconds), seconds)

    benchmark.pedantic(run, rounds=2, iterations=1)
    info = {"records": NUM_PROBLEMS, "tokens": measured["tokens"],
            "tokens_per_s": round(measured["tokens"] / measured["seconds"])}
    if "rerun_s" in measured:
        info["cached_rerun_s"] = round(measured["rerun_s"], 3)
    _results[("tokenize", name, num_proc)] = info
    baseline = _results.get(("tokenize", name, "baseline"))
    if num_proc != "baseline" and baseline:
        assert info["tokens"] == baseline["tokens"]
        info["ratio_vs_load_examples"] = round(info["tokens_per_s"] / baseline["tokens_per_s"], 2)
    benchmark.extra_info.update(info)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make_synthetic(sys.argv[2], int(sys.argv[3]))
        print("{}")
    elif sys.argv[1] == "make_jsonl":
        make_eval_jsonl(sys.argv[2], int(sys.argv[3]))
        print("{}")
    elif sys.argv[1] == "eval_memory":
        eval_memory_child(sys.argv[2], sys.argv[3])
    else:
        memory_child(sys.argv[2], sys.argv[3])
