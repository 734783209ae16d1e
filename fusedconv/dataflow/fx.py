"""Dataflow from torch.fx, without running the model.

Tracked modules (layers and BatchNorms) are fx leaves, so each shows up as one
``call_module`` node whose users are exactly the readers of its output. Where a
submodule cannot be traced (data-dependent control flow, shape checks...), it
becomes a black box and tracing is retried: the rest of the model still folds,
and the tracked modules inside the box are reported as unseen.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import Dataflow, Node


class Untraceable(Exception):
    """The model's own forward (not only a submodule) cannot be traced by torch.fx."""


class _Tracer(fx.Tracer):
    def __init__(self, tracked: dict[int, str], leaves: set[int], black_boxes: dict[str, str]):
        super().__init__()
        self.tracked = tracked
        self.leaves = leaves
        self.black_boxes = black_boxes
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            id(m) in self.tracked
            or id(m) in self.leaves
            or module_qualified_name in self.black_boxes
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m, forward, args, kwargs):
        # fx's own call_module also maintains scope metadata for every node, which
        # costs most of the tracing time and which we don't need.
        try:
            path = self.path_of_module(m)
        except NameError:  # a module created inside forward: trace through it
            return forward(*args, **kwargs)
        if self.is_leaf_module(m, path):
            return self.create_proxy("call_module", path, args, kwargs)
        try:
            return forward(*args, **kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module that failed
                self.failed_in = path
            raise


def _trace(model: nn.Module, tracked: dict[int, str], leaves: set[int]) -> tuple[fx.Graph, dict[str, str]]:
    black_boxes: dict[str, str] = {}
    while True:
        tracer = _Tracer(tracked, leaves, black_boxes)
        try:
            return tracer.trace(model), black_boxes
        except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
            if not tracer.failed_in or tracer.failed_in in black_boxes:
                raise Untraceable(reason) from exc
            black_boxes[tracer.failed_in] = reason


# Calls whose output has the rank of their first input: ranks flow through them.
_RANK_KEEPING_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.leaky_relu, F.elu, F.dropout,
}
_RANK_KEEPING_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "to"}
_RANK_KEEPING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
    nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout,
)


def _flatten_rank(args: tuple, kwargs: dict) -> int | None:
    start = args[0] if args else kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
    return start + 1 if isinstance(start, int) and start >= 0 and end == -1 else None


def _shape_rank(shape) -> int | None:
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    return len(shape) or None


def _ranks(graph: fx.Graph, module_at, tracked: dict[int, str]) -> dict[fx.Node, int]:
    """Ranks of the graph's values where the graph alone decides them.

    Without example inputs, a BatchNorm1d's channel axis depends on whether it
    sees (N, C) or (N, C, L); a flatten or view before a classifier head says
    which, so such heads still fold.
    """
    ranks: dict[fx.Node, int] = {}
    for n in graph.nodes:
        first = n.args[0] if n.args else None
        rank = None
        if n.op == "call_function" and n.target is torch.flatten or n.op == "call_method" and n.target == "flatten":
            rank = _flatten_rank(n.args[1:], n.kwargs)
        elif n.op == "call_method" and n.target in ("view", "reshape"):
            rank = _shape_rank(n.args[1:])
        elif n.op == "call_function" and n.target is torch.reshape and len(n.args) > 1:
            rank = _shape_rank(n.args[1:])
        elif n.op == "call_module":
            mod = module_at(n.target)
            if isinstance(mod, nn.Flatten):
                rank = _flatten_rank((mod.start_dim, mod.end_dim), {})
            elif id(mod) in tracked or isinstance(mod, _RANK_KEEPING_MODULES):
                rank = ranks.get(first)
        elif (n.op == "call_function" and n.target in _RANK_KEEPING_FUNCTIONS) or (
            n.op == "call_method" and n.target in _RANK_KEEPING_METHODS
        ):
            rank = ranks.get(first)
        if rank is not None:
            ranks[n] = rank
    return ranks


# Reads of a tensor's metadata, not of its values: ``B, C, H, W = x.shape`` between
# a conv and its BN does not stop the fold.
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "layout", "is_cuda", "requires_grad"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous",
                               "is_floating_point", "element_size", "get_device"})


def _reads_metadata_only(node: fx.Node) -> bool:
    """Whether ``node`` computes something from its input's metadata alone (or
    from such a node, as ``x.shape[0]`` does)."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function" and node.target in (operator.getitem, len):
        first = node.args[0] if node.args else None
        return isinstance(first, fx.Node) and _reads_metadata_only(first)
    return False


def _runs_code(node: fx.Node) -> bool:
    """Whether executing ``node`` can run code that changes a tensor in place."""
    return node.op in ("call_function", "call_method", "call_module") and not _reads_metadata_only(node)


def _is_functional_batchnorm(node: fx.Node) -> bool:
    if node.op == "call_function":
        name = getattr(node.target, "__name__", None) or str(node.target)
        return "batch_norm" in name
    return node.op == "call_method" and "batch_norm" in str(node.target)


def _reads_only_as_first_input(user: fx.Node, producer: fx.Node) -> bool:
    if user.op != "call_module" or not user.args or user.args[0] is not producer:
        return False
    rest: list[fx.Node] = []
    fx.node.map_arg((user.args[1:], user.kwargs), rest.append)
    return producer not in rest


def from_fx(model: nn.Module, tracked: dict[int, str], leaves: set[int] = frozenset()) -> Dataflow:
    """Dataflow of ``model`` as torch.fx sees it. ``tracked`` maps id(module) to
    its name; ``leaves`` (ids) are other modules not to trace into.

    Raises :class:`Untraceable` when the model's own forward cannot be traced,
    or is not what calling the model runs: a trace follows the class's
    ``forward``, not an instance's replacement of it or a ``__call__`` of the
    model's class (for the modules below the model, both are traced as called).
    """
    if "forward" in vars(model) or "_call_impl" in vars(model) or vars(model).get("_compiled_call_impl"):
        raise Untraceable("its call is replaced on the instance, and a trace follows the class's forward")
    if not isinstance(model, fx.GraphModule) and (type(model).__call__ is not nn.Module.__call__ or
                                                   type(model)._call_impl is not nn.Module._call_impl):
        # (a GraphModule's own __call__ runs its forward through nn.Module's)
        raise Untraceable(f"{type(model).__name__} overrides how it is called, which a trace of the model does "
                          "not run")
    graph, black_boxes = _trace(model, tracked, leaves)
    nodes = {name: Node(name) for name in tracked.values()}
    modules: dict[str, nn.Module] = {}
    tracked_of: dict[fx.Node, str] = {}
    opaque_calls: dict[str, nn.Module] = {}

    def module_at(path: str) -> nn.Module | None:
        if path not in modules:
            try:
                modules[path] = model.get_submodule(path)
            except AttributeError:
                modules[path] = None
        return modules[path]

    for n in graph.nodes:
        if n.op == "call_module":
            mod = module_at(n.target)
            name = tracked.get(id(mod))
            if name is None:
                opaque_calls[n.target] = mod
            else:
                nodes[name].calls += 1
                tracked_of[n] = name
        elif n.op == "get_attr":
            owner = module_at(n.target.rpartition(".")[0])
            name = tracked.get(id(owner))
            if name is not None:  # e.g. F.conv2d(x, self.conv.weight) outside the conv
                nodes[name].tensors_read_elsewhere = True

    ranks = _ranks(graph, module_at, tracked)
    order = list(graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    for n, name in tracked_of.items():
        node = nodes[name]
        if node.calls != 1:
            continue
        if n.args and isinstance(n.args[0], fx.Node):
            node.input_from = tracked_of.get(n.args[0])
            node.input_rank = ranks.get(n.args[0])
            node.input_tight = not any(_runs_code(between) for between in order[position[n.args[0]] + 1:position[n]])
        node.consumers = [
            tracked_of[user] if user in tracked_of and _reads_only_as_first_input(user, n) else None
            for user in n.users if not _reads_metadata_only(user)
        ]
    functional = [f"{n.name} ({getattr(n.target, '__name__', n.target)})" for n in order if _is_functional_batchnorm(n)]

    unseen: dict[str, str] = {}
    for path, box in opaque_calls.items():
        if box is None:
            continue
        if path in black_boxes:
            why = f"inside {path}, which torch.fx cannot trace ({black_boxes[path]}); pass example_inputs to fold it"
        else:
            why = f"inside {path} ({type(box).__name__}), whose forward fusedconv does not look into"
        for sub in box.modules():
            name = tracked.get(id(sub))
            if name is not None and sub is not box:
                unseen.setdefault(name, why)
    return Dataflow(nodes, "torch.fx", unseen, functional_batchnorms=functional)
