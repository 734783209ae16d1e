"""Where tensors live: finding parameters and buffers that share memory.

A fold writes a layer's weight in place, so it is safe only if no other tensor
of the model reads the same bytes. Comparing tensor objects misses ties made
through ``.data`` (``c2.weight.data = c1.weight.data``), views and tensors built
on one buffer; comparing the byte ranges the tensors cover does not.
"""

from __future__ import annotations

from typing import Hashable, Iterable

import torch

from . import distributed


def memory_span(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The bytes ``[start, end)`` that ``tensor`` can read, or None when it has no
    memory of its own to compare (meta or fake tensors, no elements). A DTensor
    reads the memory of its local tensor, this rank's block."""
    if type(tensor) not in _PLAIN_TENSORS and type(tensor).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
        if distributed.is_dtensor(tensor):
            return memory_span(tensor._local_tensor)
        return None  # another wrapper subclass (FakeTensor, ...): its data lives elsewhere
    if tensor.layout != torch.strided or tensor.is_meta:  # a meta view's data_ptr is its offset, not an address
        return None
    try:
        start = tensor.data_ptr()
    except RuntimeError:  # no storage (e.g. created under a fake mode)
        return None
    if start == 0:
        return None
    if tensor.is_contiguous():  # most parameters: their bytes in one call (none when empty)
        size = tensor.nbytes
        return (start, start + size) if size else None
    return (start, start + _extent(tensor)) if tensor.numel() else None


def _extent(tensor: torch.Tensor) -> int:
    """How many bytes from its first element ``tensor`` can reach."""
    if tensor.is_contiguous():
        return tensor.nbytes
    return (1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))) \
        * tensor.element_size()


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def storage_key(tensor: torch.Tensor) -> int | None:
    """The address of the storage ``tensor`` views (the same for all its views),
    or None when it has none to compare."""
    if type(tensor).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__ or tensor.is_meta:
        return None
    try:
        address = tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return None
    return address or None


def sharing_memory(entries: Iterable[tuple[Hashable, torch.Tensor]],
                   spans: Iterable[tuple[int, int, Hashable]] = ()) -> set[Hashable]:
    """The keys of the entries whose tensor overlaps the bytes of another entry's
    (the same tensor listed twice counts as sharing); ``spans``: more entries,
    as the ``(start, end, key)`` of their :func:`memory_span` read by the caller
    (the C walk of the module tree reads those of most tensors). Tensors on the meta device
    (a model's structure) have no addresses: they share when they view
    overlapping bytes of one storage. Other tensors without memory to compare
    share when they are the same tensor or views of one."""
    spans = list(spans)
    meta_spans: dict[int, list[tuple[int, int, Hashable]]] = {}
    roots: dict[int, Hashable] = {}
    shared: set[Hashable] = set()
    for key, tensor in entries:
        span = memory_span(tensor)
        if span is not None:
            spans.append((span[0], span[1], key))
        elif tensor.is_meta and tensor.layout == torch.strided and tensor.numel():
            start = tensor.storage_offset() * tensor.element_size()
            meta_spans.setdefault(tensor.untyped_storage()._cdata, []).append((start, start + _extent(tensor), key))
        else:
            root = tensor
            while root._base is not None:
                root = root._base
            other = roots.setdefault(id(root), key)
            if other is not key:
                shared.update((other, key))
    for group in (spans, *meta_spans.values()):
        shared |= _overlapping(group)
    return shared


def _overlapping(spans: list[tuple[int, int, Hashable]]) -> set[Hashable]:
    """The keys of the ``(start, end, key)`` spans that overlap another span."""
    shared: set[Hashable] = set()
    cluster: list[Hashable] = []
    end = -1
    for start, stop, key in sorted(spans):
        if start < end:  # overlaps the interval of the cluster that reaches furthest
            cluster.append(key)
        else:
            if len(cluster) > 1:
                shared.update(cluster)
            cluster = [key]
        end = max(end, stop) if len(cluster) > 1 else stop
    if len(cluster) > 1:
        shared.update(cluster)
    return shared
