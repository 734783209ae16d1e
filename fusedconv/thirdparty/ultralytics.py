"""Converters for ultralytics' re-parameterizable blocks, registered by their classes'
names: they take effect once ultralytics has been imported (this module imports none of it).

They plan, without touching the block, what ``BaseModel.fuse()`` does to it,
computed with :mod:`fusedconv.reparam` in float64 with one rounding per write,
and their ``install`` leaves the block as that ``fuse()`` does, so ultralytics'
own forward runs unchanged:

* ``Conv``/``DWConv``: the BN folds into ``conv``; ``bn`` is deleted and
  ``forward`` switched to ``forward_fuse``;
* ``Conv2``: ``conv(x) + cv2(x)`` (1x1) then BN, into ``conv``; ``cv2`` and ``bn``
  are deleted, ``forward`` is ``forward_fuse``;
* ``ConvTranspose``: the BN folds into ``conv_transpose``; ``bn`` is deleted,
  ``forward`` is ``forward_fuse``;
* ``RepConv`` (RepVGG, Ding et al., "RepVGG: Making VGG-style ConvNets Great
  Again", CVPR 2021): ``conv1 (kxk-BN) + conv2 (1x1-BN) + bn(x)`` into one
  conv stored as ``conv``; the branches are deleted, ``forward`` is ``forward_fuse``;
* ``RepVGGDW`` (YOLOv10: Wang et al., "YOLOv10: Real-Time End-to-End Object
  Detection", NeurIPS 2024): ``conv (7x7-BN) + conv1 (3x3-BN)`` into one
  depthwise conv stored as ``conv``; ``conv1`` is deleted, ``forward`` is ``forward_fuse``.

As in ultralytics, the merged conv's parameters stop requiring gradients.
What ``fuse()`` does to the detection heads (``Detect.fuse`` drops the head that
inference does not read) removes modules rather than folding them, and is left
to ultralytics: fusedconv folds the BatchNorms of both heads and keeps the
model's outputs as they are.

Blocks with fake-quantization modules (ultralytics' QAT) are refused: their
quantization ranges would have to move with the folded weights.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..affine import ChannelAffine
from ..errors import FoldError
from ..layers import registered_attribute, set_plain_attribute
from ..registry import block_submodules, instance_of, register_block_by_name
from ..reparam import Branch, ConvGeometry, Reparameterization, bn_affine, identity_branch
from ..walking import submodules

Plans = list[Reparameterization]

_CONV_MODULE = "ultralytics.nn.modules.conv"
_BLOCK_MODULE = "ultralytics.nn.modules.block"
# The ultralytics classes the converters tell a block's parts apart by, as (module, class).
_CONV = (_CONV_MODULE, "Conv")
CLASSES_ASKED_ABOUT = (_CONV,)


def _check_not_quantized(block: nn.Module, name: str) -> None:
    """Refuse a block carrying fake quantizers (ultralytics' QAT, matched by class name as ultralytics does)."""
    if "TensorQuantizer" in {type(m).__name__ for m in block_submodules(block)}:
        raise FoldError(f"{name}: it is fake-quantized (QAT), and folding would move its weights out of the "
                        "quantization ranges that were trained for them")


def _deploy(block: nn.Module, *, delete: tuple[str, ...], conv_attr: str) -> Callable[[nn.Module], None]:
    """The install that mirrors ``fuse()``: the merged conv goes to ``conv_attr``, the
    branch attributes are deleted, and ``forward`` becomes ``forward_fuse``."""
    def install(conv: nn.Module) -> None:
        for attr in delete:
            if attr in block._modules or hasattr(block, attr):
                delattr(block, attr)
        _freeze(conv)
        if block._modules.get(conv_attr) is not conv:  # Conv's own conv stays where it is registered
            setattr(block, conv_attr, conv)
        set_plain_attribute(block, "forward", block.forward_fuse)
    return install


def _freeze(conv: nn.Module) -> None:
    """``conv.requires_grad_(False)``, without the generator chain of
    ``parameters()`` that would cost more than the rest of an install."""
    for module in submodules(conv) if conv._modules else (conv,):  # a plain conv has no children to walk
        for parameter in module._parameters.values():
            if parameter is not None:
                parameter.requires_grad_(False)


def _linear_conv_bn(part: nn.Module, name: str) -> tuple[nn.Module, ChannelAffine | None]:
    """The conv and BN affine map of an inner ``Conv(act=False)`` used as a linear branch
    (BN None when that Conv was fused on its own already)."""
    if not instance_of(part, *_CONV):
        raise FoldError(f"{name}: {type(part).__name__} is not the ultralytics Conv branch the merge expects")
    if not isinstance(part.act, nn.Identity):
        raise FoldError(f"{name}: its activation {type(part.act).__name__} stands inside a branch that is merged "
                        "into one conv")
    return part.conv, bn_affine(part.bn, f"{name}.bn") if hasattr(part, "bn") else None


def _branch(conv: nn.Module, affine: ChannelAffine | None) -> Branch:
    """``affine(conv(x))`` as a branch added into the merged conv."""
    return Branch(conv.weight.detach(), ConvGeometry.of(conv), conv.bias, affine)


def convert_conv(block: nn.Module, name: str) -> Plans:
    """``act(bn(conv(x)))`` (Conv, DWConv): the BN folds into ``conv``."""
    bn = registered_attribute(block, "bn")
    if bn is None:
        return []
    _check_not_quantized(block, name)
    return [Reparameterization(name, registered_attribute(block, "conv"),
                               _deploy(block, delete=("bn",), conv_attr="conv"), after=bn_affine(bn, f"{name}.bn"))]


def convert_conv2(block: nn.Module, name: str) -> Plans:
    """``act(bn(conv(x) + cv2(x)))``: the 1x1 ``cv2`` lands on ``conv``'s centre tap,
    scaled by the BN like ``conv`` (the BN's shift is added once)."""
    if not hasattr(block, "bn"):
        return []
    _check_not_quantized(block, name)
    after = bn_affine(block.bn, f"{name}.bn")
    branches = []
    if hasattr(block, "cv2"):  # ultralytics' own fuse_convs() merges it and deletes it
        branches.append(_branch(block.cv2, ChannelAffine(after.scale, after.shift.new_zeros(after.shift.shape))))
    return [Reparameterization(name, block.conv, _deploy(block, delete=("cv2", "bn"), conv_attr="conv"),
                               after=after, branches=branches)]


def convert_conv_transpose(block: nn.Module, name: str) -> Plans:
    """``act(bn(conv_transpose(x)))``: the BN folds into ``conv_transpose`` (output channels on dim 1)."""
    if not hasattr(block, "bn") or isinstance(block.bn, nn.Identity):
        return []  # fused already, or built with bn=False
    _check_not_quantized(block, name)
    return [Reparameterization(name, block.conv_transpose, _deploy(block, delete=("bn",), conv_attr="conv_transpose"),
                               after=bn_affine(block.bn, f"{name}.bn"))]


def convert_rep_conv(block: nn.Module, name: str) -> Plans:
    """RepConv: ``conv1 (kxk-BN) + conv2 (1x1-BN) + bn(x)`` into ``conv1``'s conv, stored as ``conv``."""
    if hasattr(block, "conv"):
        return []
    _check_not_quantized(block, name)
    target, after = _linear_conv_bn(block.conv1, f"{name}.conv1")
    geometry = ConvGeometry.of(target)
    branches = [_branch(*_linear_conv_bn(block.conv2, f"{name}.conv2"))]
    if getattr(block, "bn", None) is not None:
        branches.append(identity_branch(geometry, block.bn, dtype=target.weight.dtype, device=target.weight.device,
                                        name=f"{name}.bn"))
    return [Reparameterization(name, target, _deploy(block, delete=("conv1", "conv2", "bn"), conv_attr="conv"),
                               after=after, branches=branches)]


def convert_rep_vgg_dw(block: nn.Module, name: str) -> Plans:
    """RepVGGDW: ``conv (7x7-BN) + conv1 (3x3-BN)`` into the 7x7 conv, stored as ``conv``."""
    if not hasattr(block, "conv1"):
        return []
    _check_not_quantized(block, name)
    target, after = _linear_conv_bn(block.conv, f"{name}.conv")
    return [Reparameterization(name, target, _deploy(block, delete=("conv1",), conv_attr="conv"), after=after,
                               branches=[_branch(*_linear_conv_bn(block.conv1, f"{name}.conv1"))])]


# (module, class, converter) for every block class merged here.
BLOCKS = (
    (_CONV_MODULE, "Conv", convert_conv),
    (_CONV_MODULE, "DWConv", convert_conv),
    (_CONV_MODULE, "Conv2", convert_conv2),
    (_CONV_MODULE, "ConvTranspose", convert_conv_transpose),
    (_CONV_MODULE, "RepConv", convert_rep_conv),
    (_BLOCK_MODULE, "RepVGGDW", convert_rep_vgg_dw),
)
for _block in BLOCKS:
    register_block_by_name(*_block)
