"""Build script: the C++/CUDA extension ``fusedconv._C`` (sources in ``csrc/``).

The extension is compiled against the torch that is already installed, so
install with ``pip install --no-build-isolation``. Without torch importable the
package installs as pure Python and builds the CPU kernels on first use instead
(``fusedconv/kernels/extension.py``). CUDA kernels are compiled when torch is a
CUDA build and nvcc is found (``CUDA_HOME``); ``FUSEDCONV_CUDA=0`` skips them.
With no GPU visible, ``TORCH_CUDA_ARCH_LIST`` defaults to 9.0 (H100/H200)
rather than every architecture nvcc knows; ``MAX_JOBS`` caps parallel compiles.

A (non-editable) build also copies ``csrc/`` into the package as
``fusedconv/_csrc``, so that an installed package whose ``_C`` is missing can
still compile its CPU kernels on first use. ``MANIFEST.in`` puts ``csrc/``, the
tests and the docs into the sdist.
"""

import os
import re
import shutil
import subprocess
import sys
from glob import glob

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    """build_py that also ships the C++ sources inside the package (``fusedconv/_csrc``)
    for :mod:`fusedconv.kernels.extension`'s build on first use. An editable
    install reads ``csrc/`` from the checkout instead."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not os.path.isdir("csrc"):
            return
        target = os.path.join(self.build_lib, "fusedconv", "_csrc")
        if os.path.isdir(target):
            shutil.rmtree(target)
        shutil.copytree("csrc", target, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))

    def get_outputs(self, include_bytecode=1):
        outputs = list(super().get_outputs(include_bytecode))
        target = os.path.join(self.build_lib, "fusedconv", "_csrc")
        if not getattr(self, "editable_mode", False):
            for root, _, files in os.walk("csrc"):
                outputs += [os.path.join(target, os.path.relpath(os.path.join(root, f), "csrc")) for f in files]
        return outputs


def _point_cuda_home_at_the_toolkit():
    """torch finds CUDA_HOME as the parent of the nvcc on PATH. Where that nvcc
    is a wrapper script (as on the CI machines), ask nvcc for its real root."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None or os.path.exists(os.path.join(os.path.dirname(nvcc), "..", "include", "cuda_runtime_api.h")):
        return
    try:
        dry_run = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return
    top = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    if top:
        os.environ["CUDA_HOME"] = os.path.realpath(top.group(1).strip())


def _extension():
    _point_cuda_home_at_the_toolkit()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return {"cmdclass": {"build_py": BuildPyWithSources}}
    sources = sorted(glob("csrc/*.cpp")) + sorted(glob("csrc/cpu/*.cpp"))
    # The C++ standard is the one torch asks for. No fused multiply-add: each
    # float64 operation rounds once, as torch's ops and every other backend
    # round (a target with FMA, aarch64 or an AVX2 clone, would fuse a * b + c).
    cxx_flags = ["-O3", "-ffp-contract=off"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for runs its loop on one thread unless the caller is
        # compiled with OpenMP; the library resolves to torch's own libgomp.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("FUSEDCONV_CUDA", "1") != "0"
    )
    if with_cuda:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        cuda_home = cpp_extension.CUDA_HOME
        extension = cpp_extension.CUDAExtension(
            "fusedconv._C",
            sources + sorted(glob("csrc/cuda/*.cu")),
            define_macros=[("FUSEDCONV_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
            # Some CUDA installs keep libcudart in lib/ rather than lib64/.
            library_dirs=[d for d in (os.path.join(cuda_home, "lib"), os.path.join(cuda_home, "lib64")) if os.path.isdir(d)],
        )
    else:
        extension = cpp_extension.CppExtension("fusedconv._C", sources, extra_compile_args=cxx_flags,
                                               extra_link_args=link_flags)
    return {
        "ext_modules": [extension],
        "cmdclass": {
            "build_py": BuildPyWithSources,
            "build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True),
        },
    }


setup(**_extension())
