"""Builds replay._C: the C++ CPU kernels always, the CUDA kernels too when torch is a CUDA
build and a CUDA toolkit is found (REPLAY_CUDA=0 forces a CPU-only build, REPLAY_CUDA=1 makes a
missing toolkit an error).

Install with the torch you want already installed, without build isolation:
    pip install --no-build-isolation -e .
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))

# No contraction of a*b+c into an FMA behind our back: every FMA in the arithmetic is explicit
# (csrc/kernels/common.h). See shared/notes/numerics.md. -fno-math-errno lets std::sqrt compile
# to the (IEEE, correctly rounded) sqrt instruction instead of a libm call that may set errno;
# -fno-trapping-math lets the vectorizer compute both sides of a branch and select (we never
# read floating-point exception flags). Neither changes a single result bit.
# -fopenmp: at::parallel_for is a header template that runs serially unless OpenMP is on.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unused-function"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "--fmad=false",
    "-prec-div=true",
    "-prec-sqrt=true",
    "-ftz=false",
    "-Xcompiler=-ffp-contract=off",
]


def want_cuda() -> bool:
    choice = os.environ.get("REPLAY_CUDA", "auto")
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if choice == "0":
        return False
    if choice == "1" and not have:
        raise RuntimeError(
            "REPLAY_CUDA=1 but this torch is not a CUDA build or no CUDA toolkit was found "
            f"(torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r})"
        )
    return have


def rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def extension():
    sources = rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    if want_cuda():
        sources += rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        return cpp_extension.CUDAExtension(
            "replay._C",
            sources,
            extra_compile_args={"cxx": CXX_FLAGS + ["-DREPLAY_WITH_CUDA"], "nvcc": NVCC_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    return cpp_extension.CppExtension(
        "replay._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS
    )


setup(
    packages=find_packages(include=["replay", "replay.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
