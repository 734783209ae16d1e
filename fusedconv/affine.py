"""Per-channel affine maps in float64: what an eval-mode BatchNorm computes.

BatchNorm in eval mode is ``y = x * s + t`` per channel with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``.
Both are computed in float64 so that the only rounding a folded weight sees is
the final one to its own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FoldError


@dataclass(frozen=True)
class ChannelAffine:
    """``y[:, c] = x[:, c] * scale[c] + shift[c]``, both float64 vectors."""

    scale: torch.Tensor
    shift: torch.Tensor

    def then(self, after: "ChannelAffine") -> "ChannelAffine":
        """The map that applies ``self`` and then ``after``."""
        return ChannelAffine(self.scale * after.scale, self.shift * after.scale + after.shift)


def _first_channels(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten()[:5].tolist()


def batchnorm_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    name: str = "BatchNorm",
) -> ChannelAffine:
    """The affine map of an eval-mode BatchNorm, after checking its statistics.

    ``weight``/``bias`` are None for ``affine=False``. Raises :class:`FoldError`
    naming ``name`` when a statistic is NaN/inf, the variance is negative, or
    ``running_var + eps`` is zero.
    """
    mean = running_mean.detach().to(torch.float64)
    var = running_var.detach().to(torch.float64)
    gamma = torch.ones_like(mean) if weight is None else weight.detach().to(torch.float64)
    beta = torch.zeros_like(mean) if bias is None else bias.detach().to(torch.float64)
    stats = torch.stack((mean, var, gamma, beta))
    # One host sync for the common case; the message is worked out only on failure.
    if not bool(torch.isfinite(stats).all() & (var + eps > 0).all()):
        for row, what in zip(stats, ("running_mean", "running_var", "weight", "bias")):
            bad = ~torch.isfinite(row)
            if bool(bad.any()):
                raise FoldError(f"{name}: {what} is not finite (NaN or inf) in channels {_first_channels(bad)}")
        if bool((var < 0).any()):
            raise FoldError(f"{name}: running_var is negative in channels {_first_channels(var < 0)}")
        raise FoldError(f"{name}: running_var + eps is zero, so the BatchNorm divides by zero")
    scale = gamma / torch.sqrt(var + eps)
    return ChannelAffine(scale, beta - mean * scale)


def compose(affines: list[ChannelAffine]) -> ChannelAffine | None:
    """Chain maps applied in order (first applied first); None for an empty list."""
    if not affines:
        return None
    total = affines[0]
    for nxt in affines[1:]:
        total = total.then(nxt)
    return total
