"""Which backend runs the primitives, and why the others did not load.

Backends, fastest first for each device:

* ``cuda``: the CUDA kernels of the C++ extension (``csrc/``);
* ``triton``: Triton kernels (on the CPU only under ``TRITON_INTERPRET=1``,
  which the tests use; never chosen automatically there);
* ``cpp``: the CPU kernels of the C++ extension;
* ``torch``: plain PyTorch, always there, the reference.

``FUSEDCONV_BACKEND=name`` or an explicit ``backend=`` argument forces one; a
backend asked for by name that cannot run raises :class:`BackendUnavailable`
with the reason, while automatic selection logs the reason once and moves on.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger("fusedconv")

BACKENDS = ("cuda", "triton", "cpp", "torch")
_AUTOMATIC_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


_loaded: dict[str, ModuleType | str] = {}  # name -> module, or the reason it failed
_reported: set[str] = set()


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


def _why_not_on(name: str, device: torch.device) -> str | None:
    """Why a backend that loads cannot run on ``device``, or None."""
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
    for name in _AUTOMATIC_ORDER.get(device.type, ("torch",)):
        try:
            _module(name)
        except BackendUnavailable as exc:
            if name not in _reported:
                _reported.add(name)
                logger.info("%s; falling back", exc)
            continue
        if _why_not_on(name, device) is None:
            return name
    return "torch"


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
    for name in BACKENDS:
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
