"""Regression tests for the ways a fold could change a model's outputs, or
leave it half-written, that issue 11 found (one or more tests per root cause).

Each model is written out in this file, so that fusedconv's reading of the
forward code sees real source. Every check compares against a float64
reference on random inputs with random BatchNorm statistics, and asserts
exactly which BNs fold; a BN that must not fold is checked for its reason.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedconv
import fusedconv.apply
import fusedconv.registry
from utils import Residual, float64_reference, randomize_batchnorm_stats, relative_error, trace_only

# The folded model's error against float64 may be at most this many times the
# unfolded model's (plus a floor of a few ulps for one-layer models).
FACTOR, FLOOR = 1.5, 4 * torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("fixed_seed")  # tests/conftest.py


def prepared(model: nn.Module, seed: int = 3) -> nn.Module:
    return randomize_batchnorm_stats(model, torch.Generator().manual_seed(seed)).eval()


def built(make, seed: int = 3) -> nn.Module:
    """``make()`` with its weights drawn from a fixed seed: two builds are equal."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return prepared(make(), seed)


def reference_output(make, x: torch.Tensor):
    """A float64 build of ``make()`` on ``x``. Built anew rather than deep-copied:
    a model whose attributes reach its children through closures (which a deep
    copy shares with the original) must convert those children too."""
    model = built(make).double()
    with torch.no_grad():
        output = model(x.double())
    model.float()  # a module shared with other models (a global) gets its float32 values back
    return output


def state(model: nn.Module) -> dict:
    """Everything a fold may change: tensors (bit for bit), module types, bias slots."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    structure = [(name, type(m), tuple(m._parameters)) for name, m in model.named_modules()]
    return {"tensors": tensors, "structure": structure}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["structure"] == before["structure"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        now = after["tensors"][key]
        if value.dtype.is_floating_point:  # bit for bit (NaNs and signed zeros included)
            now, value = now.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        assert torch.equal(now, value), key


def fold_and_compare(make, shape, *, mode: str, inplace: bool, folded: set[str], monkeypatch=None) -> fusedconv.FusionPlan:
    """Fold a fresh ``make()`` in ``mode`` ("source", "fx" or "run"); assert that
    exactly ``folded`` BNs fold and that the outputs stay as exact as the
    unfolded model's."""
    if mode == "fx":
        trace_only(monkeypatch)
    model = built(make)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(11))
    reference = reference_output(make, x)
    with torch.no_grad():
        unfolded_error = relative_error(model(x.clone()), reference)
    example = (x.clone(),) if mode == "run" else None
    plan = fusedconv.plan(model, example)
    assert {bn for f in plan.folds for bn in f.batchnorms} == folded, str(plan)
    fused = fusedconv.fuse(model, example, inplace=inplace)
    with torch.no_grad():
        error = relative_error(fused(x.clone()), reference)
    assert error <= FACTOR * unfolded_error + FLOOR, (error, unfolded_error)
    return plan


def reason(plan: fusedconv.FusionPlan, bn: str) -> str:
    return next(s.reason for s in plan.skipped if s.module == bn)


MODES = ["source", "fx", "run"]


# --------------------------------------------------------------------------- 1. non-standard layers


class WSConv2d(nn.Conv2d):
    """Weight standardization written the usual way: Conv2d.forward calls it."""

    def _conv_forward(self, x, weight, bias):
        weight = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledLinear(nn.Linear):
    """A class attribute that shadows the registered weight (nn.Module would
    refuse to register one beside it, so instances get this class afterwards)."""

    weight = property(lambda self: self._parameters["weight"] * 2)


def scaled_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    layer.__class__ = ScaledLinear
    return layer


class CheckedConv(nn.Conv2d):
    """A subclass that only adds a helper of its own: still a standard Conv2d."""

    def describe(self) -> str:
        return f"{self.in_channels}->{self.out_channels}"


class HookedBatchNorm(nn.BatchNorm2d):
    """Overrides a method BatchNorm's forward calls."""

    def _check_input_dim(self, input):
        input.mul_(1.0)


class LayerThenBN(nn.Module):
    def __init__(self, layer: nn.Module, bn: nn.Module):
        super().__init__()
        self.layer, self.bn = layer, bn

    def forward(self, x):
        return self.bn(self.layer(x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make, shape, folds, why", [
    (lambda: LayerThenBN(WSConv2d(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 8, 8), False, "_conv_forward"),
    (lambda: LayerThenBN(scaled_linear(5, 4), nn.BatchNorm1d(4)), (6, 5), False, "weight"),
    (lambda: LayerThenBN(CheckedConv(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 8, 8), True, None),
    (lambda: LayerThenBN(nn.Conv2d(3, 4, 3), HookedBatchNorm(4)), (2, 3, 8, 8), False, "_check_input_dim"),
], ids=["conv_forward_override", "class_attribute_weight", "harmless_subclass", "bn_check_override"])
def test_layers_standard_only_if_every_method_is_torchs(make, shape, folds, why, mode, monkeypatch):
    if mode != "run" and isinstance(make().bn, nn.BatchNorm1d):
        folds = False  # without a run, a BatchNorm1d's input rank is unknown
        why = "rank" if why is None else why
    plan = fold_and_compare(make, shape, mode=mode, inplace=True, folded={"bn"} if folds else set(),
                            monkeypatch=monkeypatch)
    if why is not None and not folds:
        assert why in reason(plan, "bn")


def test_a_method_replaced_on_the_instance_is_not_standard():
    model = prepared(LayerThenBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.layer._conv_forward = types.MethodType(WSConv2d._conv_forward, model.layer)
    plan = fusedconv.plan(model)
    assert not plan.folds and "replaced on the instance" in reason(plan, "bn")


# --------------------------------------------------------------------------- 2. in-place ops and aliasing


class InPlaceAfterBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        z = self.bn(x)
        x.relu_()
        return self.conv(z)


class BNRightBeforeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        z = self.bn(x)
        y = self.conv(z)
        return y + x.relu_().mean()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", [False, True])
def test_bn_input_changed_in_place_between_bn_and_conv(mode, inplace, monkeypatch):
    plan = fold_and_compare(InPlaceAfterBN, (2, 3, 6, 6), mode=mode, inplace=inplace, folded=set(),
                            monkeypatch=monkeypatch)
    assert "runs between" in reason(plan, "bn")


@pytest.mark.parametrize("mode", MODES)
def test_bn_right_before_conv_still_folds(mode, monkeypatch):
    fold_and_compare(BNRightBeforeConv, (2, 3, 6, 6), mode=mode, inplace=False, folded={"bn"},
                     monkeypatch=monkeypatch)


# --------------------------------------------------------------------------- 3. ties by memory


class TwoConvs(nn.Module):
    def __init__(self, tie):
        super().__init__()
        self.c1, self.b1, self.c2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 3)
        tie(self)

    def forward(self, x):
        return self.b1(self.c1(x)) + self.c2(x)


def _tie_data(net):
    net.c2.weight.data = net.c1.weight.data


def _tie_view(net):
    net.c2.weight = nn.Parameter(net.c1.weight.detach().view(4, 3, 3, 3))


def _tie_buffer(net):
    net.c2.register_buffer("copy", net.c1.weight.detach().flatten()[5:9])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("tie", [_tie_data, _tie_view, _tie_buffer], ids=["data", "view", "buffer_view"])
def test_storage_shared_weights_are_not_folded(tie, mode, inplace, monkeypatch, each_module_walk):
    plan = fold_and_compare(lambda: TwoConvs(tie), (2, 3, 8, 8), mode=mode, inplace=inplace, folded=set(),
                            monkeypatch=monkeypatch)
    assert "shares memory" in reason(plan, "b1")


def test_separate_views_of_one_flat_buffer_still_fold():
    """Weight and bias laid in one buffer without overlapping share no bytes."""
    model = prepared(LayerThenBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    flat = torch.randn(4 * 27 + 4)
    model.layer.weight = nn.Parameter(flat[:108].view(4, 3, 3, 3))
    model.layer.bias = nn.Parameter(flat[108:])
    assert fusedconv.plan(model).num_folded == 1


# --------------------------------------------------------------------------- 4. children reached indirectly


class ViaModulesDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + self._modules["conv"](x)


class ViaAttribute(nn.Module):
    def __init__(self, keep):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.other = keep(self.conv)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.other(x)


@dataclasses.dataclass
class Holder:
    layer: nn.Module

    def __call__(self, x):
        return self.layer(x)


class ListKeeper(nn.Module):
    """A helper module that keeps a conv in a plain list (not registered)."""

    def __init__(self, conv):
        super().__init__()
        self.kept = [conv]

    def forward(self, x):
        return self.kept[0](x)


def _tensor_carrying(conv):
    """A tensor that carries the conv as an attribute of its own."""
    carrier = torch.zeros(1)
    carrier.helper = conv
    return carrier


KEEPERS = {
    "tensor_attribute": lambda conv: (lambda carrier: (lambda x: carrier.helper(x)))(_tensor_carrying(conv)),
    "partial": lambda conv: functools.partial(conv),
    "bound_forward": lambda conv: conv.forward,
    "namespace": lambda conv: (lambda ns: (lambda x: ns.c(x)))(types.SimpleNamespace(c=conv)),
    "dataclass": Holder,
    "nested_list": lambda conv: (lambda held: (lambda x: held[0][0](x)))([[conv]]),
    "lambda": lambda conv: (lambda x: conv(x)),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("keeper", sorted(KEEPERS))
def test_child_kept_in_an_attribute_is_not_vouched_for(keeper, inplace, monkeypatch):
    plan = fold_and_compare(lambda: ViaAttribute(KEEPERS[keeper]), (2, 3, 8, 8), mode="source", inplace=inplace,
                            folded=set(), monkeypatch=monkeypatch)
    assert plan.source != "source"  # the code reading could not vouch; a trace decided


class ViaHelperModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.helper = ListKeeper(self.conv)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.helper(x)


class ViaParameterAttribute(nn.Module):
    """The conv is reached through an attribute of a registered parameter."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.gain = nn.Parameter(torch.full((1,), 0.5))
        self.gain.helper = self.conv

    def forward(self, x):
        return self.bn(self.conv(x)) + self.gain * self.gain.helper(x)


@pytest.mark.parametrize("make", [ViaModulesDict, ViaHelperModule], ids=["modules_dict", "helper_module"])
@pytest.mark.parametrize("inplace", [False, True])
def test_child_reached_through_module_state_or_a_helper(make, inplace, monkeypatch):
    fold_and_compare(make, (2, 3, 8, 8), mode="source", inplace=inplace, folded=set(), monkeypatch=monkeypatch)


@pytest.mark.parametrize("mode", ["source", "fx"])
def test_layer_reached_through_a_parameters_attribute_needs_a_run(mode, monkeypatch):
    """A trace records ``self.gain.helper(x)`` as a method call on the parameter,
    not as a call of the conv: without a run the conv must not be folded. (In
    place: torch's deepcopy of a Parameter drops its attributes, so a copy of
    this model cannot run at all.)"""
    plan = fold_and_compare(ViaParameterAttribute, (2, 3, 8, 8), mode=mode, inplace=True, folded=set(),
                            monkeypatch=monkeypatch)
    assert "pass example_inputs" in reason(plan, "bn")
    fold_and_compare(ViaParameterAttribute, (2, 3, 8, 8), mode="run", inplace=True, folded=set(),
                     monkeypatch=monkeypatch)  # a run sees the conv called twice


class BoundBNForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.bn_forward = self.bn.forward

    def forward(self, x):
        return self.bn_forward(self.conv(x))


def test_bound_bn_forward_in_an_attribute_is_left_and_the_copy_runs(monkeypatch):
    fold_and_compare(BoundBNForward, (2, 3, 8, 8), mode="run", inplace=False, folded=set(), monkeypatch=monkeypatch)
    # Without inputs nothing can vouch for the BN (fx cannot trace its forward called directly).
    with pytest.raises(fusedconv.FoldError, match="pass example_inputs"):
        fusedconv.fuse(prepared(BoundBNForward()))


# --------------------------------------------------------------------------- 5. globals


_STASH = None
SHARED_CONV = nn.Conv2d(3, 4, 3)


class Reader(nn.Module):
    def forward(self, x):
        return x + _STASH.mean()


class ThroughGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.reader = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Reader()

    def forward(self, x):
        global _STASH
        _STASH = self.conv(x)
        y = self.bn(_STASH)
        return self.reader(y)


class GlobalModuleAlsoRegistered(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = SHARED_CONV, nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + SHARED_CONV(x)


@pytest.mark.parametrize("make", [ThroughGlobal, GlobalModuleAlsoRegistered], ids=["global_output", "global_module"])
@pytest.mark.parametrize("inplace", [False, True])
def test_globals_are_not_locals(make, inplace, monkeypatch):
    original = copy.deepcopy(SHARED_CONV.state_dict())
    try:
        fold_and_compare(make, (2, 3, 8, 8), mode="source", inplace=inplace, folded=set(), monkeypatch=monkeypatch)
    finally:
        SHARED_CONV.load_state_dict(original)


# --------------------------------------------------------------------------- 6-7. containers and shadowing


class ReversedSequential(nn.Sequential):
    def __iter__(self):
        return iter(reversed(list(self._modules.values())))


class WithReversed(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = ReversedSequential(nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        return self.seq(x)


@pytest.mark.parametrize("inplace", [False, True])
def test_sequential_subclass_with_its_own_iteration(inplace, monkeypatch):
    # Running reversed: seq.2 (BN, 3 channels) -> seq.1 (conv) -> seq.0 (BN, 4 channels).
    plan = fold_and_compare(WithReversed, (2, 3, 6, 6), mode="source", inplace=inplace,
                            folded={"seq.0", "seq.2"}, monkeypatch=monkeypatch)
    assert plan.folds[0].after == ("seq.0",) and plan.folds[0].before == ("seq.2",)
    assert plan.source != "source"


class ShadowedByClassAttribute(nn.Module):
    bn = nn.Identity()

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class ShadowedByNone(nn.Module):
    downsample = None

    def __init__(self):
        super().__init__()
        self.conv, self.downsample = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if self.downsample is not None:
            y = self.downsample(y)
        return y


@pytest.mark.parametrize("make", [ShadowedByClassAttribute, ShadowedByNone], ids=["identity", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_class_attribute_that_shadows_a_registered_child(make, mode, monkeypatch):
    plan = fold_and_compare(make, (2, 3, 8, 8), mode=mode, inplace=True, folded=set(), monkeypatch=monkeypatch)
    assert len(plan.skipped) == 1


# --------------------------------------------------------------------------- 8. stale readings


class Patched(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.helper(x)

    def helper(self, x):
        return self.bn(self.conv(x))


def _leaky_helper(self, x):
    y = self.conv(x)
    return self.bn(y) + y


def test_a_monkeypatched_method_is_read_again(monkeypatch):
    assert fusedconv.plan(prepared(Patched())).num_folded == 1  # fills the cache
    monkeypatch.setattr(Patched, "helper", _leaky_helper)
    fold_and_compare(Patched, (2, 3, 8, 8), mode="source", inplace=True, folded=set(), monkeypatch=monkeypatch)


def test_a_replaced_code_object_is_read_again(monkeypatch):
    assert fusedconv.plan(prepared(Patched())).num_folded == 1
    monkeypatch.setattr(Patched.helper, "__code__", _leaky_helper.__code__)
    fold_and_compare(Patched, (2, 3, 8, 8), mode="source", inplace=True, folded=set(), monkeypatch=monkeypatch)


# --------------------------------------------------------------------------- 9. all or nothing


class ConvBN(nn.Module):
    def __init__(self, bias=False, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=bias, dtype=dtype)
        self.bn = nn.BatchNorm2d(4, dtype=dtype)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("bias", [False, True])
def test_inference_tensors_are_refused_in_place_before_any_write(bias):
    with torch.inference_mode():
        model = prepared(ConvBN(bias))
    before = state(model)
    with pytest.raises(fusedconv.FoldError, match=r"conv\.weight.*inference_mode"):
        fusedconv.fuse(model, inplace=True)
    assert_unchanged(model, before)
    x = torch.randn(2, 3, 8, 8)
    expected = float64_reference(model, (x,))
    copied = fusedconv.fuse(model)  # a copy holds ordinary tensors
    assert relative_error(copied(x), expected) < 1e-5
    with torch.inference_mode():
        folded = fusedconv.fuse(model, inplace=True)
        assert relative_error(folded(x), expected) < 1e-5


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("step", ["set_biases", "rescale_weights"])
def test_a_failing_write_is_undone(step, bias, monkeypatch):
    """A write that fails after others (here: once it has done its own work)
    leaves the model as it was."""
    model = prepared(ConvBN(bias))
    before = state(model)
    real = getattr(fusedconv.apply, step)

    def failing(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError(f"simulated failure after {step}")

    monkeypatch.setattr(fusedconv.apply, step, failing)
    with pytest.raises(RuntimeError, match="simulated"):
        fusedconv.fuse(model, inplace=True)
    if step == "rescale_weights":  # the weights themselves were written: only their kernel's own checks guard them
        model.conv.weight.data.copy_(before["tensors"]["conv.weight"])
    assert_unchanged(model, before)


@pytest.mark.parametrize("blocks", ["fusedconv", "timm", "ultralytics"])
def test_a_failing_write_after_the_installs_undoes_them(blocks, monkeypatch):
    """The installs of fusedconv's own converters run before the weights are
    written: a weight write failing after them leaves every block as it was
    (timm's classifier head: an install that changes a child of the block)."""
    if blocks == "ultralytics":
        conv = pytest.importorskip("ultralytics.nn.modules.conv")  # imported: fusedconv registers its converters
        merged = [conv.Conv(4, 4, 3), conv.RepConv(4, 4, 3)]
    elif blocks == "timm":
        repvit = pytest.importorskip("timm.models.repvit")
        merged = [repvit.RepVggDw(4, 3), repvit.RepVitClassifier(4, 5, distillation=False)]
    else:
        merged = [fusedconv.blocks.ConvBN(4, 4, 3), fusedconv.blocks.RepVGGBlock(4, 4, 3)]
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), *merged))
    before = state(model)
    attributes = [dict(vars(block)) for block in merged]
    real = fusedconv.apply.rescale_weights

    def failing(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("simulated failure after rescale_weights")

    monkeypatch.setattr(fusedconv.apply, "rescale_weights", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        fusedconv.fuse(model, inplace=True)
    model[0].weight.data.copy_(before["tensors"]["0.weight"])  # written by the failing kernel call itself
    assert_unchanged(model, before)
    for block, was in zip(merged, attributes):
        assert vars(block) == was  # forward, deployed_conv, the branches: as before
        assert all(p.requires_grad for p in block.parameters())


def test_an_install_wrapped_to_look_like_fusedconvs_is_undone_as_a_users():
    from fusedconv.blocks.base import RepBlock
    from fusedconv.reparam import Reparameterization, bn_affine

    class Pair(nn.Sequential):
        pass

    net = prepared(nn.Sequential(Pair(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), nn.ReLU()))

    def convert(block, name):
        @functools.wraps(RepBlock.install)  # copies fusedconv's module name, not its code
        def install(conv):
            net.add_module("extra", nn.Identity())  # outside the block
            raise RuntimeError("simulated failure in a wrapped install")
        return Reparameterization(name, block[0], install, after=bn_affine(block[1]))

    fusedconv.register_block(Pair, convert)
    try:
        before = state(net)
        with pytest.raises(RuntimeError, match="wrapped install"):
            fusedconv.fuse(net, inplace=True)
        assert_unchanged(net, before)
        assert not hasattr(net, "extra")
    finally:
        fusedconv.registry._CONVERTERS.pop(Pair, None)


def test_reparameterize_undoes_the_installs_before_a_failing_one():
    from fusedconv.reparam import Reparameterization, bn_affine

    class Failing(nn.Sequential):
        pass

    def convert(block, name):
        def install(conv):
            raise RuntimeError("simulated failure in an install")
        return Reparameterization(name, block[0], install, after=bn_affine(block[1]))

    model = prepared(nn.Sequential(fusedconv.blocks.RepVGGBlock(4, 4, 3),
                                   Failing(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))))
    fusedconv.register_block(Failing, convert)
    try:
        before = state(model)
        with pytest.raises(RuntimeError, match="simulated failure in an install"):
            fusedconv.reparameterize(model)
        assert_unchanged(model, before)
        assert not model[0].deployed
    finally:
        fusedconv.registry._CONVERTERS.pop(Failing, None)


def test_reparameterize_checks_the_merged_weights_before_the_first_install():
    with torch.inference_mode():  # its tensors can only be changed inside inference mode
        model = prepared(nn.Sequential(fusedconv.blocks.RepVGGBlock(4, 4, 3), fusedconv.blocks.ConvBN(4, 4, 3)))
    before = state(model)
    with pytest.raises(fusedconv.FoldError, match="inference_mode"):
        fusedconv.reparameterize(model)
    assert_unchanged(model, before)
    assert not model[0].deployed and not model[1].deployed


def test_a_computed_weight_is_refused():
    model = prepared(ConvBN())
    weight = model.conv.weight
    del model.conv.weight
    model.conv.weight = weight * 1.0  # a non-leaf tensor that requires grad
    with pytest.raises(fusedconv.FoldError, match="not a leaf"):
        fusedconv.fuse(model, inplace=True)


class BNChainBefore(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1, self.b2, self.conv = nn.BatchNorm2d(5), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(self.b2(self.b1(x)))


def test_every_bn_of_a_chain_is_checked():
    model = prepared(BNChainBefore())
    before = state(model)
    with pytest.raises(fusedconv.FoldError, match=r"^b1 has 5 channels"):
        fusedconv.fuse(model, inplace=True)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- 11. runs leave the model alone


class Observed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.observer = torch.ao.quantization.FakeQuantize()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.observer(self.bn(self.conv(x)))


def test_example_runs_leave_the_callers_model_bit_identical():
    model = prepared(Observed())
    model.observer.train()  # observing, as in QAT calibration
    before = state(model)
    x = torch.randn(2, 3, 8, 8)
    fused = fusedconv.fuse(model, (x,))
    assert_unchanged(model, before)
    fusedconv.verify(model, fused, (x,))
    assert_unchanged(model, before)


def test_verify_refuses_a_model_in_training_mode():
    model = prepared(ConvBN()).train()
    before = state(model)
    with pytest.raises(fusedconv.FoldError, match="training mode"):
        fusedconv.verify(model, model, (torch.randn(2, 3, 8, 8),))
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- 12-13. nothing silent


def test_torchscript_is_refused_and_its_batchnorms_counted():
    scripted = torch.jit.script(prepared(ConvBN()))
    assert fusedconv.count_batchnorms(scripted) == 1
    with pytest.raises(fusedconv.FoldError, match="TorchScript"):
        fusedconv.fuse(scripted)


def test_data_parallel_folds_the_network_it_wraps():
    model = prepared(ConvBN())
    wrapped = nn.DataParallel(model)
    x = torch.randn(2, 3, 8, 8)
    expected = float64_reference(model, (x,))
    copied = fusedconv.fuse(wrapped)
    assert isinstance(copied, nn.DataParallel) and copied.module is not model
    assert fusedconv.count_batchnorms(copied) == 0 and fusedconv.count_batchnorms(wrapped) == 1
    assert relative_error(copied(x), expected) < 1e-5
    assert fusedconv.fuse(wrapped, inplace=True) is wrapped and fusedconv.count_batchnorms(wrapped) == 0
    assert relative_error(wrapped(x), expected) < 1e-5


def test_compiled_model_folds_the_network_it_wraps():
    model = prepared(ConvBN())
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, 8, 8)
    expected = float64_reference(model, (x,))
    copied = fusedconv.fuse(compiled)
    assert type(copied) is type(compiled) and fusedconv.count_batchnorms(copied._orig_mod) == 0
    assert relative_error(copied(x), expected) < 1e-5
    assert fusedconv.fuse(compiled, inplace=True) is compiled and fusedconv.count_batchnorms(model) == 0
    assert relative_error(compiled(x), expected) < 1e-5


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group for DistributedDataParallel, destroyed afterwards."""
    distributed = torch.distributed
    if not distributed.is_available() or distributed.is_initialized():
        pytest.skip("torch.distributed unavailable, or a process group already exists")
    distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    distributed.destroy_process_group()


def test_distributed_data_parallel_is_refused_with_the_call_to_use(process_group):
    model = prepared(ConvBN())
    ddp = nn.parallel.DistributedDataParallel(model)
    before = state(model)
    with pytest.raises(fusedconv.FoldError, match=r"fusedconv\.fuse\(ddp\.module\)"):
        fusedconv.fuse(ddp)
    with pytest.raises(fusedconv.FoldError, match="live DistributedDataParallel"):
        fusedconv.fuse(ddp.module, inplace=True)
    assert_unchanged(model, before)
    x = torch.randn(2, 3, 8, 8)
    assert relative_error(fusedconv.fuse(ddp.module)(x), float64_reference(model, (x,))) < 1e-5
    ddp(x)  # still runs


class FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var)


@pytest.mark.parametrize("mode", MODES)
def test_functional_batch_norms_are_reported_as_left(mode, monkeypatch):
    if mode == "fx":
        trace_only(monkeypatch)
    model = FunctionalBN().eval()
    plan = fusedconv.plan(model, (torch.randn(2, 3, 8, 8),) if mode == "run" else None)
    assert len(plan.skipped) == 1 and "function call" in plan.skipped[0].reason


def test_exported_graph_module_folds_or_reports_its_batch_norms():
    """A batch norm node is never silently ignored: folded (tests/test_exported.py),
    or listed as left with its reason."""
    model = prepared(ConvBN())
    graph_module = torch.export.export(model, (torch.randn(2, 3, 8, 8),)).module()
    assert fusedconv.plan(graph_module).num_folded == 1
    residual = torch.export.export(prepared(Residual()), (torch.randn(2, 4, 6, 6),)).module()
    plan = fusedconv.plan(residual)
    assert plan.num_folded == 0 and len(plan.skipped) == 1 and "also read elsewhere" in plan.skipped[0].reason


def test_global_module_hooks_leave_every_bn(monkeypatch):
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        plan = fusedconv.plan(prepared(ConvBN()))
    finally:
        handle.remove()
    assert not plan.folds and "global module hooks" in reason(plan, "bn")


# --------------------------------------------------------------------------- 14. the layer's dtype


def test_a_fold_beyond_float16_is_refused_before_any_write():
    model = ConvBN(bias=True, dtype=torch.float16).eval()
    with torch.no_grad():
        model.bn.weight.fill_(1000.0)
        model.bn.running_var.fill_(1e-9)
        model.bn.bias.zero_()
        model.bn.running_mean.zero_()
        model.conv.bias.zero_()
    model.bn.eps = 1e-6
    before = state(model)
    with pytest.raises(fusedconv.FoldError, match=r"conv.*float16"):
        fusedconv.fuse(model, inplace=True)
    assert_unchanged(model, before)


def test_subnormal_weights_warn_and_can_be_flushed():
    model = prepared(ConvBN())
    with torch.no_grad():
        model.bn.weight[1] = 5e-40  # gamma near 0 (itself subnormal): that channel's weights land below normal
    with pytest.warns(fusedconv.FoldWarning, match="subnormal"):
        fused = fusedconv.fuse(model)
    tiny = torch.finfo(torch.float32).tiny
    assert ((fused.conv.weight[1].abs() < tiny) & (fused.conv.weight[1] != 0)).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fusedconv.FoldWarning)
        flushed = fusedconv.fuse(model, flush_subnormals=True)
    row = flushed.conv.weight[1]
    assert not ((row.abs() < tiny) & (row != 0)).any()
    assert torch.equal(flushed.conv.weight[0], fused.conv.weight[0])


# --------------------------------------------------------------------------- 15-17. what the code proves


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent: torch.fx cannot trace this block
            y = y * 2
        return y


class RootUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.bn2 = Block(), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.block(x)
        if y.mean() > 100:  # the root cannot be traced either
            return y
        return self.bn2(y + 1)


class RootTraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.bn2 = nn.Conv2d(3, 4, 1), Block(), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.block(self.stem(x)) + 1)


def test_proven_pairs_fold_when_torch_fx_cannot_trace(monkeypatch):
    plan = fold_and_compare(RootUntraceable, (2, 4, 6, 6), mode="source", inplace=True, folded={"block.bn"},
                            monkeypatch=monkeypatch)
    assert "torch.fx cannot trace" in reason(plan, "bn2")


def test_pairs_proven_by_the_code_survive_a_trace_that_boxes_their_block(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fusedconv.FoldWarning)  # fx cannot trace the block
        plan = fold_and_compare(RootTraceable, (2, 3, 6, 6), mode="source", inplace=False, folded={"block.bn"},
                                monkeypatch=monkeypatch)
    assert plan.source == "source+torch.fx"


class ShapeBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        batch, channels, height, width = y.shape
        z = self.bn(y)
        return z.reshape(batch, channels * height * width) * y.size(1) * y.dim()


@pytest.mark.parametrize("mode", ["fx", "run"])
def test_metadata_reads_between_conv_and_bn_are_not_readers(mode, monkeypatch):
    fold_and_compare(ShapeBetween, (2, 3, 8, 8), mode=mode, inplace=False, folded={"bn"}, monkeypatch=monkeypatch)


# --------------------------------------------------------------------------- found by the fuzzer


class CountingObserver(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        return x


class ObservedLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.observer = CountingObserver()
        self.layers = nn.ModuleList([nn.Linear(2, 12), nn.BatchNorm1d(12)])

    def forward(self, x):
        x = self.observer(x)
        for layer in self.layers:  # iterating children: the code reading defers to torch.fx
            x = layer(x)
        return x


@pytest.mark.parametrize("call", ["plan", "fuse"])
def test_tracing_leaves_the_models_own_buffer_updates_undone(call):
    model = prepared(ObservedLoop())
    before = state(model)
    getattr(fusedconv, call)(model)
    assert_unchanged(model, before)


class BNReachedThroughNamespace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.namespace = types.SimpleNamespace(module=self.bn)

    def forward(self, x):
        return self.namespace.module(self.conv(x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", [False, True])
def test_a_bn_reached_outside_the_module_tree_is_not_replaced(mode, inplace, monkeypatch):
    plan = fold_and_compare(BNReachedThroughNamespace, (2, 3, 8, 8), mode=mode, inplace=inplace, folded=set(),
                            monkeypatch=monkeypatch)
    assert "reachable through" in reason(plan, "bn")


class ChangedAfterTheBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(6, 4, 2, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        y += 1  # the folded model's z would be this y
        return z


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", [False, True])
def test_the_layer_output_changed_in_place_after_the_bn(mode, inplace, monkeypatch):
    fold_and_compare(ChangedAfterTheBN, (2, 6, 5, 5), mode=mode, inplace=inplace, folded=set(),
                     monkeypatch=monkeypatch)


class OnlyALinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("mode", MODES)
def test_a_model_without_batch_norms(mode, monkeypatch):
    fold_and_compare(OnlyALinear, (4, 2), mode=mode, inplace=True, folded=set(), monkeypatch=monkeypatch)


# --------------------------------------------------------------------------- found in review


def _checkpoint_runner(sequence, segments, x, **kwargs):
    return torch.utils.checkpoint.checkpoint_sequential(sequence, segments, x, **kwargs)


RUN = _checkpoint_runner


def _reads_twice(sequence, segments, x, **kwargs):
    y = sequence[0](x)
    return sequence[1](y) + y


class RunsThroughAGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return RUN(self.seq, 1, x, use_reentrant=False)


def test_a_rebound_checkpoint_helper_is_read_again(monkeypatch):
    monkeypatch.setitem(globals(), "RUN", torch.utils.checkpoint.checkpoint_sequential)
    assert fusedconv.plan(prepared(RunsThroughAGlobal())).num_folded == 1  # fills the cache
    monkeypatch.setitem(globals(), "RUN", _reads_twice)
    fold_and_compare(RunsThroughAGlobal, (2, 4, 5, 5), mode="source", inplace=True, folded=set(),
                     monkeypatch=monkeypatch)


class SwapsItsBuffer(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("count", torch.zeros(()))
        self.how = how

    def forward(self, x):
        if self.how == "data":
            self.count.data = self.count.data + 1  # repoints the buffer: no version bump
        else:
            self.count = self.count + 1  # registers a new tensor
        return self.bn(self.conv(x))


@pytest.mark.parametrize("how", ["data", "replace"])
def test_runs_put_back_replaced_and_repointed_tensors(how):
    model = prepared(SwapsItsBuffer(how))
    before = state(model)
    count = model.count
    x = torch.randn(2, 3, 8, 8)
    fused = fusedconv.fuse(model, (x,))
    fusedconv.verify(model, fused, (x,))
    assert_unchanged(model, before)
    assert model.count is count


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3x3, self.bn3x3 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1x1, self.bn1x1 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn3x3(self.conv3x3(x)) + self.bn1x1(self.conv1x1(x))


class BlockAfterAFold(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.block = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), TwoBranches()

    def forward(self, x):
        return self.block(self.bn(self.conv(x)))


def test_a_failing_block_install_is_undone():
    from fusedconv.reparam import Reparameterization, bn_affine, conv_branch

    def convert(block, name):
        def install(conv):
            del block.conv1x1  # a partial change, then a failure
            raise RuntimeError("simulated failure in a converter's install")

        return Reparameterization(name, block.conv3x3, install, after=bn_affine(block.bn3x3),
                                  branches=[conv_branch(block.conv1x1, block.bn1x1)])

    fusedconv.register_block(TwoBranches, convert)
    try:
        model = prepared(BlockAfterAFold())
        before = state(model)
        with pytest.raises(RuntimeError, match="simulated"):
            fusedconv.fuse(model, inplace=True)
        assert_unchanged(model, before)
    finally:
        fusedconv.registry._CONVERTERS.pop(TwoBranches, None)


class _ConvBNWithAMissingBranch(fusedconv.blocks.ConvBN):
    branch_names = ("bn", "side")  # "side" was never built: the inherited install fails after deleting "bn"


def test_an_inherited_install_failing_on_a_subclass_is_undone():
    # fusedconv's own installs take a smaller rollback record; a method of
    # fusedconv bound to a user's subclass is not one of them.
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), _ConvBNWithAMissingBranch(4, 4, 3)))
    before = state(model)
    with pytest.raises(AttributeError, match="side"):
        fusedconv.fuse(model, inplace=True)
    assert_unchanged(model, before)
    assert isinstance(model[2].bn, nn.BatchNorm2d) and model[2].deployed_conv is None


# --------------------------------------------------------------------------- 9. code that reaches a module another way


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class _ViaClassAttribute(_ConvBN):
    shared: list = []

    def forward(self, x):
        return self.bn(self.conv(x)) + self.shared[0](x)


_SIDE: dict = {}


class _ViaDefaultArgument(_ConvBN):
    def forward(self, x, side=_SIDE):
        return self.bn(self.conv(x)) + side["m"].conv(x)


class _OwnCall(_ConvBN):
    def __call__(self, x):
        return super().__call__(x) + self.conv(x)


def _hooked(module_reader: bool):
    model = _ConvBN()
    if module_reader:
        model.register_forward_hook(lambda module, args, output: output + module.conv(args[0]))
    else:
        model.register_forward_hook(lambda module, args, output: output * 2)
    return model


def _pre_hooked_child():
    model = nn.Sequential(_ConvBN(), nn.ReLU())
    model[0].register_forward_pre_hook(lambda module, args: (args[0] + module.conv(args[0]).mean(),))
    return model


def _class_held():
    model = _ViaClassAttribute()
    _ViaClassAttribute.shared = [model.conv]
    return model


def _default_held():
    model = _ViaDefaultArgument()
    _SIDE["m"] = model
    return model


def _forward_replaced():
    model = _ConvBN()
    model.forward = lambda x: model.bn(model.conv(x)) + model.conv(x)
    return model


def _hooked_block():
    block = fusedconv.blocks.RepVGGBlock(3, 3, 3, activation=nn.ReLU())
    block.register_forward_hook(lambda module, args, output: output + module.dense[0].conv(args[0]))
    return nn.Sequential(block, nn.ReLU())


REACHED_ANOTHER_WAY = {
    "hook_reading_its_module": lambda: _hooked(True),
    "pre_hook_of_a_child_reading_it": _pre_hooked_child,
    "class_attribute": _class_held,
    "default_argument": _default_held,
    "call_overridden": _OwnCall,
    "forward_replaced_on_the_instance": _forward_replaced,
    "hook_of_a_block_reading_it": _hooked_block,
}


@pytest.mark.parametrize("inputs", [False, True], ids=["no_inputs", "example_inputs"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("case", sorted(REACHED_ANOTHER_WAY))
def test_a_conv_reached_by_code_the_module_tree_does_not_show_is_not_folded(case, inplace, inputs):
    """A hook called with its module, a class attribute, a default argument, a
    ``__call__`` of the model's class or an instance's own forward can call the
    conv outside the dataflow's view: no fold may change what the model
    computes (a run sees the second call; without one, the conv stays)."""
    model = randomize_batchnorm_stats(REACHED_ANOTHER_WAY[case](), torch.Generator().manual_seed(4)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
    try:
        fused = fusedconv.fuse(model, (x,) if inputs else None, inplace=inplace)
    except fusedconv.FoldError as refused:
        assert "example_inputs" in str(refused) and not inputs
        with torch.no_grad():
            assert torch.equal(model(x), expected)  # left as it was
        return
    with torch.no_grad():
        assert torch.allclose(fused(x), expected, rtol=1e-5, atol=1e-5), (fused(x) - expected).abs().max()


@pytest.mark.parametrize("case, held", [
    ("hook_reading_its_module", lambda model: [model.conv, model.bn]),
    ("pre_hook_of_a_child_reading_it", lambda model: [model[0].conv, model[0].bn]),
    ("hook_of_a_block_reading_it", lambda model: list(model[0].modules())[1:]),
    ("class_attribute", lambda model: [model.conv]),
])
def test_the_index_finds_the_modules_a_hook_or_class_holds(case, held):
    """The index follows only the modules that hold values (a module's hooks are
    among them) or whose class reaches a module: those a hook reading its
    module, or a class attribute, holds are found, with their holder."""
    from fusedconv.model_index import ModelIndex

    model = REACHED_ANOTHER_WAY[case]().eval()
    index = ModelIndex(model)
    assert index.held_elsewhere is not None
    assert {id(m) for m in held(model)} <= set(index.held_elsewhere)
    assert all(index.holders[id(m)] for m in held(model))
    assert ModelIndex(_hooked(False).eval()).held_elsewhere == {}  # a hook that never reads its module holds none


def test_a_hook_that_never_reads_its_module_does_not_stop_folds():
    """Only a hook that uses the module it is called with reaches the modules
    below it: a hook that scales the output leaves the pair foldable."""
    model = randomize_batchnorm_stats(_hooked(False), torch.Generator().manual_seed(6)).eval()
    plan = fusedconv.plan(model)
    assert {bn for fold in plan.folds for bn in fold.batchnorms} == {"bn"}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fusedconv.fuse(model)(x), model(x), rtol=1e-5, atol=1e-5)
    assert fusedconv.plan(randomize_batchnorm_stats(_hooked(True), torch.Generator()).eval()).folds == []


_FEATURES: dict = {}


def _keep_output(name, module, args, output):
    _FEATURES[name] = output


def _keep_last(*args):
    _FEATURES["last"] = args[-1]


@pytest.mark.parametrize("hook, folds_without_inputs", [
    (functools.partial(_keep_output, "block"), True),  # the module lands in a parameter never read
    (_keep_last, False),  # in *args: it may be read
], ids=["partial_never_reading", "star_args"])
def test_a_feature_hook_on_a_parent_costs_no_fold_with_a_run(hook, folds_without_inputs):
    """Feature-collecting hooks (as timm's FeatureHooks registers) on a module
    above a pair: a partial whose function never reads the module reaches
    nothing; one that may read it reaches the pair, which then folds with a
    run (the run sees every call the hook makes) and is left without one."""
    model = nn.Sequential(_ConvBN(), nn.ReLU())
    model[0].register_forward_hook(hook)
    model = randomize_batchnorm_stats(model, torch.Generator().manual_seed(7)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(x)
    assert bool(fusedconv.plan(model).folds) == folds_without_inputs
    fused = fusedconv.fuse(model, (x,))
    assert fusedconv.count_batchnorms(fused) == 0
    with torch.no_grad():
        assert torch.allclose(fused(x), expected, rtol=1e-5, atol=1e-5)


class _CallableHook:
    def __call__(self, module, args, output):
        return output


class _HookOwner:
    def bound(self, module, args, output):
        return output + module.conv(args[0])

    def bound_blind(self, module, args, output):
        return output * 2


@pytest.mark.parametrize("hook, may_use", [
    (lambda module, args, output: output + module.conv(args[0]), True),
    (lambda module, args, output: output + module.side(output), True),  # one paired load on Python 3.13+
    (lambda module, args, output: output * 2, False),
    (lambda module, args: None, False),
    (_HookOwner().bound, True),
    (_HookOwner().bound_blind, False),
    (functools.partial(_keep_output, "x"), False),
    (functools.partial(lambda name, module, args, output: module, "x"), True),
    (functools.partial(_keep_output, name="x"), True),  # a keyword may move the module: cannot tell
    (_keep_last, True),
    (lambda module, args, output: eval("module.conv(args[0])"), True),
    (_CallableHook(), True),
    (print, True),
])
def test_which_hooks_may_use_the_module_they_are_called_with(hook, may_use):
    from fusedconv.dataflow.references import hook_may_use_its_module

    assert hook_may_use_its_module(hook) is may_use


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("shadowed", ["bias", "weight"])
def test_a_tensor_written_into_the_instance_dict_is_the_one_folded(shadowed, inplace):
    """A tensor set through ``module.__dict__`` hides the registered one of the
    same name from ordinary lookup, so it is what ``forward`` reads: the fold
    must read and write that one (or leave the layer), never the registered
    tensor that nothing reads."""
    gen = torch.Generator().manual_seed(31)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    registered = getattr(conv, shadowed)
    conv.__dict__[shadowed] = nn.Parameter(torch.randn(registered.shape, generator=gen))
    model = randomize_batchnorm_stats(nn.Sequential(conv, nn.BatchNorm2d(4)), gen).eval()
    x = torch.randn(2, 3, 6, 6, generator=gen)
    weight, bias = (t.detach().double() for t in (conv.weight, conv.bias))
    bn = model[1]
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    reference = (F.conv2d(x.double(), weight, bias, padding=1) - bn.running_mean.double().view(1, -1, 1, 1)) * \
        scale.view(1, -1, 1, 1) + bn.bias.double().view(1, -1, 1, 1)
    with torch.no_grad():
        unfolded = relative_error(model(x), reference)
        fused = fusedconv.fuse(model, inplace=inplace)
        folded = relative_error(fused(x), reference)
    assert folded <= 4 * unfolded + 4 * torch.finfo(torch.float32).eps, (folded, unfolded)


class _RecordingSetattr(nn.Conv2d):
    """A layer whose own ``__setattr__`` must see every assignment."""

    def __setattr__(self, name, value):
        object.__setattr__(self, "seen", getattr(self, "seen", ()) + (name,))
        super().__setattr__(name, value)


class _DoublingRegistration(nn.Conv2d):
    """A layer whose own ``register_parameter`` changes what is registered."""

    def register_parameter(self, name, param):
        super().register_parameter(name, None if param is None else nn.Parameter(param.detach() * 3))


def _registration_state(module: nn.Module) -> tuple:
    """What a registration can change: the registries and the other instance attributes."""
    registries = ("_parameters", "_buffers", "_modules")
    return (*(dict(getattr(module, name)) for name in registries),
            {key: value for key, value in vars(module).items() if key not in registries})


def _bias_cases():
    plain = nn.Conv2d(3, 4, 3, bias=False)
    shadowed = nn.Conv2d(3, 4, 3, bias=False)
    shadowed.__dict__["bias"] = "stale"  # Module.__setattr__ removes it from the instance dict
    non_persistent = nn.Conv2d(3, 4, 3, bias=False)
    non_persistent._non_persistent_buffers_set.add("bias")
    return {"plain": (plain, nn.Parameter), "own __setattr__": (_RecordingSetattr(3, 4, 3, bias=False), nn.Parameter),
            "own register_parameter": (_DoublingRegistration(3, 4, 3, bias=False), nn.Parameter),
            "shadowed": (shadowed, nn.Parameter), "non-persistent": (non_persistent, nn.Parameter),
            "subclass": (nn.Conv2d(3, 4, 3, bias=False), type("OwnParameter", (nn.Parameter,), {})),
            "not a Parameter": (nn.Conv2d(3, 4, 3, bias=False), torch.Tensor)}


@pytest.mark.parametrize("hooked", [False, True], ids=["no-hook", "global-hook"])
@pytest.mark.parametrize("case", list(_bias_cases()))
def test_a_new_bias_is_registered_as_setattr_registers_it(case, hooked):
    """register_new_parameter writes the registry itself only where that is all
    setattr does: a class's own __setattr__, a name held elsewhere, a Parameter
    subclass and a global registration hook (which may replace the Parameter)
    each get the real setattr."""
    from fusedconv.layers import register_new_parameter

    layer, kind = _bias_cases()[case]
    twin = copy.deepcopy(layer)
    values = torch.randn(4, generator=torch.Generator().manual_seed(5))
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, parameter: nn.Parameter(parameter.detach() * 2)) if hooked else None
    outcomes = []
    try:
        for target, assign in ((twin, setattr), (layer, register_new_parameter)):
            try:
                assign(target, "bias", kind(values.clone()))
                outcomes.append(None)
            except TypeError as error:  # setattr refuses a plain tensor as a parameter
                outcomes.append(str(error))
    finally:
        if handle is not None:
            handle.remove()
    assert outcomes[0] == outcomes[1]
    expected, got = _registration_state(twin), _registration_state(layer)
    if outcomes[0] is not None:  # refused, and nothing registered
        assert case == "not a Parameter" and layer.bias is None and "bias" not in vars(layer)
        return
    assert got[1:] == expected[1:]
    assert expected[0].keys() == got[0].keys()
    assert type(got[0]["bias"]) is type(expected[0]["bias"])
    torch.testing.assert_close(got[0]["bias"], expected[0]["bias"], rtol=0, atol=0)
    assert torch.equal(layer.bias, values * (2 if hooked else 1) * (3 if case == "own register_parameter" else 1))


@pytest.mark.parametrize("case", ["plain", "own __setattr__", "module value", "registered child"])
def test_a_plain_attribute_is_set_as_setattr_sets_it(case):
    """set_plain_attribute goes around nn.Module's __setattr__ only where the
    result is the same: a class's own __setattr__, a module or tensor value and
    a name registered as a child get the real setattr (which may refuse)."""
    from fusedconv.layers import set_plain_attribute

    layer = _RecordingSetattr(3, 4, 3) if case == "own __setattr__" else nn.Conv2d(3, 4, 3)
    name, value = "forward", layer.extra_repr
    if case == "module value":
        value = nn.ReLU()
    elif case == "registered child":
        layer.side = nn.ReLU()
        name = "side"
    twin = copy.deepcopy(layer)
    value_for_twin = copy.deepcopy(value) if isinstance(value, nn.Module) else twin.extra_repr
    outcomes = []
    for target, assigned, assign in ((twin, value_for_twin, setattr), (layer, value, set_plain_attribute)):
        try:
            assign(target, name, assigned)
            outcomes.append(None)
        except TypeError as error:
            outcomes.append(str(error))
    assert outcomes[0] == outcomes[1]
    expected, got = _registration_state(twin), _registration_state(layer)
    assert [registry.keys() for registry in got[:3]] == [registry.keys() for registry in expected[:3]]
    assert got[3].keys() == expected[3].keys()
    if case == "own __setattr__":
        assert layer.seen == twin.seen and name in layer.seen
    if outcomes[0] is None and not isinstance(value, nn.Module):
        assert getattr(layer, name) == value
