"""Walking a module tree without torch's recursive generators.

``nn.Module.modules()`` and ``named_modules()`` nest one generator per level of
the tree and keep a memo set; a fold walks the model once and each block a few
times, and on a model of a few hundred small modules those generators cost more
than the work done at each module. These walks visit the same modules in the
same order (depth first, parents before children, registration order).
"""

from __future__ import annotations

from torch import nn


def every_path(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules(remove_duplicate=False))``: every path of every module."""
    found: list[tuple[str, nn.Module]] = []
    stack = [("", model)]
    while stack:
        path, module = stack.pop()
        found.append((path, module))
        if module._modules:
            prefix = f"{path}." if path else ""
            children = [(prefix + name, child) for name, child in module._modules.items() if child is not None]
            children.reverse()
            stack += children
    return found


def submodules(root: nn.Module) -> list[nn.Module]:
    """``list(root.modules())``: ``root`` and every module below it, each once."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue  # registered at a second path: its subtree was walked at the first
        seen.add(id(module))
        found.append(module)
        if module._modules:
            children = [child for child in module._modules.values() if child is not None]
            children.reverse()
            stack += children
    return found
