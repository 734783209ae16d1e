"""DiverseBranchBlock (DBB) and OREPABlock: trained with branches, deployed as one conv.

Every test that compares outputs uses the accuracy rule of
:func:`block_checks.assert_as_accurate` (through
:func:`block_checks.assert_deploys_exactly`): against a float64 reference of
the *branched* eval-mode block, the deployed block's relative error is at most
``max(MAX_RATIO * err(branched block, same dtype), ERROR_FLOOR[dtype])``; the
block_checks module doc gives the measurements behind both.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from block_checks import (
    DEVICE,
    PROPERTY,
    assert_deploys_exactly,
    assert_deploys_in_place,
    assert_gradients_reach_every_parameter,
    assert_merge_fails_unchanged,
    assert_registry_deploys_model,
    assert_reparameterize_is_idempotent,
    assert_training_mode_refused,
    block_input,
    channel_layouts,
    make_block,
    perturbed,
    random_input,
)
import fusedconv
from fusedconv.blocks.dbb import (
    BatchNormAndPad,
    DiverseBranchBlock,
    IdentityBasedConv1x1,
    average_pool_kernel,
    compose_pointwise_then_kxk,
)
from fusedconv.blocks.orepa import OREPABlock
from fusedconv.errors import FoldError
from utils import randomize_batchnorm_stats, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = (DiverseBranchBlock, OREPABlock)


@st.composite
def block_configurations(draw) -> tuple[dict, tuple[int, ...]]:
    """Constructor arguments and an input size. 3d kernels stop at 9 to keep the
    padded 3d maps tiny; 1d and 2d go up to 31."""
    dims = draw(st.sampled_from([1, 2, 3]))
    kwargs = dict(
        dims=dims,
        kernel_size=draw(st.integers(0, 4 if dims == 3 else 15)) * 2 + 1,
        stride=draw(st.sampled_from([1, 2])),
        dilation=draw(st.sampled_from([1, 2, 3])),
        **draw(channel_layouts()),
    )
    spatial = tuple(draw(st.integers(3, 6)) for _ in range(dims))
    return kwargs, spatial


@pytest.mark.parametrize("cls", BLOCKS, ids=lambda c: c.__name__)
@PROPERTY
@given(config=block_configurations(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_deployed_block_matches_the_branched_block(cls, config, dtype, seed):
    kwargs, spatial = config
    block = make_block(cls, dtype=dtype, seed=seed, **kwargs)
    deployed = assert_deploys_exactly(block, block_input(kwargs, spatial, seed))
    conv = deployed.deployed_conv
    assert (conv.kernel_size, conv.stride, conv.dilation, conv.groups) == (
        (kwargs["kernel_size"],) * kwargs["dims"], (kwargs["stride"],) * kwargs["dims"],
        (kwargs["dilation"],) * kwargs["dims"], kwargs["groups"])


HALF_CASES = [
    dict(dims=1, in_channels=4, out_channels=6, kernel_size=31, stride=2, dilation=1, groups=2),
    dict(dims=2, in_channels=4, out_channels=4, kernel_size=7, stride=1, dilation=2, groups=4),
    dict(dims=2, in_channels=3, out_channels=5, kernel_size=3, stride=2, dilation=1, groups=1),
    dict(dims=3, in_channels=2, out_channels=4, kernel_size=3, stride=1, dilation=1, groups=2),
]


@pytest.mark.parametrize("kwargs", HALF_CASES, ids=lambda k: f"{k['dims']}d-k{k['kernel_size']}-g{k['groups']}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", BLOCKS, ids=lambda c: c.__name__)
def test_half_precision_blocks_deploy_within_tolerance(cls, dtype, kwargs):
    if DEVICE == "cpu" and cls is DiverseBranchBlock and kwargs["dims"] == 3:
        pytest.skip("torch has no float16/bfloat16 avg_pool3d on CPU (DBB's average branch)")
    for seed in range(3):
        block = make_block(cls, dtype=dtype, seed=seed, **kwargs)
        assert_deploys_exactly(block, block_input(kwargs, (6,) * kwargs["dims"], seed))


@pytest.mark.parametrize("cls", BLOCKS, ids=lambda c: c.__name__)
def test_non_default_padding_and_internal_channels(cls):
    # Padding beyond "same" (the output grows) and a custom 1x1 -> kxk width.
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=5, stride=2, padding=4, groups=2, internal_channels=6)
    block = make_block(cls, seed=3, **kwargs)
    deployed = assert_deploys_exactly(block, block_input(kwargs, (7, 6), 3))
    assert deployed.deployed_conv.padding == (4, 4)


@pytest.mark.parametrize("cls", BLOCKS, ids=lambda c: c.__name__)
def test_deployed_block_holds_only_its_conv(cls):
    kwargs = dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, dilation=1, groups=2,
                  activation=nn.PReLU(4))
    block = make_block(cls, dtype=torch.float64, seed=5, **kwargs)
    # In place: the conv that held the kxk kernel becomes the deployed conv.
    assert_deploys_in_place(block, block_input(kwargs, (6, 5), 5))
    assert set(block.state_dict()) == {"deployed_conv.weight", "deployed_conv.bias", "activation.weight"}


@pytest.mark.parametrize("cls", BLOCKS, ids=lambda c: c.__name__)
def test_reparameterize_twice_is_harmless(cls):
    assert_reparameterize_is_idempotent(
        make_block(cls, seed=6, in_channels=3, out_channels=3, kernel_size=3).reparameterize())


@pytest.mark.parametrize("cls", BLOCKS, ids=lambda c: c.__name__)
def test_training_mode_is_refused(cls):
    assert_training_mode_refused(make_block(cls, in_channels=2, out_channels=2, kernel_size=3).train())


@pytest.mark.parametrize("broken", ["dbb.average.bn", "dbb.expand.bn_pad.bn", "orepa.bn"])
def test_failed_merge_leaves_the_block_unchanged(broken):
    family, path = broken.split(".", 1)
    cls = DiverseBranchBlock if family == "dbb" else OREPABlock
    block = make_block(cls, seed=7, in_channels=4, out_channels=4, kernel_size=3, groups=2)
    with torch.no_grad():
        block.get_submodule(path).running_var[1] = float("nan")
    assert_merge_fails_unchanged(block, "running_var is not finite")


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("cls", BLOCKS, ids=lambda c: c.__name__)
def test_dtype_device_and_memory_format_are_kept(cls, dims):
    kwargs = dict(in_channels=4, out_channels=8, kernel_size=5, stride=2, dilation=1, groups=4, dims=dims)
    memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
    block = make_block(cls, seed=8, **kwargs).to(memory_format=memory_format)
    deployed = assert_deploys_exactly(block, block_input(kwargs, (5,) * dims, 8))
    weight = deployed.deployed_conv.weight
    assert weight.is_contiguous(memory_format=memory_format)
    assert weight.dtype == deployed.deployed_conv.bias.dtype == torch.float32
    assert weight.device.type == DEVICE
    assert deployed.deployed_conv.padding_mode == "zeros"


def test_registry_merges_every_block_of_a_model():
    model = perturbed(nn.Sequential(
        DiverseBranchBlock(3, 6, 3, activation=nn.ReLU()),
        OREPABlock(6, 6, 5, stride=2, groups=3, activation=nn.ReLU()),
        DiverseBranchBlock(6, 6, 3, groups=6, dims=2),
    ), seed=9)
    assert_registry_deploys_model(model, random_input((2, 3, 8, 8), torch.float32, torch.Generator().manual_seed(10),
                                                      DEVICE))


@pytest.mark.parametrize(
    "cls, kwargs, error, message",
    [
        (DiverseBranchBlock, dict(kernel_size=4), FoldError, "even, so the kernel has no centre tap: the block's 1x1"),
        (OREPABlock, dict(kernel_size=2), FoldError, "no centre tap: the block's 1x1 branch must land on the centre"),
        (DiverseBranchBlock, dict(kernel_size=5, padding=1), FoldError,
         "less than 'same' padding 2 .* 1x1 branch would need a negative padding"),
        (DiverseBranchBlock, dict(kernel_size=3, dilation=2, padding=1), FoldError, "less than 'same' padding 2"),
        (DiverseBranchBlock, dict(kernel_size=3, groups=2, internal_channels=5), ValueError,
         "internal_channels=5 must be a multiple of groups=2"),
        (OREPABlock, dict(kernel_size=3, groups=2, internal_channels=3), ValueError, "multiple of groups=2"),
        (OREPABlock, dict(kernel_size=3, internal_channels=0), ValueError, "internal_channels must be a positive int"),
        (OREPABlock, dict(kernel_size=3, groups=3), ValueError, "groups=3 must divide in_channels=4"),
        (DiverseBranchBlock, dict(kernel_size=3, dims=4), ValueError, "dims must be 1, 2 or 3"),
        (OREPABlock, dict(kernel_size=3, stride=0), ValueError, "stride .*must be a positive int, got 0"),
        (OREPABlock, dict(kernel_size=3, dilation=1.5), ValueError, "dilation .*must be a positive int, got 1.5"),
        (DiverseBranchBlock, dict(kernel_size=(3, 3)), ValueError,
         "kernel_size .*must be a positive int, got \\(3, 3\\)"),
        (OREPABlock, dict(kernel_size=3, padding=-1), ValueError, "padding must be a non-negative int"),
    ],
)
def test_configurations_that_cannot_merge_are_rejected_when_built(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(in_channels=4, out_channels=6, **kwargs)


def test_dbb_branch_layout_follows_the_paper():
    dense = DiverseBranchBlock(4, 6, 3)
    assert dense.branch_names == ("origin", "pointwise", "expand", "average")
    assert isinstance(dense.expand.conv, IdentityBasedConv1x1)  # internal_channels == in_channels
    assert isinstance(dense.average.bn_pad, BatchNormAndPad)
    depthwise = DiverseBranchBlock(4, 4, 3, groups=4)
    assert depthwise.branch_names == ("origin", "expand", "average")
    assert depthwise.expand.kxk.in_channels == 8  # DBB's 2x internal channels for depthwise
    assert not hasattr(depthwise.average, "conv")  # the pool reads the zero-padded input
    dilated = DiverseBranchBlock(4, 6, 3, dilation=2)
    assert dilated.branch_names == ("origin", "pointwise", "expand")  # no pooling window on dilated taps


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batchnorm_and_pad_equals_batchnorm_of_the_zero_padded_input(dims):
    layer = BatchNormAndPad(3, 2, dims)
    randomize_batchnorm_stats(layer, torch.Generator().manual_seed(10))
    layer.eval()
    x = torch.randn((2, 3) + (4,) * dims, dtype=torch.float64)
    layer.double()
    with torch.no_grad():
        got, expected = layer(x), layer.bn(nn.functional.pad(x, (2,) * (2 * dims)))
    # float64, but the pad value is formed in another order than BN's own kernel: a few ulps apart.
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("cls", BLOCKS, ids=lambda c: c.__name__)
def test_gradients_reach_every_branch_parameter(cls):
    block = make_block(cls, seed=11, in_channels=4, out_channels=4, kernel_size=3, groups=2)
    assert_gradients_reach_every_parameter(block, torch.randn(2, 4, 6, 6, device=DEVICE))


@pytest.mark.parametrize("dims, kernel_size, stride, groups", [(1, 5, 2, 2), (2, 3, 1, 1), (2, 7, 2, 4), (3, 3, 2, 2)])
def test_orepa_kernel_equals_its_branches_run_one_by_one(dims, kernel_size, stride, groups):
    """OREPA's single training conv against its branches computed as separate
    convs and pools (float64: the two must agree to rounding, 1e-12)."""
    block = make_block(OREPABlock, dtype=torch.float64, seed=12, in_channels=4, out_channels=8,
                       kernel_size=kernel_size, stride=stride, groups=groups, dims=dims, internal_channels=8)
    conv = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}[dims]
    pool = {1: nn.functional.avg_pool1d, 2: nn.functional.avg_pool2d, 3: nn.functional.avg_pool3d}[dims]
    x = torch.randn((2, 4) + (7,) * dims, dtype=torch.float64, device=DEVICE)
    p = kernel_size // 2
    padded = nn.functional.pad(x, (p,) * (2 * dims))
    scales = [s.view(1, -1, *(1,) * dims) for s in block.branch_scales.detach()]
    with torch.no_grad():
        origin = conv(x, block.conv.weight, stride=stride, padding=p, groups=groups)
        pointwise = conv(x, block.pointwise_weight, stride=stride, groups=groups)
        prior = pool(conv(padded, block.prior_weight, groups=groups), kernel_size, stride)
        expand = conv(block.expand(padded), block.expand_kxk_weight, stride=stride, groups=groups)
        branches = sum(s * y for s, y in zip(scales, (origin, pointwise, prior, expand)))
        single = conv(x, block.combined_kernel(), stride=stride, padding=p, groups=groups)
    assert relative_error(single, branches) <= 1e-12


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_composition_helpers_match_running_the_layers(groups):
    """compose_pointwise_then_kxk and average_pool_kernel against the layers they
    replace, on an input padded with zeros (so the 1x1's bias pads the middle map)."""
    generator = torch.Generator().manual_seed(13)
    first = torch.randn(8, 4 // groups, 1, 1, generator=generator, dtype=torch.float64)
    bias = torch.randn(8, generator=generator, dtype=torch.float64)
    second = torch.randn(4, 8 // groups, 3, 3, generator=generator, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 6, generator=generator, dtype=torch.float64)
    # The middle map padded with the 1x1's bias: zero-pad the conv output, then add the bias everywhere.
    middle = nn.functional.pad(nn.functional.conv2d(x, first, groups=groups), (1, 1, 1, 1)) + bias.view(1, -1, 1, 1)
    kernel, composed_bias = compose_pointwise_then_kxk(first, bias, second, groups)
    expected = nn.functional.conv2d(middle, second, groups=groups)
    got = nn.functional.conv2d(x, kernel, composed_bias, padding=1, groups=groups)
    assert relative_error(got, expected) <= 1e-12
    pooled = nn.functional.avg_pool2d(nn.functional.conv2d(x, first, groups=groups), 3, 2, padding=1,
                                      count_include_pad=True)
    got = nn.functional.conv2d(x, average_pool_kernel(first, 3), stride=2, padding=1, groups=groups)
    assert relative_error(got, pooled) <= 1e-12


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("cls", BLOCKS, ids=lambda c: c.__name__)
def test_a_main_conv_padding_otherwise_than_the_branches_is_not_merged(cls, padding_mode):
    """The expand and average branches (DBB) and the functional conv of the
    branches (OREPA) pad with zeros whatever the main conv's padding_mode: a
    main conv set to pad otherwise cannot hold the merge."""
    block = make_block(cls, seed=8, in_channels=4, out_channels=4, kernel_size=3)
    (block.origin.conv if cls is DiverseBranchBlock else block.conv).padding_mode = padding_mode
    assert_merge_fails_unchanged(block, f"pads with 'zeros' but the merged conv with '{padding_mode}'")
    model = nn.Sequential(block, nn.ReLU()).eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(x)
        try:
            fused = fusedconv.fuse(model)
        except FoldError as refused:
            assert "pads with 'zeros'" in str(refused)
            assert torch.equal(model(x), expected)
        else:
            torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
