"""How a model's forward connects its layers and BatchNorms.

Three extractors produce the same :class:`Dataflow`:

* :func:`fusedconv.dataflow.source.from_source` reads each module's forward
  code (no trace, no run; proves the common cases and leaves the rest unseen);
* :func:`fusedconv.dataflow.fx.from_fx` reads the graph torch.fx records
  without running the model (all code paths, no shapes);
* :func:`fusedconv.dataflow.run.from_run` follows one real run on example inputs
  (any Python control flow, with shapes).

The planner only reads a :class:`Dataflow`, so both paths share one set of rules.
Only *tracked* modules (layers and BatchNorms) get a :class:`Node`; anything else
that reads a tracked module's output is recorded as ``None`` ("something else").
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Node:
    """How the forward uses one tracked module.

    ``input_from`` and ``consumers`` describe the first call; they only matter
    for modules called exactly once, the only ones that are ever folded.
    """

    name: str
    calls: int = 0
    input_from: str | None = None
    """The tracked module whose output is this module's input, if any."""
    consumers: list[str | None] = field(default_factory=list)
    """Every reader of this module's output: a tracked module that takes it as its
    input, or None for anything else (an op, an untracked module, the model output)."""
    input_rank: int | None = None
    """Rank of the input tensor (None when unknown, i.e. from torch.fx)."""
    tensors_read_elsewhere: bool = False
    """Its parameters or buffers are read outside its own call."""


@dataclass
class Dataflow:
    nodes: dict[str, Node]
    source: str
    """"source", "torch.fx", "run" or "none" (nothing to trace)."""
    unseen: dict[str, str] = field(default_factory=dict)
    """Tracked modules whose uses could not be seen, with the reason (inside a
    submodule torch.fx could not trace, or inside an opaque leaf module)."""
