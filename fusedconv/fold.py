"""Folding per-channel affine maps into a layer's weight and bias.

The math of DESIGN.md section 2. A layer ``y = W * x + b`` with a BatchNorm
``A`` before it and ``B`` after it (either may be absent) becomes::

    W' = B.scale[o] * W[o, i, ...] * A.scale[i]
    b' = B.scale * (b + sum_{i,k} W[o, i, k] * A.shift[i]) + B.shift

where ``o`` is the output channel and ``i`` the input channel *inside its
group*. Everything is computed in float64 and rounded once to the layer's dtype.
This module also holds the public pairwise API (fold one layer with one BN).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .affine import ChannelAffine, compose
from .errors import FoldError
from .layers import (
    LayerKind,
    bn_channel_affine,
    check_not_training,
    layer_groups,
    layer_in_channels,
    layer_kind,
    layer_out_channels,
    pads_with_zeros,
    why_batchnorm_cannot_fold,
)

# Which of the weight's first two axes holds output / input channels.
# ConvTranspose stores (in, out/groups, *k): its output channel is dim 1 *inside each group*.
_OUT_AXIS = {LayerKind.CONV: 0, LayerKind.CONV_TRANSPOSE: 1, LayerKind.LINEAR: 0}
_IN_AXIS = {LayerKind.CONV: 1, LayerKind.CONV_TRANSPOSE: 0, LayerKind.LINEAR: 1}


def _channel_grid(vec: torch.Tensor, weight_shape: torch.Size, axis: int, groups: int) -> torch.Tensor:
    """Lay a per-channel vector along ``axis`` of a weight so that it broadcasts.

    Axis 0 holds global channel indices. Axis 1 holds an index *inside the group*
    that the row belongs to, so row r of group g = r // (rows/groups) reads
    ``vec[g * cols + j]``. Building the small (rows, cols) grid, rather than
    viewing the weight as (groups, ...), keeps channels_last weights working.
    """
    rows, cols = weight_shape[0], weight_shape[1]
    if axis == 0:
        grid = vec.view(rows, 1)
    else:
        grid = vec.view(groups, 1, cols).expand(groups, rows // groups, cols).reshape(rows, cols)
    return grid.view(grid.shape + (1,) * (len(weight_shape) - 2))


def why_not_exact_before(layer: nn.Module) -> str | None:
    """Why a BatchNorm *before* this layer cannot be folded into it exactly, or None."""
    kind = layer_kind(layer)
    if kind is LayerKind.CONV_TRANSPOSE:
        return (
            "a BatchNorm before a ConvTranspose does not fold exactly: output positions near the borders "
            "and between strides gather different numbers of taps, so the BN shift is not a constant bias"
        )
    if kind is LayerKind.CONV and pads_with_zeros(layer):
        return (
            "the conv pads its input with zeros, and zero-padding BN(x) is not BN of the padded x "
            "(only padding=0 or reflect/replicate/circular padding folds exactly)"
        )
    return None


@dataclass(frozen=True)
class LayerFold:
    """What folding does to one layer: ``weight' = weight * scale`` (``scale`` a small
    float64 grid that broadcasts against the weight, None for 1) and ``bias' = bias``."""

    scale: torch.Tensor | None
    bias: torch.Tensor

    def write_weight(self, source: torch.Tensor, destination: torch.Tensor) -> None:
        """``destination = round(source * scale)``, computed in float64 a few
        output rows at a time so that the float64 temporary stays in cache and
        no second copy of the weight is ever allocated. ``destination`` may be
        ``source`` (in place)."""
        source, destination = source.detach(), destination.detach()
        per_row = max(1, source[0].numel()) if source.shape[0] else 1
        step = max(1, _CHUNK_ELEMENTS // per_row)
        with torch.no_grad():
            for start in range(0, source.shape[0], step):
                block = source[start : start + step].to(torch.float64, copy=True)
                if self.scale is not None:
                    block.mul_(self.scale[start : start + step])
                destination[start : start + step].copy_(block)


# Elements per float64 chunk (512 KiB): small enough for L2, large enough that
# per-chunk overhead stays small.
_CHUNK_ELEMENTS = 1 << 16


def plan_layer_fold(
    layer: nn.Module,
    before: ChannelAffine | None,
    after: ChannelAffine | None,
    *,
    name: str = "layer",
) -> LayerFold:
    """Scale grid and new bias of ``before -> layer -> after``, with every check.

    The layer is not modified. Raises :class:`FoldError` (naming ``name``) when
    the channel counts don't match or ``before`` cannot be folded exactly.
    """
    kind = layer_kind(layer)
    if kind is None:
        raise FoldError(f"{name}: {type(layer).__name__} is not a Conv, ConvTranspose or Linear layer")
    groups = layer_groups(layer)
    weight, bias = layer.weight, layer.bias
    out_channels = layer_out_channels(layer)
    if after is not None and after.scale.numel() != out_channels:
        raise FoldError(
            f"{name}: the BatchNorm after it has {after.scale.numel()} channels but the layer has "
            f"{out_channels} output channels"
        )
    if before is not None:
        reason = why_not_exact_before(layer)
        if reason is not None:
            raise FoldError(f"{name}: {reason}")
        if before.scale.numel() != layer_in_channels(layer):
            raise FoldError(
                f"{name}: the BatchNorm before it has {before.scale.numel()} channels but the layer has "
                f"{layer_in_channels(layer)} input channels"
            )

    device = weight.device
    b = (
        torch.zeros(out_channels, dtype=torch.float64, device=device)
        if bias is None
        else bias.detach().to(torch.float64)
    )
    scale = None
    if before is not None:
        # The BN shift enters every output as sum over inputs and taps of W * shift:
        # a constant per output channel because this layer never pads with zeros.
        w = weight.detach()
        tap_sums = w.sum(dim=tuple(range(2, w.dim())), dtype=torch.float64) if w.dim() > 2 else w.double()
        b = b + (tap_sums * _channel_grid(before.shift.to(device), tap_sums.shape, 1, groups)).sum(dim=1)
        scale = _channel_grid(before.scale.to(device), weight.shape, _IN_AXIS[kind], groups)
    if after is not None:
        out_scale = _channel_grid(after.scale.to(device), weight.shape, _OUT_AXIS[kind], groups)
        scale = out_scale if scale is None else scale * out_scale
        b = b * after.scale.to(device) + after.shift.to(device)
    return LayerFold(scale, b.to(weight.dtype if bias is None else bias.dtype))


def fold_affines(
    layer: nn.Module,
    before: ChannelAffine | None,
    after: ChannelAffine | None,
    *,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """New weight and bias of ``before -> layer -> after``, each rounded once to
    the layer's dtype (same shape, device and memory format). The layer is not modified."""
    fold = plan_layer_fold(layer, before, after, name=name)
    weight = torch.empty_like(layer.weight, requires_grad=False)
    fold.write_weight(layer.weight, weight)
    return weight, fold.bias


def set_bias(layer: nn.Module, bias: torch.Tensor) -> None:
    """Store a folded bias in place (a layer without one gets a new Parameter)."""
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(bias)


def _affine_of(bns: Sequence[nn.Module], role: str) -> ChannelAffine | None:
    affines = []
    for i, bn in enumerate(bns):
        label = f"{role} BatchNorm #{i} ({type(bn).__name__})"
        check_not_training(bn, label)
        reason = why_batchnorm_cannot_fold(bn)
        if reason is not None:
            raise FoldError(f"{label}: {reason}")
        affines.append(bn_channel_affine(bn, label))
    return compose(affines)


def folded_weights(
    layer: nn.Module, before: Sequence[nn.Module] = (), after: Sequence[nn.Module] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``before[...] -> layer -> after[...]`` as one layer.

    ``before`` and ``after`` are BatchNorm modules (eval mode) applied in order
    before the layer's input and after its output. Nothing is modified.
    """
    return fold_affines(layer, _affine_of(before, "before"), _affine_of(after, "after"),
                        name=type(layer).__name__)


def _folded_copy(layer: nn.Module, before: Sequence[nn.Module], after: Sequence[nn.Module]) -> nn.Module:
    fold = plan_layer_fold(layer, _affine_of(before, "before"), _affine_of(after, "after"),
                           name=type(layer).__name__)
    new = copy.deepcopy(layer)
    fold.write_weight(layer.weight, new.weight)
    set_bias(new, fold.bias)
    return new


def fold_conv_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A new layer computing ``bn(layer(x))`` (Conv, ConvTranspose or Linear then an eval-mode BN).

    The inputs are not modified; stride, padding, dilation, groups, padding_mode,
    dtype, device and memory format are kept.
    """
    return _folded_copy(layer, (), (bn,))


def fold_bn_conv(bn: nn.Module, layer: nn.Module) -> nn.Module:
    """A new layer computing ``layer(bn(x))``.

    Exact only for a Linear (on (N, C) input) or a Conv that does not pad with
    zeros; anything else raises :class:`FoldError`.
    """
    return _folded_copy(layer, (bn,), ())
