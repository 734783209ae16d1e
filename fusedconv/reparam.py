"""Structural re-parameterization: parallel linear branches become one convolution.

A re-parameterization block (RepVGG, ACNet, DBB, RepLKNet, MobileOne, ...) sums
branches that are each a convolution followed by a per-output-channel affine
map (its BatchNorm); an identity, an average pool or a small kernel are
convolutions too. At inference the sum is one convolution: the *target* conv
(the branch with the largest kernel, which keeps its module, geometry, dtype,
device and memory format) absorbs its own BN, and every other branch's kernel,
scaled by that branch's BN, is added where its taps land in the target kernel
(docs/DESIGN.md section 2.7, the alignment rule).

:func:`apply_reparameterizations` does that for all blocks of a model at once,
in place: one batched :func:`fusedconv.kernels.rescale_` call for the targets,
one batched :func:`fusedconv.kernels.pad_add_` call for the added branches,
with every product and sum formed in float64. No second copy of the weights is
made; a tap where branches overlap is rounded once per added branch.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import nn

from . import kernels
from .affine import ChannelAffine, batchnorm_affine, batchnorm_affines
from .errors import FoldError
from .fold import LayerFold, plan_layer_folds, rescale_weights, set_biases
from .layers import bn_statistics, layer_out_channels, registered_attribute, why_batchnorm_cannot_fold


@dataclass(frozen=True)
class ConvGeometry:
    """Where a convolution's taps fall: everything but its weights.

    ``padding`` may be negative in a dim: the branch crops its input there
    (ACNet's asymmetric branches when the block pads less than ``k // 2``).
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def dims(self) -> int:
        return len(self.kernel_size)

    def padding_with_zeros(self) -> "ConvGeometry":
        """This geometry, padding with zeros: that of a branch whose forward pads
        with zeros whatever the conv it mirrors does (a functional conv call,
        an explicit pad), so that the merge refuses a target that pads otherwise."""
        return replace(self, padding_mode="zeros")

    @classmethod
    def of(cls, conv: nn.Module) -> "ConvGeometry":
        """The geometry of an ``nn.Conv1d/2d/3d`` (string paddings resolved), or of an
        ``nn.Linear``, a convolution with no spatial dims."""
        if isinstance(conv, nn.Linear):
            return cls(conv.in_features, conv.out_features, (), (), (), ())
        if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed:
            raise FoldError(f"{type(conv).__name__} is not a Conv1d/2d/3d")
        padding = conv.padding
        if padding == "valid":
            padding = (0,) * len(conv.kernel_size)
        elif padding == "same":
            totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
            if any(t % 2 for t in totals):
                raise FoldError(
                    f"padding='same' with kernel {conv.kernel_size} and dilation {conv.dilation} pads "
                    "asymmetrically, which no merged conv with one padding per dim reproduces"
                )
            padding = tuple(t // 2 for t in totals)
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                   tuple(padding), tuple(conv.dilation), conv.groups, conv.padding_mode)


def tap_placement(branch: ConvGeometry, target: ConvGeometry) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Offsets and dilations (per spatial dim) at which a branch's kernel lands in
    the target's kernel, for :func:`fusedconv.kernels.pad_add_`.

    Branch tap ``j`` reads input offset ``-p_s + j * d_s``; it must be target tap
    ``J`` with ``-p_b + J * d_b`` equal to it and ``0 <= J < K``, and both convs
    must produce the same output positions. Raises :class:`FoldError` saying
    which condition fails.
    """
    for what in ("in_channels", "out_channels", "groups", "stride"):
        if getattr(branch, what) != getattr(target, what):
            raise FoldError(
                f"its {what} is {getattr(branch, what)} but the merged conv's is {getattr(target, what)}"
            )
    if branch.dims != target.dims:
        raise FoldError(f"it is a {branch.dims}d conv but the merged conv is {target.dims}d")
    if branch.padding_mode != target.padding_mode and any(p > 0 for p in branch.padding):
        raise FoldError(
            f"it pads with {branch.padding_mode!r} but the merged conv with {target.padding_mode!r}"
        )
    offsets, dilations = [], []
    for dim, (k, p, d, big_k, big_p, big_d) in enumerate(zip(
        branch.kernel_size, branch.padding, branch.dilation, target.kernel_size, target.padding, target.dilation
    )):
        if 2 * p - d * (k - 1) != 2 * big_p - big_d * (big_k - 1):
            raise FoldError(
                f"in spatial dim {dim} its window (kernel {k}, padding {p}, dilation {d}) is not centred like "
                f"the merged conv's (kernel {big_k}, padding {big_p}, dilation {big_d}), so the two produce "
                "different output positions"
            )
        # A single tap has no spacing, so its dilation is irrelevant (a 1x1 or identity
        # branch lands on a dilated kernel's centre tap).
        if (big_p - p) % big_d or (k > 1 and d % big_d):
            raise FoldError(
                f"in spatial dim {dim} its taps (padding {p}, dilation {d}) fall between the merged conv's taps "
                f"(padding {big_p}, dilation {big_d})"
            )
        offset, step = (big_p - p) // big_d, (d // big_d if k > 1 else 1)
        if offset < 0 or offset + step * (k - 1) > big_k - 1:
            raise FoldError(
                f"in spatial dim {dim} its kernel of {k} taps (dilation {d}) reaches outside the merged "
                f"kernel of {big_k} taps (dilation {big_d})"
            )
        offsets.append(offset)
        dilations.append(step)
    return tuple(offsets), tuple(dilations)


# BN id -> its affine map, filled by prefetched_bn_affines for the converters of one plan.
_PREFETCHED: contextvars.ContextVar[dict[int, ChannelAffine]] = contextvars.ContextVar("fusedconv_bn_affines",
                                                                                    default={})


@contextmanager
def prefetched_bn_affines(bns: Sequence[nn.Module]):
    """Within the block, :func:`bn_affine` hands out the affine maps of ``bns``
    computed together (a handful of tensor ops and one host sync in all, instead
    of per BN). If any of them has bad statistics (or tensors that do not fit
    together), nothing is prefetched, so that the converter that reads it
    raises the error naming it."""
    usable = [bn for bn in bns if why_batchnorm_cannot_fold(bn) is None]
    try:
        affines = batchnorm_affines([bn_statistics(bn, type(bn).__name__) for bn in usable])
    except Exception:  # prefetching only saves time: bn_affine reports what is wrong, naming the BN, if a
        affines = []  # converter reads it (one that none reads, a spare with odd tensors, is no error)
    token = _PREFETCHED.set({id(bn): affine for bn, affine in zip(usable, affines)})
    try:
        yield
    finally:
        _PREFETCHED.reset(token)


def bn_affine(bn: nn.Module, name: str = "BatchNorm") -> ChannelAffine:
    """The float64 affine map of an eval-mode BatchNorm, with its statistics checked."""
    prefetched = _PREFETCHED.get().get(id(bn))
    if prefetched is not None:
        return prefetched
    problem = why_batchnorm_cannot_fold(bn)
    if problem:
        raise FoldError(f"{name}: {problem}")
    return batchnorm_affine(bn_statistics(bn, name))


@dataclass
class Branch:
    """One branch added into the target: ``conv(x; weight) + bias``, then its affine map.

    ``weight`` has the target's dtype and device and the layout
    ``(out, in/groups, *kernel)``; it is read, not modified.
    """

    weight: torch.Tensor
    geometry: ConvGeometry
    bias: torch.Tensor | None = None
    affine: ChannelAffine | None = None


def conv_branch(conv: nn.Module, bn: nn.Module | None = None, *, name: str = "branch") -> Branch:
    """A branch made of a Conv and the BatchNorm after it (or none)."""
    return Branch(conv.weight.detach(), ConvGeometry.of(conv), conv.bias,
                  None if bn is None else bn_affine(bn, f"{name} BatchNorm"))


def identity_kernel(channels: int, groups: int, dims: int, *, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """The 1x1 kernel of ``y = x`` for a conv with ``groups``: ``K[i, i mod (C/groups)] = 1``."""
    per_group = channels // groups
    kernel = torch.zeros((channels, per_group) + (1,) * dims, dtype=dtype, device=device)
    index = torch.arange(channels, device=device)
    kernel[(index, index % per_group) + (0,) * dims] = 1
    return kernel


def identity_branch(target: ConvGeometry, bn: nn.Module | None, *, dtype: torch.dtype, device: torch.device,
                    name: str = "identity") -> Branch:
    """The skip branch ``x -> bn(x)`` (RepVGG, MobileOne) as a 1x1 conv branch."""
    if target.in_channels != target.out_channels:
        raise FoldError(f"{name}: an identity branch needs as many input as output channels")
    geometry = ConvGeometry(target.in_channels, target.out_channels, (1,) * target.dims, (1,) * target.dims,
                            (0,) * target.dims, (1,) * target.dims, target.groups, target.padding_mode)
    return Branch(identity_kernel(target.in_channels, target.groups, target.dims, dtype=dtype, device=device),
                  geometry, None, None if bn is None else bn_affine(bn, f"{name} BatchNorm"))


@dataclass
class Reparameterization:
    """How one block becomes one conv, planned without touching the block.

    ``target`` is the Conv that stays; ``before`` and ``after`` are affine maps
    folded into it (its own BN after it, an ImplicitA-style shift before it);
    each of ``branches`` is added into its kernel; ``install`` then swaps the
    block's branches for the target (it must not fail).
    """

    name: str
    target: nn.Module
    install: Callable[[nn.Module], None]
    after: ChannelAffine | None = None
    before: ChannelAffine | None = None
    branches: list[Branch] = field(default_factory=list)
    placements: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    target_fold: LayerFold | None = None


def check_reparameterizations(plans: Sequence[Reparameterization]) -> list[Reparameterization]:
    """Check everything about each plan and compute what it writes (the new
    biases of all targets together); raises :class:`FoldError` naming the block
    and the branch at fault. Nothing is modified."""
    extras = []
    for plan in plans:
        # The target may be any foldable layer (a Linear or ConvTranspose that only
        # absorbs BNs); a kernel geometry is needed only to place branches.
        plan.placements = []
        if not plan.branches:  # a block that only folds BNs (ultralytics' Conv): nothing to place
            extras.append(None)
            continue
        geometry = ConvGeometry.of(plan.target)
        weight = plan.target.weight
        for i, branch in enumerate(plan.branches):
            if branch.weight.dtype != weight.dtype or branch.weight.device != weight.device:
                raise FoldError(
                    f"{plan.name}: branch {i} is {branch.weight.dtype} on {branch.weight.device}, the merged conv "
                    f"{weight.dtype} on {weight.device}"
                )
            try:
                plan.placements.append(tap_placement(branch.geometry, geometry))
            except FoldError as exc:
                raise FoldError(f"{plan.name}: branch {i} cannot be merged: {exc}") from None
        extra = None
        for branch in plan.branches:  # each branch's bias, through its affine map
            bias = (torch.zeros(layer_out_channels(plan.target), dtype=torch.float64, device=weight.device)
                    if branch.bias is None else branch.bias.detach().to(torch.float64))
            if branch.affine is not None:
                bias = bias * branch.affine.scale.to(weight.device) + branch.affine.shift.to(weight.device)
            extra = bias if extra is None else extra + bias
        extras.append(extra)
    folds = plan_layer_folds([p.target for p in plans], [(p.before, p.after) for p in plans],
                             [p.name for p in plans], extras)
    for plan, fold in zip(plans, folds):
        plan.target_fold = fold
    return list(plans)


def check_reparameterization(plan: Reparameterization) -> Reparameterization:
    """:func:`check_reparameterizations` for one plan."""
    return check_reparameterizations([plan])[0]


def apply_reparameterizations(plans: Sequence[Reparameterization], backend: str | None = None) -> None:
    """Merge every checked plan in place: each block installs its target first
    (module swaps only: the plans hold the branches' tensors), then the targets'
    weights are scaled in one batched call, the branches added in another and
    the biases stored. Callers that must undo a failing install take a
    :class:`fusedconv.writing.Rollback` snapshot of the modules first."""
    check_reparameterizations([p for p in plans if p.target_fold is None])
    for plan in plans:
        plan.install(plan.target)
    write_merged_weights(plans, backend)


def write_merged_weights(plans: Sequence[Reparameterization], backend: str | None = None) -> None:
    """The writes of checked merges: the targets' weights scaled in one batched
    call, the branches added in another, the new biases stored together."""
    weights = [registered_attribute(p.target, "weight") for p in plans]
    rescale_weights(weights, [p.target_fold for p in plans], backend)
    bigs, smalls, scales, offsets, dilations = [], [], [], [], []
    for plan, weight in zip(plans, weights):
        for branch, (offset, dilation) in zip(plan.branches, plan.placements):
            bigs.append(weight)
            smalls.append(branch.weight)
            scales.append(None if branch.affine is None else branch.affine.scale.to(branch.weight.device))
            offsets.extend(offset)
            dilations.extend(dilation)
    if bigs:  # blocks that only fold BNs (ultralytics' Conv) add no branch
        kernels.pad_add_(bigs, smalls, scales, offsets, dilations, backend=backend)
    set_biases([p.target for p in plans], [p.target_fold.bias for p in plans],
               owned=[p.target_fold.owns_bias for p in plans])
