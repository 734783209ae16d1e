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
Offsets are int64 throughout: a weight may hold more than 2**31 elements.

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

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Elements per program. On a GPU a program walks its chunk in blocks, sized so
# that the int64 index math and float64 values fit in registers with the
# default 4 warps (ptxas for sm_90: about 70 registers for rescale_ at 512,
# 128 for pad_add_ at 256, no spills). The interpreter pays per operation,
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

# Dims per tensor in pad_add_: (out, in, up to three spatial), padded with size 1.
_PAD_DIMS = 5


@triton.jit
def _round(x, ELEMENT: tl.constexpr):
    """float64 -> ELEMENT like ``reference.round_from_float64``."""
    if ELEMENT == tl.float16 or ELEMENT == tl.bfloat16:
        x = x.to(tl.float32)
    return x.to(ELEMENT)


@triton.jit
def _rescale_kernel(targets, items, chunks, ELEMENT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """``W[r, c, ...] = round(S * (A[r] * B[(r // R) * cols + c]))`` for every item of a target.

    Target rows: address, source address (the same in place), numel, row block
    (elements per row r), column block (elements per column c: the sizes of the
    dims stored inside dim 1), cols, first item, item count. Item rows: R (rows per group), A's address and index step, B's
    address and index step (step 0 with the address of a 1.0 when missing).
    """
    pid = tl.program_id(0).to(tl.int64)
    target = targets + 8 * tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    weight = tl.load(target).to(tl.pointer_type(ELEMENT))
    source = tl.load(target + 1).to(tl.pointer_type(ELEMENT))
    stop = tl.minimum(start + CHUNK, tl.load(target + 2))
    row_block = tl.load(target + 3)
    col_block = tl.load(target + 4)
    cols = tl.load(target + 5)
    first_item = tl.load(target + 6)
    n_items = tl.load(target + 7)
    for base in range(start, stop, BLOCK):
        idx = base + tl.arange(0, BLOCK).to(tl.int64)
        inside = idx < stop
        # Dim 0 is outermost in a contiguous or channels_last weight, so the row
        # is the flat index over the row size; the column repeats with period
        # cols * col_block inside a row.
        r = idx // row_block
        c = (idx % row_block) // col_block % cols
        x = tl.load(source + idx, mask=inside)
        for k in range(first_item, first_item + n_items):
            item = items + 5 * k
            rows_per_group = tl.load(item)
            row_scale = tl.load(item + 1).to(tl.pointer_type(tl.float64))
            row_step = tl.load(item + 2)
            col_scale = tl.load(item + 3).to(tl.pointer_type(tl.float64))
            col_step = tl.load(item + 4)
            a = tl.load(row_scale + r * row_step, mask=inside)
            b = tl.load(col_scale + ((r // rows_per_group) * cols + c) * col_step, mask=inside)
            x = _round(x.to(tl.float64) * (a * b), ELEMENT)
        tl.store(weight + idx, x, mask=inside)


@triton.jit
def _tap(y, field, hit, small_offset):
    """One dim of a window: is coordinate ``y`` of the big kernel a tap
    ``offset + j * dilation`` with ``j < taps``, and the small's offset plus ``j * stride``."""
    offset = tl.load(field)
    dilation = tl.load(field + 1)
    taps = tl.load(field + 2)
    stride = tl.load(field + 3)
    d = y - offset
    j = d // dilation
    hit = hit & (d >= 0) & (d % dilation == 0) & (j < taps)
    return hit, small_offset + j * stride


@triton.jit
def _pad_add_kernel(targets, items, chunks, ELEMENT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """``big[o, i, off + j * dil] = round(big + small[o, i, j] * scale[o])`` for every item of a big kernel.

    Target rows: address, numel, the 5 sizes in memory order (dim 0 first,
    padded with 1), first item, item count. Item rows: the small's address,
    the scale's address and index step, then per memory-order dim of the big
    kernel: offset, dilation, taps and the small's stride (0, 1, size, stride
    for the out and in dims; 0, 1, 1, 0 for padding).
    """
    pid = tl.program_id(0).to(tl.int64)
    target = targets + 9 * tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    big = tl.load(target).to(tl.pointer_type(ELEMENT))
    stop = tl.minimum(start + CHUNK, tl.load(target + 1))
    size1 = tl.load(target + 3)
    size2 = tl.load(target + 4)
    size3 = tl.load(target + 5)
    size4 = tl.load(target + 6)
    first_item = tl.load(target + 7)
    n_items = tl.load(target + 8)
    for base in range(start, stop, BLOCK):
        idx = base + tl.arange(0, BLOCK).to(tl.int64)
        inside = idx < stop
        # The big kernel is dense, so its flat memory index decodes into one
        # coordinate per memory-order dim; y0 is the output channel.
        y4 = idx % size4
        rest = idx // size4
        y3 = rest % size3
        rest = rest // size3
        y2 = rest % size2
        rest = rest // size2
        y1 = rest % size1
        y0 = rest // size1
        x = tl.load(big + idx, mask=inside)
        touched = idx < 0
        for k in range(first_item, first_item + n_items):
            item = items + 23 * k
            small = tl.load(item).to(tl.pointer_type(ELEMENT))
            scale = tl.load(item + 1).to(tl.pointer_type(tl.float64))
            scale_step = tl.load(item + 2)
            hit, offset = _tap(y0, item + 3, inside, 0)
            hit, offset = _tap(y1, item + 7, hit, offset)
            hit, offset = _tap(y2, item + 11, hit, offset)
            hit, offset = _tap(y3, item + 15, hit, offset)
            hit, offset = _tap(y4, item + 19, hit, offset)
            added = tl.load(small + offset, mask=hit).to(tl.float64) * tl.load(scale + y0 * scale_step, mask=hit)
            x = tl.where(hit, _round(x.to(tl.float64) + added, ELEMENT), x)
            touched = touched | hit
        tl.store(big + idx, x, mask=touched)


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
    one = torch.ones(1, dtype=torch.float64, device=device)
    batches = _group_targets(
        (w, [w.shape[0] // g] + _scale_field(row, one) + _scale_field(col, one)) for w, row, col, g in live
    )
    _check_no_overlap([t for targets in batches.values() for t, _ in targets], [])
    # A weight listed twice is scaled twice in place; with separate sources the
    # op's checks allow each weight only once, so one source per target suffices.
    source_of = {w.data_ptr(): src.data_ptr() for w, src in zip(weights, sources)}

    def target_fields(w: torch.Tensor) -> list[int]:
        order = _memory_order(w)
        col_block = math.prod(w.shape[d] for d in order[order.index(1) + 1:])
        return [w.data_ptr(), source_of[w.data_ptr()], w.numel(), w.numel() // w.shape[0], col_block, w.shape[1]]

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
    one = torch.ones(1, dtype=torch.float64, device=device)

    def item(big, small, scale, offs, dils) -> list[int]:
        window = {0: (0, 1), 1: (0, 1), **{2 + d: (o, dil) for d, (o, dil) in enumerate(zip(offs, dils))}}
        fields = [small.data_ptr()] + _scale_field(scale, one)
        for d in _memory_order(big):
            fields += [*window[d], small.shape[d], small.stride(d)]
        return fields + [0, 1, 1, 0] * (_PAD_DIMS - big.dim())

    batches = _group_targets((entry[0], item(*entry)) for entry in live)
    _check_no_overlap([t for targets in batches.values() for t, _ in targets], [small for _, small, *_ in live])

    def target_fields(big: torch.Tensor) -> list[int]:
        sizes = [big.shape[d] for d in _memory_order(big)] + [1] * (_PAD_DIMS - big.dim())
        return [big.data_ptr(), big.numel()] + sizes

    _launch(_pad_add_kernel, _PAD_ADD_BLOCK, batches, target_fields, device)
