"""LargeKernelConv (RepLKNet), DilatedReparamBlock (UniRepLKNet) and ImplicitConv (YOLOv7).

Every test that compares outputs uses the accuracy rule of
:func:`block_checks.assert_as_accurate` (through
:func:`block_checks.assert_deploys_exactly`): against a float64 reference of
the *branched* eval-mode block, the deployed block's relative error is at most
``max(MAX_RATIO * err(branched block, same dtype), ERROR_FLOOR[dtype])``, on
inputs sized by :func:`block_checks.input_shape` (at least MIN_OUTPUT_VALUES
output values); the block_checks module doc gives the measurements behind
both. float16/bfloat16 run the fixed HALF_CASES.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from block_checks import (
    DEVICE,
    PROPERTY,
    assert_as_accurate,
    assert_deploys_exactly,
    assert_deploys_in_place,
    assert_gradients_reach_every_parameter,
    assert_merge_fails_unchanged,
    assert_registry_deploys_model,
    assert_reparameterize_is_idempotent,
    assert_training_mode_refused,
    block_input,
    channel_layouts,
    main_conv,
    make_block,
    perturbed,
    random_input,
)
from fusedconv.blocks.implicit import ImplicitA, ImplicitConv, ImplicitM, implicit_reparameterization
from fusedconv.blocks.replknet import UNIREPLKNET_SMALL_KERNELS, DilatedReparamBlock, LargeKernelConv
from fusedconv.errors import FoldError
from fusedconv import registry
from fusedconv import reparameterize
from fusedconv.registry import register_block
from fusedconv.reparam import check_reparameterization
from utils import float64_reference

pytestmark = pytest.mark.usefixtures("one_thread")


# -- configurations ---------------------------------------------------------------------------


@st.composite
def large_kernel_geometries(draw) -> dict:
    """Odd kernels 1..31 in 1d/2d, 1..7 in 3d (3d maps grow with the cube of
    the kernel's reach); stride 1, 2; dilation 1..3 (1..2 in 3d)."""
    dims = draw(st.sampled_from([1, 2, 3]))
    return dict(
        dims=dims,
        kernel_size=draw(st.integers(0, 3 if dims == 3 else 15)) * 2 + 1,
        stride=draw(st.sampled_from([1, 2])),
        dilation=draw(st.integers(1, 2 if dims == 3 else 3)),
        **draw(channel_layouts()),
    )


def covering_spatial(draw, dims: int, reach: int) -> tuple[int, ...]:
    """Input sizes at which every tap within ``reach`` input positions of the
    window's centre reads real input for some output (with stride <= 2)."""
    return tuple(reach + 2 + draw(st.integers(0, 1)) for _ in range(dims))


@st.composite
def large_kernel_configurations(draw) -> tuple[dict, tuple[int, ...]]:
    kwargs = draw(large_kernel_geometries())
    kwargs["small_kernel"] = draw(st.integers(0, kwargs["kernel_size"] // 2)) * 2 + 1
    reach = kwargs["dilation"] * (kwargs["small_kernel"] - 1) // 2  # the merge only moves the small kernel
    return kwargs, covering_spatial(draw, kwargs["dims"], reach)


@st.composite
def dilated_branches(draw, kernel_size: int) -> list[tuple[int, int]]:
    """Up to 4 (kernel_size, dilation) pairs, dilation 1..5, each fitting and centred in the large kernel."""
    pairs = []
    for _ in range(draw(st.integers(0, 4))):
        dilation = draw(st.integers(1, 5))
        fitting = [k for k in range(1, (kernel_size - 1) // dilation + 2)
                   if (kernel_size - 1 - dilation * (k - 1)) % 2 == 0]
        pairs.append((draw(st.sampled_from(fitting)), dilation))
    return pairs


@st.composite
def dilated_configurations(draw) -> tuple[dict, tuple[int, ...]]:
    kwargs = draw(large_kernel_geometries())
    kwargs["small_kernels"] = draw(dilated_branches(kwargs["kernel_size"]))
    reach = max((r * (k - 1) for k, r in kwargs["small_kernels"]), default=0) * kwargs["dilation"] // 2
    return kwargs, covering_spatial(draw, kwargs["dims"], reach)


@st.composite
def implicit_configurations(draw) -> tuple[dict, tuple[int, ...]]:
    """Kernels 1..31 (1..7 in 3d), with no padding or with a padding mode that copies
    input values; the input covers the whole kernel so that ImplicitA's shift meets every tap."""
    kwargs = draw(large_kernel_geometries())
    kwargs["bias"] = draw(st.booleans())
    if draw(st.booleans()):
        kwargs["padding"] = 0
    else:
        kwargs["padding_mode"] = draw(st.sampled_from(["reflect", "replicate", "circular"]))
    extent = kwargs["dilation"] * (kwargs["kernel_size"] - 1) + 1
    return kwargs, tuple(extent + draw(st.integers(0, 2)) for _ in range(kwargs["dims"]))


# -- outputs match ----------------------------------------------------------------------------

FLOAT_DTYPES = st.sampled_from([torch.float32, torch.float64])


# assert_deploys_exactly checks that the deployed conv keeps the geometry
# (kernel, stride, padding, dilation, groups, padding_mode) of the large conv
# (LargeKernelConv, DilatedReparamBlock) or of the conv (ImplicitConv).


@PROPERTY
@given(config=large_kernel_configurations(), dtype=FLOAT_DTYPES, seed=st.integers(0, 2**16))
def test_large_kernel_conv_deploys_exactly(config, dtype, seed):
    kwargs, spatial = config
    block = make_block(LargeKernelConv, dtype=dtype, seed=seed, **kwargs)
    assert_deploys_exactly(block, block_input(kwargs, spatial, seed), block.large.conv)


@PROPERTY
@given(config=dilated_configurations(), dtype=FLOAT_DTYPES, seed=st.integers(0, 2**16))
def test_dilated_reparam_block_deploys_exactly(config, dtype, seed):
    kwargs, spatial = config
    block = make_block(DilatedReparamBlock, dtype=dtype, seed=seed, **kwargs)
    assert_deploys_exactly(block, block_input(kwargs, spatial, seed), block.large.conv)


@PROPERTY
@given(config=implicit_configurations(), dtype=FLOAT_DTYPES, seed=st.integers(0, 2**16))
def test_implicit_conv_deploys_exactly(config, dtype, seed):
    kwargs, spatial = config
    block = make_block(ImplicitConv, dtype=dtype, seed=seed, **kwargs)
    assert_deploys_exactly(block, block_input(kwargs, spatial, seed), block.conv)


@pytest.mark.parametrize("kernel_size", sorted(UNIREPLKNET_SMALL_KERNELS))
def test_unireplknet_default_branches_deploy_exactly(kernel_size):
    # UniRepLKNet's own layout: depthwise, stride 1, its pairs for this kernel size.
    kwargs = dict(in_channels=3, out_channels=3, kernel_size=kernel_size, groups=3)
    block = make_block(DilatedReparamBlock, seed=kernel_size, **kwargs)
    assert block.small_kernels == UNIREPLKNET_SMALL_KERNELS[kernel_size]
    assert_deploys_exactly(block, block_input(kwargs, (kernel_size // 2 + 2,) * 2, kernel_size))


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        # Even kernels whose windows share a centre (same parity).
        (LargeKernelConv, dict(kernel_size=6, small_kernel=2)),
        (LargeKernelConv, dict(kernel_size=4)),  # small_kernel defaults to the kernel itself
        (DilatedReparamBlock, dict(kernel_size=8, small_kernels=[(4, 1), (2, 3), (2, 5)])),
        # Padding beyond "same": the output grows, the small windows stay centred.
        (LargeKernelConv, dict(kernel_size=7, small_kernel=3, padding=5, stride=2)),
        (DilatedReparamBlock, dict(kernel_size=9, small_kernels=[(3, 2), (5, 1)], padding=6, dilation=2)),
        # Padding below "same": the small kernels still need no cropping.
        (LargeKernelConv, dict(kernel_size=9, small_kernel=3, padding=3)),
        (DilatedReparamBlock, dict(kernel_size=7, small_kernels=[(3, 2), (3, 1)], padding=2)),
        (ImplicitConv, dict(kernel_size=3, padding=2, padding_mode="reflect", stride=2)),
        (ImplicitConv, dict(kernel_size=4, padding=0, dilation=2)),
        # The largest kernels, with branches reaching its edge (the input covers all 31 taps).
        (LargeKernelConv, dict(kernel_size=31, small_kernel=29, stride=2)),
        (DilatedReparamBlock, dict(kernel_size=31, small_kernels=[(5, 1), (11, 3), (3, 15), (16, 2)])),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else str(value),
)
def test_non_default_kernels_and_paddings_deploy_exactly(cls, kwargs):
    kwargs = dict(in_channels=4, out_channels=6, groups=2, **kwargs)
    for seed in range(3):
        block = make_block(cls, seed=seed, **kwargs)
        assert_deploys_exactly(block, block_input(kwargs, (17, 16), seed))


HALF_CASES = [
    (LargeKernelConv, dict(dims=1, in_channels=4, out_channels=6, kernel_size=31, small_kernel=5, stride=2, groups=2)),
    (LargeKernelConv, dict(dims=2, in_channels=4, out_channels=4, kernel_size=13, small_kernel=5, groups=4)),
    (DilatedReparamBlock, dict(dims=2, in_channels=4, out_channels=4, kernel_size=13, groups=4)),
    (DilatedReparamBlock, dict(dims=3, in_channels=2, out_channels=4, kernel_size=5, stride=2, groups=2)),
    (ImplicitConv, dict(dims=2, in_channels=3, out_channels=5, kernel_size=1)),
    (ImplicitConv, dict(dims=2, in_channels=4, out_channels=4, kernel_size=5, groups=2, padding_mode="replicate")),
]


@pytest.mark.parametrize("cls, kwargs", HALF_CASES,
                         ids=[f"{c.__name__}-{k['dims']}d-k{k['kernel_size']}" for c, k in HALF_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_blocks_deploy_within_tolerance(cls, kwargs, dtype):
    spatial = (kwargs["kernel_size"] // 2 + 3,) * kwargs["dims"]
    for seed in range(3):
        block = make_block(cls, dtype=dtype, seed=seed, **kwargs)
        assert_deploys_exactly(block, block_input(kwargs, spatial, seed))


# -- what deploying does to the block ---------------------------------------------------------

CONTRACT_CASES = [
    (LargeKernelConv, dict(kernel_size=7, small_kernel=3), "large.conv"),
    (DilatedReparamBlock, dict(kernel_size=7), "large.conv"),
    (ImplicitConv, dict(kernel_size=3, padding_mode="circular"), "conv"),
]
CONTRACT_IDS = [c.__name__ for c, _, _ in CONTRACT_CASES]


@pytest.mark.parametrize("cls, kwargs, target", CONTRACT_CASES, ids=CONTRACT_IDS)
def test_deployed_block_holds_only_its_conv(cls, kwargs, target):
    kwargs = dict(in_channels=4, out_channels=4, stride=2, groups=2, activation=nn.PReLU(4), **kwargs)
    block = make_block(cls, dtype=torch.float64, seed=5, **kwargs)
    assert main_conv(block) is block.get_submodule(target)
    # In place: the conv that held the large kernel becomes the deployed conv.
    assert_deploys_in_place(block, block_input(kwargs, (9, 8), 5))
    assert not any(isinstance(m, (_BatchNorm, ImplicitA, ImplicitM)) for m in block.modules())
    assert set(block.state_dict()) == {"deployed_conv.weight", "deployed_conv.bias", "activation.weight"}


@pytest.mark.parametrize("cls, kwargs, target", CONTRACT_CASES, ids=CONTRACT_IDS)
def test_reparameterize_twice_is_harmless(cls, kwargs, target):
    assert_reparameterize_is_idempotent(make_block(cls, seed=6, in_channels=3, out_channels=3, **kwargs).reparameterize())


@pytest.mark.parametrize("cls, kwargs, target", CONTRACT_CASES, ids=CONTRACT_IDS)
def test_training_mode_is_refused(cls, kwargs, target):
    assert_training_mode_refused(make_block(cls, in_channels=2, out_channels=2, **kwargs).train())


@pytest.mark.parametrize("cls, kwargs, target", CONTRACT_CASES, ids=CONTRACT_IDS)
def test_gradients_reach_every_parameter(cls, kwargs, target):
    block = make_block(cls, seed=11, in_channels=4, out_channels=4, groups=2, **kwargs)
    assert_gradients_reach_every_parameter(block, torch.randn(2, 4, 8, 8, device=DEVICE))


@pytest.mark.parametrize("broken", ["large.bn", "small.0.bn", "small.3.bn"])
def test_failed_merge_leaves_the_block_unchanged(broken):
    cls = LargeKernelConv if broken == "small.0.bn" else DilatedReparamBlock
    block = make_block(cls, seed=7, in_channels=4, out_channels=4, kernel_size=9, groups=2)
    with torch.no_grad():
        block.get_submodule(broken).running_var[1] = float("nan")
    label = broken.removesuffix(".bn")  # the merge names a branch's BN after the branch
    assert_merge_fails_unchanged(block, f"{cls.__name__}.{label} BatchNorm: running_var is not finite")


def test_implicit_conv_zero_padded_after_construction_is_refused_unchanged():
    # Built valid, then its conv altered to zero-pad: the merge itself must refuse, touching nothing.
    block = make_block(ImplicitConv, seed=8, in_channels=3, out_channels=3, kernel_size=3, padding=0)
    block.conv.padding = (1, 1)
    assert_merge_fails_unchanged(block, "pads its input with zeros")


MEMORY_FORMAT_CASES = [
    (LargeKernelConv, dict(kernel_size=9, small_kernel=3)),
    (DilatedReparamBlock, dict(kernel_size=7)),
    (ImplicitConv, dict(kernel_size=3, padding=0)),
]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("cls, kwargs", MEMORY_FORMAT_CASES, ids=[c.__name__ for c, _ in MEMORY_FORMAT_CASES])
def test_dtype_device_and_memory_format_are_kept(cls, kwargs, dims):
    kwargs = dict(in_channels=4, out_channels=8, stride=2, groups=4, dims=dims, **kwargs)
    memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
    block = make_block(cls, seed=8, **kwargs).to(memory_format=memory_format)
    deployed = assert_deploys_exactly(block, block_input(kwargs, (6,) * dims, 8))
    weight = deployed.deployed_conv.weight
    assert weight.is_contiguous(memory_format=memory_format)
    assert weight.dtype == deployed.deployed_conv.bias.dtype == torch.float32
    assert weight.device.type == DEVICE


def test_registry_merges_every_block_of_a_model_all_or_nothing():
    def build_model():
        return perturbed(nn.Sequential(
            ImplicitConv(3, 6, 1, activation=nn.SiLU()),
            LargeKernelConv(6, 6, 13, groups=6, activation=nn.ReLU()),
            DilatedReparamBlock(6, 6, 9, stride=2, groups=3),
        ), seed=9)

    broken = build_model()
    with torch.no_grad():
        broken[2].small[1].bn.running_var[0] = -1.0
    with pytest.raises(FoldError, match="running_var is negative"):
        reparameterize(broken)
    assert not any(block.deployed for block in broken)  # the blocks before the bad one were not merged

    model = build_model()
    assert_registry_deploys_model(model, random_input((2, 3, 12, 12), torch.float32,
                                                      torch.Generator().manual_seed(10), DEVICE))
    assert not any(isinstance(m, (ImplicitA, ImplicitM)) for m in model.modules())


# -- construction -----------------------------------------------------------------------------


def test_branch_layouts_follow_the_papers():
    replk = LargeKernelConv(8, 8, 31, groups=8)
    assert replk.branch_names == ("large", "small")
    assert replk.small_kernels == ((5, 1),)  # RepLKNet's small kernel
    small = replk.small[0].conv
    assert (small.kernel_size, small.padding, small.groups) == ((5, 5), (2, 2), 8)
    assert LargeKernelConv(2, 2, 3).small_kernels == ((3, 1),)  # 5 does not fit: the kernel itself

    dilated = DilatedReparamBlock(4, 4, 13, dilation=2, groups=4, dims=1)
    assert dilated.small_kernels == ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5))
    # Each branch's dilation is in large-kernel taps: times the block's dilation 2 for the conv.
    assert [(b.conv.kernel_size, b.conv.dilation, b.conv.padding) for b in dilated.small] == [
        ((5,), (2,), (4,)), ((7,), (4,), (12,)), ((3,), (6,), (6,)), ((3,), (8,), (8,)), ((3,), (10,), (10,))]
    assert DilatedReparamBlock(4, 4, 31, small_kernels=[]).small_kernels == ()


@pytest.mark.parametrize(
    "cls, kwargs, error, message",
    [
        (LargeKernelConv, dict(kernel_size=5, small_kernel=7), FoldError,
         "the small kernel 7 with dilation 1 cannot be merged into the block's main conv: .* reaches outside "
         "the merged kernel of 5 taps"),
        (LargeKernelConv, dict(kernel_size=6), FoldError, "small kernel 5 .* is not centred like the merged conv"),
        (LargeKernelConv, dict(kernel_size=7, small_kernel=3, padding=1), FoldError,
         "padding=1 leaves the small kernel 3 with dilation 1 a padding of -1: it would have to crop its input"),
        (LargeKernelConv, dict(kernel_size=7, small_kernel=0), ValueError, "small kernel_size must be a positive int"),
        (DilatedReparamBlock, dict(kernel_size=7, small_kernels=[(3, 1), (5, 2)]), FoldError,
         "the small kernel 5 with dilation 2 cannot be merged .* kernel of 5 taps \\(dilation 2\\) reaches outside"),
        (DilatedReparamBlock, dict(kernel_size=7, small_kernels=[(2, 1)]), FoldError, "is not centred"),
        # Dilation 2: the 2-tap kernel is centred, but its taps fall between the large kernel's.
        (DilatedReparamBlock, dict(kernel_size=7, dilation=2, small_kernels=[(2, 1)]), FoldError,
         "fall between the merged conv's taps"),
        (DilatedReparamBlock, dict(kernel_size=7, small_kernels=[(3, 0)]), ValueError,
         "small kernel dilation must be a positive int"),
        (DilatedReparamBlock, dict(kernel_size=7, small_kernels=[(3,)]), ValueError,
         r"\(kernel_size, dilation\) pairs, got \(3,\)"),
        (DilatedReparamBlock, dict(kernel_size=19), ValueError,
         "UniRepLKNet defines small kernels for kernel_size in .* not 19: pass small_kernels"),
        (LargeKernelConv, dict(kernel_size=3, groups=4), ValueError, "groups=4 must divide in_channels=4 and out"),
        (DilatedReparamBlock, dict(kernel_size=5, dims=4), ValueError, "dims must be 1, 2 or 3"),
        (LargeKernelConv, dict(kernel_size=(3, 3)), ValueError, r"kernel_size .*must be a positive int, got \(3, 3\)"),
        (ImplicitConv, dict(kernel_size=3, stride=0), ValueError, "stride .*must be a positive int, got 0"),
        (ImplicitConv, dict(kernel_size=3), FoldError,
         r"zero-pads its input \(padding=1\): ImplicitA's shift added before zero padding is not a constant bias"),
        (ImplicitConv, dict(kernel_size=1, padding=2), FoldError, r"zero-pads its input \(padding=2\)"),
        (ImplicitConv, dict(kernel_size=1, padding_mode="mirror"), ValueError, "padding_mode must be one of"),
        (ImplicitConv, dict(kernel_size=1, padding=-1), ValueError, "padding must be a non-negative int"),
    ],
)
def test_configurations_that_cannot_merge_are_rejected_when_built(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(in_channels=4, out_channels=6, **kwargs)


# -- ImplicitA / ImplicitM on their own (YOLOv7's IDetect) ------------------------------------


def test_implicit_layers_compute_and_store_what_yolov7_does():
    add, multiply = ImplicitA(5), ImplicitM(5)
    # YOLOv7's parameter name and shape, so its checkpoints load; init N(0, .02) and N(1, .02).
    assert add.implicit.shape == multiply.implicit.shape == (1, 5, 1, 1)
    assert abs(float(add.implicit.detach().mean())) < 0.1 and abs(float(multiply.implicit.detach().mean()) - 1) < 0.1
    assert ImplicitA(5, dims=3).implicit.shape == (1, 5, 1, 1, 1)
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(add(x), x + add.implicit.view(1, 5, 1, 1), rtol=0, atol=0)
    torch.testing.assert_close(multiply(x), x * multiply.implicit.view(1, 5, 1, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        ImplicitM(0)


class IDetectLikeHead(nn.Module):
    """YOLOv7's IDetect pattern: per level ImplicitA -> 1x1 conv -> ImplicitM."""

    def __init__(self, channels=(3, 5), outputs=4):
        super().__init__()
        self.ia = nn.ModuleList(ImplicitA(c) for c in channels)
        self.m = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in channels)
        self.im = nn.ModuleList(ImplicitM(outputs) for _ in channels)

    def forward(self, features):
        return [im(m(ia(x))) for ia, m, im, x in zip(self.ia, self.m, self.im, features)]


def _merge_idetect_like_head(head: IDetectLikeHead, name: str):
    def install_level(i):
        def install(conv):
            head.ia[i], head.im[i] = nn.Identity(), nn.Identity()
        return install

    return [implicit_reparameterization(f"{name}.m.{i}", head.m[i], install_level(i), head.ia[i], head.im[i])
            for i in range(len(head.m))]


@pytest.fixture
def idetect_like_head_registered():
    """The converter is registered for this test only (the registry is global)."""
    register_block(IDetectLikeHead)(_merge_idetect_like_head)
    yield
    registry._CONVERTERS.pop(IDetectLikeHead)


@pytest.mark.usefixtures("idetect_like_head_registered")
def test_standalone_implicit_layers_merge_through_a_registered_converter():
    head = make_block(IDetectLikeHead, seed=12)
    generator = torch.Generator().manual_seed(13)
    features = [random_input((2, c, 5, 4), torch.float32, generator, DEVICE) for c in (3, 5)]
    reference = float64_reference(head, (features,))
    with torch.no_grad():
        branched = head(features)
        reparameterize(nn.Sequential(head))
        assert_as_accurate(head(features), branched, reference, torch.float32)
    assert not any(isinstance(m, (ImplicitA, ImplicitM)) for m in head.modules())


def test_standalone_implicit_add_before_a_zero_padded_conv_is_refused():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    plan = implicit_reparameterization("head", conv, lambda c: None, implicit_add=ImplicitA(3))
    with pytest.raises(FoldError, match="head: the conv pads its input with zeros"):
        check_reparameterization(plan)
