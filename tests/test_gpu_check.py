"""bench/gpu_check.sh without a GPU: its dry run end to end, the refusals of a build that
cannot serve the GPU (with the facts faked), the streaming plugin under a kill, the step
limits, and the `cuda` marker that selects the tests which run on the GPU."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
_spec = importlib.util.spec_from_file_location("gpu_check_tools", BENCH / "gpu_check_tools.py")
tools = importlib.util.module_from_spec(_spec)  # loaded by path: bench/ stays off sys.path
_spec.loader.exec_module(tools)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash script")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GAPFIX_GPU_CHECK_FAKE", "OUT")}
    env["PYTHONPATH"] = str(BENCH) + os.pathsep + env.get("PYTHONPATH", "")
    # the script's python3 is this interpreter, as in an activated virtualenv
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # a run that is not dry installs the carried wheels into python3's environment: never here
    env["GAPFIX_DEVICE_WHEELS"] = str(ROOT / "no-carried-wheels-in-tests")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _run_check(out, *args, **env):
    return subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), *args, str(out)],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


def _table(out):
    with open(out / "gpu_results.json") as f:
        return json.load(f)


# ---------------------------------------------------------------------------- the dry run


def test_dry_run_runs_every_step_and_writes_the_table(tmp_path):
    done = _run_check(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    table = _table(tmp_path)
    assert table["status"] == "ok" and table["dry_run"] is True
    assert "no CUDA device" in table["device"]
    steps = {s["step"]: s for s in table["steps"]}
    assert list(steps) == ["carry", "build_check", "build", "build_verify", "env", "collect", "warm", "tests",
                           "bench"]
    assert all(s["rc"] == 0 and not s["timed_out"] and 0 < s["limit_s"] for s in steps.values())
    assert table["failed_steps"] == [] and table["unfinished"] == [] and table["problems"] == []
    # the warm step ran the same tests under pytest-xdist, each once, each worker with a stream of
    # its own, and the benchmark once
    warm = sorted(t["nodeid"] for t in table["tests"] if t["stream"].startswith("warm_tests"))
    tests = sorted(t["nodeid"] for t in table["tests"] if t["stream"] == "tests")
    assert warm == tests and len(tests) == 3
    # a triton_device test: selected by -m cuda (its added marker) and run, not skipped, on CPU
    assert any(t["nodeid"].endswith("test_triton_empty") and t["outcome"] == "passed" for t in table["tests"])
    assert {t["stream"] for t in table["tests"] if t["stream"].startswith("warm_tests")} <= {
        "warm_tests_gw0",
        "warm_tests_gw1",
    }
    assert (tmp_path / "stream" / "warm_tests.jsonl").exists() and steps["warm"]["note"].startswith("tests: -n 2")
    assert table["counts"]["tests"] == {"passed": 3} and table["counts"]["warm"] == {"passed": 4}
    bench = [b for b in table["benchmarks"] if b["step"] == "bench"]
    assert len(bench) == 1 and bench[0]["time_s"] > 0 and bench[0]["rounds"] >= 1
    assert bench[0]["op"] == "build_rows_batched_vs_per_pair" and bench[0]["case"] == "path"
    assert bench[0]["ratio"] > 0 and bench[0]["extra"]["pairs"] == 64
    # the interpreter compiles nothing; the listener was installed and counted zero
    assert table["compilations"]["triton_compiled"] == 0 and table["compilations"]["listener"] is True
    log = (tmp_path / "gpu_check.log").read_text()
    assert "limit tests:" in log and "limit bench:" in log
    # the collect step checked the GPU run's whole selection, not the dry run's few tests
    assert "--collect-only -m cuda tests bench" in log
    collected = [line for line in log.splitlines() if "tests collected" in line or " selected" in line]
    assert collected and int(collected[-1].split("/")[0].split()[0]) > 100, collected
    # the carry step listed every carried requirement with what the environment has
    assert [row["requirement"] for row in table["carried"]["packages"]] == tools.read_pins(tools.REQUIREMENTS)


# ---------------------------------------------------------------------------- refusals at the build step


def test_refuses_a_toolkit_whose_major_version_differs_from_torchs(tmp_path):
    fake = {"cuda_available": True, "torch_cuda": "13.0", "toolkit": "12.8", "cuda_home": "/usr/local/cuda"}
    # not a dry run: it must stop before pip (were it not to, the 1 s build limit cuts pip short)
    done = _run_check(tmp_path, GAPFIX_GPU_CHECK_FAKE=json.dumps(fake), GAPFIX_CHECK_BUILD_LIMIT="1")
    assert done.returncode == 1
    table = _table(tmp_path)
    assert table["status"] == "failed" and [s["step"] for s in table["steps"]] == ["carry", "build_check"]
    assert table["carried"]["wheels"].endswith("no-carried-wheels-in-tests")  # nothing was installed
    log = (tmp_path / "gpu_check.log").read_text()
    assert "12.8 but torch was built with CUDA 13.0" in log and "STOPPED" in log


def test_refuses_an_extension_built_without_cuda_when_a_gpu_is_visible(tmp_path):
    fake = {
        "cuda_available": True,
        "torch_cuda": "13.0",
        "toolkit": "13.0",
        "cuda_home": "/usr/local/cuda",
        "build_info": "cxx=12.2.0 openmp=201511 cpu_features=avx2 cuda=no",
    }
    done = _run_check(tmp_path, "--dry-run", GAPFIX_GPU_CHECK_FAKE=json.dumps(fake))
    assert done.returncode == 1
    table = _table(tmp_path)
    assert [(s["step"], s["rc"]) for s in table["steps"] if s["step"] != "carry"] == [
        ("build_check", 0),
        ("build", 0),
        ("build_verify", 1),
    ]
    assert table["failed_steps"] == ["build_verify"] and table["tests"] == []
    assert "gapfix._C was built without CUDA" in (tmp_path / "gpu_check.log").read_text()


def _facts(cuda, torch_cuda=None, toolkit=None, home=None, info=None):
    return {
        "cuda_available": cuda,
        "torch_cuda": torch_cuda,
        "toolkit": toolkit,
        "cuda_home": home,
        "build_info": info,
    }


@pytest.mark.parametrize(
    "facts, phase, says",
    [
        (_facts(False), "before", None),
        (_facts(False, info="cuda=no"), "after", None),  # CPU machine: a CPU build is the right one
        (_facts(True, "13.0"), "before", "CUDA_HOME is unset"),
        (_facts(True, "13.0", home="/opt/cuda"), "before", "no working"),
        (_facts(True, "12.8", "13.0", "/c"), "before", "major versions"),
        (_facts(True, "13.0", "13.1", "/c"), "before", None),
        (_facts(True, None, "13.0", "/c"), "before", "without CUDA"),
        (_facts(True, "13.0", info="cxx=12 cuda=no"), "after", "built without CUDA"),
        (_facts(True, "13.0", info="cxx=12 cuda=yes"), "after", None),
    ],
)
def test_build_problems(facts, phase, says):
    problems = tools.build_problems(facts, phase)
    if says is None:
        assert problems == []
    else:
        assert len(problems) == 1 and says in problems[0]


# ---------------------------------------------------------------------------- streaming results


_SAMPLE = """
import time
import pytest

def test_passes():
    pass

def test_skips():
    pytest.skip("not here")

def test_fails():
    assert 1 == 2

def test_hangs():
    time.sleep(600)

def test_never_reached():
    pass
"""


def _pytest_with_stream(tmp_path, stream, *args):
    (tmp_path / "test_sample.py").write_text(_SAMPLE)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "stream_results",
            "--stream-jsonl",
            str(stream),
            "--stream-step",
            "demo",
            "test_sample.py",
            *args,
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as under `timeout`
    )


def _all_streams(folder):
    """Every stream in FOLDER (one process's, or an xdist controller's and its workers'), by name."""
    return {path.stem: tools.read_lines(str(path)) for path in sorted(folder.glob("*.jsonl"))}


@pytest.mark.parametrize("workers", [None, 2], ids=["one-process", "xdist"])
def test_a_killed_step_keeps_its_results_and_names_the_test_that_hung(tmp_path, workers):
    if workers:
        pytest.importorskip("xdist", reason="pytest-xdist is not installed (the `test` extra has it)")
    stream = tmp_path / "stream" / "demo.jsonl"
    proc = _pytest_with_stream(tmp_path, stream, *(["-n", str(workers)] if workers else []))
    finished = {"test_passes", "test_skips", "test_fails"}

    def state():
        summaries = {name: tools.summarize(events) for name, events in _all_streams(stream.parent).items()}
        done = {r["nodeid"].split("::")[1] for s in summaries.values() for r in s["results"]}
        return summaries, done, [n for s in summaries.values() for n in s["unfinished"]]

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the hanging test started, the others done or never started
        _, done, unfinished = state()
        if finished <= done and unfinished == ["test_sample.py::test_hangs"]:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # as `timeout` does: the whole process group, xdist's workers too
    proc.wait(timeout=60)
    summaries, done, unfinished = state()
    if workers:  # the controller's session lines, and one stream per worker with its tests
        assert sorted(summaries) == ["demo", "demo_gw0", "demo_gw1"]
        assert [e["event"] for e in tools.read_lines(str(stream))] == ["session", "selected"]
    else:
        assert list(summaries) == ["demo"]
    results = [r for s in summaries.values() for r in s["results"]]
    outcomes = {r["nodeid"].split("::")[1]: r["outcome"] for r in results}
    assert len(results) == len(outcomes)  # each test once
    # test_never_reached runs after the hang in one process; under xdist, if the other worker got it
    assert outcomes.pop("test_never_reached", "passed") == "passed"
    assert outcomes == {"test_passes": "passed", "test_skips": "skipped", "test_fails": "failed"}
    assert unfinished == ["test_sample.py::test_hangs"]
    assert not [name for name, s in summaries.items() if s["unfinished"] and s["ended"]]
    failed = next(r for r in results if r["outcome"] == "failed")
    assert "assert 1 == 2" in failed["message"]


def test_xdist_workers_stream_each_test_once_and_the_controller_the_session(tmp_path):
    pytest.importorskip("xdist", reason="pytest-xdist is not installed (the `test` extra has it)")
    stream = tmp_path / "stream" / "demo.jsonl"
    proc = _pytest_with_stream(tmp_path, stream, "-k", "not hangs", "-n", "2")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out  # test_fails
    streams = _all_streams(stream.parent)
    assert sorted(streams) == ["demo", "demo_gw0", "demo_gw1"]
    controller = tools.summarize(streams.pop("demo"))
    assert controller["ended"] and controller["selected"] == 4 and controller["results"] == []
    assert controller["compile_listener"] is None
    workers = [tools.summarize(events) for events in streams.values()]
    assert all(s["ended"] and s["selected"] == 4 for s in workers)  # each collects the whole selection
    ran = sorted(r["nodeid"] for s in workers for r in s["results"])
    assert ran == sorted(f"test_sample.py::{name}"
                         for name in ("test_passes", "test_skips", "test_fails", "test_never_reached"))
    assert {e.get("worker") for events in streams.values() for e in events if e["event"] == "session"} == {
        "gw0", "gw1"}


def test_tests_left_unfinished_before_run_last(tmp_path):
    last = tmp_path / "tests.last"
    last.write_text("test_sample.py::test_passes\n")
    stream = tmp_path / "moved.jsonl"
    proc = _pytest_with_stream(tmp_path, stream, "-k", "not hangs", "--stream-last", str(last))
    proc.communicate(timeout=300)
    events = tools.read_lines(str(stream))
    order = [e["nodeid"].split("::")[1] for e in events if e["event"] == "result"]
    assert order == ["test_skips", "test_fails", "test_never_reached", "test_passes"]
    assert [e["nodeids"] for e in events if e["event"] == "moved_last"] == [["test_sample.py::test_passes"]]


# ---------------------------------------------------------------------------- step limits


def _write_stream(path, events):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def test_limits_are_sized_from_the_warm_steps_measurements(tmp_path):
    def result(nodeid, duration, compiles, compile_s, hits=0, graphs=0):
        return {
            "event": "result",
            "nodeid": nodeid,
            "outcome": "passed",
            "duration": duration,
            "compiles": compiles,
            "compile_s": compile_s,
            "cache_hits": hits,
            "inductor_graphs": graphs,
        }

    # an xdist session: the controller's stream, and each worker's (every worker collects all 5)
    _write_stream(
        tmp_path / "stream" / "warm_tests.jsonl",
        [{"event": "session", "compile_listener": None, "workers": 2}, {"event": "selected", "count": 5}],
    )
    _write_stream(
        tmp_path / "stream" / "warm_tests_gw0.jsonl",
        [
            {"event": "session", "compile_listener": True, "worker": "gw0"},
            {"event": "selected", "count": 5},  # a, b, c (here), d (gw1) and one never started
            {"event": "start", "nodeid": "a"},
            result("a", 30.0, 10, 28.0),  # 2 s of work, 10 kernels compiled
            {"event": "start", "nodeid": "b"},
            result("b", 5.0, 2, 2.0, hits=4),  # 3 s, 6 kernel loads
            {"event": "start", "nodeid": "c"},  # killed while compiling
        ],
    )
    _write_stream(
        tmp_path / "stream" / "warm_tests_gw1.jsonl",
        [
            {"event": "session", "compile_listener": True, "worker": "gw1"},
            {"event": "selected", "count": 5},
            {"event": "start", "nodeid": "d"},
            result("d", 1.0, 0, 0.0, graphs=2),
            {"event": "end", "exitstatus": 0, "selected": 5},
        ],
    )
    # the session was killed at its limit: its wall time (500 s, a hang) says nothing about start-up
    (tmp_path / "stream" / "warm_tests.wall").write_text('{"seconds": 500, "rc": 124}')
    limit, why = tools.size_limit(str(tmp_path), "tests", cap=1000)
    per_unknown = max(tools.UNKNOWN_ITEM_S, (28.0 + 2.0) / 2)
    run = 1.5 * (2.0 + 3.0 + 1.0) + tools.LOAD_S * 16 + tools.GRAPH_S * 2 + 2 * per_unknown
    assert limit == int(-(-(tools.STARTUP_S + run) // 1)) and "2 tests not finished warm" in why
    # a session that ended by itself: its wall time less its busiest worker's test time (35 s)
    for name in ("warm_tests", "warm_tests_gw0"):
        with open(tmp_path / "stream" / f"{name}.jsonl", "a") as f:
            f.write(json.dumps({"event": "end", "exitstatus": 1, "selected": 5}) + "\n")
    (tmp_path / "stream" / "warm_tests.wall").write_text('{"seconds": 100, "rc": 1}')
    assert tools.size_limit(str(tmp_path), "tests", cap=1000)[0] == int(-(-(65 + run) // 1))
    assert tools.size_limit(str(tmp_path), "tests", cap=40) == (
        40,
        tools.size_limit(str(tmp_path), "tests", 40)[1],
    )
    assert "SHORT" in tools.size_limit(str(tmp_path), "tests", cap=40)[1]
    # the CLI form also lists the test the warm step left unfinished, for --stream-last
    assert tools.main(["limit", str(tmp_path), "tests", "1000"]) == 0
    assert (tmp_path / "stream" / "tests.last").read_text() == "c\n"
    # nothing measured (the warm step never ran): the whole cap
    assert tools.size_limit(str(tmp_path), "bench", cap=77)[0] == 77


# ---------------------------------------------------------------------------- the cuda marker


def test_tests_using_triton_device_are_selected_by_the_cuda_marker():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "cuda",
            "tests/test_cross_entropy.py",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    selected = {line.split("::")[1].split("[")[0] for line in done.stdout.splitlines() if "::" in line}
    for name in (
        "test_linear_triton_all_ignored",
        "test_linear_triton_gradient_filter",
        "test_linear_triton_half_precision_weight_accumulator",
        "test_linear_triton",  # triton_device
        "test_linear_triton_cuda",
        "test_cuda_64bit_offsets",
    ):  # marked cuda
        assert name in selected, name
    assert "test_linear_cpu_fp32" not in selected and "test_kernels_compile_for_sm90" not in selected


def test_table_merges_steps_streams_and_names_what_never_finished(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"device_name": "NVIDIA H200"}))
    (tmp_path / "steps.jsonl").write_text(
        json.dumps({"step": "tests", "rc": 124, "seconds": 60, "limit_s": 60, "timed_out": True}) + "\n"
    )
    bench = {
        "median": 0.5,
        "min": 0.4,
        "rounds": 3,
        "param": "cce-N8192",
        "extra_info": {"speedup": 1.5, "throughput": 9e4, "throughput_unit": "tokens/s", "tflops": 3.0},
    }
    _write_stream(
        tmp_path / "stream" / "warm_tests_gw0.jsonl",
        [
            {"event": "compile", "nodeid": "t.py::a", "kernel": "k_fwd", "cache_hit": False, "seconds": 2.5},
            {"event": "compile", "nodeid": "t.py::a", "kernel": "k_fwd", "cache_hit": True, "seconds": 0.01},
            {"event": "start", "nodeid": "t.py::a"},
            {
                "event": "result",
                "nodeid": "t.py::a",
                "outcome": "failed",
                "duration": 3.0,
            },  # warm: not counted
        ],
    )
    _write_stream(
        tmp_path / "stream" / "tests.jsonl",
        [
            {"event": "start", "nodeid": "t.py::a"},
            {"event": "result", "nodeid": "t.py::a", "outcome": "passed", "duration": 0.2},
            {"event": "start", "nodeid": "t.py::hangs"},
        ],
    )
    _write_stream(
        tmp_path / "stream" / "bench.jsonl",
        [
            {"event": "start", "nodeid": "bench/test_bench_x.py::test_bench_ce[cce-N8192]"},
            {
                "event": "result",
                "nodeid": "bench/test_bench_x.py::test_bench_ce[cce-N8192]",
                "outcome": "passed",
                "duration": 9.0,
                "benchmark": bench,
            },
        ],
    )
    with open(tmp_path / "stream" / "bench.jsonl", "a") as f:
        f.write('{"event": "sta')  # the line a kill cut short
    table = tools.build_table(str(tmp_path))
    assert table["status"] == "failed" and table["device"] == "NVIDIA H200"
    assert table["failed_steps"] == ["tests"] and table["steps"][0]["timed_out"] is True
    assert table["unfinished"] == [{"stream": "tests", "nodeid": "t.py::hangs"}]
    assert table["problems"] == ["bench: unreadable line 3"]
    assert table["counts"] == {"warm": {"failed": 1}, "tests": {"passed": 1}, "bench": {"passed": 1}}
    assert table["compilations"]["triton_compiled"] == 1 and table["compilations"]["triton_cache_hits"] == 1
    assert table["compilations"]["by_kernel"] == {"k_fwd": {"compiled": 1, "seconds": 2.5, "max_s": 2.5}}
    (row,) = table["benchmarks"]
    assert (row["op"], row["case"], row["time_s"], row["rounds"]) == ("ce", "cce-N8192", 0.5, 3)
    assert (row["ratio"], row["throughput"], row["throughput_unit"]) == (1.5, 9e4, "tokens/s")
    assert row["extra"] == {"tflops": 3.0}


# ---------------------------------------------------------------------------- kernel report


def test_kernel_report_reads_registers_and_spills_from_the_sm90_lowering(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}  # a real lowering
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "kernel_report.py"), "--ops", "rac_labels", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0 and ("ptxas" in done.stderr or "GPUTarget" in done.stderr):
        pytest.skip(f"this Triton cannot lower for sm_90 here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == ["hard K<=1", "soft K<=4", "soft K<=8"]
    for row in rows:
        assert 0 < row["regs"] <= 255 and row["spill_store_bytes"] >= 0 and row["num_warps"] == 4
    assert "rac_labels_kernel" in done.stdout and "regs" in done.stdout


# ---------------------------------------------------------------------------- what the image lacks


def test_the_script_calls_python3_never_a_bare_python():
    """The device image documents `python3`; a bare `python` may not exist there."""
    script = (BENCH / "gpu_check.sh").read_text()
    code = [line.split("#")[0] for line in script.splitlines()]
    assert not [line for line in code if re.search(r"(^|[\s(\"])python(\s|$)", line)]
    assert "python3 -m pytest" in script


def test_every_requirement_list_is_pinned_and_a_loose_line_is_refused(tmp_path):
    for name in ("device-requirements.txt", "device-image.txt", "device-fallback-wheels.txt"):
        pins = tools.read_pins(str(BENCH / name))
        assert pins and all("==" in pin for pin in pins)
    names = {pin.split("==")[0] for pin in tools.read_pins(str(BENCH / "device-requirements.txt"))}
    assert {"datasets", "trl", "liger-kernel", "cut-cross-entropy", "rapidfuzz", "edlib"} <= names
    loose = tmp_path / "loose.txt"
    loose.write_text("# a comment\ndatasets==5.2.0\ntrl>=1.16\n")
    with pytest.raises(ValueError, match=r"loose.txt:3: expected one name==version pin, not 'trl>=1.16'"):
        tools.read_pins(str(loose))


def test_carry_records_what_is_there_and_what_is_missing(tmp_path, monkeypatch, capsys):
    from importlib import metadata

    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"pytest=={metadata.version('pytest')}\nno-such-package-gapfix==1.0\n")
    monkeypatch.setattr(tools, "REQUIREMENTS", str(requirements))
    monkeypatch.setenv("GAPFIX_DEVICE_WHEELS", str(tmp_path / "no-folder"))  # nothing to choose from
    # "-": install nothing (the dry run): what is missing is listed, not failed
    assert tools.cmd_carry("-", str(tmp_path)) == 0
    record = json.loads((tmp_path / "carried.json").read_text())
    rows = {row["requirement"].split("==")[0]: row for row in record["packages"]}
    assert rows["pytest"]["source"] == "image" and rows["pytest"]["matches_pin"] is True
    assert rows["no-such-package-gapfix"]["installed"] is None and rows["no-such-package-gapfix"]["source"] is None
    assert "not installed here: no-such-package-gapfix==1.0" in capsys.readouterr().out
    # a folder that lacks the wheel: pip refuses (no index is asked), one requirement at a time
    empty = tmp_path / "wheels"
    empty.mkdir()
    assert tools.cmd_carry(str(empty), str(tmp_path)) == 1
    assert "CARRY FAILED: not installed: no-such-package-gapfix==1.0" in capsys.readouterr().err
    record = json.loads((tmp_path / "carried.json").read_text())
    refused = {row["requirement"]: row["refused"] for row in record["packages"]}
    assert refused["no-such-package-gapfix==1.0"] and "no-such-package-gapfix" in refused["no-such-package-gapfix==1.0"]
    assert refused[f"pytest=={metadata.version('pytest')}"] is None  # already satisfied: pip accepts it
    # no folder at all: said, not an exception
    assert tools.cmd_carry(str(tmp_path / "absent"), str(tmp_path)) == 1
    assert "no carried wheels at" in capsys.readouterr().err


def _fake_wheel(folder, name, version, requires):
    dist = f"{name.replace('-', '_')}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {line}\n" for line in requires)
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{dist}.dist-info/METADATA", metadata)


def _carried_folder(folder):
    """The carried folder's datasets, trl and fsspec wheels, with their real requirements."""
    folder.mkdir(exist_ok=True)
    _fake_wheel(folder, "datasets", "5.2.0", ["pyarrow>=24.0.0", "dill<0.4.2,>=0.3.0", "fsspec<=2026.9.0,>=2023.1.0",
                                               "huggingface-hub<3.0,>=1.31.0", 'pytest-xdist; extra == "tests"'])
    _fake_wheel(folder, "datasets", "5.0.0", ["pyarrow>=21.0.0", "dill<0.4.2,>=0.3.0",
                                               "fsspec[http]<=2026.4.0,>=2023.1.0", "huggingface-hub<2.0,>=0.25.0"])
    _fake_wheel(folder, "dill", "0.4.1", [])
    _fake_wheel(folder, "trl", "1.16.0", ["datasets>=4.7.0", "pyarrow>=21.0.0", "huggingface_hub>=0.34.0"])
    for version in ("2026.9.0", "2026.4.0"):
        _fake_wheel(folder, "fsspec", version, [])
    return ["datasets==5.2.0", "dill==0.4.1", "trl==1.16.0"], ["datasets==5.0.0", "fsspec==2026.9.0",
                                                               "fsspec==2026.4.0"]


@pytest.mark.parametrize(
    "pyarrow, hub, datasets, unmet",
    [
        ("26.0.1", "1.33.0", "datasets==5.2.0", {}),
        ("24.0.0", "1.33.0", "datasets==5.2.0", {}),
        ("22.0.0", "1.33.0", "datasets==5.0.0", {"datasets==5.2.0": "datasets==5.0.0"}),
        # no carried datasets fits: the pin stays (pip refuses it, the table says so)
        ("22.0.0", "2.1.0", "datasets==5.2.0", {"datasets==5.2.0": None}),
        ("20.0.0", "1.33.0", "datasets==5.2.0", {"datasets==5.2.0": None, "trl==1.16.0": None}),
        (None, "1.33.0", "datasets==5.2.0", {"datasets==5.2.0": None, "trl==1.16.0": None}),
    ],
)
def test_carry_chooses_the_datasets_the_images_pyarrow_can_take(tmp_path, pyarrow, hub, datasets, unmet):
    pins, fallbacks = _carried_folder(tmp_path)
    image = {"pyarrow": pyarrow, "huggingface-hub": hub}
    chosen, changes = tools.choose_pins(pins, fallbacks, str(tmp_path), image.get)
    assert chosen == [datasets, "dill==0.4.1", "trl==1.16.0"]
    assert {pin: change["instead"] for pin, change in changes.items()} == unmet
    if "datasets==5.2.0" in changes:
        assert f"pyarrow>=24.0.0 (the image has {pyarrow or 'none'})" in changes["datasets==5.2.0"]["because"]


def test_the_dry_run_carry_records_the_choice_from_the_carried_folder(tmp_path, monkeypatch, capsys):
    pins, fallbacks = _carried_folder(tmp_path / "wheels")
    (tmp_path / "requirements.txt").write_text("\n".join(pins) + "\n")
    (tmp_path / "fallbacks.txt").write_text("\n".join(fallbacks) + "\n")
    monkeypatch.setattr(tools, "REQUIREMENTS", str(tmp_path / "requirements.txt"))
    monkeypatch.setattr(tools, "FALLBACKS", str(tmp_path / "fallbacks.txt"))
    monkeypatch.setattr(tools, "_image_version", {"pyarrow": "23.0.1", "huggingface-hub": "1.33.0"}.get)
    monkeypatch.setenv("GAPFIX_DEVICE_WHEELS", str(tmp_path / "wheels"))
    assert tools.cmd_carry("-", str(tmp_path)) == 0  # "-": chooses, installs nothing
    record = json.loads((tmp_path / "carried.json").read_text())
    assert record["chosen_from"] == str(tmp_path / "wheels")
    row = record["packages"][0]
    assert (row["requirement"], row["pinned"], row["changed"]["instead"]) == (
        "datasets==5.0.0", "datasets==5.2.0", "datasets==5.0.0")
    assert "installing datasets==5.0.0 instead" in capsys.readouterr().out
    assert all(r["changed"] is None for r in record["packages"][1:])


def test_the_table_says_what_cannot_run_and_counts_skips_by_reason(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"device_name": "NVIDIA H100", "vllm": None}))
    (tmp_path / "carried.json").write_text(json.dumps({"packages": [
        {"requirement": "datasets==5.2.0", "installed": "5.2.0", "source": "carried"}]}))
    _write_stream(tmp_path / "stream" / "tests.jsonl", [
        {"event": "result", "nodeid": "t.py::a", "outcome": "skipped", "message": "vllm is not installed"},
        {"event": "result", "nodeid": "t.py::b", "outcome": "skipped", "message": "vllm is not installed"},
        {"event": "result", "nodeid": "t.py::c", "outcome": "passed"},
    ])
    table = tools.build_table(str(tmp_path))
    assert [gap["what"].split(" (")[0] for gap in table["cannot_run"]] == [
        "vLLM generation on the GPU and the colocated engine"]
    assert "64 MiB" in table["cannot_run"][0]["why"]
    assert table["skipped_by_reason"] == {"vllm is not installed": 2}
    assert table["carried"]["packages"][0]["source"] == "carried"
    (tmp_path / "env.json").write_text(json.dumps({"device_name": "NVIDIA H100", "vllm": "0.11.0"}))
    assert tools.build_table(str(tmp_path))["cannot_run"] == []


_KERNEL_SAMPLE = """
import torch
import triton
import triton.language as tl


@triton.jit
def add_one(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)


def test_launches():
    for dtype in (torch.float32, torch.float32, torch.int32):  # the second float32 launch is cached
        x = torch.zeros(40, dtype=dtype)
        add_one[(1,)](x, 40, BLOCK=64)
        assert int(x.sum()) == 40
    add_one[(1,)](torch.zeros(8), 8, BLOCK=8)  # another constexpr: another compilation
"""


def test_the_interpreter_counts_the_specializations_a_gpu_would_compile(tmp_path):
    pytest.importorskip("triton")
    (tmp_path / "test_kernel_sample.py").write_text(_KERNEL_SAMPLE)
    stream = tmp_path / "warm_tests_gw0.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "stream_results",
         "--stream-jsonl", str(stream), "--stream-step", "warm", "test_kernel_sample.py"],
        cwd=tmp_path, env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    events = tools.read_lines(str(stream))
    specializations = [e for e in events if e["event"] == "specialization"]
    assert [e["kernel"] for e in specializations] == ["add_one"] * 3
    assert all(e["nodeid"].endswith("test_launches") for e in specializations)
    (tmp_path / "stream").mkdir()
    stream.rename(tmp_path / "stream" / stream.name)
    counted = tools.build_table(str(tmp_path))["compilations"]["interpreted"]
    assert counted == {"warm_per_process_total": 3, "warm_distinct": 3, "by_kernel": {"add_one": 3}}
