"""Planning a fusion from the dataflow, checking it, and applying it all at once.

Rules (docs/DESIGN.md sections 2-3). A layer takes BatchNorms only if it is called
exactly once, reads its own weight unmodified (standard forward, no hooks or
parametrizations), and shares no tensor with another module. A BN *after* the
layer folds when the layer's output is read by that BN and nothing else; a BN
*before* it folds when the BN's output is read by that layer and nothing else
and the fold is exact there (no zero padding, not a ConvTranspose, (N, C) input
for a Linear). BNs after a layer are matched first, since that fold is always
exact; chains of BNs fold together.

Applying a plan computes every new tensor first and only then touches the
model, so an error leaves the caller's model as it was.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from . import kernels
from .affine import batchnorm_affines, compose
from .copying import copy_module
from .memory import sharing_memory, storage_key
from .writing import Rollback, check_folded_range, check_writable, subnormal_weights
from .dataflow import Dataflow, Node, combine
from .dataflow.fx import Untraceable, from_fx
from .dataflow.references import modules_held_elsewhere
from .dataflow.source import from_source, functional_batchnorm_calls
from .dataflow.guard import UnchangedState
from .dataflow.run import RunFailed, from_run
from .errors import FoldError, FoldWarning
from .fold import plan_layer_folds, rescale_weights, set_biases, why_not_exact_before
from .registry import blocks_among, plan_blocks
from .reparam import apply_reparameterizations
from .layers import (
    MODULE_STATE,
    BatchNormKind,
    batched_rank,
    batchnorm_kind,
    bn_statistics,
    check_not_training,
    is_batchnorm_like,
    layer_in_channels,
    layer_kind,
    layer_out_channels,
    num_features,
    why_batchnorm_cannot_fold,
    why_layer_cannot_change,
    why_not_standard,
)


@dataclass(frozen=True)
class Fold:
    """One layer and the BatchNorms folded into it (qualified module names, in forward order)."""

    layer: str
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    @property
    def batchnorms(self) -> tuple[str, ...]:
        return self.before + self.after


@dataclass(frozen=True)
class Skip:
    """A BatchNorm-like module the plan leaves in place, and why."""

    module: str
    reason: str


@dataclass
class FusionPlan:
    """What :func:`fusedconv.fuse` will fold, and what it leaves and why."""

    folds: list[Fold]
    skipped: list[Skip]
    source: str
    """Where the dataflow came from: "source" (the forward code, read without
    running it), "torch.fx" (a trace), "source+torch.fx" (the reading, completed
    by a trace where it could not vouch for every BN), "run" (one run on the
    example inputs), or "none" (no BatchNorm outside the merged blocks, so none
    was needed)."""
    merges: list[str] = field(default_factory=list)
    """Re-parameterizable blocks merged into one conv each (qualified names)."""

    @property
    def num_folded(self) -> int:
        return sum(len(f.batchnorms) for f in self.folds)

    def __str__(self) -> str:
        source = {"source": "the forward code", "torch.fx": "a torch.fx graph", "none": "the blocks alone",
                  "source+torch.fx": "the forward code and a torch.fx graph"}.get(
            self.source, "a run on the example inputs")
        lines = [
            f"fusion plan from {source}: {len(self.merges)} blocks merge into one conv each, "
            f"{self.num_folded} BatchNorms fold into {len(self.folds)} layers, {len(self.skipped)} left"
        ]
        lines.extend(f"  merge {name}" for name in self.merges)
        for f in self.folds:
            chain = [*f.before, f"[{f.layer}]", *f.after]
            lines.append("  fold  " + " -> ".join(chain))
        for s in self.skipped:
            lines.append(f"  left  {s.module}: {s.reason}")
        return "\n".join(lines)


class _ModelIndex:
    """Names, paths and tensor ownership of the modules fusedconv tracks.

    Modules inside ``blocks`` (re-parameterizable blocks, merged by their
    converters; by default every known block of the model) are not tracked:
    the blocks are opaque to the dataflow.
    """

    def __init__(self, model: nn.Module, blocks: dict[str, nn.Module] | None = None):
        self.model = model
        self.paths: dict[int, list[str]] = {}
        modules: list[tuple[str, nn.Module]] = []  # first path of each module, as named_modules() gives
        for path, m in model.named_modules(remove_duplicate=False):
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
        self.kinds: dict[str, BatchNormKind | None] = {}  # each BN's, looked up once for the planner's many asks
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
        self.held_elsewhere = modules_held_elsewhere(model, self.paths)
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
            if key in MODULE_STATE:
                continue
            values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
            tensors.extend(v for v in values if isinstance(v, torch.Tensor))
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


def _expected_bn_ranks(bn: nn.Module) -> set[int] | None:
    """Input ranks a BN class accepts (None: any rank from 2, e.g. SyncBatchNorm)."""
    if isinstance(bn, nn.BatchNorm1d):
        return {2, 3}
    if isinstance(bn, nn.BatchNorm2d) or type(bn).__name__.endswith("2d"):  # FrozenBatchNorm2d too
        return {4}
    if isinstance(bn, nn.BatchNorm3d):
        return {5}
    return None


class _Planner:
    def __init__(self, index: _ModelIndex, flow: Dataflow):
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
            self._layer_problems[name] = self._usage_problem(name) or why_layer_cannot_change(self.index.layers[name])
        return self._layer_problems[name]

    def _held_elsewhere(self, bn: nn.Module) -> str | None:
        """A folded BN is replaced in the module tree only: a reference kept
        elsewhere would go on calling it."""
        if self.index.held_elsewhere is None:
            return "something in the model holds an object whose references fusedconv cannot follow"
        if id(bn) in self.index.held_elsewhere:
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
            if not self.index.kinds[bn_name].passes_through:
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
            and self.index.kinds[source].passes_through
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
        skipped = [Skip(n, self.explain(n)) for n in self.index.batchnorms if n not in self.used]
        skipped.extend(Skip(call, "a batch norm computed by a function call, not a module: fusedconv folds "
                                  "BatchNorm modules only") for call in self.flow.functional_batchnorms)
        ordered = [folds[n] for n in self.index.layers if n in folds]
        return FusionPlan(ordered, skipped, self.flow.source)


def _warn_about(plan: FusionPlan, flow: Dataflow) -> None:
    no_stats = [s.module for s in plan.skipped if s.reason.startswith("track_running_stats=False")]
    if no_stats:
        warnings.warn(
            f"fusedconv: {len(no_stats)} BatchNorm(s) without running statistics left unfolded: "
            + ", ".join(no_stats[:5]),
            FoldWarning,
            stacklevel=3,
        )
    boxes = sorted({reason for name, reason in flow.unseen.items() if "cannot trace" in reason})
    for reason in boxes:
        warnings.warn(f"fusedconv: modules {reason}", FoldWarning, stacklevel=3)


def _dataflow(model: nn.Module, index: _ModelIndex, example_inputs: tuple | None) -> Dataflow:
    if example_inputs is None:
        try:
            with UnchangedState(model, "tracing with torch.fx"):  # tracing runs the forward's Python code
                return from_fx(model, index.tracked, {id(block) for block in index.blocks.values()})
        except Untraceable as exc:
            raise FoldError(
                f"torch.fx cannot trace {type(model).__name__}.forward ({exc}); pass example_inputs=... so "
                "that fusedconv can follow a real run instead"
            ) from exc
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


def make_plan(model: nn.Module, example_inputs: tuple | None = None, *, check_stats: bool = True) -> FusionPlan:
    """Find what can be folded in ``model`` (not modified) and, unless
    ``check_stats`` is False (the caller applies the plan at once, which checks
    them again), check the statistics of every BN it folds."""
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
    index = _ModelIndex(model)
    for name, bn in index.batchnorms.items():
        check_not_training(bn, name)
    plan, flow = None, None
    if not index.batchnorms:  # every BN sits in a block that its converter merges: no dataflow needed
        inside = tuple(f"{name}." if name else "" for name in index.blocks)
        outside = [(path, m) for path, m in index.modules if not (inside and path.startswith(inside))]
        flow = Dataflow({name: Node(name) for name in index.tracked.values()}, "none",
                        functional_batchnorms=functional_batchnorm_calls(outside))
        plan = _Planner(index, flow).plan()
    elif example_inputs is None:
        # Reading the forward code is cheap; a trace is needed only where it
        # cannot vouch for every BatchNorm, and then the two are combined.
        flow = from_source(model, index.tracked, index.paths, index.held_elsewhere)
        plan = _Planner(index, flow).plan()
        if plan.skipped and not index.global_hooks:
            try:
                traced = _dataflow(model, index, None)
            except FoldError as untraceable:
                if not plan.folds:
                    raise
                # Keep what the code proved; the rest might fold with a run.
                note = (f"; {untraceable.args[0].split(' (')[0]}, so pass example_inputs to fold what the code "
                        "reading could not prove")
                plan.skipped = [Skip(s.module, s.reason + note) for s in plan.skipped]
            else:
                flow = combine(flow, traced)
                plan = _Planner(index, flow).plan()
    else:
        flow = _dataflow(model, index, example_inputs)
        plan = _Planner(index, flow).plan()
    plan.merges = list(index.blocks)
    if check_stats:
        _checked_affines(index.batchnorms, plan.folds)
        plan_blocks(model)
    _warn_about(plan, flow)
    return plan


def _first_weight_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _modules_by_path(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` at each path where it is registered: one walk,
    where get_submodule would take several attribute lookups for each name."""
    return dict(model.named_modules(remove_duplicate=False))


def _module(modules: dict[str, nn.Module], name: str) -> nn.Module:
    if name not in modules:
        raise FoldError(f"the plan names {name!r}, which this model does not have")
    return modules[name]


def _checked_affines(modules: dict[str, nn.Module], folds: list[Fold]) -> list[tuple]:
    """The composed (before, after) affine maps of each fold, after checking every
    BN (found by name in ``modules``); all BNs' statistics are read and checked together."""
    stats = []
    for fold in folds:
        for bn_name in fold.batchnorms:
            bn = _module(modules, bn_name)
            check_not_training(bn, bn_name)
            problem = why_batchnorm_cannot_fold(bn)
            if problem:
                raise FoldError(f"{bn_name}: {problem}")
            stats.append(bn_statistics(bn, bn_name))
    affines = iter(batchnorm_affines(stats))
    return [
        (compose([next(affines) for _ in fold.before]), compose([next(affines) for _ in fold.after]))
        for fold in folds
    ]


def apply_plan(model: nn.Module, plan: FusionPlan, *, inplace: bool, backend: str | None = None,
               flush_subnormals: bool = False) -> nn.Module:
    """Fold ``plan`` into ``model`` (or into a copy), all or nothing.

    Three steps. *Prepare*: check every BN, block merge and tensor to be
    written, and compute every new bias and scale; nothing is modified, and
    any error leaves the caller's model as it was. *Materialize*: for a copy,
    copy the model with the weights to fold left unwritten. *Write*: swap the
    BNs out, store the biases and scale the weights with one batched
    :func:`fusedconv.kernels.rescale_` call (``backend`` picks the backend; by
    default the fastest for the device), then merge the blocks; should a write
    still fail, what was written before it is undone.
    """
    # -- prepare ------------------------------------------------------------
    modules = _modules_by_path(model) if plan.folds or plan.merges else {}
    layers = [_module(modules, fold.layer) for fold in plan.folds]
    names = [fold.layer for fold in plan.folds]
    check_writable(((f"{name}.weight", layer.weight) for name, layer in zip(names, layers)), in_place=inplace)
    check_writable(((f"{name}.bias", layer.bias) for name, layer in zip(names, layers)), in_place=inplace)
    layer_folds = plan_layer_folds(layers, _checked_affines(modules, plan.folds), names)
    check_folded_range([layer.weight for layer in layers], layer_folds, names)
    kernels.resolve(_first_weight_device(model), backend)  # a backend asked for by name must load
    paths: dict[int, list[str]] = defaultdict(list)
    for path, m in modules.items():
        if path:
            paths[id(m)].append(path)
    bn_paths = {name: paths[id(_module(modules, name))] for f in plan.folds for name in f.batchnorms}

    # -- materialize ----------------------------------------------------------
    sources = None
    if inplace:
        target = model
    else:
        # Seed the copy's memo with what it would otherwise copy only to
        # overwrite: the BNs' replacements, and an unwritten Parameter (as
        # Parameter.__deepcopy__ would make it) for each weight to be folded,
        # which the kernels then write from the original in one pass.
        memo: dict[int, object] = {}
        for name in bn_paths:
            bn = _module(modules, name)
            if batchnorm_kind(bn).passes_through:
                memo[id(bn)] = batchnorm_kind(bn).replacement(bn).train(bn.training)
        sources = [layer.weight for layer in layers]
        for weight in sources:
            if type(weight) is nn.Parameter:
                memo[id(weight)] = nn.Parameter(torch.empty_like(weight), weight.requires_grad)
        try:
            target = copy_module(model, memo)
        except Exception as exc:  # e.g. pruning or legacy weight_norm keep non-leaf weight tensors
            raise FoldError(
                f"cannot copy {type(model).__name__} (deep-copying it failed: {exc}); fold it in place with "
                "inplace=True, or make it copyable first (e.g. torch.nn.utils.prune.remove)"
            ) from exc
    # Blocks are planned on the model that will change (nothing is modified yet).
    target_modules = _modules_by_path(target) if target is not model and modules else modules
    merges = plan_blocks(target, plan.merges, modules=target_modules) if plan.merges else []
    check_writable(((f"{merge.name}: {part}", getattr(merge.target, part)) for merge in merges
                    for part in ("weight", "bias")), in_place=True)
    targets = [_module(target_modules, name) for name in names]
    weights = [layer.weight for layer in targets]

    # -- write ----------------------------------------------------------------
    with Rollback() as rollback:
        for name, bn_paths_of_one in bn_paths.items():
            bn = _module(target_modules, name)
            if isinstance(bn, nn.Identity):  # already replaced through the copy's memo
                continue
            replacement = batchnorm_kind(bn).replacement(bn).train(bn.training)
            for path in bn_paths_of_one:
                parent, _, attr = path.rpartition(".")
                rollback.setattr(target_modules[parent], attr, replacement)
        set_biases(targets, [layer_fold.bias for layer_fold in layer_folds], rollback)
        # A copied weight that the memo did not leave unwritten (a Parameter
        # subclass, cloned as usual) holds its source's values: writing it from
        # the source gives the same bits.
        rescale_weights(weights, layer_folds, backend, sources)
    apply_reparameterizations(merges, backend)
    subnormal_weights(weights, layer_folds, names, flush=flush_subnormals)
    return target
