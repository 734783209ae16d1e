"""Converters for timm's re-parameterizable blocks, registered by their classes' names:
they take effect once timm has been imported (this module imports none of it).

Each converter plans, without touching the block, the merge that the block's
own ``reparameterize()``/``fuse()`` performs (what ``timm.utils.reparameterize_model``
calls), computed with :mod:`fusedconv.reparam` in float64 with one rounding per
write. Its ``install`` leaves the block in the state timm's own forward expects
afterwards:

* blocks with a ``reparam_conv`` attribute (RepVGG, MobileOne, FastViT) get the
  merged conv there, and their branch attributes are deleted as timm does;
* RepGhost's ``cheap_operation`` becomes the merged conv and its fusion lists
  become empty, as timm's ``switch_to_deploy`` leaves them;
* timm's ``fuse()`` returns a new module that its caller puts in the block's
  place; a converter cannot reach that caller, so the block stays and its
  folded BatchNorm becomes ``nn.Identity`` (what :func:`fusedconv.fuse` does
  with every BN it folds): the block's forward then computes the fused layer.
  RepViT's ``RepVggDw`` adds an identity in its forward, so its forward is
  switched to the merged conv instead (as ultralytics' ``fuse`` switches
  ``forward`` to ``forward_fuse``).

On top of timm, the BatchNorm of RepGhost's primary conv is folded (timm's
``switch_to_deploy`` leaves it), so that no BN is left inside a merged block.

A converter given an already merged block returns no plan, so merging twice is
harmless. Configurations that no single conv reproduces (a branch that does
not sit on the merged conv's taps, an identity branch with a stride or with
different input and output channels, an activation inside a branch, a conv
with its own forward such as timm's ``Conv2dSame``) raise
:class:`~fusedconv.errors.FoldError` naming the block.

Papers:

* RepVGG: Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021.
* MobileOne: Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023.
* FastViT: Vasu et al., "FastViT: A Fast Hybrid Vision Transformer using
  Structural Reparameterization", ICCV 2023 (its large-kernel conv follows
  RepLKNet: Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022; its
  positional encoding Chu et al., "Conditional Positional Encodings for Vision
  Transformers", ICLR 2023).
* RepViT: Wang et al., "RepViT: Revisiting Mobile CNN From ViT Perspective", CVPR 2024.
* RepGhost: Chen et al., "RepGhost: A Hardware-Efficient Ghost Module via
  Re-parameterization", arXiv:2211.06088, 2022.
* LeViT: Graham et al., "LeViT: a Vision Transformer in ConvNet's Clothing for
  Faster Inference", ICCV 2021.
* EfficientViT (MSRA): Liu et al., "EfficientViT: Memory Efficient Vision
  Transformer with Cascaded Group Attention", CVPR 2023.
* TinyViT: Wu et al., "TinyViT: Fast Pretraining Distillation for Small Vision
  Transformers", ECCV 2022; SHViT: Yun and Ro, "SHViT: Single-Head Vision
  Transformer with Memory Efficient Macro Design", CVPR 2024; iFormer: Zheng,
  "iFormer: Integrating ConvNet and Transformer for Mobile Application", ICLR 2025.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from torch import nn

from ..affine import ChannelAffine
from ..errors import FoldError
from ..layers import batchnorm_kind, why_layer_cannot_change
from ..reparam import Branch, ConvGeometry, Reparameterization, bn_affine, identity_branch
from ..registry import instance_of, register_block_by_name

Plans = list[Reparameterization]
LinearPart = tuple[nn.Module, ChannelAffine | None]
"""A conv and the affine map after it (None: nothing after it)."""

# The timm classes the converters tell a block's parts apart by, as (module, class):
# timm.layers is imported with any timm model's module.
_CONV_NORM_ACT = ("timm.layers", "ConvNormAct")
_DROP_PATH = ("timm.layers", "DropPath")
_DROP_BLOCK = ("timm.layers", "DropBlock2d")
_LAYER_SCALE_2D = ("timm.models.fastvit", "LayerScale2d")
_REPVIT_CONV_NORM = ("timm.models.repvit", "ConvNorm")
_REPVIT_NORM_LINEAR = ("timm.models.repvit", "NormLinear")
CLASSES_ASKED_ABOUT = (_CONV_NORM_ACT, _DROP_PATH, _DROP_BLOCK, _LAYER_SCALE_2D, _REPVIT_CONV_NORM,
                       _REPVIT_NORM_LINEAR)


def _computes_identity_in_eval(module: nn.Module) -> bool:
    """Whether ``module`` is one that computes the identity in eval mode, where timm puts them inside branches."""
    return isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)) or \
        instance_of(module, *_DROP_PATH) or instance_of(module, *_DROP_BLOCK)


# --------------------------------------------------------------------------- reading branches

def _check_identity(module: nn.Module, name: str) -> None:
    """Raise unless ``module`` computes the identity (in eval mode, for dropouts)."""
    if not _computes_identity_in_eval(module) or (module.training and not isinstance(module, nn.Identity)):
        raise FoldError(
            f"{name}: {type(module).__name__} stands inside a branch that is merged into one conv; only an "
            "identity or an eval-mode dropout can"
        )


def _norm_affine(bn: nn.Module, name: str) -> ChannelAffine:
    """The float64 affine map of a BatchNorm inside a branch.

    timm's ``BatchNormAct2d`` also applies its dropout and activation, which
    must then be identities: a branch is merged only while it is linear.
    """
    kind = batchnorm_kind(bn)
    if kind is None:
        raise FoldError(f"{name}: {type(bn).__name__} is not a BatchNorm whose eval-mode forward fusedconv knows")
    if not kind.passes_through:
        _check_identity(bn.drop, f"{name}.drop")
        _check_identity(bn.act, f"{name}.act")
    return bn_affine(bn, name)


def _plain_conv(conv: nn.Module, name: str) -> nn.Module:
    """``conv`` itself, after checking that it is a Conv1d/2d/3d computing a plain
    convolution with its own weight (not, e.g., timm's ``Conv2dSame``, which pads on the fly)."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed:
        raise FoldError(f"{name}: {type(conv).__name__} is not a Conv1d/2d/3d")
    problem = why_layer_cannot_change(conv)
    if problem:
        raise FoldError(f"{name}: {problem}")
    return conv


def _conv_norm_act(branch: nn.Module, name: str) -> LinearPart:
    """The conv and BN affine map of a timm ``ConvNormAct`` used as a linear branch."""
    if not instance_of(branch, *_CONV_NORM_ACT):
        raise FoldError(f"{name}: {type(branch).__name__} is not the ConvNormAct branch the merge expects")
    if getattr(branch, "aa", None) is not None:
        _check_identity(branch.aa, f"{name}.aa")
    return _plain_conv(branch.conv, f"{name}.conv"), _norm_affine(branch.bn, f"{name}.bn")


def _reparam_parts(block: nn.Module, name: str,
                   conv_attrs: Sequence[str]) -> tuple[list[LinearPart], list[ChannelAffine]]:
    """The linear branches of a block in the RepVGG/MobileOne layout: the conv
    branches held by ``conv_attrs`` (a ConvNormAct, a ModuleList of them, or
    None), and the affine maps of its ``identity`` BatchNorm (if any).

    A block that timm already merged contributes its ``reparam_conv`` (with its
    bias) instead, so that a RepMixer whose inner blocks were merged by hand
    still merges.
    """
    if block.reparam_conv is not None:
        return [(_plain_conv(block.reparam_conv, f"{name}.reparam_conv"), None)], []
    parts = []
    for attr in conv_attrs:
        held = getattr(block, attr, None)
        if isinstance(held, nn.ModuleList):
            parts.extend(_conv_norm_act(branch, f"{name}.{attr}.{i}") for i, branch in enumerate(held))
        elif held is not None:
            parts.append(_conv_norm_act(held, f"{name}.{attr}"))
    identity = getattr(block, "identity", None)
    identities = [] if identity is None else [_norm_affine(identity, f"{name}.identity")]
    return parts, identities


def _scaled(affine: ChannelAffine | None, gain: torch.Tensor) -> ChannelAffine:
    """``affine`` (None: the identity map) followed by a per-channel multiplication by ``gain``."""
    gain = gain.detach().reshape(-1).to(torch.float64)
    if affine is None:
        return ChannelAffine(gain, torch.zeros_like(gain))
    return affine.then(ChannelAffine(gain.to(affine.scale.device), torch.zeros_like(affine.shift)))


# --------------------------------------------------------------------------- planning a merge

def _merge(name: str, parts: Sequence[LinearPart], identities: Sequence[ChannelAffine | None],
           install: Callable[[nn.Module], None]) -> Reparameterization:
    """The merge of ``sum(affine(conv(x)) for conv, affine in parts) + sum(affine(x) for affine in identities)``
    into the first conv of ``parts`` (the block's largest kernel), which keeps its geometry,
    dtype, device and memory format. An identity affine map of None adds ``x`` itself."""
    if not parts:
        raise FoldError(f"{name}: it has no conv branch for the others to merge into")
    (target, after), *others = parts
    geometry = ConvGeometry.of(target)
    branches = [Branch(conv.weight.detach(), ConvGeometry.of(conv), conv.bias, affine) for conv, affine in others]
    for affine in identities:
        skip = identity_branch(geometry, None, dtype=target.weight.dtype, device=target.weight.device,
                               name=f"{name} identity branch")
        branches.append(dataclasses.replace(skip, affine=affine))
    return Reparameterization(name, target, install, after=after, branches=branches)


def _into_reparam_conv(block: nn.Module, branch_attrs: Sequence[str]) -> Callable[[nn.Module], None]:
    """The install of timm's ``reparameterize()``: the merged conv becomes
    ``block.reparam_conv`` and the branch attributes are deleted."""
    def install(conv: nn.Module) -> None:
        for attr in branch_attrs:
            if hasattr(block, attr):
                delattr(block, attr)
        block.reparam_conv = conv
        if hasattr(block, "inference_mode"):
            # FastViT's flag: it also makes timm's own reparameterize() a no-op
            # on the merged block instead of a crash on the deleted branches.
            block.inference_mode = True
    return install


# --------------------------------------------------------------------------- RepVGG, MobileOne, FastViT

def convert_byobnet_repvgg(block: nn.Module, name: str) -> Plans:
    """RepVGG: ``kxk-BN + 1x1-BN + BN(x)`` into the kxk conv (``attn`` and ``act`` stay after it)."""
    if block.reparam_conv is not None:
        return []
    _check_identity(block.drop_path, f"{name}.drop_path")
    parts, identities = _reparam_parts(block, name, ("conv_kxk", "conv_1x1"))
    return [_merge(name, parts, identities,
                   _into_reparam_conv(block, ("conv_kxk", "conv_1x1", "identity", "drop_path")))]


def convert_byobnet_mobileone(block: nn.Module, name: str) -> Plans:
    """MobileOne (byobnet): every kxk-BN branch, the 1x1-BN scale branch and BN(x) into the first kxk conv."""
    if block.reparam_conv is not None:
        return []
    _check_identity(block.drop_path, f"{name}.drop_path")
    parts, identities = _reparam_parts(block, name, ("conv_kxk", "conv_scale"))
    return [_merge(name, parts, identities,
                   _into_reparam_conv(block, ("conv_kxk", "conv_scale", "identity", "drop_path")))]


def convert_fastvit_mobileone(block: nn.Module, name: str) -> Plans:
    """MobileOne (FastViT): as in byobnet; ``se`` and ``act`` stay after the merged conv."""
    if block.reparam_conv is not None:
        return []
    parts, identities = _reparam_parts(block, name, ("conv_kxk", "conv_scale"))
    return [_merge(name, parts, identities, _into_reparam_conv(block, ("conv_kxk", "conv_scale", "identity")))]


def convert_fastvit_large_kernel(block: nn.Module, name: str) -> Plans:
    """RepLKNet-style ``large-BN + small-BN`` into the large conv (``se`` and ``act`` stay)."""
    if block.reparam_conv is not None:
        return []
    parts, _ = _reparam_parts(block, name, ("large_conv", "small_conv"))
    return [_merge(name, parts, [], _into_reparam_conv(block, ("large_conv", "small_conv")))]


def convert_fastvit_rep_mixer(block: nn.Module, name: str) -> Plans:
    """FastViT's RepMixer, ``x + gamma * (mixer(x) - norm(x))``, into the mixer's kxk conv.

    The mixer's branches are scaled by the layer scale ``gamma``, the norm's
    (its identity BN) by ``-gamma``: a subtraction is a negative scale.
    """
    if block.reparam_conv is not None:
        return []
    for part in ("mixer", "norm"):
        for attr in ("se", "act"):
            _check_identity(getattr(getattr(block, part), attr), f"{name}.{part}.{attr}")
    if instance_of(block.layer_scale, *_LAYER_SCALE_2D):
        gamma = block.layer_scale.gamma.detach()
    else:
        _check_identity(block.layer_scale, f"{name}.layer_scale")
        gamma = torch.ones(block.dim, dtype=torch.float64)
    mixer_parts, mixer_identities = _reparam_parts(block.mixer, f"{name}.mixer", ("conv_kxk", "conv_scale"))
    norm_parts, norm_identities = _reparam_parts(block.norm, f"{name}.norm", ("conv_kxk", "conv_scale"))
    parts = ([(conv, _scaled(affine, gamma)) for conv, affine in mixer_parts]
             + [(conv, _scaled(affine, -gamma)) for conv, affine in norm_parts])
    identities = ([_scaled(affine, gamma) for affine in mixer_identities]
                  + [_scaled(affine, -gamma) for affine in norm_identities]
                  + [None])  # the residual x itself
    return [_merge(name, parts, identities, _into_reparam_conv(block, ("mixer", "norm", "layer_scale")))]


def convert_fastvit_rep_cpe(block: nn.Module, name: str) -> Plans:
    """FastViT's conditional positional encoding, ``pos_enc(x) + x``, into ``pos_enc``."""
    if block.reparam_conv is not None:
        return []
    conv = _plain_conv(block.pos_enc, f"{name}.pos_enc")
    return [_merge(name, [(conv, None)], [None], _into_reparam_conv(block, ("pos_enc",)))]


# --------------------------------------------------------------------------- RepGhost

def convert_repghost_module(block: nn.Module, name: str) -> Plans:
    """RepGhost: ``cheap(x1) + sum(fusion_bn(x1))`` into the cheap depthwise conv, where
    ``x1 = relu(BN(primary_conv(x)))``; that primary BN is folded into its conv too
    (timm leaves it, and nothing else can reach it inside a merged block)."""
    plans = []
    primary, primary_bn = block.primary_conv[0], block.primary_conv[1]
    if not isinstance(primary_bn, nn.Identity):
        def drop_primary_bn(_: nn.Module) -> None:
            block.primary_conv[1] = nn.Identity()
        plans.append(Reparameterization(f"{name}.primary_conv", _plain_conv(primary, f"{name}.primary_conv.0"),
                                        drop_primary_bn, after=_norm_affine(primary_bn, f"{name}.primary_conv.1")))
    if isinstance(block.cheap_operation, nn.Sequential):  # timm leaves a plain Conv2d there once merged
        cheap = (_plain_conv(block.cheap_operation[0], f"{name}.cheap_operation.0"),
                 _norm_affine(block.cheap_operation[1], f"{name}.cheap_operation.1"))
        identities = []
        for i, (conv, bn) in enumerate(zip(block.fusion_conv, block.fusion_bn)):
            _check_identity(conv, f"{name}.fusion_conv.{i}")
            identities.append(_norm_affine(bn, f"{name}.fusion_bn.{i}"))

        def install(conv: nn.Module) -> None:
            del block.fusion_conv, block.fusion_bn
            block.cheap_operation = conv
            block.fusion_conv, block.fusion_bn = [], []

        plans.append(_merge(name, [cheap], identities, install))
    return plans


# --------------------------------------------------------------------------- Conv/Linear + BN pairs (fuse())

def _fold_target(layer: nn.Module, name: str) -> nn.Module:
    """``layer`` (a Linear, or a plain conv: see :func:`_plain_conv`), checked as a merge target."""
    if not isinstance(layer, nn.Linear):
        return _plain_conv(layer, name)
    problem = why_layer_cannot_change(layer)
    if problem:
        raise FoldError(f"{name}: {problem}")
    return layer


def _layer_then_bn(layer_attr: str):
    """Converter of a ``bn(layer(x))`` pair (a Conv or Linear named ``layer_attr``, then ``bn``)."""
    def convert(block: nn.Module, name: str) -> Plans:
        if isinstance(block.bn, nn.Identity):
            return []
        layer = getattr(block, layer_attr)
        target = _fold_target(layer, f"{name}.{layer_attr}")

        def install(merged: nn.Module) -> None:
            block.bn = nn.Identity()

        return [Reparameterization(name, target, install, after=_norm_affine(block.bn, f"{name}.bn"))]
    convert.__doc__ = f"Folds ``bn`` into ``{layer_attr}`` (what the block's ``fuse()`` computes)."
    return convert


def _bn_then_linear(linear_attr: str):
    """Converter of a ``linear(drop(bn(x)))`` pair (``drop`` optional, a no-op in eval mode)."""
    def convert(block: nn.Module, name: str) -> Plans:
        if isinstance(block.bn, nn.Identity):
            return []
        if hasattr(block, "drop"):
            _check_identity(block.drop, f"{name}.drop")
        linear = getattr(block, linear_attr)
        target = _fold_target(linear, f"{name}.{linear_attr}")

        def install(merged: nn.Module) -> None:
            block.bn = nn.Identity()

        return [Reparameterization(name, target, install, before=_norm_affine(block.bn, f"{name}.bn"))]
    convert.__doc__ = f"Folds ``bn`` into the ``{linear_attr}`` Linear after it (what ``fuse()`` computes)."
    return convert


# --------------------------------------------------------------------------- RepViT

def convert_repvit_rep_vgg_dw(block: nn.Module, name: str) -> Plans:
    """RepViT's token mixer, ``bn(conv(x) + conv1(x) + x)``, into the kxk conv of ``conv``.

    Each term passes through the final BN's scale, its shift is added once.
    ``legacy`` blocks have a BN on ``conv1`` and none at the end. Once merged,
    ``conv`` holds the merged conv and the block's forward is switched to it.
    """
    if not hasattr(block, "conv1"):
        return []
    target = (_plain_conv(block.conv.c, f"{name}.conv.c"), _norm_affine(block.conv.bn, f"{name}.conv.bn"))
    if instance_of(block.conv1, *_REPVIT_CONV_NORM):
        second = (_plain_conv(block.conv1.c, f"{name}.conv1.c"), _norm_affine(block.conv1.bn, f"{name}.conv1.bn"))
    else:
        second = (_plain_conv(block.conv1, f"{name}.conv1"), None)
    identity = None
    if not isinstance(block.bn, nn.Identity):
        final = _norm_affine(block.bn, f"{name}.bn")
        target = (target[0], target[1].then(final))
        second = (second[0], _scaled(second[1], final.scale))
        identity = _scaled(None, final.scale)

    def install(conv: nn.Module) -> None:
        del block.conv1, block.bn
        block.conv = conv
        block.forward = conv.forward

    return [_merge(name, [target, second], [identity], install)]


def convert_repvit_classifier(block: nn.Module, name: str) -> Plans:
    """RepViT's head: each NormLinear's BN folds into its Linear; with distillation,
    ``(head(x) + head_dist(x)) / 2`` becomes one Linear in ``head`` (``head_dist``
    is deleted and ``distillation`` turned off, so forward uses that Linear alone)."""
    if not instance_of(block.head, *_REPVIT_NORM_LINEAR):
        if isinstance(block.head, (nn.Identity, nn.Linear)):
            return []  # no classes, or merged already
        raise FoldError(f"{name}: its head is a {type(block.head).__name__}, not the NormLinear (or the merged "
                        "Linear) the merge expects")
    fold_head = _bn_then_linear("l")
    if not block.distillation:
        return fold_head(block.head, f"{name}.head")
    head, dist = block.head, block.head_dist
    target = _fold_target(head.l, f"{name}.head.l")
    half = torch.full((head.l.out_features,), 0.5, dtype=torch.float64)
    dist_bn = _norm_affine(dist.bn, f"{name}.head_dist.bn")
    # head_dist's Linear with its BN folded in front, computed in float64: its
    # weight is rounded once to the target's dtype before it is added.
    dist_weight = dist.l.weight.detach().to(torch.float64)
    dist_bias = dist_weight @ dist_bn.shift.to(dist_weight.device)
    if dist.l.bias is not None:
        dist_bias = dist_bias + dist.l.bias.detach().to(torch.float64)
    dist_branch = Branch((dist_weight * dist_bn.scale.to(dist_weight.device)).to(head.l.weight.dtype),
                         ConvGeometry.of(target), dist_bias, _scaled(None, half))

    def install(merged: nn.Module) -> None:
        del block.head_dist
        block.head = head.l
        block.distillation = False

    return [Reparameterization(name, target, install, before=_norm_affine(head.bn, f"{name}.head.bn"),
                               after=_scaled(None, half), branches=[dist_branch])]


# --------------------------------------------------------------------------- registration

# (timm.models module, class, converter) for every block class merged here.
BLOCKS = tuple((f"timm.models.{module}", qualname, converter) for module, qualname, converter in (
    ("byobnet", "RepVggBlock", convert_byobnet_repvgg),
    ("byobnet", "MobileOneBlock", convert_byobnet_mobileone),
    ("fastvit", "MobileOneBlock", convert_fastvit_mobileone),
    ("fastvit", "ReparamLargeKernelConv", convert_fastvit_large_kernel),
    ("fastvit", "RepMixer", convert_fastvit_rep_mixer),
    ("fastvit", "RepConditionalPosEnc", convert_fastvit_rep_cpe),
    ("repghost", "RepGhostModule", convert_repghost_module),
    ("repvit", "RepVggDw", convert_repvit_rep_vgg_dw),
    ("repvit", "RepVitClassifier", convert_repvit_classifier),
))
# The conv/linear-BN pairs that timm's fuse() turns into one Conv or Linear. The
# newer models' modules are missing from older timm versions: their
# registrations wait for a module that is never imported.
PAIR_BLOCKS = tuple((f"timm.models.{module}", qualname, converter) for module, qualname, converter in (
    ("repvit", "ConvNorm", _layer_then_bn("c")),
    ("repvit", "NormLinear", _bn_then_linear("l")),
    ("levit", "ConvNorm", _layer_then_bn("linear")),
    ("levit", "LinearNorm", _layer_then_bn("linear")),
    ("levit", "NormLinear", _bn_then_linear("linear")),
    ("efficientvit_msra", "ConvNorm", _layer_then_bn("conv")),
    ("efficientvit_msra", "NormLinear", _bn_then_linear("linear")),
    ("tiny_vit", "ConvNorm", _layer_then_bn("conv")),
    ("shvit", "Conv2dNorm", _layer_then_bn("c")),
    ("shvit", "NormLinear", _bn_then_linear("l")),
    ("iformer", "ConvNorm", _layer_then_bn("c")),
    ("iformer", "NormLinear", _bn_then_linear("l")),
))
for _block in BLOCKS + PAIR_BLOCKS:
    register_block_by_name(*_block)
