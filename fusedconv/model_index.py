"""One walk over a model: its modules' paths, which are layers and which are
BatchNorms, and the facts about them that every later step asks for (shared
memory, modules reachable from outside the tree, global hooks)."""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import nn

from .dataflow.references import modules_held_elsewhere
from .layers import MODULE_STATE, BatchNormKind, batchnorm_kind, is_batchnorm_like, layer_kind
from .memory import sharing_memory, storage_key
from .registry import blocks_among


class ModelIndex:
    """Names, paths and tensor ownership of the modules fusedconv tracks, from
    one walk of the module tree that planning and applying share.

    Modules inside ``blocks`` (re-parameterizable blocks, merged by their
    converters; by default every known block of the model) are not tracked:
    the blocks are opaque to the dataflow.
    """

    def __init__(self, model: nn.Module, blocks: dict[str, nn.Module] | None = None):
        self.model = model
        self.paths: dict[int, list[str]] = {}
        self.by_path: dict[str, nn.Module] = {}  # every path, duplicates included
        modules: list[tuple[str, nn.Module]] = []  # first path of each module, as named_modules() gives
        for path, m in model.named_modules(remove_duplicate=False):
            self.by_path[path] = m
            known = self.paths.get(id(m))
            if known is None:
                self.paths[id(m)] = [path]
                modules.append((path, m))
            else:
                known.append(path)
        self.modules = modules
        if blocks is None:
            blocks = {name: block for name, block, _ in blocks_among(modules)}
        self.blocks = blocks
        self.layers: dict[str, nn.Module] = {}
        self.batchnorms: dict[str, nn.Module] = {}
        self.kinds: dict[str, BatchNormKind | None] = {}  # each BN's, looked up once for the rules' many asks
        inside = tuple(f"{name}." if name else "" for name in blocks)
        for name, m in modules:
            if inside and name.startswith(inside):
                continue  # merged with its block
            if layer_kind(m) is not None:
                self.layers[name] = m
                continue
            if is_batchnorm_like(m):
                self.batchnorms[name] = m
                self.kinds[name] = batchnorm_kind(m)
        self.tracked = {id(m): name for name, m in (*self.layers.items(), *self.batchnorms.items())}
        self.global_hooks = _global_hooks_problem()
        self.held_elsewhere = modules_held_elsewhere(modules)
        # Modules holding a tensor that shares memory with another tensor of the
        # model (tied weights, ``.data`` assigned across modules, views), over
        # every module (those inside blocks too).
        holders = sharing_memory((name, t) for name, m in modules for t in _tensors(m, attributes=True))
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


def _tensors(module: nn.Module, attributes: bool = False) -> list[torch.Tensor]:
    """The module's own parameters and buffers, None entries left out; with
    ``attributes``, also tensors kept in plain attributes (``self.w = conv.weight``)."""
    tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    if attributes:
        for key, value in vars(module).items():
            if type(value) in _PLAIN or key in MODULE_STATE:  # most attributes: a layer's configuration
                continue
            values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
            tensors.extend(v for v in values if isinstance(v, torch.Tensor))
    return tensors


_PLAIN = frozenset({int, float, bool, str, type(None)})


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
