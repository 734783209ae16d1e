"""Models that wrap the network to fold: ``DataParallel``,
``DistributedDataParallel``, ``torch.compile``'s ``OptimizedModule``, and
TorchScript, which fusedconv cannot fold.

Folding a wrapper's own (empty) module tree would find no BatchNorm and report
success; so :func:`unwrapped` finds the network inside, says how to put a
folded copy back in the same kind of wrapper, or refuses with the call to use.
"""

from __future__ import annotations

import copy
import gc
import logging
import sys
from typing import Callable

import torch
from torch import nn

from .errors import FoldError

logger = logging.getLogger("fusedconv")


def _optimized_module_type() -> type | None:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded by torch.compile: no import here
    return getattr(eval_frame, "OptimizedModule", None)


def _rewrapped(wrapper: nn.Module, attribute: str, inner: nn.Module) -> nn.Module:
    """A shallow copy of ``wrapper`` holding ``inner`` in place of its network."""
    optimized = _optimized_module_type()
    if optimized is not None and isinstance(wrapper, optimized):
        return type(wrapper)(inner, wrapper.dynamo_ctx)  # compiled again, with the same options
    new = copy.copy(wrapper)
    new._modules = {**wrapper._modules, attribute: inner}
    return new


def _wrapped_by_live_ddp(module: nn.Module) -> bool:
    """Whether a DistributedDataParallel built on ``module`` is alive (it keeps the
    parameter list it was built with, so a fold that adds biases breaks it)."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return False  # no process group, no DDP
    ddp = nn.parallel.DistributedDataParallel
    # The wrapper holds the module in its _modules dict, which its instance
    # dict holds: walk referrers up through dicts, three levels at most, one
    # scan of the heap per level (each get_referrers call is one).
    frontier: list[object] = [module]
    for _ in range(3):
        above: list[object] = []
        for holder in gc.get_referrers(*frontier):
            if isinstance(holder, ddp) and holder._modules.get("module") is module:
                return True
            if isinstance(holder, dict):
                above.append(holder)
        frontier = above[:64]
        if not frontier:
            break
    return False


def unwrapped(model: object, *, inplace: bool) -> tuple[nn.Module, Callable[[nn.Module], nn.Module] | None]:
    """The network to fold in ``model``, and a function that puts a folded copy of
    it back into the same kind of wrapper (None when ``model`` wraps nothing).

    Raises :class:`FoldError` for TorchScript and ``DistributedDataParallel``
    (with the call to use), and for an in-place fold of a module that a live
    ``DistributedDataParallel`` wraps.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise FoldError(
            f"{type(model).__name__} is a TorchScript module, whose code fusedconv cannot read or change: fold "
            "the eager model first, then script it (torch.jit.script(fusedconv.fuse(model)))")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise FoldError(
            "DistributedDataParallel keeps the parameters it was built with, and a fold may add biases: fold "
            "before wrapping (model = fusedconv.fuse(model); ddp = DistributedDataParallel(model, ...)), or "
            "fold a copy of the wrapped network with fusedconv.fuse(ddp.module)")
    if isinstance(model, nn.Module) and inplace and _wrapped_by_live_ddp(model):
        raise FoldError(
            f"{type(model).__name__} is wrapped by a live DistributedDataParallel, which keeps the parameters "
            "it was built with: a fold in place would break its next forward. Fold before wrapping, or fold "
            "a copy (inplace=False)")
    optimized = _optimized_module_type()
    for wrapper_type, attribute in ((nn.DataParallel, "module"), (optimized, "_orig_mod")):
        if wrapper_type is not None and isinstance(model, wrapper_type):
            inner = model._modules[attribute]
            logger.info("folding the network that %s wraps (%s)", type(model).__name__, attribute)
            network, rewrap_inner = unwrapped(inner, inplace=inplace)
            if rewrap_inner is None:
                return network, (lambda folded: _rewrapped(model, attribute, folded))
            return network, (lambda folded: _rewrapped(model, attribute, rewrap_inner(folded)))
    return model, None
