"""Bad input: every error names the offending layer and the problem, and
leaves the caller's model exactly as it was (also with inplace=True)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import fusedconv
from utils import randomize_batchnorm_stats

MODES = ["fx", "run"]
INPLACE = [False, True]
SHAPE = (2, 3, 8, 8)


# One thread and a seeded global RNG per test, both restored afterwards (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread", "fixed_seed")


class Block(nn.Module):
    def __init__(self, cin, cout, bn_features=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout if bn_features is None else bn_features)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """Several foldable pairs; the ones the tests break come last in module
    order, so that a library folding as it goes would already have folded the
    earlier ones when it meets the problem."""

    def __init__(self, bn_features=None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.block = Block(4, 6, bn_features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)
        self.fc_bn = nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.fc_bn(self.fc(self.pool(x).flatten(1)))


def make_net(**kw) -> Net:
    model = Net(**kw)
    randomize_batchnorm_stats(model, torch.Generator().manual_seed(1))
    return model.eval()


def example_for(mode):
    return (torch.randn(SHAPE),) if mode == "run" else None


# ---------------------------------------------------------------------------
# snapshot of everything the caller could observe
# ---------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _hook_counts(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                len(getattr(m, "_state_dict_hooks", {})), len(getattr(m, "_load_state_dict_pre_hooks", {})))
            for n, m in model.named_modules(remove_duplicate=False)}


def snapshot(model: nn.Module) -> dict:
    sd = model.state_dict(keep_vars=True)
    return {
        "objects": dict(sd),
        "values": {k: (v.dtype, v.shape, v.requires_grad, _bits(v).clone()) for k, v in sd.items()},
        "modules": dict(model.named_modules(remove_duplicate=False)),
        "training": {n: m.training for n, m in model.named_modules(remove_duplicate=False)},
        "hooks": _hook_counts(model),
        "global_hooks": (len(nn.modules.module._global_forward_hooks),
                         len(nn.modules.module._global_forward_pre_hooks)),
    }


def assert_unchanged(model: nn.Module, snap: dict):
    sd = model.state_dict(keep_vars=True)
    assert list(sd) == list(snap["objects"]), "state_dict keys changed"
    for k, v in sd.items():
        assert v is snap["objects"][k], f"{k}: tensor object replaced"
        dtype, shape, requires_grad, bits = snap["values"][k]
        assert (v.dtype, v.shape, v.requires_grad) == (dtype, shape, requires_grad), k
        assert torch.equal(_bits(v), bits), f"{k}: values changed"
    mods = dict(model.named_modules(remove_duplicate=False))
    assert list(mods) == list(snap["modules"]), "module paths changed"
    for n, m in mods.items():
        assert m is snap["modules"][n], f"module at {n!r} replaced"
    assert {n: m.training for n, m in mods.items()} == snap["training"]
    assert _hook_counts(model) == snap["hooks"], "hooks left behind"
    assert (len(nn.modules.module._global_forward_hooks),
            len(nn.modules.module._global_forward_pre_hooks)) == snap["global_hooks"]
    assert not torch._C._is_torch_function_mode_enabled(), "a TorchFunctionMode was left active"


def expect_fold_error(model, mode, inplace, *patterns, example=None):
    """fuse() and plan() raise FoldError whose message matches every pattern;
    the model is left exactly as it was."""
    if example is None:
        example = example_for(mode)
    snap = snapshot(model)
    with pytest.raises(fusedconv.FoldError) as info:
        fusedconv.fuse(model, example, inplace=inplace)
    message = str(info.value)
    for p in patterns:
        assert re.search(p, message), f"{p!r} not in message: {message}"
    assert_unchanged(model, snap)
    with pytest.raises(fusedconv.FoldError):
        fusedconv.plan(model, example)
    assert_unchanged(model, snap)
    # the model still runs as before
    if mode == "run":
        with torch.no_grad():
            model(*example)
    return info.value


def test_fold_error_is_value_error():
    assert issubclass(fusedconv.FoldError, ValueError)
    assert issubclass(fusedconv.FoldWarning, Warning)


# ---------------------------------------------------------------------------
# training mode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", INPLACE)
def test_model_in_training_mode(mode, inplace):
    model = make_net().train()
    expect_fold_error(model, mode, inplace, r"^Net is in training mode.*model\.eval\(\)")
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", INPLACE)
def test_one_bn_in_training_mode(mode, inplace):
    model = make_net()
    model.fc_bn.train()
    expect_fold_error(model, mode, inplace, r"\bfc_bn\b", r"(?i)train")
    assert model.fc_bn.training and not model.block.bn.training


# ---------------------------------------------------------------------------
# bad statistics
# ---------------------------------------------------------------------------

BAD_STATS = {
    "nan_running_mean": ("running_mean", math.nan, r"(?i)nan"),
    "inf_running_mean": ("running_mean", -math.inf, r"(?i)inf"),
    "nan_running_var": ("running_var", math.nan, r"(?i)nan"),
    "inf_running_var": ("running_var", math.inf, r"(?i)inf"),
    "negative_running_var": ("running_var", -0.5, r"(?i)negative"),
    "nan_weight": ("weight", math.nan, r"(?i)nan"),
    "inf_bias": ("bias", math.inf, r"(?i)inf"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", INPLACE)
@pytest.mark.parametrize("case", list(BAD_STATS))
def test_bad_statistics(case, mode, inplace):
    attr, value, problem = BAD_STATS[case]
    model = make_net()
    with torch.no_grad():
        getattr(model.block.bn, attr)[2] = value
    expect_fold_error(model, mode, inplace, r"\bblock\.bn\b", r"(?i)" + attr, problem)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", INPLACE)
def test_bad_statistics_in_frozen_batchnorm(mode, inplace):
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = make_net()
    frozen = FrozenBatchNorm2d(6).eval()
    randomize_batchnorm_stats(frozen, torch.Generator().manual_seed(3))
    frozen.running_var[0] = -1.0
    model.block.bn = frozen
    expect_fold_error(model, mode, inplace, r"\bblock\.bn\b", r"(?i)negative")


# ---------------------------------------------------------------------------
# shape mismatch, failing example run
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", INPLACE)
def test_num_features_mismatch_fx(inplace):
    # conv gives 6 channels, the BN after it has 5: the fx path never runs the model
    model = make_net(bn_features=5)
    expect_fold_error(model, "fx", inplace, r"\bblock\.bn\b", r"\b5\b", r"\b6\b")


@pytest.mark.parametrize("inplace", INPLACE)
def test_num_features_mismatch_run(inplace):
    # with an example input the model itself fails to run: a FoldError too
    model = make_net(bn_features=5)
    snap = snapshot(model)
    # The message names the model that failed to run, the innermost module that
    # was running (block.bn, exactly) and torch's own error.
    with pytest.raises(fusedconv.FoldError, match="^" + re.escape(
            "running Net on example_inputs failed in block.bn (BatchNorm2d): RuntimeError: ")
            + r".*running_mean should contain 6 elements not 5"):
        fusedconv.fuse(model, (torch.randn(SHAPE),), inplace=inplace)
    assert_unchanged(model, snap)


class Raising(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Net()
        self.body.eval()
        randomize_batchnorm_stats(self.body, torch.Generator().manual_seed(1))

    def forward(self, x):
        self.body(x)
        raise RuntimeError("boom from the example run")


@pytest.mark.parametrize("inplace", INPLACE)
def test_example_run_that_raises(inplace):
    model = Raising().eval()
    snap = snapshot(model)
    with pytest.raises(fusedconv.FoldError) as info:
        fusedconv.fuse(model, (torch.randn(SHAPE),), inplace=inplace)
    err = info.value
    text = str(err) + " " + str(err.__cause__)
    assert "boom from the example run" in text
    # Raised by the root's own forward, after its children returned: no inner module to name.
    assert str(err).startswith("running Raising on example_inputs failed: RuntimeError: "), str(err)
    assert isinstance(err.__cause__, RuntimeError)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("inplace", INPLACE)
def test_example_input_with_wrong_shape(inplace):
    model = make_net()
    snap = snapshot(model)
    # the run fails in the first conv (5 channels given, 3 expected), which the message names
    with pytest.raises(fusedconv.FoldError, match="^" + re.escape(
            "running Net on example_inputs failed in stem.0 (Conv2d): RuntimeError: ")
            + r".*expected input\[2, 5, 8, 8\] to have 3 channels"):
        fusedconv.fuse(model, (torch.randn(2, 5, 8, 8),), inplace=inplace)
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------------
# not a module
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, torch.randn(3), lambda x: x, {"conv": nn.Conv2d(1, 1, 1)},
                                 [nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)]],
                         ids=["none", "tensor", "function", "dict", "list"])
@pytest.mark.parametrize("inplace", INPLACE)
def test_not_a_module(bad, inplace):
    with pytest.raises(TypeError, match=r"(?i)module"):
        fusedconv.fuse(bad, inplace=inplace)
    with pytest.raises(TypeError, match=r"(?i)module"):
        fusedconv.plan(bad)


# ---------------------------------------------------------------------------
# successful calls: inplace semantics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_inplace_true_returns_same_object(mode):
    model = make_net()
    x = torch.randn(SHAPE)
    with torch.no_grad():
        expected = model(x)
    modules = dict(model.named_modules())
    fused = fusedconv.fuse(model, example_for(mode), inplace=True)
    assert fused is model
    # the layers are folded in place: the same module objects at the same paths
    for name in ("", "stem", "stem.0", "stem.2", "block", "block.conv", "pool", "fc"):
        assert model.get_submodule(name) is modules[name], name
    assert fusedconv.count_batchnorms(model) == 0
    assert isinstance(model.block.bn, nn.Identity) and isinstance(model.stem[1], nn.Identity)
    assert isinstance(model.fc_bn, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    training = [n for n, m in model.named_modules() if m.training]
    assert training == [], f"the eval model has modules in training mode after folding: {training}"


@pytest.mark.parametrize("mode", MODES)
def test_inplace_false_leaves_original_untouched(mode):
    model = make_net()
    snap = snapshot(model)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        expected = model(x)
    fused = fusedconv.fuse(model, example_for(mode), inplace=False)
    assert fused is not model
    assert_unchanged(model, snap)
    assert fusedconv.count_batchnorms(model) == 3 and fusedconv.count_batchnorms(fused) == 0
    # a copy: no storage shared with the original
    original_ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    for k, t in fused.state_dict().items():
        assert t.untyped_storage().data_ptr() not in original_ptrs, f"{k} shares storage with the original"
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# errors found when an existing plan is applied (after planning succeeded)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", INPLACE)
def test_plan_applied_after_stats_went_bad(mode, inplace):
    # Planned while valid; the last BN (in module order) goes bad before the plan
    # is applied. Nothing may be folded: not even the pairs checked before it.
    model = make_net()
    plan = fusedconv.plan(model, example_for(mode))
    assert plan.num_folded == 3
    with torch.no_grad():
        model.fc_bn.running_var[1] = math.nan
    snap = snapshot(model)
    with pytest.raises(fusedconv.FoldError, match=r"(?i)\bfc_bn\b.*running_var.*nan"):
        fusedconv.fuse(model, plan=plan, inplace=inplace)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("inplace", INPLACE)
def test_plan_applied_after_bn_set_to_training(inplace):
    model = make_net()
    plan = fusedconv.plan(model)
    model.fc_bn.train()
    snap = snapshot(model)
    with pytest.raises(fusedconv.FoldError, match=r"\bfc_bn\b.*(?i:train)"):
        fusedconv.fuse(model, plan=plan, inplace=inplace)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("inplace", INPLACE)
def test_plan_applied_to_a_model_without_its_layers(inplace):
    plan = fusedconv.plan(make_net())
    other = make_net()
    del other.fc_bn  # the plan's last fold names a module this model lacks
    other.fc_bn = nn.Identity()
    other.fc_bn.eval()
    snap = snapshot(other)
    with pytest.raises(fusedconv.FoldError, match=r"\bfc_bn\b"):
        fusedconv.fuse(other, plan=plan, inplace=inplace)
    assert_unchanged(other, snap)
