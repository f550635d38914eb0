"""Resident memory of `gapfix train --method bash` (one optimizer step) per training token.

    python scripts/train_memory.py                 # 1M and 10M tokens (a few minutes of one CPU)
    python scripts/train_memory.py 1000000 5000000

For each size: a prompt/response JSONL of words of a 32k-word word-level tokenizer (one token a
word, ids up to 32k as a real vocabulary's), 50 tokens a record, and a model folder (a tiny Llama
with that tokenizer). Each size runs `gapfix train --method bash --steps-per-iteration 1` in a
fresh process, which reports its peak resident memory (ru_maxrss: file-backed pages of the
memory-mapped Arrow files included, which the kernel can drop), the peak of RssAnon sampled every
10 ms, and RssAnon when the command returns. The figure is the growth between the smallest and
the largest file, divided by the tokens between them: what the run holds per token of data (a
constant, such as the model and the libraries, cancels out). Numbers: docs/failures.md.
"""
import json
import os
import random
import subprocess
import sys
import tempfile

TOKENS_PER_RECORD = 50
KEYS = ("maxrss", "rss_anon_peak", "rss_anon_end")
WORDS = [f"w{i}" for i in range(32000)]

CHILD = """
import json, resource, sys, threading, time

def rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.01)

threading.Thread(target=sample, daemon=True).start()
from gapfix.cli import main
code = main(sys.argv[1:])
peak[0] = max(peak[0], rss_anon())
print(json.dumps({"rc": code, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rss_anon_peak": peak[0], "rss_anon_end": rss_anon()}))
"""


def make_model(folder: str) -> None:
    from gapfix.data import math_task
    from gapfix.models import save_model, tiny_llama

    tokenizer = math_task.word_tokenizer(WORDS)
    save_model(tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0), tokenizer, folder)


def make_jsonl(path: str, num_tokens: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(num_tokens // TOKENS_PER_RECORD):
            words = rng.choices(WORDS, k=TOKENS_PER_RECORD - 2)  # + BOS and EOS
            split = rng.randint(10, 38)
            handle.write(json.dumps({"prompt": " ".join(words[:split]), "response": " ".join(words[split:])})
                         + "\n")


def measure(model: str, data: str, out: str) -> dict:
    argv = ["train", "--model", model, "--train", data, "--out", out, "--method", "bash",
            "--steps-per-iteration", "1", "--batch-size", "8", "--progress", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env,
                          check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"rc"')]
    if done.returncode or not lines:
        raise SystemExit(f"gapfix train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(sizes) -> None:
    with tempfile.TemporaryDirectory() as root:
        model = os.path.join(root, "model")
        make_model(model)
        results = {}
        for size in sizes:
            data = os.path.join(root, f"train-{size}.jsonl")
            make_jsonl(data, size)
            results[size] = measure(model, data, os.path.join(root, f"run-{size}"))
            print(json.dumps({"tokens": size, **{k: results[size][k] for k in KEYS}}),
                  flush=True)
        small, large = min(sizes), max(sizes)
        for key in KEYS:
            growth = results[large][key] - results[small][key]
            print(f"{key}: {results[small][key] / 2**20:.1f} MiB at {small} tokens, {results[large][key] / 2**20:.1f} "
                  f"MiB at {large}: {growth / (large - small):.2f} bytes per token")


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [1_000_000, 10_000_000])
