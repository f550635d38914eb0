"""Side-by-side CPU timing of two gapfix checkouts (an old version against this one), one thread.

    # a worktree per version, each with a venv holding its own editable install:
    git worktree add --detach ../gapfix-old 883216f
    python -m venv --system-site-packages ../gapfix-old/.venv
    (cd ../gapfix-old && .venv/bin/pip install -q --no-deps --no-build-isolation -e .)
    python bench/compare_versions.py --old ../gapfix-old --new . --rounds 7 [--cases align_,mix_]

Each checkout gets a long-lived worker process (its own .venv/bin/python, so `import gapfix`
loads that checkout), OMP_NUM_THREADS=1 and torch.set_num_threads(1). Both build the same inputs
from the same seeds. Then, round by round, each worker times `--reps` calls of the case, in
alternating order (old/new, new/old, ...), so both see the same drift of a shared machine.
Time is process CPU time (time.process_time: steadier than wall time when the cores are
shared; with one thread it is the op's own work), wall time is recorded too.

Printed per case: the median and the minimum over all calls of each version, the ratios
new/old of both, and the spread of the per-round ratios (median of the round's calls, new over
old), which says how much of a ratio is noise. Each worker also returns a checksum of the
case's outputs: "same" means the two versions computed the same numbers. An A/A run
(`--old . --new .`) measures the noise floor of the machine: at the 1-5 ms cases one process can
stay 10-20% faster than its twin through all rounds, so for those use `--pairs N` (N fresh worker
pairs one after another, then a table pooled over them with the per-pair spread).
`--json FILE` keeps the raw times.

The cases are those bench/RESULTS.md reports for the CPU, at its shapes: fused linear
cross-entropy forward+backward (N=8192, H=512, V=32768, fp32, every 10th target ignored),
mix_embedding forward and forward+backward (8 x 1024 tokens, V=32000, D=512, explicit mask or
beta=0.2 with an int seed, fp32 and bf16), align (256 pairs of 256/1024/4096 tokens, 10% and
50% edits), build_rac_rows (64 pairs of 96 tokens, modes path and all) and rac_labels itself on
tensors (256 pairs of 256 tokens), plus mix_embedding at 8 tokens ("mix_embedding_call_*": the
fixed cost of a call, validation and the mask draw); the pairs come from bench/test_bench_align.py and
bench/test_bench_rac_labels.py. Every case calls the public function with impl="auto",
which on CPU tensors is the fast path in both versions (0.1.0 named it "cpu"; now "torch_fast"
for cross_entropy and mix_embedding, "native" for align).
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

# ---------------------------------------------------------------------------- cases (worker side)


def _ce_case(hdim=512, vocab=32768, tokens=8192):
    import torch

    import gapfix

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hdim, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hdim, generator=gen) / hdim ** 0.5).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    target[::10] = -100

    def step():
        hidden.grad = weight.grad = None
        loss = gapfix.linear_cross_entropy(hidden, weight, target)
        loss.backward()
        return loss

    def checksum():
        loss = step()
        return [float(loss.detach()), float(hidden.grad.double().sum()),
                float(weight.grad.double().abs().sum())]

    return step, checksum


def _mix_case(backward, mode, dtype_name, tokens=8 * 1024, vocab=32_000, dim=512):
    import torch

    import gapfix

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, dim, generator=gen).to(dtype)
    ids = torch.randint(0, vocab, (tokens,), generator=gen)
    alt = torch.randint(0, vocab, (tokens,), generator=gen)
    mask = torch.rand(tokens, generator=gen) < 0.2
    grad = torch.randn(tokens, dim, generator=gen).to(dtype)
    kwargs = {"mask": mask} if mode == "mask" else {"beta": 0.2, "seed": 7}
    if backward:
        weight.requires_grad_(True)

        def run():
            out, mixed = gapfix.mix_embedding(weight, ids, alt, **kwargs)
            return torch.autograd.grad(out, weight, grad)[0], mixed
    else:
        def run():
            return gapfix.mix_embedding(weight, ids, alt, **kwargs)

    def checksum():
        a, mixed = run()
        return [float(a.double().abs().sum()), int(mixed.sum())]

    return run, checksum


def _align_case(length, edit_pct):
    from test_bench_align import make_pairs, pad

    import gapfix

    gens, refs = make_pairs(256, length, edit_pct / 100)
    gen, gen_lens = pad(gens)
    ref, ref_lens = pad(refs)

    def run():
        return gapfix.align(gen, ref, gen_lens, ref_lens)

    def checksum():
        out = run()
        return [int(out.distance.sum()), int(out.path.sum()), int(out.cost.sum()), int(out.first.sum()),
                int(out.last.sum())]

    return run, checksum


def _flat(value):
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value]


def _rac_rows_case(mode):
    from test_bench_rac_labels import _answers

    from gapfix.methods.rac import build_rac_rows

    prompts, generated, references = _answers(64, 96)

    def run():
        return build_rac_rows(prompts, generated, references, eos_id=2, mode=mode)

    def checksum():
        rows, _ = run()
        # The labels' values in order, without their positions: 0.1.0's rows held labels already
        # shifted by one (label i = token i + 1), now they are aligned with input_ids (the Hugging
        # Face convention, commit 116dbeb); either way the same tokens are trained on.
        kept = [[row["input_ids"]] + [[v for v in _flat(row[k]) if v not in (-100, 0.0)]
                                      for k in ("labels", "target_ids", "target_weights") if k in row]
                for row in rows]
        # sha256, not hash(): str hashes are salted per process
        return [len(rows), hashlib.sha256(json.dumps(kept).encode()).hexdigest()]

    return run, checksum


def _rac_labels_case(mode):
    from test_bench_align import pad
    from test_bench_rac_labels import _answers

    import gapfix

    _, generated, references = _answers(256, 256, vocab=32000, seed=1)
    gen, gen_lens = pad(generated)
    ref, ref_lens = pad(references)

    def run():
        return gapfix.rac_labels(gen, ref, gen_lens, ref_lens, eos_id=2, mode=mode)

    def checksum():
        out = run()
        parts = [out] if mode != "all" else [out.labels, out.target_ids, out.target_weights]
        return [float(p.double().sum()) for p in parts]

    return run, checksum


CASES = {
    "cross_entropy_fwd_bwd_H512_V32768_fp32": lambda: _ce_case(),
    **{f"mix_embedding_{'fwd_bwd' if bwd else 'fwd'}_{mode}_{dt}": (
        lambda b=bwd, m=mode, d=dt: _mix_case(b, m, d))
       for bwd in (False, True) for mode in ("mask", "beta") for dt in ("fp32", "bf16")},
    # fixed cost per call (validation, dispatch): 8 tokens, V=64, D=16
    **{f"mix_embedding_call_{'fwd_bwd' if bwd else 'fwd'}_{mode}": (
        lambda b=bwd, m=mode: _mix_case(b, m, "fp32", tokens=8, vocab=64, dim=16))
       for bwd in (False, True) for mode in ("mask", "beta")},
    **{f"align_{n}_{e}pct": (lambda n=n, e=e: _align_case(n, e))
       for n in (256, 1024, 4096) for e in (10, 50)},
    **{f"build_rac_rows_{m}": (lambda m=m: _rac_rows_case(m)) for m in ("path", "all")},
    **{f"rac_labels_{m}": (lambda m=m: _rac_labels_case(m)) for m in ("path", "all")},
}


def worker():
    """Reads one JSON command a line on stdin, answers one JSON line on the original stdout."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the library prints goes to stderr, not into the protocol
    import torch

    import gapfix

    torch.set_num_threads(1)
    run = None
    reply.write(json.dumps({"gapfix": os.path.dirname(gapfix.__file__), "torch": torch.__version__,
                            "threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "setup":
            run = checksum = None
            run, checksum = CASES[cmd["case"]]()
            for _ in range(cmd.get("warmup", 1)):
                run()
            reply.write(json.dumps({"checksum": checksum()}) + "\n")
        elif cmd["cmd"] == "time":
            cpu, wall = [], []
            for _ in range(cmd["reps"]):
                w0, c0 = time.perf_counter(), time.process_time()
                run()
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            reply.write(json.dumps({"cpu": cpu, "wall": wall}) + "\n")
        elif cmd["cmd"] == "quit":
            return


# ---------------------------------------------------------------------------- driver

# calls per round: the slow cases get fewer
REPS = {"cross_entropy": 1, "mix_embedding_call": 200, "mix_embedding_fwd_bwd": 5, "mix_embedding_fwd": 15,
        "align_4096": 2, "align_1024": 5, "align_256": 15, "build_rac_rows": 5, "rac_labels": 5}


def _reps(case):
    return next(v for k, v in sorted(REPS.items(), key=lambda kv: -len(kv[0])) if case.startswith(k))


class Worker:
    def __init__(self, tree):
        python = os.path.join(tree, ".venv", "bin", "python")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--worker"], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[0]} exited (code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        return self._read()

    def close(self):
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait()


def _fmt(seconds):
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def compare(old, new, cases, rounds, measure, resetup=False):
    results = {}
    print(f"old: {old.info}\nnew: {new.info}\n", flush=True)
    header = ("| case | old median | new median | new/old (medians) | new/old (minima) "
              "| per-round ratios (min-max) | outputs |")
    print(header + "\n" + "| --- " * 7 + "|", flush=True)
    for case in cases:
        reps = _reps(case)
        sums = {name: w.ask(cmd="setup", case=case)["checksum"] for name, w in (("old", old), ("new", new))}
        times = {"old": [], "new": []}
        round_ratios = []
        for r in range(rounds):
            if resetup and r:
                # fresh inputs (new addresses) each round: where a tensor lands in memory can
                # make one process persistently faster at the few-ms cases; this spreads that out
                for w in (old, new):
                    w.ask(cmd="setup", case=case)
            order = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
            this_round = {}
            for name, w in order:
                this_round[name] = w.ask(cmd="time", reps=reps)[measure]
                times[name] += this_round[name]
            round_ratios.append(statistics.median(this_round["new"]) / statistics.median(this_round["old"]))
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        same = sums["old"] == sums["new"]
        if not same:
            rel = max(abs(a - b) / max(abs(a), 1e-30) if isinstance(a, float) else float(a != b)
                      for a, b in zip(sums["old"], sums["new"]))
            same_text = f"differ (rel {rel:.1e})"
        else:
            same_text = "same"
        results[case] = dict(times=times, round_ratios=round_ratios, checksums=sums, reps=reps)
        print(f"| {case} | {_fmt(med['old'])} | {_fmt(med['new'])} | {med['new'] / med['old']:.3f} "
              f"| {low['new'] / low['old']:.3f} | {min(round_ratios):.2f}-{max(round_ratios):.2f} "
              f"| {same_text} |", flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--old", help="the old checkout (holding .venv with its editable install)")
    p.add_argument("--new", default=".", help="the new checkout (default: here)")
    p.add_argument("--cases", default="",
                   help="comma-separated name prefixes (default: all); --list shows them")
    p.add_argument("--list", action="store_true")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--measure", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--pairs", type=int, default=1,
                   help="fresh worker pairs, one after the other; >1 also prints a pooled table")
    p.add_argument("--json", help="write the raw times here")
    p.add_argument("--resetup", action="store_true",
                   help="build the inputs afresh every round (few-ms cases: spreads out memory placement)")
    args = p.parse_args()
    if args.worker:
        return worker()
    if args.list:
        print("\n".join(CASES))
        return None
    if not args.old:
        p.error("--old is required")
    prefixes = [c for c in args.cases.split(",") if c]
    cases = [c for c in CASES if not prefixes or any(c.startswith(x) for x in prefixes)]
    if not cases:
        p.error(f"no case starts with {prefixes}; --list shows them")
    start = time.time()
    runs = []
    for pair in range(args.pairs):
        if args.pairs > 1:
            print(f"\nworker pair {pair + 1} of {args.pairs}")
        old, new = Worker(args.old), Worker(args.new)
        try:
            runs.append(compare(old, new, cases, args.rounds, args.measure, args.resetup))
        finally:
            old.close()
            new.close()
    if args.pairs > 1:
        _pooled(runs, cases)
    print(f"\n{args.pairs} worker pair(s) x {args.rounds} rounds, process {args.measure} time, whole run "
          f"{time.time() - start:.0f} s; load average at the end {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(old=old.info, new=new.info, rounds=args.rounds, measure=args.measure,
                           runs=runs), f, indent=1)
    return None


def _pooled(runs, cases):
    """All pairs' calls together. A process can be persistently faster than its twin at the
    few-ms cases (memory placement, its own allocator history: an A/A run shows +-20%), so the
    spread of the per-pair ratios is the noise to judge a ratio against."""
    print("\npooled over the worker pairs\n")
    print("| case | old median | new median | new/old (medians) | new/old (minima) "
          "| per-pair ratios of medians (min-max) |\n" + "| --- " * 6 + "|")
    for case in cases:
        t = {k: [x for run in runs for x in run[case]["times"][k]] for k in ("old", "new")}
        per_pair = [statistics.median(run[case]["times"]["new"])
                    / statistics.median(run[case]["times"]["old"]) for run in runs]
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f"| {case} | {_fmt(med['old'])} | {_fmt(med['new'])} | {med['new'] / med['old']:.3f} "
              f"| {min(t['new']) / min(t['old']):.3f} | {min(per_pair):.2f}-{max(per_pair):.2f} |")


if __name__ == "__main__":
    main()
