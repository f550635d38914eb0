"""Builds gapfix._C from csrc/.

C++ (with OpenMP) always. The CUDA sources are added when CUDA_HOME is set and
the installed torch was built with CUDA, unless GAPFIX_NO_CUDA=1. Nothing here
queries a GPU: the build machine need not have one.

Environment:
  GAPFIX_NO_CUDA=1     skip the CUDA sources even where they could be built
  GAPFIX_PORTABLE=1    do not tune for the build machine's CPU (no -march=native)
  TORCH_CUDA_ARCH_LIST the usual torch variable picks the GPU architectures
"""
import glob
import os

import torch
from setuptools import Extension, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def native_extension() -> Extension:
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    with_cuda = bool(CUDA_HOME) and torch.version.cuda is not None and not _flag("GAPFIX_NO_CUDA")

    # no -std= here: torch's BuildExtension adds the standard its headers need (C++17 up to
    # torch 2.13, C++20 from 2.14 on); a fixed one breaks the build against the other
    cxx = ["-O3", "-fopenmp"]
    if not _flag("GAPFIX_PORTABLE"):
        cxx.append("-march=native")
    define_macros = []
    kwargs = dict(
        name="gapfix._C",
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
        include_dirs=[os.path.join(HERE, "csrc")],
    )
    if with_cuda:
        define_macros.append(("GAPFIX_WITH_CUDA", "1"))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        return CUDAExtension(sources=cpp_sources + cuda_sources,
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension(sources=cpp_sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=["gapfix", "gapfix.ops", "gapfix.ops.cross_entropy", "gapfix.methods", "gapfix.kernels",
              "gapfix.data", "gapfix.hf", "gapfix.generation"],
    package_data={"gapfix.data": ["*.jsonl", "*.json"]},
    ext_modules=[native_extension()],
    cmdclass={"build_ext": BuildExtension},
)
