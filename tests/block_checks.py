"""What the block tests share: the accuracy rule, random blocks and inputs, and the deployment checks.

Used by ``test_convbn.py`` and the ``test_blocks_*.py`` files (imported like
:mod:`utils`: ``from block_checks import ...``).

Accuracy rule (every test that compares a fused computation with its
block's branches: a deployed conv, or ConvBN's frozen mode, which folds on the
fly). Against a float64 reference (:func:`utils.float64_reference`: the
block's float64 copy, on the float64 copy of the very input the block reads),
the fused computation's relative error is at most

    max(MAX_RATIO * err(branched block, same dtype), ERROR_FLOOR[dtype])

(:func:`assert_as_accurate`). The branched block and the merged conv round in
different places (the merged kernel once per tap, the branches' outputs and
BN outputs once per branch), so their errors differ by a factor that scatters
around 1, while a forgotten BN scale, a misplaced tap, a wrong axis or a
dropped branch gives relative errors of 1e-2 to 1. Every compared output has
at least MIN_OUTPUT_VALUES values (:func:`input_shape`): a relative error over
a handful of values is too noisy to bound by a ratio (with 2-sample inputs
the ratio reached 6 to 7 on tiny outputs, which larger floors used to absorb).
Tolerances below are in units of the dtype's unit roundoff u (the relative
size of one rounding): 2^-24 = 6e-8 (float32), 2^-11 = 4.9e-4 (float16),
2^-8 = 3.9e-3 (bfloat16).

* MAX_RATIO = 4 in every dtype. Measured with this sizing, the ratio of the
  deployed error to the branched block's reached 2.2 over 5000 random ConvBNs
  (all dtypes); 2.4 over 5500 float16/bfloat16 RepVGGBlock/RepConv/ACBlock/
  MobileOneBlock draws and 3.7 over 3200 float32 ones (above 4 only in draws
  whose error, at most 3.4 u, is under the floor); 2.4 over 3000 float32
  DBB/OREPA/LargeKernelConv/DilatedReparamBlock/ImplicitConv draws; 1.4 over
  the fixed float16/bfloat16 cases of those blocks with 40 seeds each.
* ERROR_FLOOR covers a branched block that happens to be almost exact (one
  channel, a 1-tap kernel), where 4x its error is less than the fused
  computation's own few roundings: float32 1e-6 (~16 u); float16 2.5e-4 and
  bfloat16 2e-3 (~u/2, below one rounding: in the half-precision draws above
  the branched error was at least 0.2 u, so the ratio decides there). float64
  blocks *are* their reference (the branched float64 block's error is exactly
  0), so only the floor applies: 1e-12. A float64 merge rounds each weight a
  few times at 2^-53, which stays below 1e-13 even summed over a 31x31 kernel
  (measured worst: 2e-14); rounding any term to float32 would show as ~1e-8
  and a wrong tap or axis as ~1e-1.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fusedconv.blocks.acnet import ACBlock
from fusedconv.blocks.convbn import ConvBN
from fusedconv.blocks.dbb import DiverseBranchBlock
from fusedconv.blocks.implicit import ImplicitConv
from fusedconv.blocks.mobileone import MobileOneBlock
from fusedconv.blocks.orepa import OREPABlock
from fusedconv.blocks.replknet import DilatedReparamBlock, LargeKernelConv
from fusedconv.blocks.repvgg import RepVGGBlock
from fusedconv.errors import FoldError
from fusedconv import reparameterize
from fusedconv.reparam import ConvGeometry
from utils import float64_reference, randomize_batchnorm_stats, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Property tests: 30 examples each, no deadline (an example's time depends on
# its draw: a dilated 31-tap or 3d kernel costs far more than a 1x1).
PROPERTY = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# The accuracy rule (module doc).
MAX_RATIO = 4.0
ERROR_FLOOR = {
    torch.float32: 1e-6,
    torch.float64: 1e-12,
    torch.float16: 2.5e-4,
    torch.bfloat16: 2e-3,
}
MIN_OUTPUT_VALUES = 128


def assert_as_accurate(fused, branched, reference, dtype: torch.dtype, what: str = "deployed",
                       floor_scale: float | None = None, floors: dict[torch.dtype, float] = ERROR_FLOOR) -> None:
    """The accuracy rule: ``fused``'s relative error against ``reference`` is at most
    max(MAX_RATIO x ``branched``'s, ``floors[dtype]``), ``floors`` being ERROR_FLOOR
    unless a test justifies another table. The floor is relative to
    ``||reference||``, or to ``floor_scale`` for a result computed as a
    difference of terms of that size (its rounding errors scale with the terms)."""
    if floor_scale is None:
        fused_error, branched_error = relative_error(fused, reference), relative_error(branched, reference)
        floor = floors[dtype]
    else:
        # The same rule multiplied through by ||reference||: absolute errors
        # against a floor of floor_scale, which also holds where the reference
        # is all zero (terms that cancel exactly).
        fused_error, branched_error = (float((x.double() - reference.double()).norm()) for x in (fused, branched))
        floor = floors[dtype] * floor_scale
    bound = max(MAX_RATIO * branched_error, floor)
    assert fused_error <= bound, (f"{what} error {fused_error:.3g} > bound {bound:.3g} "
                                  f"(branched {dtype} error {branched_error:.3g})")


# ---------------------------------------------------------------------------
# random blocks and inputs
# ---------------------------------------------------------------------------


def randomized(block: nn.Module, dtype: torch.dtype, seed: int) -> nn.Module:
    """``block`` with random conv weights and BN statistics (never zeros or ones), in
    ``dtype`` and eval mode: for blocks built of :class:`ConvBN` branches.

    Every ``*conv.weight`` is drawn N(0, 1 / fan_in), so that branches of any
    kernel size contribute at similar scales (a dropped 1x1 branch shows next
    to a 31x31 one), every ``*conv.bias`` N(0, 0.3^2). Weights come from a
    seeded generator, not torch's global one."""
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


def perturbed(module: nn.Module, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """``module`` with every parameter perturbed and every BN statistic random, in
    ``dtype``, eval mode and on DEVICE: for blocks whose parameters are not all convs.

    Each parameter gets N(0, 0.3^2) added to its initial value, so that a term
    initialised at a constant (DBB's identity residual at 0, OREPA's branch
    scales, ImplicitM's near-1 vector) cannot hide a dropped or misplaced term
    behind a zero or a one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    randomize_batchnorm_stats(module, generator)
    return module.eval().to(device=DEVICE, dtype=dtype)


def make_block(cls, *, dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs) -> nn.Module:
    """``cls(**kwargs)``, :func:`perturbed`."""
    return perturbed(cls(**kwargs), dtype, seed)


def random_input(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """N(0, 1) values drawn in float64 from ``generator``, then rounded to ``dtype``."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def _per_dim(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def input_shape(kwargs: dict, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The input shape ``(batch, in_channels, *spatial)`` of the block built from
    ``kwargs``, with a batch (at least 2) large enough for MIN_OUTPUT_VALUES
    output values: a relative error over a handful of values is too noisy to
    compare against a ratio. Sizes may be ints or one per spatial dim; a
    missing or None ``padding`` is "same"."""
    dims = len(spatial)
    kernel = _per_dim(kwargs["kernel_size"], dims)
    dilation = _per_dim(kwargs.get("dilation", 1), dims)
    stride = _per_dim(kwargs.get("stride", 1), dims)
    padding = kwargs.get("padding")
    padding = (tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation)) if padding is None
               else _per_dim(padding, dims))
    outputs = [(n + 2 * p - d * (k - 1) - 1) // s + 1
               for n, k, d, s, p in zip(spatial, kernel, dilation, stride, padding)]
    per_sample = kwargs["out_channels"] * math.prod(outputs)
    return (max(2, -(-MIN_OUTPUT_VALUES // per_sample)), kwargs["in_channels"]) + tuple(spatial)


def block_input(kwargs: dict, spatial: tuple[int, ...], seed: int,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random input of :func:`input_shape` on DEVICE (drawn from seed ``seed + 1``)."""
    return random_input(input_shape(kwargs, spatial), dtype, torch.Generator().manual_seed(seed + 1), DEVICE)


@st.composite
def channel_layouts(draw) -> dict:
    """Channels and groups: dense, grouped, depthwise (in == out == groups) and a depthwise channel multiplier."""
    layout = draw(st.sampled_from(["dense", "grouped", "depthwise", "multiplier"]))
    if layout == "dense":
        return dict(in_channels=draw(st.integers(1, 4)), out_channels=draw(st.integers(1, 4)), groups=1)
    if layout == "grouped":
        return dict(in_channels=2 * draw(st.integers(1, 2)), out_channels=2 * draw(st.integers(1, 2)), groups=2)
    channels = draw(st.integers(1, 4))
    return dict(in_channels=channels, out_channels=channels * (1 if layout == "depthwise" else 2), groups=channels)


# ---------------------------------------------------------------------------
# deployment checks
# ---------------------------------------------------------------------------

# The submodule of each block family that holds the conv the block deploys into
# (the first matching class wins: RepConv is a RepVGGBlock).
_MAIN_CONVS = (
    (ConvBN, "conv"),
    (ACBlock, "square.conv"),
    (RepVGGBlock, "dense.0.conv"),
    (MobileOneBlock, "dense.0.conv"),
    (DiverseBranchBlock, "origin.conv"),
    (OREPABlock, "conv"),
    (LargeKernelConv, "large.conv"),
    (DilatedReparamBlock, "large.conv"),
    (ImplicitConv, "conv"),
)


def main_conv(block: nn.Module) -> nn.Module:
    """The conv that ``block`` deploys into (before deployment): deployment merges
    every branch into it, in place, and it keeps its geometry."""
    for cls, path in _MAIN_CONVS:
        if isinstance(block, cls):
            return block.get_submodule(path)
    raise TypeError(f"no main conv known for {type(block).__name__}")


def assert_only_the_deployed_conv_left(block: nn.Module) -> None:
    """No branch, no BatchNorm left: the state_dict holds the deployed conv's weight
    and bias and the activation's parameters, nothing else."""
    assert block.deployed
    assert not any(hasattr(block, name) for name in block.branch_names)
    assert not any(isinstance(m, _BatchNorm) for m in block.modules())
    activation_keys = {f"activation.{key}" for key in block.activation.state_dict()}
    assert set(block.state_dict()) == {"deployed_conv.weight", "deployed_conv.bias"} | activation_keys


def assert_reparameterize_is_idempotent(block: nn.Module) -> None:
    """A second ``reparameterize()`` of the deployed ``block`` returns it and changes nothing."""
    conv = block.deployed_conv
    state = {key: value.clone() for key, value in block.state_dict().items()}
    assert block.reparameterize() is block
    assert block.deployed_conv is conv
    after = block.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(state[key], after[key]) for key in state)


def assert_deploys_exactly(block: nn.Module, x: torch.Tensor, conv: nn.Module | None = None) -> nn.Module:
    """Deploy a copy of the eval-mode ``block`` and check it; returns the deployed copy.

    ``x`` is rounded to the dtype of ``conv`` (default :func:`main_conv`), the
    conv that the block deploys into. Checks: output as accurate as the
    branched block's (:func:`assert_as_accurate`), no branch or BatchNorm left
    and only the deployed conv (and activation parameters) in the state_dict
    (:func:`assert_only_the_deployed_conv_left`), ``conv``'s geometry
    (channels, kernel, stride, padding, dilation, groups, padding_mode),
    dtype, device and memory format kept, a second ``reparameterize()``
    harmless (:func:`assert_reparameterize_is_idempotent`).
    """
    conv_before = main_conv(block) if conv is None else conv
    x = x.to(conv_before.weight.dtype)
    reference = float64_reference(block, (x,))
    deployed = copy.deepcopy(block)
    with torch.no_grad():
        branched = block(x)
        assert deployed.reparameterize() is deployed
        out = deployed(x)
    assert_as_accurate(out, branched, reference, x.dtype)

    assert_only_the_deployed_conv_left(deployed)
    conv = deployed.deployed_conv
    weight = conv_before.weight
    assert ConvGeometry.of(conv) == ConvGeometry.of(conv_before)
    assert conv.weight.dtype == conv.bias.dtype == weight.dtype
    assert conv.weight.device == conv.bias.device == weight.device
    assert conv.weight.is_contiguous() == weight.is_contiguous()
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(conv.weight.dim())
    if channels_last is not None:
        assert (conv.weight.is_contiguous(memory_format=channels_last)
                == weight.is_contiguous(memory_format=channels_last))
    assert_reparameterize_is_idempotent(deployed)
    return deployed


def assert_deploys_in_place(block: nn.Module, x: torch.Tensor) -> nn.Module:
    """``block.reparameterize()`` deploys ``block`` itself: it returns the block, the
    conv that held the main kernel (:func:`main_conv`) becomes ``deployed_conv``,
    nothing else is left (:func:`assert_only_the_deployed_conv_left`), and the
    output is the branched one within the dtype's ERROR_FLOOR."""
    weight = main_conv(block).weight
    with torch.no_grad():
        expected = block(x)
    assert block.reparameterize() is block
    assert_only_the_deployed_conv_left(block)
    assert block.deployed_conv.weight is weight
    with torch.no_grad():
        assert relative_error(block(x), expected) <= ERROR_FLOOR[weight.dtype]
    return block


def assert_registry_deploys_model(model: nn.Sequential, x: torch.Tensor) -> None:
    """:func:`fusedconv.reparameterize` deploys every block of ``model`` in
    place, leaves no BatchNorm, and the model's output obeys the accuracy rule."""
    reference = float64_reference(model, (x,))
    with torch.no_grad():
        branched = model(x)
        assert reparameterize(model) is model
        assert_as_accurate(model(x), branched, reference, x.dtype)
    assert all(block.deployed for block in model)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())


def assert_merge_fails_unchanged(block: nn.Module, match: str) -> None:
    """``block.reparameterize()`` raises :class:`FoldError` matching ``match`` and
    leaves the block as it was: not deployed, every branch in place, every
    state_dict entry bit-identical (NaN where it was NaN)."""
    state = {key: value.clone() for key, value in block.state_dict().items()}
    with pytest.raises(FoldError, match=match):
        block.reparameterize()
    assert not block.deployed and all(hasattr(block, name) for name in block.branch_names)
    after = block.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def assert_training_mode_refused(block: nn.Module) -> None:
    """A block in training mode is refused, by its ``reparameterize()`` and by the
    registry's, and stays as it was (its BN statistics are not final)."""
    with pytest.raises(FoldError, match="training mode"):
        block.reparameterize()
    with pytest.raises(FoldError, match="training mode"):
        reparameterize(nn.Sequential(block))
    assert not block.deployed and all(hasattr(block, name) for name in block.branch_names)


def assert_gradients_reach_every_parameter(block: nn.Module, x: torch.Tensor) -> None:
    """In training mode, a backward pass gives every parameter a nonzero gradient."""
    block.train()(x).square().sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name
