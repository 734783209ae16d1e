"""Loading the C++/CUDA extension (``csrc/``) behind the ``cpp`` and ``cuda`` backends.

The extension registers ``torch.ops.fusedconv_ext.rescale_`` and ``pad_add_``
with a CPU kernel and, when built with CUDA, a CUDA kernel. It is normally
built by ``pip install --no-build-isolation`` (``fusedconv/_C*.so``); when it
is missing, the CPU kernels are compiled with ninja on first use and cached by
``torch.utils.cpp_extension``. Every failure becomes a
:class:`~fusedconv.kernels.backends.BackendUnavailable` that says why.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from .backends import BackendUnavailable

logger = logging.getLogger("fusedconv")

_PACKAGE = Path(__file__).resolve().parents[1]
_SOURCES = _PACKAGE.parent / "csrc"
_state: dict[str, str] = {}  # "info": build info once loaded


def _torch_release(version: str) -> str:
    return version.split("+")[0]


def _load_library() -> str:
    """Load the library once; return its build info ("torch X.Y.Z[, cuda A.B]")."""
    if "info" in _state:
        return _state["info"]
    prebuilt = sorted(_PACKAGE.glob("_C*.so")) + sorted(_PACKAGE.glob("_C*.pyd"))
    if prebuilt:
        try:
            torch.ops.load_library(str(prebuilt[0]))
        except OSError as exc:
            raise BackendUnavailable(
                f"{prebuilt[0].name} does not load ({exc}); it was probably built for another torch "
                f"(running {torch.__version__}): rebuild with pip install --no-build-isolation -e ."
            ) from exc
    else:
        _build_on_first_use()
    info = torch.ops.fusedconv_ext.build_info()
    built_for = info.split(",")[0].removeprefix("torch ")
    if built_for != _torch_release(torch.__version__):
        raise BackendUnavailable(
            f"the extension was built for torch {built_for}, you have {torch.__version__}: "
            "rebuild with pip install --no-build-isolation -e ."
        )
    _state["info"] = info
    return info


def _build_on_first_use() -> None:
    sources = sorted(_SOURCES.glob("*.cpp")) + sorted((_SOURCES / "cpu").glob("*.cpp"))
    if not sources:
        raise BackendUnavailable(
            "the extension was not built at install time and its C++ sources are not here to build it "
            "(install from a source checkout with pip install --no-build-isolation)"
        )
    from torch.utils import cpp_extension

    logger.warning("fusedconv: building the C++ extension's CPU kernels (first use only; cached)")
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    try:
        cpp_extension.load(
            name="fusedconv_ext_cpu",
            sources=[str(s) for s in sources],
            # at::parallel_for needs OpenMP in the caller to use more than one thread.
            extra_cflags=["-O3", *openmp],
            extra_ldflags=openmp,
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler, no ninja, a compile error
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendUnavailable(f"building the C++ extension failed: {first_line}") from exc


def load(*, with_cuda: bool):
    """This module, once the extension is loaded; for ``with_cuda`` also check
    that it has CUDA kernels and that a CUDA device is there."""
    info = _load_library()
    if with_cuda:
        if "cuda" not in info:
            raise BackendUnavailable(f"the extension was built without CUDA kernels ({info}; no nvcc/CUDA_HOME then)")
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device is available")
    return sys.modules[__name__]


def build_info() -> str:
    """What the loaded extension was built against, e.g. ``"torch 2.14.1, cuda 13.0"``."""
    return _load_library()


def rescale_(weights, row_scales, col_scales, groups, sources) -> None:
    torch.ops.fusedconv_ext.rescale_(weights, row_scales, col_scales, groups, sources)


def pad_add_(bigs, smalls, scales, offsets, dilations) -> None:
    torch.ops.fusedconv_ext.pad_add_(bigs, smalls, scales, offsets, dilations)
