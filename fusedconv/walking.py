"""Walking a module tree without torch's recursive generators.

``nn.Module.modules()`` nests one generator per level of the tree and keeps a
memo set; a fold walks each block a few times, and on a model of a few hundred
small modules those generators cost more than the work done at each module.
This walk visits the same modules in the same order (depth first, parents
before children, registration order). The model itself is walked once, by
:class:`fusedconv.model_index.ModelIndex`.
"""

from __future__ import annotations

from torch import nn


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
