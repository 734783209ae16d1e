"""Running a caller's model without changing it.

A run on example inputs (to find the dataflow, or to verify a fold) must leave
every parameter and buffer of the caller's model bit for bit as it was, yet a
forward may write its own state: fake-quant observers update ``min_val`` and
``scale``, a module counts its calls in a buffer. :class:`UnchangedState`
watches the run: before any torch call that may write a tensor in place
(``copy_``, ``add_``, ``x[...] = ...``, ``out=``, a batch norm that updates
its statistics), it keeps a copy of each of the model's tensors among the
arguments, the first time only; when the run ends, whatever changed is
written back. A tensor replaced in its module (``self.count = self.count +
1``) or repointed (``p.data = ...``) is put back as well. A tensor that changed although no call seen from Python wrote
it (inside TorchScript or C++ code) cannot be restored: that raises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import FoldError


_IN_PLACE_OPERATORS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
    "__ilshift__", "__irshift__", "__iand__", "__ior__", "__ixor__", "__imatmul__",
})


def _may_write(func, kwargs: dict) -> bool:
    """Whether a torch call may write one of its tensor arguments: an in-place
    method (``add_``), operator (``+=``, ``x[i] = ...``), an ``out=`` argument, or
    a batch norm (which updates its running statistics in training mode)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__"):
        return name in _IN_PLACE_OPERATORS
    return name.endswith("_") or "batch_norm" in name or kwargs.get("out") is not None


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be written outside inference mode)
        return None


class UnchangedState(TorchFunctionMode):
    """Context manager: the model's parameters and buffers are the same after the
    run as before (see the module docstring); ``what`` names the run in errors."""

    def __init__(self, model: nn.Module, what: str = "the example run"):
        super().__init__()
        self.what = what
        self.named = {id(t): (name, t) for name, t in (*model.named_parameters(), *model.named_buffers())}
        self.versions = {key: _version(t) for key, (_, t) in self.named.items()}
        self.saved: dict[int, torch.Tensor] = {}
        # Which tensor each module registers, and the memory each tensor views:
        # ``self.count = self.count + 1`` swaps the registered tensor, and
        # ``p.data = ...`` repoints it, neither of which bumps a version counter.
        self.registered = [(registry, dict(registry)) for m in model.modules()
                           for registry in (m._parameters, m._buffers) if registry]
        self.views = {key: t.data for key, (_, t) in self.named.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _may_write(func, kwargs):
            for value in tree_flatten((args, kwargs))[0]:
                key = id(value)
                if key in self.named and key not in self.saved:
                    with torch.no_grad():
                        self.saved[key] = value.detach().clone()
        return func(*args, **kwargs)

    def __exit__(self, kind, error, traceback):
        result = super().__exit__(kind, error, traceback)
        self.restore()
        return result

    def restore(self) -> None:
        for registry, before in self.registered:  # tensors swapped or added: the old ones back
            if registry != before or any(registry[k] is not v for k, v in before.items()):
                registry.clear()
                registry.update(before)
        for key, (_, tensor) in self.named.items():  # ``.data`` repointed: the old memory back
            view = self.views[key]
            if tensor.data_ptr() != view.data_ptr() or tensor.shape != view.shape or \
                    tensor.stride() != view.stride() or tensor.dtype != view.dtype:
                tensor.data = view
        lost = []
        with torch.no_grad():
            for key, (name, tensor) in self.named.items():
                before = self.versions[key]
                if before is None or _version(tensor) == before:
                    continue
                if key in self.saved:
                    tensor.detach().copy_(self.saved[key])
                else:
                    lost.append(name)
        if lost:
            raise FoldError(
                f"{self.what} changed {', '.join(lost[:5])} in place in code fusedconv cannot see into "
                "(TorchScript or C++), so it cannot put the old values back: fold a copy of the model made "
                "with copy.deepcopy, or fold without example_inputs")


def check_eval_mode(model: Any, role: str) -> None:
    """Refuse a model in training mode: its BatchNorms would use batch statistics,
    and a run would update their running statistics."""
    if isinstance(model, nn.Module) and model.training:
        raise FoldError(
            f"{role} ({type(model).__name__}) is in training mode, where BatchNorm uses batch statistics "
            "(and a run updates them): call .eval() first"
        )
