"""ConvBN: conv + BatchNorm in its three modes (train, frozen-BN, deployed), property-based.

Every output is compared with a float64 reference of the same block (a deep
copy in float64, :func:`utils.float64_reference`) on random inputs, with random
BN statistics (:func:`utils.randomize_batchnorm_stats`). The accuracy rule for a
fused computation (the deployed conv, or the frozen mode's on-the-fly fold) is
the one of :func:`assert_as_accurate`; the RepVGG-family tests use it too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fusedconv.blocks.convbn import ConvBN
from fusedconv.errors import FoldError
from fusedconv.reparam import ConvGeometry
from utils import float64_reference, randomize_batchnorm_stats, relative_error

PROPERTY = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Accuracy rule for a fused computation: its relative error against the float64
# reference is at most max(4 x the branched block's own error in the same dtype,
# ERROR_FLOOR[dtype]). The fused conv rounds in other places than the branched
# block (each merged weight once per added branch, instead of every branch
# output and BN output), so its error is the same few half-ulps of the dtype;
# on tiny outputs the ratio of the two scatters (up to ~4.8x measured over
# 1200 random blocks), which the floor absorbs, while a wrong tap, axis or
# dropped branch gives errors of order 1e-1. Floors, in units of the dtype's
# unit roundoff u (the relative size of one rounding): float32 1e-6 (~16 u,
# u = 2^-24 = 6e-8), float16 4e-3 (~8 u, u = 2^-11 = 4.9e-4), bfloat16 3e-2
# (~8 u, u = 2^-8 = 3.9e-3); float64 1e-12, because the branched float64 block *is* the
# reference computation (its error is exactly 0) and a float64 merge rounds
# each weight a few times at 2^-52, which stays below 1e-15 even summed over a
# 31x31 kernel (measured worst: 1.1e-15).
ERROR_FLOOR = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 4e-3, torch.bfloat16: 3e-2}
MAX_RATIO = 4.0


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than waking a pool for each op."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_as_accurate(fused, branched, reference, dtype: torch.dtype, what: str = "deployed",
                       floor_scale: float | None = None) -> None:
    """The accuracy rule above: ``fused``'s error against ``reference`` is at most
    max(4 x ``branched``'s, the dtype's floor). The floor is relative to
    ``||reference||``, or to ``floor_scale`` for a result computed as a
    difference of terms of that size (its rounding errors scale with the terms)."""
    fused_error, branched_error = relative_error(fused, reference), relative_error(branched, reference)
    floor = ERROR_FLOOR[dtype]
    if floor_scale is not None:
        floor *= floor_scale / float(reference.double().norm())
    bound = max(MAX_RATIO * branched_error, floor)
    assert fused_error <= bound, (f"{what} error {fused_error:.3g} > bound {bound:.3g} "
                                  f"(branched {dtype} error {branched_error:.3g})")


def random_input(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def randomized(block: nn.Module, dtype: torch.dtype, seed: int) -> nn.Module:
    """``block`` with random weights and BN statistics (never zeros or ones), in
    ``dtype`` and eval mode. Weights are drawn from a seeded generator, not torch's global one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if name.endswith("conv.weight"):
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
            elif name.endswith("conv.bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    randomize_batchnorm_stats(block, generator)
    return block.to(dtype).eval()


def assert_deploys_exactly(block: nn.Module, x: torch.Tensor, main_conv: nn.Module) -> nn.Module:
    """Deploy a copy of the eval-mode ``block`` and check it: output as accurate as the
    branched block's (:func:`assert_as_accurate`), no BatchNorm left, a state_dict
    holding only the deployed conv (and activation parameters), ``main_conv``'s
    geometry, dtype and memory format kept, a second ``reparameterize()`` harmless.
    Returns the deployed copy."""
    reference = float64_reference(block, (x,))
    deployed = copy.deepcopy(block)
    conv_before = ConvGeometry.of(main_conv)
    with torch.no_grad():
        branched = block(x)
        assert deployed.reparameterize() is deployed
        out = deployed(x)
    assert_as_accurate(out, branched, reference, x.dtype)

    conv = deployed.deployed_conv
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    activation_keys = {f"activation.{key}" for key in deployed.activation.state_dict()}
    assert set(deployed.state_dict()) == {"deployed_conv.weight", "deployed_conv.bias"} | activation_keys
    assert ConvGeometry.of(conv) == conv_before
    assert conv.weight.dtype == main_conv.weight.dtype and conv.bias.dtype == main_conv.weight.dtype
    assert conv.weight.is_contiguous() == main_conv.weight.is_contiguous()
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(conv.weight.dim())
    if channels_last is not None:
        assert (conv.weight.is_contiguous(memory_format=channels_last)
                == main_conv.weight.is_contiguous(memory_format=channels_last))

    state = {key: value.clone() for key, value in deployed.state_dict().items()}
    assert deployed.reparameterize() is deployed
    assert all(torch.equal(state[key], value) for key, value in deployed.state_dict().items())
    return deployed


# ---------------------------------------------------------------------------
# random ConvBN configurations
# ---------------------------------------------------------------------------


@st.composite
def convbn_cases(draw, dtypes=ALL_DTYPES):
    """(constructor kwargs, input shape, dtype, seed) of a ConvBN with an output of
    at least 2 positions per spatial dim (a relative error over one value is noise)."""
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
        smallest = max(2, d * (k - 1) + 1 + stride - 2 * p, p + 1)
        sizes.append(smallest + draw(st.integers(0, 2)))
    kwargs = dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel, stride=stride,
                  padding=padding, dilation=dilation, groups=groups, dims=dims, bias=draw(st.booleans()),
                  padding_mode=padding_mode)
    return kwargs, (2, in_channels, *sizes), draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**31))


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
        assert_as_accurate(frozen(x), branched, reference, dtype, what="frozen")
    assert block.mode == "train"
    deployed = assert_deploys_exactly(block, x, block.conv)
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
@given(case=convbn_cases(dtypes=(torch.float32, torch.float64)))
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
    deployed = assert_deploys_exactly(block, x, block.conv)  # from frozen mode; keeps the PReLU's weight
    assert deployed.mode == "deployed"
    with pytest.raises(RuntimeError, match="deployed: it has no BatchNorm left"):
        deployed.freeze_batchnorm()


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_deployed_conv_keeps_memory_format(memory_format):
    block = randomized(ConvBN(4, 8, 5, stride=2, dilation=2, groups=4, padding_mode="reflect"), torch.float32, seed=5)
    block = block.to(memory_format=memory_format)
    x = torch.randn(2, 4, 11, 11).to(memory_format=memory_format)
    assert_deploys_exactly(block, x, block.conv)


def test_failed_reparameterize_leaves_block_unchanged():
    block = randomized(ConvBN(4, 4, 3), torch.float32, seed=6)
    with torch.no_grad():
        block.bn.running_var[1] = float("nan")
    state = {key: value.clone() for key, value in block.state_dict().items()}
    with pytest.raises(FoldError, match="running_var is not finite"):
        block.reparameterize()
    assert block.mode == "train"
    after = block.state_dict()
    assert set(after) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)


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
