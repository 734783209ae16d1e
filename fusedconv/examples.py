"""A small built-in network for demos and smoke tests, and random BatchNorm
statistics (:func:`randomize_batchnorm_stats`) for checking folds on any model.

:func:`build_demo_network` returns a CNN of about fifty thousand parameters that
runs in a few milliseconds on a CPU and contains one instance of each fold
kind that plain BatchNorm folding has to get right:

======================  ==============================================  ==================
module                  what it is                                      fold
======================  ==============================================  ==================
``stem``                Conv2d(stride 2) -> BatchNorm2d -> ReLU          conv -> BN
``depthwise``           depthwise Conv2d (groups = channels) -> BN       conv -> BN
``dilated``             dilated Conv2d (dilation 2) -> BN                conv -> BN
``block``               residual block whose first conv's output feeds   see below
                        both a BN and the skip connection
``up`` / ``up_bn``      grouped ConvTranspose2d(stride 2) -> BN          transposed -> BN
``pre_bn`` / ``proj``   ReLU -> BatchNorm2d -> 1x1 Conv2d                BN -> conv (pre-BN)
``fc`` / ``fc_bn``      Linear -> BatchNorm1d                            linear -> BN1d
======================  ==============================================  ==================

In ``block`` the output ``y`` of ``conv0`` is used twice: by ``bn0`` and by
the residual add.  ``bn0`` must therefore *not* be folded into ``conv0`` (that
would change the skip); it can be folded forward into ``conv1``, a 1x1 conv
without padding, which is also followed by ``bn1``.  Every BatchNorm of the
network is foldable, so a correct folder leaves none of them.

:func:`calibrate` gives the BatchNorms realistic running statistics with a few
train-mode passes on random data (nothing is downloaded), and
:func:`demo_input` makes a matching deterministic input batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DemoNet", "ResidualBlock", "build_demo_network", "calibrate", "demo_input"]

#: Channels of the demo network's input.
IN_CHANNELS = 3
#: Number of classes of the demo network's output.
NUM_CLASSES = 10


class ResidualBlock(nn.Module):
    """``y = conv0(x)``; ``out = relu(y + bn2(conv2(relu(bn1(conv1(bn0(y)))))))``.

    ``conv0``'s output feeds ``bn0`` *and* the skip connection, so ``bn0`` can
    only be folded forward into ``conv1`` (1x1, no padding: exact).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 2):
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv0(x)
        h = F.relu(self.bn1(self.conv1(self.bn0(y))))
        h = self.bn2(self.conv2(h))
        return F.relu(h + y)


class DemoNet(nn.Module):
    """The demo CNN; see the module docstring for the layer-by-layer fold kinds."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(IN_CHANNELS, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.dilated = nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
        )
        self.block = ResidualBlock(32, 48, stride=2)
        # 48 -> 24 channels in 4 groups (12 in, 6 out per group), x2 upsampling.
        self.up = nn.ConvTranspose2d(48, 24, 4, stride=2, padding=1, groups=4, bias=False)
        self.up_bn = nn.BatchNorm2d(24)
        self.pre_bn = nn.BatchNorm2d(24)
        self.proj = nn.Conv2d(24, 64, 1, bias=True)
        self.fc = nn.Linear(64, 32, bias=True)
        self.fc_bn = nn.BatchNorm1d(32)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.depthwise(x)
        x = self.dilated(x)
        x = self.block(x)
        x = F.relu(self.up_bn(self.up(x)))
        x = self.proj(self.pre_bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = F.relu(self.fc_bn(self.fc(x)))
        return self.classifier(x)


def randomize_batchnorm_stats(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm-like module random statistics and affine parameters.

    Never zeros or ones: those hide a wrong axis or a forgotten term. Works for
    torch BatchNorm*d/SyncBatchNorm, FrozenBatchNorm2d and timm's BatchNormAct2d,
    which all keep ``running_mean``/``running_var`` (and optionally ``weight``/``bias``).
    """
    with torch.no_grad():
        for module in model.modules():
            mean = getattr(module, "running_mean", None)
            var = getattr(module, "running_var", None)
            if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
                continue
            n = mean.numel()

            def draw(low, high):
                return (torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low)

            mean.copy_(torch.randn(n, generator=generator, dtype=torch.float64) * 0.5)
            var.copy_(draw(0.3, 2.0))
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                sign = torch.where(torch.rand(n, generator=generator) < 0.15, -1.0, 1.0).double()
                weight.copy_(draw(0.5, 1.5) * sign)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(n, generator=generator, dtype=torch.float64) * 0.3)
    return model


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def build_demo_network(seed: int = 0) -> nn.Module:
    """Build the demo network with deterministic weights.

    Conv/Linear weights use PyTorch's default initialisation, seeded by
    ``seed`` (the caller's global RNG state is left untouched); BatchNorm affine
    parameters are drawn away from the trivial ``gamma = 1, beta = 0`` (some
    gammas negative), as in a trained network, because trivial values would
    hide a wrong axis or a forgotten term.  Running statistics are the
    defaults (mean 0, var 1) until :func:`calibrate` is called.

    Args:
        seed: seed for every random draw; the same seed gives the same weights.

    Returns:
        A :class:`DemoNet` in training mode (call :func:`calibrate` next).
    """
    # fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DemoNet()
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for bn in _batchnorms(model):
                n = bn.num_features
                sign = torch.where(torch.rand(n, generator=gen) < 0.1, -1.0, 1.0)
                bn.weight.copy_((torch.rand(n, generator=gen) + 0.5) * sign)
                bn.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


@torch.no_grad()
def calibrate(
    model: nn.Module,
    input_shape: Sequence[int] = (8, IN_CHANNELS, 64, 64),
    steps: int = 4,
    seed: int = 0,
) -> nn.Module:
    """Give every BatchNorm realistic running statistics, then switch to eval.

    Runs ``steps`` train-mode forward passes on standard-normal random inputs of
    ``input_shape``.  During calibration each BatchNorm's running statistics are
    reset and accumulated as a plain average over the passes (``momentum=None``),
    so they are the network's real activation statistics rather than a blend
    with the initial mean 0 / var 1; the original momentum is restored after.
    Parameters are not changed.

    Args:
        model: any module whose forward takes one tensor of ``input_shape``.
        input_shape: shape of each random input batch; the batch size must be
            at least 2 (train-mode BatchNorm1d needs more than one value).
        steps: number of forward passes (at least 1).
        seed: seed of the random inputs.

    Returns:
        ``model`` itself, in eval mode.
    """
    shape = tuple(int(d) for d in input_shape)
    if steps < 1:
        raise ValueError(f"calibrate: steps must be >= 1, got {steps}")
    if not shape or shape[0] < 2:
        raise ValueError(f"calibrate: the batch size must be >= 2, got input_shape {shape}")
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    bns = _batchnorms(model)
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        if bn.track_running_stats:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average
    gen = torch.Generator().manual_seed(seed)
    try:
        model.train()
        for _ in range(steps):
            x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            model(x)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    return model.eval()


def demo_input(batch: int = 8, seed: int = 0, size: int = 64) -> torch.Tensor:
    """A deterministic standard-normal input batch for the demo network.

    Args:
        batch: batch size.
        seed: seed of the draw.
        size: height and width of the image.

    Returns:
        A float32 CPU tensor of shape ``(batch, 3, size, size)``.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, IN_CHANNELS, size, size, generator=gen)
