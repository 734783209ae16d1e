"""The two ops as PyTorch 2 citizens: ``torch.library.opcheck`` with all of its
default checks (schema, fake tensors, autograd registration, AOT dispatch with
static and dynamic shapes), and ``torch.compile(fullgraph=True)`` of a function
that calls each op. On the CPU here; the CUDA variants are marked ``gpu``."""

from __future__ import annotations

import pytest
import torch

from fusedconv import kernels  # (importing it defines torch.ops.fusedconv)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _scale(n: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """Random float64 scales away from 0 and 1 (both hide a wrong axis)."""
    signs = torch.where(torch.rand(n, generator=gen) < 0.2, -1.0, 1.0)
    return ((torch.rand(n, generator=gen, dtype=torch.float64) + 0.5) * signs).to(device)


def rescale_cases(device: str):
    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 3, 3, 3, generator=gen).to(device)
    grouped = torch.randn(6, 2, 3, generator=gen).to(device)  # 3 groups of 2 rows, 2 columns each
    linear = torch.randn(5, 7, generator=gen, dtype=torch.float64).to(device)
    channels_last = torch.randn(4, 6, 2, 2, generator=gen).to(device).to(memory_format=torch.channels_last)
    return {
        "row": ([conv], [_scale(8, gen, device)], [None], [1]),
        "column_groups": ([grouped], [None], [_scale(6, gen, device)], [3]),
        "both_float64": ([linear], [_scale(5, gen, device)], [_scale(7, gen, device)], [1]),
        "several": ([conv.clone(), channels_last], [_scale(8, gen, device), None], [None, _scale(6, gen, device)],
                    [1, 1]),
    }


def pad_add_cases(device: str):
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(4, 2, 3, 3, generator=gen).to(device)
    small = torch.randn(4, 2, 1, 1, generator=gen).to(device)
    big1d = torch.randn(3, 3, 5, generator=gen).to(device)
    small1d = torch.randn(3, 3, 2, generator=gen).to(device)
    return {
        "centre": ([big], [small], [_scale(4, gen, device)], [1, 1], [1, 1]),
        "dilated_1d": ([big1d], [small1d], [None], [0], [3]),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(rescale_cases("cpu")))
def test_rescale_passes_opcheck(case, device):
    torch.library.opcheck(torch.ops.fusedconv.rescale_.default, rescale_cases(device)[case])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(pad_add_cases("cpu")))
def test_pad_add_passes_opcheck(case, device):
    torch.library.opcheck(torch.ops.fusedconv.pad_add_.default, pad_add_cases(device)[case])


def test_rescale_with_sources_passes_opcheck():
    gen = torch.Generator().manual_seed(2)
    source = torch.randn(6, 4, 3, generator=gen)
    torch.library.opcheck(torch.ops.fusedconv.rescale_.default,
                          ([torch.empty_like(source)], [_scale(6, gen, "cpu")], [None], [1], [source]))


# Each op called as itself and through its Python wrapper (fusedconv.kernels),
# which must trace to the op, not to the extension's direct CPU entry.
CALLERS = ["op", "wrapper"]


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("device", DEVICES)
def test_rescale_compiles_with_fullgraph(device, caller):
    weights, rows, cols, groups = rescale_cases(device)["several"]
    expected = [w.clone() for w in weights]
    torch.ops.fusedconv.rescale_(expected, rows, cols, groups)
    rescale = torch.ops.fusedconv.rescale_ if caller == "op" else kernels.rescale_

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fold(ws):
        rescale(ws, rows, cols, groups)
        return ws[0] + 0

    torch._dynamo.reset()
    out = fold(weights)
    assert all(torch.equal(w, e) for w, e in zip(weights, expected))
    assert torch.equal(out, expected[0])


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("device", DEVICES)
def test_pad_add_compiles_with_fullgraph(device, caller):
    bigs, smalls, scales, offsets, dilations = pad_add_cases(device)["centre"]
    expected = [b.clone() for b in bigs]
    torch.ops.fusedconv.pad_add_(expected, smalls, scales, offsets, dilations)
    pad_add = torch.ops.fusedconv.pad_add_ if caller == "op" else kernels.pad_add_

    @torch.compile(fullgraph=True, backend="aot_eager")
    def merge(bs):
        pad_add(bs, smalls, scales, offsets, dilations)
        return bs[0] * 1

    torch._dynamo.reset()
    out = merge(bigs)
    assert torch.equal(bigs[0], expected[0]) and torch.equal(out, expected[0])


def test_fake_tensors_are_checked_without_memory():
    """The fake implementation checks what needs no memory (here: groups)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        weight = torch.empty(4, 3, 3, 3)
        torch.ops.fusedconv.rescale_([weight], [torch.empty(4, dtype=torch.float64)], [None], [1])
        with pytest.raises(ValueError, match="do not split into 3"):
            torch.ops.fusedconv.rescale_([weight], [None], [None], [3])
