"""A faster ``copy.deepcopy`` for ``nn.Module`` trees.

``copy.deepcopy`` of a model spends most of its time in Python bookkeeping,
not in copying tensors: every module goes through ``__reduce_ex__``, a
``_reconstruct`` call and a generic deep copy of its ``__dict__``, and each of
its ~15 bookkeeping dicts (parameters, buffers, hook tables) through the
generic dispatch. :func:`copy_module` takes the same steps for the objects a
model is made of (modules that keep the default copy protocol, exact dicts,
OrderedDicts, lists, tuples, sets) directly, and hands everything else
(tensors, Parameters, partials, bound methods, modules with their own copy
hooks, custom objects) to ``copy.deepcopy`` with the same memo, so the result
and its sharing are the ones ``copy.deepcopy`` would give.
"""

from __future__ import annotations

import copy
import copyreg
import types
import weakref
from collections import OrderedDict
from operator import is_

import torch
from torch import nn

from .errors import FoldError
from .layers import batchnorm_kind

__all__ = ["copy_module", "meta_copy"]

# The types copy.deepcopy returns as they are. The Python ones are its own
# atomic dispatch entries (copy._deepcopy_dispatch). torch.dtype and
# torch.memory_format reduce to a string, which deepcopy takes to mean "the
# object is a singleton, return it"; torch.layout reduces through
# copyreg.dispatch_table to a lookup of the same singleton, which deepcopy
# returns (its only trace, memo[id(layout)] = layout, maps it to itself).
# torch.device is deliberately absent: deepcopy rebuilds it (an equal but new
# object), so it takes the fallback.
_ATOMIC_TYPES = frozenset({
    type(None), type(Ellipsis), type(NotImplemented), int, float, bool, complex, bytes, str,
    types.CodeType, type, range, types.BuiltinFunctionType, types.FunctionType, weakref.ref, property,
    torch.dtype, torch.layout, torch.memory_format,
})

# memo.get default: a memo value may itself be None.
_MISSING = object()

# Instance attributes that would shadow the class's copy hooks: deepcopy looks
# __deepcopy__, __reduce_ex__ and __getstate__ up on the instance (__reduce__
# only on the class), so a module carrying one of them in its __dict__ is
# left to deepcopy.
_COPY_HOOK_NAMES = frozenset({"__deepcopy__", "__reduce_ex__", "__getstate__"})


def _has_default_copy_protocol(cls: type) -> bool:
    """Whether deepcopy copies instances of ``cls`` as a plain ``nn.Module``.

    That is, through ``object.__reduce_ex__(4)``, which yields
    ``(copyreg.__newobj__, (cls,), module.__getstate__(), None, None)``, and
    ``_reconstruct``, which calls ``cls.__new__(cls)``, memoizes the new module,
    deep-copies the state and passes it to ``__setstate__``. Module's
    ``__getstate__`` returns a fresh dict that nothing else refers to, which is
    why its copy need not go through the memo. Any class that changes one step
    of that (its own ``__deepcopy__``, reduce or getstate, new arguments, a
    registered reducer, attribute lookup that is not Module's, or list/dict
    items that reduce would also copy) is left to deepcopy.
    """
    return (
        issubclass(cls, nn.Module)
        and not issubclass(cls, (type, list, dict))
        and cls not in copy._deepcopy_dispatch
        and cls not in copyreg.dispatch_table
        and not hasattr(cls, "__deepcopy__")
        and getattr(cls, "__reduce_ex__", None) is object.__reduce_ex__
        and getattr(cls, "__reduce__", None) is object.__reduce__
        and getattr(cls, "__getstate__", None) is nn.Module.__getstate__
        and not hasattr(cls, "__getnewargs_ex__")
        and not hasattr(cls, "__getnewargs__")
        and getattr(cls, "__getattribute__", None) is object.__getattribute__
        and getattr(cls, "__getattr__", None) is nn.Module.__getattr__
    )


def copy_module(module: nn.Module, memo: dict[int, object] | None = None) -> nn.Module:
    """Return exactly what ``copy.deepcopy(module, memo)`` returns, faster.

    The copy has the same structure and sharing (an object reached twice is
    copied once, cycles are kept), the same hooks and attributes, and its
    tensors are cloned by their own ``__deepcopy__``; an object whose id is a
    key of ``memo`` is replaced by the memo's value wherever it occurs (seed the
    memo with ``{id(tensor): tensor}`` to share a tensor instead of cloning it,
    or with a replacement module). Like deepcopy, the memo is filled with the
    copies made, and the originals are kept alive in ``memo[id(memo)]``, so the
    memo stays valid for a later copy that must share with this one.

    Modules that keep ``nn.Module``'s copy protocol and their bookkeeping
    containers are copied here; anything else goes to ``copy.deepcopy`` with
    the same memo. One difference, by design: objects of the types deepcopy
    treats as atomic (int, str, functions, dtypes, ...) are returned as they
    are before the memo is looked at, so a memo entry keyed by the id of such
    an object (which deepcopy itself never makes) is not honored.
    """
    if memo is None:
        memo = {}
    deepcopy = copy.deepcopy
    atomic = _ATOMIC_TYPES
    # Originals this call put in the memo. The memo maps id(original) -> copy,
    # so an original must outlive the memo entry, or a new object could reuse
    # its id and be "found" in the memo. While this call runs they are all
    # reachable from ``module``; they are added to memo[id(memo)] at the end,
    # where deepcopy keeps its own, for a caller that reuses the memo after
    # dropping the model. The temporary __getstate__ dicts are never memoized
    # (nothing else can reach them), so they need no keeping.
    originals: list[object] = []
    keep = originals.append
    # Decided per call, not once per class for good: parametrize creates a class
    # per module (a global cache would keep them all alive) and a class or the
    # copy dispatch tables may change between calls.
    default_protocol: dict[type, bool] = {}

    def copy_dict_into(source: dict, target: dict) -> None:
        # deepcopy's dict copier evaluates `y[deepcopy(k)] = deepcopy(v)`, so the
        # value is copied before its key; the order decides what a cycle sees.
        for key, value in source.items():
            target[key if type(key) in atomic else copy_object(key)] = (
                value if type(value) in atomic else copy_object(value))

    def copy_object(x):
        cls = type(x)
        if cls in atomic:
            return x
        y = memo.get(id(x), _MISSING)
        if y is not _MISSING:
            return y

        if cls is OrderedDict:
            # deepcopy goes through OrderedDict.__reduce__: a new OrderedDict is
            # memoized before the items are copied, each key before its value.
            # Instance attributes of the dict would be copied too: left to deepcopy.
            if not x.__dict__:
                y = OrderedDict()
                memo[id(x)] = y
                keep(x)
                for key, value in x.items():
                    key = key if type(key) in atomic else copy_object(key)
                    y[key] = value if type(value) in atomic else copy_object(value)
                return y
        elif cls is dict:
            y = {}
            memo[id(x)] = y  # before the items: an item may refer back to the dict
            keep(x)
            copy_dict_into(x, y)
            return y
        elif cls is tuple:
            for item in x:
                if type(item) not in atomic:
                    break
            else:
                return x  # deepcopy returns a tuple whose items all copy to themselves
            items = [copy_object(item) for item in x]
            # A tuple cannot be memoized before its items exist; if one of them
            # led back to this tuple, that inner copy is the one to return.
            y = memo.get(id(x), _MISSING)
            if y is not _MISSING:
                return y
            if all(map(is_, items, x)):
                return x
            y = tuple(items)
            memo[id(x)] = y  # deepcopy memoizes every copy that is a new object
            keep(x)
            return y
        elif cls is set or cls is frozenset:
            # Sets reduce to cls(list_of_items): the items are copied first, in
            # iteration order, and the set is memoized afterwards. A frozenset
            # is rebuilt too (deepcopy returns a new, equal frozenset).
            y = cls([item if type(item) in atomic else copy_object(item) for item in x])
            memo[id(x)] = y
            keep(x)
            return y
        elif cls is list:
            y = []
            memo[id(x)] = y
            keep(x)
            append = y.append
            for item in x:
                append(item if type(item) in atomic else copy_object(item))
            return y
        else:
            plain = default_protocol.get(cls)
            if plain is None:
                plain = default_protocol[cls] = _has_default_copy_protocol(cls)
            if plain and _has_no_instance_copy_hooks(x.__dict__):
                # The steps of object.__reduce_ex__ + copy._reconstruct, in their
                # order: getstate, new object, memo, copy the state, setstate
                # (which subclasses such as the convs may override; deepcopy
                # calls it too).
                state = x.__getstate__()
                y = cls.__new__(cls)
                memo[id(x)] = y
                keep(x)
                state_copy: dict = {}
                copy_dict_into(state, state_copy)
                y.__setstate__(state_copy)
                return y
        return deepcopy(x, memo)

    try:
        return copy_object(module)
    finally:
        if originals:
            memo.setdefault(id(memo), []).extend(originals)


def _has_no_instance_copy_hooks(attributes: dict) -> bool:
    """Whether deepcopy would find no copy hook on the module instance itself.

    Besides its ``__dict__``, Module's ``__getattr__`` answers
    ``getattr(module, "__deepcopy__")`` from its parameters, buffers and
    submodules, so one registered under that name would be called by deepcopy.
    """
    return (_COPY_HOOK_NAMES.isdisjoint(attributes)
            and "__deepcopy__" not in attributes.get("_parameters", ())
            and "__deepcopy__" not in attributes.get("_buffers", ())
            and "__deepcopy__" not in attributes.get("_modules", ()))


def copy_for_folding(model: nn.Module, replaced_batchnorms: list[nn.Module],
                     weights: list[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` ready for a fold to be written into it.

    The copy's memo is seeded with what it would otherwise copy only to
    overwrite: each BN to be folded maps to its replacement (when that is the
    identity), and each weight to be folded to an unwritten Parameter (as
    ``Parameter.__deepcopy__`` would make it), which the fold's kernels then
    write from the original in one pass. Raises :class:`FoldError` when the
    model cannot be copied.
    """
    memo: dict[int, object] = {}
    for bn in replaced_batchnorms:
        kind = batchnorm_kind(bn)
        if kind.passes(bn):
            memo[id(bn)] = kind.replacement(bn).train(bn.training)
    for weight in weights:
        if type(weight) is nn.Parameter:
            memo[id(weight)] = nn.Parameter(torch.empty_like(weight), weight.requires_grad)
    try:
        return copy_module(model, memo)
    except Exception as exc:  # e.g. pruning or legacy weight_norm keep non-leaf weight tensors
        raise FoldError(
            f"cannot copy {type(model).__name__} (deep-copying it failed: {exc}); fold it in place with "
            "inplace=True, or make it copyable first (e.g. torch.nn.utils.prune.remove)"
        ) from exc


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device
    (same shapes, dtypes, strides and ``requires_grad``): its structure, at no
    memory cost, to plan and fold without touching ``model``. Ties are kept,
    those made through ``.data`` and views too: tensors sharing a storage get
    views of one meta storage, at the same offsets."""
    memo: dict[int, object] = {}
    storages: dict[int, torch.UntypedStorage] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in memo:
            continue
        stand_in = torch.empty_like(tensor, device="meta")
        if tensor.layout == torch.strided and tensor.numel() and \
                type(tensor).__torch_dispatch__ is torch.Tensor.__torch_dispatch__:
            storage = tensor.untyped_storage()
            key = storage.data_ptr() if not tensor.is_meta else storage._cdata
            if key not in storages:
                storages[key] = torch.UntypedStorage(storage.nbytes(), device="meta")
            stand_in = stand_in.set_(storages[key], tensor.storage_offset(), tensor.shape, tensor.stride())
        memo[id(tensor)] = (nn.Parameter(stand_in, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else stand_in)
    return copy_module(model, memo)
