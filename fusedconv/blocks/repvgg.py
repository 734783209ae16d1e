"""RepVGG blocks: kxk conv + 1x1 conv + identity, each with its BN, deployed as one kxk conv.

Paper: "RepVGG: Making VGG-style ConvNets Great Again", Xiaohan Ding, Xiangyu
Zhang, Ningning Ma, Jungong Han, Guiguang Ding, Jian Sun, CVPR 2021.

:class:`ParallelConvBlock` is the structure RepVGG and MobileOne share (several
kxk ConvBN branches, a 1x1 ConvBN on the centre tap, a BN on the identity);
:class:`RepVGGBlock` and :class:`RepConv` (YOLO's form) are RepVGG's settings
of it, :class:`fusedconv.blocks.mobileone.MobileOneBlock` MobileOne's.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FoldError
from ..reparam import ConvGeometry, Reparameterization, identity_branch
from .base import RepBlock
from .convbn import BATCH_NORMS, ConvBN, check_alignment, check_block_arguments


class ParallelConvBlock(RepBlock):
    """``activation(sum of the branches)`` over ``num_dense`` kxk ConvBN branches, an
    optional 1x1 ConvBN and an optional BN on the identity; deploys to one kxk conv.

    The structure shared by "RepVGG: Making VGG-style ConvNets Great Again"
    (Ding et al., CVPR 2021; one kxk branch) and "MobileOne: An Improved One
    millisecond Mobile Backbone" (Vasu et al., CVPR 2023; several). The branches (attributes, in ``branch_names``):

    * ``dense``: a ``ModuleList`` of ``num_dense`` :class:`ConvBN` with the
      block's kernel, stride, padding, dilation and groups; the first one's
      conv becomes ``deployed_conv``;
    * ``pointwise`` (when ``pointwise``): a 1x1 :class:`ConvBN` with the
      block's stride and groups and padding ``padding - same``, so that its tap
      is the kxk kernel's centre tap;
    * ``identity`` (when ``identity``, or when ``identity`` is None and
      ``in_channels == out_channels``, ``stride == 1`` and the padding is "same"):
      a BatchNorm of the input.

    Accepts odd ``kernel_size`` (the 1x1 and identity branches land on the
    centre tap; an even kernel has none), any stride, dilation and ``groups``
    dividing both channel counts, ``dims`` 1, 2 or 3, and ``padding`` at least
    "same", ``dilation * (kernel_size - 1) // 2`` (the default); less would
    need the 1x1 branch to crop its input. Both rejections raise
    :class:`~fusedconv.errors.FoldError`, as does ``identity=True`` where the
    output does not have the input's shape.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 activation: nn.Module | None = None, dims: int = 2, *, num_dense: int, pointwise: bool,
                 identity: bool | None = None):
        super().__init__(activation)
        padding = check_block_arguments(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, dims,
            why_odd="the 1x1 and identity branches must land on the centre tap of the kxk kernel",
        )
        same = dilation * (kernel_size - 1) // 2
        if pointwise and padding < same:
            raise FoldError(
                f"padding={padding} is less than 'same' padding {same} (dilation * (kernel_size - 1) // 2): the 1x1 "
                "branch would need a negative padding (cropping its input) to line up with the kxk conv"
            )
        self.dense = nn.ModuleList(
            ConvBN(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, dims=dims)
            for _ in range(num_dense)
        )
        target = ConvGeometry.of(self.dense[0].conv)
        names = ["dense"]
        if pointwise:
            # A 1x1 conv reads the same input whatever its dilation; the block's
            # dilation puts its tap on the kxk kernel's tap grid for the merge.
            self.pointwise = ConvBN(in_channels, out_channels, 1, stride, padding - same, dilation, groups, dims=dims)
            check_alignment(ConvGeometry.of(self.pointwise.conv), target, "the 1x1 branch")
            names.append("pointwise")
        if identity is None:
            identity = in_channels == out_channels and stride == 1 and padding == same
        elif identity:
            self._check_identity_possible(in_channels, out_channels, stride, padding, same)
        if identity:
            self.identity = BATCH_NORMS[dims](in_channels)
            check_alignment(identity_branch(target, None, name="identity", dtype=self.identity.weight.dtype,
                                            device=self.identity.weight.device).geometry,
                            target, "the identity branch")
            names.append("identity")
        self.branch_names = tuple(names)

    @staticmethod
    def _check_identity_possible(in_channels: int, out_channels: int, stride: int, padding: int, same: int) -> None:
        """The identity adds the input to the output: both must have the same shape."""
        if in_channels != out_channels:
            raise FoldError(f"identity=True needs in_channels == out_channels (the identity branch adds the input "
                            f"to the output), got {in_channels} and {out_channels}")
        if stride != 1:
            raise FoldError(f"identity=True needs stride 1 (the identity branch adds the input to the output), "
                            f"got stride {stride}")
        if padding != same:
            raise FoldError(f"identity=True needs 'same' padding {same} so that the output has the input's size, "
                            f"got padding {padding}")

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense[0](x)
        for branch in self.dense[1:]:
            out = out + branch(x)
        if "pointwise" in self.branch_names:
            out = out + self.pointwise(x)
        if "identity" in self.branch_names:
            out = out + self.identity(x)
        return out

    def reparameterization(self, name: str) -> Reparameterization:
        target, affine = self.dense[0].conv_and_affine(f"{name}.dense.0")
        branches = [branch.as_branch(f"{name}.dense.{i}") for i, branch in enumerate(self.dense) if i > 0]
        if "pointwise" in self.branch_names:
            branches.append(self.pointwise.as_branch(f"{name}.pointwise"))
        if "identity" in self.branch_names:
            branches.append(identity_branch(ConvGeometry.of(target), self.identity, name=f"{name}.identity",
                                            dtype=target.weight.dtype, device=target.weight.device))
        return Reparameterization(name, target, self.install, after=affine, branches=branches)


class RepVGGBlock(ParallelConvBlock):
    """RepVGG's block: ``activation(kxk ConvBN(x) + 1x1 ConvBN(x) + BN(x))``, deployed as one kxk conv.

    "RepVGG: Making VGG-style ConvNets Great Again", Ding et al., CVPR 2021.

    Branches ``dense`` (a list holding the one kxk :class:`ConvBN`),
    ``pointwise`` (the 1x1 :class:`ConvBN`, on the centre tap) and ``identity``
    (a BN of the input; ``identity=None`` adds it when ``in_channels ==
    out_channels``, ``stride == 1`` and the padding is "same", as RepVGG does).
    :meth:`reparameterize` folds every BN and adds the 1x1 and identity kernels
    into the centre of the kxk conv, which keeps its geometry, dtype, device and
    memory format. Accepted configurations: those of :class:`ParallelConvBlock`
    (odd kernels, any stride, dilation and groups, 1d/2d/3d, padding at least "same").
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 activation: nn.Module | None = None, dims: int = 2, identity: bool | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, activation, dims,
                         num_dense=1, pointwise=True, identity=identity)


class RepConv(RepVGGBlock):
    """YOLO's RepConv (ultralytics, YOLOv6, YOLOv7): RepVGG's block with YOLO's defaults.

    "RepVGG: Making VGG-style ConvNets Great Again", Ding et al., CVPR 2021, as
    used by YOLOv6/v7 and ultralytics (RT-DETR): ``activation(3x3 ConvBN(x) +
    1x1 ConvBN(x) [+ BN(x)])``, deployed as one conv. The defaults are
    ultralytics' ``RepConv``: kernel 3, SiLU (``activation=None`` means SiLU
    here; pass ``nn.Identity()`` for none) and no identity branch (its
    ``bn=False``); ``identity=None`` gives YOLOv6/v7's automatic identity. Same
    branches, merge and accepted configurations as :class:`RepVGGBlock`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 activation: nn.Module | None = None, dims: int = 2, identity: bool | None = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         nn.SiLU() if activation is None else activation, dims, identity)
