"""The rules: which BatchNorms fold into which layer, given a model's dataflow.

Rules (docs/DESIGN.md sections 2-3). A layer takes BatchNorms only if it is
called exactly once, is standard (torch's own forward and every method it
reaches), and shares no memory with another tensor of the model. A BN *after*
the layer folds when the layer's output is read by that BN and nothing else; a
BN *before* it folds when the BN's output is read by that layer and nothing
else, no code runs between the two calls, and the fold is exact there (no zero
padding, not a ConvTranspose, (N, C) input for a Linear). BNs after a layer
are matched first, since that fold is always exact; chains of BNs fold
together. A BN that something outside the module tree can reach is never
folded: the module tree is all a fold can change.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from .affine import BatchNormStats, batchnorm_affines, compose
from .dataflow import Dataflow
from .dataflow.find import find_dataflow
from .errors import FoldError, FoldWarning
from .fold import why_not_exact_before
from .fusion_plan import Fold, FusionPlan, Skip
from .layers import (
    batched_rank,
    bn_statistics,
    check_not_training,
    is_batchnorm_like,
    layer_in_channels,
    layer_out_channels,
    num_features,
    why_batchnorm_cannot_fold,
    why_layer_cannot_change,
    why_not_standard,
)
from .model_index import ModelIndex
from .registry import plan_blocks


def _expected_bn_ranks(bn: nn.Module) -> set[int] | None:
    """Input ranks a BN class accepts (None: any rank from 2, e.g. SyncBatchNorm)."""
    if isinstance(bn, nn.BatchNorm1d):
        return {2, 3}
    if isinstance(bn, nn.BatchNorm2d) or type(bn).__name__.endswith("2d"):  # FrozenBatchNorm2d too
        return {4}
    if isinstance(bn, nn.BatchNorm3d):
        return {5}
    return None


class Matcher:
    """The rules applied to one dataflow: which layer takes which BNs (module docstring)."""

    def __init__(self, index: ModelIndex, flow: Dataflow):
        self.index, self.flow = index, flow
        self.used: set[str] = set()
        self.reasons: dict[str, str] = {}  # why a BN next to a layer was not folded there
        # Each module's problem, or None: both matching passes and explain() ask again.
        self._layer_problems: dict[str, str | None] = {}
        self._bn_problems: dict[str, str | None] = {}

    # -- what may take part in a fold -----------------------------------------
    def _usage_problem(self, name: str) -> str | None:
        if self.index.global_hooks:
            return self.index.global_hooks
        if name in self.flow.unseen:
            return self.flow.unseen[name]
        node = self.flow.nodes[name]
        if node.calls == 0:
            return "never called by forward" + (" on the example inputs" if self.flow.source == "run" else "")
        if node.calls > 1:
            return f"called {node.calls} times: its weights serve every call, so a fold would change the others"
        if node.tensors_read_elsewhere or name in self.index.shared:
            return ("one of its parameters or buffers shares memory with, or is read by, another part of the model "
                    "(a fold writes it in place)")
        return None

    def layer_problem(self, name: str) -> str | None:
        if name not in self._layer_problems:
            # (a BN before the layer is refused by why_not_exact_before)
            self._layer_problems[name] = (self._usage_problem(name)
                                          or why_layer_cannot_change(self.index.layers[name], own_forward=True)
                                          or self._called_out_of_sight(name))
        return self._layer_problems[name]

    def _called_out_of_sight(self, name: str) -> str | None:
        """A layer that something outside the module tree holds may be called
        where neither the code reading (which refuses such a layer) nor a trace
        looks: a trace records ``self.gain.helper(x)``, through a parameter's
        attribute, as a method of the parameter. Only a run sees every call."""
        layer = self.index.layers[name]
        if self.flow.source == "run" or self.index.held_elsewhere is None:
            return None  # a run sees every call; with no walk to go by, every BN is refused (_held_elsewhere)
        if id(layer) not in self.index.held_elsewhere:
            return None
        own = self.index.paths[id(layer)]
        holder = next((path for path in self.index.holders.get(id(layer), ()) if path not in own), None)
        if holder is None:
            return None  # held by its own attributes only (a bound method of its own): its calls are its own
        return (f"it is also reachable through an attribute, hook or class of {holder or 'the model'}, where a call "
                "shows in neither the code nor a trace: pass example_inputs to fold it")

    def _held_elsewhere(self, bn: nn.Module) -> str | None:
        """A folded BN is replaced in the module tree only: a reference kept
        elsewhere would go on calling it. One reached only through a module
        above it (or the module a hook is called with) reaches the replacement,
        and a run sees every call made through it."""
        if self.index.held_elsewhere is None:
            return "something in the model holds an object whose references fusedconv cannot follow"
        if id(bn) in self.index.held_elsewhere and (id(bn) in self.index.held_directly or
                                                   self.flow.source != "run"):
            return (f"it is also reachable through {self.index.held_elsewhere[id(bn)][1]}, which would go on "
                    "calling it once the module tree no longer does")
        return None

    def bn_problem(self, name: str) -> str | None:
        if name not in self._bn_problems:
            bn = self.index.batchnorms[name]
            if self.index.kinds[name] is None:
                why = why_not_standard(bn)
                problem = (f"{type(bn).__name__} is not a standard BatchNorm: {why}" if why else
                           f"{type(bn).__name__} overrides forward, so fusedconv cannot tell what it computes")
            else:
                problem = why_batchnorm_cannot_fold(bn) or self._held_elsewhere(bn) or self._usage_problem(name)
            self._bn_problems[name] = problem
        return self._bn_problems[name]

    def _layout_problem(self, layer_name: str, bn_name: str) -> str | None:
        """Why the BN's channel axis may not be the layer's channel axis, or None.

        A BN normalises dim 1 of its input; the layer keeps its channels on dim 1
        of a batched input (the last dim for a Linear), so the two agree exactly
        when the tensor between them has the layer's batched rank.
        """
        layer, bn = self.index.layers[layer_name], self.index.batchnorms[bn_name]
        rank = batched_rank(layer)
        seen = self.flow.nodes[bn_name].input_rank
        if seen is None:
            if _expected_bn_ranks(bn) == {rank}:
                return None  # e.g. BatchNorm2d only takes the rank-4 output of a batched Conv2d
            return (
                f"without example_inputs the rank of its input is unknown, and {type(bn).__name__} accepts "
                f"several ranks while dim 1 is {layer_name}'s channel axis only at rank {rank}: pass "
                "example_inputs to fold it"
            )
        if seen != rank:
            return (
                f"it normalises dim 1 of a rank-{seen} tensor, but {layer_name} keeps its channels on "
                f"{'the last dim' if rank == 2 else 'dim 1'} (rank {rank})"
            )
        return None

    def _bn_follows(self, producer: str, bn_name: str) -> bool:
        consumers = self.flow.nodes[producer].consumers
        return consumers == [bn_name] and self.flow.nodes[bn_name].input_from == producer

    # -- matching --------------------------------------------------------------
    def after_chain(self, layer_name: str) -> tuple[str, ...]:
        chain: list[str] = []
        current = layer_name
        while True:
            consumers = self.flow.nodes[current].consumers
            if len(consumers) != 1 or consumers[0] not in self.index.batchnorms:
                break
            bn_name = consumers[0]
            if bn_name in self.used or not self._bn_follows(current, bn_name) or self.bn_problem(bn_name):
                break
            layout = self._layout_problem(layer_name, bn_name)
            if layout:
                self.reasons[bn_name] = layout
                break
            if num_features(self.index.batchnorms[bn_name]) != layer_out_channels(self.index.layers[layer_name]):
                raise FoldError(
                    f"{bn_name} has {num_features(self.index.batchnorms[bn_name])} channels but reads the output "
                    f"of {layer_name}, which has {layer_out_channels(self.index.layers[layer_name])}"
                )
            chain.append(bn_name)
            if not self.index.kinds[bn_name].passes(self.index.batchnorms[bn_name]):
                break  # its activation now stands between this BN and the next
            current = bn_name
        return tuple(chain)

    def before_chain(self, layer_name: str) -> tuple[str, ...]:
        chain: list[str] = []
        current = layer_name
        source = self.flow.nodes[layer_name].input_from
        while (
            source in self.index.batchnorms
            and source not in self.used
            and self.flow.nodes[source].consumers == [current]
            and not self.bn_problem(source)
            and self.index.kinds[source].passes(self.index.batchnorms[source])
        ):
            if not self.flow.nodes[current].input_tight:
                # Once folded, the BN passes its input on as it is: code running
                # between the two calls could change that input in place.
                self.reasons[source] = (
                    f"before {current}, but other code runs between the two calls (it could change the BN's "
                    "input in place, which the folded model would pass on)")
                break
            chain.insert(0, source)
            current, source = source, self.flow.nodes[source].input_from
        if not chain:
            return ()
        layer = self.index.layers[layer_name]
        problem = why_not_exact_before(layer) or self._layout_problem(layer_name, chain[-1])
        if problem:
            for bn_name in chain:
                self.reasons[bn_name] = f"before {layer_name}, but {problem}"
            return ()
        for bn_name in chain:  # each BN of the chain normalises the layer's input channels
            bn = self.index.batchnorms[bn_name]
            if num_features(bn) != layer_in_channels(layer):
                raise FoldError(
                    f"{bn_name} has {num_features(bn)} channels but feeds {layer_name}, which takes "
                    f"{layer_in_channels(layer)} input channels"
                )
        return tuple(chain)

    def explain(self, bn_name: str) -> str:
        problem = self.bn_problem(bn_name)
        if problem:
            return problem
        if bn_name in self.reasons:
            return self.reasons[bn_name]
        source = self.flow.nodes[bn_name].input_from
        if source in self.index.layers:
            layer_problem = self.layer_problem(source)
            if layer_problem:
                return f"the layer before it, {source}, cannot change: {layer_problem}"
            readers = len(self.flow.nodes[source].consumers)
            return f"the output of {source} is also read elsewhere ({readers} readers), so it must stay as it is"
        if source in self.index.batchnorms:
            return f"it follows {source}, which is not folded into a layer"
        return (
            "its input is not the output of a Conv/ConvTranspose/Linear (an activation, add, concat or "
            "other op stands between), and no layer that could absorb it reads its output alone"
        )

    def plan(self) -> FusionPlan:
        folds: dict[str, Fold] = {}
        for name in self.index.layers:
            if self.layer_problem(name):
                continue
            after = self.after_chain(name)
            if after:
                self.used.update(after)
                folds[name] = Fold(name, after=after)
        for name in self.index.layers:
            if self.layer_problem(name):
                continue
            before = self.before_chain(name)
            if before:
                self.used.update(before)
                folds[name] = Fold(name, before=before, after=folds[name].after if name in folds else ())
        note = f"; {self.flow.note}" if self.flow.note else ""
        skipped = [Skip(n, self.explain(n) + note) for n in self.index.batchnorms if n not in self.used]
        skipped.extend(Skip(call, "a batch norm computed by a function call, not a module: fusedconv folds "
                                  "BatchNorm modules only") for call in self.flow.functional_batchnorms)
        ordered = [folds[n] for n in self.index.layers if n in folds]
        return FusionPlan(ordered, skipped, self.flow.source)


def _warn_about(plan: FusionPlan, flow: Dataflow) -> None:
    no_stats = [s.module for s in plan.skipped if s.reason.startswith("track_running_stats=False")]
    if no_stats:
        warnings.warn(
            f"{len(no_stats)} BatchNorm(s) without running statistics left unfolded: "
            + ", ".join(no_stats[:5]),
            FoldWarning,
            stacklevel=3,
        )
    boxes = sorted({reason for name, reason in flow.unseen.items() if "cannot trace" in reason})
    for reason in boxes:
        warnings.warn(f"modules {reason}", FoldWarning, stacklevel=3)


def make_plan(model: nn.Module, example_inputs: tuple | None = None, *, check_stats: bool = True,
              index: ModelIndex | None = None, list_functional: bool = True) -> FusionPlan:
    """Find what can be folded in ``model`` (not modified) and, unless
    ``check_stats`` is False (the caller applies the plan at once, which checks
    them again), check the statistics of every BN it folds and every block
    merge. ``index``: the model's :class:`ModelIndex`, when the caller has it.
    ``list_functional=False``: where every BN module sits in a block, the plan
    leaves out the batch norms computed by function calls, which no fold
    removes and only a report lists (finding them reads every class's code).
    A sharded model (DTensor parameters, FSDP2) is planned from its code alone,
    without example inputs, and its statistics are checked when it is folded
    (by every rank at once: each holds part of them)."""
    check_foldable(model)
    index = index if index is not None else ModelIndex(model)
    sharded = index.sharded
    if sharded and example_inputs is not None:  # a run would gather, and swap, the parameters FSDP manages
        raise FoldError(
            "example_inputs are not taken for a sharded model (DTensor parameters or FSDP2): fold it without them "
            "(the plan comes from its code), or plan an unsharded copy with them and pass that plan: "
            "fuse(model, plan=fusedconv.plan(unsharded_copy, example_inputs), inplace=True)")
    for name, bn in index.batchnorms.items():
        check_not_training(bn, name)
    planned: dict[int, tuple[Dataflow, FusionPlan]] = {}  # the plan of the reading, if that is what stands

    def settled(read: Dataflow) -> bool:
        planned[id(read)] = (read, Matcher(index, read).plan())
        return not planned[id(read)][1].skipped

    flow = find_dataflow(model, index, example_inputs, settled, list_functional=list_functional)
    earlier = planned.get(id(flow))
    reuse = earlier is not None and earlier[0] is flow and flow.note is None  # a note changes the reasons
    plan = earlier[1] if reuse else Matcher(index, flow).plan()
    plan.merges = list(index.blocks)
    plan.skipped.extend(_kept_outside_merged_blocks(index))
    if check_stats and not _on_meta(model) and not sharded:  # no values here to check yet
        checked_affines(index.batchnorms, plan.folds)
        plan_blocks(model, plan.merges, modules=index.by_path, members=index.members)
    _warn_about(plan, flow)
    return plan


def _kept_outside_merged_blocks(index: ModelIndex) -> list[Skip]:
    """The BNs that a merged block holds and that stay in the model all the same,
    registered at a path outside every merged block too: the rules never see
    them (their first path is inside a block, opaque to the dataflow), the merge
    only reads them, and their other use goes on running them. Only a module
    registered at two paths or more can be one, and few are."""
    inside = index.block_prefixes
    kept = []
    for paths in index.paths.values():
        if len(paths) < 2:
            continue
        held = next((path for path in paths if path.startswith(inside)), None)
        outside = next((path for path in paths if not path.startswith(inside) and path not in index.blocks), None)
        if held is None or outside is None:
            continue
        module = index.by_path[outside]
        if id(module) in index.tracked or not is_batchnorm_like(module):
            continue
        block = next(name for prefix, name in zip(inside, index.blocks) if held.startswith(prefix))
        kept.append(Skip(outside, f"it is also registered inside the block {block}, whose merge only reads it: "
                                  "its use here is left as it is"))
    return kept


def _on_meta(model: nn.Module) -> bool:
    """Whether the model holds no values yet (built under ``torch.device("meta")``)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def check_foldable(model: object) -> None:
    """Raise for what no plan can be made of: a non-module (TypeError), a model
    in training mode (:class:`FoldError`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedconv folds an nn.Module, got {type(model).__name__}")
    # A GraphModule's training flag says nothing (torch.export's .module() is
    # left in training mode and refuses .eval()); its graph says which batch
    # norms it computes, and those are counted as left.
    if model.training and not isinstance(model, torch.fx.GraphModule):
        raise FoldError(
            f"{type(model).__name__} is in training mode, where BatchNorm uses batch statistics: "
            "call model.eval() before folding"
        )


def module_at(modules: dict[str, nn.Module], name: str) -> nn.Module:
    """The module at path ``name`` of a path -> module map, or a FoldError naming it."""
    if name not in modules:
        raise FoldError(f"the plan names {name!r}, which this model does not have")
    return modules[name]


def checked_affines(modules: dict[str, nn.Module], folds: list[Fold],
                    read: Callable[[nn.Module, str], BatchNormStats] = bn_statistics) -> list[tuple]:
    """The composed (before, after) affine maps of each fold, after checking every
    BN (found by name in ``modules``); all BNs' statistics are read (by ``read``:
    a sharded model's are gathered whole first) and checked together."""
    stats = []
    for fold in folds:
        for bn_name in fold.batchnorms:
            bn = module_at(modules, bn_name)
            check_not_training(bn, bn_name)
            problem = why_batchnorm_cannot_fold(bn)
            if problem:
                raise FoldError(f"{bn_name}: {problem}")
            stats.append(read(bn, bn_name))
    affines = iter(batchnorm_affines(stats))
    return [
        (compose([next(affines) for _ in fold.before]), compose([next(affines) for _ in fold.after]))
        for fold in folds
    ]
