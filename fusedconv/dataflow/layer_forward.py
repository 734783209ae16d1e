"""Layers with a forward of their own that is provably a plain convolution.

timm's ``Conv2dSame``, efficientnet-pytorch's ``Conv2dStaticSamePadding`` and
similar "same padding" convs override ``forward``, yet what they compute is
``F.conv2d(g(x), self.weight, self.bias, ...)`` with ``g`` a padding of the
input that never sees the weight. A BatchNorm after such a layer folds into it
exactly as into a standard one: its output channels are the weight's rows, and
the forward passes the layer's own ``bias`` (a new one once a fold adds it).

:func:`why_forward_is_not_a_plain_conv` proves this from the code, without
running it, or says why it cannot. The proof asks that the forward (and the
plain Python functions it passes the weight or bias to, followed up to three
calls deep) returns the result of ``torch.nn.functional.conv{1,2,3}d`` or
``linear`` (matching the layer) called with the weight and bias unchanged;
that the weight is otherwise only measured (``.shape``, ``.size()``, ...) and
the bias otherwise only tested against None; that ``self`` is only read for
plain attributes or to call a child that is a standard torch module; and that
no global or closure variable the code reads can reach a module. A BatchNorm
*before* such a layer never folds: its forward may transform the input.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import why_not_standard
from .source import _ClassReading, _bound_names, _free_names_problem, _resolve

_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_LINEAR = {F.linear}
_METADATA = frozenset({"shape", "size", "dim", "ndim", "dtype", "device", "ndimension", "numel"})
_DEPTH = 3


class _NotPlain(Exception):
    """The code does something the proof does not follow."""


_PARSED: dict[types.CodeType, ast.FunctionDef] = {}


def _parsed(function: types.FunctionType) -> ast.FunctionDef:
    """The function's syntax tree, parsed once per code object. The proof itself
    runs again for every plan: what the names it resolves hold may have changed."""
    definition = _PARSED.get(function.__code__)
    if definition is not None:
        return definition
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError) as exc:
        raise _NotPlain(f"no source for {function.__qualname__} ({type(exc).__name__})") from None
    definition = tree.body[0]
    if not isinstance(definition, ast.FunctionDef):
        raise _NotPlain(f"{function.__qualname__} is not a plain function")
    if len(_PARSED) > 512:  # generated classes would otherwise pile up
        _PARSED.clear()
    _PARSED[function.__code__] = definition
    return definition


class _Proof:
    """Follows the weight and the bias through one function; see the module docstring."""

    def __init__(self, layer_dims: int | None):
        self.layer_dims = layer_dims  # spatial dims of a conv, None for a Linear
        self.children: set[str] = set()  # children of the layer that the forward calls
        self.attributes: set[str] = set()  # other attributes of the layer that it reads
        self.outside = _ClassReading()  # the globals and closure variables read, checked per plan

    def prove(self, function: types.FunctionType, weight: str, bias: str, self_name: str | None, depth: int) -> None:
        """``weight`` and ``bias`` are the expressions (``self.weight`` or a
        parameter name) that hold the layer's weight and bias in ``function``."""
        if depth > _DEPTH:
            raise _NotPlain("the weight is passed through too many functions")
        definition = _parsed(function)
        bound = _bound_names(definition)
        for node in ast.walk(definition):  # the names the code reads from outside, checked per plan
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound:
                self.outside.free_names.append((function, node.id, ()))
        returned = self._returned_call(definition)
        parents = {child: node for node in ast.walk(definition) for child in ast.iter_child_nodes(node)}
        last = definition.body[-1]
        for node in _own_scope(definition):
            if isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await)) or (isinstance(node, ast.Return) and node is not last):
                raise _NotPlain("the forward may return or yield something else before its last line")
        handled: set[int] = set()
        proven_return = False
        for call in (n for n in ast.walk(definition) if isinstance(n, ast.Call)):
            passes = [a for a in (*call.args, *(k.value for k in call.keywords)) if _spelled(a) in (weight, bias)]
            if not passes:
                continue
            target = _resolve(call.func, function, bound)
            if target in _CONVOLUTIONS or target in _LINEAR:
                self._check_layer_call(call, target, weight, bias, returned)
            elif isinstance(target, types.FunctionType):
                if call is not returned:
                    raise _NotPlain(f"the result of {target.__qualname__} is not what the forward returns")
                self._follow(call, target, weight, bias, depth)
            else:
                raise _NotPlain(f"the weight or bias is passed to {ast.unparse(call.func)}")
            proven_return = proven_return or call is returned
            handled.update(id(a) for a in passes)
        if not proven_return:
            raise _NotPlain("what the forward returns is not the conv of the layer's weight and bias")
        for node in ast.walk(definition):
            spelled = _spelled(node)
            if spelled not in (weight, bias) or id(node) in handled:
                continue
            parent = parents.get(node)
            if spelled == weight and _measures(node, parent):
                continue
            if spelled == bias and isinstance(parent, ast.Compare) and all(
                    isinstance(c, ast.Constant) and c.value is None for c in parent.comparators):
                continue
            raise _NotPlain(f"{spelled} is used in another way than a plain {'linear' if self.layer_dims is None else 'conv'}")
        if self_name is not None:
            self._check_self(definition, self_name, weight, bias, parents)

    def _returned_call(self, definition: ast.FunctionDef) -> ast.Call:
        """The call whose result the function returns, unchanged: ``return f(...)``
        or ``v = f(...)`` then ``return v`` as the last two statements."""
        body = [s for s in definition.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        if not body or not isinstance(body[-1], ast.Return):
            raise _NotPlain("the forward does not end by returning a value")
        value = body[-1].value
        if isinstance(value, ast.Call):
            return value
        if isinstance(value, ast.Name) and len(body) > 1 and isinstance(body[-2], ast.Assign) \
                and [_spelled(t) for t in body[-2].targets] == [value.id] and isinstance(body[-2].value, ast.Call):
            return body[-2].value
        raise _NotPlain("the forward does not return the result of one call")

    def _check_layer_call(self, call: ast.Call, target, weight: str, bias: str, returned: ast.Call) -> None:
        if call is not returned:
            raise _NotPlain("the convolution's result is not what the forward returns")
        dims = _CONVOLUTIONS.get(target)
        if dims != self.layer_dims:
            raise _NotPlain(f"it calls {getattr(target, '__name__', target)}, not the layer's own operation")
        arguments = {**dict(zip(("input", "weight", "bias"), call.args)), **{k.arg: k.value for k in call.keywords}}
        if _spelled(arguments.get("weight")) != weight or _spelled(arguments.get("bias")) != bias:
            raise _NotPlain("the layer's weight and bias are not passed as the weight and bias")
        rest = [*call.args[3:], *(k.value for k in call.keywords if k.arg not in ("input", "weight", "bias"))]
        rest.append(arguments.get("input"))
        if any(_spelled(n) in (weight, bias) for part in rest if part is not None for n in ast.walk(part)):
            raise _NotPlain("the weight or bias also enters another argument")

    def _follow(self, call: ast.Call, target: types.FunctionType, weight: str, bias: str, depth: int) -> None:
        """Into a plain Python function the weight or bias is passed to."""
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            raise _NotPlain("the weight or bias is passed with * or **")
        names = inspect.signature(target).parameters
        bound = dict(zip(names, call.args)) | {k.arg: k.value for k in call.keywords}
        inner_weight = next((n for n, a in bound.items() if _spelled(a) == weight), None)
        inner_bias = next((n for n, a in bound.items() if _spelled(a) == bias), None)
        if inner_weight is None or inner_bias is None:
            raise _NotPlain(f"{target.__qualname__} gets the weight or the bias without the other")
        self.prove(target, inner_weight, inner_bias, None, depth + 1)

    def _check_self(self, definition: ast.FunctionDef, self_name: str, weight: str, bias: str, parents) -> None:
        for node in ast.walk(definition):
            if not (isinstance(node, ast.Name) and node.id == self_name):
                continue
            attribute = parents.get(node)
            if not isinstance(attribute, ast.Attribute) or not isinstance(attribute.ctx, ast.Load):
                raise _NotPlain("the forward passes self on, or assigns to it")
            if _spelled(attribute) in (weight, bias):
                continue
            call = parents.get(attribute)
            if isinstance(call, ast.Call) and call.func is attribute:
                self.children.add(attribute.attr)  # a child called with the input, checked per instance
            elif attribute.attr in ("weight", "bias"):
                raise _NotPlain(f"self.{attribute.attr} is read in another way")
            else:
                self.attributes.add(attribute.attr)


def _own_scope(definition: ast.FunctionDef):
    """The nodes of a function outside the functions, lambdas and classes nested in it."""
    stack = list(definition.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _spelled(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def _measures(node: ast.AST, parent: ast.AST | None) -> bool:
    """``w.shape``, ``w.size(...)``, ``w.dim()``...: a read of metadata only."""
    return isinstance(parent, ast.Attribute) and parent.value is node and parent.attr in _METADATA


def _proof_for(forward: types.FunctionType, layer_dims: int | None) -> tuple[_Proof | None, str | None]:
    proof = _Proof(layer_dims)
    try:
        arguments = inspect.signature(forward).parameters
        self_name = next(iter(arguments), None)
        if self_name is None or len(arguments) != 2:
            raise _NotPlain("the forward does not take (self, input)")
        proof.prove(forward, f"{self_name}.weight", f"{self_name}.bias", self_name, 0)
    except _NotPlain as exc:
        return None, str(exc)
    return proof, None


def why_forward_is_not_a_plain_conv(module: nn.Module) -> str | None:
    """Why ``module``'s own forward may not be ``op(g(x), self.weight, self.bias, ...)``
    with ``op`` its own conv or linear and ``g`` blind to the weight, or None once proven."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return "a transposed conv with its own forward"
        layer_dims: int | None = len(module.kernel_size)
    elif isinstance(module, nn.Linear):
        layer_dims = None
    else:
        return "not a conv or linear layer"
    forward = next((vars(klass)["forward"] for klass in type(module).__mro__ if "forward" in vars(klass)), None)
    if not isinstance(forward, types.FunctionType):
        return "its forward is not a plain function"
    proof, problem = _proof_for(forward, layer_dims)
    if proof is None:
        return problem
    problem = _free_names_problem(proof.outside)
    if problem:
        return problem
    for name in proof.attributes:  # plain values; a property or method could run code
        if any(name in vars(klass) for klass in type(module).__mro__):
            return f"its forward reads self.{name}, which its class computes"
    for name in proof.children:
        child = module._modules.get(name)
        if child is None or why_not_standard(child) is not None or \
                not type(child).__module__.startswith("torch.nn.modules."):
            return f"its forward calls self.{name}, which is not a standard torch module"
    return None
