"""The two in-place primitives that every fold is made of, with interchangeable backends.

* :func:`rescale_` multiplies each weight by a per-output-channel and/or a
  per-input-channel float64 factor (a BatchNorm after or before the layer);
* :func:`pad_add_` adds a small kernel, optionally scaled per output channel,
  into the aligned window of a larger one (a re-parameterization branch).

Both take whole lists of tensors, so that a model is folded with one call (one
kernel launch per dtype on a GPU). Each is a ``torch.library`` op
(``torch.ops.fusedconv.rescale_`` and ``torch.ops.fusedconv.pad_add_``),
defined once here with:

* an implementation per dispatch key: CPU (the C++ extension's kernels, else
  the PyTorch reference), CUDA (the extension's CUDA kernels, else Triton,
  else the reference), and the reference for any other device;
* a fake implementation (``torch.library.register_fake``), so that
  torch.compile and torch.export can trace a call: it checks the arguments
  that need no memory (dtypes, devices, shapes, groups) and writes nothing.

The Python wrappers :func:`rescale_` and :func:`pad_add_` take ``backend=``
(or ``FUSEDCONV_BACKEND``) to force one of ``torch``, ``cpp``, ``cuda`` or
``triton`` (:mod:`fusedconv.kernels.backends`); that choice lives in the
wrapper, not in the ops' schemas. All backends compute in float64 and round
each written value once, so every backend gives the same bits. A weight that
is a strided view (neither contiguous nor channels_last) goes through the
reference, which reads through any strides.
"""

from __future__ import annotations

import bisect
import functools
import os
from typing import Optional, Sequence

import torch

from ..errors import BackendUnavailable, MissingExtensionWarning
from . import extension
from .backends import (
    BACKENDS,
    available_backends,
    backend_report,
    choose,
    resolve,
    why_device_unavailable,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "KernelInputError",
    "MissingExtensionWarning",
    "available_backends",
    "backend_report",
    "choose",
    "pad_add_",
    "rescale_",
    "resolve",
    "why_device_unavailable",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class KernelInputError(ValueError):
    """An argument of :func:`rescale_` or :func:`pad_add_` is malformed."""


def has_dense_rows(t: torch.Tensor) -> bool:
    """Contiguous or channels_last: every kernel walks such a tensor as one
    flat block in which dim 0 is the outermost dimension."""
    return (
        t.is_contiguous()
        or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    )


# The checks run on every call, for every weight, so a message is formatted only
# once a check has failed: ``what`` is an argument's name and its index in the list.
def _check_kernel_tensor(t: torch.Tensor, what: tuple[str, int], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{_named(what)} is {type(t).__name__}, not a Tensor")
    if t.dtype not in _FLOAT_DTYPES:
        raise KernelInputError(f"{_named(what)} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    if t.dim() < 2:
        raise KernelInputError(f"{_named(what)} has {t.dim()} dims; a weight has at least 2")
    if t.device != device:
        raise KernelInputError(f"{_named(what)} is on {t.device}, the first tensor on {device}")


def _check_scale(scale: torch.Tensor | None, length, what: tuple[str, int], device: torch.device) -> None:
    if scale is None:
        return
    if scale.dtype != torch.float64:
        raise KernelInputError(f"{_named(what)} must be float64, got {scale.dtype}")
    # shape[0], not numel(): under torch.compile's dynamic shapes both sides may be symbolic
    if not (scale.dim() == 1 and scale.shape[0] == length):
        raise KernelInputError(f"{_named(what)} has shape {tuple(scale.shape)}; expected ({length},)")
    if scale.device != device:
        raise KernelInputError(f"{_named(what)} is on {scale.device}, the weights on {device}")


def _named(what: tuple[str, int]) -> str:
    return f"{what[0]}[{what[1]}]"


def _has_memory(tensors) -> bool:
    """Whether the tensors have real memory to compare (not fake or meta tensors,
    as torch.compile and torch.export trace with)."""
    for t in tensors:
        if t.is_meta or type(t).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
            return False
    return True


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _check_written(weights, sources) -> None:
    """Each written element must be a function of one element read, whatever
    order a backend works in: distinct weights may not overlap, and a separate
    source must match its weight's layout, may not overlap any weight written,
    and its weight may be listed only once."""
    if sources is not None:
        if len(sources) != len(weights):
            raise KernelInputError(f"rescale_ needs one source per weight ({len(weights)} weights, "
                                   f"{len(sources)} sources)")
    if not _has_memory(weights) or (sources is not None and not _has_memory(sources)):
        return  # no memory to compare: the real call checks overlaps
    spans = sorted({_span(w) for w in weights if w.numel()})
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise KernelInputError("rescale_ cannot write overlapping views of one tensor")
    if sources is None:
        return
    if len(spans) != sum(1 for w in weights if w.numel()):
        raise KernelInputError("rescale_ with sources cannot write a weight twice")
    starts = [start for start, _ in spans]
    for i, (w, src) in enumerate(zip(weights, sources)):
        _check_kernel_tensor(src, ("sources", i), w.device)
        if not (src.dtype == w.dtype and src.shape == w.shape and src.stride() == w.stride()):
            raise KernelInputError(f"sources[{i}] ({src.dtype}, shape {tuple(src.shape)}, strides {src.stride()}) does "
                                   f"not match weights[{i}] ({w.dtype}, shape {tuple(w.shape)}, strides {w.stride()})")
        if src.numel() == 0 or _span(src) == _span(w):
            continue
        start, end = _span(src)
        k = bisect.bisect_left(starts, end) - 1
        if not (k < 0 or spans[k][1] <= start):
            raise KernelInputError(f"sources[{i}] overlaps a weight that the call writes")


def check_rescale_args(weights, row_scales, col_scales, groups, sources=None) -> None:
    """Raise :class:`KernelInputError` unless the arguments of :func:`rescale_` are well formed."""
    n = len(weights)
    if not (len(row_scales) == len(col_scales) == len(groups) == n):
        raise KernelInputError(f"rescale_ needs one row scale, column scale and group count per weight "
                               f"({n} weights, {len(row_scales)}, {len(col_scales)}, {len(groups)})")
    device = weights[0].device if weights else None
    for i, (w, row, col, g) in enumerate(zip(weights, row_scales, col_scales, groups)):
        _check_kernel_tensor(w, ("weights", i), device)
        shape = w.shape  # read once: each read makes a new torch.Size
        if not (g >= 1 and shape[0] % g == 0):
            raise KernelInputError(f"weights[{i}]: {shape[0]} rows do not split into {g} groups")
        _check_scale(row, shape[0], ("row_scales", i), device)
        _check_scale(col, g * shape[1], ("col_scales", i), device)
    _check_written(weights, sources)


def check_pad_add_args(bigs, smalls, scales, offsets, dilations) -> None:
    """Raise :class:`KernelInputError` unless the arguments of :func:`pad_add_` are well formed."""
    n = len(bigs)
    if not (len(smalls) == len(scales) == n):
        raise KernelInputError(f"pad_add_ needs one small kernel and scale per big kernel "
                               f"({n} big, {len(smalls)} small, {len(scales)} scales)")
    spatial_total = sum(b.dim() - 2 for b in bigs)
    if not (len(offsets) == len(dilations) == spatial_total):
        raise KernelInputError(f"pad_add_ needs one offset and dilation per spatial dim of each big kernel "
                               f"({spatial_total}); got {len(offsets)} offsets and {len(dilations)} dilations")
    at = 0
    device = bigs[0].device if bigs else None
    for i, (big, small, scale) in enumerate(zip(bigs, smalls, scales)):
        _check_kernel_tensor(big, ("bigs", i), device)
        _check_kernel_tensor(small, ("smalls", i), device)
        if small.dtype != big.dtype:
            raise KernelInputError(f"smalls[{i}] is {small.dtype} but bigs[{i}] is {big.dtype}")
        if not (small.dim() == big.dim() and small.shape[:2] == big.shape[:2]):
            raise KernelInputError(f"smalls[{i}] has shape {tuple(small.shape)}, which does not fit bigs[{i}] "
                                   f"{tuple(big.shape)}")
        for d in range(big.dim() - 2):
            off, dil, k, K = offsets[at + d], dilations[at + d], small.shape[2 + d], big.shape[2 + d]
            if not (dil >= 1 and off >= 0 and off + dil * (k - 1) < K):
                raise KernelInputError(f"pair {i}, spatial dim {d}: {k} taps at offset {off} and dilation {dil} do "
                                       f"not fit in {K}")
        at += big.dim() - 2
        _check_scale(scale, big.shape[0], ("scales", i), device)


def _dense_scales(scales: list) -> list:
    """The scale vectors, each contiguous: the C++, CUDA and Triton kernels read
    element ``r`` at offset ``r`` (a strided view, a BN's gain read through a
    slice, is copied once here)."""
    return [s if s is None or s.is_contiguous() else s.contiguous() for s in scales]


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def _rescale(weights, row_scales, col_scales, groups, sources=None, backend: Optional[str] = None) -> None:
    """Check, then scale with ``backend`` (None: the fastest for the device);
    weights that are strided views go through the reference."""
    check_rescale_args(weights, row_scales, col_scales, groups, sources)
    if not weights:
        return
    row_scales, col_scales = _dense_scales(row_scales), _dense_scales(col_scales)
    if sources is None:
        sources = weights
    else:
        # Backends skip a weight without scales (in place there is nothing to
        # do); written from a separate source it is a plain copy.
        for w, src, row, col in zip(weights, sources, row_scales, col_scales):
            if row is None and col is None and src is not w:
                w.copy_(src)
    dense = [i for i, (w, src) in enumerate(zip(weights, sources)) if has_dense_rows(w) and src.stride() == w.stride()]
    strided = sorted(set(range(len(weights))) - set(dense))
    for members, chosen in ((dense, resolve(_device_of(weights), backend)), (strided, resolve(_device_of(weights), "torch"))):
        if members:
            chosen.rescale_([weights[i] for i in members], [row_scales[i] for i in members],
                            [col_scales[i] for i in members], [groups[i] for i in members],
                            [sources[i] for i in members])


def _pad_add(bigs, smalls, scales, offsets, dilations, backend: Optional[str] = None) -> None:
    check_pad_add_args(bigs, smalls, scales, offsets, dilations)
    if not bigs:
        return
    scales = _dense_scales(scales)
    smalls = [small.contiguous() for small in smalls]
    # One strided big kernel sends the call to the reference (which reads through any strides).
    chosen = backend if all(has_dense_rows(big) for big in bigs) else "torch"
    resolve(_device_of(bigs), chosen).pad_add_(bigs, smalls, scales, offsets, dilations)


def _rescale_fake(weights, row_scales, col_scales, groups, sources=None) -> None:
    check_rescale_args(weights, row_scales, col_scales, groups, sources)


def _pad_add_fake(bigs, smalls, scales, offsets, dilations) -> None:
    check_pad_add_args(bigs, smalls, scales, offsets, dilations)


# Declared with torch.library.Library rather than the torch.library.custom_op
# decorator: custom_op wraps every kernel in torch._dynamo.disable, and the first
# call then imports torch._dynamo (and sympy), about 1.3 s, longer than folding
# a whole ResNet-50.
_LIBRARY = torch.library.Library("fusedconv", "DEF")
_LIBRARY.define(
    "rescale_(Tensor(a!)[] weights, Tensor?[] row_scales, Tensor?[] col_scales, int[] groups, "
    "Tensor[]? sources=None) -> ()"
)
_LIBRARY.define("pad_add_(Tensor(a!)[] bigs, Tensor[] smalls, Tensor?[] scales, int[] offsets, int[] dilations) -> ()")
# Each device key runs the fastest backend that loads there; any other device the reference.
for _key in ("CPU", "CUDA", "CompositeExplicitAutograd"):
    _chosen = None if _key != "CompositeExplicitAutograd" else "torch"
    _LIBRARY.impl("rescale_", functools.partial(_rescale, backend=_chosen), _key)
    _LIBRARY.impl("pad_add_", functools.partial(_pad_add, backend=_chosen), _key)
torch.library.register_fake("fusedconv::rescale_", _rescale_fake, lib=_LIBRARY)
torch.library.register_fake("fusedconv::pad_add_", _pad_add_fake, lib=_LIBRARY)


def _forced_backend(backend: str | None) -> str | None:
    return backend if backend is not None else os.environ.get("FUSEDCONV_BACKEND") or None


def rescale_(
    weights: Sequence[torch.Tensor],
    row_scales: Sequence[torch.Tensor | None],
    col_scales: Sequence[torch.Tensor | None],
    groups: Sequence[int],
    *,
    sources: Sequence[torch.Tensor] | None = None,
    backend: str | None = None,
) -> None:
    """Scale weights in place: ``W[r, c, ...] *= row_scale[r] * col_scale[g(r) * cols + c]``.

    ``r`` and ``c`` index a weight's dims 0 and 1, ``g(r) = r // (rows / groups)``
    is the group of row ``r``. Conv weights ``(out, in/groups, *k)`` take a BN
    after the layer as ``row_scale`` and a BN before it as ``col_scale``;
    ConvTranspose weights ``(in, out/groups, *k)`` the other way round; Linear
    with ``groups=1``. Scales are float64 vectors (None for 1); the product is
    formed in float64 and each weight rounded once. Weights are all on one
    device, any floating dtype; contiguous or channels_last weights go to the
    fast backends, others (strided views) to the reference. ``backend`` (or the
    ``FUSEDCONV_BACKEND`` variable) forces a backend; by default the fastest
    that loads for the device is used.

    With ``sources``, ``W = S * factors`` instead: each weight is only written,
    from the source of the same dtype, shape and strides (a folded *copy* in one
    pass over the memory, instead of a copy followed by an in-place pass). The
    weights must then be distinct and must not overlap any other source.
    """
    arguments = (list(weights), list(row_scales), list(col_scales), [int(g) for g in groups],
                 None if sources is None else list(sources))
    forced = _forced_backend(backend)
    with torch.no_grad():
        if forced is None and sources is None and _ran_directly("rescale_in_place", *arguments[:4]):
            return
        if forced is None:
            torch.ops.fusedconv.rescale_(*arguments)
        else:  # a backend asked for by name is called directly: the op's schema knows no backends
            _rescale(*arguments, backend=forced)


def _ran_directly(entry: str, *arguments) -> bool:
    """Whether the extension's CPU kernel has run, called directly through
    ``entry`` (``rescale_in_place`` or ``pad_add_in_place``, csrc/cpu/): what
    the op does on the CPU by default, without its two dispatches and the
    Python checks between them. The entry declines (and the op runs, handling
    or reporting the arguments) anything but plain dense CPU tensors and
    well-formed arguments, in torch's default dispatch state with no profiler
    or other record-function observer (csrc/cpu/direct_call.h). Torch function
    modes, which would see the op, and torch.compile, which traces the op into
    its graph, are checked here."""
    direct = extension.native_function(entry)
    if direct is None or torch._C._is_torch_function_mode_enabled() or torch.compiler.is_compiling():
        return False
    return direct(*arguments) is True


def pad_add_(
    bigs: Sequence[torch.Tensor],
    smalls: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor | None],
    offsets: Sequence[int],
    dilations: Sequence[int],
    *,
    backend: str | None = None,
) -> None:
    """Add small kernels into windows of big ones, in place:
    ``big[o, i, off + j * dil] += small[o, i, j] * scale[o]`` (per spatial dim).

    ``offsets`` and ``dilations`` hold one entry per spatial dim of each big
    kernel, concatenated. ``scale`` is a float64 vector (None for 1); the sum is
    formed in float64 and rounded once. Big and small kernels of a pair share
    their dtype and first two dims.
    """
    arguments = (list(bigs), list(smalls), list(scales), [int(o) for o in offsets], [int(d) for d in dilations])
    forced = _forced_backend(backend)
    with torch.no_grad():
        if forced is None and _ran_directly("pad_add_in_place", *arguments):
            return
        if forced is None:
            torch.ops.fusedconv.pad_add_(*arguments)
        else:
            _pad_add(*arguments, backend=forced)


# The prebuilt extension (fusedconv/_C*.so) loads with the package, not in a first fold.
extension.load_prebuilt()
