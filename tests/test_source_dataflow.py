"""The dataflow read from forward code: what it proves, and every way it must refuse.

Each model below is a small module whose forward either proves that a layer's
output goes to its BatchNorm alone (the pair must be found) or does something
that makes the pair unsafe or unknowable (the pair must not be reported; the
rules then fall back to torch.fx). End-to-end folding of all of these runs
through the trap tests (tests/test_traps.py, mode "source"); here the reader is
checked on its own, so that a refusal cannot hide behind the fx fallback.
"""

from __future__ import annotations

import builtins
import functools
import io
import re

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import fusedconv
from fusedconv.dataflow.source import from_source
from fusedconv.model_index import ModelIndex
from fusedconv.rules import Matcher
from utils import randomize_batchnorm_stats, trace_only

try:  # the helper timm's models call, and its re-export
    import timm.models
    from timm.models._manipulate import checkpoint_seq
except ImportError:  # pragma: no cover - no timm
    timm = checkpoint_seq = None
needs_timm = pytest.mark.skipif(checkpoint_seq is None, reason="needs timm")


def source_flow(model: nn.Module):
    index = ModelIndex(model, {})
    return from_source(model, index.tracked, index.paths)


def proven_pairs(model: nn.Module) -> set[tuple[str, str]]:
    flow = source_flow(model)
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


# ----------------------------------------------------------------- checkpoint helpers


def conv_bn(channels: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4))


class ResidualSequential(nn.Sequential):
    """An nn.Sequential whose forward is not its children in order: helpers that
    iterate the children bypass it."""

    def forward(self, x):
        return x + self[1](self[0](x))


class CheckpointBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = conv_bn()

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


class CheckpointDotted(CheckpointBlock):
    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


class CheckpointSequentialSeq(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return checkpoint_sequential(self.seq, 2, x, use_reentrant=False)


class CheckpointSequentialList(nn.Module):
    """A list is called item by item: any module, its own forward included."""

    def __init__(self):
        super().__init__()
        self.first, self.second = conv_bn(), ResidualSequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return checkpoint_sequential([self.first, self.second], 2, x, use_reentrant=False)


class TimmFlattened(nn.Module):
    """timm's ResNet.forward_features, in small."""

    def __init__(self):
        super().__init__()
        self.layer1, self.layer2 = conv_bn(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.grad_checkpointing = True

    def forward(self, x):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
        return x


class TimmReexported(TimmFlattened):
    def forward(self, x):
        return timm.models.checkpoint_seq((self.layer1, self.layer2), x, every=2, flatten=True, use_reentrant=False)


class TimmCheckpoint(CheckpointBlock):
    """timm's own wrapper of torch's checkpoint (cait, davit, dpn, ...)."""

    def forward(self, x):
        return timm.models._manipulate.checkpoint(self.block, x)


class TimmNotFlattened(TimmFlattened):
    """Without flatten, the listed modules are called: their own forward runs."""

    def __init__(self):
        super().__init__()
        self.layer2 = ResidualSequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return checkpoint_seq([self.layer1, self.layer2], x)


CHECKPOINT_PROVEN = [
    (CheckpointBlock, {("block.0", "block.1")}),
    (CheckpointDotted, {("block.0", "block.1")}),
    (CheckpointSequentialSeq, {("seq.0", "seq.1"), ("seq.3", "seq.4")}),
    (CheckpointSequentialList, {("first.0", "first.1")}),  # second's own forward is read: it is opaque
    pytest.param(TimmFlattened, {("layer1.0", "layer1.1"), ("layer2.0", "layer2.1")}, marks=needs_timm),
    pytest.param(TimmReexported, {("layer1.0", "layer1.1"), ("layer2.0", "layer2.1")}, marks=needs_timm),
    pytest.param(TimmNotFlattened, {("layer1.0", "layer1.1")}, marks=needs_timm),
    pytest.param(TimmCheckpoint, {("block.0", "block.1")}, marks=needs_timm),
]


@pytest.mark.parametrize("model_class, pairs", CHECKPOINT_PROVEN)
def test_pairs_run_through_checkpoint_helpers_are_proven(model_class, pairs):
    model = randomize_batchnorm_stats(model_class(), torch.Generator().manual_seed(5)).eval()
    assert proven_pairs(model) == pairs
    flow = source_flow(model)
    for producer, consumer in pairs:
        assert flow.nodes[producer].calls == flow.nodes[consumer].calls == 1
    x = torch.randn(2, 3, 6, 6)
    fused = fusedconv.fuse(model, (x,))  # the fold itself stays exact
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


# Refused: the helper runs the module's children and bypasses its own forward,
# or the function is not a checkpoint helper at all.


class CheckpointSequentialCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = ResidualSequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return checkpoint_sequential(self.seq, 1, x, use_reentrant=False)


class CheckpointSequentialModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = Nested()

    def forward(self, x):
        return checkpoint_sequential(self.seq, 1, x, use_reentrant=False)


class TimmFlattenedCustom(TimmFlattened):
    def __init__(self):
        super().__init__()
        self.layer2 = ResidualSequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


class TimmFlattenedUnknown(TimmFlattenedCustom):
    """flatten is not known from the source: read as flatten=True."""

    def forward(self, x, flatten=False):
        return checkpoint_seq([self.layer1, self.layer2], x, flatten=flatten)


class TimmBareFlattened(nn.Module):
    """flatten=True on a Sequential iterates its children's children."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(conv_bn(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))

    def forward(self, x):
        return checkpoint_seq(self.seq, x, flatten=True)


class UserRunner(CheckpointBlock):
    def forward(self, x):
        return run(self.block, x)


def run(function, x):
    return function(x) * 2


class ShadowedCheckpoint(CheckpointBlock):
    def forward(self, x, checkpoint=run):  # the name is a parameter here, not torch's checkpoint
        return checkpoint(self.block, x)


class CheckpointTupleLiteral(CheckpointBlock):
    def forward(self, x):
        return checkpoint([self.block], x)


class CheckpointKeyword(CheckpointBlock):
    def forward(self, x):
        return checkpoint(function=self.block, use_reentrant=False)


CHECKPOINT_REFUSED = [
    (CheckpointSequentialCustom, "seq",
     r"uses seq in another way than calling it \(a checkpoint helper runs its children"),
    (CheckpointSequentialModule, "seq",
     r"uses seq in another way than calling it \(a checkpoint helper runs its children"),
    pytest.param(TimmFlattenedCustom, "layer2",
                 r"uses layer2 in another way than calling it \(a checkpoint helper runs its children",
                 marks=needs_timm),
    pytest.param(TimmFlattenedUnknown, "layer2",
                 r"uses layer2 in another way than calling it \(a checkpoint helper runs its children",
                 marks=needs_timm),
    pytest.param(TimmBareFlattened, "seq", r"uses seq in another way than calling it$", marks=needs_timm),
    (UserRunner, "block", r"uses block in another way than calling it$"),
    (ShadowedCheckpoint, "block", r"uses block in another way than calling it$"),
    (CheckpointTupleLiteral, "block", r"uses block in another way than calling it$"),
    (CheckpointKeyword, "block", r"uses block in another way than calling it$"),
]


@pytest.mark.parametrize("model_class, child, reason", CHECKPOINT_REFUSED)
def test_checkpoint_helpers_that_bypass_forward_are_refused(model_class, child, reason):
    model = model_class().eval()
    flow = source_flow(model)
    inside = {name for name in flow.nodes if name.startswith(child + ".")}
    assert inside and inside <= set(flow.unseen)
    for name in inside:
        assert re.search(reason, flow.unseen[name]), flow.unseen[name]
    assert not any(pair[0] in inside for pair in proven_pairs(model))


class CheckpointedMethod(Base):
    def forward(self, x):
        return self.bn(self.conv(x)) + checkpoint(self._again, x, use_reentrant=False)

    def _again(self, x):
        return self.conv(x)


def test_method_passed_to_checkpoint_stays_opaque():
    flow = source_flow(CheckpointedMethod().eval())
    assert set(flow.unseen) == {"conv", "bn"}
    assert all("passes its method _again on" in why for why in flow.unseen.values())


class ConvCheckpointedAndCalled(Base):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.bn(self.conv(x)) + checkpoint(self.conv, x, use_reentrant=False)


class ConvCheckpointedThenBn(Base):
    def forward(self, x):
        y = checkpoint(self.conv, x, use_reentrant=False)
        y = self.bn(y)
        return y


def test_tracked_layer_run_by_checkpoint_is_counted_and_never_paired():
    model = ConvCheckpointedAndCalled().eval()
    index = ModelIndex(model, {})
    flow = from_source(model, index.tracked, index.paths)
    assert not flow.unseen and flow.nodes["conv"].calls == 2
    matcher = Matcher(index, flow)
    plan = matcher.plan()
    assert plan.folds == [] and [s.module for s in plan.skipped] == ["bn"]
    assert "called 2 times" in matcher.layer_problem("conv")

    model = ConvCheckpointedThenBn().eval()
    flow = source_flow(model)
    assert not flow.unseen and flow.nodes["conv"].calls == flow.nodes["bn"].calls == 1
    assert flow.nodes["conv"].consumers == [None] and flow.nodes["bn"].input_from is None
    assert proven_pairs(model) == set()


@pytest.mark.slow
def test_timm_resnet50_is_read_through_checkpoint_seq(monkeypatch):
    timm = pytest.importorskip("timm")
    model = randomize_batchnorm_stats(timm.create_model("resnet50"), torch.Generator().manual_seed(7)).eval()
    plan = fusedconv.plan(model)
    assert plan.source == "source" and len(plan.folds) == 53 and not plan.skipped
    trace_only(monkeypatch)
    traced = fusedconv.plan(model)
    assert traced.source == "torch.fx" and traced.folds == plan.folds


# --------------------------------------------------------------------------- functional batch norms, cheaply

_PLAIN_SOURCE = '''
from torch import nn


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x)
'''

_FUNCTIONAL_SOURCE = '''
import torch
import torch.nn.functional as F


def forward(self, x):
    return F.batch_norm(self.linear(x), self.mean, self.var)
'''


def _module_from(path, source: str):
    import importlib.util

    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)  # not put in sys.modules: nothing to restore
    spec.loader.exec_module(module)
    return module


def test_functional_batch_norms_found_without_reading_classes_that_cannot_call_them(tmp_path, monkeypatch):
    """A model whose BNs all sit in blocks has its other classes scanned for
    functional batch norms; a class whose methods' code never names one is not
    read (most of a first fold's time), and a method replaced by one whose code
    does is read again and reported."""
    from fusedconv.dataflow import source

    head_class = _module_from(tmp_path / "plain_head.py", _PLAIN_SOURCE).Head
    functional_forward = _module_from(tmp_path / "functional_forward.py", _FUNCTIONAL_SOURCE).forward
    model = nn.Sequential(fusedconv.blocks.RepVGGBlock(3, 4, 3, padding=1), nn.Flatten(1), nn.Linear(16, 4),
                          head_class())
    model[3].register_buffer("mean", torch.randn(2))
    model[3].register_buffer("var", torch.rand(2) + 0.5)
    read = []
    real_read_class = source.read_class
    monkeypatch.setattr(source, "read_class", lambda cls: read.append(cls) or real_read_class(cls))
    model = randomize_batchnorm_stats(model, torch.Generator().manual_seed(0)).eval()

    plan = fusedconv.plan(model)
    assert head_class not in read and plan.merges == ["0"] and plan.skipped == []
    monkeypatch.setattr(head_class, "forward", functional_forward)
    plan = fusedconv.plan(model)
    assert head_class in read
    assert [skip.reason.split(":")[0] for skip in plan.skipped] == ["a batch norm computed by a function call, not "
                                                                     "a module"]
    assert "F.batch_norm" in plan.skipped[0].module
    # Python reads identifiers in NFKC form: a full-width letter still spells the call.
    monkeypatch.setattr(head_class, "forward", _module_from(
        tmp_path / "full_width.py", _FUNCTIONAL_SOURCE.replace("F.batch_norm", "F.\uff42atch_norm")).forward)
    assert [skip.module for skip in fusedconv.plan(model).skipped] == ["3: Head: F.batch_norm(...)"]
    # A method whose code is replaced in place (its class's namespace unchanged) is looked at again.
    other_class = _module_from(tmp_path / "plain_head_2.py", _PLAIN_SOURCE).Head
    model[3] = other_class()
    model[3].register_buffer("mean", torch.randn(2))
    model[3].register_buffer("var", torch.rand(2) + 0.5)
    assert fusedconv.plan(model.eval()).skipped == []
    monkeypatch.setattr(other_class.forward, "__code__", functional_forward.__code__)
    assert [skip.module for skip in fusedconv.plan(model).skipped] == ["3: Head: F.batch_norm(...)"]


def test_fuse_looks_for_functional_batch_norms_only_to_log_them(tmp_path, monkeypatch, caplog):
    """Where every BN module sits in a block, fuse() does not read the other
    classes' code for batch norms computed by function calls (no fold removes
    them) unless it logs the plan, whose count of BNs left includes them; the
    folded model is the same either way."""
    import logging

    from fusedconv.dataflow import find

    head_class = _module_from(tmp_path / "functional_head.py", _PLAIN_SOURCE).Head
    monkeypatch.setattr(head_class, "forward", _module_from(tmp_path / "functional_forward_2.py",
                                                            _FUNCTIONAL_SOURCE).forward)
    scans = []
    real_scan = find.functional_batchnorm_calls
    monkeypatch.setattr(find, "functional_batchnorm_calls", lambda modules: scans.append(1) or real_scan(modules))

    original = nn.Sequential(fusedconv.blocks.RepVGGBlock(3, 4, 3, padding=1), nn.Flatten(1), nn.Linear(16, 4),
                             head_class())
    original[3].register_buffer("mean", torch.randn(2, generator=torch.Generator().manual_seed(1)))
    original[3].register_buffer("var", torch.rand(2, generator=torch.Generator().manual_seed(2)) + 0.5)
    original = randomize_batchnorm_stats(original, torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING, logger="fusedconv"):
        quiet = fusedconv.fuse(original)
    assert scans == []
    with caplog.at_level(logging.INFO, logger="fusedconv"):
        logged = fusedconv.fuse(original)
    assert scans == [1]
    assert any("1 BatchNorms left" in record.getMessage() for record in caplog.records)
    with torch.no_grad():
        assert torch.equal(quiet(x), logged(x))
    assert [skip.module for skip in fusedconv.plan(original).skipped] == ["3: Head: F.batch_norm(...)"]


# Method sources and whether their compiled code may call a functional batch norm.
SPELLINGS = [
    ("return F.batch_norm(x, m, v)", True),
    ("return self.bn(x)", False),
    ("# F.batch_norm(x) in a comment\n    return self.bn(x)", False),  # comments do not compile
    ("return F.\uff42atch_norm(x, m, v)  # ✅", True),  # a full-width b: Python reads the name in NFKC form
    ("return F.batch\uff3fnorm(x)", True),  # a full-width low line
    ("return F.\U0001d41batch_norm(x)", True),  # a mathematical bold b
    ("return self.bn(x)  # ✅ ﬁne ①", False),  # characters that decompose to ASCII, none spelling the name
    ("return batch_norm(x, m, v)", True),  # imported by name
    ("norm = F.batch_norm\n    return norm(x, m, v)", True),  # an alias: more than the reading reports, not less
    ("return (lambda y: F.batch_norm(y, m, v))(x)", True),  # code compiled inside the method
    ("return [F.batch_norm(y, m, v) for y in x]", True),
    ("def inner(y):\n        return F.batch_norm(y, m, v)\n    return inner(x)", True),
]


def _class_with_forward(body: str, tmp_path, encoding: str = "utf-8", written_as: str | None = None):
    """A module class whose forward is ``body``, imported from a file that
    declares ``encoding`` (its text written in ``written_as``, by default that
    encoding: "ascii" writes the bytes of an escape as they are)."""
    source = f"# -*- coding: {encoding} -*-\nfrom torch import nn\n\n\nclass Head(nn.Module):\n" \
             f"    def forward(self, x):\n        {body.replace(chr(10), chr(10) + '    ')}\n"
    path = tmp_path / f"head_{abs(hash((body, encoding)))}.py"
    path.write_bytes(source.encode(written_as or encoding))
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)  # not put in sys.modules: nothing to restore
    spec.loader.exec_module(module)
    return module.Head


@pytest.mark.parametrize("body, spells", SPELLINGS)
def test_which_methods_may_call_a_functional_batch_norm(tmp_path, body, spells):
    """The check that decides whether a class is read finds the name in the
    compiled code, as Python reads identifiers (NFKC), in the method and in the
    code compiled inside it, and never in a comment."""
    from fusedconv.dataflow.source import _may_call_batch_norm

    assert _may_call_batch_norm(_class_with_forward(body, tmp_path)) is spells


@pytest.mark.parametrize("encoding, spelled, written_as", [
    ("latin-1", "F.\xaatch_norm(x)", None), ("utf-7", "F.+AGI-atch_norm(x)", "ascii"),
    ("utf-8-sig", "F.\uff42atch_norm(x)", None)])
def test_a_declared_encoding_is_read_as_python_reads_it(tmp_path, encoding, spelled, written_as, monkeypatch):
    """Bytes are read in the encoding the file declares: ``+AGI-`` is a "b" in
    UTF-7, and latin-1's ª (NFKC: a) makes "atch_norm", not the name; no file is
    opened by the check itself."""
    from fusedconv.dataflow.source import _may_call_batch_norm

    head = _class_with_forward(f"return {spelled}", tmp_path, encoding, written_as)

    def no_file(*args, **kwargs):
        raise AssertionError("the check opened a file")

    monkeypatch.setattr(builtins, "open", no_file)
    monkeypatch.setattr(io, "open", no_file)
    assert _may_call_batch_norm(head) is (encoding != "latin-1")


def test_a_wrapper_is_looked_at_through_what_it_wraps_now(tmp_path):
    """A method made by ``functools.wraps`` is read as its original: pointed at
    another original, or at itself (a cycle ``inspect.unwrap`` refuses), it is
    looked at again, the class's namespace unchanged."""
    from fusedconv.dataflow.source import _may_call_batch_norm

    plain = _class_with_forward("return self.bn(x)", tmp_path)
    functional = _class_with_forward("return F.batch_norm(x, m, v)", tmp_path)

    @functools.wraps(plain.forward)
    def wrapper(self, x):
        return x

    plain.helper = wrapper
    assert _may_call_batch_norm(plain) is False
    wrapper.__wrapped__ = functional.forward
    assert _may_call_batch_norm(plain) is True
    wrapper.__wrapped__ = wrapper
    assert _may_call_batch_norm(plain) is True
