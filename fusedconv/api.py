"""The two calls most users need: :func:`plan` and :func:`fuse`."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from .apply import apply_plan, check_merges_writable, install_merges
from .distributed import is_sharded
from .errors import FoldError
from .exported import fuse_exported, fuse_graph_module, has_aten_batch_norms, plan_exported
from .fusion_plan import FusionPlan
from .model_index import ModelIndex
from .registry import plan_blocks
from .reparam import write_merged_weights
from .rules import check_foldable, make_plan
from .sharded import fuse_sharded
from .wrappers import unwrapped
from .writing import Rollback

logger = logging.getLogger("fusedconv")


def as_input_tuple(example_inputs: Any) -> tuple | None:
    """Normalise ``example_inputs``: a Tensor becomes a 1-tuple, a list a tuple."""
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tuple of positional arguments for model(*example_inputs), or a Tensor; "
        f"got {type(example_inputs).__name__}"
    )


def plan(model: nn.Module, example_inputs: Any = None) -> FusionPlan:
    """What :func:`fuse` would fold in ``model``, and what it would leave and why.

    Without ``example_inputs`` the dataflow comes from reading the forward code,
    completed by a torch.fx trace where the reading cannot vouch for every
    BatchNorm; with them, from one run of ``model(*example_inputs)`` (any
    forward, and it sees tensor ranks), which leaves the model's parameters and
    buffers as they were. The model is not modified. ``DataParallel`` and
    ``torch.compile`` wrappers are planned through the network they wrap.

    Raises ``TypeError`` for a non-module, :class:`fusedconv.FoldError` for a
    TorchScript module or ``DistributedDataParallel`` (with the call to use), a
    model in training mode, a BatchNorm with NaN/inf/negative statistics or
    mismatched channels, or a failing example run.
    """
    if isinstance(model, torch.export.ExportedProgram) or (
            isinstance(model, torch.fx.GraphModule) and has_aten_batch_norms(model)):
        return plan_exported(model)
    network, _ = unwrapped(model, inplace=False)
    return make_plan(network, as_input_tuple(example_inputs))


def fuse(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    plan: FusionPlan | None = None,
    backend: str | None = None,
    flush_subnormals: bool = False,
) -> nn.Module:
    """Fold every foldable BatchNorm of an eval-mode ``model`` into the layer beside it.

    Each folded BatchNorm is replaced by ``nn.Identity`` (timm's BatchNormAct
    modules by their activation) at every path where it is registered, so the
    model keeps its class, attribute names, forward code, device, dtype and
    memory format. Returns a folded copy, or ``model`` itself when
    ``inplace=True``. A ``DataParallel`` or ``torch.compile`` wrapper has the
    network it wraps folded, and a copy comes back in the same kind of wrapper
    (compiled with the same options); TorchScript and
    ``DistributedDataParallel`` are refused with the call to use. Pass ``plan`` (from :func:`fusedconv.plan`) to apply a plan
    already made. ``backend`` (``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``;
    default: the fastest that loads for the model's device, or the
    ``FUSEDCONV_BACKEND`` variable) picks the kernels that scale the weights.
    All or nothing: on any error the caller's model is unchanged. A fold that
    makes weights subnormal (a BN with gamma near 0) warns with a
    :class:`fusedconv.FoldWarning`; ``flush_subnormals=True`` sets them to zero
    instead (subnormal weights slow CPU inference several times over).

    A sharded model (DTensor parameters: FSDP2's ``fully_shard``,
    ``distribute_module``, tensor-parallel plans) is folded in place only, by
    calling ``fuse(model, inplace=True)`` on every rank: each rank writes the
    blocks it holds, no weight is gathered, and the result equals the fold of
    the unsharded model bit for bit (:mod:`fusedconv.sharded`). A refusal on
    any rank raises :class:`fusedconv.FoldError` on every rank, before any writes.
    """
    start = time.perf_counter()
    if isinstance(model, torch.export.ExportedProgram):
        if inplace or plan is not None:
            raise FoldError("an ExportedProgram is folded into a new program: call fuse(program) without "
                            "inplace=True or plan=")
        return fuse_exported(model, backend=backend)
    if isinstance(model, torch.fx.GraphModule) and has_aten_batch_norms(model):
        if inplace or plan is not None:
            raise FoldError("an aten-level GraphModule is folded into a copy: call fuse(graph_module) without "
                            "inplace=True or plan=")
        return fuse_graph_module(model, backend=backend)
    network, rewrap = unwrapped(model, inplace=inplace)
    # One walk of the module tree serves planning and applying, and tells whether
    # the model is sharded (a plan given is applied by the walk apply_plan makes).
    # Nothing before the sharded fold may raise on one rank only: its checks run
    # where every rank reaches the same collectives, failing or not. So should
    # the walk fail, it is made again where its error can be reported: in the
    # planning of an unsharded fold, or inside the ranks' agreement.
    index = None
    if plan is None and isinstance(network, nn.Module):
        try:
            index = ModelIndex(network)
        except Exception:  # raised again below, where it is reported
            index = None
    if index.sharded if index is not None else is_sharded(network):  # each rank folds its blocks, with the others
        plan = fuse_sharded(network, plan, as_input_tuple(example_inputs), inplace=inplace, backend=backend,
                            flush_subnormals=flush_subnormals)
        fused = network
    else:
        if plan is None:
            check_foldable(network)
            # What no fold removes (batch norms computed by function calls) is looked for only to be logged.
            plan = make_plan(network, as_input_tuple(example_inputs), check_stats=False, index=index,
                             list_functional=logger.isEnabledFor(logging.INFO))
        fused = apply_plan(network, plan, inplace=inplace, backend=backend, flush_subnormals=flush_subnormals,
                           index=index)
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "folded %d BatchNorms into %d layers in %.1f ms (dataflow from %s); %d BatchNorms left",
            plan.num_folded,
            len(plan.folds),
            (time.perf_counter() - start) * 1e3,
            plan.source,
            len(plan.skipped),
        )
    if rewrap is None or inplace:
        return model if inplace else fused
    return rewrap(fused)


def reparameterize(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Merge every re-parameterizable block of ``model`` into one conv, in place.

    Finds fusedconv's blocks and every registered block class (timm's and
    ultralytics' when they are imported). All or nothing: every merge is
    planned and checked before the first is applied, and a block that a merge
    would change outside itself (a Conv of it also used elsewhere, or sharing
    memory) raises :class:`FoldError`. Returns ``model``.
    """
    index = ModelIndex(model)
    if index.entangled:
        name, why = next(iter(index.entangled.items()))
        raise FoldError(f"{name or type(model).__name__}: {why}")
    plans = plan_blocks(model, list(index.blocks), modules=index.by_path, members=index.members)
    check_merges_writable(plans)  # before the first install
    with Rollback() as rollback:  # a failing install is undone, the ones before it too
        install_merges(plans, [index.members[name] for name in index.blocks], model, rollback)
    write_merged_weights(plans, backend)
    logger.info("merged %d blocks", len(plans))
    return model
