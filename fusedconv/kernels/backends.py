"""Which backend runs the primitives, and why the others did not load.

Backends, fastest first for each device:

* ``cuda``: the CUDA kernels of the C++ extension (``csrc/``);
* ``triton``: Triton kernels (on the CPU only under ``TRITON_INTERPRET=1``,
  which the tests use; never chosen automatically there);
* ``cpp``: the CPU kernels of the C++ extension;
* ``torch``: plain PyTorch, always there, the reference.

``FUSEDCONV_BACKEND=name`` or an explicit ``backend=`` argument forces one; a
backend asked for by name that cannot run raises
:class:`~fusedconv.errors.BackendUnavailable` with the reason, while automatic
selection logs the reason once and moves on. When the backend skipped is the
compiled extension (``cpp`` on the CPU, ``cuda`` on a GPU), the first fold that
falls back also emits one :class:`~fusedconv.errors.MissingExtensionWarning`
per process, naming the command that rebuilds it (docs/DESIGN.md section 5).
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from types import ModuleType

import torch

from ..errors import BackendUnavailable, MissingExtensionWarning

logger = logging.getLogger("fusedconv")

BACKENDS = ("cuda", "triton", "cpp", "torch")
_AUTOMATIC_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


_loaded: dict[str, ModuleType | str] = {}  # name -> module, or the reason it failed
_reported: set[str] = set()
_warned_missing_extension = False


def _load(name: str) -> ModuleType:
    """Import a backend's module, raising :class:`BackendUnavailable` with the reason."""
    if name == "torch":
        return importlib.import_module(".reference", __package__)
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(f"triton is not installed ({exc})") from exc
        return importlib.import_module(".triton_ops", __package__)
    if name in ("cpp", "cuda"):
        from . import extension

        return extension.load(with_cuda=name == "cuda")
    raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _module(name: str) -> ModuleType:
    if name not in _loaded:
        try:
            _loaded[name] = _load(name)
        except BackendUnavailable as exc:
            _loaded[name] = str(exc)
        except Exception as exc:  # a broken build or a kernel that fails to compile
            _loaded[name] = f"{type(exc).__name__}: {exc}"
    found = _loaded[name]
    if isinstance(found, str):
        raise BackendUnavailable(f"fusedconv backend {name!r} is unavailable: {found}")
    return found


def _missing_device(device: torch.device) -> str | None:
    """Why ``device`` is not there in this process (no CUDA device...), or None."""
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    accelerator = getattr(torch, device.type, None)  # torch.mps, torch.xpu, ...
    is_available = getattr(accelerator, "is_available", None)
    if device.type not in ("cpu", "meta") and callable(is_available) and not is_available():
        return f"no {device.type} device is available"
    return None


def why_device_unavailable(device: torch.device) -> str | None:
    """Why the arithmetic of a fold cannot run on ``device`` in this process (no
    CUDA device, or the meta device, which holds no values), or None. The
    backends themselves run on meta tensors, as a traced fold does."""
    if device.type == "meta":
        return "the meta device holds no values to compute with (load the weights first)"
    return _missing_device(device)


def _why_not_on(name: str, device: torch.device) -> str | None:
    """Why a backend that loads cannot run on ``device``, or None."""
    missing = _missing_device(device)
    if missing:
        return missing
    if name == "cpp" and device.type != "cpu":
        return f"the cpp backend runs on the CPU, not on {device.type}"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend runs on CUDA devices, not on {device.type}"
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on the CPU only under TRITON_INTERPRET=1"
    if name == "torch" or device.type in ("cpu", "cuda"):
        return None
    return f"the {name} backend does not run on {device.type}"


def choose(device: torch.device, requested: str | None = None) -> str:
    """The name of the backend to use on ``device``: the one asked for
    (argument, then ``FUSEDCONV_BACKEND``), else the fastest that loads."""
    requested = requested or os.environ.get("FUSEDCONV_BACKEND") or None
    if requested is not None:
        _module(requested)
        reason = _why_not_on(requested, device)
        if reason:
            raise BackendUnavailable(f"fusedconv backend {requested!r} cannot run here: {reason}")
        return requested
    extension_missing = None
    for name in _AUTOMATIC_ORDER.get(device.type, ("torch",)):
        try:
            _module(name)
        except BackendUnavailable as exc:
            if name not in _reported:
                _reported.add(name)
                logger.info("%s; falling back", exc)
            if name in ("cpp", "cuda"):
                extension_missing = str(exc)
            continue
        if _why_not_on(name, device) is None:
            break
    else:
        name = "torch"
    if extension_missing is not None:
        _warn_missing_extension(extension_missing, name)
    return name


def _warn_missing_extension(reason: str, fallback: str) -> None:
    """One :class:`MissingExtensionWarning` per process, when automatic selection
    skipped the compiled extension (a rebuild fixes that) and fell back."""
    global _warned_missing_extension
    if _warned_missing_extension or "no CUDA device" in reason:
        return
    _warned_missing_extension = True
    from .extension import rebuild_hint

    kind = "plain-PyTorch" if fallback == "torch" else fallback
    hint = rebuild_hint()
    warnings.warn(
        f"{reason}. fusedconv folds with the slower {kind} kernels instead (same results, same bits)" +
        ("." if hint in reason else f". To build the compiled kernels: {hint}"),  # the reason may name it already
        MissingExtensionWarning,
        stacklevel=caller_stacklevel(),
    )


def caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside fusedconv (so the warning
    names the user's line that folded)."""
    import sys

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def resolve(device: torch.device, requested: str | None = None) -> ModuleType:
    """The module of the backend :func:`choose` picks."""
    return _module(choose(device, requested))


def available_backends(device: torch.device | str | None = None) -> dict[str, str | None]:
    """Each backend's status on ``device`` (default: CUDA if there is one, else
    the CPU): None if it can run there, else the reason it cannot."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    status: dict[str, str | None] = {}
    missing = _missing_device(device)
    for name in BACKENDS:
        if missing:  # before any backend's own reason: no backend computes there
            status[name] = missing
            continue
        try:
            _module(name)
        except BackendUnavailable as exc:
            status[name] = str(exc).split(": ", 1)[-1]
            continue
        status[name] = _why_not_on(name, device)
    return status


def backend_report(device: torch.device | str | None = None) -> str:
    """One line per backend: ``available`` or why not (for logs and ``fusedconv demo``)."""
    return "\n".join(
        f"{name:>6}: {'available' if reason is None else 'unavailable, ' + reason}"
        for name, reason in available_backends(device).items()
    )
