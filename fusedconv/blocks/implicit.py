"""YOLOv7's implicit knowledge layers, and the conv they fold into.

Paper: "YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for
real-time object detectors", Wang et al., CVPR 2023.

* :class:`ImplicitA` adds a learned per-channel vector ``a`` to its input;
* :class:`ImplicitM` multiplies its input by a learned per-channel vector ``m``;
* :class:`ImplicitConv` is ``ImplicitM(conv(ImplicitA(x)))``, deployed as the
  conv alone with ``W'[o] = m[o] * W[o]`` and
  ``b'[o] = m[o] * (b[o] + sum_{i,k} W[o, i, k] * a[i])``.

The shift ``a`` becomes a constant bias only when every output reads ``a`` at
every tap, i.e. the conv pads nothing or pads by copying input values
(reflect, replicate, circular): a zero-padded border reads 0, not ``a``.

Standalone use, as in YOLOv7's ``IDetect`` head (one ImplicitA before and one
ImplicitM after each 1x1 output conv)::

    self.ia = nn.ModuleList(ImplicitA(c) for c in channels)
    self.m = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in channels)
    self.im = nn.ModuleList(ImplicitM(outputs) for _ in channels)
    ...
    y = self.im[i](self.m[i](self.ia[i](x[i])))

To merge such a head, register a converter that returns, per level,
``implicit_reparameterization(f"{name}.m.{i}", head.m[i], install, head.ia[i], head.im[i])``
with an ``install`` that replaces ``ia[i]`` and ``im[i]`` by ``nn.Identity()``
(:func:`fusedconv.registry.register_block`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..affine import ChannelAffine
from ..errors import FoldError
from ..reparam import Reparameterization
from .base import RepBlock
from .convbn import CONVS, check_block_arguments, check_dims, check_positive_int

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class _ImplicitVector(nn.Module):
    """A learned per-channel vector ``implicit`` of shape ``(1, channels, 1...)``, drawn from
    ``N(mean, std)``; the shape (YOLOv7's, for ``dims=2``) broadcasts over ``(N, C, *spatial)``."""

    def __init__(self, channels: int, mean: float, std: float, dims: int):
        super().__init__()
        check_positive_int(channels, "channels")
        check_dims(dims)
        self.implicit = nn.Parameter(torch.empty((1, channels) + (1,) * dims))
        nn.init.normal_(self.implicit, mean=mean, std=std)

    def vector(self) -> torch.Tensor:
        """The learned vector as a float64 tensor of shape ``(channels,)`` (exact: a widening cast)."""
        return self.implicit.detach().reshape(-1).to(torch.float64)


class ImplicitA(_ImplicitVector):
    """YOLOv7's implicit addition: ``y = x + a`` with a learned per-channel ``a``.

    "YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for
    real-time object detectors", Wang et al., CVPR 2023.

    ``a`` starts at ``N(mean, std)`` (YOLOv7: 0, 0.02) and has shape
    ``(1, channels, 1...)`` with ``dims`` trailing ones, so ``dims=2`` loads
    YOLOv7's checkpoints. Usable standalone (before a conv in an IDetect-like
    head) or inside :class:`ImplicitConv`; it folds into the conv after it as
    ``before=`` :meth:`channel_affine`, exactly when that conv does not zero-pad.
    """

    def __init__(self, channels: int, mean: float = 0.0, std: float = 0.02, *, dims: int = 2):
        super().__init__(channels, mean, std, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.implicit

    def channel_affine(self) -> ChannelAffine:
        """The map ``x -> 1 * x + a`` per channel, in float64."""
        shift = self.vector()
        return ChannelAffine(torch.ones_like(shift), shift)


class ImplicitM(_ImplicitVector):
    """YOLOv7's implicit multiplication: ``y = x * m`` with a learned per-channel ``m``.

    "YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for
    real-time object detectors", Wang et al., CVPR 2023.

    ``m`` starts at ``N(mean, std)`` (YOLOv7: 1, 0.02) and has shape
    ``(1, channels, 1...)`` like :class:`ImplicitA`. Usable standalone (after a
    conv in an IDetect-like head) or inside :class:`ImplicitConv`; it always
    folds into the conv before it as ``after=`` :meth:`channel_affine`.
    """

    def __init__(self, channels: int, mean: float = 1.0, std: float = 0.02, *, dims: int = 2):
        super().__init__(channels, mean, std, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.implicit

    def channel_affine(self) -> ChannelAffine:
        """The map ``x -> m * x + 0`` per channel, in float64."""
        scale = self.vector()
        return ChannelAffine(scale, torch.zeros_like(scale))


def implicit_reparameterization(name: str, conv: nn.Module, install: Callable[[nn.Module], None],
                                implicit_add: ImplicitA | None = None,
                                implicit_multiply: ImplicitM | None = None) -> Reparameterization:
    """The merge of ``implicit_multiply(conv(implicit_add(x)))`` into ``conv`` (either may be None).

    For a converter of a model that uses :class:`ImplicitA`/:class:`ImplicitM`
    standalone; ``install`` must take them out of the forward (e.g. replace them
    by ``nn.Identity()``). Checking the plan raises :class:`FoldError` when
    ``conv`` zero-pads and ``implicit_add`` is given.
    """
    return Reparameterization(
        name, conv, install,
        before=None if implicit_add is None else implicit_add.channel_affine(),
        after=None if implicit_multiply is None else implicit_multiply.channel_affine(),
    )


class ImplicitConv(RepBlock):
    """YOLOv7's implicit knowledge around a conv: ``ImplicitA -> conv (+ bias) -> ImplicitM``.

    "YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for
    real-time object detectors", Wang et al., CVPR 2023.

    Training computes ``activation(m * conv(x + a))`` with learned
    per-channel vectors ``a`` (``implicit_add``, in_channels) and ``m``
    (``implicit_multiply``, out_channels). :meth:`reparameterize` deploys the
    conv alone, ``W'[o] = m[o] * W[o]`` and
    ``b'[o] = m[o] * (b[o] + sum_{i,k} W[o, i, k] * a[i])`` (a conv built with
    ``bias=False`` gets a bias), keeping its geometry, padding mode, dtype,
    device and memory format.

    Accepts any ``kernel_size``, stride, ``groups`` dividing both channel
    counts, dilation and ``dims`` 1, 2, 3, with ``padding_mode`` one of
    'zeros', 'reflect', 'replicate', 'circular'. ``padding`` defaults to
    "same" (``dilation * (kernel_size - 1) // 2``). Rejected in ``__init__``
    with the reason: a conv that zero-pads (``padding > 0`` with
    ``padding_mode='zeros'``, so any ``kernel_size > 1`` at the default
    padding): the border would read zeros instead of ``a``, so the shift is
    not a constant bias. Use ``padding=0`` or a copying ``padding_mode``.
    """

    branch_names = ("implicit_add", "conv", "implicit_multiply")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 activation: nn.Module | None = None, dims: int = 2, bias: bool = True,
                 padding_mode: str = "zeros"):
        super().__init__(activation)
        padding = check_block_arguments(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                        groups, dims, why_odd=None)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if padding > 0 and padding_mode == "zeros":
            raise FoldError(
                f"the conv zero-pads its input (padding={padding}): ImplicitA's shift added before zero padding "
                "is not a constant bias (the padded border reads 0, not the shift), so it cannot be folded; "
                "use padding=0 or padding_mode 'reflect', 'replicate' or 'circular'"
            )
        self.implicit_add = ImplicitA(in_channels, dims=dims)
        self.conv = CONVS[dims](in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                bias=bias, padding_mode=padding_mode)
        self.implicit_multiply = ImplicitM(out_channels, dims=dims)

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit_multiply(self.conv(self.implicit_add(x)))

    def reparameterization(self, name: str) -> Reparameterization:
        """The conv absorbs ImplicitA as a bias and ImplicitM as an output scale."""
        return implicit_reparameterization(name, self.conv, self.install, self.implicit_add,
                                           self.implicit_multiply)
