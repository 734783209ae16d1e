"""A convolution and its BatchNorm as one drop-in block, trainable with the BN frozen and folded.

Besides :class:`ConvBN` this module holds what fusedconv's RepVGG-family blocks
(:mod:`~fusedconv.blocks.repvgg`, :mod:`~fusedconv.blocks.acnet`,
:mod:`~fusedconv.blocks.mobileone`) share: the conv and BN classes per number
of spatial dims, the checks of a block's constructor arguments, and the check
that a branch lines up with the conv it is merged into. Those blocks build
their branches from :class:`ConvBN`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..affine import ChannelAffine
from ..errors import FoldError
from ..reparam import Branch, ConvGeometry, Reparameterization, bn_affine, tap_placement
from .base import RepBlock

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

IntOrTuple = int | Sequence[int]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(value: int, what: str) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) of at least 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


def check_dims(dims: int) -> None:
    """``dims`` picks Conv1d/2d/3d and BatchNorm1d/2d/3d."""
    if dims not in CONVS:
        raise ValueError(f"dims must be 1, 2 or 3 (Conv1d/2d/3d), got {dims!r}")


def check_channels(in_channels: int, out_channels: int, groups: int) -> None:
    """Channel counts and groups that make a grouped conv."""
    for what, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        check_positive_int(value, what)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")


def spatial_tuple(value: IntOrTuple, dims: int, what: str, minimum: int) -> tuple[int, ...]:
    """An int (the same in every spatial dim) or one int per spatial dim, each at least ``minimum``."""
    values = (value,) * dims if _is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else None
    if values is None or len(values) != dims or not all(_is_int(v) and v >= minimum for v in values):
        raise ValueError(f"{what} must be an int >= {minimum} or {dims} of them (one per spatial dim), got {value!r}")
    return values


def check_block_arguments(in_channels: int, out_channels: int, kernel_size: int, stride: int,
                          padding: int | None, dilation: int, groups: int, dims: int, *,
                          why_odd: str | None) -> int:
    """Validate the geometry of a block's main conv; returns its padding
    (``dilation * (kernel_size - 1) // 2``, "same", when ``padding`` is None).

    The sizes are single ints, the same in every spatial dim. Raises
    :class:`ValueError` for an argument that makes no conv (non-positive sizes,
    groups that do not divide the channels, dims other than 1, 2, 3, a negative
    padding). ``why_odd`` is for blocks whose branches share one centre tap: an
    even kernel has none, so it raises :class:`FoldError` with ``why_odd`` (which
    branch needs the centre tap) as the reason. ``why_odd=None`` accepts even
    kernels, for blocks that decide per branch whether it lines up
    (:mod:`fusedconv.blocks.replknet`, :mod:`fusedconv.blocks.implicit`).
    """
    check_dims(dims)
    check_channels(in_channels, out_channels, groups)
    for what, value in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
        check_positive_int(value, f"{what} (one value for every spatial dim)")
    if why_odd is not None and kernel_size % 2 == 0:
        raise FoldError(f"kernel_size={kernel_size} is even, so the kernel has no centre tap: {why_odd}")
    if padding is None:
        return dilation * (kernel_size - 1) // 2
    if not _is_int(padding) or padding < 0:
        raise ValueError(f"padding must be a non-negative int or None (same padding), got {padding!r}")
    return padding


def check_alignment(branch: ConvGeometry, target: ConvGeometry, label: str) -> None:
    """Raise :class:`FoldError` unless ``branch`` lands on ``target``'s taps
    (checked when a block is built, so that its merge cannot fail later)."""
    try:
        tap_placement(branch, target)
    except FoldError as exc:
        raise FoldError(f"{label} cannot be merged into the block's main conv: {exc}") from None


class ConvBN(RepBlock):
    """A Conv1d/2d/3d, its BatchNorm and an optional activation: ``activation(bn(conv(x)))``.

    The drop-in replacement for a conv followed by a BN, in one of three modes
    (:attr:`mode`):

    * ``"train"``: the usual conv then BN; the BN normalizes with batch
      statistics in ``.train()`` and with its running statistics in ``.eval()``.
    * ``"frozen"`` (:meth:`freeze_batchnorm`): the BN's running statistics are
      frozen, and every forward folds the BN into the conv on the fly,
      ``W' = W * s`` and ``b' = (b - mean) * s + beta`` with
      ``s = gamma / sqrt(var + eps)``, computed from the live conv weight and
      BN affine parameters. It computes conv + eval-mode BN, in ``.train()``
      too; gradients reach the conv weight and bias and the BN's weight and
      bias, and no activation is stored for the BN (it has no input): one conv's
      memory and time. This is the "Deploy" mode of "Efficient ConvBN Blocks for
      Transfer Learning and Beyond", Kaichao You, Guo Qin, Anchang Bao, Meng
      Cao, Ping Huang, Jiulong Shan, Mingsheng Long, ICLR 2024, for fine-tuning
      with frozen BN statistics. :meth:`unfreeze_batchnorm` goes back to ``"train"``.
    * ``"deployed"`` (:meth:`reparameterize`, in eval mode): one conv,
      ``deployed_conv``, with the BN folded into its weight and bias (float64
      math, one rounding); it keeps the conv's geometry, padding_mode, dtype,
      device and memory format.

    Accepts any Conv1d/2d/3d (``dims``): kernel size, stride and dilation are
    an int or one int per spatial dim, ``padding`` an int, a tuple or None
    ("same": ``dilation * (kernel_size - 1) // 2`` per dim), any ``groups``
    dividing both channel counts, any ``padding_mode``, a conv bias or none.
    """

    branch_names = ("conv", "bn")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 padding: IntOrTuple | None = None, dilation: IntOrTuple = 1, groups: int = 1,
                 activation: nn.Module | None = None, dims: int = 2, *, bias: bool = False,
                 padding_mode: str = "zeros", bn_eps: float = 1e-5, bn_momentum: float | None = 0.1):
        super().__init__(activation)
        check_dims(dims)
        check_channels(in_channels, out_channels, groups)
        kernel_size = spatial_tuple(kernel_size, dims, "kernel_size", 1)
        dilation = spatial_tuple(dilation, dims, "dilation", 1)
        if padding is None:
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))
        self.conv = CONVS[dims](in_channels, out_channels, kernel_size, spatial_tuple(stride, dims, "stride", 1),
                                spatial_tuple(padding, dims, "padding", 0), dilation, groups, bias=bias,
                                padding_mode=padding_mode)
        self.bn = BATCH_NORMS[dims](out_channels, eps=bn_eps, momentum=bn_momentum)
        self.batchnorm_frozen = False

    @property
    def mode(self) -> str:
        """``"train"``, ``"frozen"`` or ``"deployed"`` (see the class docstring)."""
        if self.deployed:
            return "deployed"
        return "frozen" if self.batchnorm_frozen else "train"

    def freeze_batchnorm(self) -> "ConvBN":
        """Freeze the BN's running statistics and fold it into the conv at every forward; returns the block."""
        if self.deployed:
            raise RuntimeError("this ConvBN is deployed: it has no BatchNorm left to freeze")
        self.batchnorm_frozen = True
        return self

    def unfreeze_batchnorm(self) -> "ConvBN":
        """Back to conv then BN (``"train"`` mode); returns the block."""
        if self.deployed:
            raise RuntimeError("this ConvBN is deployed: it has no BatchNorm left to unfreeze")
        self.batchnorm_frozen = False
        return self

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batchnorm_frozen:
            return self.bn(self.conv(x))
        bn, conv = self.bn, self.conv
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale.reshape((-1,) + (1,) * (conv.weight.dim() - 1))
        shift = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
        # _conv_forward applies the conv's own padding_mode, stride, dilation and groups.
        return conv._conv_forward(x, weight, bn.bias + shift * scale)

    def conv_and_affine(self, name: str) -> tuple[nn.Module, ChannelAffine | None]:
        """The conv to merge and the float64 affine map of its BN (None once deployed,
        where the BN is already in the conv); ``name`` labels errors."""
        if self.deployed:
            return self.deployed_conv, None
        return self.conv, bn_affine(self.bn, f"{name} BatchNorm")

    def as_branch(self, name: str) -> Branch:
        """This conv and BN as a branch to add into another block's conv."""
        conv, affine = self.conv_and_affine(name)
        return Branch(conv.weight.detach(), ConvGeometry.of(conv), conv.bias, affine)

    def reparameterization(self, name: str) -> Reparameterization:
        conv, affine = self.conv_and_affine(name)
        return Reparameterization(name, conv, self.install, after=affine)
