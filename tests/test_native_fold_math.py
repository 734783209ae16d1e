"""The extension's fold math (csrc/affines.cpp: bn_affines, folded_biases)
against the torch code of fusedconv.affine and fusedconv.fold it stands in for
on the CPU: the same bits for every dtype, shape and eps, the same errors for
bad statistics, and the torch path taken for whatever it does not read
directly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusedconv
from fusedconv import FoldError, affine, fold
from fusedconv.affine import BatchNormStats
from fusedconv.kernels.extension import native_function

pytestmark = pytest.mark.skipif(native_function("bn_affines") is None or native_function("folded_biases") is None,
                                reason="the extension is not built")


def _stats(channels: int, dtype: torch.dtype, *, generator: torch.Generator, affine_part: bool = True,
           eps: float = 1e-5, name: str = "bn") -> BatchNormStats:
    def draw(low, high):
        return (torch.rand(channels, generator=generator, dtype=torch.float64) * (high - low) + low).to(dtype)

    gamma = draw(-2.0, 2.0) if affine_part else None  # negative gammas too
    beta = draw(-1.0, 1.0) if affine_part else None
    return BatchNormStats(draw(-3.0, 3.0), draw(0.01, 4.0), gamma, beta, eps, name)


def _assert_same(native, reference) -> None:
    assert native is not None and len(native) == len(reference)
    for got, want in zip(native, reference):
        for a, b in ((got.scale, want.scale), (got.shift, want.shift)):
            assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape and not a.requires_grad
            assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("dtypes", [
    [torch.float32], [torch.float64], [torch.float16], [torch.bfloat16],
    [torch.float32, torch.float64, torch.bfloat16, torch.float16],  # mixed within one call
], ids=["float32", "float64", "float16", "bfloat16", "mixed"])
@pytest.mark.parametrize("eps", ["same", "mixed"])
def test_native_bn_affines_are_the_torch_ones_bit_for_bit(dtypes, eps):
    generator = torch.Generator().manual_seed(7)
    sizes = [16, 3, 64, 1, 0, 40, 7]  # a BN without channels too
    group = [_stats(n, dtypes[i % len(dtypes)], generator=generator, affine_part=i % 3 != 2,
                    eps=1e-5 if eps == "same" else [1e-5, 1e-3, 0.1][i % 3], name=f"bn{i}")
             for i, n in enumerate(sizes)]
    _assert_same(affine._native_affines(group), affine._affines(group))
    _assert_same(affine.batchnorm_affines(group), affine._affines(group))  # the native path, taken


def test_native_bn_affines_of_parameters_track_no_gradient():
    bn = torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.0, 1.0)
    stats = [BatchNormStats(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)]
    _assert_same(affine._native_affines(stats), affine._affines(stats))


@pytest.mark.parametrize("bad, message", [
    ("nan mean", "bn1: running_mean is not finite"),
    ("inf gamma", "bn1: weight is not finite"),
    ("negative var", "bn1: running_var is negative"),
    ("zero var, zero eps", "bn1: running_var \\+ eps is zero"),
])
def test_native_bn_affines_raise_what_torch_raises(bad, message):
    generator = torch.Generator().manual_seed(3)
    group = [_stats(8, torch.float32, generator=generator, name=f"bn{i}") for i in range(3)]
    broken = group[1]
    if bad == "nan mean":
        broken.running_mean[2] = float("nan")
    elif bad == "inf gamma":
        broken.weight[0] = float("inf")
    elif bad == "negative var":
        broken.running_var[5] = -1.0
    else:
        broken.running_var[1] = 0.0
        broken.eps = 0.0
    for compute in (affine._native_affines, affine._affines):
        with pytest.raises(FoldError, match=message):
            compute(group)


def test_native_bn_affines_accept_a_variance_just_below_zero_as_torch_does():
    """running_var in (-eps, 0): running_var + eps is positive, so both paths fold it."""
    group = [_stats(4, torch.float32, generator=torch.Generator().manual_seed(1))]
    group[0].running_var[0] = -1e-6
    _assert_same(affine._native_affines(group), affine._affines(group))


@pytest.mark.parametrize("odd", ["strided", "integer", "channels disagree", "subclass"])
def test_native_bn_affines_leave_what_they_do_not_read_to_torch(odd):
    group = [_stats(6, torch.float32, generator=torch.Generator().manual_seed(2)) for _ in range(2)]
    if odd == "strided":
        group[1].running_mean = torch.randn(12)[::2]
    elif odd == "integer":
        group[0].running_var = torch.arange(1, 7)
    elif odd == "channels disagree":
        group[1].weight = torch.randn(5)
    else:
        group[0].bias = torch.randn(6).as_subclass(_Subclass)
    assert affine._native_affines(group) is None
    if odd != "channels disagree":  # a BN whose gamma has another channel count is no BN torch can run
        _assert_same(affine.batchnorm_affines(group), affine._affines(group))


class _Subclass(torch.Tensor):
    pass


def _biases_case(dtype: torch.dtype, *, with_biases: str, with_extras: str, generator: torch.Generator):
    sizes = [8, 1, 0, 33, 5]
    scales = [torch.randn(n, generator=generator, dtype=torch.float64) for n in sizes]
    shifts = [torch.randn(n, generator=generator, dtype=torch.float64) for n in sizes]
    if sizes[0]:
        scales[0][0], shifts[0][0] = -1.5, -0.0  # no bias: 0 * -1.5 + -0.0 is -0.0, and +0.0 once a 0 is added
    biases = [None if with_biases == "none" or (with_biases == "some" and i % 2) else
              torch.randn(n, generator=generator).to(dtype) for i, n in enumerate(sizes)]
    extras = [None if with_extras == "none" or (with_extras == "some" and i % 2 == 0) else
              torch.randn(n, generator=generator, dtype=torch.float64) for i, n in enumerate(sizes)]
    return scales, shifts, biases, extras


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_biases", ["none", "some", "all"])
@pytest.mark.parametrize("with_extras", ["none", "some"])
def test_native_folded_biases_are_the_torch_ones_bit_for_bit(dtype, with_biases, with_extras):
    generator = torch.Generator().manual_seed(11)
    scales, shifts, biases, extras = _biases_case(dtype, with_biases=with_biases, with_extras=with_extras,
                                                  generator=generator)
    native = fold._native_biases(scales, shifts, biases, extras, dtype)
    row_scales, reference = fold._batched_biases(scales, shifts, biases, extras, torch.device("cpu"), dtype)
    assert native is not None
    assert all(a is b for a, b in zip(native[0], row_scales))
    for got, want in zip(native[1], reference):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert torch.equal(_bits(got), _bits(want))  # the same bits, signs of zeros included
    # each its own tensor: a new Parameter takes it without a copy
    pointers = [t.untyped_storage().data_ptr() for t in native[1] if t.numel()]
    assert len(set(pointers)) == len(pointers)


@pytest.mark.parametrize("odd", ["float32 scale", "strided shift", "integer bias", "subclass extra", "int8 dtype"])
def test_native_folded_biases_leave_what_they_do_not_read_to_torch(odd):
    scales, shifts, biases, extras = _biases_case(torch.float32, with_biases="all", with_extras="some",
                                                  generator=torch.Generator().manual_seed(5))
    dtype = torch.float32
    if odd == "float32 scale":
        scales[1] = scales[1].float()
    elif odd == "strided shift":
        shifts[3] = torch.randn(66, dtype=torch.float64)[::2]
    elif odd == "integer bias":
        biases[0] = torch.arange(8)
    elif odd == "subclass extra":
        extras[1] = extras[1].as_subclass(_Subclass)
    else:
        dtype = torch.int8
    assert fold._native_biases(scales, shifts, biases, extras, dtype) is None


def test_fold_adopts_native_biases_and_matches_the_torch_path(monkeypatch):
    """A model folded with the extension's math and with the torch code: the
    same bits in every weight and bias, and each new bias a Parameter of its
    own (no view of a shared batch: saving one saves only its values)."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16 * 36, 10, bias=False),
                              nn.BatchNorm1d(10))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.data.uniform_(-2, 2)
                m.bias.data.uniform_(-1, 1)
        return model.eval()

    native = fusedconv.fuse(build())
    monkeypatch.setattr(affine, "native_function", lambda name: None)
    monkeypatch.setattr(fold, "native_function", lambda name: None)
    reference = fusedconv.fuse(build())
    assert native.state_dict().keys() == reference.state_dict().keys()
    for key, value in native.state_dict().items():
        assert torch.equal(_bits(value), _bits(reference.state_dict()[key])), key
    for layer in (native[0], native[6]):
        assert layer.bias._base is None and layer.bias.untyped_storage().nbytes() == layer.bias.nbytes
        assert layer.bias.requires_grad == layer.weight.requires_grad


@pytest.mark.parametrize("native", [True, False])
def test_set_biases_takes_a_folds_own_bias_without_a_copy(native, monkeypatch):
    """The bias that the extension made for a layer becomes its Parameter as it
    is; one of the torch path's (a view of a batch) is copied into a new one."""
    if not native:
        monkeypatch.setattr(fold, "native_function", lambda name: None)
    layers = [nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(3, 5, 1, bias=False)]
    generator = torch.Generator().manual_seed(4)
    affines = [(None, affine.ChannelAffine(torch.randn(n, generator=generator, dtype=torch.float64),
                                           torch.randn(n, generator=generator, dtype=torch.float64))) for n in (4, 5)]
    folds = fold.plan_layer_folds(layers, affines, ["a", "b"])
    assert [f.owns_bias for f in folds] == [native, native]
    fold.set_biases(layers, [f.bias for f in folds], owned=[f.owns_bias for f in folds])
    for layer, planned in zip(layers, folds):
        assert torch.equal(layer.bias.detach(), planned.bias)
        assert (layer.bias.data_ptr() == planned.bias.data_ptr()) == native
        assert type(layer.bias) is nn.Parameter and layer.bias.requires_grad
