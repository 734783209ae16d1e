"""Per-channel affine maps in float64: what an eval-mode BatchNorm computes.

BatchNorm in eval mode is ``y = x * s + t`` per channel with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``.
Both are computed in float64 so that the only rounding a folded weight sees is
the final one to its own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import FoldError
from .kernels.extension import native_function


# Not frozen: one is made for every BN or layer of a model, and a frozen
# dataclass's __init__ costs four times as much.
@dataclass(slots=True)
class ChannelAffine:
    """``y[:, c] = x[:, c] * scale[c] + shift[c]``, both float64 vectors."""

    scale: torch.Tensor
    shift: torch.Tensor

    def then(self, after: "ChannelAffine") -> "ChannelAffine":
        """The map that applies ``self`` and then ``after``."""
        return ChannelAffine(self.scale * after.scale, self.shift * after.scale + after.shift)


def _first_channels(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten()[:5].tolist()


@dataclass(slots=True)  # not frozen either, like ChannelAffine
class BatchNormStats:
    """What an eval-mode BatchNorm reads: running statistics, optional affine
    parameters (None for ``affine=False``) and eps; ``name`` labels errors."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    name: str = "BatchNorm"


def _as_float64(stats: BatchNormStats) -> tuple[torch.Tensor, ...]:
    mean = stats.running_mean.detach().reshape(-1).to(torch.float64)
    var = stats.running_var.detach().reshape(-1).to(torch.float64)
    gamma = torch.ones_like(mean) if stats.weight is None else stats.weight.detach().reshape(-1).to(torch.float64)
    beta = torch.zeros_like(mean) if stats.bias is None else stats.bias.detach().reshape(-1).to(torch.float64)
    return mean, var, gamma, beta


def _concatenated(stats: Sequence[BatchNormStats]) -> tuple:
    """Means, variances, gammas and betas of many BNs on one device, the rows of
    one float64 matrix made with one copy, and the channel counts."""
    sizes = [s.running_mean.numel() for s in stats]
    ones = zeros = None
    if any(s.weight is None or s.bias is None for s in stats):  # affine=False: gamma 1, beta 0
        ones = torch.ones(max(sizes), dtype=stats[0].running_mean.dtype, device=stats[0].running_mean.device)
        zeros = torch.zeros_like(ones)

    def column(tensors, missing):
        # Statistics are vectors already, so the reshape is mostly skipped (a call
        # per tensor adds up over a model's BNs).
        return [missing[:n] if t is None else t if t.dim() == 1 else t.reshape(-1) for t, n in zip(tensors, sizes)]

    parts = (column([s.running_mean for s in stats], None) + column([s.running_var for s in stats], None) +
             column([s.weight for s in stats], ones) + column([s.bias for s in stats], zeros))
    with torch.no_grad():  # the columns are copies that autograd need not follow
        if len({p.dtype for p in parts}) == 1:
            joined = torch.cat(parts).to(torch.float64)  # one copy and one conversion for all four columns
        else:
            joined = torch.cat([p.to(torch.float64) for p in parts])
    return joined.view(4, -1), sizes


def _raise_for_bad_stats(stats: BatchNormStats) -> None:
    """Raise the :class:`FoldError` that names what is wrong with one BN, if anything is."""
    mean, var, gamma, beta = _as_float64(stats)
    for values, what in zip((mean, var, gamma, beta), ("running_mean", "running_var", "weight", "bias")):
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            raise FoldError(f"{stats.name}: {what} is not finite (NaN or inf) in channels {_first_channels(bad)}")
    if bool((var < 0).any()):
        raise FoldError(f"{stats.name}: running_var is negative in channels {_first_channels(var < 0)}")
    if not bool((var + stats.eps > 0).all()):
        raise FoldError(f"{stats.name}: running_var + eps is zero, so the BatchNorm divides by zero")


def batchnorm_affines(all_stats: Sequence[BatchNormStats]) -> list[ChannelAffine]:
    """The affine maps of many eval-mode BatchNorms, after checking their statistics.

    BNs on the same device are computed together: a handful of tensor ops and
    one host sync in all, however many BNs a model has (on the CPU, one call of
    the extension's ``bn_affines`` where it is built: the same arithmetic, see
    ``csrc/affines.cpp``). Raises :class:`FoldError` naming the BN whose
    statistic is NaN/inf, whose variance is negative, or whose
    ``running_var + eps`` is zero.
    """
    affines: list[ChannelAffine | None] = [None] * len(all_stats)
    by_device: dict[torch.device, list[int]] = {}
    for i, stats in enumerate(all_stats):
        by_device.setdefault(stats.running_mean.device, []).append(i)
    for device, indices in by_device.items():
        group = [all_stats[i] for i in indices]
        maps = _native_affines(group) if device.type == "cpu" else None
        for i, affine in zip(indices, maps if maps is not None else _affines(group)):
            affines[i] = affine
    return affines


def _affines(group: Sequence[BatchNormStats]) -> list[ChannelAffine]:
    """:func:`batchnorm_affines` of BNs on one device, with torch ops."""
    columns, sizes = _concatenated(group)
    mean, var, gamma, beta = columns
    epsilons = [stats.eps for stats in group]
    if len(set(epsilons)) == 1:  # the usual case; as a float64 scalar it adds exactly what a vector would
        eps = epsilons[0]
    else:
        eps = torch.repeat_interleave(
            torch.tensor(epsilons, dtype=torch.float64, device=mean.device),
            torch.tensor(sizes, device=mean.device),
        )
    var_eps = var + eps
    # A sum is finite only if every term is; one that overflows merely sends
    # the BNs through the exact checks, which then find nothing.
    finite = torch.isfinite(columns.sum())
    if not bool(finite & (var_eps > 0).all()):
        for stats in group:
            _raise_for_bad_stats(stats)
    scale = gamma / torch.sqrt(var_eps)
    shift = beta - mean * scale
    # torch.split_with_sizes, not Tensor.split: the Python wrapper costs more than the views
    return [ChannelAffine(s, t) for s, t in zip(torch.split_with_sizes(scale, sizes),
                                                torch.split_with_sizes(shift, sizes))]


def _native_affines(group: Sequence[BatchNormStats]) -> list[ChannelAffine] | None:
    """:func:`_affines` of BNs on the CPU in one call of the extension, or None
    where it is not built or does not read these statistics directly."""
    compute = native_function("bn_affines")
    if compute is None:
        return None
    computed = compute([s.running_mean for s in group], [s.running_var for s in group], [s.weight for s in group],
                       [s.bias for s in group], [float(s.eps) for s in group])
    if computed is None:
        return None
    scales, shifts, all_fit = computed
    if not all_fit:
        for stats in group:
            _raise_for_bad_stats(stats)
    return [ChannelAffine(s, t) for s, t in zip(scales, shifts)]


def batchnorm_affine(stats: BatchNormStats) -> ChannelAffine:
    """The affine map of one eval-mode BatchNorm (see :func:`batchnorm_affines`)."""
    return batchnorm_affines([stats])[0]


def compose(affines: list[ChannelAffine]) -> ChannelAffine | None:
    """Chain maps applied in order (first applied first); None for an empty list."""
    if not affines:
        return None
    total = affines[0]
    for nxt in affines[1:]:
        total = total.then(nxt)
    return total
