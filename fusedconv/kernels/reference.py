"""The ``torch`` backend: the two primitives in plain PyTorch.

Runs on any device and is the reference the other backends are tested
against, bit for bit. Each weight is read, scaled in float64 and rounded once,
a few output rows at a time, so that the float64 temporary stays small (in
cache on a CPU) and no second copy of a weight is ever allocated.
"""

from __future__ import annotations

from typing import Sequence

import torch

# Elements per float64 chunk (512 KiB): small enough for L2, large enough that
# the per-chunk overhead stays small.
_CHUNK_ELEMENTS = 1 << 16


def round_from_float64(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 values to ``dtype`` the way every backend does: half types
    go through float32 (what torch's own casts and the C++/CUDA/Triton kernels do)."""
    if dtype in (torch.float16, torch.bfloat16):
        return values.to(torch.float32).to(dtype)
    return values.to(dtype)


def column_factors(
    col_scale: torch.Tensor, rows: int, cols: int, groups: int, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """``col_scale[g(r) * cols + c]`` as a (rows, cols) grid for rows ``start..stop``:
    the per-input-channel value of each (row, column) of a grouped weight, where
    row r belongs to group ``r // (rows / groups)``."""
    stop = rows if stop is None else stop
    group_of_row = torch.arange(start, stop, device=col_scale.device) // (rows // groups)
    return col_scale.view(groups, cols)[group_of_row]


def rescale_(
    weights: Sequence[torch.Tensor],
    row_scales: Sequence[torch.Tensor | None],
    col_scales: Sequence[torch.Tensor | None],
    groups: Sequence[int],
    sources: Sequence[torch.Tensor],
) -> None:
    """``W[r, c, ...] = round(S[r, c, ...] * (row_scale[r] * col_scale[g(r) * cols + c]))`` in float64,
    where ``S`` is the weight itself or its separate source."""
    for weight, row_scale, col_scale, g, source in zip(weights, row_scales, col_scales, groups, sources):
        rows, cols = weight.shape[0], weight.shape[1]
        tail = (1,) * (weight.dim() - 2)
        step = max(1, _CHUNK_ELEMENTS // max(1, weight[0].numel())) if rows else 1
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            factor = None
            if row_scale is not None:
                factor = row_scale[start:stop].view(stop - start, 1, *tail)
            if col_scale is not None:
                grid = column_factors(col_scale, rows, cols, g, start, stop).view(stop - start, cols, *tail)
                factor = grid if factor is None else factor * grid
            if factor is None:
                continue
            block = source[start:stop].to(torch.float64, copy=True).mul_(factor)
            weight[start:stop].copy_(round_from_float64(block, weight.dtype))


def window(big: torch.Tensor, small_shape: Sequence[int], offsets: Sequence[int], dilations: Sequence[int]):
    """The view of ``big`` that a small kernel's taps land on."""
    taps = tuple(slice(o, o + d * (k - 1) + 1, d) for o, d, k in zip(offsets, dilations, small_shape[2:]))
    return big[(slice(None), slice(None), *taps)]


def pad_add_(
    bigs: Sequence[torch.Tensor],
    smalls: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor | None],
    offsets: Sequence[int],
    dilations: Sequence[int],
) -> None:
    """``big[o, i, off + j * dil] = round(big[...] + small[o, i, j] * scale[o])`` in float64."""
    at = 0
    for big, small, scale in zip(bigs, smalls, scales):
        spatial = small.dim() - 2
        target = window(big, small.shape, offsets[at : at + spatial], dilations[at : at + spatial])
        at += spatial
        added = small.to(torch.float64)
        if scale is not None:
            added = added * scale.view(-1, *(1,) * (small.dim() - 1))
        target.copy_(round_from_float64(target.to(torch.float64) + added, big.dtype))
