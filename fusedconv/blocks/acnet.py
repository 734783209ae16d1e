"""ACNet's asymmetric convolution block: kxk + 1xk + kx1 convs with their BNs, deployed as one kxk conv.

Paper: "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via
Asymmetric Convolution Blocks", Xiaohan Ding, Yuchen Guo, Guiguang Ding,
Jungong Han, ICCV 2019.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..reparam import Branch, ConvGeometry, Reparameterization
from .base import RepBlock
from .convbn import ConvBN, check_alignment, check_block_arguments


class ACBlock(RepBlock):
    """Asymmetric Convolution Block: ``activation(kxk ConvBN(x) + 1xk ConvBN(x) + kx1 ConvBN(x))``.

    "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via Asymmetric
    Convolution Blocks", Ding et al., ICCV 2019.

    Branches (2d convs with the block's stride, dilation and groups, each with
    its own BN): ``square`` (kxk, the block's padding ``p``; its conv becomes
    ``deployed_conv``), ``horizontal`` (1xk) and ``vertical`` (kx1). An
    asymmetric branch's one row (column) must be the kxk window's centre row
    (column): along its short side it pads ``p - same`` where
    ``same = dilation * (kernel_size - 1) // 2``. When ``p < same`` that is
    negative, and, as in ACNet, the branch reads its input cropped by
    ``same - p`` rows (columns) on each side instead (:attr:`crop`).
    :meth:`reparameterize` folds the three BNs and adds the 1xk and kx1 kernels
    onto the centre row and column of the kxk conv, which keeps its geometry,
    dtype, device and memory format.

    Accepts odd ``kernel_size`` (an even kernel has no centre row or column for
    the asymmetric branches: rejected with :class:`~fusedconv.errors.FoldError`),
    any non-negative padding (default "same"), any stride, dilation and
    ``groups`` dividing both channel counts. 2d only (``dims=2``): the
    asymmetric branches are 2d kernels, and other ``dims`` raise ValueError.
    """

    branch_names = ("square", "horizontal", "vertical")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 activation: nn.Module | None = None, dims: int = 2):
        super().__init__(activation)
        if dims != 2:
            raise ValueError(f"ACBlock is 2d only (dims=2): its 1xk and kx1 branches are 2d kernels, got dims={dims!r}")
        padding = check_block_arguments(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, dims,
            why_odd="the 1xk and kx1 branches must cross the kxk kernel's centre row and column",
        )
        # The asymmetric branches' padding along their one-tap side; negative: a crop.
        self.short_side_padding = padding - dilation * (kernel_size - 1) // 2
        short = max(self.short_side_padding, 0)
        self.square = ConvBN(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.horizontal = ConvBN(in_channels, out_channels, (1, kernel_size), stride, (short, padding), dilation,
                                 groups)
        self.vertical = ConvBN(in_channels, out_channels, (kernel_size, 1), stride, (padding, short), dilation,
                               groups)
        target = ConvGeometry.of(self.square.conv)
        check_alignment(self._with_crop(ConvGeometry.of(self.horizontal.conv), 0), target, "the 1xk branch")
        check_alignment(self._with_crop(ConvGeometry.of(self.vertical.conv), 1), target, "the kx1 branch")

    @property
    def crop(self) -> int:
        """Rows (1xk branch) or columns (kx1 branch) cut from each side of the input."""
        return max(-self.short_side_padding, 0)

    def _with_crop(self, geometry: ConvGeometry, short_dim: int) -> ConvGeometry:
        """An asymmetric branch's conv geometry with its crop as a negative padding."""
        padding = list(geometry.padding)
        padding[short_dim] = self.short_side_padding
        return dataclasses.replace(geometry, padding=tuple(padding))

    def _cropped(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.narrow(dim, self.crop, x.shape[dim] - 2 * self.crop) if self.crop else x

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        return (self.square(x) + self.horizontal(self._cropped(x, 2))
                + self.vertical(self._cropped(x, 3)))

    def _asymmetric_branch(self, block: ConvBN, short_dim: int, name: str) -> Branch:
        branch = block.as_branch(name)
        branch.geometry = self._with_crop(branch.geometry, short_dim)
        return branch

    def reparameterization(self, name: str) -> Reparameterization:
        target, affine = self.square.conv_and_affine(f"{name}.square")
        branches = [self._asymmetric_branch(self.horizontal, 0, f"{name}.horizontal"),
                    self._asymmetric_branch(self.vertical, 1, f"{name}.vertical")]
        return Reparameterization(name, target, self.install, after=affine, branches=branches)
