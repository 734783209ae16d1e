"""Choosing where a model's dataflow comes from, and getting it: one call,
one :class:`~fusedconv.dataflow.Dataflow`.

* With example inputs: one guarded run (:mod:`.run`, :mod:`.guard`).
* Without: the forward code first (:mod:`.source`); where the rules cannot
  fold every BatchNorm by it, a torch.fx trace (:mod:`.fx`), combined with
  the reading (:func:`~fusedconv.dataflow.combine`). When fx cannot trace the
  model, what the reading proved stands, with a note that says so.
* With no BatchNorm module outside the merged blocks, none at all: only the
  batch norms computed by function calls are looked for.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import FoldError
from . import Dataflow, Node, combine
from .fx import Untraceable, from_fx
from .guard import UnchangedState
from .run import RunFailed, from_run
from .source import from_source, functional_batchnorm_calls


def _traced(model: nn.Module, index) -> Dataflow:
    try:
        with UnchangedState(model, "tracing with torch.fx"):  # tracing runs the forward's Python code
            return from_fx(model, index.tracked, {id(block) for block in index.blocks.values()})
    except Untraceable as exc:
        raise FoldError(
            f"torch.fx cannot trace {type(model).__name__}.forward ({exc}); pass example_inputs=... so "
            "that fusedconv can follow a real run instead"
        ) from exc


def _run(model: nn.Module, index, example_inputs: tuple) -> Dataflow:
    try:
        with UnchangedState(model):
            return from_run(model, example_inputs, index.tracked, index.owners)
    except RunFailed as failure:
        exc = failure.__cause__
        where = index.paths.get(id(failure.module), [""])[0] if failure.module is not None else ""
        inside = f" in {where} ({type(failure.module).__name__})" if where else ""
        raise FoldError(
            f"running {type(model).__name__} on example_inputs failed{inside}: {type(exc).__name__}: {exc}"
        ) from exc


def find_dataflow(model: nn.Module, index, example_inputs: tuple | None,
                  settled: Callable[[Dataflow], bool], *, list_functional: bool = True) -> Dataflow:
    """The dataflow of ``model`` (its :class:`fusedconv.model_index.ModelIndex` is
    ``index``), from the cheapest source that can vouch for it (module docstring).
    ``settled(flow)`` says whether a dataflow leaves nothing a trace could add
    (the rules fold every BN by it). Without ``list_functional``, a model whose
    BNs all sit in blocks has no class's code looked at for batch norms
    computed by function calls (which only a report lists: no fold removes
    them). Raises :class:`fusedconv.FoldError` when a run fails, or when fx
    cannot trace a model whose code proves nothing."""
    if not index.batchnorms:  # every BN sits in a block that its converter merges
        return Dataflow({name: Node(name) for name in index.tracked.values()}, "none",
                        functional_batchnorms=functional_batchnorm_calls(index.outside) if list_functional else [])
    if example_inputs is not None:
        return _run(model, index, example_inputs)
    read = from_source(model, index.tracked, index.paths, index.held_elsewhere)
    if index.global_hooks or settled(read):
        return read  # a trace could not fold more
    try:
        traced = _traced(model, index)
    except FoldError as untraceable:
        if not any(node.input_from is not None for node in read.nodes.values()):
            raise  # the code proved nothing either
        # Keep what the code proved; the rest might fold with a run.
        read.note = (f"{untraceable.args[0].split(' (')[0]}, so pass example_inputs to fold what the code "
                     "reading could not prove")
        return read
    return combine(read, traced)
