"""Folding a sharded model in place: every rank writes the blocks it holds, together.

FSDP2 (``fully_shard``), ``distribute_module``/``distribute_tensor`` and
tensor-parallel plans keep parameters as DTensors, of which each rank holds one
block (:mod:`fusedconv.distributed`). :func:`fuse_sharded` folds such a model
as :func:`fusedconv.fuse` folds any other, each rank writing only what it holds:

* each weight block is scaled in place by the same exact kernels
  (:func:`fusedconv.kernels.rescale_`) with the rank's slice of each
  per-channel scale: the rows and columns of its block, and the groups those
  rows fall in;
* each rank computes the channels of the bias it holds; a layer without a bias
  gets a DTensor bias on the weight's mesh, split like the weight's output
  channels. Where FSDP2 manages the layer, the new bias joins the FSDP2
  parameter group of its weight (:class:`fusedconv.distributed.NewFsdpBiases`),
  which splits it along dim 0 like any parameter and from then on gathers,
  casts (mixed precision), reduces (gradients) and saves it like the weight;
  each rank writes the chunk FSDP2 gave it (for a Conv or Linear, the channels
  of the weight rows it holds, so a BN before the layer folds too). This relies on
  FSDP2 internals, checked while planning: where they differ, or the group
  cannot take the bias, the BN is left with the reason
  (:func:`fusedconv.distributed.why_no_new_bias`). An optimizer made before
  the fold does not hold the new biases: make it after;
* BatchNorm statistics are small: DTensor ones are gathered whole
  (``full_tensor``), so that every rank computes the same float64 affine maps.

No weight is gathered, and every element written is the one the fold of the
unsharded model writes, bit for bit. Placements other than ``Shard`` and
``Replicate`` (``Partial``, ``_StridedShard``) are refused.

Every rank of the model's device mesh calls :func:`fusedconv.fuse` on its part
of the same model. After each stage the ranks compare notes in one collective
(``all_gather_object``): after planning (the same plan, every placement
understood), after the checks (the same statistics, nothing refused on any
rank) and after the writes. An error on any rank is raised on every rank, and
before any rank writes anything; every rank reaches the same collectives in
the same order, failing or not, so none waits forever.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from . import kernels
from .affine import BatchNormStats, ChannelAffine
from .distributed import (
    Block,
    FsdpHold,
    NewFsdpBiases,
    dtensor_class,
    fsdp_bias_placements,
    fsdp_hold,
    fsdp_modules,
    is_dtensor,
    local_block,
    local_tensor,
    managed_by_fsdp,
    placed_block,
    why_fsdp_stops_fold,
    why_input_sum_not_local,
)
from .errors import FoldError
from .fold import LayerFold, new_bias_parameter, rescale_weights, scale_grid, set_biases, shift_sums
from .fusion_plan import Fold, FusionPlan
from .layers import LayerKind, bn_statistics, layer_groups, layer_kind, layer_out_channels
from .model_index import ModelIndex
from .rules import check_foldable, checked_affines, make_plan, module_at
from .writing import Rollback, check_folded_range, check_writable, subnormal_weights, swap_batchnorms

_Result = TypeVar("_Result")


class _Ranks:
    """The ranks that hold the model, and the collective they all run after each stage."""

    def __init__(self, group: object):
        self.group = group
        self.ranks = dist.get_process_group_ranks(group)

    def agree(self, stage: str, step: Callable[[], tuple[_Result, object]], *, subject: str = "",
              after_failure: str = "no rank has written anything", error: type[Exception] = FoldError) -> _Result:
        """Run ``step`` here, which returns its result and a digest of what every rank
        must share (``subject`` says what, for the error), then learn how it went
        on every rank: raise on every rank if it failed on any, or if the digests
        differ. A rank's own exception is raised on that rank as it is; the
        others raise ``error``, saying where it happened and ``after_failure``."""
        failure: Exception | None = None
        result, digest = None, None
        try:
            result, digest = step()
        except Exception as raised:  # reported to every rank first, so that none waits for this one
            failure = raised
        reports: list = [None] * len(self.ranks)
        message = None if failure is None else f"{type(failure).__name__}: {failure}"
        dist.all_gather_object(reports, (digest, message), group=self.group)
        if failure is not None:
            raise failure
        for rank, (_, problem) in zip(self.ranks, reports):
            if problem is not None:
                raise error(f"{stage} failed on rank {rank} ({problem}); {after_failure}")
        for rank, (other, _) in zip(self.ranks, reports):
            if other != reports[0][0]:
                raise error(
                    f"ranks {self.ranks[0]} and {rank} disagree on {subject}: every rank must fold the same model "
                    f"(same structure, placements and BatchNorm statistics); {after_failure}")
        return result


def _process_group(model: nn.Module) -> object:
    """The process group of the ranks that hold ``model``: the group of its
    DTensors' one device mesh (the default group for a multi-dimensional mesh
    over every rank). Raises :class:`FoldError` for DTensors on several meshes,
    or a multi-dimensional mesh over part of the ranks."""
    distinct = {id(t.device_mesh): t.device_mesh for t in (*model.parameters(), *model.buffers()) if is_dtensor(t)}
    meshes = {(mesh.device_type, tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist())): mesh
              for mesh in distinct.values()}
    if len(meshes) != 1:
        raise FoldError(
            f"{type(model).__name__} holds DTensors on {len(meshes)} device meshes ({', '.join(map(str, meshes))}): "
            "fusedconv folds the DTensors of one mesh" if meshes else
            f"{type(model).__name__} was sharded with fully_shard but holds no DTensor to fold")
    mesh = next(iter(meshes.values()))
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    raise FoldError(f"{type(model).__name__} is sharded on a {mesh.ndim}-dimensional mesh over {mesh.size()} of "
                    f"{dist.get_world_size()} ranks: fusedconv folds on a one-dimensional mesh, or on a mesh over "
                    "every rank")


@dataclass(frozen=True)
class _Layout:
    """Where a layer to fold lies on this rank."""

    name: str
    layer: nn.Module
    kind: LayerKind
    weight: Block  # the block of the weight this rank holds
    bias: Block  # the block of the bias (of the new bias, for a layer without one)
    new_bias_placements: tuple | None  # the new DTensor bias's placements; None: a bias exists, or a plain one
    fsdp_weight: FsdpHold | None  # for a new bias that joins the FSDP2 group of the weight

    def digest(self) -> tuple:
        weight, bias = self.layer.weight, self.layer.bias
        return (self.name, tuple(weight.shape), str(getattr(weight, "placements", "plain")),
                str(getattr(bias, "placements", "plain" if bias is not None else self.new_bias_placements)))


def _new_bias_placements(weight: torch.Tensor, kind: LayerKind, groups: int) -> tuple:
    """A new bias's placements: split where the weight splits its output channels
    (so that each rank holds the bias of the rows it holds), replicated elsewhere."""
    from torch.distributed.tensor import Replicate, Shard

    out_dim = 0 if kind is not LayerKind.CONV_TRANSPOSE else 1 if groups == 1 else None
    return tuple(Shard(0) if out_dim is not None and placement.is_shard(out_dim) else Replicate()
                 for placement in weight.placements)


def _layout(index: ModelIndex, fold: Fold) -> _Layout:
    """The layer's layout, after checking that this rank can fold its part of it
    now (the plan may have been made elsewhere, or before a forward began)."""
    name, layer = fold.layer, module_at(index.by_path, fold.layer)
    kind, weight, bias = layer_kind(layer), layer.weight, layer.bias
    problem = why_fsdp_stops_fold(layer) or (why_input_sum_not_local(layer) if fold.before else None)
    if problem:
        raise FoldError(f"{name}: {problem}")
    weight_block = local_block(weight, f"{name}.weight")
    placements, weight_in_fsdp = None, None
    if bias is not None:
        bias_block = local_block(bias, f"{name}.bias")
    elif managed_by_fsdp(layer):  # why_no_new_bias found its weight's group, sharded after fuse_sharded's reshard
        weight_in_fsdp = fsdp_hold(layer)
        placements = fsdp_bias_placements(weight)
        bias_block = placed_block((layer_out_channels(layer),), weight.device_mesh, placements)
    elif is_dtensor(weight):
        placements = _new_bias_placements(weight, kind, layer_groups(layer))
        bias_block = placed_block((layer_out_channels(layer),), weight.device_mesh, placements)
    else:
        bias_block = Block((0,), (layer_out_channels(layer),))
    return _Layout(name, layer, kind, weight_block, bias_block, placements, weight_in_fsdp)


def _planned(model: nn.Module, plan: FusionPlan | None,
             example_inputs: tuple | None) -> tuple[tuple[ModelIndex, FusionPlan, list[_Layout]], tuple]:
    """The plan (made here unless given) and each folded layer's layout, and the
    digest that every rank must share: the folds, the BNs left, the placements."""
    check_foldable(model)
    if any(local_tensor(t).is_meta for t in model.parameters()):
        raise FoldError(f"{type(model).__name__} is sharded on the meta device: load its weights first (the "
                        "structure of a meta model is folded only unsharded)")
    index = ModelIndex(model)
    if plan is None:
        plan = make_plan(model, example_inputs, check_stats=False, index=index)
    if plan.merges:
        raise FoldError(f"merging re-parameterization blocks ({plan.merges[0]}, ...) of a sharded model is not "
                        "supported: merge them before sharding (fusedconv.reparameterize(model))")
    layouts = [_layout(index, fold) for fold in plan.folds]
    for fold in plan.folds:
        for name in fold.batchnorms:
            stats = bn_statistics(module_at(index.by_path, name), name)
            for tensor in (stats.running_mean, stats.running_var, stats.weight, stats.bias):
                if tensor is not None:  # checked here, where a failure on one rank reaches all, before any gather
                    local_block(tensor, name)
    digest = (plan.folds, [skip.module for skip in plan.skipped], [layout.digest() for layout in layouts])
    return (index, plan, layouts), digest


def _gathered_whole(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``full_tensor()`` of each DTensor among ``tensors`` (others as they are),
    with one collective per group of alike DTensors (same mesh, placements,
    shape and dtype: a model's BN parameters fall in a few such groups) instead
    of one per tensor: the group's local blocks are stacked along a new first
    dim, gathered whole as one DTensor, and split. Only plain ``Shard`` and
    ``Replicate`` placements are stacked; anything else is gathered alone.
    Collectives: every rank passes the same tensors in the same order."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    whole = list(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, tensor in enumerate(tensors):
        if not is_dtensor(tensor):
            continue
        if all(type(p) in (Shard, Replicate) for p in tensor.placements):
            key = (id(tensor.device_mesh), tuple(tensor.placements), tuple(tensor.shape), tensor.dtype)
            groups.setdefault(key, []).append(i)
        else:
            whole[i] = tensor.full_tensor()
    for members in groups.values():
        first = tensors[members[0]]
        placements = [Shard(p.dim + 1) if isinstance(p, Shard) else p for p in first.placements]
        shape = (len(members), *first.shape)
        stride = torch.empty(shape, device="meta").stride()
        stacked = DTensor.from_local(torch.stack([tensors[i].to_local() for i in members]), first.device_mesh,
                                     placements, run_check=False, shape=shape, stride=stride)
        for i, gathered in zip(members, stacked.full_tensor()):
            whole[i] = gathered
    return whole


def _whole_statistics(index: ModelIndex, folds: list[Fold]) -> dict[str, BatchNormStats]:
    """Each folded BN's statistics, with DTensors gathered whole (together:
    :func:`_gathered_whole`); every rank gathers the same BNs in the same order
    (the plans agree)."""
    stats = [bn_statistics(module_at(index.by_path, name), name) for fold in folds for name in fold.batchnorms]
    fields = ("running_mean", "running_var", "weight", "bias")
    with torch.no_grad():
        gathered = iter(_gathered_whole([getattr(s, f) for s in stats for f in fields]))
    return {s.name: dataclasses.replace(s, **{f: next(gathered) for f in fields}) for s in stats}


def _groups_held(rows: range, total_rows: int, groups: int, name: str) -> tuple[int, int]:
    """The first group and the number of groups of the weight rows this rank holds,
    which the kernels scale as a weight of its own: whole groups, or part of one."""
    per_group = total_rows // groups
    if not rows:
        return 0, 1
    first, last = rows.start // per_group, (rows.stop - 1) // per_group
    if first == last:
        return first, 1
    if rows.start % per_group == 0 and rows.stop % per_group == 0:
        return first, last - first + 1
    raise FoldError(f"{name}: this rank holds rows {rows.start} to {rows.stop - 1} of its weight, which split its "
                    f"groups of {per_group} rows; fusedconv folds blocks of whole groups, or within one group")


def _local_bias(layout: _Layout, before: ChannelAffine | None, after: ChannelAffine | None,
                device: torch.device) -> torch.Tensor:
    """The folded bias channels this rank holds, computed as the unsharded fold
    computes them (:func:`fusedconv.fold.plan_layer_fold`), channel by channel."""
    layer, channels = layout.layer, layout.bias.span(0)
    if layer.bias is None:
        bias = torch.zeros(len(channels), dtype=torch.float64, device=device)
    else:
        bias = local_tensor(layer.bias).detach().to(torch.float64)
    if before is not None:
        rows = layout.weight.span(0)
        if channels.start < rows.start or channels.stop > rows.stop:  # the placements check rules this out
            raise FoldError(f"{layout.name}: this rank holds bias channels whose weight rows it does not hold")
        held = local_tensor(layer.weight)[channels.start - rows.start:channels.stop - rows.start]
        bias = bias + shift_sums(held, before.shift.to(device), layer_groups(layer), rows=layer.weight.shape[0],
                                 first_row=channels.start)
    if after is not None:
        bias = (bias * after.scale.to(device)[channels.start:channels.stop]
                + after.shift.to(device)[channels.start:channels.stop])
    return bias.to((layer.weight if layer.bias is None else layer.bias).dtype)


def _local_fold(layout: _Layout, before: ChannelAffine | None, after: ChannelAffine | None) -> LayerFold:
    """The fold of this rank's block of the layer's weight, in the kernels' terms."""
    weight = layout.layer.weight
    device = local_tensor(weight).device
    row_scale, col_scale = scale_grid(layout.kind, None if before is None else before.scale.to(device),
                                      None if after is None else after.scale.to(device))
    rows, cols = layout.weight.span(0), layout.weight.span(1)
    local_rows = None if row_scale is None else row_scale[rows.start:rows.stop]
    groups, local_cols = 1, None
    if col_scale is not None:  # a column's factor depends on its row's group: the block's groups, sliced
        total_groups = layer_groups(layout.layer)
        first, groups = _groups_held(rows, weight.shape[0], total_groups, layout.name)
        local_cols = col_scale.view(total_groups, weight.shape[1])[first:first + groups, cols.start:cols.stop]
        local_cols = local_cols.reshape(-1)
    return LayerFold(local_rows, local_cols, groups, _local_bias(layout, before, after, device))


def _affines_digest(affines: list[tuple[ChannelAffine | None, ChannelAffine | None]]) -> str:
    digest = hashlib.sha256()
    for pair in affines:
        for affine in pair:
            for values in () if affine is None else (affine.scale, affine.shift):
                digest.update(values.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class _Checked:
    """What this rank will write, every check passed."""

    folds: list[LayerFold]
    weights: list[torch.Tensor]  # the local tensors of the weights
    smallest_factors: list[float]


def _checked(index: ModelIndex, plan: FusionPlan, layouts: list[_Layout], whole: dict[str, BatchNormStats],
             backend: str | None) -> tuple[_Checked, str]:
    """Every check of an unsharded fold, on what this rank holds, and the digest
    of the BN affine maps, which every rank must share."""
    affines = checked_affines(index.by_path, plan.folds, read=lambda bn, name: whole[name])
    folds = [_local_fold(layout, before, after) for layout, (before, after) in zip(layouts, affines)]
    names = [layout.name for layout in layouts]
    weights = [local_tensor(layout.layer.weight) for layout in layouts]
    check_writable(((f"{name}.weight", weight) for name, weight in zip(names, weights)), in_place=True)
    check_writable(((f"{layout.name}.bias", None if layout.layer.bias is None else local_tensor(layout.layer.bias))
                    for layout in layouts), in_place=True)
    _, smallest = check_folded_range(weights, folds, names)
    if weights:
        kernels.resolve(weights[0].device, backend)  # a backend asked for by name must load
    return _Checked(folds, weights, smallest), _affines_digest(affines)


def _new_bias(layouts: dict[int, _Layout], layer: nn.Module, values: torch.Tensor,
              fsdp_biases: NewFsdpBiases) -> nn.Parameter:
    """A new bias for ``layer``, whose local part will hold ``values``: a DTensor on
    the weight's mesh when the weight is one, in the FSDP2 parameter group of the
    weight when FSDP2 manages the layer."""
    layout = layouts[id(layer)]
    if layout.fsdp_weight is not None:
        return fsdp_biases.add(layer, layout.fsdp_weight, layer_out_channels(layer))
    if layout.new_bias_placements is None:
        return new_bias_parameter(layer, values)
    local = torch.empty_like(values, memory_format=torch.contiguous_format)
    bias = dtensor_class().from_local(local, layer.weight.device_mesh, layout.new_bias_placements, run_check=False,
                                      shape=torch.Size([layer_out_channels(layer)]), stride=(1,))
    return nn.Parameter(bias, requires_grad=layer.weight.requires_grad)


def _write(index: ModelIndex, plan: FusionPlan, layouts: list[_Layout], checked: _Checked, *,
           backend: str | None, flush_subnormals: bool) -> tuple[None, None]:
    """Swap the BNs out, store the bias channels and scale the weight blocks this
    rank holds (one batched call); a failure undoes what was written before it,
    new biases added to FSDP2's groups included."""
    bn_paths = {name: index.paths[id(module_at(index.by_path, name))]
                for fold in plan.folds for name in fold.batchnorms}
    by_layer = {id(layout.layer): layout for layout in layouts}
    with Rollback() as rollback, NewFsdpBiases() as fsdp_biases:
        swap_batchnorms(index.by_path, bn_paths, rollback)
        set_biases([layout.layer for layout in layouts], [fold.bias for fold in checked.folds], rollback,
                   new_bias=lambda layer, values: _new_bias(by_layer, layer, values, fsdp_biases))
        rescale_weights(checked.weights, checked.folds, backend)
    subnormal_weights(checked.weights, checked.folds, [layout.name for layout in layouts], flush=flush_subnormals,
                      smallest=checked.smallest_factors)
    return None, None


def fuse_sharded(model: nn.Module, plan: FusionPlan | None, example_inputs: tuple | None, *, inplace: bool,
                 backend: str | None, flush_subnormals: bool) -> FusionPlan:
    """Fold the sharded ``model`` in place, this rank's blocks, together with every
    other rank of its device mesh (module docstring); returns the plan applied.

    Modules that ``fully_shard`` was applied to are resharded first: the sharded
    parameters are the model's, and an unsharded copy gathered by a forward
    would be stale once they are folded. Raises :class:`FoldError` on every
    rank, before any rank writes, when the fold is refused on any rank.
    """
    if not inplace:
        raise FoldError("a sharded model (DTensor parameters, FSDP2) is not copied (FSDP2 refuses deepcopy, and "
                        "DTensors belong to their process group): fold it in place, fusedconv.fuse(model, "
                        "inplace=True), on every rank")
    for module in fsdp_modules(model):
        module.reshard()
    ranks = _Ranks(_process_group(model))
    index, agreed, layouts = ranks.agree("planning", lambda: _planned(model, plan, example_inputs),
                                         subject="the plan")
    whole = _whole_statistics(index, agreed.folds)
    checked = ranks.agree("checking", lambda: _checked(index, agreed, layouts, whole, backend),
                          subject="the BatchNorm statistics")
    ranks.agree("writing", lambda: _write(index, agreed, layouts, checked, backend=backend,
                                          flush_subnormals=flush_subnormals),
                after_failure="the ranks that did not fail have folded their blocks, so the model now differs "
                              "across ranks: load it again", error=RuntimeError)
    return agreed
