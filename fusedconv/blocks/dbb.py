"""Diverse Branch Block: a kxk conv trained as an Inception-like unit, deployed as one conv.

Paper: "Diverse Branch Block: Building a Convolution as an Inception-like
Unit", Xiaohan Ding, Xiangyu Zhang, Jungong Han, Guiguang Ding, CVPR 2021.

Besides :class:`DiverseBranchBlock` this module holds the pieces that turn a
*sequence* of linear maps into one kernel (a 1x1 conv then a kxk conv; a 1x1
conv then an average pool), the identity-based 1x1 conv and the BN that pads
with its own output for zero input. :mod:`fusedconv.blocks.orepa` builds on them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FoldError
from ..kernels.reference import round_from_float64
from ..reparam import Branch, ConvGeometry, Reparameterization, bn_affine, conv_branch
from .base import RepBlock
from .convbn import BATCH_NORMS, CONVS, check_block_arguments, check_positive_int

CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
AVERAGE_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
ZERO_PADS = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}

# Why DBB and OREPA reject an even kernel (see convbn.check_block_arguments).
WHY_ODD = "the block's 1x1 branch must land on the centre tap of the kxk kernel"


def check_internal_channels(internal_channels: int, groups: int) -> None:
    """The 1x1 -> kxk branch's middle width must split into the block's groups."""
    check_positive_int(internal_channels, "internal_channels")
    if internal_channels % groups:
        raise ValueError(
            f"internal_channels={internal_channels} must be a multiple of groups={groups}: the 1x1 -> kxk "
            "branch keeps the block's groups in both of its convs"
        )


def replicating_identity_kernel(out_channels: int, in_channels: int, groups: int, dims: int, *,
                                dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """The 1x1 kernel ``K[t, t mod (in/groups)] = 1`` (layout ``(out, in/groups, 1...)``).

    Output channel ``t`` copies input ``t mod (in/groups)`` of its group: the
    identity when ``out == in`` (:func:`fusedconv.reparam.identity_kernel`), and
    the group's inputs repeated when the conv widens them (DBB/OREPA's
    identity-initialised 1x1 with more internal channels than inputs).
    """
    per_group = in_channels // groups
    kernel = torch.zeros((out_channels, per_group) + (1,) * dims, dtype=dtype, device=device)
    rows = torch.arange(out_channels, device=device)
    kernel[(rows, rows % per_group) + (0,) * dims] = 1
    return kernel


def compose_pointwise_then_kxk(first: torch.Tensor, first_bias: torch.Tensor | None, second: torch.Tensor,
                               groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One conv for ``conv(second, conv(first, x) + first_bias)`` (DBB transform III, with IV
    inside: each group's composition is computed on its own and the groups concatenated).

    ``first`` is a 1x1 kernel ``(mid, in/groups, 1...)``, ``second`` a kxk kernel
    ``(out, mid/groups, k...)``; both convs use ``groups``. Returns the kernel
    ``K[o, c] = sum_t second[o, t] * first[t, c]`` per group, ``(out, in/groups, k...)``,
    and the bias ``sum_{t, taps} second[o, t, taps] * first_bias[t]`` (None without
    ``first_bias``). Exact when the intermediate map is padded with ``first_bias``
    (:class:`BatchNormAndPad`), or the kxk conv pads nothing. Computed in the
    inputs' dtype (pass float64 tensors for a merge).
    """
    mid, in_per_group = first.shape[0], first.shape[1]
    out, spatial = second.shape[0], second.shape[2:]
    first_grouped = first.reshape(groups, mid // groups, in_per_group)
    second_grouped = second.reshape(groups, out // groups, mid // groups, -1)
    kernel = torch.einsum("gtc,gotk->gock", first_grouped, second_grouped).reshape(out, in_per_group, *spatial)
    if first_bias is None:
        return kernel, None
    bias = torch.einsum("gotk,gt->go", second_grouped, first_bias.reshape(groups, mid // groups)).reshape(out)
    return kernel, bias


def average_pool_kernel(pointwise: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The kxk kernel of a 1x1 conv ``pointwise`` followed by a ``kernel_size`` average pool (DBB transform V).

    An average pool over C channels is the grouped conv ``P[i, i mod (C/groups)] = 1/k^d``
    over its window (count_include_pad semantics: padded taps count); composed
    with a 1x1 kernel that is ``pointwise[o, c] / k^d`` on every tap of the
    window, which is what this returns without forming ``P``. With the identity
    as ``pointwise`` it is the average pool's own kernel.
    """
    dims = pointwise.dim() - 2
    window = pointwise.shape[:2] + (kernel_size,) * dims
    return pointwise.expand(window) / kernel_size**dims


def scale_output_channels(kernel: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``kernel[o] * scale[o]``: a per-output-channel affine scale applied to a kernel."""
    return kernel * scale.view(-1, *(1,) * (kernel.dim() - 1))


class IdentityBasedConv1x1(nn.Module):
    """A 1x1 conv whose kernel is the (replicating) identity plus a learned residual.

    The residual starts at zero, so the conv starts as the identity and weight
    decay pulls it back towards the identity rather than towards zero (DBB's
    identity-based 1x1 conv; OREPA uses it for its 1x1 -> kxk branch too).
    ``kernel = weight + K_id`` with ``K_id[t, t mod (in/groups)] = 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, dims: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros((out_channels, in_channels // groups) + (1,) * dims))
        # Not persistent: it is fixed by the shape, so a checkpoint need not carry it.
        self.register_buffer(
            "identity",
            replicating_identity_kernel(out_channels, in_channels, groups, dims, dtype=self.weight.dtype),
            persistent=False,
        )

    def kernel(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``weight + identity``, computed in ``dtype`` (default: the weight's)."""
        weight = self.weight if dtype is None else self.weight.to(dtype)
        return weight + self.identity.to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return CONV_FUNCTIONS[x.dim() - 2](x, self.kernel(), groups=self.groups)


class BatchNormAndPad(nn.Module):
    """A BatchNorm whose output is padded with what the BN outputs for a zero input.

    Zero-padding ``bn(y)`` is not ``bn`` of the zero-padded ``y``; padding with
    the BN's shift ``beta - running_mean * gamma / sqrt(running_var + eps)`` is,
    in eval mode, so a kxk conv after it composes exactly with the 1x1 conv
    before it (DBB's BN-and-pad layer). The shift uses the running statistics
    in training mode too (as DBB does); gradients reach gamma and beta through it.
    """

    def __init__(self, num_features: int, padding: int, dims: int):
        super().__init__()
        self.bn = BATCH_NORMS[dims](num_features)
        self.padding = padding

    def pad_value(self) -> torch.Tensor:
        """The BN's eval-mode output for a zero input, per channel."""
        bn = self.bn
        shift = -bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
        return shift if bn.weight is None else bn.bias + shift * bn.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.padding == 0:
            return y
        p = self.padding
        padded_shape = y.shape[:2] + tuple(size + 2 * p for size in y.shape[2:])
        value = self.pad_value().to(y.dtype).view(1, -1, *(1,) * (y.dim() - 2))
        # Fill, then write the interior: exact, unlike pad(y - value) + value.
        out = value.expand(padded_shape).clone()
        out[(slice(None), slice(None)) + (slice(p, -p),) * (y.dim() - 2)] = y
        return out


class DiverseBranchBlock(RepBlock):
    """Diverse Branch Block (DBB): four branches in training, one kxk conv at deployment.

    "Diverse Branch Block: Building a Convolution as an Inception-like Unit",
    Ding, Zhang, Han, Ding, CVPR 2021.

    Training computes ``activation(sum of the branches)``:

    * ``origin``: kxk conv -> BN (the block's conv; it becomes the deployed conv);
    * ``pointwise``: 1x1 conv -> BN, with the block's stride (left out for a
      depthwise block, ``groups == in_channels == out_channels``, as in DBB);
    * ``expand``: 1x1 conv (``internal_channels`` outputs; identity-based when
      that equals ``in_channels``) -> BN padded with its own zero-input output
      -> kxk conv (stride, dilation, no padding) -> BN;
    * ``average``: 1x1 conv -> BN-and-pad -> kxk average pool (the block's
      stride, no padding) -> BN; for a depthwise block, zero padding -> average
      pool -> BN. Only without dilation: a pooling window is dense, so with
      ``dilation > 1`` it would not land on the dilated kernel's taps, and the
      block has no ``average`` branch.

    Every conv keeps the block's groups. :meth:`reparameterize` folds each BN
    (transform I), composes the 1x1 -> kxk and 1x1 -> pool sequences (III, IV,
    V), places the 1x1 at the centre (VI) and adds everything (II) into
    ``origin``'s conv, which keeps its geometry, dtype, device and memory format.

    Accepts odd ``kernel_size`` from 1, any stride, any ``groups`` dividing both
    channel counts, any dilation, ``dims`` 1, 2, 3 and ``padding`` at least
    "same" (``dilation * (kernel_size - 1) // 2``, the default). Rejected in
    ``__init__``: an even kernel (no centre tap for the 1x1 branch) and a
    smaller padding (the 1x1 branch would have to crop its input).
    ``internal_channels`` defaults to ``in_channels``, or ``2 * in_channels``
    for a depthwise block (DBB's defaults); it must be a multiple of ``groups``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 activation: nn.Module | None = None, dims: int = 2, internal_channels: int | None = None):
        super().__init__(activation)
        padding = check_block_arguments(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                        groups, dims, why_odd=WHY_ODD)
        same = dilation * (kernel_size - 1) // 2
        if padding < same:
            raise FoldError(
                f"padding={padding} is less than 'same' padding {same} (dilation * (kernel_size - 1) // 2): "
                "the 1x1 branch would need a negative padding (cropping its input) to line up with the kxk conv"
            )
        depthwise = groups == in_channels == out_channels
        if internal_channels is None:
            internal_channels = 2 * in_channels if depthwise else in_channels
        check_internal_channels(internal_channels, groups)
        conv, batch_norm = CONVS[dims], BATCH_NORMS[dims]

        self.origin = nn.Sequential(OrderedDict(
            conv=conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
            bn=batch_norm(out_channels),
        ))
        names = ["origin"]
        if not depthwise:
            # A 1x1 conv reads the same input with any dilation; giving it the
            # block's puts its one tap on the kxk kernel's tap grid for the merge.
            self.pointwise = nn.Sequential(OrderedDict(
                conv=conv(in_channels, out_channels, 1, stride, padding - same, dilation, groups, bias=False),
                bn=batch_norm(out_channels),
            ))
            names.append("pointwise")
        self.expand = nn.Sequential(OrderedDict(
            conv=(IdentityBasedConv1x1(in_channels, in_channels, groups, dims) if internal_channels == in_channels
                  else conv(in_channels, internal_channels, 1, groups=groups, bias=False)),
            bn_pad=BatchNormAndPad(internal_channels, padding, dims),
            kxk=conv(internal_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias=False),
            bn=batch_norm(out_channels),
        ))
        names.append("expand")
        if dilation == 1:
            padded = (OrderedDict(pad=ZERO_PADS[dims](padding, 0.0)) if depthwise else OrderedDict(
                conv=conv(in_channels, out_channels, 1, groups=groups, bias=False),
                bn_pad=BatchNormAndPad(out_channels, padding, dims),
            ))
            self.average = nn.Sequential(OrderedDict(
                **padded,
                pool=AVERAGE_POOLS[dims](kernel_size, stride, padding=0, count_include_pad=True),
                bn=batch_norm(out_channels),
            ))
            names.append("average")
        self.branch_names = tuple(names)

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        out = self.origin(x)
        for name in self.branch_names[1:]:
            out = out + getattr(self, name)(x)
        return out

    def reparameterization(self, name: str) -> Reparameterization:
        target = self.origin.conv
        # The expand and average branches pad with zeros (or the BN value that
        # stands for them) whatever the origin conv's padding_mode.
        geometry = ConvGeometry.of(target).padding_with_zeros()
        branches = []
        if hasattr(self, "pointwise"):
            branches.append(conv_branch(self.pointwise.conv, self.pointwise.bn, name=f"{name}.pointwise"))
        branches.append(self._expand_branch(geometry, name))
        if hasattr(self, "average"):
            branches.append(self._average_branch(geometry, name))
        return Reparameterization(name, target, self.install,
                                  after=bn_affine(self.origin.bn, f"{name}.origin BatchNorm"), branches=branches)

    def _computed_branch(self, kernel: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module,
                         geometry: ConvGeometry, label: str) -> Branch:
        """A branch whose kxk kernel was composed in float64 (the bias stays float64).

        Rounding the composed kernel to the conv's dtype is a second rounding for
        these taps only (the merge rounds once more when it adds them): a Branch
        carries its kernel in the target's dtype.
        """
        weight = round_from_float64(kernel, self.origin.conv.weight.dtype)
        return Branch(weight, geometry, bias, bn_affine(bn, f"{label} BatchNorm"))

    def _expand_branch(self, geometry: ConvGeometry, name: str) -> Branch:
        first_conv = self.expand.conv
        middle = bn_affine(self.expand.bn_pad.bn, f"{name}.expand middle BatchNorm")
        with torch.no_grad():
            first = (first_conv.kernel(torch.float64) if isinstance(first_conv, IdentityBasedConv1x1)
                     else first_conv.weight.to(torch.float64))
            device = first.device
            kernel, bias = compose_pointwise_then_kxk(
                scale_output_channels(first, middle.scale.to(device)), middle.shift.to(device),
                self.expand.kxk.weight.to(torch.float64), geometry.groups,
            )
        return self._computed_branch(kernel, bias, self.expand.bn, geometry, f"{name}.expand")

    def _average_branch(self, geometry: ConvGeometry, name: str) -> Branch:
        weight = self.origin.conv.weight
        with torch.no_grad():
            if hasattr(self.average, "conv"):
                middle = bn_affine(self.average.bn_pad.bn, f"{name}.average middle BatchNorm")
                pointwise = scale_output_channels(self.average.conv.weight.to(torch.float64),
                                                  middle.scale.to(weight.device))
                bias = middle.shift.to(weight.device)
            else:  # depthwise: the pool reads the zero-padded input itself
                pointwise = replicating_identity_kernel(geometry.out_channels, geometry.in_channels,
                                                        geometry.groups, geometry.dims, dtype=torch.float64,
                                                        device=weight.device)
                bias = None
            kernel = average_pool_kernel(pointwise, geometry.kernel_size[0])
        return self._computed_branch(kernel, bias, self.average.bn, geometry, f"{name}.average")
