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
import shutil
import struct
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from . import kernels
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


def _is_extra_state(key: str) -> bool:
    """A module's ``get_extra_state()`` entry, which may hold any object."""
    return key.rpartition(".")[2] == "_extra_state"


class _Checkpoint:
    """The entries of a state dict, read one at a time (a dict's own tensors)."""

    def __init__(self, entries: Mapping[str, object], label: str):
        self.entries, self.label = entries, label
        # Each module's state-dict version, which some modules' loading needs
        # (torchvision's MNASNet refuses a state dict without it).
        self.metadata = getattr(entries, "_metadata", None)
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                if value.is_meta:
                    raise FoldError(f"{label}: {key!r} is on the meta device and holds no values")
            elif not _is_extra_state(key):
                raise FoldError(f"{label}: {key!r} holds a {type(value).__name__}, not a tensor")

    def keys(self) -> list[str]:
        return list(self.entries)

    def meta(self, key: str) -> object:
        """A meta tensor with the shape, dtype and strides of ``key``'s tensor
        (an extra state's object as it is)."""
        value = self.entries[key]
        return torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) else value

    def read(self, key: str) -> object:
        return self.entries[key]

    def done(self, tensors: list[torch.Tensor]) -> None:
        """The caller has finished with ``tensors``: their memory may be let go."""

    def owns_its_memory(self) -> bool:
        """Whether the tensors read are independent of any file (a dict's are)."""
        return True


class _MappedFile(_Checkpoint):
    """A ``.pt`` file read through ``mmap`` (``torch.load(mmap=True)``): a tensor's
    bytes are read from disk when first touched. Pages of a private file mapping
    that were only read can be dropped and read again, so once a tensor has been
    used its pages are given back (Linux ``madvise``), and the process's memory
    does not grow to the size of the file. ``torch.load`` writes into the
    mapping only to swap the bytes of a file saved on a machine of the other
    byte order: pages of such a file are kept."""

    def __init__(self, entries: Mapping[str, object], label: str, path: Path):
        super().__init__(entries, label)
        self.ranges = _mapped_ranges(path, private=True) if _byte_order(path) in (None, sys.byteorder) else []

    def done(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            _drop_pages_of(tensor, self.ranges)

    def owns_its_memory(self) -> bool:
        return False


class _SafetensorsFile(_Checkpoint):
    """A ``.safetensors`` file opened lazily with the ``safetensors`` package."""

    def __init__(self, path: Path):
        try:
            from safetensors import safe_open
        except ImportError as error:
            raise FoldError(f"{path}: reading .safetensors needs the safetensors package "
                            "(pip install safetensors)") from error
        self.file = safe_open(str(path), framework="pt", device="cpu")
        self.label, self.metadata = str(path), None

    def keys(self) -> list[str]:
        return list(self.file.keys())

    def meta(self, key: str) -> torch.Tensor:
        part = self.file.get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(part.get_dtype())
        if dtype is None:
            raise FoldError(f"{self.label}: {key!r} has the dtype {part.get_dtype()}, which torch cannot hold")
        return torch.empty(part.get_shape(), dtype=dtype, device="meta")

    def read(self, key: str) -> torch.Tensor:
        return self.file.get_tensor(key)


def _open(state_dict: StateDictSource) -> _Checkpoint:
    if isinstance(state_dict, Mapping):
        return _Checkpoint(state_dict, "the state dict")
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
    return _MappedFile(_state_dict_in(loaded, path), str(path), path)


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(entry, torch.Tensor) or _is_extra_state(key) for key, entry in value.items())


def _state_dict_in(loaded: object, path: Path) -> Mapping[str, object]:
    """The state dict in a loaded checkpoint: the object itself, or the one nested
    under a training script's usual key."""
    if _is_state_dict(loaded):
        return loaded
    if isinstance(loaded, Mapping):
        for key in _NESTED_KEYS:
            if _is_state_dict(loaded.get(key)):
                logger.info("%s: folding the state dict under %r", path, key)
                return loaded[key]
    raise FoldError(f"{path}: holds a {type(loaded).__name__}, not a state dict (a dict of tensors, or one under "
                    f"{' / '.join(map(repr, _NESTED_KEYS))})")


def _byte_order(path: Path) -> str | None:
    """The byte order a ``torch.save`` file records (None: the writer's, little-endian before torch 1.12)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/byteorder")), None)
            return archive.read(name).decode() if name else None
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError):
        return "unknown"


def _mapped_ranges(path: Path, *, private: bool) -> list[tuple[int, int]]:
    """The address ranges where this process maps ``path`` (readable; private or
    shared as asked), from ``/proc/self/maps`` (none off Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            target = str(path.resolve())
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() == target and fields[1][0] == "r" \
                        and fields[1][3] == ("p" if private else "s"):
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((low, high))
    except OSError:
        pass
    return ranges


_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _drop_pages_of(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Let the kernel drop the whole pages under ``tensor`` if they lie in one of
    ``ranges``: file mappings whose pages hold exactly the file's bytes or are
    kept by the file (a private mapping never written, or a shared one, whose
    written pages are the page cache's). A dropped page is read again from the
    file when next touched."""
    span = memory_span(tensor)
    if _libc is None or span is None or not any(low <= span[0] and span[1] <= high for low, high in ranges):
        return
    first = -(-span[0] // mmap.PAGESIZE) * mmap.PAGESIZE
    last = span[1] // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


# --------------------------------------------------------------------------- folding


@dataclass
class CheckpointReport:
    """What :func:`fold_checkpoint` did."""

    plan: FusionPlan
    tensors: int  # entries of the folded state dict
    checkpoint_bytes: int  # of the tensors of the checkpoint folded
    seconds: float

    @property
    def skipped(self) -> list[Skip]:
        return self.plan.skipped


@dataclass
class _Job:
    """A checkpoint, the architecture's plan, and where everything is."""

    checkpoint: _Checkpoint
    plan: FusionPlan
    structure: collections.OrderedDict  # the folded state dict's entries, in order (meta tensors), with _metadata
    skeleton: dict[str, nn.Module]  # the architecture on meta with the checkpoint's dtypes: path -> module
    original: dict[str, nn.Module]  # the architecture as given (for values the checkpoint lacks): path -> module
    paths: dict[int, list[str]]  # id(skeleton module) -> every path where it is registered

    def keys_of(self, name: str) -> list[str]:
        """The checkpoint keys of the module at ``name``."""
        prefix = f"{name}." if name else ""
        return [prefix + key for key in self.skeleton[name].state_dict(keep_vars=True)]


def _compute_device(device: str | torch.device | None) -> torch.device | None:
    """The device the arithmetic runs on, refused with :class:`FoldError` before
    anything is read when nothing can compute there (no CUDA device, meta)."""
    if device is None:
        return None
    device = torch.device(device)
    reason = kernels.why_device_unavailable(device)
    if reason:
        raise FoldError(f"device={str(device)!r}: {reason}")
    return device


def _job(model: nn.Module, state_dict: StateDictSource) -> _Job:
    checkpoint = _open(state_dict)
    skeleton = meta_copy(model).eval()  # a checkpoint is folded for inference, whatever mode model is in
    _check_fit(skeleton, {key: checkpoint.meta(key) for key in checkpoint.keys()},
               f"{checkpoint.label} does not fit {type(model).__name__}")
    _adopt_dtypes(skeleton, checkpoint)
    plan = make_plan(skeleton, check_stats=False)
    structure = apply_plan(skeleton, plan, inplace=False).state_dict(keep_vars=True)
    modules = dict(skeleton.named_modules(remove_duplicate=False))
    paths: dict[int, list[str]] = collections.defaultdict(list)
    for path, module in modules.items():
        paths[id(module)].append(path)
    return _Job(checkpoint, plan, structure, modules, dict(model.named_modules(remove_duplicate=False)), paths)


def _check_fit(module: nn.Module, entries: Mapping[str, object], what: str) -> None:
    """A :class:`FoldError` saying ``what`` and which keys are missing, unexpected
    or of another shape, unless ``entries`` fits ``module``'s state dict."""
    expected = module.state_dict(keep_vars=True)
    missing = [key for key in expected if key not in entries]
    unexpected = [key for key in entries if key not in expected]
    resized = [f"{key} {tuple(entries[key].shape)} instead of {tuple(expected[key].shape)}"
               for key in expected if key in entries and isinstance(entries[key], torch.Tensor)
               and isinstance(expected[key], torch.Tensor) and entries[key].shape != expected[key].shape]
    problems = [f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("tensors of another shape", resized)) if keys]
    if problems:
        raise FoldError(f"{what}: " + "; ".join(problems))


def _adopt_dtypes(skeleton: nn.Module, checkpoint: _Checkpoint) -> None:
    """Give the skeleton's tensors the checkpoint's dtypes (a bfloat16 checkpoint
    folds in bfloat16), one new meta tensor per tensor so that ties (one weight
    registered at two paths, or kept in an attribute) stay ties, which the plan
    must see to refuse folding a shared weight."""
    new: dict[int, torch.Tensor] = {}
    for key, tensor in skeleton.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.Tensor) and id(tensor) not in new:
            stored = checkpoint.meta(key)
            if stored.dtype != tensor.dtype:
                stand_in = stored.detach()
                new[id(tensor)] = (nn.Parameter(stand_in, requires_grad=tensor.requires_grad)
                                   if isinstance(tensor, nn.Parameter) else stand_in)
    if not new:
        return
    for module in skeleton.modules():
        for registry in (module._parameters, module._buffers):
            for name, tensor in registry.items():
                if tensor is not None and id(tensor) in new:
                    registry[name] = new[id(tensor)]
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and id(value) in new:
                vars(module)[name] = new[id(value)]


def _metadata_under(metadata: dict | None, name: str) -> dict | None:
    """The module versions of a state dict's ``_metadata`` for the module at ``name``, relative to it."""
    if metadata is None or not name:
        return metadata
    prefix = f"{name}."
    return {key[len(prefix):] if key != name else "": value for key, value in metadata.items()
            if key == name or key.startswith(prefix)}


def _load(module: nn.Module, entries: Mapping[str, object], metadata: dict | None) -> None:
    entries = collections.OrderedDict(entries)
    if metadata is not None:
        entries._metadata = metadata
    module.load_state_dict(entries, assign=True)


def _fill_non_persistent(module: nn.Module, original: nn.Module, name: str, device: torch.device | None) -> None:
    """Give ``module`` (a copy of ``original``'s structure) the values of the
    non-persistent buffers (state that no checkpoint holds) from ``original``;
    a :class:`FoldError` when ``original`` has none to give (it is on meta)."""
    originals = dict(original.named_modules(remove_duplicate=False))
    for path, part in module.named_modules(remove_duplicate=False):
        for buffer in part._non_persistent_buffers_set:
            if part._buffers.get(buffer) is None:
                continue
            source = originals.get(path)
            value = None if source is None else source._buffers.get(buffer)
            full = ".".join(p for p in (name, path, buffer) if p)
            if value is None or value.is_meta or value.shape != part._buffers[buffer].shape:
                raise FoldError(f"{full}: a non-persistent buffer, which no checkpoint holds, and the architecture "
                                "has no value for it (built on the meta device?): build the architecture on the "
                                "CPU instead")
            part._buffers[buffer] = value.to(device if device is not None else value.device, copy=True)


def _materialized(job: _Job, name: str, inputs: dict[str, object], device: torch.device | None, *,
                  copy: bool) -> nn.Module:
    """A copy of the skeleton's module at ``name`` holding the checkpoint's tensors
    (``inputs``, on ``device``; copied when the caller will write them in place)."""
    module = meta_copy(job.skeleton[name])
    prefix = f"{name}." if name else ""
    entries = {}
    for key in module.state_dict(keep_vars=True):
        value = inputs[prefix + key]
        if isinstance(value, torch.Tensor):
            target = device if device is not None else value.device
            value = torch.empty_like(value, device=target).copy_(value) if copy else value.to(target)
        entries[key] = value
    _load(module, entries, _metadata_under(job.checkpoint.metadata, name))
    _fill_non_persistent(module, job.original[name], name, device)
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
                  progress: Callable[[int], None] | None) -> Iterator[tuple[str, object, bool]]:
    """(key, value, passed through) for every entry of the folded state dict,
    folds and merges first (new tensors), then the checkpoint's own entries
    that the fold leaves as they are; each batch of work is checked whole
    before its tensors come out."""
    checkpoint = job.checkpoint
    produced: set[str] = set()

    def read(names: list[str]) -> dict[str, object]:
        return {key: checkpoint.read(key) for name in names for key in job.keys_of(name)}

    def finished(inputs: dict[str, object]) -> None:
        tensors = [value for value in inputs.values() if isinstance(value, torch.Tensor)]
        checkpoint.done(tensors)
        if progress is not None:
            progress(sum(t.nbytes for t in tensors))

    for batch in _batches(job.plan.folds, lambda fold: job.skeleton[fold.layer].weight.nbytes):
        inputs = read([name for fold in batch for name in (fold.layer, *fold.batchnorms)])
        modules = {name: _materialized(job, name, inputs, device, copy=False)
                   for fold in batch for name in (fold.layer, *fold.batchnorms)}
        names = [fold.layer for fold in batch]
        layers = [modules[name] for name in names]
        layer_folds = plan_layer_folds(layers, checked_affines(modules, batch), names)
        sources = [layer.weight.detach() for layer in layers]
        _, smallest = check_folded_range(sources, layer_folds, names)
        weights = [torch.empty_like(source) for source in sources]
        rescale_weights(weights, layer_folds, backend, sources)
        subnormal_weights(weights, layer_folds, names, flush=flush_subnormals, smallest=smallest)
        del modules, layers, sources
        for name in names:
            weight, layer_fold = weights.pop(0), layer_folds.pop(0)  # each folded weight freed once out
            home = inputs[f"{name}.weight"].device
            for key, tensor in ((f"{name}.weight", weight), (f"{name}.bias", layer_fold.bias)):
                produced.add(key)
                yield key, tensor.to(home), False
            del weight, layer_fold, tensor
        finished(inputs)

    block_bytes = lambda name: sum(t.nbytes for t in job.skeleton[name].state_dict(keep_vars=True).values()
                                   if isinstance(t, torch.Tensor))
    for batch in _batches(job.plan.merges, block_bytes):
        inputs = read(batch)
        blocks = {name: _materialized(job, name, inputs, device, copy=True) for name in batch}
        plans = plan_found_blocks([(name, block, converter_for(block)) for name, block in blocks.items()])
        apply_reparameterizations(plans, backend)
        home = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        for name, block in blocks.items():
            for path in job.paths[id(job.skeleton[name])]:  # a block registered at two paths: both
                for key, value in block.state_dict(prefix=f"{path}." if path else "").items():
                    produced.add(key)
                    yield key, value.to(home) if isinstance(value, torch.Tensor) else value, False
        del blocks, plans
        finished(inputs)

    for key in job.structure:
        if key not in produced:
            value = checkpoint.read(key)
            yield key, value, True
            finished({key: value})


def fold_state_dict(model: nn.Module, state_dict: StateDictSource, *, device: str | torch.device | None = None,
                    backend: str | None = None, flush_subnormals: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` folded, without building the model's values.

    ``model`` is the unfolded architecture, on any device (the meta device
    included: ``with torch.device("meta"): model = build()``); only its
    structure is used (and the values of its non-persistent buffers, which no
    checkpoint holds), and it is not modified. ``state_dict`` is its state dict,
    or the path of a ``.pt``/``.pth`` file (read with ``torch.load(mmap=True,
    weights_only=True)``; a state dict nested under ``"state_dict"``,
    ``"model"`` ... is found) or of a ``.safetensors`` file (needs the
    ``safetensors`` package). The result is ``fusedconv.fuse(model).state_dict()``
    of the model holding those values: the same keys in the same order, the
    same module versions, and the same bits, from the same plan, checks (bad
    statistics raise a :class:`FoldError` and nothing is returned), float64
    arithmetic and kernels. Tensors the fold does not change are the input
    dict's own; read from a file, they are copies that do not depend on it.
    ``device`` is where the arithmetic runs (``"cuda"``: the GPU kernels);
    results go back to the device the input tensor was on. ``backend`` and
    ``flush_subnormals`` are :func:`fusedconv.fuse`'s.
    """
    device = _compute_device(device)  # before the checkpoint is opened
    job = _job(model, state_dict)
    owned = job.checkpoint.owns_its_memory()
    folded = {}
    for key, value, passed_through in _folded_items(job, device, backend, flush_subnormals, None):
        # A tensor passed through from a file is a view of its mapping: saving over the file would pull it away.
        copy = passed_through and not owned and isinstance(value, torch.Tensor)
        folded[key] = value.clone() if copy else value
    result = collections.OrderedDict((key, folded[key]) for key in job.structure)
    result._metadata = job.structure._metadata
    return result


def load_folded(model: nn.Module, state_dict: StateDictSource, *, device: str | torch.device | None = None) -> nn.Module:
    """A folded model: ``model``'s folded structure (``model`` itself is not
    modified) with a folded state dict loaded into it.

    ``state_dict`` is what ``fusedconv.fuse(model).state_dict()`` (or
    :func:`fold_state_dict`) returned, or a file it was saved to (``.pt``,
    ``.safetensors``). ``model`` is the unfolded architecture on any device,
    meta included (then the result's non-persistent buffers, which no
    checkpoint holds, need values: a :class:`FoldError` says which). The
    result's tensors are the state dict's, moved to ``device`` (default: where
    ``model``'s parameters are, or where the state dict's are when ``model``
    is on meta), in eval mode (what a folded model is for, whatever mode
    ``model`` is in). Loading is strict: a key that does not fit raises
    :class:`FoldError`.
    """
    checkpoint = _open(state_dict)
    skeleton = meta_copy(model).eval()
    structure = apply_plan(skeleton, make_plan(skeleton, check_stats=False), inplace=True)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None and not first.is_meta else None
    entries = {key: checkpoint.read(key) for key in checkpoint.keys()}
    if device is not None:
        entries = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                   for key, value in entries.items()}
    _check_fit(structure, entries, f"{checkpoint.label} is not a folded state dict of {type(model).__name__}")
    # A file saved without module versions: those of the classes the structure is built of.
    metadata = checkpoint.metadata if checkpoint.metadata is not None else structure.state_dict()._metadata
    _load(structure, entries, metadata)
    _fill_non_persistent(structure, model, "", device)
    return structure


def fold_checkpoint(model: nn.Module, source: StateDictSource, destination: str | os.PathLike, *,
                    device: str | torch.device | None = None, backend: str | None = None,
                    flush_subnormals: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> CheckpointReport:
    """Fold the checkpoint ``source`` (a state dict or a file, as for
    :func:`fold_state_dict`) into the file ``destination``: ``.safetensors``,
    or ``.pt``/``.pth`` (a ``torch.save`` file of the folded state dict, read
    back with ``torch.load(weights_only=True)``). Either is written as it is
    computed, so memory stays near one batch of layers, not the model. The file
    appears only when complete: on any error nothing is written (a full disk is
    found before any work is written). ``progress(bytes_done, bytes_total)`` is
    called as the input is read.
    """
    start = time.perf_counter()
    destination = Path(destination)
    if destination.suffix not in (".safetensors", ".pt", ".pth"):
        raise FoldError(f"{destination}: the folded checkpoint's name must end in .safetensors, .pt or .pth")
    if not destination.parent.is_dir() or destination.is_dir():
        raise FoldError(f"{destination}: cannot write there ({'a directory' if destination.is_dir() else 'no such directory'})")
    device = _compute_device(device)  # before the checkpoint is opened
    job = _job(model, source)
    total = sum(value.nbytes for key in job.checkpoint.keys()
                if isinstance(value := job.checkpoint.meta(key), torch.Tensor))
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    items = _folded_items(job, device, backend, flush_subnormals, advance)
    # Written under its own name in a fresh directory beside it (a torch.save
    # archive is named after its file), then moved into place whole.
    directory = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    temporary = directory / destination.name
    try:
        if destination.suffix == ".safetensors":
            _write_safetensors(temporary, job.structure, items)
        else:
            _write_pt(temporary, job.structure, items)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, destination)
    except OSError as error:
        raise FoldError(f"{destination}: writing it failed ({error.strerror or error}); nothing was written") \
            from error
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return CheckpointReport(job.plan, len(job.structure), total, time.perf_counter() - start)


# --------------------------------------------------------------------------- writing .safetensors

_SAFETENSORS_DTYPES = {
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def _checked(key: str, value: object, layout: Mapping[str, object]) -> torch.Tensor:
    expected = layout[key]
    if not isinstance(value, torch.Tensor):
        raise FoldError(f"{key}: holds a {type(value).__name__}; a checkpoint file of tensors cannot hold it "
                        "(use fold_state_dict and save it yourself)")
    if value.shape != expected.shape or value.dtype != expected.dtype:
        raise FoldError(f"{key}: folded to {tuple(value.shape)} {value.dtype}, but the folded structure has "
                        f"{tuple(expected.shape)} {expected.dtype} (a bug: please report it)")
    return value


def _write_safetensors(path: Path, layout: Mapping[str, object], items: Iterator[tuple[str, object, bool]]) -> None:
    """Write a ``.safetensors`` file whose tensors have the shapes and dtypes of
    ``layout`` (meta tensors, in file order), each tensor written at its place
    as ``items`` produces it. The format is a little-endian u64 header length,
    a JSON header of dtypes, shapes and byte ranges, then the bytes; the
    ``safetensors`` package writes only from a dict it holds whole, which is
    the second copy of the model this module exists to avoid."""
    header, offset = {}, 0
    for key, tensor in layout.items():
        if not isinstance(tensor, torch.Tensor):
            raise FoldError(f"{key}: holds a {type(tensor).__name__}, which .safetensors cannot; write a .pt")
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
        os.posix_fallocate(file.fileno(), 0, data_start + offset)  # a full disk fails here, before the work
        for key, value, _ in items:
            tensor = _checked(key, value, layout)
            file.seek(data_start + header[key]["data_offsets"][0])
            if tensor.numel():
                file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _write_pt(path: Path, layout: Mapping[str, object], items: Iterator[tuple[str, object, bool]]) -> None:
    """Write what ``torch.save`` writes for a state dict with the entries of
    ``layout`` (meta tensors, and extra states), each tensor filled in as
    ``items`` produces it.

    ``torch.serialization.skip_data`` saves a dict of placeholders (empty
    tensors, never touched, so never resident) with room left for every
    tensor's bytes; the room is allocated on disk (a full disk fails here, not
    as a fault while filling a mapped page); the file is then mapped shared
    (``torch.load(mmap=True)`` with ``MAP_SHARED``), each folded tensor copied
    to its place and its pages handed to the page cache, which writes them
    back; last, each record's CRC, which ``skip_data`` leaves at 0, is set."""
    placeholders = collections.OrderedDict(
        (key, torch.empty_strided(t.shape, t.stride(), dtype=t.dtype) if isinstance(t, torch.Tensor) else t)
        for key, t in layout.items())
    placeholders._metadata = getattr(layout, "_metadata", None)
    with torch.serialization.skip_data():
        torch.save(placeholders, path)
    del placeholders
    with open(path, "rb+") as file:
        os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        slots = torch.load(path, mmap=True, weights_only=True)
    ranges = _mapped_ranges(path, private=False)
    for key, value, _ in items:
        if isinstance(slots[key], torch.Tensor):
            slots[key].copy_(_checked(key, value, layout))
            _drop_pages_of(slots[key], ranges)
    del slots
    _set_zip_crcs(path)


def _set_zip_crcs(path: Path) -> None:
    """Write the CRC-32 of every stored record of a zip archive into its local
    and central headers (zip format: the CRC is at byte 14 of a local header
    and byte 16 of a central one)."""
    with zipfile.ZipFile(path) as archive:
        records, central = archive.infolist(), archive.start_dir
    with open(path, "rb+") as file:
        for record in records:
            file.seek(record.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", file.read(4))
            file.seek(record.header_offset + 30 + name_length + extra_length)
            crc, left = 0, record.file_size
            while left:
                chunk = file.read(min(left, 16 << 20))
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
            file.seek(record.header_offset + 14)
            file.write(struct.pack("<I", crc))
            file.seek(central + 16)
            file.write(struct.pack("<I", crc))
            file.seek(central + 28)
            name_length, extra_length, comment_length = struct.unpack("<HHH", file.read(6))
            central += 46 + name_length + extra_length + comment_length
