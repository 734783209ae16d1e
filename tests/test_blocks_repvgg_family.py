"""RepVGGBlock, RepConv, ACBlock and MobileOneBlock: every accepted configuration deploys exactly.

Property tests draw kernel sizes 1..31 (odd), stride 1 and 2, dilation 1..3,
groups from 1 to depthwise, channel counts with and without an identity
branch, paddings from below to above "same", Conv1d/2d/3d where the block has
them, and float32/float64/float16/bfloat16. Each deployed block is checked by
:func:`block_checks.assert_deploys_exactly`: its output against a float64
reference of the branched eval-mode block (with random weights, inputs and BN
statistics) under the accuracy rule of :func:`block_checks.assert_as_accurate`,
no BatchNorm left, only the deployed conv in its state_dict, the main conv's
geometry, dtype, device and memory format kept, a second ``reparameterize()`` harmless.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from block_checks import (
    ALL_DTYPES,
    PROPERTY,
    assert_as_accurate,
    assert_deploys_exactly,
    assert_merge_fails_unchanged,
    assert_registry_deploys_model,
    assert_training_mode_refused,
    input_shape,
    main_conv,
    random_input,
    randomized,
)
from fusedconv.blocks.acnet import ACBlock
from fusedconv.blocks.base import RepBlock
from fusedconv.blocks.convbn import ConvBN
from fusedconv.blocks.mobileone import MobileOneBlock
from fusedconv.blocks.repvgg import RepConv, RepVGGBlock
from fusedconv.errors import FoldError
from utils import float64_reference

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def block_cases(draw, family: type):
    """(block, input) for a random configuration that ``family`` accepts, with an
    output of at least 2 positions per spatial dim and a batch for at least
    MIN_OUTPUT_VALUES output values (:func:`block_checks.input_shape`: a
    relative error over a handful of values is noise)."""
    dims = 2 if family is ACBlock else draw(st.integers(1, 3))
    kernel_size = 2 * draw(st.integers(0, 15)) + 1
    # 3d: the dilated kernel spans at most 31 taps per side (up to 31^3 weights
    # per channel pair, with a padded input of 33^3): enough, and fast.
    dilation = draw(st.integers(1, 3 if dims < 3 else max(1, 30 // max(kernel_size - 1, 1))))
    stride = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2, 4]))
    depthwise = draw(st.booleans())
    in_channels = groups * (1 if depthwise else draw(st.integers(1, 2)))
    out_channels = in_channels if draw(st.booleans()) else groups * draw(st.integers(1, 3))
    same = dilation * (kernel_size - 1) // 2
    # ACBlock accepts any padding (less than "same" crops its asymmetric branches);
    # the others at least "same".
    padding = draw(st.sampled_from([None, same, same + 1] + ([0, same // 2] if family is ACBlock else [])))
    pads = same if padding is None else padding
    identity = (None if family is ACBlock else
                draw(st.sampled_from([None, False] + [True] * (in_channels == out_channels and stride == 1
                                                                 and pads == same))))
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, dims=dims)
    if family is not ACBlock:
        kwargs["identity"] = identity
    if family is MobileOneBlock:
        kwargs["num_branches"] = draw(st.integers(1, 3))
    if family is RepConv:
        kwargs["activation"] = draw(st.sampled_from([None, nn.Identity()]))  # None: SiLU
    block = family(in_channels, out_channels, kernel_size, **kwargs)
    if identity is not None:
        assert ("identity" in block.branch_names) == identity
    dtype, seed = draw(st.sampled_from(ALL_DTYPES)), draw(st.integers(0, 2**31))
    sizes = [max(2, dilation * (kernel_size - 1) + 1 + stride - 2 * pads) + draw(st.integers(0, 2))
             for _ in range(dims)]
    shape = input_shape(dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                             stride=stride, padding=pads, dilation=dilation), tuple(sizes))
    x = random_input(shape, dtype, torch.Generator().manual_seed(seed + 1))
    return randomized(block, dtype, seed), x


FAMILIES = [RepVGGBlock, RepConv, ACBlock, MobileOneBlock]


@pytest.mark.parametrize("family", FAMILIES)
@PROPERTY
@given(data=st.data())
def test_deploys_exactly(family, data):
    block, x = data.draw(block_cases(family))
    assert_deploys_exactly(block, x)


@pytest.mark.parametrize("block", [
    RepVGGBlock(4, 4, 5, dilation=2, groups=2),
    RepVGGBlock(6, 6, 7, groups=6, dims=3),
    RepConv(4, 4, identity=True, activation=nn.Hardswish()),
    ACBlock(4, 8, 7, padding=1, dilation=2, stride=2, groups=4),
    ACBlock(4, 4, 9, padding=0),
    MobileOneBlock(8, 8, 5, groups=8, num_branches=4, dims=1),
    MobileOneBlock(8, 4, 1, num_branches=3, activation=nn.PReLU()),
], ids=lambda block: type(block).__name__)
def test_deploys_exactly_on_inputs_wider_than_the_kernel(block):
    """Inputs larger than the dilated kernel: every tap of the merged kernel reads real input."""
    block = randomized(block, torch.float32, seed=7)
    dims = main_conv(block).weight.dim() - 2
    x = random_input((2, main_conv(block).in_channels) + (23,) * dims, torch.float32, torch.Generator().manual_seed(8))
    assert_deploys_exactly(block, x)


@pytest.mark.parametrize("memory_format, dims", [(torch.channels_last, 2), (torch.channels_last_3d, 3)])
def test_deployed_conv_keeps_channels_last(memory_format, dims):
    block = randomized(MobileOneBlock(4, 4, 3, num_branches=2, dims=dims), torch.float32, seed=9)
    block = block.to(memory_format=memory_format)
    x = random_input((2, 4) + (6,) * dims, torch.float32, torch.Generator().manual_seed(10))
    deployed = assert_deploys_exactly(block, x.to(memory_format=memory_format))
    assert deployed.deployed_conv.weight.is_contiguous(memory_format=memory_format)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_deploys_on_gpu():
    block = randomized(RepVGGBlock(8, 8, 3, groups=2), torch.float32, seed=11).cuda()
    x = random_input((2, 8, 12, 12), torch.float32, torch.Generator().manual_seed(12)).cuda()
    deployed = assert_deploys_exactly(block, x)
    assert deployed.deployed_conv.weight.is_cuda


# ---------------------------------------------------------------------------
# which branches a block has
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, kwargs, branches", [
    ((4, 4, 3), {}, ("dense", "pointwise", "identity")),
    ((4, 8, 3), {}, ("dense", "pointwise")),
    ((4, 4, 3), dict(stride=2), ("dense", "pointwise")),
    ((4, 4, 3), dict(padding=2), ("dense", "pointwise")),
    ((4, 4, 3), dict(identity=False), ("dense", "pointwise")),
])
def test_repvgg_identity_is_automatic(arguments, kwargs, branches):
    assert RepVGGBlock(*arguments, **kwargs).branch_names == branches


def test_repconv_has_yolo_defaults():
    block = RepConv(8, 8)
    assert block.branch_names == ("dense", "pointwise")  # ultralytics' bn=False
    assert block.dense[0].conv.kernel_size == (3, 3) and isinstance(block.activation, nn.SiLU)
    assert "identity" in RepConv(8, 8, identity=None).branch_names  # YOLOv6/v7


def test_repconv_computes_what_ultralytics_repconv_computes():
    ultralytics_conv = pytest.importorskip("ultralytics.nn.modules.conv")
    theirs = ultralytics_conv.RepConv(8, 8, g=2, bn=True)
    ours = RepConv(8, 8, groups=2, identity=True)
    names = {"conv1.conv": "dense.0.conv", "conv1.bn": "dense.0.bn", "conv2.conv": "pointwise.conv",
             "conv2.bn": "pointwise.bn", "bn": "identity"}
    randomized(theirs, torch.float32, seed=13)
    ours.load_state_dict({names[key.rsplit(".", 1)[0]] + "." + key.rsplit(".", 1)[1]: value
                          for key, value in theirs.state_dict().items()})
    x = random_input((2, 8, 7, 7), torch.float32, torch.Generator().manual_seed(14))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=0, atol=0)


def test_mobileone_branches():
    assert MobileOneBlock(4, 4, 3, num_branches=3).branch_names == ("dense", "pointwise", "identity")
    assert len(MobileOneBlock(4, 4, 3, num_branches=3).dense) == 3
    # The 1x1 variant has no scale branch: it would be one more 1x1 branch.
    assert MobileOneBlock(4, 8, 1, num_branches=2).branch_names == ("dense",)


@pytest.mark.parametrize("padding, crop", [(None, 0), (3, 0), (4, 0), (1, 2), (0, 3)])
def test_acblock_crops_asymmetric_branches_when_padding_is_less_than_same(padding, crop):
    block = ACBlock(2, 2, 7, padding=padding)
    assert block.crop == crop
    assert block.horizontal.conv.padding[0] == max(0, (3 if padding is None else padding) - 3)


# ---------------------------------------------------------------------------
# configurations that cannot merge exactly are rejected when the block is built
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("build, error, message", [
    (lambda: RepVGGBlock(4, 4, 4), FoldError, "kernel_size=4 is even.*1x1 and identity branches .* centre tap"),
    (lambda: RepVGGBlock(4, 4, 3, padding=0), FoldError, "less than 'same' padding 1.*crop"),
    (lambda: RepVGGBlock(4, 4, 5, dilation=2, padding=3), FoldError, "less than 'same' padding 4"),
    (lambda: RepVGGBlock(4, 8, 3, identity=True), FoldError, "in_channels == out_channels.*got 4 and 8"),
    (lambda: RepVGGBlock(4, 4, 3, stride=2, identity=True), FoldError, "stride 1"),
    (lambda: RepVGGBlock(4, 4, 3, padding=2, identity=True), FoldError, "'same' padding 1"),
    (lambda: RepVGGBlock(4, 6, 3, groups=4), ValueError, "groups=4 must divide"),
    (lambda: RepVGGBlock(4, 4, 3, dims=4), ValueError, "dims must be 1, 2 or 3"),
    (lambda: RepVGGBlock(4, 4, (3, 3)), ValueError, "kernel_size .* must be a positive int"),
    (lambda: RepVGGBlock(4, 4, 3, padding=-1), ValueError, "padding must be a non-negative int"),
    (lambda: RepConv(4, 4, 2), FoldError, "even"),
    (lambda: ACBlock(4, 4, 3, dims=3), ValueError, "2d only"),
    (lambda: ACBlock(4, 4, 3, dims=1), ValueError, "2d only"),
    (lambda: ACBlock(4, 4, 6), FoldError, "even.*centre row and column"),
    (lambda: MobileOneBlock(4, 4, 3, num_branches=0), ValueError, "num_branches .* must be a positive int"),
    (lambda: MobileOneBlock(4, 4, 2), FoldError, "even"),
    (lambda: MobileOneBlock(4, 4, 3, padding=0), FoldError, "less than 'same' padding"),
    (lambda: MobileOneBlock(4, 4, 1, stride=2, identity=True), FoldError, "stride 1"),
])
def test_rejects_configurations_that_do_not_merge(build, error, message):
    with pytest.raises(error, match=message):
        build()


# ---------------------------------------------------------------------------
# reparameterize(): in place, all or nothing, only in eval mode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_reparameterize_refuses_training_mode(family):
    assert_training_mode_refused(family(4, 4, 3).train())


@pytest.mark.parametrize("block, broken", [
    (RepVGGBlock(4, 4, 3), "identity"),
    (RepVGGBlock(4, 4, 3), "pointwise.bn"),
    (ACBlock(4, 4, 3), "vertical.bn"),
    (MobileOneBlock(4, 4, 3, num_branches=3), "dense.2.bn"),
], ids=lambda value: value if isinstance(value, str) else type(value).__name__)
def test_failed_reparameterize_leaves_block_unchanged(block, broken):
    block = randomized(block, torch.float32, seed=15)
    with torch.no_grad():
        block.get_submodule(broken).running_var[0] = -1.0
    assert_merge_fails_unchanged(block, f"{broken.split('.')[0]}.*running_var is negative")


def sample_model() -> nn.Sequential:
    return randomized(nn.Sequential(
        RepVGGBlock(4, 8, 3, stride=2, activation=nn.ReLU()),
        MobileOneBlock(8, 8, 3, groups=8, num_branches=2),
        MobileOneBlock(8, 8, 1, num_branches=2),
        ACBlock(8, 8, 5, padding=1),
        RepConv(8, 8, identity=None),
        ConvBN(8, 4, 3),
    ), torch.float32, seed=16)


def test_registry_reparameterizes_every_block_of_a_model():
    model = sample_model()
    x = random_input((2, 4, 16, 16), torch.float32, torch.Generator().manual_seed(17))
    assert_registry_deploys_model(model, x)


def test_blocks_deploy_after_their_branches_did():
    """``model.apply`` visits children first: the branch ConvBNs deploy on their
    own, and the blocks around them still merge (their branches are convs now)."""
    model = sample_model()
    x = random_input((2, 4, 16, 16), torch.float32, torch.Generator().manual_seed(18))
    reference = float64_reference(model, (x,))
    with torch.no_grad():
        branched = model(x)
        model.apply(lambda module: module.reparameterize() if isinstance(module, RepBlock) else None)
        # The branches were rounded to float32 once on their own, then once more
        # when added: still within the accuracy rule.
        assert_as_accurate(model(x), branched, reference, torch.float32)
    assert all(block.deployed for block in model)
    assert all(isinstance(block.deployed_conv, nn.Conv2d) for block in model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
