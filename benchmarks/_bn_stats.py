"""Random BatchNorm statistics for the benchmarks' ``--check`` runs (the
benchmarks do not import from ``tests/``; this mirrors
``tests/utils.randomize_batchnorm_stats``)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm_stats(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm-like module random statistics and affine parameters,
    never zeros or ones, so that a wrong fold shows in the error ratio. Works for
    any module with ``running_mean``/``running_var`` (and optional ``weight``/``bias``)."""
    with torch.no_grad():
        for module in model.modules():
            mean = getattr(module, "running_mean", None)
            var = getattr(module, "running_var", None)
            if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
                continue
            n = mean.numel()

            def draw(low, high):
                return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low

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
