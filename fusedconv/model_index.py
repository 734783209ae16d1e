"""One walk over a model: its modules' paths, which are layers and which are
BatchNorms, and the facts about them that every later step asks for (shared
memory, modules reachable from outside the tree, global hooks)."""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import nn

from .dataflow.references import PLAIN_TYPES, attribute_values, modules_held_elsewhere
from .distributed import any_sharded
from .layers import BatchNormKind, batchnorm_kind, is_batchnorm_like, layer_kind
from .memory import sharing_memory, storage_key
from .registry import blocks_among, entangled_blocks
from .walking import every_path, submodules


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
        self.paths: dict[int, list[str]] = {}
        self.by_path: dict[str, nn.Module] = {}  # every path, duplicates included
        modules: list[tuple[str, nn.Module]] = []  # first path of each module, as named_modules() gives
        for path, m in every_path(model):
            self.by_path[path] = m
            known = self.paths.get(id(m))
            if known is None:
                self.paths[id(m)] = [path]
                modules.append((path, m))
            else:
                known.append(path)
        self.modules = modules
        # Whether the model is sharded (DTensors, FSDP2): every fold asks, once
        # (``sharded``: the caller has just found out).
        self.sharded = any_sharded(m for _, m in modules) if sharded is None else sharded
        # One look at each module's attributes, and every tensor it holds
        # (registered, or in an attribute), keyed by its path.
        values: dict[int, list[object]] = {}
        held: list[tuple[str, torch.Tensor]] = []
        for name, m in modules:
            values[id(m)] = attributes = attribute_values(m)
            if m._parameters:  # most modules (containers, activations) register no tensor
                held += [(name, t) for t in m._parameters.values() if t is not None]
            if m._buffers:
                held += [(name, t) for t in m._buffers.values() if t is not None]
            if attributes:
                held += [(name, t) for t in _tensors_among(attributes)]
        # Modules holding a tensor that shares memory with another tensor of the
        # model (tied weights, ``.data`` assigned across modules, views), over
        # every module (those inside blocks too).
        holders = sharing_memory(held)
        # id(module) -> the paths of the modules whose attributes, hooks or class reach it
        self.holders: dict[int, list[str]] = {}
        holder_paths = self.holders
        # the modules held themselves, not only reached through one above them
        self.held_directly: set[int] = set()
        self.held_elsewhere = modules_held_elsewhere(modules, values_of=lambda m: values[id(m)],
                                                     holders=holder_paths, directly=self.held_directly)
        self.entangled: dict[str, str] = {}  # blocks a merge would change outside themselves -> why
        if blocks is None:  # every known block, but the entangled ones
            found = blocks_among(modules)
            self.members = _block_members(self.by_path, [name for name, _, _ in found])
            self.entangled = entangled_blocks(found, self.paths, {id(self.by_path[name]) for name in holders},
                                              None if self.held_elsewhere is None else holder_paths, self.members)
            blocks = {name: block for name, block, _ in found if name not in self.entangled}
        else:
            self.members = _block_members(self.by_path, list(blocks))
        self.blocks = blocks
        self.layers: dict[str, nn.Module] = {}
        self.batchnorms: dict[str, nn.Module] = {}
        self.kinds: dict[str, BatchNormKind | None] = {}  # each BN's, looked up once for the rules' many asks
        # The path prefixes of the blocks' insides, in the order of ``blocks``
        # ("" for a model that is itself a block).
        self.block_prefixes = tuple(f"{name}." if name else "" for name in blocks)
        # The modules (first path, module) outside every block: the blocks' own
        # modules are merged with them.
        self.outside = _outside_blocks(modules, blocks)
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


def _block_members(by_path: dict[str, nn.Module], names: list[str]) -> dict[str, list[nn.Module]]:
    """Block path -> ``walking.submodules`` of the block there, cut from the walk
    the index made: ``by_path`` lists every path depth first, so the paths of a
    block's subtree follow the block's own path."""
    members: dict[str, list[nn.Module]] = {}
    if not names:
        return members
    wanted = set(names)
    prefix, current, seen = None, None, set()
    for path, module in by_path.items():
        if prefix is not None and (path.startswith(prefix) or not prefix):
            if id(module) not in seen:
                seen.add(id(module))
                current.append(module)
            continue
        prefix = None
        if path in wanted and path not in members:
            prefix, current, seen = f"{path}." if path else "", [module], {id(module)}
            members[path] = current
    for name in names:  # one inside another's subtree (only a caller's own ``blocks`` can say so)
        if name not in members and name in by_path:
            members[name] = submodules(by_path[name])
    return members


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
