"""Dataflow from one real run on example inputs.

Works for any forward, traceable or not. Global module hooks see every module
call, and a ``TorchFunctionMode`` sees every torch function and tensor method
called from Python, so we know who reads each tensor that a tracked module
returns. Each read is credited to the innermost running tracked module that
received the tensor as input, or else to "something else" (None).

Limits, by construction: the run only sees the code path the example inputs
take, and reads made inside TorchScript or C++ code are not visible.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..layers import is_batchnorm_like
from ..memory import storage_key
from . import Dataflow, Node

# Calls that only look at a tensor's metadata: they don't read its values, so a
# conv output whose .shape is inspected may still be folded.
_METADATA_FUNCTIONS = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.ndimension,
    torch.Tensor.numel,
    torch.Tensor.nelement,
    torch.Tensor.stride,
    torch.Tensor.is_contiguous,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.element_size,
    torch.Tensor.get_device,
    torch.Tensor.data_ptr,
    torch.Tensor.__len__,
}
_METADATA_ATTRIBUTES = {
    "shape", "ndim", "dtype", "device", "layout", "is_cuda", "is_meta", "is_sparse",
    "is_quantized", "requires_grad", "is_leaf", "grad_fn", "names", "itemsize", "nbytes",
}


def _is_metadata(func) -> bool:
    if func in _METADATA_FUNCTIONS:
        return True
    # property reads reach the mode as the descriptor's __get__
    return getattr(func, "__name__", None) == "__get__" and getattr(
        getattr(func, "__self__", None), "__name__", None
    ) in _METADATA_ATTRIBUTES


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class RunFailed(Exception):
    """The model raised during the example run; ``module`` is the innermost module
    that was running (None if it failed outside any module). The model's
    exception is the ``__cause__``."""

    def __init__(self, module: nn.Module | None):
        super().__init__(module)
        self.module = module


class _Frame:
    __slots__ = ("name", "serial", "inputs")

    def __init__(self, name: str, serial: int, inputs: set[int]):
        self.name, self.serial, self.inputs = name, serial, inputs


class _Recorder(TorchFunctionMode):
    def __init__(self, tracked: dict[int, str], owners: dict[int, tuple[str, ...]]):
        super().__init__()
        self.tracked = tracked
        self.owners = owners  # storage address of a parameter or buffer -> tracked modules holding it
        self.nodes = {name: Node(name) for name in tracked.values()}
        self.stack: list[_Frame] = []  # tracked modules now running
        self.running: list[nn.Module] = []  # every module now running, to say where a run failed
        self.serial = 0
        self.produced_by: dict[int, str] = {}  # id(tensor) -> tracked module whose first call returned it
        self.returned_at: dict[int, int] = {}  # id(tensor) -> the serial when that call returned
        self.functional_batchnorms: list[str] = []
        self.readers: dict[int, dict[Any, str | None]] = {}
        # Tensors stay referenced until the run ends, so that no id is reused.
        self.alive: list[torch.Tensor] = []

    # -- module calls -------------------------------------------------------
    def before_call(self, module: nn.Module, args: tuple) -> None:
        self.running.append(module)
        name = self.tracked.get(id(module))
        if name is None:
            return
        node = self.nodes[name]
        node.calls += 1
        inputs = list(_tensors(args))
        if node.calls == 1 and inputs:
            node.input_from = self.produced_by.get(id(inputs[0]))
            node.input_rank = inputs[0].dim()
            # Nothing ran in between (no torch call, no tracked module), so nothing
            # changed the input in place since its producer returned it.
            node.input_tight = self.returned_at.get(id(inputs[0])) == self.serial
        self.serial += 1
        self.stack.append(_Frame(name, self.serial, {id(t) for t in inputs}))

    def after_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.running.pop()
        name = self.tracked.get(id(module))
        if name is None:
            return
        self.stack.pop()
        if self.nodes[name].calls == 1 and isinstance(output, torch.Tensor):
            self.produced_by[id(output)] = name
            self.returned_at[id(output)] = self.serial
            self.readers[id(output)] = {}
            self.alive.append(output)

    # -- torch calls --------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "batch_norm" in getattr(func, "__name__", "") and not (self.running and is_batchnorm_like(self.running[-1])):
            where = type(self.running[-1]).__name__ if self.running else "the model's forward"
            self.functional_batchnorms.append(f"{func.__name__} called in {where}")
        if not _is_metadata(func):
            self.serial += 1
            for t in _tensors((args, kwargs)):
                self._read(t)
        return func(*args, **kwargs)

    def _read(self, tensor: torch.Tensor) -> None:
        tid = id(tensor)
        readers = self.readers.get(tid)
        if readers is not None:
            frame = next((f for f in reversed(self.stack) if tid in f.inputs), None)
            if frame is None:
                readers[("op", self.serial)] = None
            else:
                readers[("module", frame.serial)] = frame.name
        for owner in self.owners.get(storage_key(tensor), ()) if tid not in self.readers else ():
            if not any(f.name == owner for f in self.stack):
                self.nodes[owner].tensors_read_elsewhere = True

    def finish(self, output: Any) -> Dataflow:
        for t in _tensors(output):  # returned by the model: read by the caller
            readers = self.readers.get(id(t))
            if readers is not None:
                readers[("output", id(t))] = None
        for tid, name in self.produced_by.items():
            self.nodes[name].consumers = list(self.readers[tid].values())
        return Dataflow(self.nodes, "run", functional_batchnorms=self.functional_batchnorms)


def from_run(
    model: nn.Module,
    example_inputs: tuple,
    tracked: dict[int, str],
    owners: dict[int, tuple[str, ...]],
) -> Dataflow:
    """Dataflow of one ``model(*example_inputs)`` call under ``torch.no_grad()``.

    ``tracked`` maps id(module) to its name; ``owners`` maps the storage address
    of every parameter/buffer of a tracked module to the tracked modules holding it.
    Raises :class:`RunFailed` (caused by the model's exception) if the run fails.
    """
    recorder = _Recorder(tracked, owners)
    hooks = [
        nn.modules.module.register_module_forward_pre_hook(recorder.before_call),
        nn.modules.module.register_module_forward_hook(recorder.after_call),
    ]
    try:
        with torch.no_grad(), recorder:
            output = model(*example_inputs)
    except Exception as exc:
        raise RunFailed(recorder.running[-1] if recorder.running else None) from exc
    finally:
        for hook in hooks:
            hook.remove()
    return recorder.finish(output)
