"""Helpers shared by the tests: random BatchNorm statistics, calibration and
error measurement against a float64 reference."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fusedconv.dataflow.find
from fusedconv.dataflow import Dataflow, Node
from torch.utils._pytree import tree_flatten, tree_map


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


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, make_input, steps: int = 3) -> nn.Module:
    """Run a few train-mode passes on random data so that BN statistics are the
    realistic ones of the random-initialised network, then switch to eval."""
    model.train()
    for _ in range(steps):
        model(*make_input())
    return model.eval()


def float_outputs(output) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (any nesting of tuples/lists/dicts)."""
    leaves, _ = tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_error(output, reference) -> float:
    """||output - reference|| / ||reference|| over all floating outputs, in float64.

    An all-zero reference (a random draw where a ReLU zeroes everything) gives 0
    for an all-zero output and infinity for anything else."""
    outs, refs = float_outputs(output), float_outputs(reference)
    assert len(outs) == len(refs) and outs, "outputs do not match the reference's structure"
    num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outs, refs))
    den = sum(float(r.double().pow(2).sum()) for r in refs)
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return (num / den) ** 0.5


def float64_reference(model: nn.Module, inputs: tuple):
    """Output of a float64 copy of ``model`` on float64 copies of ``inputs``."""
    ref_model = copy.deepcopy(model).to(torch.float64)
    ref_inputs = tree_map(
        lambda t: t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        inputs,
    )
    with torch.no_grad():
        return ref_model(*ref_inputs)


def _nothing_readable(model, tracked, paths, held_elsewhere=None):
    return Dataflow({name: Node(name) for name in tracked.values()}, "source",
                    dict.fromkeys(tracked.values(), "hidden by the test"))


def trace_only(monkeypatch) -> None:
    """Switch off fusedconv's reading of forward code, so that a plan made
    without example inputs comes from torch.fx alone."""
    monkeypatch.setattr(fusedconv.dataflow.find, "from_source", _nothing_readable)
