"""ConvBN: conv + BatchNorm in its three modes (train, frozen-BN, deployed), property-based.

Every output is compared with a float64 reference of the same block (a deep
copy in float64, :func:`utils.float64_reference`) on random inputs, with random
BN statistics (:func:`utils.randomize_batchnorm_stats`). The accuracy rule for a
fused computation (the deployed conv, or the frozen mode's on-the-fly fold) is
the one of :func:`block_checks.assert_as_accurate`, shared by every block test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from block_checks import (
    ALL_DTYPES,
    ERROR_FLOOR,
    PROPERTY,
    assert_as_accurate,
    assert_deploys_exactly,
    assert_merge_fails_unchanged,
    input_shape,
    random_input,
    randomized,
)
from fusedconv.blocks.convbn import ConvBN
from fusedconv.errors import FoldError
from utils import float64_reference, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

# The frozen mode is not a merge: at every forward it folds the BN into the
# conv in the block's dtype, so the folded weight and bias are rounded to
# float16/bfloat16 before the conv (the merge computes in float64 and rounds
# once). That rounding is an error shared by every output of a channel, which
# the branched block does not make, and a kernel of few taps does not average
# it out: over 3300 random half-precision ConvBNs (inputs of at least 128
# output values) the frozen error went above 4x the branched block's in 0.7%
# of the draws, up to 2.6 u for float16 and 3.6 u for bfloat16 (unit roundoff
# u = 2^-11 = 4.9e-4 and 2^-8 = 3.9e-3). Its half-precision floors are
# therefore ~8 u: 4e-3 and 3e-2 (the deployed conv keeps ERROR_FLOOR).
FROZEN_ERROR_FLOOR = ERROR_FLOOR | {torch.float16: 4e-3, torch.bfloat16: 3e-2}


# ---------------------------------------------------------------------------
# random ConvBN configurations
# ---------------------------------------------------------------------------


@st.composite
def convbn_cases(draw, dtypes=ALL_DTYPES, kernel_fits=False):
    """(constructor kwargs, input shape, dtype, seed) of a ConvBN with an output of
    at least 2 positions per spatial dim and a batch for at least
    MIN_OUTPUT_VALUES output values (:func:`block_checks.input_shape`: a
    relative error over a handful of values is noise).

    ``kernel_fits``: every input size at least the kernel's extent. Cases that
    run backward need it: torch 2.14.1's CPU conv backward corrupts the heap
    when a (padded) kernel is taller than its input (e.g. kernel (19, 1) on a
    10x2 input with padding "same": "corrupted size vs. prev_size", or a
    segfault, in plain ``F.conv2d(...).sum().backward()``)."""
    dims = draw(st.integers(1, 3))
    # 3d kernels up to 7 per side keep the property tests fast; 1d/2d go up to 31.
    max_kernel = 31 if dims < 3 else 7
    kernel = tuple(draw(st.integers(1, max_kernel)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 3))
    in_channels, out_channels = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    same = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    padding = draw(st.sampled_from([None, "less", "more"]))
    if padding is not None:
        padding = tuple(max(p + (-1 if padding == "less" else 1), 0) for p in same)
    pads = same if padding is None else padding
    sizes = []
    for k, d, p in zip(kernel, dilation, pads):
        # at least 2 outputs: n + 2p - d(k-1) - 1 >= stride; reflect pads less than the size
        smallest = max(2, d * (k - 1) + 1 + stride - 2 * p, p + 1, d * (k - 1) + 1 if kernel_fits else 0)
        sizes.append(smallest + draw(st.integers(0, 2)))
    kwargs = dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel, stride=stride,
                  padding=padding, dilation=dilation, groups=groups, dims=dims, bias=draw(st.booleans()),
                  padding_mode=padding_mode)
    return kwargs, input_shape(kwargs, tuple(sizes)), draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**31))


# ---------------------------------------------------------------------------
# the three modes against a float64 reference
# ---------------------------------------------------------------------------


@PROPERTY
@given(case=convbn_cases())
def test_every_mode_matches_float64_reference(case):
    kwargs, shape, dtype, seed = case
    block = randomized(ConvBN(**kwargs), dtype, seed)
    x = random_input(shape, dtype, torch.Generator().manual_seed(seed + 1))
    reference = float64_reference(block, (x,))  # conv + eval-mode BN
    with torch.no_grad():
        branched = block(x)
        frozen = copy.deepcopy(block).freeze_batchnorm().train()  # frozen: eval-mode BN even in .train()
        assert frozen.mode == "frozen"
        assert_as_accurate(frozen(x), branched, reference, dtype, what="frozen", floors=FROZEN_ERROR_FLOOR)
    assert block.mode == "train"
    deployed = assert_deploys_exactly(block, x)
    assert deployed.mode == "deployed"


@PROPERTY
@given(case=convbn_cases(dtypes=(torch.float32, torch.float64)))
def test_train_mode_uses_batch_statistics(case):
    kwargs, shape, dtype, seed = case
    block = randomized(ConvBN(**kwargs), dtype, seed).train()
    x = random_input(shape, dtype, torch.Generator().manual_seed(seed + 1))
    reference_block = copy.deepcopy(block).to(torch.float64)
    reference = reference_block(x.double())
    out = block(x)
    # Plain conv + batch-statistics BN in the block's dtype: a few ulps, amplified
    # by the normalization of channels whose batch variance is small (few
    # positions per channel here): 1e-5 for float32, 1e-12 for float64.
    assert relative_error(out.detach(), reference.detach()) <= {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    # The running statistics are updated as a float64 BatchNorm would update them.
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(block.bn, name).double(), getattr(reference_block.bn, name),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# frozen-BN mode: gradients, training steps, memory
# ---------------------------------------------------------------------------


def parameter_gradients(block: ConvBN, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of ``sum(block(x) * upstream)`` w.r.t. the input and every parameter."""
    x = x.clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    (block(x) * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    grads["input"] = x.grad.clone()
    return grads


@PROPERTY
@given(case=convbn_cases(dtypes=(torch.float32, torch.float64), kernel_fits=True))
def test_frozen_gradients_match_unfused_eval_batchnorm(case):
    kwargs, shape, dtype, seed = case
    unfused = randomized(ConvBN(**kwargs), dtype, seed)  # conv then eval-mode BN
    frozen = copy.deepcopy(unfused).freeze_batchnorm().train()
    generator = torch.Generator().manual_seed(seed + 1)
    x = random_input(shape, dtype, generator)
    upstream = random_input(tuple(unfused(x).shape), dtype, generator)

    reference_block = copy.deepcopy(unfused).double()
    reference = parameter_gradients(reference_block, x.double(), upstream.double())
    expected = parameter_gradients(unfused, x, upstream)
    got = parameter_gradients(frozen, x, upstream)
    names = {"input", "conv.weight", "bn.weight", "bn.bias"} | ({"conv.bias"} if kwargs["bias"] else set())
    assert set(got) == names
    term_sizes = parameter_gradients(with_absolute_terms(reference_block), x.double().abs(), upstream.double().abs())
    for name in names:
        # Same rule as the outputs: the fused gradient is as accurate as the
        # unfused float32 one (float64: equal to 1e-12), with the floor relative
        # to the size of the terms summed (see with_absolute_terms).
        assert_as_accurate(got[name], expected[name], reference[name], dtype, what=f"frozen d/d{name}",
                           floor_scale=float(term_sizes[name].norm()))


def with_absolute_terms(block: ConvBN) -> ConvBN:
    """A frozen copy of ``block`` whose gradients, on ``|x|`` and ``|upstream|``, are
    the sums of the absolute values of the terms that its gradients sum.

    Every gradient is a sum of products, ``sum_i a_i``, and its rounding error
    is bounded relative to ``sum_i |a_i|``, not to the sum itself, which can
    cancel to almost nothing. Two summation orders (frozen vs unfused) then
    differ by more than 4x relative to the small result, while both stay within
    a few units of roundoff of ``sum_i |a_i|``. The frozen mode's BN-weight
    gradient is ``r * (sum u * conv(x, W) + (b - mean) * sum u)`` with
    ``r = 1 / sqrt(var + eps)``: here its offset ``b - mean`` is made non-negative too.
    """
    block = copy.deepcopy(block).freeze_batchnorm()
    bn, conv = block.bn, block.conv
    with torch.no_grad():
        conv.weight.abs_()
        bn.weight.abs_()
        offset = (-bn.running_mean if conv.bias is None else conv.bias - bn.running_mean).abs()
        if conv.bias is None:
            bn.running_mean.copy_(-offset)
        else:
            conv.bias.copy_(offset)
            bn.running_mean.zero_()
    return block


def test_frozen_training_step_changes_weights_like_unfused_eval_batchnorm():
    unfused = randomized(ConvBN(4, 6, 3, stride=2, groups=2, bias=True), torch.float64, seed=1)
    frozen = copy.deepcopy(unfused).freeze_batchnorm().train()
    initial_weight = frozen.conv.weight.detach().clone()
    statistics = {key: getattr(frozen.bn, key).clone()
                  for key in ("running_mean", "running_var", "num_batches_tracked")}
    optimizers = [torch.optim.SGD(block.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
                  for block in (unfused, frozen)]
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = random_input((2, 4, 9, 9), torch.float64, generator)
        target = random_input((2, 6, 5, 5), torch.float64, generator)
        for block, optimizer in zip((unfused, frozen), optimizers):
            optimizer.zero_grad()
            nn.functional.mse_loss(block(x), target).backward()
            optimizer.step()
    for (name, expected), got in zip(unfused.named_parameters(), frozen.parameters()):
        # float64 on both sides: the two computations differ by roundings of 2^-52
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=name)
    # Frozen statistics stay frozen in .train(), and the parameters did move.
    assert all(torch.equal(getattr(frozen.bn, key), value) for key, value in statistics.items())
    assert not torch.equal(frozen.conv.weight, initial_weight)


def saved_activation_shapes(block: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd saves for backward during ``block(x)``."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x.requires_grad_(True))
    return shapes


def test_frozen_mode_stores_no_batchnorm_input():
    block = randomized(ConvBN(3, 8, 3, dims=2), torch.float32, seed=3).train()
    x = torch.randn(2, 3, 6, 6)
    output_shape = tuple(block(x).shape)
    assert output_shape in saved_activation_shapes(block, x)  # the BN keeps its input, the conv output
    block.freeze_batchnorm()
    assert output_shape not in saved_activation_shapes(block, x)


# ---------------------------------------------------------------------------
# modes, deployment rules, rejected arguments
# ---------------------------------------------------------------------------


def test_mode_switches():
    block = ConvBN(4, 4, 3, activation=nn.PReLU())
    assert block.mode == "train"
    assert block.freeze_batchnorm() is block and block.mode == "frozen"
    assert block.unfreeze_batchnorm() is block and block.mode == "train"
    block.freeze_batchnorm()
    with pytest.raises(FoldError, match="training mode"):
        block.reparameterize()
    assert block.mode == "frozen" and hasattr(block, "bn")
    randomized(block, torch.float32, seed=4)
    x = torch.randn(2, 4, 5, 5)
    deployed = assert_deploys_exactly(block, x)  # from frozen mode; keeps the PReLU's weight
    assert deployed.mode == "deployed"
    with pytest.raises(RuntimeError, match="deployed: it has no BatchNorm left"):
        deployed.freeze_batchnorm()


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_deployed_conv_keeps_memory_format(memory_format):
    block = randomized(ConvBN(4, 8, 5, stride=2, dilation=2, groups=4, padding_mode="reflect"), torch.float32, seed=5)
    block = block.to(memory_format=memory_format)
    x = torch.randn(2, 4, 11, 11).to(memory_format=memory_format)
    assert_deploys_exactly(block, x)


def test_failed_reparameterize_leaves_block_unchanged():
    block = randomized(ConvBN(4, 4, 3), torch.float32, seed=6)
    with torch.no_grad():
        block.bn.running_var[1] = float("nan")
    assert_merge_fails_unchanged(block, "running_var is not finite")
    assert block.mode == "train"


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dims=4), ValueError, "dims must be 1, 2 or 3"),
    (dict(in_channels=6, groups=4), ValueError, "groups=4 must divide"),
    (dict(in_channels=0), ValueError, "in_channels must be a positive int"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size must be an int >= 1 or 2 of them"),
    (dict(kernel_size=0), ValueError, "kernel_size must be an int >= 1"),
    (dict(padding=-1), ValueError, "padding must be an int >= 0"),
    (dict(stride=True), ValueError, "stride must be an int >= 1"),
])
def test_rejects_arguments_that_make_no_conv(kwargs, error, message):
    arguments = dict(in_channels=4, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(error, match=message):
        ConvBN(**arguments)
