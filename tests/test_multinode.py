"""Two machines for real: `torchrun --nnodes 2` with c10d rendezvous between two network
namespaces joined by a veth pair (one process per "host"), training SFT and BASH over gloo,
gives the losses of one process on the same global batch.

The namespaces are made by the test and need root and iproute2; elsewhere the test is
skipped with the reason.
"""
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

pytest.importorskip("transformers")
WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
PORT = 29617


def _sh(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two network namespaces, 10.231.0.1 and 10.231.0.2, linked by a veth pair."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip)")
    tag = uuid.uuid4().hex[:6]
    hosts = [f"gfA{tag}", f"gfB{tag}"]
    links = [f"gfa{tag}", f"gfb{tag}"]
    made = []
    try:
        for host in hosts:
            done = _sh("ip", "netns", "add", host)
            if done.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {done.stderr.strip()}")
            made.append(host)
        steps = [("ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1])]
        for i, (host, link) in enumerate(zip(hosts, links)):
            steps += [("ip", "link", "set", link, "netns", host),
                      ("ip", "-n", host, "addr", "add", f"10.231.0.{i + 1}/24", "dev", link),
                      ("ip", "-n", host, "link", "set", link, "up"),
                      ("ip", "-n", host, "link", "set", "lo", "up")]
        for step in steps:
            done = _sh(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot set up the veth pair ({' '.join(step)}): {done.stderr.strip()}")
        yield list(zip(hosts, links, ("10.231.0.1", "10.231.0.2")))
    finally:
        for host in made:
            _sh("ip", "netns", "del", host)  # deletes the veth pair with it


def _single(tmp_path, method):
    out = tmp_path / f"single-{method}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GAPFIX_WORKER_METHOD": method}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               WORKER, str(out), "ddp"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _two_nodes(tmp_path, hosts, method):
    out = tmp_path / f"nodes-{method}.json"
    procs = []
    for node_rank, (host, link, _) in enumerate(hosts):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GAPFIX_WORKER_METHOD": method,
               "GLOO_SOCKET_IFNAME": link}  # gloo talks over the veth, not the namespace's lo
        command = ["ip", "netns", "exec", host, sys.executable, "-m", "torch.distributed.run",
                   "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint={hosts[0][2]}:{PORT}", "--rdzv_id=gapfix-test",
                   # the hosts share a hostname, so torchrun cannot tell which one serves the store
                   f"--rdzv_conf=is_host={int(node_rank == 0)},join_timeout=120",
                   f"--local_addr={hosts[node_rank][2]}", WORKER, str(out), "ddp"]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    errors = []
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        if proc.returncode != 0:
            errors.append(stderr[-3000:])
    assert not errors, "\n---\n".join(errors)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "bash"])
def test_two_hosts_match_one_process(tmp_path, two_hosts, method):
    single = _single(tmp_path, method)
    nodes = _two_nodes(tmp_path, two_hosts, method)
    assert len(single) == len(nodes) == 3
    for a, b in zip(single, nodes):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (single, nodes)
    assert single[-1] < single[0]  # the steps trained
