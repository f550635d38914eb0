"""pytest plugin: one JSON line per event, written and flushed as it happens.

Loaded by bench/gpu_check.sh with `-p stream_results` (bench/ on PYTHONPATH):

    python3 -m pytest tests -m cuda -p stream_results --stream-jsonl OUT/stream/tests.jsonl \\
        [--stream-step tests] [-n 6]

A step killed by its time limit (SIGKILL included) leaves every line written
before it, so the JSON lines file holds each finished test's outcome and the
test that was running when the step died (a "start" line without its
"result"). Lines (all with "t", seconds since the epoch, and "step"):

  {"event": "session", "pid", "worker", "workers", "triton", "compile_listener"}  at start
  {"event": "selected", "count"}                                       after collection
  {"event": "moved_last", "nodeids"}                                   with --stream-last
  {"event": "start", "nodeid"}                                         a test begins
  {"event": "compile", "nodeid", "kernel", "cache_hit", "seconds"}     a Triton compilation
  {"event": "specialization", "nodeid", "kernel", "key"}   under TRITON_INTERPRET=1: a launch
                                   whose specialization this process had not launched before
  {"event": "result", "nodeid", "outcome", "duration", "phase", "message",
   "compiles", "compile_s", "cache_hits", "inductor_graphs", "benchmark"}   a test ends
  {"event": "end", "exitstatus", "selected"}                           the session ends

Compilations are counted by Triton's compilation listener (triton.knobs.compilation.listener):
cache_hit is false when the kernel was really compiled (seconds = its compile time), true when
it came from the on-disk cache. torch.compile graphs compiled by inductor are counted from
torch._dynamo's counters (inductor compiles their Triton kernels in worker processes, which
this listener does not see). Under the interpreter nothing compiles; the plugin then records each
launch's specialization key instead (the kernel, each tensor's dtype and 16-byte alignment, each
integer's value class, the constexpr values, num_warps/num_stages: what Triton's JIT keys its
cache on), so a dry run counts the compilations the same tests would cost on a GPU.
"benchmark" holds pytest-benchmark's statistics and extra_info when the test used the
`benchmark` fixture.

Under pytest-xdist (`-n N`) the tests run in worker processes, and each worker writes the lines
above for its own tests to a file of its own: OUT/stream/tests.jsonl becomes tests_gw0.jsonl,
tests_gw1.jsonl, ... (the worker's PYTEST_XDIST_WORKER id). Each of them holds its tests,
its compilations and its unfinished test, as a single process's file does. The controller writes
OUT/stream/tests.jsonl itself with the session lines only ("session" with "workers", "selected"
when the first worker has collected, "end"), never a test's: those are the workers'.

--stream-last FILE runs the node ids listed in FILE (those an earlier step left unfinished)
after all others (under xdist, in the order the workers are handed the tests).
"""

from __future__ import annotations

import json
import os
import time

import pytest

_MESSAGE_CHARS = 2000


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stream_results", "JSON lines of results, written as they happen")
    group.addoption("--stream-jsonl", default=None, help="append one JSON line per event to this file")
    group.addoption("--stream-step", default="", help="step name written into every line")
    group.addoption(
        "--stream-last",
        default=None,
        help="a file of node ids (one a line) to run after every other selected test",
    )


def worker_path(path: str, worker: str) -> str:
    """The file of one xdist worker: OUT/stream/tests.jsonl -> OUT/stream/tests_gw0.jsonl."""
    stem, ext = os.path.splitext(path)
    return f"{stem}_{worker}{ext or '.jsonl'}"


class _Stream:
    """One JSON lines file, open for the whole session (closed in pytest_unconfigure),
    line-buffered and fsync'ed per event."""

    def __init__(self, config: pytest.Config, path: str) -> None:
        self.config = config
        self.step = config.getoption("--stream-step")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a", buffering=1)  # noqa: SIM115

    def write(self, event: str, **fields) -> None:
        line = {"event": event, "t": round(time.time(), 3), "step": self.step, **fields}
        self.file.write(json.dumps(line, default=str) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())  # survives the SIGKILL of `timeout --kill-after`

    @staticmethod
    def _triton_version() -> str | None:
        try:
            import triton
        except ImportError:
            return None
        return triton.__version__


class XdistController(_Stream):
    """The controller of a pytest-xdist session: it runs no test, so it writes the session's
    lines only; its workers write the tests' (StreamResults, each to worker_path)."""

    def __init__(self, config: pytest.Config, path: str) -> None:
        super().__init__(config, path)
        self.selected: int | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.write("session", pid=os.getpid(), worker=None, workers=self.config.getoption("numprocesses"),
                   triton=self._triton_version(), compile_listener=None)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        if self.selected is None:  # every worker collects the same selection
            self.selected = len(ids)
            self.write("selected", count=self.selected)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        self.write("end", exitstatus=int(exitstatus), selected=self.selected)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.file.close()


class StreamResults(_Stream):
    """The process that runs the tests: pytest without xdist, or one xdist worker."""

    def __init__(self, config: pytest.Config, path: str, worker: str | None = None) -> None:
        super().__init__(config, path)
        self.worker = worker
        self.current: str | None = None
        self.compiles: list[dict] = []
        self.listener_error: str | None = None
        self.selected = 0
        self._previous_listener = None
        self._outcome: dict | None = None
        self._benchmark: dict | None = None
        self._duration = 0.0
        self._graphs_before = 0
        self.has_listener = self._install_listener()
        self.specializations: set = set()
        self._interpreter_patch = self._install_specialization_counter()

    # ---------------------------------------------------------------- compilations

    def _install_listener(self) -> bool:
        try:
            from triton import knobs
        except ImportError:
            return False
        if not hasattr(knobs, "compilation") or not hasattr(knobs.compilation, "listener"):
            return False
        self._knobs = knobs
        self._previous_listener = knobs.compilation.listener
        knobs.compilation.listener = self._on_compile
        return True

    def _on_compile(self, *, src, metadata, metadata_group, times, cache_hit) -> None:
        fn = getattr(src, "fn", None)
        name = getattr(fn, "__name__", None) or getattr(src, "name", "?")
        seconds = getattr(times, "total", 0) / 1e6  # CompileTimes are in microseconds
        record = {
            "nodeid": self.current,
            "kernel": name,
            "cache_hit": bool(cache_hit),
            "seconds": round(seconds, 4),
        }
        self.compiles.append(record)
        self.write("compile", **record)
        if self._previous_listener is not None:
            self._previous_listener(
                src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit
            )

    def _install_specialization_counter(self):
        if os.environ.get("TRITON_INTERPRET") != "1":
            return None
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:
            return None
        original = InterpretedFunction.run
        plugin = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            plugin._on_interpreted_launch(fn_self, args, kwargs)
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        return InterpretedFunction, original

    @staticmethod
    def _arg_class(value):
        if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
            return (str(value.dtype), value.data_ptr() % 16 == 0)
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int):
            return ("int", value == 1, value % 16 == 0, -(2**31) <= value < 2**31)
        if isinstance(value, float):
            return "float"
        if isinstance(value, tuple):
            return tuple(StreamResults._arg_class(v) for v in value)
        return repr(value)[:80]

    def _on_interpreted_launch(self, fn_self, args, kwargs) -> None:
        fn = getattr(fn_self, "fn", None)
        name = getattr(fn, "__name__", "?")
        import inspect

        try:
            annotations = inspect.get_annotations(fn) if fn is not None else {}
        except TypeError:
            annotations = {}
        names = list(getattr(fn_self, "arg_names", []))
        bound = dict(zip(names, args))
        bound.update(kwargs)
        key = [getattr(fn, "__module__", ""), name]
        for arg_name in sorted(bound):
            value = bound[arg_name]
            constexpr = "constexpr" in str(annotations.get(arg_name, ""))
            if constexpr or arg_name in ("num_warps", "num_stages", "num_ctas"):
                key.append((arg_name, repr(value)[:80]))
            else:
                key.append((arg_name, self._arg_class(value)))
        key_text = repr(tuple(key))
        if key_text in self.specializations:
            return
        self.specializations.add(key_text)
        self.write("specialization", nodeid=self.current, kernel=name, key=key_text[:2000])

    @staticmethod
    def _inductor_graphs() -> int | None:
        import sys

        if "torch._dynamo" not in sys.modules:  # nothing compiled: do not import dynamo for it
            return 0
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    # ---------------------------------------------------------------- pytest hooks

    @pytest.hookimpl(trylast=True)  # after `-m` and `-k` have deselected
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        last_path = config.getoption("--stream-last")
        if last_path and os.path.exists(last_path):
            # tests that did not finish before (a hang, or a kill at a limit) go last, so that
            # a second hang costs only the time left after every other test has finished
            with open(last_path) as f:
                last = {line.strip() for line in f if line.strip()}
            moved = [item for item in items if item.nodeid in last]
            if moved:
                items[:] = [item for item in items if item.nodeid not in last] + moved
                self.write("moved_last", nodeids=[item.nodeid for item in moved])
        self.selected = len(items)
        self.write("selected", count=self.selected)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.write("session", pid=os.getpid(), worker=self.worker, workers=None, triton=self._triton_version(),
                   compile_listener=self.has_listener)

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        self.current = nodeid
        self.compiles = []
        self._graphs_before = self._inductor_graphs()
        self._outcome = None
        self.write("start", nodeid=nodeid)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        if call.when == "call":
            fixture = getattr(item, "funcargs", {}).get("benchmark")
            if fixture is not None:
                self._benchmark = self._benchmark_fields(fixture)
        return report

    @staticmethod
    def _benchmark_fields(fixture) -> dict:
        fields = {
            "extra_info": dict(getattr(fixture, "extra_info", {}) or {}),
            "group": getattr(fixture, "group", None),
            "param": getattr(fixture, "param", None),
        }
        stats = getattr(getattr(fixture, "stats", None), "stats", None)
        if stats is not None:
            for key in ("min", "median", "mean", "max", "stddev", "rounds"):
                fields[key] = getattr(stats, key, None)
        return fields

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # one outcome per test: the first failure or skip, else the call's pass; teardown errors count
        first = self._outcome is None and (report.when == "call" or report.outcome != "passed")
        worse = (
            self._outcome is not None and report.outcome != "passed" and self._outcome["outcome"] == "passed"
        )
        if first or worse:
            message = None
            if report.outcome != "passed":
                if report.skipped and isinstance(report.longrepr, tuple):
                    message = str(report.longrepr[2])
                else:
                    message = str(report.longreprtext)[-_MESSAGE_CHARS:]
            outcome = "error" if report.when != "call" and report.failed else report.outcome
            self._outcome = {"outcome": outcome, "phase": report.when, "message": message}
        if report.when == "call":
            self._duration = report.duration

    def pytest_runtest_logfinish(self, nodeid: str, location) -> None:
        outcome = self._outcome or {"outcome": "unknown", "phase": None, "message": None}
        misses = [c for c in self.compiles if not c["cache_hit"]]
        graphs_after = self._inductor_graphs()
        fields = dict(
            nodeid=nodeid,
            duration=round(self._duration, 4),
            **outcome,
            compiles=len(misses),
            compile_s=round(sum(c["seconds"] for c in misses), 3),
            cache_hits=len(self.compiles) - len(misses),
            inductor_graphs=graphs_after - self._graphs_before,
        )
        if self._benchmark is not None:
            fields["benchmark"] = self._benchmark
        self.write("result", **fields)
        self.current, self._benchmark, self._duration, self._outcome = None, None, 0.0, None

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        self.write("end", exitstatus=int(exitstatus), selected=self.selected)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.has_listener:
            self._knobs.compilation.listener = self._previous_listener
        if self._interpreter_patch is not None:
            interpreted_function, original = self._interpreter_patch
            interpreted_function.run = original
        self.file.close()


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--stream-jsonl")
    if not path:
        return
    worker = getattr(config, "workerinput", {}).get("workerid") or os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        plugin = StreamResults(config, worker_path(path, worker), worker)
    elif config.getoption("dist", "no") != "no":  # an xdist controller (-n N with N >= 1)
        plugin = XdistController(config, path)
    else:
        plugin = StreamResults(config, path)
    config.pluginmanager.register(plugin, "stream_results_instance")
