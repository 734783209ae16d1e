"""Large-kernel convolutions trained beside small kernels, deployed as the large kernel alone.

Two blocks share one structure: a large kxk conv -> BN, plus small convs ->
BN that read the same input with the same stride and groups and whose
windows are centred on the large one's. Each small kernel lands on the large
kernel's taps (spread by its dilation, when it has one), so the sum of the
branches is one kxk conv:

* :class:`LargeKernelConv`: RepLKNet's re-parameterized large kernel, one
  small kernel beside the large one. "Scaling Up Your Kernels to 31x31:
  Revisiting Large Kernel Design in CNNs", Ding et al., CVPR 2022.
* :class:`DilatedReparamBlock`: UniRepLKNet's Dilated Reparam Block, several
  small dilated kernels beside a large dense one. "UniRepLKNet: A Universal
  Perception Large-Kernel ConvNet for Audio, Video, Point Cloud, Time-Series
  and Image Recognition", Ding et al., CVPR 2024.

This module also holds the argument check that
:mod:`fusedconv.blocks.implicit` uses.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ..errors import FoldError
from ..reparam import ConvGeometry, Reparameterization, bn_affine, conv_branch
from .base import RepBlock
from .convbn import BATCH_NORMS, CONVS, check_alignment, check_block_arguments, check_positive_int

# UniRepLKNet's (kernel_size, dilation) branches for each of its large kernel sizes.
UNIREPLKNET_SMALL_KERNELS = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 2), (3, 3)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}


def conv_and_batchnorm(conv: nn.Module, dims: int) -> nn.Sequential:
    """``conv -> BatchNorm`` as a Sequential with children ``conv`` and ``bn``."""
    return nn.Sequential(OrderedDict(conv=conv, bn=BATCH_NORMS[dims](conv.out_channels)))


class _LargeKernelWithSmallKernels(RepBlock):
    """``large(x) + sum_i small[i](x)``: a kxk conv -> BN and small convs -> BN centred on it.

    Each small branch is a ``(kernel_size, dilation)`` pair; its dilation is
    counted in taps of the large kernel, so its conv's dilation is the pair's
    times the block's, and its padding is whatever centres its window on the
    large one's. The block validates every pair in ``__init__`` with
    :func:`fusedconv.reparam.tap_placement` (through
    :func:`fusedconv.blocks.convbn.check_alignment`), the rule the merge itself uses,
    so a block that builds is a block that merges.
    """

    branch_names = ("large", "small")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int | None, dilation: int, groups: int, activation: nn.Module | None, dims: int,
                 small_kernels: Sequence[tuple[int, int]]):
        super().__init__(activation)
        # Even kernels are fine here: each small kernel's alignment is checked below.
        padding = check_block_arguments(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                        groups, dims, why_odd=None)
        conv = CONVS[dims]
        self.large = conv_and_batchnorm(
            conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False), dims)
        large_geometry = ConvGeometry.of(self.large.conv)
        for pair in small_kernels:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"small_kernels holds (kernel_size, dilation) pairs, got {pair!r}")
        self.small_kernels = tuple(tuple(pair) for pair in small_kernels)
        self.small = nn.ModuleList()
        for small_kernel, small_dilation in self.small_kernels:
            small_padding = self._centred_padding(large_geometry, small_kernel, small_dilation)
            self.small.append(conv_and_batchnorm(
                conv(in_channels, out_channels, small_kernel, stride, small_padding, small_dilation * dilation,
                     groups, bias=False), dims))

    @staticmethod
    def _centred_padding(large: ConvGeometry, kernel_size: int, dilation: int) -> int:
        """The padding that centres a small kernel's window (``dilation`` in large-kernel taps)
        on the large kernel's; raises when its taps cannot all land on the large kernel's."""
        for what, value in (("small kernel_size", kernel_size), ("small kernel dilation", dilation)):
            check_positive_int(value, what)
        big_k, big_p, big_d = large.kernel_size[0], large.padding[0], large.dilation[0]
        spacing = dilation * big_d
        # Centred windows: 2 * padding - spacing * (k - 1) == 2 * big_p - big_d * (big_k - 1).
        # When the two sides differ in parity no integer padding does it, and the
        # floor below makes check_alignment (tap_placement) say that the window is not centred.
        padding = (2 * big_p - big_d * (big_k - 1) + spacing * (kernel_size - 1)) // 2
        geometry = ConvGeometry(large.in_channels, large.out_channels, (kernel_size,) * large.dims,
                                large.stride, (padding,) * large.dims, (spacing,) * large.dims, large.groups)
        check_alignment(geometry, large, f"the small kernel {kernel_size} with dilation {dilation}")
        if padding < 0:
            raise FoldError(
                f"padding={big_p} leaves the small kernel {kernel_size} with dilation {dilation} a padding of "
                f"{padding}: it would have to crop its input to stay centred; use a padding of at least "
                f"{big_p - padding}"
            )
        return padding

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        out = self.large(x)
        for branch in self.small:
            out = out + branch(x)
        return out

    def reparameterization(self, name: str) -> Reparameterization:
        """The large conv absorbs its BN and every small conv scaled by its BN."""
        branches = [conv_branch(branch.conv, branch.bn, name=f"{name}.small.{i}")
                    for i, branch in enumerate(self.small)]
        return Reparameterization(name, self.large.conv, self.install,
                                  after=bn_affine(self.large.bn, f"{name}.large BatchNorm"), branches=branches)


class LargeKernelConv(_LargeKernelWithSmallKernels):
    """RepLKNet's re-parameterized large kernel conv (RepLKNet calls it ReparamLargeKernelConv).

    "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design in
    CNNs", Ding et al., CVPR 2022.

    Training computes ``activation(large(x) + small(x))`` with

    * ``large``: ``kernel_size`` conv -> BN (the block's conv, usually
      depthwise with a kernel of 13 to 31);
    * ``small[0]``: ``small_kernel`` conv -> BN with the same channels,
      stride, groups and dilation, padded so that its window is centred on
      the large one's.

    :meth:`reparameterize` deploys it as the large conv alone: its BN folded,
    the small kernel scaled by its BN and added at the centre; stride,
    padding, dilation, groups, dtype, device and memory format are kept.

    Accepts any ``kernel_size`` and ``small_kernel`` that line up:
    ``small_kernel <= kernel_size`` and ``kernel_size - small_kernel`` even
    (both odd, or both even); ``small_kernel``
    defaults to 5 (RepLKNet's), or ``kernel_size`` when that is smaller.
    Any stride, any ``groups`` dividing both channel counts (dense to
    depthwise), any dilation, ``dims`` 1, 2 or 3, and ``padding`` (default
    "same", ``dilation * (kernel_size - 1) // 2``) at least
    ``dilation * (kernel_size - small_kernel) // 2``. Rejected in ``__init__``
    with the reason: a small kernel that is larger, whose taps cannot be
    centred on the large kernel's (``kernel_size - small_kernel`` odd), or
    that would need a negative padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 activation: nn.Module | None = None, dims: int = 2, small_kernel: int | None = None):
        if small_kernel is None:
            small_kernel = min(5, kernel_size) if isinstance(kernel_size, int) else 5
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, activation,
                         dims, [(small_kernel, 1)])


class DilatedReparamBlock(_LargeKernelWithSmallKernels):
    """UniRepLKNet's Dilated Reparam Block: a large dense kernel trained beside small dilated ones.

    "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio,
    Video, Point Cloud, Time-Series and Image Recognition", Ding et al.,
    CVPR 2024.

    Training computes ``activation(large(x) + sum_i small[i](x))`` with

    * ``large``: ``kernel_size`` conv -> BN (the block's conv);
    * ``small[i]``: for the i-th ``(k, r)`` of ``small_kernels``, a k-tap conv
      -> BN with the same channels, stride and groups whose taps are ``r``
      large-kernel taps apart (conv dilation ``r * dilation``), centred on the
      large window.

    :meth:`reparameterize` deploys it as the large conv alone: each small
    kernel, scaled by its BN, is spread by ``r`` and added at the centre of the
    large kernel, which absorbs its own BN and keeps its geometry, dtype,
    device and memory format.

    ``small_kernels`` defaults to UniRepLKNet's pairs for ``kernel_size`` 5, 7,
    9, 11, 13, 15 or 17 (e.g. 13: (5, 1), (7, 2), (3, 3), (3, 4), (3, 5));
    other kernel sizes need them given (an empty list leaves conv -> BN).
    Accepts any stride, any ``groups`` dividing both channel counts (dense to
    depthwise), any dilation, ``dims`` 1, 2 or 3 and ``padding`` (default
    "same"). Rejected in ``__init__`` with the reason: a pair whose dilated
    extent ``r * (k - 1) + 1`` exceeds ``kernel_size``, whose window cannot be
    centred (``kernel_size - 1 - r * (k - 1)`` odd), or that would need a
    negative padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 activation: nn.Module | None = None, dims: int = 2,
                 small_kernels: Sequence[tuple[int, int]] | None = None):
        if small_kernels is None:
            if kernel_size not in UNIREPLKNET_SMALL_KERNELS:
                raise ValueError(
                    f"UniRepLKNet defines small kernels for kernel_size in {sorted(UNIREPLKNET_SMALL_KERNELS)}, "
                    f"not {kernel_size!r}: pass small_kernels as (kernel_size, dilation) pairs"
                )
            small_kernels = UNIREPLKNET_SMALL_KERNELS[kernel_size]
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, activation,
                         dims, small_kernels)
