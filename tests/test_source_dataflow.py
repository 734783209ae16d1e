"""The dataflow read from forward code: what it proves, and every way it must refuse.

Each model below is a small module whose forward either proves that a layer's
output goes to its BatchNorm alone (the pair must be found) or does something
that makes the pair unsafe or unknowable (the pair must not be reported; the
rules then fall back to torch.fx). End-to-end folding of all of these runs
through the trap tests (tests/test_traps.py, mode "source"); here the reader is
checked on its own, so that a refusal cannot hide behind the fx fallback.
"""

from __future__ import annotations

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


def test_functional_batch_norms_found_without_reading_classes_that_cannot_spell_them(tmp_path, monkeypatch):
    """A model whose BNs all sit in blocks has its other classes scanned for
    functional batch norms; a class whose methods come from files that never
    contain the word is not read (most of a first fold's time), and a method
    replaced by one from a file that does is read again and reported."""
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


SPELLINGS = [
    ("y = F.batch_norm(x, m, v)\n", True),
    ("y = self.bn(x)\n", False),
    ("# ✅ done\ny = F.\uff42atch_norm(x, m, v)\n", True),  # full-width b, non-ASCII on another line too
    ("# ✅ done\ny = F.batch\uff3fnorm(x)\n", True),  # full-width low line
    ("# ✅ done\ny = self.bn(x)\n", False),
    ("y = batch\n_norm\n", False),  # not one name
    ("# ✅ ﬁne\ny = F.\U0001d41batch_norm(x)\n", True),  # a mathematical bold b
    ("# ✅ ﬁne ①\ny = self.bn(x)\n", False),  # characters that decompose to ASCII, none spelling the name
]


@pytest.mark.parametrize("text, spells", SPELLINGS)
def test_which_source_texts_may_spell_batch_norm(text, spells):
    """The scan that decides whether a class's files are read finds the name as
    Python reads identifiers (NFKC), normalizing only the non-ASCII lines."""
    from fusedconv.dataflow.source import _spells_batch_norm

    assert _spells_batch_norm(text) is spells


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
@pytest.mark.parametrize("text, spells", SPELLINGS)
def test_utf8_files_are_scanned_as_their_text(tmp_path, text, spells, encoding, monkeypatch):
    """A UTF-8 file's non-ASCII characters are taken from its bytes (its ASCII
    bytes deleted), with the answer its decoded text gives; bytes that are not
    UTF-8 make the file be read, as something the scan cannot vouch for."""
    from fusedconv.dataflow import source

    monkeypatch.setattr(source, "_FILES_SPELLING", {})  # the process's cache keeps no temporary file

    path = tmp_path / "model_code.py"
    path.write_bytes(text.encode(encoding))
    assert source._file_spells_batch_norm(str(path)) is spells
    # \xc3 opens a two-byte sequence that "a" does not continue; deleting the ASCII bytes would
    # have joined it with the next byte \xa9 into a valid "é"
    path.write_bytes(text.encode(encoding) + b"# \xc3a\xa9\n")
    assert source._file_spells_batch_norm(str(path)) is True


def test_a_source_file_is_scanned_again_when_it_changes(tmp_path, monkeypatch):
    """Files are scanned from their bytes, cached by size and time; a file in
    another declared encoding is decoded as Python would; code no file holds
    (a notebook cell) is what linecache holds."""
    import linecache

    from fusedconv.dataflow import source

    path = tmp_path / "model_code.py"
    path.write_text("def forward(self, x):\n    return self.bn(x)\n")
    assert source._file_spells_batch_norm(str(path)) is False
    path.write_text("def forward(self, x):\n    return F.batch_norm(x, m, v)\n")
    assert source._file_spells_batch_norm(str(path)) is True
    latin = tmp_path / "latin.py"
    latin.write_bytes("# -*- coding: latin-1 -*-\n# caf\xe9\ny = F.\xaatch_norm\n".encode("latin-1"))
    assert source._file_spells_batch_norm(str(latin)) is False  # ª (NFKC: a) then "tch_norm": not the name
    latin.write_bytes("# -*- coding: latin-1 -*-\n# caf\xe9\ny = F.batch_norm(x)\n".encode("latin-1"))
    assert source._file_spells_batch_norm(str(latin)) is True
    # ASCII bytes in an encoding that does not read them as ASCII: +AGI- (utf-7) and \x62 (unicode_escape) are "b"
    for encoding, spelled in (("utf-7", "F.+AGI-atch_norm(x)"), ("unicode_escape", "F.\\x62atch_norm(x)")):
        odd = tmp_path / f"{encoding}.py"
        odd.write_bytes(f"# -*- coding: {encoding} -*-\ny = {spelled}\n".encode("ascii"))
        assert source._file_spells_batch_norm(str(odd)) is True, encoding
    cell = "<notebook-cell-7>"
    monkeypatch.setitem(linecache.cache, cell, (0, None, ["y = F.batch_norm(x, m, v)\n"], cell))
    assert source._file_spells_batch_norm(cell) is True
    monkeypatch.setitem(linecache.cache, cell, (0, None, ["y = self.bn(x)\n"], cell))
    assert source._file_spells_batch_norm(cell) is False
