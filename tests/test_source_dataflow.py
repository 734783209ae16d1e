"""The dataflow read from forward code: what it proves, and every way it must refuse.

Each model below is a small module whose forward either proves that a layer's
output goes to its BatchNorm alone (the pair must be found) or does something
that makes the pair unsafe or unknowable (the pair must not be reported; the
planner then falls back to torch.fx). End-to-end folding of all of these runs
through the trap tests (tests/test_traps.py, mode "source"); here the reader is
checked on its own, so that a refusal cannot hide behind the fx fallback.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedconv
from fusedconv.dataflow.source import from_source
from fusedconv.planner import _ModelIndex
from utils import randomize_batchnorm_stats


def proven_pairs(model: nn.Module) -> set[tuple[str, str]]:
    index = _ModelIndex(model, {})
    flow = from_source(model, index.tracked, index.paths)
    return {
        (node.input_from, name)
        for name, node in flow.nodes.items()
        if node.input_from is not None and name not in flow.unseen
        and flow.nodes[node.input_from].consumers == [name] and node.input_from not in flow.unseen
    }


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)


# ----------------------------------------------------------------- proven pairs


class Nested(Base):
    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Rebound(Base):
    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return x + 1


class OtherName(Base):
    def forward(self, x):
        y = self.conv(x)
        z = x.sum()
        return self.bn(y) * z


class Helper(Base):
    """torchvision's ResNet style: forward calls a private method."""

    def forward(self, x):
        return self._impl(x)

    def _impl(self, x):
        out = self.conv(x)
        out = self.bn(out)
        if self.extra is not None:
            out = out * 2
        return out

    extra = None


class InLoopBody(Base):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        for _ in range(2):
            y = self.conv(x)
            x = self.bn(y)
        return x


class DataDependent(Base):
    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y
        return -y


@pytest.mark.parametrize("model_class", [Nested, Rebound, OtherName, Helper, InLoopBody, DataDependent])
def test_pair_is_proven(model_class):
    model = model_class().eval()
    assert proven_pairs(model) == {("conv", "bn")}


def test_sequential_chain_is_proven():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    assert proven_pairs(model.eval()) == {("0", "1"), ("3", "4")}


# ----------------------------------------------------------------- refusals


class AlsoResidual(Base):
    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        return z + y


class ReadLater(Base):
    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        if z.sum() > 0:
            z = z + y.mean()
        return z


class CalledTwice(Base):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class BnTwice(Base):
    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(torch.ones(1, 4, 1, 1))


class ConditionalConsumer(Base):
    def forward(self, x):
        y = self.conv(x)
        if x.sum() > 0:
            y = self.bn(y)
        return y


class JumpBetween(Base):
    def forward(self, x):
        for _ in range(2):
            y = self.conv(x)
            if x.sum() > 0:
                break
            y = self.bn(y)
        return y


class InTry(Base):
    def forward(self, x):
        try:
            y = self.conv(x)
            y = self.bn(y)
        except RuntimeError:
            pass
        return y


class Captured(Base):
    def forward(self, x):
        y = self.conv(x)
        later = lambda: y * 2  # noqa: E731
        y = self.bn(y)
        return y + later()


class AugmentedConsumer(Base):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        y += self.bn(y)
        return y


class Walrus(Base):
    def forward(self, x):
        y = self.conv(x)
        z = self.bn(w := y)
        return z + w


class ByGetattr(Base):
    def forward(self, x):
        return getattr(self, "bn")(self.conv(x))


class SelfPassedOn(Base):
    def forward(self, x):
        return run_child(self, self.bn(self.conv(x)))


def run_child(module, x):
    return x + module.conv(x.new_zeros(1, 3, 4, 4)).mean()


class WeightRead(Base):
    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.mean()


class Children(Base):
    def forward(self, x):
        for child in self.children():
            x = child(x)
        return x


class Outer(nn.Module):
    """The inner pair is proven inside ``inner``, but the parent reaches in."""

    def __init__(self):
        super().__init__()
        self.inner = Nested()

    def forward(self, x):
        return self.inner(x) + self.inner.conv(x)


class Indexing(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.seq(x) + self.seq[0](x)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Nested()
        self.b = self.a

    def forward(self, x):
        return self.a(x) + self.b(x)


class PropertyShadow(Base):
    @property
    def bn(self):  # the attribute is not the registered submodule
        return nn.Identity()

    @bn.setter
    def bn(self, value):
        self._modules["bn"] = value

    def forward(self, x):
        return self.bn(self.conv(x))


class Decorated(Base):
    @torch.no_grad()
    def forward(self, x):
        return self.bn(self.conv(x))


class KeptInAList(Base):
    def __init__(self):
        super().__init__()
        object.__setattr__(self, "alias", [self.conv])

    def forward(self, x):
        return self.bn(self.conv(x)) + self.alias[0](x)


class MethodPassedOn(Base):
    """The method reaches ``conv`` a second time where the reading cannot see."""

    def forward(self, x):
        return self.bn(self.conv(x)) + apply(self._again, x)

    def _again(self, x):
        return self.conv(x)


def apply(function, x):
    return function(x)


class ThroughProperty(Base):
    @property
    def features(self):
        return self.conv

    def forward(self, x):
        return self.bn(self.conv(x)) + self.features(x)


REFUSED = [MethodPassedOn, ThroughProperty, AlsoResidual, ReadLater, CalledTwice, BnTwice, ConditionalConsumer, JumpBetween, InTry, Captured,
           AugmentedConsumer, Walrus, ByGetattr, SelfPassedOn, WeightRead, Children, Outer, Indexing, Shared,
           PropertyShadow, Decorated, KeptInAList]


@pytest.mark.parametrize("model_class", REFUSED)
def test_unsafe_pair_is_not_proven(model_class):
    model = model_class().eval()
    assert proven_pairs(model) == set()


def test_replaced_forward_is_not_read():
    model = Nested().eval()
    model.forward = lambda x: model.conv(x)
    assert proven_pairs(model) == set()


@pytest.mark.parametrize("model_class", REFUSED)
def test_fuse_keeps_outputs_where_the_code_proves_nothing(model_class):
    """Whatever the fallback decides, the folded model computes the same thing."""
    model = randomize_batchnorm_stats(model_class(), torch.Generator().manual_seed(3)).eval()
    channels = model.conv.in_channels if isinstance(model, Base) else 3
    x = torch.randn(2, channels, 6, 6)
    try:
        fused = fusedconv.fuse(model)
    except fusedconv.FoldError as exc:  # untraceable and unreadable: needs example inputs
        assert "example_inputs" in str(exc)
        fused = fusedconv.fuse(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_readings_are_cached_per_class():
    from fusedconv.dataflow import source

    proven_pairs(Nested().eval())
    reading = source.read_class(Nested)
    proven_pairs(Nested().eval())
    assert source.read_class(Nested) is reading
