"""Folding checkpoints: a state dict, or a ``.pt``/``.safetensors`` file, folded
from the architecture's structure, a layer at a time, without the model's
values in memory.

The architecture is copied to the meta device with the checkpoint's shapes and
dtypes (:func:`fusedconv.copying.meta_copy`), planned there like any model
(``fusedconv.plan`` needs no values), and its folded structure worked out
(``fusedconv.fuse`` on meta). Each fold then reads only the tensors it needs:
its layer and BNs, materialized on ``device`` and folded with the same checks,
float64 arithmetic and kernels as :func:`fusedconv.fuse` (so the results are
the same bits), a batch of layers at a time; each block is merged the same way
on a copy of its own tensors. Everything else passes through untouched.
Memory beyond the result stays near one batch of layers; a file written with
:func:`fold_checkpoint` does not even hold the result (``.safetensors`` is
written as it is computed, and the pages of a ``.pt`` read through ``mmap``
are let go once used).
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import mmap
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .apply import apply_plan
from .copying import meta_copy
from .errors import FoldError
from .fold import plan_layer_folds, rescale_weights
from .fusion_plan import FusionPlan, Skip
from .memory import memory_span
from .registry import converter_for, plan_found_blocks
from .reparam import apply_reparameterizations
from .rules import checked_affines, make_plan
from .writing import check_folded_range, subnormal_weights

__all__ = ["CheckpointReport", "fold_checkpoint", "fold_state_dict", "load_folded"]

logger = logging.getLogger("fusedconv")

StateDictSource = Mapping[str, torch.Tensor] | str | os.PathLike

# Layers are folded in batches of about this many weight bytes: large enough
# that one kernel call covers many small layers, small enough that the memory a
# batch needs stays a small part of a multi-gigabyte model.
_BATCH_BYTES = 32 << 20

# Keys under which training scripts commonly nest the model's state dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")


# --------------------------------------------------------------------------- reading


class _Checkpoint:
    """The tensors of a state dict, read one at a time (a dict's own tensors)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str):
        self.tensors, self.label = tensors, label
        # Each module's state-dict version, which some modules' loading needs
        # (torchvision's MNASNet refuses a state dict without it).
        self.metadata = getattr(tensors, "_metadata", None)

    def with_metadata(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` as a state dict carrying this checkpoint's module versions."""
        if self.metadata is not None:
            tensors = collections.OrderedDict(tensors)
            tensors._metadata = self.metadata
        return tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the shape, dtype and strides of ``key``'s."""
        return torch.empty_like(self.tensors[key], device="meta")

    def read(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def done(self, tensors: list[torch.Tensor]) -> None:
        """The caller has finished with ``tensors``: their memory may be let go."""


class _MappedFile(_Checkpoint):
    """A ``.pt`` file read through ``mmap`` (``torch.load(mmap=True)``): a tensor's
    bytes are read from disk when first touched. Pages of a private file mapping
    that were only read can be dropped and read again, so once a tensor has been
    used its pages are given back (Linux ``madvise``), and the process's memory
    does not grow to the size of the file."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str, path: Path):
        super().__init__(tensors, label)
        self.ranges = _mapped_ranges(path)

    def done(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            span = memory_span(tensor)
            if span is not None and any(low <= span[0] and span[1] <= high for low, high in self.ranges):
                _drop_pages(*span)


class _SafetensorsFile(_Checkpoint):
    """A ``.safetensors`` file opened lazily with the ``safetensors`` package."""

    def __init__(self, path: Path):
        try:
            from safetensors import safe_open
        except ImportError as error:
            raise FoldError(f"{path}: reading .safetensors needs the safetensors package "
                            "(pip install safetensors)") from error
        self.file = safe_open(str(path), framework="pt", device="cpu")
        super().__init__({}, str(path))

    def keys(self) -> list[str]:
        return list(self.file.keys())

    def meta(self, key: str) -> torch.Tensor:
        part = self.file.get_slice(key)
        return torch.empty(part.get_shape(), dtype=_SAFETENSORS_DTYPES[part.get_dtype()], device="meta")

    def read(self, key: str) -> torch.Tensor:
        return self.file.get_tensor(key)


def _open(state_dict: StateDictSource) -> _Checkpoint:
    if isinstance(state_dict, Mapping):
        return _Checkpoint(_tensors_only(state_dict, "the state dict"), "the state dict")
    path = Path(state_dict)
    if not path.is_file():
        raise FoldError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        reason = reason.removeprefix("WeightsUnpickler error: ")
        raise FoldError(
            f"{path}: torch.load(weights_only=True) refuses it ({reason}). fusedconv never loads a pickle with "
            "weights_only=False, which runs the file's code: if you trust the file, load it yourself "
            "(torch.load(path, weights_only=False)) and pass the state dict") from None
    except RuntimeError as error:  # not a zip checkpoint: mmap needs torch.save's format since 1.6
        raise FoldError(f"{path}: cannot be read as a torch.save checkpoint ({error})") from None
    return _MappedFile(_tensors_only(_state_dict_in(loaded, path), str(path)), str(path), path)


def _state_dict_in(loaded: object, path: Path) -> Mapping[str, object]:
    """The state dict in a loaded checkpoint: the object itself, or the one nested
    under a training script's usual key."""
    if isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return loaded
    if isinstance(loaded, Mapping):
        for key in _NESTED_KEYS:
            inner = loaded.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                logger.info("%s: folding the state dict under %r", path, key)
                return inner
    raise FoldError(f"{path}: holds a {type(loaded).__name__}, not a state dict (a dict of tensors, or one under "
                    f"{' / '.join(map(repr, _NESTED_KEYS))})")


def _tensors_only(state_dict: Mapping[str, object], label: str) -> Mapping[str, torch.Tensor]:
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise FoldError(f"{label}: {key!r} holds a {type(value).__name__}, not a tensor")
    return state_dict


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps ``path`` (empty off Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            target = str(path.resolve())
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() == target:
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((low, high))
    except OSError:
        pass
    return ranges


_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _drop_pages(start: int, end: int) -> None:
    """Let the kernel drop the whole pages in ``[start, end)`` of a private file
    mapping that was only read: the next read brings the same bytes back."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if _libc is not None and last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


# --------------------------------------------------------------------------- folding


@dataclass
class CheckpointReport:
    """What :func:`fold_checkpoint` did."""

    plan: FusionPlan
    tensors: int  # in the folded state dict
    bytes_read: int
    seconds: float

    @property
    def skipped(self) -> list[Skip]:
        return self.plan.skipped


@dataclass
class _Job:
    """A checkpoint and the architecture's plan and folded structure."""

    checkpoint: _Checkpoint
    skeleton: nn.Module  # the architecture on meta, with the checkpoint's shapes and dtypes
    plan: FusionPlan
    structure: dict[str, torch.Tensor]  # the folded state dict's keys, in order, as meta tensors
    modules: dict[str, nn.Module] = field(default_factory=dict)

    def module(self, name: str) -> nn.Module:
        return self.modules[name]


def _job(model: nn.Module, state_dict: StateDictSource) -> _Job:
    checkpoint = _open(state_dict)
    skeleton = meta_copy(model).eval()  # a checkpoint is folded for inference, whatever mode model is in
    _load_strictly(skeleton, checkpoint.with_metadata({key: checkpoint.meta(key) for key in checkpoint.keys()}),
                   f"{checkpoint.label} does not fit {type(model).__name__}")
    plan = make_plan(skeleton, check_stats=False)
    structure = apply_plan(skeleton, plan, inplace=False).state_dict(keep_vars=True)
    modules = dict(skeleton.named_modules(remove_duplicate=False))
    return _Job(checkpoint, skeleton, plan, dict(structure), modules)


def _load_strictly(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(tensors, assign=True)``, or a :class:`FoldError`
    saying ``what`` and which keys are missing, unexpected or of another shape."""
    expected = module.state_dict(keep_vars=True)
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    resized = [f"{key} {tuple(tensors[key].shape)} instead of {tuple(expected[key].shape)}"
               for key in expected if key in tensors and tensors[key].shape != expected[key].shape]
    problems = [f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("tensors of another shape", resized)) if keys]
    if problems:
        raise FoldError(f"{what}: " + "; ".join(problems))
    module.load_state_dict(tensors, assign=True)


def _materialized(job: _Job, name: str, device: torch.device | None, *, copy: bool) -> nn.Module:
    """A copy of the skeleton's module at ``name`` holding the checkpoint's tensors
    (on ``device``; copied when the caller will write them in place)."""
    module = meta_copy(job.module(name))
    prefix = f"{name}." if name else ""
    tensors = {}
    for key in module.state_dict(keep_vars=True):
        tensor = job.checkpoint.read(prefix + key)
        target = device if device is not None else tensor.device
        tensors[key] = torch.empty_like(tensor, device=target).copy_(tensor) if copy else tensor.to(target)
    module.load_state_dict(tensors, assign=True)
    return module


def _batches(items: list, size_of: Callable[[object], int]) -> Iterator[list]:
    batch, total = [], 0
    for item in items:
        if batch and total + size_of(item) > _BATCH_BYTES:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size_of(item)
    if batch:
        yield batch


def _folded_items(job: _Job, device: torch.device | None, backend: str | None, flush_subnormals: bool,
                  progress: Callable[[int], None] | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every key of the folded state dict, folds and merges
    first; each batch of work is checked whole before its tensors come out."""
    checkpoint, structure = job.checkpoint, job.structure
    produced: set[str] = set()

    def finished(inputs: dict[str, torch.Tensor]) -> None:
        checkpoint.done(list(inputs.values()))
        if progress is not None:
            progress(sum(t.nbytes for t in inputs.values()))

    def inputs_of(names: list[str]) -> dict[str, torch.Tensor]:
        keys = [f"{name}.{key}" if name else key for name in names
                for key in job.module(name).state_dict(keep_vars=True)]
        return {key: checkpoint.read(key) for key in keys}

    def weight_bytes(fold) -> int:
        return job.module(fold.layer).weight.nbytes

    for batch in _batches(job.plan.folds, weight_bytes):
        modules = {name: _materialized(job, name, device, copy=False)
                   for fold in batch for name in (fold.layer, *fold.batchnorms)}
        names = [fold.layer for fold in batch]
        layers = [modules[name] for name in names]
        layer_folds = plan_layer_folds(layers, checked_affines(modules, batch), names)
        sources = [layer.weight.detach() for layer in layers]
        _, smallest = check_folded_range(sources, layer_folds, names)
        weights = [torch.empty_like(source) for source in sources]
        rescale_weights(weights, layer_folds, backend, sources)
        subnormal_weights(weights, layer_folds, names, flush=flush_subnormals, smallest=smallest)
        del modules, layers, sources  # the inputs' pages can go once the batch is out
        for name in names:
            weight, layer_fold = weights.pop(0), layer_folds.pop(0)  # each folded weight freed once written
            home = checkpoint.read(f"{name}.weight").device
            for key, tensor in ((f"{name}.weight", weight), (f"{name}.bias", layer_fold.bias)):
                produced.add(key)
                yield key, tensor.to(home)
            del weight, layer_fold, tensor
        finished(inputs_of([name for fold in batch for name in (fold.layer, *fold.batchnorms)]))

    def block_bytes(name: str) -> int:
        return sum(t.nbytes for t in job.module(name).state_dict(keep_vars=True).values())

    for batch in _batches(job.plan.merges, block_bytes):
        blocks = {name: _materialized(job, name, device, copy=True) for name in batch}
        plans = plan_found_blocks([(name, block, converter_for(block)) for name, block in blocks.items()])
        apply_reparameterizations(plans, backend)
        inputs = inputs_of(batch)
        for name, block in blocks.items():
            home = next(iter(inputs.values())).device if inputs else torch.device("cpu")
            for key, tensor in block.state_dict(prefix=f"{name}." if name else "").items():
                produced.add(key)
                yield key, tensor.to(home)
        finished(inputs)

    for key in structure:
        if key not in produced:
            tensor = checkpoint.read(key)
            yield key, tensor
            finished({key: tensor})


def fold_state_dict(model: nn.Module, state_dict: StateDictSource, *, device: str | torch.device | None = None,
                    backend: str | None = None, flush_subnormals: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` folded, without building the model's values.

    ``model`` is the unfolded architecture, on any device (the meta device
    included: ``with torch.device("meta"): model = build()``); only its
    structure is used, and it is not modified. ``state_dict`` is its state dict,
    or the path of a ``.pt``/``.pth`` file (read with ``torch.load(mmap=True,
    weights_only=True)``; a state dict nested under ``"state_dict"``,
    ``"model"`` ... is found) or of a ``.safetensors`` file (needs the
    ``safetensors`` package). The result's keys are those of
    ``fusedconv.fuse(model).state_dict()``, in the same order, and its folded
    tensors are the same bits ``fuse`` computes: the same plan, checks (bad
    statistics raise a :class:`FoldError` and nothing is returned), float64
    arithmetic and kernels. Tensors the fold does not change are the input's own
    (not copied). ``device`` is where the arithmetic runs (``"cuda"``: the GPU
    kernels); results go back to the device the input tensor was on.
    ``backend`` and ``flush_subnormals`` are :func:`fusedconv.fuse`'s.
    """
    job = _job(model, state_dict)
    device = torch.device(device) if device is not None else None
    folded = dict(_folded_items(job, device, backend, flush_subnormals, None))
    return {key: folded[key] for key in job.structure}


def load_folded(model: nn.Module, state_dict: StateDictSource, *, device: str | torch.device | None = None) -> nn.Module:
    """A folded model: ``model``'s folded structure (``model`` itself is not
    modified) with a folded state dict loaded into it.

    ``state_dict`` is what ``fusedconv.fuse(model).state_dict()`` (or
    :func:`fold_state_dict`) returned, or a file it was saved to (``.pt``,
    ``.safetensors``). ``model`` is the unfolded architecture on any device,
    meta included; the result's tensors are the state dict's, moved to
    ``device`` (default: where ``model``'s parameters are, or where the state
    dict's are when ``model`` is on meta), in eval mode (what a folded model is
    for, whatever mode ``model`` is in). Loading is strict: a key that does not
    fit raises :class:`FoldError`.
    """
    checkpoint = _open(state_dict)
    skeleton = meta_copy(model).eval()
    structure = apply_plan(skeleton, make_plan(skeleton, check_stats=False), inplace=True)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None and not first.is_meta else None
    tensors = {key: checkpoint.read(key) for key in checkpoint.keys()}
    if device is not None:
        tensors = {key: tensor.to(device) for key, tensor in tensors.items()}
    tensors = checkpoint.with_metadata(tensors)
    _load_strictly(structure, tensors, f"{checkpoint.label} is not a folded state dict of {type(model).__name__}")
    return structure


def fold_checkpoint(model: nn.Module, source: StateDictSource, destination: str | os.PathLike, *,
                    device: str | torch.device | None = None, backend: str | None = None,
                    flush_subnormals: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> CheckpointReport:
    """Fold the checkpoint ``source`` (a state dict or a file, as for
    :func:`fold_state_dict`) into the file ``destination``: ``.safetensors``,
    or ``.pt``/``.pth`` (what ``torch.save`` of the folded state dict writes).
    Either is written as it is computed, so memory stays near one batch of
    layers, not the model. The file appears only when complete: on any error
    nothing is written. ``progress(bytes_done, bytes_total)`` is called as the
    input is read.
    """
    start = time.perf_counter()
    destination = Path(destination)
    if destination.suffix not in (".safetensors", ".pt", ".pth"):
        raise FoldError(f"{destination}: the folded checkpoint's name must end in .safetensors, .pt or .pth")
    job = _job(model, source)
    device = torch.device(device) if device is not None else None
    total = sum(job.checkpoint.meta(key).nbytes for key in job.checkpoint.keys())
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    items = _folded_items(job, device, backend, flush_subnormals, advance)
    descriptor, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    os.close(descriptor)
    try:
        if destination.suffix == ".safetensors":
            _write_safetensors(temporary, job.structure, items)
        else:
            _write_pt(temporary, job.structure, items)
        os.replace(temporary, destination)
    except BaseException:
        os.unlink(temporary)
        raise
    return CheckpointReport(job.plan, len(job.structure), total, time.perf_counter() - start)


# --------------------------------------------------------------------------- writing .safetensors

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def _checked(key: str, tensor: torch.Tensor, layout: dict[str, torch.Tensor]) -> torch.Tensor:
    expected = layout[key]
    if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
        raise FoldError(f"{key}: folded to {tuple(tensor.shape)} {tensor.dtype}, but the folded structure has "
                        f"{tuple(expected.shape)} {expected.dtype} (a bug: please report it)")
    return tensor


def _write_safetensors(path: str, layout: dict[str, torch.Tensor], items: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Write a ``.safetensors`` file whose tensors have the shapes and dtypes of
    ``layout`` (meta tensors, in file order), each tensor written at its place
    as ``items`` produces it. The format is a little-endian u64 header length,
    a JSON header of dtypes, shapes and byte ranges, then the bytes; the
    ``safetensors`` package writes only from a dict it holds whole, which is
    the second copy of the model this module exists to avoid."""
    header, offset = {}, 0
    for key, tensor in layout.items():
        if tensor.dtype not in _SAFETENSORS_NAMES:
            raise FoldError(f"{key}: .safetensors cannot hold {tensor.dtype}; write a .pt instead")
        header[key] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        data_start = 8 + len(encoded)
        file.truncate(data_start + offset)
        for key, tensor in items:
            _checked(key, tensor, layout)
            file.seek(data_start + header[key]["data_offsets"][0])
            if tensor.numel():
                file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _write_pt(path: str, layout: dict[str, torch.Tensor], items: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Write what ``torch.save`` writes for a state dict with the shapes, strides
    and dtypes of ``layout``, each tensor filled in as ``items`` produces it.

    ``torch.serialization.skip_data`` saves a dict of placeholders (empty
    tensors) with room left for every tensor's bytes; the file is
    then mapped shared (``torch.load(mmap=True)`` with ``MAP_SHARED``), each
    folded tensor copied to its place, and its pages handed to the kernel's
    page cache, which writes them back."""
    # Never written nor read, the placeholders' pages are never made resident.
    placeholders = {key: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype) for key, t in layout.items()}
    with torch.serialization.skip_data():
        torch.save(placeholders, path)
    del placeholders
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        slots = torch.load(path, mmap=True, weights_only=True)
    ranges = _mapped_ranges(Path(path))
    for key, tensor in items:
        slot = slots[key]
        slot.copy_(_checked(key, tensor, layout))
        span = memory_span(slot)
        if span is not None and any(low <= span[0] and span[1] <= high for low, high in ranges):
            _drop_pages(*span)
    del slots, slot
