"""How a model's forward connects its layers and BatchNorms.

Three extractors produce the same :class:`Dataflow`:

* :func:`fusedconv.dataflow.source.from_source` reads each module's forward
  code (no trace, no run; proves the common cases and leaves the rest unseen);
* :func:`fusedconv.dataflow.fx.from_fx` reads the graph torch.fx records
  without running the model (all code paths, no shapes);
* :func:`fusedconv.dataflow.run.from_run` follows one real run on example inputs
  (any Python control flow, with shapes).

The rules (:mod:`fusedconv.rules`) only read a :class:`Dataflow`, so every
path shares one set of rules; :func:`fusedconv.dataflow.find.find_dataflow`
chooses the extractors and returns the one dataflow they give.
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
    input_tight: bool = False
    """No other code runs between ``input_from``'s call returning and this call:
    nothing can change the input in place in between."""
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
    functional_batchnorms: list[str] = field(default_factory=list)
    """Batch norms computed by a function call rather than a module (where the
    extractor can see them): fusedconv does not fold those, and says so."""
    note: str | None = None
    """Why this dataflow may prove less than a fuller one would (e.g. torch.fx
    could not trace the model): added to the reason of every BN left."""


def combine(read: Dataflow, traced: Dataflow) -> Dataflow:
    """The code reading's dataflow completed by a trace's.

    Each module takes the facts of the trace where the trace saw it, and the
    code reading's where only the reading did (then the source is called
    "source+torch.fx"; otherwise it is the trace's) (a sub-block torch.fx could not
    trace, whose pairs the reading proved). Every fact of either is true of the
    model, so a fold that both ends' facts allow is safe. A parameter read
    elsewhere by either account counts as read elsewhere.
    """
    nodes: dict[str, Node] = {}
    unseen: dict[str, str] = {}
    from_reading = False
    for name, node in traced.nodes.items():
        if name in traced.unseen and name not in read.unseen:
            chosen = read.nodes[name]
            from_reading = True
        else:
            chosen = node
            if name in traced.unseen:
                unseen[name] = traced.unseen[name]
        other = read.nodes.get(name)
        if other is not None and other.tensors_read_elsewhere and not chosen.tensors_read_elsewhere:
            chosen = Node(**{**vars(chosen), "tensors_read_elsewhere": True})
        nodes[name] = chosen
    functional = max(read.functional_batchnorms, traced.functional_batchnorms, key=len)
    source = f"{read.source}+{traced.source}" if from_reading else traced.source
    return Dataflow(nodes, source, unseen, functional)
