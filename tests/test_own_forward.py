"""Layers whose own forward is provably a plain conv (issue 13, item 4), and
timm's BatchNormAct with identity activation and drop.

A "same padding" conv pads its input and calls ``F.conv2d(x, self.weight,
self.bias, ...)``: a BN after it folds exactly. Every variant that is not
provably that (the weight changed or read another way, the output changed,
code the proof cannot follow) must stay refused, with the reason.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedconv
from utils import float64_reference, randomize_batchnorm_stats, relative_error

FACTOR, FLOOR = 1.5, 4 * torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("fixed_seed")  # tests/conftest.py


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_to_same(x, kernel_size, stride, dilation):
    """Pad ``x`` so that the conv's output has ceil(size / stride) positions."""
    height, width = x.shape[-2:]
    pad_h = _same_padding(height, kernel_size[0], stride[0], dilation[0])
    pad_w = _same_padding(width, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def same_conv2d(x, weight, bias, stride, dilation, groups):
    x = pad_to_same(x, weight.shape[-2:], stride, dilation)
    return F.conv2d(x, weight, bias, stride, 0, dilation, groups)


class DynamicSameConv(nn.Conv2d):
    """Padding computed from the input's size, through a helper function."""

    def forward(self, x):
        return same_conv2d(x, self.weight, self.bias, self.stride, self.dilation, self.groups)


class StaticSameConv(nn.Conv2d):
    """Padding fixed at construction, applied by a child module."""

    def __init__(self, *args, image_size=8, **kwargs):
        super().__init__(*args, **kwargs)
        pad = _same_padding(image_size, self.kernel_size[0], self.stride[0], self.dilation[0])
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad else nn.Identity()

    def forward(self, x):
        x = self.static_padding(x)
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return x


class LinearWithOwnForward(nn.Linear):
    def forward(self, x):
        return F.linear(x.flatten(1), self.weight, self.bias)


class ConvThenBN(nn.Module):
    def __init__(self, conv, channels=6, before=False):
        super().__init__()
        self.conv, self.bn = conv, nn.BatchNorm2d(channels) if isinstance(conv, nn.Conv2d) else nn.BatchNorm1d(channels)
        self.before = before

    def forward(self, x):
        return self.bn(self.conv(x))


class BNThenConv(nn.Module):
    def __init__(self, conv, channels):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(channels), conv

    def forward(self, x):
        return self.conv(self.bn(x))


def folds_exactly(model: nn.Module, x: torch.Tensor, folded: set[str], mode: str) -> fusedconv.FusionPlan:
    model = randomize_batchnorm_stats(model, torch.Generator().manual_seed(4)).eval()
    reference = float64_reference(model, (x,))
    with torch.no_grad():
        unfolded = relative_error(model(x), reference)
    example = (x,) if mode == "run" else None
    plan = fusedconv.plan(model, example)
    assert {bn for f in plan.folds for bn in f.batchnorms} == folded, str(plan)
    with torch.no_grad():
        error = relative_error(fusedconv.fuse(model, example)(x), reference)
    assert error <= FACTOR * unfolded + FLOOR
    return plan


@pytest.mark.parametrize("mode", ["source", "run"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("make", [
    lambda bias: DynamicSameConv(3, 6, 3, stride=2, bias=bias),
    lambda bias: DynamicSameConv(6, 6, 5, groups=6, dilation=2, bias=bias),
    lambda bias: StaticSameConv(3, 6, 3, stride=2, bias=bias),
], ids=["dynamic", "dynamic_depthwise_dilated", "static"])
def test_same_padding_convs_fold_like_standard_ones(make, bias, mode):
    conv = make(bias)
    x = torch.randn(2, conv.in_channels, 8, 8)
    folds_exactly(ConvThenBN(conv), x, {"bn"}, mode)


def test_linear_with_a_plain_own_forward():
    model = ConvThenBN(LinearWithOwnForward(12, 6))
    folds_exactly(model, torch.randn(5, 3, 2, 2), {"bn"}, "run")


def test_a_bn_before_an_own_forward_conv_stays():
    plan = folds_exactly(BNThenConv(StaticSameConv(3, 6, 1, padding=0), 3), torch.randn(2, 3, 8, 8), set(), "run")
    assert "forward of its own" in plan.skipped[0].reason


# --------------------------------------------------------------------------- what must stay refused


class ScaledOutput(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias) * 2


class ChangedWeight(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight * 2, self.bias)


class TransposedWeight(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight.transpose(0, 1).transpose(0, 1), self.bias)


class NoBias(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, None)


class WeightReadElsewhere(nn.Conv2d):
    def forward(self, x):
        y = F.conv2d(x, self.weight, self.bias)
        self.last_norm = self.weight.norm()
        return y


class ThroughAMethod(nn.Conv2d):
    def forward(self, x):
        return self.run(x)

    def run(self, x):
        return F.conv2d(x, self.weight, self.bias)


class WrongDims(nn.Conv1d):
    def forward(self, x):
        return F.conv2d(x.unsqueeze(-1), self.weight.unsqueeze(-1), self.bias).squeeze(-1)


class ReadsAProperty(nn.Conv2d):
    @property
    def step(self):
        return self.stride

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.step)


class NoConvAtAll(nn.Conv2d):
    def forward(self, x):
        return torch.relu(x)


class EarlyReturn(nn.Conv2d):
    def forward(self, x):
        if x.shape[0] > 1:
            return torch.relu(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def scaled_twice(x, weight, bias):
    return F.conv2d(x, weight, bias) * 2


class HelperChangesOutput(nn.Conv2d):
    def forward(self, x):
        return scaled_twice(x, self.weight, self.bias)


@pytest.mark.parametrize("cls, why", [
    (ScaledOutput, "return"),
    (ChangedWeight, "weight and bias"),
    (TransposedWeight, "weight and bias"),
    (NoBias, "weight and bias"),
    (WeightReadElsewhere, "one call"),
    (ThroughAMethod, "is not the conv"),
    (NoConvAtAll, "is not the conv"),
    (EarlyReturn, "before its last line"),
    (ReadsAProperty, "computes"),
    (HelperChangesOutput, "return"),
])
@pytest.mark.parametrize("mode", ["source", "run"])
def test_own_forwards_that_are_not_a_plain_conv_stay_refused(cls, why, mode):
    plan = folds_exactly(ConvThenBN(cls(6, 6, 3, padding=1)), torch.randn(2, 6, 8, 8), set(), mode)
    assert "own forward" in plan.skipped[0].reason and why in plan.skipped[0].reason, plan.skipped[0].reason


def test_a_conv1d_forward_calling_conv2d_stays_refused():
    model = ConvThenBN(WrongDims(3, 6, 3), channels=6)
    model.bn = nn.BatchNorm1d(6)
    plan = folds_exactly(model, torch.randn(2, 3, 8), set(), "run")
    assert "not what the forward returns" in plan.skipped[0].reason


def test_a_changed_forward_is_proved_again(monkeypatch):
    model = randomize_batchnorm_stats(ConvThenBN(DynamicSameConv(3, 6, 3)), torch.Generator().manual_seed(1)).eval()
    assert fusedconv.plan(model).num_folded == 1
    monkeypatch.setattr(DynamicSameConv.forward, "__code__", ScaledOutput.forward.__code__)
    assert fusedconv.plan(model).num_folded == 0


CONV_OPERATION = F.conv2d


def _ignores_weight(x, weight, bias, *args):
    return x[:, : weight.shape[0]]


class ThroughAGlobal(nn.Conv2d):
    def forward(self, x):
        return CONV_OPERATION(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_a_rebound_global_is_proved_again(monkeypatch):
    model = randomize_batchnorm_stats(ConvThenBN(ThroughAGlobal(6, 6, 1)), torch.Generator().manual_seed(2)).eval()
    assert fusedconv.plan(model).num_folded == 1
    monkeypatch.setitem(globals(), "CONV_OPERATION", _ignores_weight)
    assert fusedconv.plan(model).num_folded == 0


# --------------------------------------------------------------------------- timm


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "tf_mobilenetv3_large_100"])
def test_timm_same_padding_models_fold_completely(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False)
    plan = folds_exactly(model, torch.randn(1, 3, 64, 64), {n for n, m in model.named_modules()
                                                          if isinstance(m, nn.modules.batchnorm._BatchNorm)}, "source")
    assert not plan.skipped


@pytest.mark.parametrize("before", [False, True])
def test_batchnorm_act_without_activation_folds_like_a_batchnorm(before):
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    class PreNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre_norm = BatchNormAct2d(4, apply_act=False)
            self.conv = nn.Conv2d(4, 6, 1)
            self.post_norm = BatchNormAct2d(6, apply_act=False)

        def forward(self, x):
            return self.post_norm(self.conv(self.pre_norm(x)))

    del timm
    plan = folds_exactly(PreNorm(), torch.randn(2, 4, 6, 6), {"pre_norm", "post_norm"}, "run" if before else "source")
    assert plan.folds[0].before == ("pre_norm",)


@pytest.mark.slow
def test_smp_unet_with_an_efficientnet_encoder_folds_every_batch_norm_that_runs():
    """segmentation_models_pytorch's Unet on efficientnet-pytorch's encoder, whose
    convs are Conv2dStaticSamePadding (a ZeroPad2d child, then F.conv2d)."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    pytest.importorskip("efficientnet_pytorch")
    model = smp.Unet("efficientnet-b0", encoder_weights=None, classes=2)
    plan = folds_exactly(model, torch.randn(1, 3, 64, 64), {
        n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} - {"encoder._bn1"},
        "source")
    # efficientnet-pytorch's classifier-head BN, which the Unet's encoder never runs
    assert [(s.module, s.reason) for s in plan.skipped] == [("encoder._bn1", "never called by forward")]
