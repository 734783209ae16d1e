"""Folding torch.export programs and aten-level GraphModules (issue 13, item 2).

For real torchvision models, exported as they are and after
``run_decompositions()``: every conv/linear -> batch norm pair folds, the new
program runs within the module fold's error bound against float64, the
caller's program is unchanged, and no batch norm node or state entry is left.
The dataflow rules hold on graphs too (a second reader, a shared weight, a
training batch norm, a BN before a conv all stay). PT2E's own conv-BN fold
(torchao) is compared on the same programs: fusedconv folds at least as many.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.fx.passes.shape_prop
from torch import nn

import fusedconv
from utils import Residual, float64_reference, randomize_batchnorm_stats, relative_error

FACTOR, FLOOR = 1.5, 4 * torch.finfo(torch.float32).eps
MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0"]


pytestmark = pytest.mark.usefixtures("fixed_seed")  # tests/conftest.py


def _prepared(model: nn.Module) -> nn.Module:
    return randomize_batchnorm_stats(model, torch.Generator().manual_seed(3)).eval()


def _batch_norm_nodes(graph) -> int:
    return sum(1 for node in graph.nodes if node.op == "call_function" and "batch_norm" in str(node.target))


def _state(program) -> dict:
    return {k: v.detach().clone() for k, v in program.state_dict.items()}


@pytest.mark.slow
@pytest.mark.parametrize("decomposed", [False, True], ids=["exported", "decomposed"])
@pytest.mark.parametrize("name", MODELS)
def test_exported_torchvision_models_fold_completely(name, decomposed):
    torchvision = pytest.importorskip("torchvision")
    model = _prepared(getattr(torchvision.models, name)())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    reference = float64_reference(model, (x,))
    with torch.no_grad():
        unfolded = relative_error(model(x), reference)
    program = torch.export.export(model, (x,))
    if decomposed:
        program = program.run_decompositions()
    before = _state(program)
    batch_norms = _batch_norm_nodes(program.graph)

    plan = fusedconv.plan(program)
    fused = fusedconv.fuse(program)

    assert plan.num_folded == batch_norms and not plan.skipped
    assert _batch_norm_nodes(fused.graph) == 0
    assert not any(key.endswith(("running_mean", "running_var", "num_batches_tracked")) for key in fused.state_dict)
    assert relative_error(fused.module()(x), reference) <= FACTOR * unfolded + FLOOR
    after = _state(program)  # the caller's program is as it was
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS[:2])
def test_graph_module_from_an_exported_program(name):
    torchvision = pytest.importorskip("torchvision")
    model = _prepared(getattr(torchvision.models, name)())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    reference = float64_reference(model, (x,))
    with torch.no_grad():
        unfolded = relative_error(model(x), reference)
    graph_module = torch.export.export(model, (x,)).module()
    state = {k: v.clone() for k, v in graph_module.state_dict().items()}
    fused = fusedconv.fuse(graph_module)
    assert _batch_norm_nodes(fused.graph) == 0 and fused is not graph_module
    assert relative_error(fused(x), reference) <= FACTOR * unfolded + FLOOR
    assert all(torch.equal(state[k], v) for k, v in graph_module.state_dict().items())
    with pytest.raises(fusedconv.FoldError, match="into a copy"):
        fusedconv.fuse(graph_module, inplace=True)


# --------------------------------------------------------------------------- the rules on graphs


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class BNBeforeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(self.bn(x))


class BNBeforePaddedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x):
        return self.conv(self.bn(x))


class BNBeforeLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 2, groups=2, bias=False)
        self.bn1, self.fc = nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.bn1(self.conv(self.bn(x)).mean((2, 3))))


class TransposedThenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.bn = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6)
        self.fc, self.bn1 = nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn1(self.fc(self.bn(self.up(x)).mean((2, 3))))


@pytest.mark.parametrize("make, folded, why", [
    (Residual, 0, "also read elsewhere"),
    (SharedConv, 0, "read by 2 nodes"),
    (BNBeforeConv, 1, None),
    (BNBeforePaddedConv, 0, "pads its input with zeros"),
    (BNBeforeLinear, 2, None),
    (TransposedThenBN, 2, None),
])
def test_graph_rules(make, folded, why):
    model = _prepared(make())
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(7))
    reference = float64_reference(model, (x,))
    with torch.no_grad():
        unfolded = relative_error(model(x), reference)
    program = torch.export.export(model, (x,))
    plan = fusedconv.plan(program)
    assert plan.num_folded == folded, str(plan)
    if why is not None:
        assert why in plan.skipped[0].reason, plan.skipped[0].reason
    assert relative_error(fusedconv.fuse(program).module()(x), reference) <= FACTOR * unfolded + FLOOR


def test_a_training_batch_norm_is_left():
    model = Residual().train()
    program = torch.export.export(model, (torch.randn(2, 4, 6, 6),))
    plan = fusedconv.plan(program)
    assert plan.num_folded == 0 and "training" in plan.skipped[0].reason


def test_a_decomposed_linear_is_left_with_the_reason():
    model = _prepared(TransposedThenBN())
    program = torch.export.export(model, (torch.randn(2, 4, 6, 6),)).run_decompositions()
    plan = fusedconv.plan(program)
    assert plan.num_folded == 1 and "addmm" in plan.skipped[0].reason


def test_an_exported_program_is_never_folded_in_place():
    program = torch.export.export(_prepared(Residual()), (torch.randn(1, 4, 6, 6),))
    with pytest.raises(fusedconv.FoldError, match="new program"):
        fusedconv.fuse(program, inplace=True)


# --------------------------------------------------------------------------- PT2E's fold


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_at_least_as_many_folds_as_pt2e(name):
    torchvision = pytest.importorskip("torchvision")
    utils = pytest.importorskip("torchao.quantization.pt2e.utils")
    model = _prepared(getattr(torchvision.models, name)())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    reference = float64_reference(model, (x,))
    theirs = torch.export.export(model, (x,)).module()
    utils._fuse_conv_bn_(theirs)
    ours = fusedconv.fuse(torch.export.export(model, (x,)).module())
    assert _batch_norm_nodes(ours.graph) <= _batch_norm_nodes(theirs.graph)
    with torch.no_grad():
        unfolded = relative_error(model(x), reference)
    assert relative_error(ours(x), reference) <= FACTOR * unfolded + FLOOR


def _hand_built(two_readers: bool, root_level: bool) -> torch.fx.GraphModule:
    """An aten-level graph: conv -> batch_norm, optionally a second conv reading
    the same weight through its own get_attr node; tensors at the root or in a submodule."""
    root = nn.Module()
    holder = root if root_level else nn.Module()
    if not root_level:
        root.block = holder
    prefix = "" if root_level else "block."
    holder.w = nn.Parameter(torch.randn(4, 4, 1, 1))
    holder.register_buffer("rm", torch.randn(4) * 0.5)
    holder.register_buffer("rv", torch.rand(4) + 0.5)
    aten = torch.ops.aten
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    conv = graph.call_function(aten.conv2d.default, (x, graph.get_attr(prefix + "w")))
    out = graph.call_function(aten.batch_norm.default, (conv, None, None, graph.get_attr(prefix + "rm"),
                                                        graph.get_attr(prefix + "rv"), False, 0.1, 1e-5, False))
    if two_readers:
        out = graph.call_function(aten.add.Tensor, (out, graph.call_function(
            aten.conv2d.default, (x, graph.get_attr(prefix + "w")))))
    graph.output(out)
    return torch.fx.GraphModule(root, graph)


@pytest.mark.parametrize("root_level", [False, True])
@pytest.mark.parametrize("two_readers", [False, True])
def test_hand_built_graph_modules(two_readers, root_level):
    module = _hand_built(two_readers, root_level)
    x = torch.randn(2, 4, 3, 3)
    expected = module(x)
    assert fusedconv.plan(module).num_folded == 0  # no recorded shapes: the BN's channel axis is unknown
    torch.fx.passes.shape_prop.ShapeProp(module).propagate(x)
    plan = fusedconv.plan(module)
    assert plan.num_folded == (0 if two_readers else 1), str(plan)
    fused = fusedconv.fuse(module)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    assert _batch_norm_nodes(fused.graph) == (1 if two_readers else 0)


class UnbatchedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_an_unbatched_conv_output_is_not_the_bns_channel_axis():
    model = _prepared(UnbatchedConv())
    x = torch.randn(4, 4)  # (C, L): the BN's dim 1 is the conv's length
    program = torch.export.export(model, (x,))
    plan = fusedconv.plan(program)
    assert plan.num_folded == 0 and "batched" in plan.skipped[0].reason
    torch.testing.assert_close(fusedconv.fuse(program).module()(x), model(x))


class _ConvBN(nn.Module):
    """conv -> BN -> ReLU; the subclasses name their inputs after Python builtins."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()


class _TakesInputAndSum(_ConvBN):
    def forward(self, input, sum):  # the names are the point
        return self.act(self.bn(self.conv(input))) + sum


class _TakesXAndList(_ConvBN):
    def forward(self, x, list):
        return self.act(self.bn(self.conv(x))) + list


@pytest.mark.parametrize("decomposed", [False, True], ids=["exported", "decomposed"])
@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),  # forward(self, input)
    _TakesInputAndSum,
    _TakesXAndList,
    # the ReLU writes the user's input in place: an output spec whose target names the renamed input
    lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)),
], ids=["sequential", "input-and-sum", "x-and-list", "input-mutated"])
def test_inputs_named_as_python_builtins(make, decomposed):
    """fx renames a node named after a builtin when the graph is copied (an
    nn.Sequential's ``input`` becomes ``input_1``): the folded program's
    signatures must name the copy's nodes, or the program does not verify."""
    model = _prepared(make())
    gen = torch.Generator().manual_seed(11)
    inputs = (torch.randn(2, 3, 6, 6, generator=gen),) + tuple(
        torch.randn(2, 4, 6, 6, generator=gen) for _ in range(len(inspect.signature(model.forward).parameters) - 1))
    reference = float64_reference(model, inputs)
    with torch.no_grad():
        unfolded = relative_error(model(*inputs), reference)
    program = torch.export.export(model, inputs)
    if decomposed:
        program = program.run_decompositions()
    fused = fusedconv.fuse(program)
    assert _batch_norm_nodes(fused.graph) == 0
    assert relative_error(fused.module()(*inputs), reference) <= FACTOR * unfolded + FLOOR
    again = torch.export.export(fused.module(), inputs)  # what it became exports again
    assert relative_error(again.module()(*inputs), reference) <= FACTOR * unfolded + FLOOR


@pytest.mark.parametrize("decomposed", [False, True], ids=["exported", "decomposed"])
def test_a_preserved_submodule_signature_names_the_layer(decomposed):
    """With ``preserve_module_call_signature``, a submodule's call signature names
    its output node: where that was the BN's, it must name the layer after the
    fold, or the program does not verify (and ``module()`` cannot swap it)."""
    model = _prepared(nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(13))
    reference = float64_reference(model, (x,))
    with torch.no_grad():
        unfolded = relative_error(model(x), reference)
    program = torch.export.export(model, (x,), preserve_module_call_signature=("0",))
    if decomposed:
        program = program.run_decompositions()
    fused = fusedconv.fuse(program)
    assert _batch_norm_nodes(fused.graph) == 0
    names = {node.name for node in fused.graph.nodes}
    preserved = next(entry for entry in fused.module_call_graph if entry.fqn == "0").signature
    assert all(argument.name in names for argument in (*preserved.inputs, *preserved.outputs))
    assert relative_error(fused.module()(x), reference) <= FACTOR * unfolded + FLOOR
