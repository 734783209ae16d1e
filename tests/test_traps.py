"""Model-level tests: every "must fold" row and every trap of docs/DESIGN.md section 3.5.

Each test builds a small hand-made model with random weights and random
BatchNorm statistics, asserts exactly which BatchNorms the plan folds (and that
the folded model really has them replaced), and compares the folded model with
a float64 reference on fresh random inputs: the folded error must be at most
1.2x the unfolded model's own error.

Most tests run twice: through the torch.fx path (``example_inputs=None``) and
through the run path (``example_inputs`` given).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize, prune

import fusedconv
from utils import float64_reference, randomize_batchnorm_stats, relative_error, trace_only

# The folded model's relative error against float64 may be at most FACTOR
# times the unfolded model's error (both measured on the same inputs) plus
# FLOOR. Why a floor: a folded layer rounds each folded weight once to its
# dtype, a rounding the unfolded model does not do. In these one- or two-layer
# models the unfolded float32 error is itself only ~1-2 u (u = 2^-24), so that
# one extra rounding moves the ratio well past 1.2 (measured with an exact
# float64 fold over 20 seeds: folded error up to 1.2 x unfolded + 1.5 u).
# 4 u (= 2 * finfo.eps) covers it; any real bug (wrong axis, lost bias, lost
# groups or padding) gives errors of order 1e-2 or more.
FACTOR = 1.2
FLOOR = {torch.float32: 2 * torch.finfo(torch.float32).eps,
         torch.float64: 2 * torch.finfo(torch.float64).eps}

# "source": no example inputs, fusedconv's default (the forward code is read,
# torch.fx traces what that cannot vouch for); "fx": no example inputs with the
# code reading switched off, so that the torch.fx path is tested on its own;
# "run": a run on example inputs.
MODES = ["source", "fx", "run"]


# One thread and a seeded global RNG per test, both restored afterwards (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread", "fixed_seed")


@pytest.fixture(autouse=True)
def _fx_mode(request, monkeypatch):
    """In "fx" mode, the code reading is switched off (undone by monkeypatch)."""
    if getattr(request.node, "callspec", None) and request.node.callspec.params.get("mode") == "fx":
        trace_only(monkeypatch)


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def bn_like_names(model: nn.Module) -> set[str]:
    """Qualified names of the BatchNorm-like modules (independent of the library)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    return {n for n, m in model.named_modules() if isinstance(m, (_BatchNorm, FrozenBatchNorm2d))}


def prepare(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BN statistics, eval mode."""
    randomize_batchnorm_stats(model, _gen(seed))
    return model.eval()


def inputs_for(shapes, seed: int, dtype=torch.float32, memory_format=None) -> tuple:
    g = _gen(seed)
    out = []
    for shape in shapes:
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if memory_format is not None:
            t = t.contiguous(memory_format=memory_format)
        out.append(t)
    return tuple(out)


def example_for(mode: str, shapes, **kw):
    """Example inputs for the run path, None for the fx path."""
    return inputs_for(shapes, seed=100, **kw) if mode == "run" else None


def folds_of(plan) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    got = {}
    for f in plan.folds:
        assert f.layer not in got, f"layer {f.layer} appears in two folds"
        got[f.layer] = (tuple(f.before), tuple(f.after))
    return got


def errors_vs_float64(model, fused, inputs) -> tuple[float, float]:
    ref = float64_reference(model, inputs)
    with torch.no_grad():
        e_orig = relative_error(model(*inputs), ref)
        e_fused = relative_error(fused(*inputs), ref)
    return e_orig, e_fused


def assert_accuracy(model, fused, inputs, factor=FACTOR, floor=None):
    if floor is None:
        floor = FLOOR[inputs[0].dtype]
    e_orig, e_fused = errors_vs_float64(model, fused, inputs)
    assert e_fused <= factor * e_orig + floor, (
        f"folded error {e_fused:.3e} > {factor} x unfolded error {e_orig:.3e} + {floor:.1e}"
    )
    return e_orig, e_fused


def rank_ambiguous(bn: nn.Module) -> bool:
    """BNs that accept inputs of several ranks (BatchNorm1d: (N, C) or (N, C, L);
    SyncBatchNorm: any). Their channel axis is the layer's only at one rank, so
    without example inputs (fx path, no shapes) they must not be folded."""
    return isinstance(bn, (nn.BatchNorm1d, nn.SyncBatchNorm))


def expected_source(mode: str, source_mode: str) -> str:
    """The ``plan.source`` a plan made in ``mode`` must report. ``source_mode`` is
    the case's own answer for "source" mode: "source" where the forward code
    proves every BN (then the code reading alone must vouch, and switching it off
    must fail the test), "torch.fx" where the code reading cannot (then fx must)."""
    assert source_mode in ("source", "torch.fx"), source_mode
    return {"run": "run", "fx": "torch.fx", "source": source_mode}[mode]


def check_folds(model, mode, shapes, expected, *, factor=FACTOR, floor=None, input_kw=None,
                replaced_by=nn.Identity, rank_visible_to_fx=False, source_mode=None):
    """Plan and fuse ``model``; assert that exactly ``expected`` is folded
    ({layer: (before_bns, after_bns)}) and that the outputs match float64.
    In fx mode, folds with a rank-ambiguous BN are expected to be skipped unless
    the graph itself fixes the rank (a flatten before the Linear).

    ``source_mode``: the plan source required in "source" mode (see
    ``expected_source``). By default "source", except for a model with a
    rank-ambiguous BN (BatchNorm1d, SyncBatchNorm): the code never shows the
    rank of a tensor, so it cannot prove such a BN and torch.fx must trace."""
    if source_mode is None:
        ambiguous = any(rank_ambiguous(m) for m in model.modules())
        source_mode = "torch.fx" if ambiguous else "source"
    if mode != "run" and not rank_visible_to_fx:
        expected = {
            layer: (before, after)
            for layer, (before, after) in expected.items()
            if not any(rank_ambiguous(model.get_submodule(n)) for n in before + after)
        }
    input_kw = input_kw or {}
    example = example_for(mode, shapes, **input_kw)
    all_bns = bn_like_names(model)
    assert fusedconv.count_batchnorms(model) == len(all_bns)

    plan = fusedconv.plan(model, example)
    assert plan.source == expected_source(mode, source_mode), str(plan)
    assert folds_of(plan) == expected, str(plan)
    folded = {b for before, after in expected.values() for b in before + after}
    assert plan.num_folded == len(folded)
    skipped = {s.module for s in plan.skipped}
    assert skipped & all_bns == all_bns - folded, str(plan)

    fused = fusedconv.fuse(model, example)
    assert fused is not model
    for name in folded:
        assert isinstance(fused.get_submodule(name), replaced_by), name
    for name in all_bns - folded:
        assert type(fused.get_submodule(name)) is type(model.get_submodule(name)), name
    assert fusedconv.count_batchnorms(fused) == len(all_bns) - len(folded)
    # the original is untouched
    assert bn_like_names(model) == all_bns

    inputs = inputs_for(shapes, seed=7, **input_kw)
    assert_accuracy(model, fused, inputs, factor=factor, floor=floor)
    return fused, plan


def check_no_folds(model, mode, shapes, *, input_kw=None, source_mode="torch.fx"):
    """Nothing is folded, every BN is reported as skipped with a reason, and
    the fused model computes bit for bit what the original computes.

    ``source_mode`` (see ``expected_source``) is "torch.fx" for every trap here:
    the code reading vouches for a plan only when it proves every BN foldable,
    and a trap's BN is by construction one it cannot prove, so in "source" mode
    torch.fx must have been asked (and must agree that nothing folds)."""
    input_kw = input_kw or {}
    example = example_for(mode, shapes, **input_kw)
    all_bns = bn_like_names(model)
    assert all_bns, "test model must contain a BatchNorm"

    plan = fusedconv.plan(model, example)
    assert plan.source == expected_source(mode, source_mode), str(plan)
    assert plan.folds == [], str(plan)
    assert plan.num_folded == 0
    reasons = {s.module: s.reason for s in plan.skipped}
    for name in all_bns:
        assert name in reasons, f"{name} missing from plan.skipped:\n{plan}"
        assert reasons[name], f"{name} skipped without a reason"

    fused = fusedconv.fuse(model, example)
    assert fusedconv.count_batchnorms(fused) == len(all_bns)
    for name, m in model.named_modules():
        assert type(fused.get_submodule(name)) is type(m), name
    inputs = inputs_for(shapes, seed=7, **input_kw)
    with torch.no_grad():
        expected = model(*inputs)
        got = fused(*inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    return fused, plan


class ConvBN(nn.Module):
    """layer -> bn"""

    def __init__(self, layer, bn):
        super().__init__()
        self.layer = layer
        self.bn = bn

    def forward(self, x):
        return self.bn(self.layer(x))


class BNLayer(nn.Module):
    """bn -> layer (pre-BN)"""

    def __init__(self, bn, layer):
        super().__init__()
        self.bn = bn
        self.layer = layer

    def forward(self, x):
        return self.layer(self.bn(x))


# ---------------------------------------------------------------------------
# must fold: conv -> BN with every conv flavour
# ---------------------------------------------------------------------------

CONV_CASES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), nn.BatchNorm1d, (2, 4, 11)),
    "conv1d_stride_pad_dil_groups_nobias": (
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        nn.BatchNorm1d, (2, 4, 13)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d, (2, 4, 8, 8)),
    "conv2d_nobias": (lambda: nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d, (2, 4, 8, 8)),
    "conv2d_stride_pad_dil_groups": (
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 3), groups=2),
        nn.BatchNorm2d, (2, 4, 9, 10)),
    "conv2d_depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d, (2, 6, 8, 8)),
    "conv2d_depthwise_multiplier": (
        lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3, bias=False), nn.BatchNorm2d, (2, 3, 8, 8)),
    "conv2d_reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d,
                       (2, 4, 8, 8)),
    "conv2d_circular": (lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="circular", dilation=2),
                        nn.BatchNorm2d, (2, 4, 8, 8)),
    "conv2d_replicate": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate", bias=False),
                         nn.BatchNorm2d, (2, 4, 8, 8)),
    "conv2d_same": (lambda: nn.Conv2d(4, 6, 4, padding="same"), nn.BatchNorm2d, (2, 4, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2), nn.BatchNorm3d, (2, 4, 5, 5, 5)),
    "conv3d_stride_nobias": (lambda: nn.Conv3d(4, 6, (1, 3, 3), stride=(1, 2, 2), bias=False),
                             nn.BatchNorm3d, (2, 4, 3, 7, 7)),
    "convT1d_groups_outpad": (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        nn.BatchNorm1d, (2, 4, 7)),
    "convT2d": (lambda: nn.ConvTranspose2d(4, 6, 3), nn.BatchNorm2d, (2, 4, 5, 5)),
    "convT2d_groups_outpad_dil_nobias": (
        lambda: nn.ConvTranspose2d(6, 9, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2),
                                   dilation=(1, 1), groups=3, bias=False),
        nn.BatchNorm2d, (2, 6, 5, 4)),
    "convT2d_depthwise": (
        lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, output_padding=1, groups=4), nn.BatchNorm2d,
        (2, 4, 5, 5)),
    "convT3d_groups_outpad": (
        lambda: nn.ConvTranspose3d(4, 6, (3, 2, 3), stride=(2, 1, 2), output_padding=(1, 0, 1), groups=2),
        nn.BatchNorm3d, (2, 4, 3, 4, 3)),
    "linear": (lambda: nn.Linear(8, 6), nn.BatchNorm1d, (5, 8)),
    "linear_nobias": (lambda: nn.Linear(8, 6, bias=False), nn.BatchNorm1d, (5, 8)),
    "conv1d_then_bn1d_3d_input": (lambda: nn.Conv1d(4, 6, 1), nn.BatchNorm1d, (2, 4, 9)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_layer_then_bn_folds(case, mode):
    make_layer, bn_cls, shape = CONV_CASES[case]
    layer = make_layer()
    out_ch = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    model = prepare(ConvBN(layer, bn_cls(out_ch)))
    fused, _ = check_folds(model, mode, [shape], {"layer": ((), ("bn",))})
    if mode != "run" and rank_ambiguous(model.bn):
        return  # skipped without example inputs: nothing folded to inspect
    # every hyper-parameter of the surviving layer is kept
    new = fused.layer
    assert type(new) is type(layer)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "output_padding",
                 "in_channels", "out_channels", "kernel_size", "in_features", "out_features"):
        if hasattr(layer, attr):
            assert getattr(new, attr) == getattr(layer, attr), attr
    assert new.weight.shape == layer.weight.shape
    assert new.bias is not None and new.bias.shape == (out_ch,)


@pytest.mark.parametrize("mode", MODES)
def test_bn_affine_false_folds(mode):
    model = prepare(ConvBN(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, affine=False)))
    check_folds(model, mode, [(2, 4, 8, 8)], {"layer": ((), ("bn",))})


@pytest.mark.parametrize("mode", MODES)
def test_linear_bn1d_affine_false_folds(mode):
    # torch.nn.utils.fusion crashes on this one (weight is None)
    model = prepare(ConvBN(nn.Linear(8, 6), nn.BatchNorm1d(6, affine=False)))
    check_folds(model, mode, [(5, 8)], {"layer": ((), ("bn",))})


@pytest.mark.parametrize("mode", MODES)
def test_bn_custom_eps_folds(mode):
    model = prepare(ConvBN(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, eps=0.3)))
    check_folds(model, mode, [(2, 4, 8, 8)], {"layer": ((), ("bn",))})


@pytest.mark.parametrize("mode", MODES)
def test_sync_batchnorm_eval_folds(mode):
    # SyncBatchNorm in eval mode needs no process group and runs on CPU
    model = prepare(ConvBN(nn.Conv2d(4, 6, 3, padding=1), nn.SyncBatchNorm(6)))
    check_folds(model, mode, [(2, 4, 8, 8)], {"layer": ((), ("bn",))})


@pytest.mark.parametrize("mode", MODES)
def test_frozen_batchnorm2d_folds(mode):
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = prepare(ConvBN(nn.Conv2d(4, 6, 3, stride=2, bias=False), FrozenBatchNorm2d(6, eps=1e-3)))
    check_folds(model, mode, [(2, 4, 9, 9)], {"layer": ((), ("bn",))})


@pytest.mark.parametrize("mode", MODES)
def test_two_bns_in_a_row_fold(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(6)
            self.bn2 = nn.BatchNorm2d(6, eps=1e-2)

        def forward(self, x):
            return self.bn2(self.bn1(self.conv(x)))

    check_folds(prepare(Net()), mode, [(2, 4, 8, 8)], {"conv": ((), ("bn1", "bn2"))})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("drop", [False, True])
def test_timm_batchnormact_folds_and_keeps_act(mode, drop):
    from timm.layers import BatchNormAct2d

    bn = BatchNormAct2d(6, act_layer=nn.ReLU, drop_layer=nn.Dropout if drop else None)
    model = prepare(ConvBN(nn.Conv2d(4, 6, 3, padding=1), bn))
    fused, _ = check_folds(model, mode, [(2, 4, 8, 8)], {"layer": ((), ("bn",))},
                           replaced_by=nn.Module)
    # replaced by its activation (drop then act); an Identity drop is left out
    if drop:
        assert type(fused.bn) is nn.Sequential
        assert [type(m) for m in fused.bn] == [nn.Dropout, nn.ReLU]
        assert fused.bn[1] is not model.bn.act
    else:
        assert type(fused.bn) is nn.ReLU
        assert fused.bn is not model.bn.act  # a copy: the original is untouched
    assert not any(isinstance(m, _BatchNorm) for m in fused.modules())
    # the ReLU is still applied: all outputs non-negative, some zero
    x = inputs_for([(2, 4, 8, 8)], seed=3)
    with torch.no_grad():
        y = fused(*x)
    assert (y >= 0).all() and (y == 0).any()


def test_sequential_chain_folds_without_example_input():
    model = prepare(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=4), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 5, 1), nn.BatchNorm2d(5),
        nn.Flatten(), nn.Linear(5 * 3 * 3, 7), nn.BatchNorm1d(7),
    ))
    fused, _ = check_folds(model, "fx", [(2, 3, 14, 14)], {
        "0": ((), ("1",)), "3": ((), ("4",)), "7": ((), ("8",)), "10": ((), ("11",)),
    }, rank_visible_to_fx=True)
    assert isinstance(fused, nn.Sequential) and len(fused) == len(model)
    assert [type(m) for m in fused] == [
        nn.Conv2d, nn.Identity, nn.ReLU, nn.Conv2d, nn.Identity, nn.ReLU, nn.MaxPool2d,
        nn.Conv2d, nn.Identity, nn.Flatten, nn.Linear, nn.Identity]


@pytest.mark.parametrize("mode", MODES)
def test_channels_last_model(mode):
    model = prepare(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)))
    model = model.to(memory_format=torch.channels_last)
    kw = {"memory_format": torch.channels_last}
    fused, _ = check_folds(model, mode, [(2, 4, 8, 8)], {"0": ((), ("1",)), "3": ((), ("4",))},
                           input_kw=kw)
    for i in (0, 3):
        assert fused[i].weight.is_contiguous(memory_format=torch.channels_last)
    x = inputs_for([(2, 4, 8, 8)], seed=5, **kw)
    with torch.no_grad():
        assert fused(*x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", MODES)
def test_float64_model(mode):
    model = prepare(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Linear(6, 5), nn.Flatten(0, 1), nn.Identity()))
    # Linear over the last (width) axis, no BN after it: only the conv folds.
    model = model.double()
    # The float64 reference of a float64 model *is* the model, so the unfolded
    # error is exactly 0; the folded one is the float64 rounding of the folded
    # weights: FLOOR[float64] = 4 float64 units.
    fused, _ = check_folds(model, mode, [(2, 4, 8, 8)], {"0": ((), ("1",))},
                           input_kw={"dtype": torch.float64})
    assert fused[0].weight.dtype == torch.float64 and fused[0].bias.dtype == torch.float64


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_model(mode):
    model = prepare(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)))
    model = model.to(torch.bfloat16)
    # bf16 has an 8-bit mantissa: each folded weight is rounded once to bf16
    # (relative 2^-9), a rounding the unfolded model does not do, and as large
    # as the unfolded model's whole error (~2e-3 here). An exact float64 fold
    # measured over 20 seeds: folded / unfolded up to 1.7, mean 1.3. Allow the
    # flash-attention style 2x, no floor.
    fused, _ = check_folds(model, mode, [(2, 8, 8, 8)], {"0": ((), ("1",)), "3": ((), ("4",))},
                           input_kw={"dtype": torch.bfloat16}, factor=2.0, floor=0.0)
    assert fused[0].weight.dtype == torch.bfloat16 and fused[3].bias.dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# must fold: pre-BN (BN -> layer) where exact
# ---------------------------------------------------------------------------

PRE_BN_CASES = {
    "bn_conv1x1": (nn.BatchNorm2d, lambda: nn.Conv2d(4, 6, 1), (2, 4, 6, 6)),
    "bn_conv1x1_groups_stride": (nn.BatchNorm2d, lambda: nn.Conv2d(4, 6, 1, stride=2, groups=2, bias=False),
                                 (2, 4, 7, 7)),
    "bn_conv3x3_nopad": (nn.BatchNorm2d, lambda: nn.Conv2d(4, 6, 3, dilation=2), (2, 4, 9, 9)),
    "bn_conv3x3_reflect": (nn.BatchNorm2d, lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                           (2, 4, 8, 8)),
    "bn_conv3x3_replicate_groups": (
        nn.BatchNorm2d, lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate", groups=2),
        (2, 4, 8, 8)),
    "bn_conv3x3_circular": (nn.BatchNorm2d, lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
                            (2, 4, 8, 8)),
    "bn_conv1d": (nn.BatchNorm1d, lambda: nn.Conv1d(4, 6, 3), (2, 4, 9)),
    "bn_linear": (nn.BatchNorm1d, lambda: nn.Linear(8, 6), (5, 8)),
    "bn_linear_nobias": (nn.BatchNorm1d, lambda: nn.Linear(8, 6, bias=False), (5, 8)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(PRE_BN_CASES))
def test_bn_then_layer_folds(case, mode):
    bn_cls, make_layer, shape = PRE_BN_CASES[case]
    layer = make_layer()
    in_ch = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    model = prepare(BNLayer(bn_cls(in_ch), layer))
    fused, _ = check_folds(model, mode, [shape], {"layer": (("bn",), ())})
    if mode == "run" or not rank_ambiguous(model.bn):
        assert fused.layer.bias is not None


# ---------------------------------------------------------------------------
# must NOT fold
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_shared_conv_called_twice_not_folded(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x, y):
            return self.bn(self.conv(x)) + self.conv(y)

    check_no_folds(prepare(Net()), mode, [(2, 4, 6, 6), (2, 4, 6, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_shared_conv_called_twice_in_sequential_not_folded(mode):
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = prepare(nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), conv))
    check_no_folds(model, mode, [(2, 4, 6, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_conv_output_feeds_bn_and_residual_not_folded(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    check_no_folds(prepare(Net()), mode, [(2, 4, 6, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_conv_output_feeds_bn_and_cat_not_folded(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return torch.cat([self.bn(y), y], dim=1)

    check_no_folds(prepare(Net()), mode, [(2, 4, 6, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_conv_output_returned_as_second_output_not_folded(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y), y

    check_no_folds(prepare(Net()), mode, [(2, 4, 6, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_bn_on_input_registered_after_conv_not_folded(mode):
    # module-order trap: bn is registered right after conv but normalises the input
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(x) + self.bn(x)

    check_no_folds(prepare(Net()), mode, [(2, 4, 6, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_bn_follows_other_conv_than_registration_order(mode):
    # module-order trap: bn is registered after conv_a, but forward applies it to conv_b
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(4, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.conv_b = nn.Conv2d(4, 6, 1)

        def forward(self, x):
            return self.conv_a(x) + self.bn(self.conv_b(x))

    model = prepare(Net())
    fused, _ = check_folds(model, mode, [(2, 4, 6, 6)], {"conv_b": ((), ("bn",))})
    assert torch.equal(fused.conv_a.weight, model.conv_a.weight)
    assert torch.equal(fused.conv_a.bias, model.conv_a.bias)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", ["module", "functional", "inplace_method"])
def test_relu_between_conv_and_bn_not_folded(mode, act):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)
            self.act = nn.ReLU()
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            y = self.conv(x)
            if act == "module":
                y = self.act(y)
            elif act == "functional":
                y = F.relu(y)
            else:
                y = y.relu_()
            return self.bn(y)

    check_no_folds(prepare(Net()), mode, [(2, 4, 6, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_pre_bn_into_zero_padded_conv_not_folded(mode):
    model = prepare(BNLayer(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)))
    check_no_folds(model, mode, [(2, 4, 6, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_pre_bn_into_zero_padded_conv_same_not_folded(mode):
    model = prepare(BNLayer(nn.BatchNorm1d(4), nn.Conv1d(4, 6, 3, padding="same", bias=False)))
    check_no_folds(model, mode, [(2, 4, 9)])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", [0, 1])
def test_pre_bn_into_conv_transpose_not_folded(mode, padding):
    model = prepare(BNLayer(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3, stride=2, padding=padding)))
    check_no_folds(model, mode, [(2, 4, 5, 5)])


@pytest.mark.parametrize("mode", MODES)
def test_pre_bn_feeding_two_layers_not_folded(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.conv_a = nn.Conv2d(4, 6, 1)
            self.conv_b = nn.Conv2d(4, 6, 1)

        def forward(self, x):
            y = self.bn(x)
            return self.conv_a(y) * self.conv_b(y)

    check_no_folds(prepare(Net()), mode, [(2, 4, 5, 5)])


@pytest.mark.parametrize("mode", MODES)
def test_linear_on_wrong_axis_not_folded(mode):
    # Linear acts on the last axis; BatchNorm1d on a 3-D tensor normalises axis 1.
    # The sizes agree (8 == 8) so only the shapes tell them apart: the run sees
    # them, and the fx path, which does not, must not guess.
    model = prepare(ConvBN(nn.Linear(8, 8), nn.BatchNorm1d(8)))
    check_no_folds(model, mode, [(3, 8, 8)])


@pytest.mark.parametrize("mode", MODES)
def test_pre_bn_linear_on_wrong_axis_not_folded(mode):
    model = prepare(BNLayer(nn.BatchNorm1d(8), nn.Linear(8, 6)))
    check_no_folds(model, mode, [(3, 8, 8)])


def test_fx_folds_batchnorm1d_only_where_the_graph_shows_the_rank():
    bare = prepare(ConvBN(nn.Linear(8, 6), nn.BatchNorm1d(6)))
    plan = fusedconv.plan(bare)
    assert plan.num_folded == 0
    assert "example_inputs" in plan.skipped[0].reason
    assert fusedconv.plan(bare, (torch.randn(3, 8),)).num_folded == 1

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8 * 2 * 2, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.fc(torch.flatten(x, 1)))

    head = prepare(Head())
    assert fusedconv.plan(head).folds == [fusedconv.Fold("fc", after=("bn",))]
    assert_accuracy(head, fusedconv.fuse(head), (torch.randn(5, 8, 2, 2),))


@pytest.mark.parametrize("mode", MODES)
def test_unbatched_conv1d_then_bn1d_not_folded(mode):
    # Conv1d on unbatched (C, L) input gives (C_out, L); BatchNorm1d then treats
    # C_out as the batch and normalises L (here L == C_out).
    model = prepare(ConvBN(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)))
    check_no_folds(model, mode, [(4, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_bn_without_running_stats_skipped_with_warning(mode):
    model = prepare(ConvBN(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)))
    with pytest.warns(fusedconv.FoldWarning, match=r"\bbn\b"):
        check_no_folds(model, mode, [(2, 4, 6, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_conv_with_tied_weight_not_folded(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
            self.conv2.weight = self.conv1.weight

        def forward(self, x):
            return self.bn(self.conv1(x)) + self.conv2(x)

    model = prepare(Net())
    fused, _ = check_no_folds(model, mode, [(2, 4, 6, 6)])
    assert fused.conv1.weight is fused.conv2.weight


def _hook_conv(kind):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    if kind == "forward_hook":
        conv.register_forward_hook(lambda m, inp, out: out + 0.5)
    elif kind == "forward_pre_hook":
        conv.register_forward_pre_hook(lambda m, inp: (inp[0] * 2.0,))
    elif kind == "parametrize":
        class Half(nn.Module):
            def forward(self, w):
                return w.tanh()

        parametrize.register_parametrization(conv, "weight", Half())
    elif kind == "weight_norm":
        conv = torch.nn.utils.parametrizations.weight_norm(conv)
    elif kind == "legacy_weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv = torch.nn.utils.weight_norm(conv)
    elif kind == "prune":
        prune.l1_unstructured(conv, "weight", amount=0.4)
    else:
        raise AssertionError(kind)
    return conv


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook", "parametrize", "weight_norm",
                                  "legacy_weight_norm", "prune"])
def test_conv_with_hook_or_parametrization_left_alone(mode, kind):
    model = prepare(ConvBN(_hook_conv(kind), nn.BatchNorm2d(6)))
    before = copy.deepcopy(model.state_dict())
    if mode != "run" and kind in ("legacy_weight_norm", "prune"):
        # Until a forward runs, these keep a non-leaf weight tensor that
        # copy.deepcopy refuses: no copy can be made, and fusedconv says so
        # (inplace=True works: next test).
        assert fusedconv.plan(model).folds == []
        with pytest.raises(fusedconv.FoldError, match=r"cannot copy ConvBN.*inplace=True"):
            fusedconv.fuse(model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    check_no_folds(model, mode, [(2, 4, 6, 6)])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["forward_hook", "parametrize", "legacy_weight_norm", "prune"])
def test_conv_with_hook_or_parametrization_left_alone_inplace(mode, kind):
    model = prepare(ConvBN(_hook_conv(kind), nn.BatchNorm2d(6)))
    x = inputs_for([(2, 4, 6, 6)], seed=7)
    with torch.no_grad():
        expected = model(*x)
    layer, bn = model.layer, model.bn
    fused = fusedconv.fuse(model, example_for(mode, [(2, 4, 6, 6)]), inplace=True)
    assert fused is model and fused.layer is layer and fused.bn is bn
    with torch.no_grad():
        torch.testing.assert_close(fused(*x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_bn_with_forward_hook_left_alone(mode):
    bn = nn.BatchNorm2d(6)
    bn.register_forward_hook(lambda m, inp, out: out * inp[0].sign())
    check_no_folds(prepare(ConvBN(nn.Conv2d(4, 6, 3), bn)), mode, [(2, 4, 6, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_conv_subclass_with_custom_forward_left_alone(mode):
    class WSConv2d(nn.Conv2d):
        """weight standardisation: scaling the weight does not scale the output"""

        def forward(self, x):
            w = self.weight
            w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    model = prepare(ConvBN(WSConv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)))
    check_no_folds(model, mode, [(2, 4, 6, 6)])


@pytest.mark.parametrize("mode", MODES)
def test_functional_batch_norm_with_module_buffers_not_corrupted(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            bn = self.bn
            return F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                False, 0.0, bn.eps)

    # The functional call cannot be removed from forward, so folding the conv
    # would apply the BN twice; replacing self.bn would break forward. Left alone.
    fused, plan = check_no_folds(prepare(Net()), mode, [(2, 4, 6, 6)])
    assert fused.bn.running_mean is not None


@pytest.mark.parametrize("mode", MODES)
def test_bn_module_called_twice_not_folded(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(4, 6, 3, padding=1)
            self.conv_b = nn.Conv2d(4, 6, 1)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            return self.bn(self.conv_a(x)) - self.bn(self.conv_b(x))

    check_no_folds(prepare(Net()), mode, [(2, 4, 6, 6)])


# ---------------------------------------------------------------------------
# models torch.fx cannot trace
# ---------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        if y.sum() > 0:  # data-dependent control flow: fx cannot trace this
            y = y * 2.0
        else:
            y = y - 1.0
        return self.bn2(self.conv2(y))


def test_untraceable_model_folds_with_example_inputs():
    model = prepare(DataDependent())
    check_folds(model, "run", [(2, 4, 6, 6)], {"conv1": ((), ("bn1",)), "conv2": ((), ("bn2",))})
    # both branches of the `if` give the right result
    fused = fusedconv.fuse(model, inputs_for([(2, 4, 6, 6)], seed=100))
    for seed in range(4):
        assert_accuracy(model, fused, inputs_for([(2, 4, 6, 6)], seed=seed))


def test_untraceable_model_folds_from_its_source_without_example_inputs():
    # fx cannot trace the data-dependent branch, but the pairs are plain in the code.
    model = prepare(DataDependent())
    fused, plan = check_folds(model, "source", [(2, 4, 6, 6)],
                              {"conv1": ((), ("bn1",)), "conv2": ((), ("bn2",))})
    assert plan.source == "source"


class DataDependentByName(DataDependent):
    """Untraceable, and reaches its layers through getattr: neither the code
    reading nor torch.fx can vouch for them."""

    def forward(self, x):
        y = getattr(self, "bn1")(self.conv1(x))
        if y.sum() > 0:
            y = y * 2.0
        return self.bn2(self.conv2(y))


@pytest.mark.parametrize("model_class", [DataDependent, DataDependentByName])
def test_untraceable_unreadable_model_without_example_inputs_raises(model_class, monkeypatch):
    # Nothing could be folded, so the library says so with a FoldError naming
    # the forward and pointing at example_inputs.
    if model_class is DataDependent:
        trace_only(monkeypatch)
    model = prepare(model_class())
    before = copy.deepcopy(model.state_dict())
    for call in (fusedconv.fuse, fusedconv.plan):
        with pytest.raises(fusedconv.FoldError, match=rf"{model_class.__name__}\.forward.*example_inputs"):
            call(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.bn2, nn.BatchNorm2d)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(4)
        self.inner = DataDependent(4)
        self.head = nn.Conv2d(4, 5, 1)
        self.head_bn = nn.BatchNorm2d(5)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.inner(x)
        return self.head_bn(self.head(x))


def test_untraceable_submodule_folds_from_its_source():
    model = prepare(Outer())
    _, plan = check_folds(model, "source", [(2, 3, 6, 6)],
                          {"stem": ((), ("stem_bn",)), "head": ((), ("head_bn",)),
                           "inner.conv1": ((), ("inner.bn1",)), "inner.conv2": ((), ("inner.bn2",))})
    assert plan.source == "source"


def test_untraceable_submodule_rest_folds_with_torch_fx(monkeypatch):
    trace_only(monkeypatch)
    model = prepare(Outer())
    with pytest.warns(fusedconv.FoldWarning, match=r"\binner\b"):
        fused, plan = check_folds(model, "fx", [(2, 3, 6, 6)],
                                  {"stem": ((), ("stem_bn",)), "head": ((), ("head_bn",))})
    reasons = {s.module: s.reason for s in plan.skipped}
    assert "inner" in reasons["inner.bn1"] and "inner" in reasons["inner.bn2"]
    assert isinstance(fused.inner.bn1, nn.BatchNorm2d) and isinstance(fused.inner.bn2, nn.BatchNorm2d)


def test_untraceable_submodule_everything_folds_with_example_inputs():
    model = prepare(Outer())
    check_folds(model, "run", [(2, 3, 6, 6)], {
        "stem": ((), ("stem_bn",)), "head": ((), ("head_bn",)),
        "inner.conv1": ((), ("inner.bn1",)), "inner.conv2": ((), ("inner.bn2",)),
    })


# ---------------------------------------------------------------------------
# the module tree after folding
# ---------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


class TreeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.ModuleList([Block(4), Block(4)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 6)
        self.fc_bn = nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.fc_bn(self.fc(self.pool(x).flatten(1)))


TREE_FOLDS = {
    "stem.0": ((), ("stem.1",)),
    "blocks.0.conv1": ((), ("blocks.0.bn1",)), "blocks.0.conv2": ((), ("blocks.0.bn2",)),
    "blocks.1.conv1": ((), ("blocks.1.bn1",)), "blocks.1.conv2": ((), ("blocks.1.bn2",)),
    "fc": ((), ("fc_bn",)),
}


def _expected_folded(layer: nn.Module, bn: nn.Module):
    """W * s and b * s + t computed here in float64, rounded once."""
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    t = bn.bias.double() - bn.running_mean.double() * s
    w = (layer.weight.double() * s.view(-1, *([1] * (layer.weight.dim() - 1)))).to(layer.weight.dtype)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(s)
    return w, (b * s + t).to(layer.weight.dtype)


@pytest.mark.parametrize("mode", MODES)
def test_module_tree_and_state_dict_after_folding(mode):
    model = prepare(TreeNet())
    fused, _ = check_folds(model, mode, [(2, 3, 9, 9)], TREE_FOLDS, rank_visible_to_fx=True)
    assert type(fused) is TreeNet
    names_before = [n for n, _ in model.named_modules()]
    assert [n for n, _ in fused.named_modules()] == names_before
    folded_bns = {b for _, after in TREE_FOLDS.values() for b in after}
    for name, m in model.named_modules():
        new = fused.get_submodule(name)
        if name in folded_bns:
            assert type(new) is nn.Identity, name
        else:
            assert type(new) is type(m), name
    assert type(fused.stem) is nn.Sequential and len(fused.stem) == 3
    assert type(fused.blocks) is nn.ModuleList

    sd = fused.state_dict()
    for bn in folded_bns:
        assert not [k for k in sd if k.startswith(bn + ".")], f"{bn} still in state_dict"
    for layer_name, (_, (bn_name,)) in TREE_FOLDS.items():
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        w, b = _expected_folded(layer, bn)
        # weights and biases: computed in float64 and rounded once (fusedconv/fold.py), bit for bit
        assert torch.equal(sd[layer_name + ".weight"], w), layer_name
        assert torch.equal(sd[layer_name + ".bias"], b), layer_name
        lw, lb = fusedconv.folded_weights(layer, after=(bn,))
        assert torch.equal(lw, w), layer_name
        assert torch.equal(lb, b), layer_name
    # the folded state_dict loads into a fresh copy of the fused structure
    clone = copy.deepcopy(fused)
    for p in clone.parameters():
        p.data.zero_()
    clone.load_state_dict(sd, strict=True)
    x = inputs_for([(2, 3, 9, 9)], seed=11)
    with torch.no_grad():
        assert torch.equal(clone(*x), fused(*x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", [False, True])
def test_replacements_keep_eval_mode(mode, inplace):
    # the Identity (or timm activation) that replaces a BN keeps the model's eval mode
    from timm.layers import BatchNormAct2d

    model = prepare(TreeNet())
    model.blocks[1].bn2 = prepare(BatchNormAct2d(4, act_layer=nn.ReLU), seed=2)
    flags = {n: m.training for n, m in model.named_modules()}
    assert not any(flags.values())
    fused = fusedconv.fuse(model, example_for(mode, [(2, 3, 9, 9)]), inplace=inplace)
    assert fusedconv.count_batchnorms(fused) == 0
    training = [n for n, m in fused.named_modules() if m.training]
    assert training == [], f"modules in training mode after folding an eval model: {training}"


@pytest.mark.parametrize("mode", MODES)
def test_bn_registered_at_two_paths_replaced_at_both(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3)
            self.bn = nn.BatchNorm2d(6)
            self.seq = nn.Sequential(self.bn)  # same module object, second path

        def forward(self, x):
            return self.bn(self.conv(x))

    model = prepare(Net())
    example = example_for(mode, [(2, 4, 6, 6)])
    plan = fusedconv.plan(model, example)
    # A module registered at two paths is one the code reading leaves unproven.
    assert plan.source == expected_source(mode, "torch.fx"), str(plan)
    assert len(plan.folds) == 1 and plan.folds[0].layer == "conv"
    assert plan.folds[0].after in (("bn",), ("seq.0",))
    fused = fusedconv.fuse(model, example)
    assert isinstance(fused.bn, nn.Identity) and isinstance(fused.seq[0], nn.Identity)
    assert_accuracy(model, fused, inputs_for([(2, 4, 6, 6)], seed=7))


@pytest.mark.parametrize("mode", MODES)
def test_fuse_with_existing_plan(mode):
    model = prepare(TreeNet())
    example = example_for(mode, [(2, 3, 9, 9)])
    plan = fusedconv.plan(model, example)
    # TreeNet's fc_bn is a BatchNorm1d, whose input rank only the fx graph shows.
    assert plan.source == expected_source(mode, "torch.fx"), str(plan)
    fused = fusedconv.fuse(model, plan=plan)
    assert fusedconv.count_batchnorms(fused) == 0
    assert bn_like_names(model) == bn_like_names(TreeNet())
    assert_accuracy(model, fused, inputs_for([(2, 3, 9, 9)], seed=7))
