"""Which blocks fusedconv re-parameterizes, and how: a registry of converters.

A converter takes a module and its qualified name and returns the
:class:`~fusedconv.reparam.Reparameterization` (or a list of them) that merges
it, without modifying anything. fusedconv's own blocks
(:class:`fusedconv.blocks.RepBlock`) describe themselves; the converters for
the blocks of timm and ultralytics (:mod:`fusedconv.thirdparty`, loaded with
fusedconv) are registered by their classes' names and take effect once those
packages have been imported (fusedconv never imports them itself); users
register their own with :func:`register_block`.

A registered block is trusted like its own ``reparameterize``/``fuse`` method
is: its branches are used by its forward only, so merging them changes nothing
outside it.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from typing import Callable, Iterable, Sequence, Union

from torch import nn

from .blocks.base import RepBlock
from .dataflow.references import forward_hooks, hook_may_use_its_module
from .errors import FoldError
from .layers import check_not_training, is_batchnorm_like, layer_kind
from .walking import submodules
from .reparam import (
    Reparameterization,
    check_reparameterizations,
    prefetched_bn_affines,
)

logger = logging.getLogger("fusedconv")

Converter = Callable[[nn.Module, str], Union[Reparameterization, Sequence[Reparameterization]]]

_CONVERTERS: dict[type, Converter] = {}

# Converters for the classes of Python modules fusedconv does not import (the
# model zoos'): module name -> [(class's qualified name, converter)], waiting
# for the module to be imported; and the classes whose converter came from such
# a registration (a later one by name replaces it, none replaces register_block's).
_BY_NAME: dict[str, list[tuple[str, Converter]]] = {}
_REGISTERED_BY_NAME: set[type] = set()
# Held while _BY_NAME changes: two first folds on two threads register each entry once.
_BY_NAME_LOCK = threading.Lock()


# id(block) -> its submodules, while plan_found_blocks runs the converters with a walk of the model at hand.
_MEMBERS: contextvars.ContextVar[dict[int, list[nn.Module]]] = contextvars.ContextVar("fusedconv_block_members",
                                                                                     default={})


def block_submodules(block: nn.Module) -> list[nn.Module]:
    """``list(block.modules())`` for a converter: while fusedconv plans a model's
    merges, taken from the walk of the model it made already."""
    known = _MEMBERS.get().get(id(block))
    return list(known) if known is not None else submodules(block)  # a copy: the index keeps its own


def register_block(cls: type, converter: Converter | None = None):
    """Register ``converter`` for modules of exactly the class ``cls``.

    Usable as a decorator on the converter: ``@register_block(MyBlock)``.
    A later registration for the same class replaces the earlier one.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_block takes an nn.Module subclass, got {cls!r}")
    if converter is None:
        return lambda fn: register_block(cls, fn) or fn
    with _BY_NAME_LOCK:
        _CONVERTERS[cls] = converter
        _REGISTERED_BY_NAME.discard(cls)
    return None


def register_block_by_name(module: str, qualname: str, converter: Converter) -> None:
    """Register ``converter`` for the class ``qualname`` of the Python module
    ``module`` (``"ultralytics.nn.modules.conv"``, ``"Conv"``), without importing
    that module: the registration takes effect at the first lookup after it
    has been imported. A later registration by name for the same class
    replaces an earlier one (fusedconv's own for the zoos are made when it is
    imported); a converter given to the class itself by :func:`register_block`
    is kept whatever the order. A class the module does not define (another
    version of its package) gets nothing, with a warning."""
    with _BY_NAME_LOCK:
        _BY_NAME.setdefault(module, []).append((qualname, converter))


def imported_class(module: str, qualname: str) -> type | None:
    """The class ``qualname`` of the Python module ``module`` when that module has
    been imported and defines it, else None; looks it up among the imported
    modules, and imports nothing itself."""
    found: object = sys.modules.get(module)
    for part in qualname.split(".") if found is not None else ():
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None


def instance_of(value: object, module: str, qualname: str) -> bool:
    """``isinstance(value, cls)`` for the class of :func:`imported_class`; False
    where that module is not imported or does not define it."""
    cls = imported_class(module, qualname)
    return cls is not None and isinstance(value, cls)


def _register_imported() -> None:
    """Register the converters of :func:`register_block_by_name` whose modules have
    been imported since the last lookup (a module still being imported is left
    for a later one: it may not define its classes yet; one blocked from
    importing, None in ``sys.modules``, waits too)."""
    with _BY_NAME_LOCK:
        for module in [name for name in _BY_NAME if sys.modules.get(name) is not None]:
            if getattr(getattr(sys.modules[module], "__spec__", None), "_initializing", False):
                continue
            for qualname, converter in _BY_NAME.pop(module):
                cls = imported_class(module, qualname)
                if cls is None or not issubclass(cls, nn.Module):
                    logger.warning("%s has no module class %s: its blocks are not merged (their BatchNorms are "
                                   "folded where they can be); this version of the package is not the one the "
                                   "converter was written for", module, qualname)
                elif cls not in _CONVERTERS or cls in _REGISTERED_BY_NAME:
                    _CONVERTERS[cls] = converter
                    _REGISTERED_BY_NAME.add(cls)


def converter_for(module: nn.Module) -> Converter | None:
    """The converter that merges ``module``, or None if it is not a known block."""
    _register_imported()
    return _loaded_converter_for(module)


def block_converter_lookup() -> Callable[[nn.Module], Converter | None]:
    """:func:`converter_for` for a caller that asks about many modules: the
    converters registered by name are looked at once, here."""
    _register_imported()
    return _loaded_converter_for


def _loaded_converter_for(module: nn.Module) -> Converter | None:
    """:func:`converter_for`, once the converters registered by name are registered."""
    converter = _CONVERTERS.get(type(module))
    if converter is None and isinstance(module, RepBlock) and not module.deployed:
        return _reparameterization_of
    return converter


def _reparameterization_of(block: RepBlock, name: str) -> Reparameterization:
    return block.reparameterization(name)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, Converter]]:
    """Every known block in ``model`` with its converter, outermost first (a
    block's own submodules are its converter's business)."""
    return blocks_among(model.named_modules())


def entangled_blocks(found: Sequence[tuple[str, nn.Module, Converter]], paths: dict[int, list[str]],
                     sharing_memory: set[int], holders: dict[int, list[str]] | None,
                     members: dict[str, list[nn.Module]] | None = None,
                     hooked: set[int] | None = None) -> dict[str, str]:
    """The blocks among ``found`` that a merge would change outside themselves,
    or whose own behaviour it would change, with the reason. A merge writes its
    layers' weights in place and stops calling the block's inner modules, so it
    is safe only if no Conv or Linear of the block is also registered at a path
    outside the block's own paths, reachable from the attributes or hooks of a
    module outside the block (``holders``: id(module) -> the paths of the
    modules that reach it; None when that cannot be told), or holding a tensor
    that shares memory with another tensor of the model (``sharing_memory``:
    the ids of such modules), and no module inside the block has forward hooks
    (which the merged conv would no longer run). ``paths``: id(module) -> every
    path where the model registers it. ``members``: each block's
    :func:`fusedconv.walking.submodules`, when the caller has them. ``hooked``:
    the ids of the model's modules with forward hooks or pre-hooks, when the
    caller knows them all; then only the blocks holding a module that one of
    the reasons can apply to (hooked, registered twice, held or sharing memory)
    are looked into, which in most models is none."""
    suspects = twice = None
    if hooked is not None and holders is not None:
        suspects = {*hooked, *sharing_memory, *holders}
        twice = {key for key, where in paths.items() if len(where) > 1}  # only a layer registered twice counts
    entangled = {}
    for name, block, _ in found:
        inner = members[name] if members is not None else submodules(block)
        if suspects is not None and suspects.isdisjoint(map(id, inner)) and (
                twice.isdisjoint(map(id, inner)) or
                all(layer_kind(module) is None for module in inner if id(module) in twice)):
            continue
        why = _why_entangled(block, inner, paths, sharing_memory, holders)
        if why is not None:
            entangled[name] = why
    return entangled


def _why_entangled(block: nn.Module, inner: list[nn.Module], paths: dict[int, list[str]], sharing_memory: set[int],
                   holders: dict[int, list[str]] | None) -> str | None:
    """:func:`entangled_blocks`' reason for one block (``inner``: its submodules), or None."""
    own_paths = paths[id(block)]
    inside = tuple(f"{path}." if path else "" for path in own_paths)
    if any(hook_may_use_its_module(hook) for hook in forward_hooks(block)):
        return "it has a forward hook that is called with the block and may read the modules the merge removes"
    for module in inner:
        if module is not block and (module._forward_hooks or module._forward_pre_hooks):
            return f"its {type(module).__name__} has forward hooks, which the merged conv would no longer run"
        if layer_kind(module) is None:
            continue  # activations and BNs are only read by a merge; a shared one stays as it is
        what = type(module).__name__
        registered = _path_outside(paths.get(id(module), ()), inside, own_paths)
        if registered is not None:
            return f"its {what} is also registered at {registered!r}, outside the block: merging would change " \
                   "that use too"
        if holders is None:
            return (f"something outside the module tree that fusedconv cannot follow may hold its {what}: merging "
                    "would change that use too")
        holder = _path_outside(holders.get(id(module), ()), inside, own_paths)
        if holder is not None:
            return (f"its {what} is also reachable from an attribute, hook or class of {holder or 'the model'}, "
                    "outside the block: merging would change that use too")
        if id(module) in sharing_memory:
            return (f"its {what} holds a tensor that shares memory with another tensor of the model: merging "
                    "would change that tensor too")
    return None


def _path_outside(candidates: Iterable[str], inside: tuple[str, ...], own_paths: list[str]) -> str | None:
    """The first of ``candidates`` outside a block (``inside``: the prefixes of
    its insides; ``own_paths``: its own paths), or None."""
    for path in candidates:
        if not (path.startswith(inside) or path in own_paths):
            return path
    return None


def blocks_among(named_modules: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module, Converter]]:
    """:func:`find_blocks` over the (name, module) pairs of a model's
    ``named_modules()``, for a caller that walks them anyway."""
    _register_imported()  # once, not for each module
    found: list[tuple[str, nn.Module, Converter]] = []
    inside = None  # the last block's prefix: depth first, the paths inside a block follow its own
    for name, module in named_modules:
        if inside is not None and name.startswith(inside):
            continue
        converter = _loaded_converter_for(module)
        if converter is not None:
            found.append((name, module, converter))
            inside = f"{name}." if name else ""
    return found


def plan_blocks(model: nn.Module, names: Sequence[str] | None = None, *,
                modules: dict[str, nn.Module] | None = None,
                members: dict[str, list[nn.Module]] | None = None) -> list[Reparameterization]:
    """Checked merges of every known block in ``model`` (or of the blocks at
    ``names``, as :func:`find_blocks` found them; ``modules``, the model's
    path -> module map, and ``members``, each block's submodules, when the
    caller has them, save looking them up again).
    Nothing is modified; raises :class:`fusedconv.FoldError` naming the block at fault."""
    if names is None:
        return plan_found_blocks(find_blocks(model))
    modules = modules if modules is not None else dict(model.named_modules(remove_duplicate=False))
    converter_of = block_converter_lookup()
    found = []
    for name in names:
        if name not in modules:
            raise FoldError(f"the plan names block {name!r}, which this model does not have")
        found.append((name, modules[name], converter_of(modules[name])))
    return plan_found_blocks(found, members)


def _check_block_not_training(block: nn.Module, name: str) -> None:
    """Raise :class:`FoldError` for a block in training mode, or holding a BN in
    training mode (it normalises with batch statistics, which a merge, made
    from the running ones, would not)."""
    label = name or type(block).__name__
    if block.training:
        raise FoldError(f"{label} ({type(block).__name__}) is in training mode, where its BatchNorms use batch "
                        "statistics: call model.eval() before merging")
    for path, module in block.named_modules():
        if module.training and is_batchnorm_like(module):
            check_not_training(module, f"{name}.{path}" if name else path)


def plan_found_blocks(found: Sequence[tuple[str, nn.Module, Converter]],
                      members: dict[str, list[nn.Module]] | None = None) -> list[Reparameterization]:
    """Checked merges of ``(name, block, converter)`` triples, the BNs'
    statistics read together; errors name each block by ``name``.
    ``members``: each block's submodules, when the caller has them."""
    with_members = [(name, block, (members or {}).get(name) or submodules(block)) for name, block, _ in found]
    # One pass over the blocks' modules finds those in training mode (an eval
    # model has none) and those with a registered running_var: the BNs whose
    # affine maps are computed together. Prefetching only saves time: a BN
    # holding its statistics elsewhere is left to bn_affine.
    flagged = [m for _, _, inner in with_members for m in inner if m.training or "running_var" in m._buffers]
    if any(m.training for m in flagged):
        for name, block, inner in with_members:
            if any(m.training for m in inner):
                _check_block_not_training(block, name)
    plans: list[Reparameterization] = []
    batchnorms = [m for m in flagged if "running_var" in m._buffers and is_batchnorm_like(m)]
    token = _MEMBERS.set({id(block): inner for _, block, inner in with_members})
    try:
        with prefetched_bn_affines(batchnorms):
            for name, module, converter in found:
                planned = converter(module, name or type(module).__name__)
                plans.extend([planned] if isinstance(planned, Reparameterization) else planned)
    finally:
        _MEMBERS.reset(token)
    return check_reparameterizations(plans)
