"""MobileOne's block: over-parameterized kxk ConvBN branches, a 1x1 "scale" ConvBN and an identity BN.

Paper: "MobileOne: An Improved One millisecond Mobile Backbone", Pavan Kumar
Anasosalu Vasu, James Gabriel, Jeff Zhu, Oncel Tuzel, Anurag Ranjan, CVPR 2023.
"""

from __future__ import annotations

from torch import nn

from .convbn import check_positive_int
from .repvgg import ParallelConvBlock


class MobileOneBlock(ParallelConvBlock):
    """MobileOne's block: ``activation(sum_b kxk ConvBN_b(x) + 1x1 ConvBN(x) + BN(x))``, deployed as one kxk conv.

    "MobileOne: An Improved One millisecond Mobile Backbone", Vasu et al., CVPR 2023.

    Branches: ``dense``, ``num_branches`` kxk :class:`~fusedconv.blocks.convbn.ConvBN`
    (MobileOne's over-parameterization factor k); ``pointwise``, MobileOne's
    1x1 "scale" ConvBN on the centre tap, left out when ``kernel_size == 1``
    (MobileOne's pointwise blocks, where it would be one more 1x1 branch); and
    ``identity``, a BN of the input (``identity=None``: when ``in_channels ==
    out_channels``, ``stride == 1`` and the padding is "same"). MobileOne uses
    it as a depthwise kxk block (``groups == in_channels``) followed by a 1x1
    block (``kernel_size=1``). :meth:`reparameterize` folds every BN and adds all
    branches into the first kxk conv, which keeps its geometry, dtype, device and
    memory format. Accepted configurations: those of
    :class:`~fusedconv.blocks.repvgg.ParallelConvBlock` (odd kernels, any stride,
    dilation and groups, 1d/2d/3d, padding at least "same") and ``num_branches >= 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 activation: nn.Module | None = None, dims: int = 2, num_branches: int = 1,
                 identity: bool | None = None):
        check_positive_int(num_branches, "num_branches (the number of kxk branches)")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, activation, dims,
                         num_dense=num_branches, pointwise=kernel_size != 1, identity=identity)
