"""One walk over a model: its modules' paths, which are layers and which are
BatchNorms, and the facts about them that every later step asks for (shared
memory, modules reachable from outside the tree, global hooks)."""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import nn

from .dataflow.references import PLAIN_TYPES, attribute_values, modules_held_elsewhere
from .distributed import sharded_among
from .kernels.extension import native_function
from .layers import (
    MODULE_STATE,
    BatchNormKind,
    batchnorm_kind,
    is_batchnorm_like,
    layer_kind,
)
from .memory import sharing_memory, storage_key
from .registry import block_converter_lookup, entangled_blocks
from .walking import submodules


class ModelIndex:
    """Names, paths and tensor ownership of the modules fusedconv tracks, from
    one walk of the module tree that planning and applying share.

    Modules inside ``blocks`` (re-parameterizable blocks, merged by their
    converters; by default every known block of the model) are not tracked:
    the blocks are opaque to the dataflow. ``members`` lists the modules of
    each block (itself first; the entangled blocks, not merged, included), for
    the steps that look inside blocks.
    """

    def __init__(self, model: nn.Module, blocks: dict[str, nn.Module] | None = None, *,
                 sharded: bool | None = None):
        self.model = model
        walk = _Walk(model, blocks)
        self.paths: dict[int, list[str]] = walk.paths
        self.by_path: dict[str, nn.Module] = walk.by_path  # every path, duplicates included
        self.modules = modules = walk.modules  # first path of each module, as named_modules() gives
        # Whether the model is sharded (DTensors, FSDP2), told by the classes met
        # on the walk (``sharded``: the caller has found out already).
        self.sharded = sharded_among([m for _, m in modules], (t for _, t in walk.registered)) \
            if sharded is None else sharded
        # Modules holding a tensor that shares memory with another tensor of the
        # model (tied weights, ``.data`` assigned across modules, views), over
        # every module (those inside blocks too).
        holders = sharing_memory(walk.unspanned + walk.in_attributes, spans=walk.spans)
        # id(module) -> the paths of the modules whose attributes, hooks or class reach it
        self.holders: dict[int, list[str]] = {}
        holder_paths = self.holders
        # the modules held themselves, not only reached through one above them
        self.held_directly: set[int] = set()
        self.held_elsewhere = modules_held_elsewhere(modules, values=walk.values,
                                                     holders=holder_paths, directly=self.held_directly)
        self.members = walk.members
        self.entangled: dict[str, str] = {}  # blocks a merge would change outside themselves -> why
        if blocks is None:  # every known block, but the entangled ones
            self.entangled = entangled_blocks(walk.found, self.paths, {id(self.by_path[name]) for name in holders},
                                              None if self.held_elsewhere is None else holder_paths, self.members,
                                              walk.hooked)
            blocks = {name: block for name, block, _ in walk.found if name not in self.entangled}
        self.blocks = blocks
        self.layers: dict[str, nn.Module] = {}
        self.batchnorms: dict[str, nn.Module] = {}
        self.kinds: dict[str, BatchNormKind | None] = {}  # each BN's, looked up once for the rules' many asks
        # The path prefixes of the blocks' insides, in the order of ``blocks``
        # ("" for a model that is itself a block).
        self.block_prefixes = tuple(f"{name}." if name else "" for name in blocks)
        # The modules (first path, module) outside every block: the blocks' own
        # modules are merged with them. The walk set apart those of the blocks it
        # found; an entangled block's insides are outside again.
        self.outside = walk.outside if walk.found_all and not self.entangled else _outside_blocks(modules, blocks)
        for name, m in self.outside:
            if layer_kind(m) is not None:
                self.layers[name] = m
                continue
            if is_batchnorm_like(m):
                self.batchnorms[name] = m
                self.kinds[name] = batchnorm_kind(m)
        self.tracked = {id(m): name for name, m in (*self.layers.items(), *self.batchnorms.items())}
        self.global_hooks = _global_hooks_problem()
        self.shared: set[str] = {name for name in holders if name in self.layers or name in self.batchnorms}

    @functools.cached_property
    def owners(self) -> dict[int, tuple[str, ...]]:
        """Storage address -> the tracked modules holding a tensor in it (only a run
        needs them): a read of any view of a layer's weight is a read of the weight."""
        owners: dict[int, tuple[str, ...]] = defaultdict(tuple)
        for name, m in (*self.layers.items(), *self.batchnorms.items()):
            for t in _tensors(m):
                key = storage_key(t)
                if key is not None and name not in owners[key]:
                    owners[key] += (name,)
        return owners


def _outside_blocks(modules: list[tuple[str, nn.Module]],
                    blocks: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """The ``(path, module)`` pairs of ``modules`` (first paths, depth first) whose
    path is not inside one of the ``blocks`` (the blocks themselves are outside,
    but for the model itself as a block, which leaves nothing outside).
    Depth first, the paths inside a block follow the block's own path, so one
    pass comparing each path with the last block's prefix finds them (a test of
    every path against every block's prefix costs a fold of a model made of
    blocks as much as the rest of the index)."""
    if "" in blocks:
        return []  # the model is itself a block
    if not blocks:
        return list(modules)
    outside = []
    prefix = None
    for path, module in modules:
        if prefix is not None and path.startswith(prefix):
            continue
        prefix = f"{path}." if path in blocks else None
        outside.append((path, module))
    return outside


class _Walk:
    """One depth-first walk of a model's module tree (every path, parents before
    children, in registration order, as ``named_modules(remove_duplicate=False)``)
    that gathers what the index is made of, so that no later step walks it again.

    ``paths``: id(module) -> every path where it is registered; ``by_path``:
    every path -> its module; ``modules``: the first path of each module. For
    each of ``modules``: its :func:`attribute_values` (``values``), the tensors
    it registers (``registered``) and holds in attributes (``in_attributes``),
    as (path, tensor); ``hooked``: the ids of those with forward hooks.

    Blocks: with ``blocks`` None, every module whose class has a converter
    starts one (``found``: (path, block, converter), outermost only: a block's
    insides are its converter's business); otherwise the given paths do.
    ``members``: each block's :func:`fusedconv.walking.submodules` (the paths
    of its subtree follow its own path, depth first); ``outside``: the first
    paths outside every found block (the blocks themselves included; nothing
    for a model that is itself a block), complete when ``found_all``.
    """

    def __init__(self, model: nn.Module, blocks: dict[str, nn.Module] | None):
        self.paths: dict[int, list[str]] = {}
        self.by_path: dict[str, nn.Module] = {}
        self.modules: list[tuple[str, nn.Module]] = []
        self.values: list[list[object]] = []
        self.registered: list[tuple[str, torch.Tensor]] = []
        self.in_attributes: list[tuple[str, torch.Tensor]] = []
        self.hooked: set[int] = set()
        self.found: list[tuple[str, nn.Module, object]] = []
        self.members: dict[str, list[nn.Module]] = {}
        self.outside: list[tuple[str, nn.Module]] = []
        self.found_all = blocks is None
        # The registered tensors whose bytes the C walk read (start, end, path),
        # and the others (path, tensor), whose spans memory.sharing_memory reads.
        self.spans: list[tuple[int, int, str]] = []
        self.unspanned: list[tuple[str, torch.Tensor]] = []
        converter_of = block_converter_lookup() if blocks is None else None
        native = native_function("walk_modules")
        if native is not None:
            native(self, model, blocks, converter_of, MODULE_STATE, PLAIN_TYPES)
        else:
            self._walk(model, blocks, converter_of)
        members = self.members
        if "" in members:
            self.outside = []  # the model is itself a block
        for name in blocks or ():  # one inside another's subtree (only a caller's own ``blocks`` can say so)
            if name not in members and name in self.by_path:
                members[name] = submodules(self.by_path[name])

    def _walk(self, model: nn.Module, blocks: dict[str, nn.Module] | None, converter_of) -> None:
        """The walk itself (csrc/walk.cpp does the same, where the extension is built)."""
        paths, by_path, members = self.paths, self.by_path, self.members
        prefix, current, seen = None, None, set()  # the block being walked: its insides' prefix, modules, their ids
        stack = [("", model)]
        while stack:
            path, m = stack.pop()
            by_path[path] = m
            if m._modules:
                below = f"{path}." if path else ""
                children = [(below + name, child) for name, child in m._modules.items() if child is not None]
                children.reverse()
                stack += children
            inside = prefix is not None and (not prefix or path.startswith(prefix))
            if inside:
                if id(m) not in seen:
                    seen.add(id(m))
                    current.append(m)
            else:
                prefix = None
            known = paths.get(id(m))
            first = known is None  # else registered at an earlier path, and looked at there
            if first:
                paths[id(m)] = [path]
                self.modules.append((path, m))
                self._look_at(path, m)
            else:
                known.append(path)
            if inside:
                continue
            if converter_of is None:  # a caller's blocks, named by any of their paths
                starts = path in blocks and path not in members
            else:  # a found block starts at its module's first path
                converter = converter_of(m) if first else None
                starts = converter is not None
                if starts:
                    self.found.append((path, m, converter))
            if starts:
                prefix, current, seen = f"{path}." if path else "", [m], {id(m)}
                members[path] = current
            if first:
                self.outside.append((path, m))

    def _look_at(self, path: str, m: nn.Module) -> None:
        """One look at a module's attributes, and every tensor it holds (registered,
        or in an attribute), keyed by its path."""
        attributes = attribute_values(m)
        self.values.append(attributes)
        if m._forward_hooks or m._forward_pre_hooks:
            self.hooked.add(id(m))
        registered = []
        if m._parameters:  # most modules (containers, activations) register no tensor
            registered += [(path, t) for t in m._parameters.values() if t is not None]
        if m._buffers:
            registered += [(path, t) for t in m._buffers.values() if t is not None]
        self.registered += registered
        self.unspanned += registered
        if attributes:
            self.in_attributes += [(path, t) for t in _tensors_among(attributes)]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's own parameters and buffers, None entries left out."""
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _tensors_among(values: list[object]) -> list[torch.Tensor]:
    """The tensors among attribute values, and in the dicts, lists, tuples and
    sets among them and in the tensors' own attributes, however nested
    (``self.w = conv.weight``, ``self.cache = {"k": [t]}``, ``t.alias = w[0]``)."""
    tensors: list[torch.Tensor] = []
    stack, seen = list(values), set()
    while stack:
        value = stack.pop()
        if type(value) in PLAIN_TYPES:
            continue  # most of a configuration dict's entries
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            if value.__dict__ and id(value) not in seen:  # a tensor's own attributes (``t.alias = w[0]``)
                seen.add(id(value))
                stack.extend(value.__dict__.values())
        elif isinstance(value, (dict, list, tuple, set, frozenset)) and id(value) not in seen:
            seen.add(id(value))
            stack.extend(value.values() if isinstance(value, dict) else value)
    return tensors


def _global_hooks_problem() -> str | None:
    """Why no fold is safe while global module hooks are registered, or None.

    torch.nn.modules.module.register_module_forward_hook and its pre-hook
    twin run on every module call: they see, and may replace, each layer's
    output, which a fold changes."""
    module = nn.modules.module
    hooks = [getattr(module, name, {}) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")]
    if any(hooks):
        return ("global module hooks are registered (torch.nn.modules.module.register_module_forward_hook or "
                "_pre_hook): they see and may change every layer's output, which a fold changes")
    return None
