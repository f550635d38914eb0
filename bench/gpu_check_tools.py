"""The Python half of bench/gpu_check.sh (the bash half runs the steps under time limits).

    python bench/gpu_check_tools.py carry WHEELS OUT        installs bench/device-requirements.txt from
                                 the carried wheels (WHEELS, or "-" to install nothing) -> OUT/carried.json
    python bench/gpu_check_tools.py env OUT                 -> OUT/env.json (card, versions)
    python bench/gpu_check_tools.py build-check before|after
                                 exit 1 with the reasons when the CUDA build cannot work
    python bench/gpu_check_tools.py limit OUT STEP CAP     -> prints the time limit of STEP
                                 (and writes OUT/stream/STEP.last: tests to run last)
    python bench/gpu_check_tools.py table OUT              -> OUT/gpu_results.json

Files under OUT: stream/<step>.jsonl and, for a step run under pytest-xdist, one
stream/<step>_gw<i>.jsonl per worker (bench/stream_results.py, one JSON line per test,
benchmark and Triton compilation, written as they happen); stream/warm_<tests|bench>.wall (the
warm sessions' wall time and exit); steps.jsonl (one line per finished step, written by
gpu_check.sh).

GAPFIX_GPU_CHECK_FAKE (a JSON object) replaces facts of `build-check` (cuda_available,
torch_cuda, toolkit, cuda_home, build_info): the script's own tests use it to check the
refusals on a machine without a GPU.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys

# ---------------------------------------------------------------------------- build checks


def _toolkit_version(cuda_home: str | None) -> str | None:
    """The CUDA toolkit's version from `nvcc --version` ("release 13.0, V13.0.88" -> "13.0")."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    done = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"release (\d+\.\d+)", done.stdout)
    return found.group(1) if found else None


def build_facts(phase: str) -> dict:
    import torch

    facts = {
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_home": os.environ.get("CUDA_HOME") or None,
    }
    facts["toolkit"] = _toolkit_version(facts["cuda_home"])
    if phase == "after":
        from gapfix import _native

        facts["build_info"] = _native.build_info()
    fake = os.environ.get("GAPFIX_GPU_CHECK_FAKE")
    if fake:
        facts.update(json.loads(fake))
        facts["faked"] = sorted(json.loads(fake))
    return facts


def _major(version: str | None) -> str | None:
    return version.split(".")[0] if version else None


def build_problems(facts: dict, phase: str) -> list[str]:
    """Why the CUDA build cannot work on this machine ([] when it can, or when there is no GPU:
    a CPU-only build is then the right one)."""
    if not facts["cuda_available"]:
        return []
    problems = []
    if facts.get("torch_cuda") is None:
        problems.append(
            f"a GPU is visible but torch {facts.get('torch')} was built without CUDA "
            "(torch.version.cuda is None)"
        )
    if phase == "before":
        if not facts.get("cuda_home"):
            problems.append(
                "a GPU is visible but CUDA_HOME is unset and no nvcc was found: gapfix._C "
                "would build without its CUDA kernels (a pip CUDA torch ships no toolkit)"
            )
        elif facts.get("toolkit") is None:
            problems.append(f"CUDA_HOME={facts['cuda_home']} has no working bin/nvcc")
        elif facts.get("torch_cuda") and _major(facts["toolkit"]) != _major(facts["torch_cuda"]):
            problems.append(
                f"the CUDA toolkit at {facts['cuda_home']} is {facts['toolkit']} but torch was "
                f"built with CUDA {facts['torch_cuda']}: the major versions must match"
            )
    if phase == "after":
        info = facts.get("build_info") or ""
        if "cuda=yes" not in info:
            problems.append(
                f"a GPU is visible but gapfix._C was built without CUDA (build_info: {info!r}); "
                "set CUDA_HOME to the toolkit and rebuild"
            )
    return problems


def cmd_build_check(phase: str) -> int:
    if phase not in ("before", "after"):
        raise SystemExit(f"build-check: phase must be 'before' or 'after', not {phase!r}")
    try:
        facts = build_facts(phase)
    except ImportError as exc:  # no torch, or gapfix not installed after the build
        print(f"BUILD CHECK FAILED ({phase}): {exc}", file=sys.stderr)
        return 1
    print("build facts:", json.dumps(facts, sort_keys=True))
    problems = build_problems(facts, phase)
    for problem in problems:
        print(f"BUILD CHECK FAILED ({phase}): {problem}", file=sys.stderr)
    return 1 if problems else 0


# ---------------------------------------------------------------------------- carried packages

REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "device-requirements.txt")
IMAGE_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "device-image.txt")
FALLBACKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "device-fallback-wheels.txt")
DEFAULT_WHEELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".device-wheels")


def read_pins(path: str) -> list[str]:
    """The requirement lines of a pinned list ("name==version"), comments and blanks dropped."""
    pins = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", text):
                raise ValueError(f"{path}:{number}: expected one name==version pin, not {text!r}")
            pins.append(text)
    return pins


def installed_versions(names: list[str]) -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _packaging():
    try:
        from packaging import requirements, utils, version
    except ImportError:  # pip's own copy: pip is there whenever this runs
        from pip._vendor.packaging import requirements, utils, version
    return requirements, utils, version


def wheel_index(wheels: str) -> dict[tuple[str, str], str]:
    """The folder's wheels: (canonical name, version) -> path."""
    _, utils, _ = _packaging()
    index = {}
    for path in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        name, version, _, _ = utils.parse_wheel_filename(os.path.basename(path))
        index[(name, str(version))] = path
    return index


def wheel_requirements(path: str) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    import email
    import zipfile

    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return email.message_from_bytes(wheel.read(name)).get_all("Requires-Dist") or []


def unmet_image_requirements(path: str, held: set[str], installed) -> list[str]:
    """What the wheel at PATH requires of packages the carried folder does not hold (those only the
    image can give) that the image's versions (installed: canonical name -> version or None) do not
    meet: pip cannot install that wheel here."""
    requirements, utils, version = _packaging()
    unmet = []
    for line in wheel_requirements(path):
        requirement = requirements.Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement, or another platform's
        name = utils.canonicalize_name(requirement.name)
        if name in held:
            continue  # pip takes a fitting version from the folder
        have = installed(name)
        if have is None or not requirement.specifier.contains(version.Version(have), prereleases=True):
            unmet.append(f"{requirement} (the image has {have or 'none'})")
    return unmet


def choose_pins(pins: list[str], fallbacks: list[str], wheels: str, installed) -> tuple[list[str], dict]:
    """The pins to install from the folder WHEELS: each pin, unless its wheel needs a version of an
    image package (one the folder does not carry, pyarrow for datasets) that the image does not have;
    then the first fallback of the same package (bench/device-fallback-wheels.txt) whose wheel the
    image can take. Returns the chosen pins and, by pin, why another was chosen (or why none fits)."""
    _, utils, _ = _packaging()
    index = wheel_index(wheels)
    held = {name for name, _ in index}

    def unmet(pin):
        name, wanted = pin.split("==")
        path = index.get((utils.canonicalize_name(name), wanted))
        return None if path is None else unmet_image_requirements(path, held, installed)

    chosen, changes = [], {}
    for pin in pins:
        why = unmet(pin)
        if not why:  # fits, or no wheel to read (pip then says what is missing)
            chosen.append(pin)
            continue
        name = utils.canonicalize_name(pin.split("==")[0])
        fitting = [f for f in fallbacks if utils.canonicalize_name(f.split("==")[0]) == name and unmet(f) == []]
        chosen.append(fitting[0] if fitting else pin)
        changes[pin] = {"instead": fitting[0] if fitting else None, "because": why}
    return chosen, changes


def _image_version(name: str) -> str | None:
    return installed_versions([name])[name]


def _pip_install(wheels: str, requirements: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels,
               "--disable-pip-version-check", "--no-cache-dir", "--no-compile", *requirements]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", flush=True)
    return done


def cmd_carry(wheels: str, out_dir: str) -> int:
    """Installs the carried requirements from the folder WHEELS with pip's resolver and no index
    (an image package that already satisfies a requirement stays; the folder's fallbacks replace
    one that does not). A pin whose wheel needs what the image lacks (datasets 5.2.0 needs pyarrow
    >= 24, which the image may not have) is replaced by a fallback that fits (choose_pins). All at
    once first; if pip refuses, one requirement at a time, so that one
    conflict costs only its own package. "-" installs nothing (the dry run: the environment is
    what it is, and what it lacks is listed, not failed). Writes OUT/carried.json: each
    requirement, its version now, and where it came from; exit 1 when one is missing after an
    install (or the folder is missing). Each row also says what was pinned and, where a fallback
    replaced it, why ("changed")."""
    pinned = read_pins(REQUIREMENTS)
    pins, changes = list(pinned), {}
    # the dry run chooses as the device would, from the folder it would carry, when there is one
    chosen_from = wheels if wheels != "-" else os.environ.get("GAPFIX_DEVICE_WHEELS", DEFAULT_WHEELS)
    if os.path.isdir(chosen_from):
        pins, changes = choose_pins(pinned, read_pins(FALLBACKS), chosen_from, _image_version)
    else:
        chosen_from = None
    for pin, change in changes.items():
        print(f"carry: {pin} needs {'; '.join(change['because'])}: "
              + (f"installing {change['instead']} instead" if change["instead"] else "no carried version fits"))
    names = [pin.split("==")[0] for pin in pins]
    before = installed_versions(names)
    refused: dict[str, str] = {}
    if wheels != "-":
        if not os.path.isdir(wheels):
            print(f"CARRY FAILED: no carried wheels at {wheels}: run scripts/download_device_wheels.sh "
                  "and carry .device-wheels", file=sys.stderr)
        elif _pip_install(wheels, pins).returncode != 0:
            for pin in pins:
                done = _pip_install(wheels, [pin])
                if done.returncode != 0:
                    refused[pin] = (done.stderr.strip().splitlines() or ["pip failed"])[-1][:500]
    after = installed_versions(names)
    rows = []
    for original, pin, name in zip(pinned, pins, names):
        wanted = pin.split("==")[1]
        source = "image" if before[name] is not None and before[name] == after[name] else "carried"
        rows.append({"requirement": pin, "installed": after[name], "source": source if after[name] else None,
                     "matches_pin": after[name] == wanted, "refused": refused.get(pin),
                     "pinned": original, "changed": changes.get(original)})
    check = subprocess.run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
                           capture_output=True, text=True, timeout=300, check=False)
    record = {"wheels": wheels, "chosen_from": chosen_from, "packages": rows,
              "pip_check": check.stdout.strip().splitlines()}
    with open(os.path.join(out_dir, "carried.json"), "w") as f:
        json.dump(record, f, indent=2)
    missing = [r["requirement"] for r in rows if r["installed"] is None]
    for r in rows:
        print(f"carried: {r['requirement']:<28} installed {r['installed']} ({r['source'] or 'MISSING'})"
              + (f" refused: {r['refused']}" if r["refused"] else ""))
    for line in record["pip_check"]:
        print(f"pip check: {line}")
    if missing and wheels == "-":
        print(f"carry: not installed here: {', '.join(missing)} (nothing installed: dry run)")
        return 0
    if missing:
        print(f"CARRY FAILED: not installed: {', '.join(missing)} (their tests and benchmarks skip, "
              "with the reason, in the table)", file=sys.stderr)
    return 1 if missing else 0


# ---------------------------------------------------------------------------- environment


def cmd_env(out_dir: str) -> int:
    import platform

    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_home": os.environ.get("CUDA_HOME"),
    }
    from importlib import metadata

    # what the tests and benchmarks can use on this machine (a missing baseline is skipped by its benchmark)
    for dist in (
        "triton",
        "pytest",
        "pytest-benchmark",
        "transformers",
        "vllm",
        "liger-kernel",
        "cut-cross-entropy",
    ):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    # the versions of every package bench/device-image.txt pins, to correct that list from a real run
    image_names = [pin.split("==")[0] for pin in read_pins(IMAGE_LIST)]
    env["image"] = installed_versions(image_names)
    if env["cuda_available"]:
        env["device_name"] = torch.cuda.get_device_name(0)
        env["device_count"] = torch.cuda.device_count()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    else:
        env["device_name"] = f"cpu ({platform.processor() or platform.machine()}, no CUDA device)"
    smi = shutil.which("nvidia-smi")
    if smi:  # reads the card's name and settings only; never changes them
        done = subprocess.run(
            [smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        env["nvidia_smi"] = (done.stdout or done.stderr).strip()
    env["toolkit"] = _toolkit_version(env["cuda_home"])
    try:
        from gapfix import _native

        env["build_info"] = _native.build_info()
    except ImportError as exc:
        env["build_info"] = f"gapfix not importable: {exc}"
    with open(os.path.join(out_dir, "env.json"), "w") as f:
        json.dump(env, f, indent=2)
    print(json.dumps(env))
    return 0


# ---------------------------------------------------------------------------- reading the streams


def read_lines(path: str) -> list[dict]:
    """JSON lines of one stream; a line cut short by a kill (the last one) is reported, not fatal."""
    events = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "unreadable", "file": path, "line": number, "text": line[:200]})
    return events


def streams(out_dir: str, prefix: str = "") -> dict[str, list[dict]]:
    files = sorted(glob.glob(os.path.join(out_dir, "stream", f"{prefix}*.jsonl")))
    return {os.path.basename(path)[: -len(".jsonl")]: read_lines(path) for path in files}


def summarize(events: list[dict]) -> dict:
    """Results, unfinished tests (started, no result: hung or killed) and compilations of one stream."""
    results = {e["nodeid"]: e for e in events if e["event"] == "result"}
    started = [e["nodeid"] for e in events if e["event"] == "start"]
    compiles = [e for e in events if e["event"] == "compile"]
    sessions = [e for e in events if e["event"] == "session"]
    ends = [e for e in events if e["event"] == "end"]
    selected = [e for e in events if e["event"] == "selected"]
    # an xdist controller runs no test and installs no listener (None): its workers' lines say
    listeners = [s["compile_listener"] for s in sessions if s.get("compile_listener") is not None]
    return {
        "results": list(results.values()),
        "unfinished": [nodeid for nodeid in started if nodeid not in results],
        "compiled": [e for e in compiles if not e.get("cache_hit")],
        "specializations": [e for e in events if e["event"] == "specialization"],
        "cache_hits": sum(1 for e in compiles if e.get("cache_hit")),
        "selected": selected[-1]["count"] if selected else (ends[-1]["selected"] if ends else None),
        "ended": bool(ends),
        "compile_listener": all(listeners) if listeners else None,
        "unreadable": [e for e in events if e["event"] == "unreadable"],
    }


# ---------------------------------------------------------------------------- step limits

STARTUP_S = 25.0  # python, torch, triton, transformers imports and pytest collection
LOAD_S = 0.05  # one kernel from the on-disk cache (read, load the cubin)
GRAPH_S = 5.0  # one torch.compile graph against a warm inductor cache (dynamo tracing)
UNKNOWN_ITEM_S = 10.0  # a test the warm step did not finish: its compilations are unknown


def size_limit(out_dir: str, step: str, cap: float) -> tuple[int, str]:
    """Time limit of STEP ("tests" or "bench", run serially in one process) from what the warm
    step measured for the same selection (one process, or one pytest-xdist session: a controller
    stream and one stream per worker): the warm session's time outside its tests (start-up,
    collection, exit: its wall time less its busiest process's test time), the run time of each
    warm test without its compile time, one cache load per kernel it compiled or loaded, a dynamo
    re-trace per torch.compile graph, and for every test the warm step did not finish (or start)
    the mean compile time of those it did (at least UNKNOWN_ITEM_S).
    Capped at CAP, the budget left; the reason is returned with the number."""
    summaries = [summarize(events) for events in streams(out_dir, f"warm_{step}").values()]
    # outside the tests: measured on a warm session that ended by itself (a killed one's wall time
    # holds the hang); STARTUP_S is the floor
    startup = STARTUP_S
    wall_path = os.path.join(out_dir, "stream", f"warm_{step}.wall")
    if summaries and all(s["ended"] for s in summaries) and os.path.exists(wall_path):
        with open(wall_path) as f:
            wall = json.load(f)
        if wall.get("rc") not in (124, 137):
            busiest = max(sum(r.get("duration", 0.0) for r in s["results"]) for s in summaries)
            startup = max(STARTUP_S, wall["seconds"] - busiest)
    results = [r for s in summaries for r in s["results"]]
    unfinished = len({n for s in summaries for n in s["unfinished"]})
    # each xdist worker collects the whole selection and runs its part of it
    selected = max([s["selected"] or 0 for s in summaries], default=0)
    not_started = max(0, selected - len({r["nodeid"] for r in results}) - unfinished)
    run_s = sum(max(0.0, r.get("duration", 0.0) - r.get("compile_s", 0.0)) for r in results)
    compiled = sum(r.get("compiles", 0) for r in results)
    loads = compiled + sum(r.get("cache_hits", 0) for r in results)
    graphs = sum(r.get("inductor_graphs", 0) or 0 for r in results)
    compiling = [r["compile_s"] for r in results if r.get("compiles")]
    per_unknown = max(UNKNOWN_ITEM_S, sum(compiling) / len(compiling) if compiling else 0.0)
    unknown = unfinished + not_started
    if not summaries:  # no warm stream at all (the warm step never started): nothing measured
        unknown, per_unknown = 1, cap
    need = startup + 1.5 * run_s + LOAD_S * loads + GRAPH_S * graphs + per_unknown * unknown
    limit = int(min(math.ceil(need), cap))
    why = (
        f"limit {step}: {limit}s = min(cap {cap:.0f}s, {startup:.0f}s start-up, collection and exit"
        f" + 1.5 x {run_s:.1f}s run time of {len(results)} warm tests"
        f" + {loads} kernel loads ({compiled} compiled in the warm step) x {LOAD_S}s"
        f" + {graphs} torch.compile graphs x {GRAPH_S:.0f}s"
        f" + {unknown} tests not finished warm x {per_unknown:.1f}s)"
    )
    if need > cap:
        why += f"; SHORT by {need - cap:.0f}s: the step may be cut, its finished results stay"
    return limit, why


def cmd_limit(out_dir: str, step: str, cap: str) -> int:
    """Prints STEP's limit; also writes OUT/stream/STEP.last, the tests the warm step started and
    did not finish, which gpu_check.sh passes to --stream-last (they run after all others)."""
    limit, why = size_limit(out_dir, step, float(cap))
    unfinished = sorted({
        n for events in streams(out_dir, f"warm_{step}").values() for n in summarize(events)["unfinished"]
    })
    with open(os.path.join(out_dir, "stream", f"{step}.last"), "w") as f:
        f.writelines(f"{nodeid}\n" for nodeid in unfinished)
    if unfinished:
        why += f"; {len(unfinished)} unfinished in the warm step run last: {', '.join(unfinished)}"
    print(why, file=sys.stderr)
    print(max(limit, 1))
    return 0


# ---------------------------------------------------------------------------- the table


def _benchmark_row(step: str, result: dict) -> dict:
    bench = result["benchmark"]
    info = dict(bench.get("extra_info") or {})
    nodeid = result["nodeid"]
    name = nodeid.split("::")[-1]
    return {
        "step": step,
        "op": name.split("[")[0].removeprefix("test_bench_").removeprefix("test_"),
        "file": nodeid.split("::")[0],
        "case": info.pop("case", bench.get("param")),
        "outcome": result["outcome"],
        "time_s": bench.get("median"),
        "rounds": bench.get("rounds"),
        "min_s": bench.get("min"),
        "group": bench.get("group"),
        "throughput": info.pop("throughput", None),
        "throughput_unit": info.pop("throughput_unit", None),
        "baseline": info.pop("baseline", None),
        "ratio": info.pop("ratio", info.pop("speedup", None)),
        "extra": info,
    }


def interpreted_compilations(specializations: list[dict]) -> dict | None:
    """What a dry run under the interpreter says the GPU warm step will compile: each warm
    process compiles every specialization it launches that the on-disk cache does not hold yet,
    and parallel processes do not see each other's in time, so the per-process count is the
    upper bound and the distinct count (over all processes) the lower one."""
    warm = [e for e in specializations if e["stream"].startswith("warm")]
    if not warm:
        return None
    by_kernel: dict[str, int] = {}
    for e in {e["key"]: e for e in warm}.values():
        by_kernel[e["kernel"]] = by_kernel.get(e["kernel"], 0) + 1
    return {
        "warm_per_process_total": len(warm),
        "warm_distinct": len({e["key"] for e in warm}),
        "by_kernel": dict(sorted(by_kernel.items(), key=lambda item: -item[1])),
    }


def cannot_run(env: dict) -> list[dict]:
    """What the run could not exercise on this machine, and why: stated in the table, so that a
    missing row is read as a known gap, not as a pass."""
    gaps = []
    if env and env.get("vllm") is None:
        gaps.append({
            "what": "vLLM generation on the GPU and the colocated engine (tests/test_colocate.py, "
                    "tests/test_vllm_push.py, tests/test_vllm_torchrun.py, tests/test_hf_rac.py's vllm "
                    "tests, the vllm cases of bench/test_bench_generation.py and bench/test_bench_vllm_push.py)",
            "why": "vllm is not on the device image, and a CUDA vllm with its requirements is hundreds of "
                   "MB of wheels, far over the device tool's 64 MiB carry limit; those tests skip",
        })
    return gaps


def build_table(out_dir: str) -> dict:
    env = {}
    if os.path.exists(os.path.join(out_dir, "env.json")):
        with open(os.path.join(out_dir, "env.json")) as f:
            env = json.load(f)
    steps = (
        read_lines(os.path.join(out_dir, "steps.jsonl"))
        if os.path.exists(os.path.join(out_dir, "steps.jsonl"))
        else []
    )
    tests, benchmarks, unfinished, compiled, problems = [], [], [], [], []
    cache_hits, listener = 0, []
    specializations: list[dict] = []
    for name, events in streams(out_dir).items():
        s = summarize(events)
        step = name
        cache_hits += s["cache_hits"]
        compiled += [dict(c, stream=name) for c in s["compiled"]]
        specializations += [dict(e, stream=name) for e in s["specializations"]]
        listener.append(s["compile_listener"])
        unfinished += [{"stream": name, "nodeid": nodeid} for nodeid in s["unfinished"]]
        problems += [f"{name}: unreadable line {u['line']}" for u in s["unreadable"]]
        for r in s["results"]:
            tests.append(
                {
                    "stream": step,
                    "nodeid": r["nodeid"],
                    "outcome": r["outcome"],
                    "phase": r.get("phase"),
                    "duration_s": r.get("duration"),
                    "compiles": r.get("compiles"),
                    "compile_s": r.get("compile_s"),
                    "message": r.get("message"),
                }
            )
            if r.get("benchmark"):
                benchmarks.append(_benchmark_row(step, r))
    counts: dict[str, dict[str, int]] = {}
    for t in tests:
        kind = counts.setdefault(
            t["stream"].split("_")[0] if t["stream"].startswith("warm") else t["stream"], {}
        )
        kind[t["outcome"]] = kind.get(t["outcome"], 0) + 1
    by_kernel: dict[str, dict] = {}
    for c in compiled:
        k = by_kernel.setdefault(c["kernel"], {"compiled": 0, "seconds": 0.0, "max_s": 0.0})
        k["compiled"] += 1
        k["seconds"] = round(k["seconds"] + c["seconds"], 3)
        k["max_s"] = max(k["max_s"], c["seconds"])
    carried = None
    if os.path.exists(os.path.join(out_dir, "carried.json")):
        with open(os.path.join(out_dir, "carried.json")) as f:
            carried = json.load(f)
    skipped: dict[str, list[str]] = {}
    for t in tests:
        if t["outcome"] == "skipped" and not t["stream"].startswith("warm"):
            skipped.setdefault(t["message"] or "no reason given", []).append(t["nodeid"])
    failed_steps = [s["step"] for s in steps if s.get("rc") not in (0, None)]
    bad_tests = [
        t
        for t in tests
        if t["outcome"] in ("failed", "error", "unknown") and not t["stream"].startswith("warm")
    ]
    status = "ok" if not failed_steps and not bad_tests and not unfinished and not problems else "failed"
    return {
        "status": status,
        "dry_run": os.environ.get("GAPFIX_GPU_CHECK_DRY_RUN") == "1",
        "device": env.get("device_name"),
        "env": env,
        "steps": steps,
        "failed_steps": failed_steps,
        "compilations": {
            "triton_compiled": len(compiled),
            "triton_compile_s": round(sum(c["seconds"] for c in compiled), 2),
            "triton_cache_hits": cache_hits,
            "listener": all(x for x in listener if x is not None) if listener else None,
            "by_kernel": by_kernel,
            "interpreted": interpreted_compilations(specializations),
        },
        "counts": counts,
        "carried": carried,
        "cannot_run": cannot_run(env),
        "skipped_by_reason": {reason: len(ids) for reason, ids in sorted(skipped.items())},
        "unfinished": unfinished,
        "problems": problems,
        "benchmarks": benchmarks,
        "tests": tests,
    }


def cmd_table(out_dir: str) -> int:
    table = build_table(out_dir)
    with open(os.path.join(out_dir, "gpu_results.json"), "w") as f:
        json.dump(table, f, indent=2, default=str)
    print(f"gpu_results.json: status {table['status']}, device {table['device']!r}")
    for s in table["steps"]:
        print(
            f"  step {s['step']:<12} rc={s['rc']} {s['seconds']}s (limit {s.get('limit_s')}s)"
            f"{' TIMED OUT' if s.get('timed_out') else ''}"
        )
    for kind, c in table["counts"].items():
        print(f"  {kind:<12} {c}")
    comp = table["compilations"]
    print(
        f"  triton: {comp['triton_compiled']} compiled in {comp['triton_compile_s']}s, "
        f"{comp['triton_cache_hits']} from the cache"
    )
    if comp["interpreted"]:
        print(
            f"  interpreter: the warm step launched {comp['interpreted']['warm_distinct']} distinct "
            f"specializations ({comp['interpreted']['warm_per_process_total']} summed over its processes): "
            "what a GPU warm step compiles"
        )
    for row in (table["carried"] or {}).get("packages", []):
        changed = row.get("changed") or {}
        print(f"  carried {row['requirement']:<28} -> {row['installed']} ({row['source'] or 'MISSING'})"
              + (f" instead of {row['pinned']}: {'; '.join(changed['because'])}" if changed else ""))
    for gap in table["cannot_run"]:
        print(f"  CANNOT RUN HERE: {gap['what']}: {gap['why']}")
    for reason, count in table["skipped_by_reason"].items():
        print(f"  skipped {count:>4} x {reason[:150]}")
    for u in table["unfinished"]:
        print(f"  UNFINISHED (hung or killed): {u['stream']}: {u['nodeid']}")
    for t in table["tests"]:
        if t["outcome"] in ("failed", "error", "unknown"):
            print(f"  {t['outcome'].upper()}: {t['stream']}: {t['nodeid']}")
    for b in table["benchmarks"]:
        print(f"  bench {b['op']:<36} {str(b['case'])[:40]:<40} median={b['time_s']} ratio={b['ratio']}")
    return 0


def main(argv: list[str]) -> int:
    commands = {
        "carry": (cmd_carry, 2),
        "env": (cmd_env, 1),
        "build-check": (cmd_build_check, 1),
        "limit": (cmd_limit, 3),
        "table": (cmd_table, 1),
    }
    if not argv or argv[0] not in commands or len(argv) - 1 != commands[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    fn, _ = commands[argv[0]]
    return fn(*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
