"""Writing a checked plan into a model, all or nothing.

Everything that can make a write fail, or make it write something the layer's
dtype cannot hold, is checked before the first write (:func:`check_writable`,
:func:`check_folded_range`). The writes then run inside a :class:`Rollback`:
should one still fail, the module swaps and bias writes made before it are
undone (the weights are written last, by one batched kernel call that checks
all its arguments before writing anything).
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import torch
from torch import nn

from . import distributed
from .errors import FoldError, FoldWarning
from .fold import LayerFold
from .layers import BatchNormKind, batchnorm_kind

# A per-channel scale above this is checked element by element for overflow;
# below it, a folded weight can overflow only if |weight| already exceeds
# finfo.max / 2**20 (3.2e32 for float32 and bfloat16).
_CHECKED_SCALE = 2.0 ** 20
# Rows scaled by less than this are searched for weights the fold turns subnormal.
_SHRINKING_SCALE = 2.0 ** -16


def why_no_values(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` holds no values fusedconv can read, or None."""
    if tensor.is_meta:
        return "it is on the meta device and holds no values (load the weights first)"
    if type(tensor) is torch.nn.Parameter or type(tensor) is torch.Tensor:
        return None  # neither a DTensor nor a wrapper subclass: most tensors, so the lookups below are skipped
    if distributed.is_dtensor(tensor):  # each rank holds a block: only a fold on every rank at once can write it
        return distributed.DTENSOR_REFUSAL
    if type(tensor).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
        return f"it is a {type(tensor).__name__}, whose values fusedconv does not read or write directly"
    return None


def why_not_writable(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` cannot be changed in place by a fold, or None."""
    problem = why_no_values(tensor)
    if problem:
        return problem
    if not tensor.is_floating_point():
        return f"its dtype {tensor.dtype} cannot hold a folded weight"
    if tensor.layout != torch.strided:
        return f"it has the {tensor.layout} layout, which fusedconv does not write"
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        return ("it was created under torch.inference_mode() and can only be changed inside it: call fuse "
                "inside `with torch.inference_mode():`, or fold a copy (inplace=False)")
    if tensor.requires_grad and not tensor.is_leaf:
        return "it is computed from other tensors (not a leaf), so writing it would not change the layer"
    return None


def check_writable(named: Iterable[tuple[str, torch.Tensor | None]], *, in_place: bool) -> None:
    """Raise :class:`FoldError` for the first tensor a fold could not read (or,
    ``in_place``, write), naming it."""
    check = why_not_writable if in_place else why_no_values
    for name, tensor in named:
        if tensor is None:
            continue
        problem = check(tensor)
        if problem:
            raise FoldError(f"{name}: {problem}")


def _factor_bounds(folds: Sequence[LayerFold]) -> tuple[list[float], list[float]]:
    """For each fold, the largest and the smallest ``|row_scale[r] * col_scale[c]|``
    any weight element gets (1.0 for no scale), from a few batched reductions."""
    largest, smallest = [1.0] * len(folds), [1.0] * len(folds)
    for part in ("row_scale", "col_scale"):
        present = [(i, getattr(fold, part)) for i, fold in enumerate(folds) if getattr(fold, part) is not None]
        for device in {scale.device for _, scale in present}:
            members = [(i, scale) for i, scale in present if scale.device == device]
            magnitudes = torch.cat([scale for _, scale in members]).abs()
            lengths = torch.tensor([scale.numel() for _, scale in members], device=device)
            maxima = torch.segment_reduce(magnitudes, "max", lengths=lengths).tolist()
            minima = torch.segment_reduce(magnitudes, "min", lengths=lengths).tolist()
            for (i, _), high, low in zip(members, maxima, minima):
                largest[i] *= high
                smallest[i] *= low
    return largest, smallest


def _row_factors(fold: LayerFold, weight: torch.Tensor, *, largest: bool) -> torch.Tensor:
    """Per row of ``weight``, the largest (or smallest) factor ``|row_scale[r] *
    col_scale[c]|`` that the fold multiplies one of its elements by."""
    factors = torch.ones(weight.shape[0], dtype=torch.float64, device=weight.device)
    if fold.row_scale is not None:
        factors = factors * fold.row_scale.abs()
    if fold.col_scale is not None:
        columns = fold.col_scale.abs()
        factors = factors * (columns.max() if largest else columns.min())
    return factors


def check_folded_range(weights: Sequence[torch.Tensor], folds: Sequence[LayerFold],
                       names: Sequence[str]) -> tuple[list[float], list[float]]:
    """Raise :class:`FoldError` if a folded weight or bias, rounded to its dtype,
    would not be finite (e.g. a float16 layer and a BN with a tiny variance).
    Returns each fold's largest and smallest factor, for :func:`subnormal_weights`."""
    if not folds:
        return [], []
    for device in {fold.bias.device for fold in folds}:
        members = [(name, fold.bias) for name, fold in zip(names, folds) if fold.bias.device == device]
        # Each bias is already rounded to its dtype; concatenating only widens, so
        # what is finite stays finite and inf stays inf.
        finite = torch.isfinite(torch.cat([bias.flatten() for _, bias in members]))
        if not finite.all():
            name = next(name for name, bias in members if not torch.isfinite(bias).all())
            raise FoldError(f"{name}: its folded bias would be inf or NaN in its dtype: convert the model to "
                            "float32 first, or check the BatchNorm statistics")
    largest, smallest = _factor_bounds(folds)
    for weight, fold, name, bound in zip(weights, folds, names, largest):
        finfo = torch.finfo(weight.dtype)
        limit = _CHECKED_SCALE if weight.dtype != torch.float16 else 1.0
        if weight.numel() == 0 or bound <= limit:
            continue
        factors = _row_factors(fold, weight, largest=True)
        dims = tuple(range(1, weight.dim()))
        magnitude = torch.maximum(weight.detach().amax(dim=dims).abs(), weight.detach().amin(dim=dims).abs())
        reach = float((magnitude.double() * factors).max())
        if reach > finfo.max:  # the bound says it may: round each candidate row to be sure
            rows = (magnitude.double() * factors > finfo.max).nonzero().flatten()
            values = weight.detach()[rows].double() * factors[rows].view(-1, *[1] * len(dims))
            if not torch.isfinite(values.to(weight.dtype)).all():
                raise FoldError(
                    f"{name}: its folded weights reach {reach:.3g}, beyond {weight.dtype}'s largest value "
                    f"{finfo.max:.6g}: convert the model to a wider dtype first, or check the BatchNorm statistics")
    return largest, smallest


def subnormal_weights(weights: Sequence[torch.Tensor], folds: Sequence[LayerFold], names: Sequence[str],
                      *, flush: bool, smallest: Sequence[float] | None = None) -> list[str]:
    """After a fold, the layers in which it made nonzero weights subnormal (on a
    CPU those slow inference several times over); with ``flush``, set them to zero.

    Only rows that the fold scaled by less than 2**-16 are searched: a row
    scaled by more turns a normal weight subnormal only if that weight was
    already within 2**16 of the subnormal range. ``smallest``: each fold's
    smallest factor, when :func:`check_folded_range` has worked it out.
    """
    found = []
    if smallest is None:
        _, smallest = _factor_bounds(folds)
    for weight, fold, name, low in zip(weights, folds, names, smallest):
        if weight.numel() == 0 or low >= _SHRINKING_SCALE:
            continue
        factors = _row_factors(fold, weight, largest=False)
        rows = (factors < _SHRINKING_SCALE).nonzero().flatten()
        with torch.no_grad():
            values = weight[rows]
            tiny = (values != 0) & (values.abs() < torch.finfo(weight.dtype).tiny)
            if tiny.any():
                found.append(name)
                if flush:
                    weight[rows] = values.masked_fill(tiny, 0)
    if found and not flush:
        warnings.warn(
            f"the fold made weights of {len(found)} layer(s) subnormal ({', '.join(found[:5])}); "
            "on a CPU these slow inference several times over: pass flush_subnormals=True (on the command line, "
            "--flush-subnormals) to set them to zero",
            FoldWarning, stacklevel=4)
    return found


def swap_batchnorms(modules: dict[str, nn.Module], bn_paths: dict[str, list[str]], rollback: "Rollback",
                    kinds: dict[str, BatchNormKind | None] | None = None) -> None:
    """Replace each folded BN (by name in ``modules``, a path -> module map) at every
    path where it is registered (``bn_paths``) by what stands in its place once
    folded (``nn.Identity``, or timm's activation), recording each swap in
    ``rollback``. ``kinds``: each BN's :func:`batchnorm_kind`, when the caller
    has looked them up already (a copy's BNs are of their originals' kinds)."""
    for name, paths in bn_paths.items():
        bn = modules[name]
        if isinstance(bn, nn.Identity):  # already replaced through a copy's memo
            continue
        kind = (kinds.get(name) if kinds is not None else None) or batchnorm_kind(bn)
        if kind is None:  # a plan made for another model
            raise FoldError(f"{name}: the plan folds it, but {type(bn).__name__} is not a BatchNorm fusedconv folds")
        replacement = kind.replacement(bn).train(bn.training)
        for path in paths:
            parent, _, attr = path.rpartition(".")
            rollback.setattr(modules[parent], attr, replacement)


class Rollback:
    """Records each change to a model so that all of them can be undone.

    Used as a context manager: an exception inside undoes every recorded
    change, most recent first, and propagates.
    """

    def __init__(self):
        self._undo: list = []

    def setattr(self, owner: nn.Module, attr: str, value: object) -> None:
        previous = owner._modules[attr] if attr in owner._modules else getattr(owner, attr)
        setattr(owner, attr, value)
        self._undo.append(lambda: setattr(owner, attr, previous))

    def keep_modules(self, modules: Iterable[nn.Module]) -> None:
        """Remember the modules' registered children, parameters, buffers and
        attributes, and their parameters' ``requires_grad`` (not tensor values),
        so that what a block converter's ``install`` changes in them can be undone."""
        saved = [(m, dict(vars(m)), dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in modules]

        def restore() -> None:
            for module, attributes, children, parameters, buffers in saved:
                vars(module).clear()
                vars(module).update(attributes)
                for registry, before in ((module._modules, children), (module._parameters, parameters),
                                         (module._buffers, buffers)):
                    registry.clear()
                    registry.update(before)

        self._undo.append(restore)
        self.keep_requires_grad(p for _, _, _, parameters, _ in saved for p in parameters.values() if p is not None)

    def keep_requires_grad(self, parameters: Iterable[torch.Tensor]) -> None:
        """Remember the parameters' ``requires_grad`` flags."""
        flags = [(p, p.requires_grad) for p in parameters]

        def restore() -> None:
            for parameter, requires_grad in flags:
                parameter.requires_grad_(requires_grad)

        self._undo.append(restore)

    def keep(self, tensor: torch.Tensor) -> None:
        """Remember ``tensor``'s values (small tensors only: biases) before it is written."""
        saved = tensor.detach().clone()
        self._undo.append(lambda: tensor.detach().copy_(saved))

    def __enter__(self) -> "Rollback":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None:
            with torch.no_grad():
                for undo in reversed(self._undo):
                    undo()
        return False
