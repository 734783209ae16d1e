"""Measuring a folded model against a float64 reference."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .api import as_input_tuple
from .dataflow.guard import UnchangedState, check_eval_mode


@dataclass(frozen=True)
class ErrorStats:
    """Distance of a model's outputs from the float64 reference."""

    max_abs: float
    rel: float
    """||out - ref||_2 / ||ref||_2 over all floating-point outputs."""


@dataclass(frozen=True)
class VerificationReport:
    original: ErrorStats
    fused: ErrorStats

    @property
    def ratio(self) -> float:
        """fused.rel / original.rel: at most about 1 when folding lost nothing."""
        if self.original.rel == 0.0:
            return 1.0 if self.fused.rel == 0.0 else float("inf")
        return self.fused.rel / self.original.rel

    def __str__(self) -> str:
        return (
            f"error vs float64: original max-abs {self.original.max_abs:.3e} rel {self.original.rel:.3e}; "
            f"fused max-abs {self.fused.max_abs:.3e} rel {self.fused.rel:.3e}; ratio {self.ratio:.3f}"
        )


def _float_leaves(output: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _error(output: Any, reference: list[torch.Tensor]) -> ErrorStats:
    outs = _float_leaves(output)
    if len(outs) != len(reference):
        raise ValueError("the models' outputs do not have the same structure")
    max_abs, sq_err, sq_ref = 0.0, 0.0, 0.0
    for out, ref in zip(outs, reference):
        diff = out.detach().to(torch.float64) - ref
        max_abs = max(max_abs, float(diff.abs().max())) if diff.numel() else max_abs
        sq_err += float(diff.pow(2).sum())
        sq_ref += float(ref.pow(2).sum())
    return ErrorStats(max_abs, (sq_err / sq_ref) ** 0.5 if sq_ref > 0 else sq_err**0.5)


@torch.no_grad()
def verify(original: nn.Module, fused: nn.Module, example_inputs: Any) -> VerificationReport:
    """Run ``original``, ``fused`` and a float64 copy of ``original`` on ``example_inputs``
    and return the error of each of the first two against the float64 outputs.

    Both models must be in eval mode (:class:`fusedconv.FoldError` otherwise);
    the runs leave their parameters and buffers exactly as they were."""
    check_eval_mode(original, "the original model")
    check_eval_mode(fused, "the fused model")
    inputs = as_input_tuple(example_inputs)
    reference_model = copy.deepcopy(original).to(torch.float64)
    reference_inputs = tree_map(
        lambda t: t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, inputs
    )
    reference = [t.to(torch.float64) for t in _float_leaves(reference_model(*reference_inputs))]
    with UnchangedState(original, "verify's run of the original model"):
        original_error = _error(original(*inputs), reference)
    with UnchangedState(fused, "verify's run of the fused model"):
        fused_error = _error(fused(*inputs), reference)
    return VerificationReport(original_error, fused_error)
