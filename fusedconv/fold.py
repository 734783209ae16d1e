"""Folding per-channel affine maps into a layer's weight and bias.

The math of docs/DESIGN.md section 2. A layer ``y = W * x + b`` with a BatchNorm
``A`` before it and ``B`` after it (either may be absent) becomes::

    W' = B.scale[o] * W[o, i, ...] * A.scale[i]
    b' = B.scale * (b + sum_{i,k} W[o, i, k] * A.shift[i]) + B.shift

where ``o`` is the output channel and ``i`` the input channel *inside its
group*. Everything is computed in float64 and rounded once to the layer's dtype.
This module also holds the public pairwise API (fold one layer with one BN).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from . import distributed, kernels
from .affine import ChannelAffine, batchnorm_affines, compose
from .errors import FoldError
from .kernels.extension import native_function
from .kernels.reference import column_factors
from .layers import (
    LayerKind,
    bn_statistics,
    check_not_training,
    has_own_forward,
    layer_groups,
    layer_in_channels,
    layer_kind,
    layer_out_channels,
    pads_with_zeros,
    register_new_parameter,
    registered_attribute,
    why_batchnorm_cannot_fold,
)


def why_not_exact_before(layer: nn.Module) -> str | None:
    """Why a BatchNorm *before* this layer cannot be folded into it exactly, or None."""
    kind = layer_kind(layer)
    if has_own_forward(layer):
        return "it has a forward of its own (a padding computed on the fly, ...), which may transform its input"
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
    return distributed.why_input_sum_not_local(layer)  # exact, but a sharded weight may not allow it


# Not frozen: one is made for every BN or layer of a model, and a frozen
# dataclass's __init__ costs four times as much.
@dataclass(slots=True)
class LayerFold:
    """What folding does to one layer, in the terms of :func:`fusedconv.kernels.rescale_`:
    ``weight[r, c, ...] *= row_scale[r] * col_scale[g(r) * cols + c]`` (float64
    vectors, None for 1) and ``bias' = bias``."""

    row_scale: torch.Tensor | None
    col_scale: torch.Tensor | None
    groups: int
    bias: torch.Tensor
    # Whether ``bias`` is a tensor of this fold's own (no view of a shared batch,
    # nothing else holds it), which a layer without a bias may take as it is.
    owns_bias: bool = False


def rescale_weights(
    weights: Sequence[torch.Tensor],
    folds: Sequence[LayerFold],
    backend: str | None = None,
    sources: Sequence[torch.Tensor] | None = None,
) -> None:
    """Apply each fold's scales to its weight in place, all in one batched call;
    with ``sources``, write each weight from its source instead (one pass for a
    folded copy)."""
    if not weights:  # a fold of blocks only: not even the dispatch of an empty call
        return
    kernels.rescale_(weights, [fold.row_scale for fold in folds], [fold.col_scale for fold in folds],
                     [fold.groups for fold in folds], sources=sources, backend=backend)


def _checked_kind(layer: nn.Module, before: ChannelAffine | None, after: ChannelAffine | None,
                  name: str) -> LayerKind:
    """The layer's kind, once the affine maps are known to fit it."""
    kind = layer_kind(layer)
    if kind is None:
        raise FoldError(f"{name}: {type(layer).__name__} is not a Conv, ConvTranspose or Linear layer")
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
    return kind


def scale_grid(kind: LayerKind, in_scale: torch.Tensor | None, out_scale: torch.Tensor | None):
    """(row, col) factors: Conv and Linear keep output channels on dim 0 and input
    channels (within the group) on dim 1; ConvTranspose stores (in, out/groups, *k)."""
    return (in_scale, out_scale) if kind is LayerKind.CONV_TRANSPOSE else (out_scale, in_scale)


def shift_sums(weight: torch.Tensor, shift: torch.Tensor, groups: int, *, rows: int | None = None,
               first_row: int = 0) -> torch.Tensor:
    """What a BN shift before the layer adds to each output channel, in float64:
    ``sum_{i,k} W[o, i, k] * shift[g(o) * C_in/G + i]`` for every row ``o`` of
    ``weight``. The shift enters every output position alike because the layer
    never pads with zeros (``why_not_exact_before``).

    ``weight`` may be rows ``first_row...`` of a weight of ``rows`` rows (the
    block a rank holds of a sharded weight): each row's sum is the same bits
    either way, since each row is reduced on its own, in the same order.
    """
    w = weight.detach()
    held = w.shape[0]
    shifts = column_factors(shift, held if rows is None else rows, w.shape[1], groups, first_row, first_row + held)
    if held == 1:
        # torch splits a reduction with a single output across threads, in another
        # order than that of the same row among others: reducing the row twice,
        # as two outputs, keeps the per-row order whether the weight is whole or
        # one rank's block.
        w, shifts = torch.cat([w, w]), torch.cat([shifts, shifts])
    tap_sums = w.sum(dim=tuple(range(2, w.dim())), dtype=torch.float64) if w.dim() > 2 else w.double()
    return (tap_sums * shifts).sum(dim=1)[:held]


def _bias_dtype(layer: nn.Module) -> torch.dtype:
    return layer.weight.dtype if layer.bias is None else layer.bias.dtype


def plan_layer_fold(
    layer: nn.Module,
    before: ChannelAffine | None,
    after: ChannelAffine | None,
    *,
    name: str = "layer",
    extra_bias: torch.Tensor | None = None,
) -> LayerFold:
    """Scale grid and new bias of ``before -> layer -> after``, with every check.

    ``extra_bias`` (float64) is added to the new bias before its one rounding
    (the biases of branches merged into the layer). The layer is not modified.
    Raises :class:`FoldError` (naming ``name``) when the channel counts don't
    match or ``before`` cannot be folded exactly.
    """
    kind = _checked_kind(layer, before, after, name)
    groups = layer_groups(layer)
    weight, bias = layer.weight, layer.bias
    device = weight.device
    b = (
        torch.zeros(layer_out_channels(layer), dtype=torch.float64, device=device)
        if bias is None
        else bias.detach().to(torch.float64)
    )
    in_scale = out_scale = None
    if before is not None:
        b = b + shift_sums(weight, before.shift.to(device), groups)
        in_scale = before.scale.to(device)
    if after is not None:
        out_scale = after.scale.to(device)
        b = b * out_scale + after.shift.to(device)
    if extra_bias is not None:
        b = b + extra_bias.to(device)
    row, col = scale_grid(kind, in_scale, out_scale)
    return LayerFold(row, col, groups, b.to(_bias_dtype(layer)))


def plan_layer_folds(
    layers: Sequence[nn.Module],
    affines: Sequence[tuple[ChannelAffine | None, ChannelAffine | None]],
    names: Sequence[str],
    extra_biases: Sequence[torch.Tensor | None] | None = None,
) -> list[LayerFold]:
    """:func:`plan_layer_fold` for many layers at once.

    The common case, a BN after the layer only, has its new biases computed
    for all layers of one device and dtype together: a handful of tensor ops
    however many layers (on a GPU, per-layer ops would cost a launch each).
    """
    extra_biases = extra_biases if extra_biases is not None else [None] * len(layers)
    folds: list[LayerFold | None] = [None] * len(layers)
    # (device, bias dtype) -> (index, kind, bias) of each layer computed together;
    # each layer's tensors are read once (a Module attribute costs a Python call).
    batches: dict[tuple[torch.device, torch.dtype], list[tuple[int, LayerKind, torch.Tensor | None]]] = \
        defaultdict(list)
    for i, (layer, (before, after), name) in enumerate(zip(layers, affines, names)):
        if before is None and after is not None:
            kind = _checked_kind(layer, before, after, name)
            weight, bias = registered_attribute(layer, "weight"), registered_attribute(layer, "bias")
            batches[(weight.device, weight.dtype if bias is None else bias.dtype)].append((i, kind, bias))
        else:
            folds[i] = plan_layer_fold(layer, before, after, name=name, extra_bias=extra_biases[i])
    for (device, dtype), members in batches.items():
        scales = [affines[i][1].scale for i, _, _ in members]
        shifts = [affines[i][1].shift for i, _, _ in members]
        extras = [extra_biases[i] for i, _, _ in members]
        biases = [bias for _, _, bias in members]
        computed = _native_biases(scales, shifts, biases, extras, dtype) if device.type == "cpu" else None
        owned = computed is not None  # each bias a tensor of its own, which a new Parameter may take as it is
        row_scales, new_biases = computed if owned else _batched_biases(scales, shifts, biases, extras, device, dtype)
        for (i, kind, _), row_scale, bias in zip(members, row_scales, new_biases):
            row, col = scale_grid(kind, None, row_scale)
            folds[i] = LayerFold(row, col, layer_groups(layers[i]), bias, owned)
    return folds


def _batched_biases(scales: list[torch.Tensor], shifts: list[torch.Tensor], biases: list[torch.Tensor | None],
                    extras: list[torch.Tensor | None], device: torch.device, dtype: torch.dtype):
    """The row scales and new biases ``round(bias * scale + shift [+ extra])`` of
    layers followed by a BN, all of one device and bias dtype, with a handful of
    torch ops however many layers (on a GPU, per-layer ops would cost a launch
    each); the biases are views of one tensor."""
    sizes = [scale.numel() for scale in scales]  # the layers' output channels (_checked_kind)
    if all(bias is None for bias in biases):  # most convs before a BN: one tensor of zeros
        gathered_biases = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
    else:
        zeros = torch.zeros(max(sizes), dtype=dtype, device=device)
        gathered_biases = torch.cat([zeros[:n] if bias is None else bias.detach()
                                     for bias, n in zip(biases, sizes)]).to(torch.float64)
    gathered = torch.cat(scales)
    scale = gathered.to(device)
    new_biases = gathered_biases * scale + torch.cat(shifts).to(device)
    if any(extra is not None for extra in extras):
        none = torch.zeros(max(sizes), dtype=torch.float64, device=device)
        new_biases += torch.cat([none[:n] if extra is None else extra.to(device) for extra, n in zip(extras, sizes)])
    # The scales themselves where they are on the layers' device already.
    row_scales = scales if scale is gathered else torch.split_with_sizes(scale, sizes)
    return row_scales, torch.split_with_sizes(new_biases.to(dtype), sizes)


def _native_biases(scales: list[torch.Tensor], shifts: list[torch.Tensor], biases: list[torch.Tensor | None],
                   extras: list[torch.Tensor | None], dtype: torch.dtype):
    """:func:`_batched_biases` on the CPU in one call of the extension
    (``csrc/affines.cpp``), each new bias a tensor of its own; None where it is
    not built or does not read these tensors directly."""
    compute = native_function("folded_biases")
    made = compute(scales, shifts, biases, extras, dtype) if compute is not None else None
    return None if made is None else (scales, made)


def new_bias_parameter(layer: nn.Module, values: torch.Tensor) -> nn.Parameter:
    """A new bias Parameter of the layer's own, shaped like ``values``, to be written."""
    return nn.Parameter(torch.empty_like(values, memory_format=torch.contiguous_format),
                        requires_grad=registered_attribute(layer, "weight").requires_grad)


def set_biases(layers: Sequence[nn.Module], biases: Sequence[torch.Tensor], rollback=None,
               new_bias: Callable[[nn.Module, torch.Tensor], nn.Parameter] = new_bias_parameter,
               owned: Sequence[bool] | None = None) -> None:
    """Store folded biases in place, all with one multi-tensor copy; a layer
    without a bias gets ``new_bias(layer, values)`` (by default a new Parameter
    of its own, not a view of a shared batch), or, where ``owned`` says the
    values are a tensor of the fold's own (:attr:`LayerFold.owns_bias`), a
    Parameter made of them, which needs no copy. For a DTensor bias, ``biases``
    hold what this rank holds of it, and its local tensor is written.
    With a :class:`fusedconv.writing.Rollback`, each change is recorded so that it can be undone."""
    with torch.no_grad():
        targets, values = [], []
        for i, (layer, bias) in enumerate(zip(layers, biases)):
            current = registered_attribute(layer, "bias")
            if current is None:
                adopt = owned is not None and owned[i] and new_bias is new_bias_parameter
                new = nn.Parameter(bias, requires_grad=registered_attribute(layer, "weight").requires_grad) \
                    if adopt else new_bias(layer, bias)
                if rollback is None:
                    register_new_parameter(layer, "bias", new)
                else:
                    rollback.setattr(layer, "bias", new)
                # what registration kept (a registration hook may replace it)
                current = registered_attribute(layer, "bias")
                if adopt and current is new:
                    continue  # holds its values already
            elif rollback is not None:
                rollback.keep(distributed.local_tensor(current))
            targets.append(distributed.local_tensor(current))
            values.append(bias)
        if targets:
            torch._foreach_copy_(targets, values)


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
    weight = layer.weight.detach().clone()
    rescale_weights([weight], [fold])
    return weight, fold.bias


def _affine_of(bns: Sequence[nn.Module], role: str) -> ChannelAffine | None:
    stats = []
    for i, bn in enumerate(bns):
        label = f"{role} BatchNorm #{i} ({type(bn).__name__})"
        check_not_training(bn, label)
        reason = why_batchnorm_cannot_fold(bn)
        if reason is not None:
            raise FoldError(f"{label}: {reason}")
        stats.append(bn_statistics(bn, label))
    return compose(batchnorm_affines(stats))


def _refuse_dtensors(modules: Sequence[nn.Module]) -> None:
    """The pairwise API computes with whole tensors; a sharded model is folded by
    every rank at once (:func:`fusedconv.fuse` with ``inplace=True``)."""
    for module in modules:
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if distributed.is_dtensor(tensor):
                raise FoldError(f"{type(module).__name__}.{name}: {distributed.DTENSOR_REFUSAL}")


def folded_weights(
    layer: nn.Module, before: Sequence[nn.Module] = (), after: Sequence[nn.Module] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``before[...] -> layer -> after[...]`` as one layer.

    ``before`` and ``after`` are BatchNorm modules (eval mode) applied in order
    before the layer's input and after its output. Nothing is modified.
    """
    _refuse_dtensors((layer, *before, *after))
    return fold_affines(layer, _affine_of(before, "before"), _affine_of(after, "after"),
                        name=type(layer).__name__)


def _folded_copy(layer: nn.Module, before: Sequence[nn.Module], after: Sequence[nn.Module]) -> nn.Module:
    _refuse_dtensors((layer, *before, *after))
    fold = plan_layer_fold(layer, _affine_of(before, "before"), _affine_of(after, "after"),
                           name=type(layer).__name__)
    new = copy.deepcopy(layer)
    rescale_weights([new.weight], [fold])
    set_biases([new], [fold.bias], owned=[fold.owns_bias])
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
