"""The ``triton`` backend: both primitives as batched Triton kernels.

One call folds a whole model, so it touches hundreds of tensors of very
different sizes. Launching a kernel per tensor would make the launches cost
more than the work; instead each call launches **one kernel per dtype**, driven
by int64 tables on the tensors' device:

* a *target* table with, per distinct written tensor, its address
  (``data_ptr()``), its element count, the few sizes the index math needs and
  the span of its rows in the item table;
* an *item* table with, per list entry that writes the target, the addresses
  and integers of that entry (its scales, or its small kernel and window);
* a *chunk* table mapping each program id to (target, first element), in
  fixed chunks of ``_CHUNK`` elements.

A kernel turns an address into a typed pointer (``addr.to(tl.pointer_type(T))``),
so one launch reaches any number of tensors without a per-tensor argument.
A chunk's first element is an int64 offset (a weight may hold more than 2**31
elements); everything per element is int32 relative to it (``_chunk``).

Each program walks a chunk of its target in *memory* order and applies that
target's entries in list order, rounding after each. This gives the same result
as the reference's one-entry-after-another loop even when a list names the
same tensor twice (several branches added into one kernel), and no two
programs ever write the same element, so there is no race on a GPU.

All arithmetic is float64, exactly as in :mod:`fusedconv.kernels.reference`,
and each written value is rounded once per entry with the reference's
``round_from_float64``: float64 -> float32 for float32, and float64 -> float32
-> float16/bfloat16 for the half types. The float32 step is written out
because Triton would otherwise convert float64 to 16 bits in one rounding,
which differs from the reference's two roundings near ties. Kernels are
compiled with ``enable_fp_fusion=False``: a fused multiply-add of
``big + small * scale`` would skip the reference's rounding of the product.
Missing scales point at a float64 1.0 with index step 0; multiplying by 1.0 is
exact, so the result is bit-identical to skipping the factor.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from . import reference

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Elements per program. On a GPU a program walks its chunk in blocks, sized so
# that the index math and float64 values fit in registers with the default
# 4 warps (ptxas for sm_90, Triton 3.8: 48 registers for rescale_ at 512, 56
# for pad_add_ at 256, no spills). The interpreter pays per operation,
# not per element, so there a chunk is one block.
_CHUNK = 16384
_RESCALE_BLOCK = _CHUNK if _INTERPRETING else 512
_PAD_ADD_BLOCK = _CHUNK if _INTERPRETING else 256

_ELEMENT_TYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

# The kernels count in int32 within a chunk, and send larger tensors (a row or
# a row count near 2**31, a small kernel of that many elements) to the
# reference: a row index or row offset plus one chunk must stay below 2**31.
_INT32_LIMIT = 2**31 - 2 * _CHUNK

# Dims per tensor in pad_add_: (out, in, up to three spatial), padded with size 1.
_PAD_DIMS = 5


@triton.jit
def _round(x, ELEMENT: tl.constexpr):
    """float64 -> ELEMENT like ``reference.round_from_float64``."""
    if ELEMENT == tl.float16 or ELEMENT == tl.bfloat16:
        x = x.to(tl.float32)
    return x.to(ELEMENT)


@triton.jit
def _divmod(a, b):
    q = a // b
    return q, a - q * b


@triton.jit
def _chunk(targets, chunks, FIELDS: tl.constexpr, CHUNK: tl.constexpr):
    """This program's chunk: its target's table row, its first element ``start``
    (int64), its length, and the row (along dim 0) and offset in that row of
    its first element.

    Every target row starts with address, numel, row length. GPUs have no
    64-bit integer divide (each is a software routine of dozens of
    instructions), so this division, once per program, is the kernels' only
    one: all per-element index math is int32, relative to the chunk, and the
    host sends only targets where it cannot overflow (``_fits_int32``).
    """
    pid = tl.program_id(0).to(tl.int64)
    target = targets + FIELDS * tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    length = tl.minimum(tl.load(target + 1) - start, CHUNK).to(tl.int32)
    row_length = tl.load(target + 2)
    first_row, first_offset = _divmod(start, row_length)
    return target, start, length, first_row.to(tl.int32), first_offset.to(tl.int32), row_length.to(tl.int32)


@triton.jit
def _rows(k, first_row, first_offset, row_length):
    """Row and offset in the row of the chunk's elements ``k`` (all int32)."""
    rows_on, offset = _divmod(first_offset + k, row_length)
    return first_row + rows_on, offset


@triton.jit
def _rescale_kernel(targets, items, chunks, ELEMENT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """``W[r, c, ...] = round(S * (A[r] * B[(r // R) * cols + c]))`` for every item of a target.

    Target rows: address, numel, row length (elements per row r), source
    address (the same in place), column block (elements per column c: the
    sizes of the dims stored inside dim 1), cols, first item, item count. Item
    rows: R (rows per group), A's address and index step, B's address and
    index step (step 0 with the address of a 1.0 when missing).
    """
    target, start, length, first_row, first_offset, row_length = _chunk(targets, chunks, 8, CHUNK)
    # Pointers to the chunk's first element: offsets from them are int32.
    weight = tl.load(target).to(tl.pointer_type(ELEMENT)) + start
    source = tl.load(target + 3).to(tl.pointer_type(ELEMENT)) + start
    col_block = tl.load(target + 4).to(tl.int32)
    cols = tl.load(target + 5).to(tl.int32)
    first_item = tl.load(target + 6)
    n_items = tl.load(target + 7)
    for base in range(0, length, BLOCK):
        k = base + tl.arange(0, BLOCK)
        inside = k < length
        # Dim 0 is outermost in a contiguous or channels_last weight, so rows
        # are consecutive runs of row_length elements; the column repeats with
        # period cols * col_block inside a row.
        r, offset = _rows(k, first_row, first_offset, row_length)
        x = tl.load(source + k, mask=inside)
        for i in range(first_item, first_item + n_items):
            item = items + 5 * i
            row_scale = tl.load(item + 1).to(tl.pointer_type(tl.float64))
            factor = tl.load(row_scale + r * tl.load(item + 2).to(tl.int32), mask=inside)
            col_step = tl.load(item + 4)
            # The column and group divisions only for a scale per column (a BN
            # before the layer): the branch is uniform, and without that scale
            # the product is the same (A[r] * 1.0 == A[r]).
            if col_step != 0:
                col_scale = tl.load(item + 3).to(tl.pointer_type(tl.float64))
                group = r // tl.load(item).to(tl.int32)
                c = offset // col_block % cols
                # groups * cols can pass 2**31 (only rows and row lengths are bounded): int64
                factor = factor * tl.load(col_scale + group.to(tl.int64) * cols + c, mask=inside)
            x = _round(x.to(tl.float64) * factor, ELEMENT)
        tl.store(weight + k, x, mask=inside)


@triton.jit
def _tap(y, field, hit, small_offset):
    """One dim of a window: is coordinate ``y`` of the big kernel a tap
    ``offset + j * dilation`` with ``j < taps``, and the small's offset plus ``j * stride``."""
    offset = tl.load(field).to(tl.int32)
    dilation = tl.load(field + 1).to(tl.int32)
    taps = tl.load(field + 2).to(tl.int32)
    stride = tl.load(field + 3).to(tl.int32)
    d = y - offset
    # Most dims are undilated (all but some spatial ones): the uniform branch
    # skips their division.
    if dilation == 1:
        j = d
    else:
        j = d // dilation
    hit = hit & (d >= 0) & (j * dilation == d) & (j < taps)
    return hit, small_offset + j * stride


@triton.jit
def _pad_add_kernel(targets, items, chunks, ELEMENT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """``big[o, i, off + j * dil] = round(big + small[o, i, j] * scale[o])`` for every item of a big kernel.

    Target rows: address, numel, row length (elements per o), the sizes of the
    3 innermost memory-order dims (padded with 1), first item, item count.
    Item rows: the small's address, the scale's address and index step, then
    per memory-order dim of the big kernel: offset, dilation, taps and the
    small's stride (0, 1, size, stride for the out and in dims; 0, 1, 1, 0 for
    padding).
    """
    target, start, length, first_row, first_offset, row_length = _chunk(targets, chunks, 8, CHUNK)
    big = tl.load(target).to(tl.pointer_type(ELEMENT)) + start
    size2 = tl.load(target + 3).to(tl.int32)
    size3 = tl.load(target + 4).to(tl.int32)
    size4 = tl.load(target + 5).to(tl.int32)
    first_item = tl.load(target + 6)
    n_items = tl.load(target + 7)
    for base in range(0, length, BLOCK):
        k = base + tl.arange(0, BLOCK)
        inside = k < length
        # The big kernel is dense, so an element's offset in its row (dim 0,
        # the output channel y0) decodes into one coordinate per memory-order dim.
        y0, offset = _rows(k, first_row, first_offset, row_length)
        rest, y4 = _divmod(offset, size4)
        rest, y3 = _divmod(rest, size3)
        y1, y2 = _divmod(rest, size2)
        x = tl.load(big + k, mask=inside)
        touched = k < 0
        for i in range(first_item, first_item + n_items):
            item = items + 23 * i
            small = tl.load(item).to(tl.pointer_type(ELEMENT))
            scale = tl.load(item + 1).to(tl.pointer_type(tl.float64))
            scale_step = tl.load(item + 2).to(tl.int32)
            # Every output channel is in the window: no test for dim 0.
            hit, at = _tap(y1, item + 7, inside, y0 * tl.load(item + 6).to(tl.int32))
            hit, at = _tap(y2, item + 11, hit, at)
            hit, at = _tap(y3, item + 15, hit, at)
            hit, at = _tap(y4, item + 19, hit, at)
            added = tl.load(small + at, mask=hit).to(tl.float64) * tl.load(scale + y0 * scale_step, mask=hit)
            x = tl.where(hit, _round(x.to(tl.float64) + added, ELEMENT), x)
            touched = touched | hit
        tl.store(big + k, x, mask=touched)


def _memory_order(t: torch.Tensor) -> list[int]:
    """The dims of a contiguous or channels_last tensor from outermost to
    innermost. Dim 0 is outermost in both layouts, so it is put first: a size-1
    dim may carry any stride, and where it lands in the order does not matter."""
    return [0] + sorted(range(1, t.dim()), key=lambda d: -t.stride(d))


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _view_key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


def _group_targets(entries) -> dict[torch.dtype, list[tuple[torch.Tensor, list]]]:
    """``(target, item)`` pairs, in call order, -> per dtype, each distinct
    target view with its items in call order."""
    by_dtype: dict[torch.dtype, dict[tuple, tuple[torch.Tensor, list]]] = {}
    for target, item in entries:
        views = by_dtype.setdefault(target.dtype, {})
        views.setdefault(_view_key(target), (target, []))[1].append(item)
    return {dtype: list(views.values()) for dtype, views in by_dtype.items()}


def _distinct(tensors) -> list[torch.Tensor]:
    """Each view once (a list may name the same tensor several times)."""
    return list({_view_key(t): t for t in tensors}.values())


def _fits_int32(t: torch.Tensor) -> bool:
    """Whether the kernels' int32 index math holds for ``t`` (see ``_chunk``):
    its rows (dim 0) and the elements of one row are counted in int32."""
    rows = t.shape[0]
    return rows < _INT32_LIMIT and t.numel() // rows < _INT32_LIMIT


def _check_no_overlap(written: Sequence[torch.Tensor], read: Sequence[torch.Tensor]) -> None:
    """Refuse memory that one program writes while another reads or writes it:
    distinct written views that overlap, or a read tensor inside a written one.
    (The same view written twice is fine: one program applies both entries.)"""
    spans = sorted(_span(t) for t in written)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError("the triton backend cannot update overlapping views of one tensor in one call")
    starts = [start for start, _ in spans]
    for t in read:
        start, end = _span(t)
        k = bisect.bisect_left(starts, end) - 1
        if k >= 0 and spans[k][1] > start:
            raise ValueError("the triton backend cannot read a small kernel that overlaps a big one it writes")


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one.
    The interpreter dereferences the table's addresses on the host, so there
    only CPU tensors will do."""
    if device.type == "cuda" and not _INTERPRETING:
        return torch.cuda.device(device)
    if device.type == "cpu" and _INTERPRETING:
        return contextlib.nullcontext()
    raise RuntimeError(f"the triton backend runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1, "
                       f"not on {device} here")


def _launch(
    kernel,
    block: int,
    batches: dict[torch.dtype, list[tuple[torch.Tensor, list]]],
    target_fields: Callable[[torch.Tensor], list[int]],
    device: torch.device,
) -> None:
    """Build the tables of every dtype, copy them to ``device`` at once, and
    launch ``kernel`` once per dtype."""
    guard = _device_guard(device)
    host: list[int] = []
    launches = []
    for dtype, targets in batches.items():
        target_rows, item_rows, chunk_rows = [], [], []
        n_items = 0
        for k, (tensor, items) in enumerate(targets):
            target_rows += target_fields(tensor) + [n_items, len(items)]
            n_items += len(items)
            for item in items:
                item_rows += item
            for start in range(0, tensor.numel(), _CHUNK):
                chunk_rows += [k, start]
        at = len(host)
        host += target_rows + item_rows + chunk_rows
        bounds = (at, at + len(target_rows), at + len(target_rows) + len(item_rows), len(host))
        launches.append((dtype, bounds, len(chunk_rows) // 2))
    # One copy for all tables. They (and the 1.0 of missing scales) are freed
    # on return while the launches may still be queued; the caching allocator
    # only hands the memory to later work on this stream, so that is safe.
    table = torch.tensor(host, dtype=torch.int64).to(device)
    with guard:
        for dtype, (a, b, c, d), n_programs in launches:
            kernel[(n_programs,)](
                table[a:b], table[b:c], table[c:d],
                ELEMENT=_ELEMENT_TYPES[dtype], CHUNK=_CHUNK, BLOCK=block, enable_fp_fusion=False,
            )


def _scale_field(scale: torch.Tensor | None, one: torch.Tensor) -> list[int]:
    """A scale's address and index step; a missing scale reads ``one`` at step 0."""
    return [one.data_ptr(), 0] if scale is None else [scale.data_ptr(), 1]


def rescale_(
    weights: Sequence[torch.Tensor],
    row_scales: Sequence[torch.Tensor | None],
    col_scales: Sequence[torch.Tensor | None],
    groups: Sequence[int],
    sources: Sequence[torch.Tensor],
) -> None:
    """``W[r, c, ...] = round(S[r, c, ...] * (row_scale[r] * col_scale[g(r) * cols + c]))`` in float64,
    where ``S`` is the weight itself or its separate source."""
    live = [
        (w, row, col, g)
        for w, row, col, g in zip(weights, row_scales, col_scales, groups)
        # With no scale the reference writes nothing, so neither does this.
        if w.numel() and (row is not None or col is not None)
    ]
    if not live:
        return
    device = live[0][0].device
    _check_no_overlap(_distinct(w for w, *_ in live), [])
    # A weight listed twice is scaled twice in place; with separate sources the
    # op's checks allow each weight only once, so one source per target suffices.
    source_of = {w.data_ptr(): src for w, src in zip(weights, sources)}
    wide = [entry for entry in live if not _fits_int32(entry[0])]
    if wide:
        live = [entry for entry in live if _fits_int32(entry[0])]
        reference.rescale_(*zip(*wide), [source_of[w.data_ptr()] for w, *_ in wide])
        if not live:
            return
    one = torch.ones(1, dtype=torch.float64, device=device)
    batches = _group_targets(
        (w, [w.shape[0] // g] + _scale_field(row, one) + _scale_field(col, one)) for w, row, col, g in live
    )

    def target_fields(w: torch.Tensor) -> list[int]:
        order = _memory_order(w)
        col_block = math.prod(w.shape[d] for d in order[order.index(1) + 1:])
        return [w.data_ptr(), w.numel(), w.numel() // w.shape[0], source_of[w.data_ptr()].data_ptr(), col_block,
                w.shape[1]]

    _launch(_rescale_kernel, _RESCALE_BLOCK, batches, target_fields, device)


def pad_add_(
    bigs: Sequence[torch.Tensor],
    smalls: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor | None],
    offsets: Sequence[int],
    dilations: Sequence[int],
) -> None:
    """``big[o, i, off + j * dil] = round(big[...] + small[o, i, j] * scale[o])`` in float64."""
    live, at = [], 0
    for big, small, scale in zip(bigs, smalls, scales):
        spatial = big.dim() - 2
        if small.numel():
            live.append((big, small, scale, offsets[at:at + spatial], dilations[at:at + spatial]))
        at += spatial
    if not live:
        return
    device = live[0][0].device
    _check_no_overlap(_distinct(big for big, *_ in live), [small for _, small, *_ in live])
    # A big kernel goes to the reference with all its entries if one of them is too large.
    wide = {_view_key(big) for big, small, *_ in live if not (_fits_int32(big) and small.numel() < _INT32_LIMIT)}
    if wide:
        to_reference = [entry for entry in live if _view_key(entry[0]) in wide]
        live = [entry for entry in live if _view_key(entry[0]) not in wide]
        bigs, smalls, scales, offsets, dilations = zip(*to_reference)
        reference.pad_add_(bigs, smalls, scales, [o for offs in offsets for o in offs],
                           [d for dils in dilations for d in dils])
        if not live:
            return
    one = torch.ones(1, dtype=torch.float64, device=device)

    def item(big, small, scale, offs, dils) -> list[int]:
        window = {0: (0, 1), 1: (0, 1), **{2 + d: (o, dil) for d, (o, dil) in enumerate(zip(offs, dils))}}
        fields = [small.data_ptr()] + _scale_field(scale, one)
        for d in _memory_order(big):
            fields += [*window[d], small.shape[d], small.stride(d)]
        return fields + [0, 1, 1, 0] * (_PAD_DIMS - big.dim())

    batches = _group_targets((entry[0], item(*entry)) for entry in live)

    def target_fields(big: torch.Tensor) -> list[int]:
        sizes = [big.shape[d] for d in _memory_order(big)] + [1] * (_PAD_DIMS - big.dim())
        return [big.data_ptr(), big.numel(), big.numel() // big.shape[0]] + sizes[2:]

    _launch(_pad_add_kernel, _PAD_ADD_BLOCK, batches, target_fields, device)
