"""Helpers shared by the tests: random BatchNorm statistics, calibration and
error measurement against a float64 reference."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fusedconv.dataflow.find
from fusedconv.examples import randomize_batchnorm_stats  # noqa: F401  (the tests' import point)
from fusedconv.dataflow import Dataflow, Node
from torch.utils._pytree import tree_flatten, tree_map


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


class Residual(nn.Module):
    """conv -> BN, and the conv's output also added to the BN's: the BN must stay."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def assert_structure_takes_the_fold(structure: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    """A folded structure on the meta device has the real fold's state-dict keys,
    in order, loads its state dict (strict, ``assign=True``) and then computes
    what the real fold computes, bit for bit."""
    assert list(structure.state_dict()) == list(folded.state_dict())
    assert all(t.is_meta for t in structure.state_dict().values())
    structure.load_state_dict(folded.state_dict(), assign=True)
    with torch.no_grad():
        assert torch.equal(structure(x), folded(x))
