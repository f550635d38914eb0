"""The CUDA alignment path without a GPU: it compiles (nvcc for sm_90, the
binding against torch's headers), and its kernels, run on the CPU through a
thread-per-GPU-thread stand-in of the runtime (tests/cuda_emulation.h), give
the same outputs as the CPU kernel. On a GPU, tests/test_align.py's `cuda`
tests compare the real thing."""
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import gapfix

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "csrc" / "cuda" / "align_cuda.cu"
BINDING = ROOT / "csrc" / "cuda" / "align_cuda_binding.cpp"
TESTS = Path(__file__).resolve().parent


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (shutil.which("nvcc"), os.path.join(cuda_home, "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


@pytest.mark.slow
def test_nvcc_compiles_align_kernel_for_sm90(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    result = subprocess.run(
        [nvcc, "-c", str(KERNEL), "-I", str(ROOT / "csrc"), "-std=c++17", "-O3", "-arch=sm_90",
         "-o", str(tmp_path / "align_cuda.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower()


def test_binding_compiles_against_torch_headers(tmp_path):
    """Syntax-checks the CUDA binding (a CPU build of torch ships the c10/cuda
    headers but not its generated cmake-macros header, stubbed here)."""
    from torch.utils.cpp_extension import include_paths

    gxx = shutil.which("g++")
    cuda_include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    if gxx is None or not (cuda_include / "cuda_runtime.h").exists():
        pytest.skip("g++ or the CUDA headers are missing")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path}", f"-I{cuda_include}", f"-I{ROOT / 'csrc'}"]
    result = subprocess.run([gxx, "-std=c++17", "-fsyntax-only", "-w", *includes, str(BINDING)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


# ---------------------------------------------------------------------------
# The kernels on the CPU


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    work = tmp_path_factory.mktemp("cuda_emulation")
    source, launches = re.subn(
        r"([A-Za-z_]\w*(?:<\w+>)?)<<<(.*?),\s*([^,<>]*?),\s*0,\s*stream>>>\(",
        r"emu_launch(\1, \2, \3, ",
        KERNEL.read_text(),
    )
    assert launches == 5, "expected the 5 launches of align_cuda.cu"
    (work / "align_cuda_emulated.inc").write_text(source)
    (work / "cuda_runtime.h").write_text('#pragma once\n#include "cuda_emulation.h"\n')
    binary = work / "align_emulated"
    result = subprocess.run(
        [gxx, "-std=c++17", "-O2", "-pthread", f"-I{work}", f"-I{TESTS}", f"-I{ROOT / 'csrc'}",
         str(TESTS / "cuda_emulation_driver.cpp"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return binary, work


def dense_symbols(gen, ref, ref_lens):
    """The binding's symbol mapping (sort + searchsorted), in torch on the CPU."""
    batch, ref_width = ref.shape
    if ref_width == 0:
        return torch.full(gen.shape, -1, dtype=torch.int32), torch.zeros(batch, 0, dtype=torch.int32)
    cols = torch.arange(ref_width)
    keys = ref.long().masked_fill(cols[None] >= ref_lens[:, None], torch.iinfo(torch.int64).max)
    ordered, order = keys.sort(dim=1, stable=True)
    is_new = torch.ones_like(ordered)
    is_new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = is_new.cumsum(1) - 1
    ref_sym = torch.empty_like(rank).scatter_(1, order, rank).int()
    pos = torch.searchsorted(ordered, gen.long().contiguous())
    at = pos.clamp(max=ref_width - 1)
    found = (pos < ref_lens[:, None]) & (ordered.gather(1, at) == gen.long())
    gen_sym = torch.where(found, rank.gather(1, at), -1).int()
    return gen_sym, ref_sym


def run_emulated(emulator, gen, ref, gen_lens, ref_lens, max_targets):
    binary, work = emulator
    gen_sym, ref_sym = dense_symbols(gen, ref, ref_lens)
    batch, gen_width = gen.shape
    ref_width = ref.shape[1]
    inp, out = work / "in.bin", work / "out.bin"
    with open(inp, "wb") as f:
        np.array([batch, gen_width, ref_width, max_targets], dtype=np.int64).tofile(f)
        gen_sym.numpy().astype(np.int32).tofile(f)
        ref_sym.numpy().astype(np.int32).tofile(f)
        gen_lens.numpy().astype(np.int64).tofile(f)
        ref_lens.numpy().astype(np.int64).tofile(f)
    subprocess.run([str(binary), str(inp), str(out)], check=True, timeout=600)
    flat = np.fromfile(out, dtype=np.int32)
    rows = batch * (gen_width + 1)
    sizes = [batch, rows, rows, rows, rows, rows * max_targets]
    parts = np.split(flat, np.cumsum(sizes)[:-1])
    shapes = [(batch,)] + [(batch, gen_width + 1)] * 4 + [(batch, gen_width + 1, max_targets)]
    return [torch.from_numpy(p.reshape(s).copy()) for p, s in zip(parts, shapes)]


def random_batch(rng, batch, max_gen, max_ref, vocab):
    gens, refs = [], []
    for _ in range(batch):
        n = rng.choice([0, 1, 63, 64, 65, 127, 128, 129, rng.randint(0, max_gen)])
        n = min(n, max_gen)
        g = [rng.randrange(vocab) for _ in range(n)]
        if rng.random() < 0.6:
            y = [v if rng.random() > 0.15 else rng.randrange(vocab) for v in g]
            y = y[: max_ref]
        else:
            y = [rng.randrange(vocab) for _ in range(rng.randint(0, max_ref))]
        gens.append(g)
        refs.append(y)
    gen_width = max(len(g) for g in gens) + 1
    ref_width = max(max(len(y) for y in refs), max_ref)
    gen = torch.tensor([g + [7] * (gen_width - len(g)) for g in gens], dtype=torch.int64)
    ref = torch.tensor([y + [3] * (ref_width - len(y)) for y in refs], dtype=torch.int64)
    return gen, ref, torch.tensor([len(g) for g in gens]), torch.tensor([len(y) for y in refs])


@pytest.mark.parametrize(
    "batch, max_gen, max_ref, vocab, max_targets",
    [
        (13, 200, 200, 5, 3),  # one word per lane
        (9, 150, 300, 256_000, 0),
        (5, 40, 2500, 3, 2),  # 40 words: two per lane
        (2, 6, 16_500, 50, 1),  # 258 words: the any-width kernel
    ],
)
def test_emulated_cuda_kernels_match_cpu(emulator, batch, max_gen, max_ref, vocab, max_targets):
    rng = random.Random(batch * 1000 + max_ref)
    gen, ref, gen_lens, ref_lens = random_batch(rng, batch, max_gen, max_ref, vocab)
    got = run_emulated(emulator, gen, ref, gen_lens, ref_lens, max_targets)
    want = gapfix.align(gen, ref, gen_lens, ref_lens, max_targets=max_targets)
    for name, x, y in zip(want._fields, got, want):
        if y is None:
            continue
        assert torch.equal(x, y), name
