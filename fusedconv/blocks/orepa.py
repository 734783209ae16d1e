"""OREPA: a block whose branches are merged into one kernel at every training step.

Paper: "Online Convolutional Re-parameterization", Mu Hu, Junyi Feng, Jiashen
Hua, Baisheng Lai, Jianqiang Huang, Xiaojin Gong, Xian-Sheng Hua, CVPR 2022.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..affine import ChannelAffine
from ..kernels.reference import round_from_float64
from ..reparam import Branch, ConvGeometry, Reparameterization, bn_affine
from .base import RepBlock
from .convbn import BATCH_NORMS, CONVS, check_block_arguments
from .dbb import (
    CONV_FUNCTIONS,
    WHY_ODD,
    IdentityBasedConv1x1,
    average_pool_kernel,
    check_internal_channels,
    compose_pointwise_then_kxk,
    scale_output_channels,
)


class OREPABlock(RepBlock):
    """Online re-parameterization (OREPA): linear branches squeezed into one kernel, one BN.

    "Online Convolutional Re-parameterization", Hu et al., CVPR 2022.

    OREPA drops the per-branch BatchNorms of DBB-like blocks and scales each
    branch's kernel by a learned per-output-channel vector instead, so that the
    branches stay linear in their *weights* and are summed into one kxk kernel
    before the convolution: training runs a single conv, then a single BN.
    Training computes ``activation(bn(conv(x, K)))`` with
    ``K = sum_b branch_scales[b, o] * K_b`` over the branches implemented here:

    * ``origin``: a kxk kernel, held by the conv ``conv``;
    * ``pointwise``: a 1x1 kernel placed on the centre tap;
    * ``prior``: OREPA's average prior, a 1x1 kernel spread evenly over the
      kxk window (a 1x1 conv followed by an average pool);
    * ``expand``: a 1x1 conv to ``internal_channels`` (identity plus a learned
      residual, so it starts as a copy of the input) followed by a kxk conv,
      composed per group.

    The branch scales start at OREPA's values (origin 0.25, pointwise 1.0,
    prior 0.25, expand 0.5). Not implemented: OREPA's frequency prior branch
    (its scale starts at 0) and its depthwise-separable branch.

    Deploys to ``conv`` alone: :meth:`reparameterize` computes ``K`` in float64,
    folds the BN into it and rounds once. Since the block is a single conv in
    training too, every geometry merges exactly: odd ``kernel_size`` from 1
    (the 1x1 branch needs a centre tap; even sizes are rejected), any stride,
    padding (default "same", ``dilation * (kernel_size - 1) // 2``), dilation
    and ``groups`` dividing both channel counts, ``dims`` 1, 2, 3.
    ``internal_channels`` defaults to ``in_channels``, or ``2 * in_channels``
    when ``groups > 4`` (OREPA's default); it must be a multiple of ``groups``.
    """

    BRANCHES = ("origin", "pointwise", "prior", "expand")
    """Branch order of the rows of ``branch_scales``."""

    INITIAL_SCALES = (0.25, 1.0, 0.25, 0.5)
    """Initial value of each row of ``branch_scales`` (OREPA's defaults)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 activation: nn.Module | None = None, dims: int = 2, internal_channels: int | None = None):
        super().__init__(activation)
        padding = check_block_arguments(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                        groups, dims, why_odd=WHY_ODD)
        if internal_channels is None:
            internal_channels = in_channels if groups <= 4 else 2 * in_channels
        check_internal_channels(internal_channels, groups)
        # The origin kernel lives in a real conv that carries the block's geometry,
        # and at deployment that same conv receives the merged kernel, in place.
        # A placeholder conv would carry an unused kernel through training, and a
        # conv built at merge time would have to copy geometry, dtype, device and
        # memory format by hand (the usual source of lost dilations); this one
        # keeps whatever the user gave the block. The merge writes it only after
        # every check has passed, so reparameterize() stays all or nothing.
        self.conv = CONVS[dims](in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                bias=False)
        pointwise_shape = (out_channels, in_channels // groups) + (1,) * dims
        self.pointwise_weight = nn.Parameter(torch.empty(pointwise_shape))
        self.prior_weight = nn.Parameter(torch.empty(pointwise_shape))
        self.expand = IdentityBasedConv1x1(in_channels, internal_channels, groups, dims)
        self.expand_kxk_weight = nn.Parameter(
            torch.empty((out_channels, internal_channels // groups) + (kernel_size,) * dims))
        for weight in (self.pointwise_weight, self.prior_weight, self.expand_kxk_weight):
            # The initialisation torch gives a conv's weight (like ``conv``'s own).
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.branch_scales = nn.Parameter(
            torch.tensor(self.INITIAL_SCALES).view(-1, 1).repeat(1, out_channels))
        self.bn = BATCH_NORMS[dims](out_channels)
        self.branch_names = ("conv", "pointwise_weight", "prior_weight", "expand", "expand_kxk_weight",
                             "branch_scales", "bn")

    def combined_kernel(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``sum_b branch_scales[b, o] * K_b``: the one kernel the branches add up to.

        Computed in ``dtype`` (default: the parameters' own, with gradients to
        every branch parameter); the merge asks for float64.
        """
        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if dtype is None else tensor.to(dtype)

        kernel_size, groups = self.conv.kernel_size, self.conv.groups
        centre = kernel_size[0] // 2
        kernels = (
            cast(self.conv.weight),
            F.pad(cast(self.pointwise_weight), (centre,) * (2 * len(kernel_size))),
            average_pool_kernel(cast(self.prior_weight), kernel_size[0]),
            compose_pointwise_then_kxk(self.expand.kernel(dtype), None, cast(self.expand_kxk_weight), groups)[0],
        )
        scales = cast(self.branch_scales)
        return sum(scale_output_channels(kernel, scale) for kernel, scale in zip(kernels, scales))

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        out = CONV_FUNCTIONS[x.dim() - 2](x, self.combined_kernel(), None, conv.stride, conv.padding,
                                          conv.dilation, conv.groups)
        return self.bn(out)

    def reparameterization(self, name: str) -> Reparameterization:
        bn = bn_affine(self.bn, f"{name} BatchNorm")
        weight = self.conv.weight
        with torch.no_grad():
            merged = scale_output_channels(self.combined_kernel(torch.float64), bn.scale.to(weight.device))
        # The conv's kernel is replaced, not added to: ``after`` scales it by 0
        # (exact) and brings the BN shift as the bias, and the one branch adds the
        # merged kernel, BN scale included, rounded once from float64. Keeping
        # the origin kernel and adding the other branches to it would round
        # every tap two or three times.
        replace = ChannelAffine(torch.zeros_like(bn.scale), bn.shift)
        # forward_branches convolves with a functional call, which pads with zeros
        # whatever the conv's padding_mode.
        branch = Branch(round_from_float64(merged, weight.dtype), ConvGeometry.of(self.conv).padding_with_zeros())
        return Reparameterization(name, self.conv, self.install, after=replace, branches=[branch])
