"""Loading the C++/CUDA extension (``csrc/``) behind the ``cpp`` and ``cuda`` backends.

The extension registers ``torch.ops.fusedconv_ext.rescale_`` and ``pad_add_``
with a CPU kernel and, when built with CUDA, a CUDA kernel. It is normally
built by ``pip install --no-build-isolation`` (``fusedconv/_C*.so``); when it
is missing, the CPU kernels are compiled with ninja on first use and cached by
``torch.utils.cpp_extension``. The sources are read from ``fusedconv/_csrc``
(an installed wheel ships them there) or from ``csrc/`` next to the package (a
source checkout). Every failure becomes a
:class:`~fusedconv.errors.BackendUnavailable` that says why and, where a rebuild
fixes it, how (:func:`rebuild_hint`).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import torch

from ..errors import BackendUnavailable, ExtensionBuildWarning

logger = logging.getLogger("fusedconv")

_PACKAGE = Path(__file__).resolve().parents[1]
# An installed package carries its sources as package data; a checkout has csrc/ beside it.
_SOURCE_DIRS = (_PACKAGE / "_csrc", _PACKAGE.parent / "csrc")
# "info": build info once loaded; "path": the library's file; "built on first use": True if so;
# "prebuilt": whether a library built at install time is there to load; "module": the library
# as a Python module, or None (native_function)
_state: dict[str, object] = {}


def source_dir() -> Path | None:
    """Where the C++ sources for a build on first use are, or None."""
    for directory in _SOURCE_DIRS:
        if (directory / "ops.cpp").is_file():
            return directory
    return None


def rebuild_hint() -> str:
    """The command that builds ``fusedconv._C`` against the torch in use."""
    checkout = _PACKAGE.parent
    if (checkout / "setup.py").is_file() and (checkout / "csrc").is_dir():
        where = f"pip install --no-build-isolation -e {checkout}"
    else:
        where = ("pip install --no-build-isolation --no-deps --force-reinstall <fusedconv sdist or source "
                 "checkout> (a source checkout: pip install --no-build-isolation -e .)")
    return f"{where}, with torch {_torch_release(torch.__version__)} installed and a C++ compiler"


def _torch_release(version: str) -> str:
    return version.split("+")[0]


def _load_library() -> str:
    """Load the library once; return its build info ("torch X.Y.Z[, cuda A.B]")."""
    if "info" in _state:
        return _state["info"]
    prebuilt = _prebuilt()
    if prebuilt:
        try:
            torch.ops.load_library(str(prebuilt[0]))
        except OSError as exc:
            built_for = _built_for(prebuilt[0])
            why = f"it was built for torch {built_for}, you have {torch.__version__}" if built_for else \
                f"it was probably built for another torch (you have {torch.__version__})"
            raise BackendUnavailable(f"{prebuilt[0].name} does not load ({_first_line(exc)}); {why}: rebuild it "
                                     f"with {rebuild_hint()}") from exc
        _state["path"] = prebuilt[0]
    else:
        _state["path"] = Path(_build_on_first_use())
        _state["built on first use"] = True
    info = torch.ops.fusedconv_ext.build_info()
    built_for = info.split(",")[0].removeprefix("torch ")
    if built_for != _torch_release(torch.__version__):
        raise BackendUnavailable(
            f"the extension was built for torch {built_for}, you have {torch.__version__}: "
            f"rebuild it with {rebuild_hint()}"
        )
    _state["info"] = info
    return info


def _prebuilt() -> list[Path]:
    """The extension built at install time for this Python (``fusedconv/_C``
    with one of its extension suffixes), if it is there."""
    # The names this Python imports an extension module by (another Python's
    # build, left by an earlier install, is not this one's): tested one by one,
    # not with Path.glob, which compiles a pattern first, a cost of the import.
    return [_PACKAGE / f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if os.path.isfile(_PACKAGE / f"_C{suffix}")]


def _built_for(library: Path) -> str | None:
    """The torch release a library that does not load was built for, read from
    the text that csrc/ops.cpp compiles into it (None if it is not there)."""
    try:
        found = re.search(rb"fusedconv built for torch ([0-9]+\.[0-9]+\.[0-9]+)", library.read_bytes())
    except OSError:
        return None
    return found.group(1).decode() if found else None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _first_use_build_cached(cpp_extension, name: str) -> bool:
    """Whether an earlier process built the extension on first use already
    (torch.utils.cpp_extension keeps it in its build directory; should its
    sources have changed since, ninja compiles them again, unannounced)."""
    try:
        directory = cpp_extension._get_build_directory(name, verbose=False)
    except (AttributeError, TypeError, OSError):  # a private helper of torch's: if it moved, say a build comes
        return False
    return any(os.path.exists(os.path.join(directory, name + suffix)) for suffix in (".so", ".pyd"))


def _build_on_first_use() -> str:
    """Build the CPU kernels (or find them built by an earlier process), load
    them; the library's path."""
    directory = source_dir()
    if directory is None:
        raise BackendUnavailable(
            "the extension fusedconv._C was not built at install time and its C++ sources are not "
            f"installed to build it now; build it with {rebuild_hint()}"
        )
    sources = sorted(directory.glob("*.cpp")) + sorted((directory / "cpu").glob("*.cpp"))
    from torch.utils import cpp_extension

    name = "fusedconv_ext_cpu"
    if _first_use_build_cached(cpp_extension, name):
        logger.info("loading the extension's CPU kernels built on first use by an earlier process")
    else:  # a minute or so, once: say so where the user will see it (a library's logger is silent by default)
        from .backends import caller_stacklevel

        warnings.warn(f"fusedconv._C was not built at install time: compiling its CPU kernels now (first use only, "
                      f"about a minute, then cached). To build it at install time: {rebuild_hint()}",
                      ExtensionBuildWarning, stacklevel=caller_stacklevel())
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            # No fused multiply-add, as in setup.py (one rounding per operation); at::parallel_for
            # needs OpenMP in the caller to use more than one thread.
            extra_cflags=["-O3", "-ffp-contract=off", *openmp],
            extra_ldflags=openmp,
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler, no ninja, a compile error
        raise BackendUnavailable(f"building the C++ extension on first use failed: {_first_line(exc)}; "
                                 f"build it at install time with {rebuild_hint()}") from exc


def load(*, with_cuda: bool):
    """This module, once the extension is loaded; for ``with_cuda`` also check
    that it has CUDA kernels and that a CUDA device is there."""
    info = _load_library()
    if with_cuda:
        if "cuda" not in info:
            if _state.get("built on first use"):
                raise BackendUnavailable(f"the extension was built on first use, which compiles its CPU kernels only; "
                                         f"for the CUDA kernels build it at install time with nvcc: {rebuild_hint()}")
            raise BackendUnavailable(f"the extension was built without CUDA kernels ({info}; no nvcc/CUDA_HOME then)")
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device is available")
    return sys.modules[__name__]


def native_function(name: str):
    """A function of the extension's Python module (``csrc/module.h``: the
    module walk, the BNs' affine maps), which computes exactly what fusedconv's
    Python code computes, faster; None where it is not there to use
    (:func:`_loaded_without_building`, a library that predates it, or
    ``FUSEDCONV_NATIVE_HELPERS=0`` in the environment), and the caller runs its
    Python code."""
    if os.environ.get("FUSEDCONV_NATIVE_HELPERS") == "0":
        return None
    if "module" not in _state:
        if not _loaded_without_building():
            return None
        _state["module"] = _import_module()
    return getattr(_state["module"], name, None)


def _loaded_without_building() -> bool:
    """Whether the extension is loaded, loading it if it was built at install
    time: a helper is never worth a compile (a build on first use, for the
    kernels, makes it available from then on)."""
    if "info" in _state:
        return True
    if "prebuilt" not in _state:
        _state["prebuilt"] = bool(_prebuilt())
    if not _state["prebuilt"]:
        return False
    try:
        _load_library()
    except Exception as exc:  # noqa: BLE001  whatever keeps it from loading, the Python code stands in
        logger.debug("the extension's helpers are not used: %s", exc)
        _state["prebuilt"] = False  # not again in this process
        return False
    return True


def load_prebuilt() -> None:
    """Load the extension if it was built at install time, and import its Python
    module; never build it. Importing fusedconv calls this, as torch loads its
    own kernels at import: loading a library is a cost of the process, not of a
    first fold (here 1-3 ms, mostly the dynamic linker binding the library's
    symbols to torch's). Whatever keeps it from loading is logged at debug level
    only; the backends that need it say it again, with the fix, when asked.
    ``FUSEDCONV_NATIVE_HELPERS=0`` leaves the load to the first fold that needs
    the kernels."""
    if os.environ.get("FUSEDCONV_NATIVE_HELPERS") == "0":
        return  # the first fold loads it, for the kernels alone
    try:
        if _loaded_without_building() and "module" not in _state:
            _state["module"] = _import_module()
    except Exception as exc:  # noqa: BLE001  an import of fusedconv never fails for its library
        logger.debug("the extension was not loaded at import: %s", exc)


def _import_module():
    """The loaded library as a Python module, or None if it does not import.
    Exactly the file that was loaded: another ``_C*.so`` (built for another
    Python) would register the ops again, which aborts the process."""
    path = _state["path"]
    # fusedconv._C, or a build on first use: a module of its own name, in torch's build directory
    name = "fusedconv._C" if path.parent == _PACKAGE else path.name.split(".")[0]
    try:
        module = sys.modules.get(name)
        if module is None or getattr(module, "__file__", None) != str(path):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        return module
    except (ImportError, OSError) as exc:
        logger.debug("the extension's helpers are not used: %s", exc)
        return None


def build_info() -> str:
    """What the loaded extension was built against, e.g. ``"torch 2.14.1, cuda 13.0"``."""
    return _load_library()


def rescale_(weights, row_scales, col_scales, groups, sources) -> None:
    torch.ops.fusedconv_ext.rescale_(weights, row_scales, col_scales, groups, sources)


def pad_add_(bigs, smalls, scales, offsets, dilations) -> None:
    torch.ops.fusedconv_ext.pad_add_(bigs, smalls, scales, offsets, dilations)
