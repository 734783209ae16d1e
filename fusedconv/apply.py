"""Applying a checked plan to a model, all or nothing: prepare, materialize, write."""

from __future__ import annotations

import copy
import os
import types
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from . import kernels
from .copying import copy_for_folding
from .dataflow.references import cell_contents
from .fold import LayerFold, plan_layer_folds, rescale_weights, set_biases
from .fusion_plan import FusionPlan
from .errors import FoldError
from .layers import BatchNormKind, layer_out_channels, registered_attribute
from .model_index import ModelIndex
from .registry import converter_for, plan_blocks, plan_found_blocks
from .reparam import Reparameterization, apply_reparameterizations, write_merged_weights
from .rules import checked_affines, module_at
from .walking import submodules
from .writing import Rollback, check_folded_range, check_writable, subnormal_weights, swap_batchnorms


def _first_weight_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@dataclass
class _Prepared:
    """What the prepare step worked out; nothing of the model has changed yet."""

    modules: dict[str, nn.Module]  # the model's path -> module map
    names: list[str]  # the folded layers' paths
    layers: list[nn.Module]
    layer_folds: list[LayerFold]
    bn_paths: dict[str, list[str]]  # each folded BN -> every path where it is registered
    smallest_factors: list[float]  # each fold's, for the search for subnormal weights


def _paths_by_module(modules: dict[str, nn.Module]) -> dict[int, list[str]]:
    """id(module) -> every path where it is registered (the root's "" left out)."""
    paths: dict[int, list[str]] = defaultdict(list)
    for path, module in modules.items():
        if path:
            paths[id(module)].append(path)
    return paths


def _prepare(model: nn.Module, plan: FusionPlan, modules: dict[str, nn.Module], *, inplace: bool,
             backend: str | None, paths: dict[int, list[str]]) -> _Prepared:
    """Check every BN and tensor to be written and compute every new bias and
    scale; raises :class:`FoldError` naming the module at fault. ``paths``:
    :func:`_paths_by_module` of ``modules``."""
    names = [fold.layer for fold in plan.folds]
    layers = [module_at(modules, name) for name in names]
    check_writable(((f"{name}.weight", layer.weight) for name, layer in zip(names, layers)), in_place=inplace)
    check_writable(((f"{name}.bias", layer.bias) for name, layer in zip(names, layers)), in_place=inplace)
    layer_folds = plan_layer_folds(layers, checked_affines(modules, plan.folds), names)
    _, smallest = check_folded_range([layer.weight for layer in layers], layer_folds, names)
    kernels.resolve(_first_weight_device(model), backend)  # a backend asked for by name must load
    bn_paths = {name: paths[id(module_at(modules, name))] for f in plan.folds for name in f.batchnorms}
    return _Prepared(modules, names, layers, layer_folds, bn_paths, smallest)


def _write(target_modules: dict[str, nn.Module], prepared: _Prepared, merges: list, *,
           merged_blocks: list[list[nn.Module]], backend: str | None, sources: list[torch.Tensor] | None,
           flush_subnormals: bool, kinds: dict[str, BatchNormKind | None] | None) -> None:
    """Swap the BNs out, store the biases, install the merges, scale the
    weights (one batched call), then write the merges' weights; a failure
    before that last step undoes what was written before it.
    ``merged_blocks``: the modules of each block merged; ``kinds``: the BNs'
    kinds, when an index of the model has them."""
    targets = [module_at(target_modules, name) for name in prepared.names]
    weights = [layer.weight for layer in targets]
    with Rollback() as rollback:
        swap_batchnorms(target_modules, prepared.bn_paths, rollback, kinds)
        set_biases(targets, [layer_fold.bias for layer_fold in prepared.layer_folds], rollback,
                   owned=[layer_fold.owns_bias for layer_fold in prepared.layer_folds])
        if merges:
            install_merges(merges, merged_blocks, target_modules[""], rollback)
        # A copied weight that the memo did not leave unwritten (a Parameter
        # subclass, cloned as usual) holds its source's values: writing it from
        # the source gives the same bits.
        rescale_weights(weights, prepared.layer_folds, backend, sources)
    if merges:
        write_merged_weights(merges, backend)
    subnormal_weights(weights, prepared.layer_folds, prepared.names, flush=flush_subnormals,
                      smallest=prepared.smallest_factors)


def check_merges_writable(merges: Sequence[Reparameterization]) -> None:
    """Raise :class:`FoldError` for a merged conv's weight or bias that a merge
    could not write in place, naming the block."""
    check_writable(((f"{merge.name}: {part}", registered_attribute(merge.target, part)) for merge in merges
                    for part in ("weight", "bias")), in_place=True)


def install_merges(merges: Sequence[Reparameterization], merged_blocks: Sequence[Sequence[nn.Module]],
                   model: nn.Module, rollback: Rollback) -> None:
    """Run the merges' installs (module swaps only), before any weight is
    written, having recorded in ``rollback`` what they may change, so that a
    failing install, or a write failing after them inside the same rollback,
    is undone. A user's install may change any module of ``model``, so every
    module is recorded; fusedconv's own installs change the children and
    attributes of the modules of their block that have children, and the
    ``requires_grad`` of its parameters, so only those are recorded.
    ``merged_blocks``: the modules of each merged block."""
    inside = {id(m): m for inner in merged_blocks for m in inner}
    if all(_own_install(merge.install, inside) for merge in merges):
        rollback.keep_modules([m for m in inside.values() if m._modules])
        rollback.keep_requires_grad(p for m in inside.values() if not m._modules for p in m._parameters.values()
                                    if p is not None)
    else:
        rollback.keep_modules(submodules(model))  # walked now: a run may have added modules
    for merge in merges:
        merge.install(merge.target)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_OWN_FILES: dict[str, bool] = {}  # a code object's file -> whether it is one of fusedconv's


def _own_install(install: object, inside: dict[int, nn.Module]) -> bool:
    """Whether a merge's ``install`` is fusedconv's own code acting on the merged
    blocks: a function defined in fusedconv's files (judged by its code's file,
    which a ``functools.wraps`` wrapper does not copy) whose closure holds no
    module outside the blocks (``inside``: id -> module), or such a method bound
    to a module of the blocks of fusedconv's own class. The installs of
    fusedconv's converters (for its blocks, and for timm's and ultralytics')
    change the modules of their block only."""
    if type(install) is types.FunctionType:  # most installs: a converter's closure (no lookups that fail)
        function = install
    else:
        owner = getattr(install, "__self__", None)
        if owner is not None and (id(owner) not in inside or not type(owner).__module__.startswith("fusedconv.")):
            return False  # a subclass's branches or attributes may differ from what the method expects
        function = getattr(install, "__func__", install)
        if not isinstance(function, types.FunctionType):
            return False
    filename = function.__code__.co_filename
    own = _OWN_FILES.get(filename)
    if own is None:
        own = _OWN_FILES[filename] = os.path.abspath(filename).startswith(_PACKAGE_DIR)
    if not own:
        return False
    # e.g. a converter's install made for another module than the block merged
    return not any(isinstance(value, nn.Module) and id(value) not in inside for value in cell_contents(function))


def _fold_structure(model: nn.Module, plan: FusionPlan, modules: dict[str, nn.Module], *,
                    inplace: bool) -> nn.Module:
    """On the meta device: the folded *structure* alone (BNs replaced, a bias where
    a fold needs one, blocks merged), so that a folded state dict loads into it
    with ``load_state_dict(..., assign=True)``. Folding values needs values."""
    layers = [module_at(modules, fold.layer) for fold in plan.folds]
    blocks = [module_at(modules, name) for name in plan.merges]
    if not all(t.is_meta for layer in layers for t in (layer.weight, layer.bias) if t is not None) or \
            not all(t.is_meta for block in blocks for t in (*block.parameters(), *block.buffers())):
        raise FoldError("some of the layers and blocks to fold are on the meta device and some are not: load the "
                        "weights first, or fold the structure with every tensor on meta")
    if "" in plan.merges and inplace:
        raise FoldError(f"the model is itself a block ({type(model).__name__}): fold its structure into a copy "
                        "(inplace=False)")
    merged = {name: merged_structure(module_at(modules, name), name) for name in plan.merges}
    if "" in merged:
        return merged[""]
    target = model if inplace else copy.deepcopy(model)
    target_modules = modules if inplace else dict(target.named_modules(remove_duplicate=False))
    paths = _paths_by_module(target_modules)
    with Rollback() as rollback:  # a plan that does not fit the model raises halfway
        for fold in plan.folds:
            layer = module_at(target_modules, fold.layer)
            if layer.bias is None:
                rollback.setattr(layer, "bias", nn.Parameter(
                    torch.empty(layer_out_channels(layer), device="meta", dtype=layer.weight.dtype),
                    requires_grad=layer.weight.requires_grad))
        swap_batchnorms(target_modules, {name: paths[id(module_at(target_modules, name))] for fold in plan.folds
                                         for name in fold.batchnorms}, rollback)
    for name, block in merged.items():
        for path in paths[id(target_modules[name])]:
            parent, _, attr = path.rpartition(".")
            setattr(target_modules[parent], attr, block)
    return target


def merged_structure(block: nn.Module, name: str) -> nn.Module:
    """A merged copy of a block on the meta device, from its structure alone.

    A merge's structure (which branches go, where the merged conv lives) does
    not depend on the values, so the copy's tensors are placeholders, briefly
    on the CPU (one block's worth), that every converter's checks accept: 1 in
    every float tensor (a BN's variance included), 0 in the integer ones."""
    stand_in = copy.deepcopy(block).to_empty(device="cpu")
    with torch.no_grad():
        for tensor in (*stand_in.parameters(), *stand_in.buffers()):
            tensor.fill_(1) if tensor.is_floating_point() else tensor.zero_()
    try:
        apply_reparameterizations(plan_found_blocks([(name, stand_in, converter_for(stand_in))]), backend="torch")
    except (RuntimeError, TypeError, ValueError) as error:  # a block holding meta tensors outside its state
        raise FoldError(f"{name or type(block).__name__}: its merged structure cannot be worked out on the meta "
                        f"device ({type(error).__name__}: {error}); load the weights first") from error
    return stand_in.to("meta")


def apply_plan(model: nn.Module, plan: FusionPlan, *, inplace: bool, backend: str | None = None,
               flush_subnormals: bool = False, index: ModelIndex | None = None) -> nn.Module:
    """Fold ``plan`` into ``model`` (or into a copy), all or nothing.

    Three steps. *Prepare*: check every BN, block merge and tensor to be
    written, and compute every new bias and scale; nothing is modified, and
    any error leaves the caller's model as it was. *Materialize*: for a copy,
    copy the model with the weights to fold left unwritten
    (:func:`fusedconv.copying.copy_for_folding`). *Write*: swap the BNs out,
    store the biases and scale the weights with one batched
    :func:`fusedconv.kernels.rescale_` call (``backend`` picks the backend; by
    default the fastest for the device), then merge the blocks; should a write
    still fail, what was written before it is undone. ``index``: the model's
    :class:`ModelIndex` when the caller has one (its walk is not repeated).
    """
    modules = (index.by_path if index is not None else dict(model.named_modules(remove_duplicate=False))) \
        if plan.folds or plan.merges else {}
    if _first_weight_device(model).type == "meta" or any(
            module_at(modules, fold.layer).weight.is_meta for fold in plan.folds):
        return _fold_structure(model, plan, modules, inplace=inplace)
    paths = index.paths if index is not None else _paths_by_module(modules)  # the root is never folded
    prepared = _prepare(model, plan, modules, inplace=inplace, backend=backend, paths=paths)
    sources = None
    if inplace:
        target, target_modules = model, modules
    else:
        replaced = [module_at(modules, name) for name in prepared.bn_paths]
        sources = [layer.weight for layer in prepared.layers]
        target = copy_for_folding(model, replaced, sources)
        target_modules = dict(target.named_modules(remove_duplicate=False)) if modules else {}
    # Blocks are planned on the model that will change (nothing is modified yet).
    members = index.members if inplace and index is not None else None
    merges = plan_blocks(target, plan.merges, modules=target_modules, members=members) if plan.merges else []
    merged_blocks = [members[name] if members is not None and name in members else
                     submodules(module_at(target_modules, name)) for name in plan.merges]
    check_merges_writable(merges)
    _write(target_modules, prepared, merges, merged_blocks=merged_blocks, backend=backend, sources=sources,
           flush_subnormals=flush_subnormals, kinds=index.kinds if index is not None else None)
    return target
