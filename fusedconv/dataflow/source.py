"""Dataflow read from the model's Python source, without tracing or running it.

In most models the pairs to fold are spelled out in some module's ``forward``:
``self.bn(self.conv(x))``, ``x = self.conv(x)`` then ``x = self.bn(x)``, or an
``nn.Sequential``. Reading each class's ``forward`` once (the result is cached
per function) finds them for a fraction of the cost of a torch.fx trace.

The reading is conservative. A producer -> consumer pair is reported only when
the source proves that every time the producer runs, its output is read by the
consumer's call and by nothing else, and that nothing else in the model can
reach either module: every module on the path from the root is itself read
this way and refers to its children only by calling them (or testing them
against None). Anything else (``self.children()``, ``getattr(self, ...)``,
``self.conv.weight``, a child passed to a function, a try block, a loop that
jumps out between the two calls, ...) makes the modules concerned *unseen*, and
torch.fx is then asked instead (:mod:`fusedconv.dataflow.find`).

The one kind of function a child may be passed to is a gradient-checkpointing
helper, recognised by identity (the name, or a dotted chain of module
attributes, resolved in the method's globals without running anything):
``torch.utils.checkpoint.checkpoint(self.child, ...)`` calls the child;
``torch.utils.checkpoint.checkpoint_sequential`` and timm's ``checkpoint_seq``
call the modules of a list or tuple literal ``[self.a, self.b]`` in order, but
iterate the children of a module given alone (or, for ``checkpoint_seq(...,
flatten=True)``, of each listed module), which is the same as calling it only
for a plain ``nn.Sequential``; that is decided per instance. A child run this
way is never one end of a proven pair in its parent (its output and input go
through the helper), but what its own forward proves still holds.
"""

from __future__ import annotations

import ast
import collections
import functools
import inspect
import sys
import textwrap
import types
from dataclasses import dataclass, field
from typing import Iterable

from torch import fx, nn

from ..layers import MODULE_STATE, why_not_standard
from . import Dataflow, Node
from .references import UNKNOWN, code_objects, modules_held_elsewhere, reachable_modules

_MODULE_ATTRIBUTES = frozenset(dir(nn.Module)) - {"training", "forward"}
_MODULE_INTERNALS = MODULE_STATE - {"training"}  # _modules, _parameters, hooks, ...: all reach the children
# Names that can reach ``self`` or its attributes without spelling them out.
_INTROSPECTION = frozenset({"locals", "vars", "globals", "eval", "exec", "getattr", "setattr", "super"})
_JUMPS = (ast.Return, ast.Break, ast.Continue, ast.Raise, ast.Yield, ast.YieldFrom, ast.Await)
_SCOPES = (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.ListComp, ast.SetComp,
           ast.DictComp, ast.GeneratorExp)


class _Opaque(Exception):
    """The source does something that this reader does not follow."""


@dataclass
class _ClassReading:
    """What the source of one ``forward`` (and the methods it calls) does with ``self``."""

    calls: dict[str, int] = field(default_factory=dict)
    """Attribute -> number of call sites ``self.attr(...)``."""
    other_uses: set[str] = field(default_factory=set)
    """Attributes used in any other way than a call or an ``is None`` test."""
    flows: list[tuple[str, str, bool]] = field(default_factory=list)
    """(producer, consumer, tight): the producer's output is read by the consumer's
    call alone; ``tight`` when no other code runs between the two calls."""
    sequence_runs: set[str] = field(default_factory=set)
    """Attributes whose children a checkpoint helper runs in order, bypassing the
    attribute's own forward: the same as a call only if it is a plain nn.Sequential
    (decided per instance, in :func:`from_source`)."""
    opaque: str | None = None
    lookups: dict[str, object] = field(default_factory=dict)
    """What the class defined for each ``self.<name>`` the reading looked up (a
    method it read, a descriptor, or None): the reading holds while these do."""
    codes: list[tuple[types.FunctionType, types.CodeType]] = field(default_factory=list)
    """Each function read, with the code object it had then."""
    free_names: list[tuple[types.FunctionType, str, tuple[str, ...]]] = field(default_factory=list)
    """Globals and closure variables the code loads: (function, name, attribute chain)."""
    functional_batchnorms: list[str] = field(default_factory=list)
    """Calls of a functional batch norm (``F.batch_norm(...)``), as written."""
    resolved: list[tuple[types.FunctionType, ast.AST, set[str], object]] = field(default_factory=list)
    """(function, expression, its bound names, what it resolved to) for each
    global looked up while reading (checkpoint helpers): the reading holds while
    each still resolves to the same object."""

    @functools.cached_property
    def pairs(self) -> list[tuple[str, str, bool]]:
        """The flows that pin both ends down: the producer is in no other flow, and
        both are called once and used in no other way (worked out once per reading)."""
        producers = collections.Counter(p for p, _, _ in self.flows)
        return [
            (producer, consumer, tight) for producer, consumer, tight in self.flows
            if producers[producer] == 1 and self.calls.get(producer) == 1 and self.calls.get(consumer) == 1
            and producer not in self.other_uses and consumer not in self.other_uses
            and producer not in self.sequence_runs and consumer not in self.sequence_runs
        ]


def _self_attribute(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _called_attribute(node: ast.AST) -> str | None:
    """``attr`` when ``node`` is ``self.attr(...)``."""
    return _self_attribute(node.func) if isinstance(node, ast.Call) else None


def _single_argument_call(node: ast.AST) -> tuple[str, ast.AST] | None:
    """``(attr, arg)`` when ``node`` is ``self.attr(arg)`` with one positional argument."""
    attr = _called_attribute(node)
    if attr is None or len(node.args) != 1 or node.keywords or isinstance(node.args[0], ast.Starred):
        return None
    return attr, node.args[0]


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name or a chain of attributes on one (None otherwise)."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _names(node: ast.AST, name: str) -> list[ast.Name]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Name) and n.id == name]


_MISSING = object()


def _bound_names(definition: ast.FunctionDef) -> set[str]:
    """Every name that the function (or a scope inside it) binds or declares
    global/nonlocal: such a name need not be the module global it spells."""
    names: set[str] = set()
    for node in ast.walk(definition):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).partition(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not definition:
            names.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
    return names


def _resolve(node: ast.AST, function: types.FunctionType, bound: set[str]) -> object:
    """The object a ``Name`` or a dotted chain of module attributes refers to in
    ``function``'s globals, looked up in dicts only (no descriptor, no module
    ``__getattr__`` runs); _MISSING when it is anything else or not found."""
    chain: list[str] = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id in bound or node.id in function.__code__.co_freevars:
        return _MISSING
    value = function.__globals__.get(node.id, _MISSING)
    for attr in reversed(chain):
        if not isinstance(value, types.ModuleType):
            return _MISSING
        value = vars(value).get(attr, _MISSING)
    return value


def _checkpoint_helper(value: object) -> str | None:
    """Which checkpoint helper ``value`` is (by identity), or None."""
    if value is _MISSING:
        return None
    torch_checkpoint = sys.modules.get("torch.utils.checkpoint")
    if torch_checkpoint is not None:
        for name in ("checkpoint", "checkpoint_sequential"):
            if value is vars(torch_checkpoint).get(name, _MISSING):
                return name
    if "timm" in sys.modules:
        for module_name in ("timm.models._manipulate", "timm.models.helpers"):
            module = sys.modules.get(module_name)
            if module is None:
                continue
            if value is vars(module).get("checkpoint_seq", _MISSING):
                return "checkpoint_seq"
            if value is vars(module).get("checkpoint", _MISSING):  # torch's checkpoint, use_reentrant defaulted
                return "checkpoint"
    return None


def _falsy_constant(node: ast.AST | None) -> bool:
    return node is None or isinstance(node, ast.Constant) and not node.value


class _Reader:
    def __init__(self, cls: type):
        self.cls = cls
        self.reading = _ClassReading()
        self.seen_methods: set[str] = set()

    # -- whole functions --------------------------------------------------------
    def read_method(self, name: str) -> None:
        if name in self.seen_methods:
            return
        self.seen_methods.add(name)
        function = _class_attribute(self.cls, name)
        self.reading.lookups[name] = function
        if not isinstance(function, types.FunctionType):
            raise _Opaque(f"{name} is not a plain method")
        self.reading.codes.append((function, function.__code__))
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        except (OSError, TypeError, SyntaxError) as exc:
            raise _Opaque(f"no source for {self.cls.__name__}.{name} ({type(exc).__name__})") from None
        definition = tree.body[0]
        if not isinstance(definition, ast.FunctionDef) or definition.decorator_list:
            raise _Opaque(f"{self.cls.__name__}.{name} is decorated")
        arguments = definition.args
        if not arguments.args or arguments.args[0].arg != "self":
            raise _Opaque(f"{self.cls.__name__}.{name} does not take self first")
        self.read_uses(definition, function)
        self.read_flows(definition)

    def read_uses(self, function: ast.FunctionDef, code: types.FunctionType) -> None:
        """Count how ``self`` and its attributes are used; follow calls to own methods."""
        bound: list[set[str]] = []  # worked out when first needed
        parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(function):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        for node in ast.walk(function):
            if isinstance(node, ast.Call):
                spelled = _dotted(node.func)
                if spelled is not None and "batch_norm" in spelled:
                    self.reading.functional_batchnorms.append(f"{self.cls.__qualname__}: {spelled}(...)")
            if isinstance(node, ast.Name):
                if node.id in _INTROSPECTION:
                    raise _Opaque(f"uses {node.id}")
                if node.id == "self" and not isinstance(parents.get(node), ast.Attribute):
                    raise _Opaque("passes self on, or rebinds it")
                if isinstance(node.ctx, ast.Load) and node.id != "self":
                    if not bound:
                        bound.append(_bound_names(function))
                    if node.id not in bound[0]:  # a global or closure variable: what it holds is checked per plan
                        chain = []
                        outer: ast.AST = node
                        while isinstance(parents.get(outer), ast.Attribute) and parents[outer].value is outer:
                            outer = parents[outer]
                            chain.append(outer.attr)
                        self.reading.free_names.append((code, node.id, tuple(chain)))
                continue
            attr = _self_attribute(node)
            if attr is None or node is function:
                continue
            if not isinstance(node.ctx, ast.Load):
                raise _Opaque(f"assigns self.{attr}")
            if attr in _MODULE_ATTRIBUTES or attr in _MODULE_INTERNALS:  # self._modules["conv"], self.children(), ...
                raise _Opaque(f"uses nn.Module.{attr}")
            parent = parents.get(node)
            called = isinstance(parent, ast.Call) and parent.func is node
            static = _class_attribute(self.cls, attr)
            self.reading.lookups.setdefault(attr, static)
            if inspect.isfunction(static):
                if not called:  # e.g. checkpoint(self._inner, x): code this reading would not follow
                    raise _Opaque(f"passes its method {attr} on")
                self.read_method(attr)  # one of the class's own methods
            elif static is not None and hasattr(static, "__get__"):
                raise _Opaque(f"uses {attr}, computed by a descriptor (a property, a classmethod, ...)")
            elif called:
                self.reading.calls[attr] = self.reading.calls.get(attr, 0) + 1
            elif (run := self._run_by_helper(node, parents, function, code, bound)) == "call":
                self.reading.calls[attr] = self.reading.calls.get(attr, 0) + 1
            elif run == "sequence":
                self.reading.sequence_runs.add(attr)
            elif not (isinstance(parent, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot)) for op in parent.ops)
                      and all(isinstance(c, ast.Constant) and c.value is None for c in parent.comparators)):
                self.reading.other_uses.add(attr)

    def _run_by_helper(self, node: ast.AST, parents: dict[ast.AST, ast.AST], function: ast.FunctionDef,
                       code: types.FunctionType, bound: list[set[str]]) -> str | None:
        """How a checkpoint helper runs ``node`` (``self.attr``, not called here):
        "call" when it calls it, "sequence" when it runs its children in order
        instead, None when ``node`` is not (all of) a helper's first argument."""
        parent = parents.get(node)
        listed = isinstance(parent, (ast.List, ast.Tuple))
        argument = parent if listed else node
        call = parents.get(argument)
        if not isinstance(call, ast.Call) or not call.args or call.args[0] is not argument:
            return None
        if not bound:
            bound.append(_bound_names(function))
        resolved = _resolve(call.func, code, bound[0])
        self.reading.resolved.append((code, call.func, bound[0], resolved))  # the reading holds while it does
        helper = _checkpoint_helper(resolved)
        if helper == "checkpoint":  # checkpoint(function, *args): function(*args)
            return None if listed else "call"
        if helper == "checkpoint_sequential":  # a list is called item by item, a Sequential's children run
            return "call" if listed else "sequence"
        if helper == "checkpoint_seq":  # checkpoint_seq(functions, x, every, flatten, ...)
            keywords = {k.arg: k.value for k in call.keywords}
            if None in keywords or any(isinstance(a, ast.Starred) for a in call.args):
                return None  # **kwargs or *args: flatten is not known
            flatten = keywords.get("flatten", call.args[3] if len(call.args) > 3 else None)
            if not _falsy_constant(flatten):  # the children of each listed module run
                return "sequence" if listed else None
            return "call" if listed else "sequence"
        return None

    # -- producer -> consumer pairs --------------------------------------------
    def read_flows(self, function: ast.FunctionDef) -> None:
        for node in ast.walk(function):
            inner = _single_argument_call(node)
            if inner is not None:
                producer = _called_attribute(inner[1])
                if producer is not None:  # self.consumer(self.producer(...)): nothing runs in between
                    self.reading.flows.append((producer, inner[0], True))
        # Variables that other code can see: those of nested scopes, and those
        # declared global or nonlocal (another function may read them).
        captured = {
            n.id for scope in ast.walk(function) if isinstance(scope, _SCOPES) and scope is not function
            for n in ast.walk(scope) if isinstance(n, ast.Name)
        } | {name for n in ast.walk(function) if isinstance(n, (ast.Global, ast.Nonlocal)) for name in n.names}
        loads: dict[str, int] = {}
        for n in ast.walk(function):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                loads[n.id] = loads.get(n.id, 0) + 1
            elif isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name):
                # ``v += 1`` changes a tensor in place: a read, and not a rebinding.
                loads[n.target.id] = loads.get(n.target.id, 0) + 1
        for block in _straight_blocks(function.body):
            self._read_block(block, captured, loads)

    def _read_block(self, statements: list[ast.stmt], captured: set[str], loads: dict[str, int]) -> None:
        """``v = self.producer(...)`` then, later in the same block, ``self.consumer(v)``.

        Every statement in between must leave ``v`` alone and cannot jump out;
        the consumer's statement is a simple one that reads ``v`` once, as the
        consumer's only argument. Then the producer's value is read elsewhere
        only if ``v`` keeps it afterwards, so either that statement rebinds ``v``
        or ``v`` is read nowhere else in the function. The flow is *tight* (no
        other code runs between the two calls) when the consumer's statement comes
        next and is the call itself (``v = self.consumer(v)``, ``return self.consumer(v)``).
        """
        for i, first in enumerate(statements):
            if not (isinstance(first, ast.Assign) and len(first.targets) == 1
                    and isinstance(first.targets[0], ast.Name) and _called_attribute(first.value)):
                continue
            variable, producer = first.targets[0].id, _called_attribute(first.value)
            if variable in captured:
                continue
            for j, later in enumerate(statements[i + 1:], start=i + 1):
                uses = _names(later, variable)
                if not uses:
                    if any(isinstance(n, _JUMPS) for n in ast.walk(later)):
                        break  # the consumer may be skipped
                    continue
                consumer = self._consumer(later, variable, uses, loads)
                if consumer is not None:
                    tight = j == i + 1 and _called_attribute(getattr(later, "value", None)) == consumer
                    self.reading.flows.append((producer, consumer, tight))
                break

    @staticmethod
    def _consumer(statement: ast.stmt, variable: str, uses: list[ast.Name], loads: dict[str, int]) -> str | None:
        if not isinstance(statement, (ast.Assign, ast.Return, ast.Expr)):
            return None
        reads = [n for n in uses if isinstance(n.ctx, ast.Load)]
        calls = [
            _single_argument_call(call)[0] for call in ast.walk(statement)
            if _single_argument_call(call) is not None
            and isinstance(call.args[0], ast.Name) and call.args[0].id == variable
        ]
        if len(reads) != 1 or len(calls) != 1:
            return None
        augmented = {id(n.target) for n in ast.walk(statement) if isinstance(n, ast.AugAssign)}
        rebinds = any(isinstance(n.ctx, ast.Store) and id(n) not in augmented for n in uses)
        return calls[0] if rebinds or loads[variable] == 1 else None


def _straight_blocks(statements: list[ast.stmt]):
    """Every statement list of a function outside try blocks (an exception
    handler could read a variable that the straight-line reading thought dead)."""
    yield statements
    for statement in statements:
        if isinstance(statement, (ast.Try, getattr(ast, "TryStar", ast.Try), *_SCOPES)):
            continue
        for body in ("body", "orelse"):
            block = getattr(statement, body, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield from _straight_blocks(block)


def _class_attribute(cls: type, name: str) -> object:
    """What the classes along ``cls``'s MRO define as ``name``, unevaluated (None if none does).

    inspect.getattr_static also guards against metaclasses that override
    ``__dict__`` and falls back to the metaclass's own attributes, which
    instances never see; that makes it over ten times slower, and this lookup
    runs for every child of every module read.
    """
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


_READINGS: collections.OrderedDict[type, _ClassReading] = collections.OrderedDict()
_CACHED_CLASSES = 1024  # generated classes (fx GraphModules, tests) would otherwise pile up


def _still_holds(cls: type, reading: _ClassReading) -> bool:
    """Whether every method, class attribute and global the reading relied on is
    still the one it read (a monkeypatched helper, a replaced ``__code__`` or a
    rebound checkpoint helper reads again)."""
    return (all(_class_attribute(cls, name) is value for name, value in reading.lookups.items())
            and all(function.__code__ is code for function, code in reading.codes)
            and all(_resolve(node, function, bound) is value for function, node, bound, value in reading.resolved))


def read_class(cls: type) -> _ClassReading:
    """The reading of ``cls.forward`` (and the methods it calls), cached per class
    and read again when anything it relied on has changed."""
    reading = _READINGS.get(cls)
    if reading is not None and _still_holds(cls, reading):
        _READINGS.move_to_end(cls)
        return reading
    reader = _Reader(cls)
    try:
        reader.read_method("forward")
    except _Opaque as exc:
        reader.reading.opaque = str(exc)
    _READINGS[cls] = reader.reading
    if len(_READINGS) > _CACHED_CLASSES:
        _READINGS.popitem(last=False)
    return reader.reading


def _free_value(function: types.FunctionType, name: str, chain: tuple[str, ...]) -> object:
    """What a global or closure name (and a chain of attributes of Python modules
    on it) holds now; _MISSING when it cannot be looked up without running code."""
    code = function.__code__
    if name in code.co_freevars:
        try:
            value = function.__closure__[code.co_freevars.index(name)].cell_contents
        except ValueError:  # not assigned yet
            return _MISSING
    else:
        value = function.__globals__.get(name, _MISSING)
        if value is _MISSING:
            builtins = function.__builtins__
            value = (builtins if isinstance(builtins, dict) else vars(builtins)).get(name, _MISSING)
    for attr in chain:
        if not isinstance(value, types.ModuleType):
            break  # what an object's attribute holds is found by walking the object
        value = vars(value).get(attr, _MISSING)
    return value


def _free_names_problem(reading: _ClassReading) -> str | None:
    """Why a global or closure variable the code reads may reach a module, or None.

    A module reached that way may be called without the reading seeing it (say
    a module-level conv that is also registered as a child)."""
    for function, name, chain in reading.free_names:
        value = _free_value(function, name, chain)
        spelled = ".".join((name, *chain))
        if value is _MISSING:
            return f"it reads {spelled}, which fusedconv cannot look up without running it"
        reached = reachable_modules(value)
        if reached is UNKNOWN:
            return f"it reads {spelled}, whose references fusedconv cannot follow"
        if reached:
            return f"it reads {spelled}, which can reach a module ({type(reached[0]).__name__})"
    return None


def _sequential_reading(module: nn.Sequential) -> _ClassReading:
    names = [name for name, child in module._modules.items() if child is not None]
    return _ClassReading(calls=dict.fromkeys(names, 1), flows=[(a, b, True) for a, b in zip(names, names[1:])])


# What ``self.child(...)`` goes through: a class that redefines any of these
# may call something else, or the child differently.
_CALL_MACHINERY = ("__call__", "_call_impl", "_wrapped_call_impl", "__getattr__", "__getattribute__")


def _class_defines(cls: type, name: str) -> type | None:
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


def _reading_of(module: nn.Module, free_problems: dict[type, str | None]) -> _ClassReading:
    """The reading of ``module``'s forward as it applies to this instance (opaque
    when the instance or its class can reach its children in other ways);
    ``free_problems`` memoizes :func:`_free_names_problem` per class for one plan."""
    cls = type(module)
    for name in vars(module).keys() - MODULE_STATE:
        if name in module._modules:
            return _ClassReading(opaque=f"an instance attribute hides its submodule {name}")
        if callable(getattr(cls, name, None)):
            return _ClassReading(opaque=f"its {name} is replaced on the instance")
    for name in _CALL_MACHINERY:
        if getattr(cls, name) is not getattr(nn.Module, name):
            return _ClassReading(opaque=f"it overrides {name}")
    for name in module._modules:
        owner = _class_defines(cls, name)
        if owner is not None:
            return _ClassReading(opaque=f"{owner.__qualname__}.{name}, a class attribute, hides its submodule {name}")
    if _plain_sequential(module):
        return _sequential_reading(module)
    reading = read_class(cls)
    if reading.opaque:
        return reading
    if cls not in free_problems:
        free_problems[cls] = _free_names_problem(reading)
    return _ClassReading(opaque=free_problems[cls]) if free_problems[cls] else reading


def _plain_sequential(module: nn.Module) -> bool:
    """Whether running ``module``'s children in order (as checkpoint_sequential and
    checkpoint_seq do) is the same as calling it."""
    return isinstance(module, nn.Sequential) and why_not_standard(module) is None


def _where(module: nn.Module, path: str) -> str:
    return f"{path} ({type(module).__name__})" if path else type(module).__name__


def from_source(model: nn.Module, tracked: dict[int, str], paths: dict[int, list[str]],
                held_elsewhere: dict[int, tuple[nn.Module, str]] | None | object = _MISSING) -> Dataflow:
    """Dataflow of ``model`` as its source code shows it (see the module docstring).

    ``tracked`` maps id(module) to its name, ``paths`` id(module) to every
    path where it is registered, ``held_elsewhere`` the modules reachable from
    outside the module tree (:func:`fusedconv.dataflow.references.modules_held_elsewhere`;
    found here when not given). Tracked modules that the reading cannot vouch
    for are returned as unseen.
    """
    if held_elsewhere is _MISSING:
        held_elsewhere = modules_held_elsewhere((paths[id(m)][0], m) for m in model.modules())
    nodes = {name: Node(name) for name in tracked.values()}
    unseen: dict[str, str] = {}
    holders: set[str] = set()  # paths of the modules that contain a tracked module
    for name in tracked.values():
        while name:
            name = name.rpartition(".")[0]
            if name in holders:
                break  # and so are the paths above it
            holders.add(name)

    def hide(module: nn.Module, why: str) -> None:
        for sub in module.modules():
            if id(sub) in tracked:
                unseen.setdefault(tracked[id(sub)], why)

    if held_elsewhere is None:
        hide(model, "something in the model holds an object whose references fusedconv cannot follow")
    else:
        for module, where in held_elsewhere.values():
            hide(module, f"it is also reachable through {where}, so it may be called in ways the code does not show")
    free_problems: dict[type, str | None] = {}
    functional: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        if len(paths[id(module)]) > 1:
            return hide(module, f"inside {_where(module, path)}, which is registered at {len(paths[id(module)])} "
                                "places")
        reading = _reading_of(module, free_problems)
        if reading.opaque:
            return hide(module, f"inside {_where(module, path)}, whose forward fusedconv does not read without a "
                                f"trace ({reading.opaque})")
        functional.extend(f"{path or '(model)'}: {call}" for call in reading.functional_batchnorms)
        for attr, child in module._modules.items():
            if child is None:
                continue
            if attr in reading.other_uses:
                hide(child, f"{_where(module, path)} uses {attr} in another way than calling it")
            elif attr in reading.sequence_runs and (id(child) in tracked or not _plain_sequential(child)):
                hide(child, f"{_where(module, path)} uses {attr} in another way than calling it (a checkpoint "
                            "helper runs its children, bypassing its own forward)")
            elif id(child) in tracked:
                node = nodes[tracked[id(child)]]
                if len(paths[id(child)]) > 1:
                    unseen[node.name] = f"registered at {len(paths[id(child)])} places"
                node.calls = reading.calls.get(attr, 0)
                node.consumers = [None] if node.calls else []
            else:
                child_path = f"{path}.{attr}" if path else attr
                if child_path in holders:
                    visit(child, child_path)
        for producer, consumer, tight in reading.pairs:
            first, second = module._modules.get(producer), module._modules.get(consumer)
            if id(first) in tracked and id(second) in tracked:
                nodes[tracked[id(first)]].consumers = [tracked[id(second)]]
                nodes[tracked[id(second)]].input_from = tracked[id(first)]
                nodes[tracked[id(second)]].input_tight = tight

    if id(model) in tracked:  # the model is a single layer or BN: nothing to pair
        nodes[tracked[id(model)]].calls = 1
    else:
        visit(model, "")
    return Dataflow(nodes, "source", unseen, functional_batchnorms=functional)


def functional_batchnorm_calls(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """The batch norms computed by function calls in ``modules`` (path, module),
    as their code shows them: the calls in each class's forward, and the batch
    norm nodes of each ``torch.fx.GraphModule`` (e.g. from torch.export)."""
    found: list[str] = []
    read: set[type] = set()
    for path, module in modules:
        where = path or "(model)"
        if isinstance(module, fx.GraphModule):
            found.extend(f"{where}: {node.name}" for node in module.graph.nodes
                         if node.op == "call_function" and "batch_norm" in str(node.target))
            continue
        cls = type(module)
        if cls in read or cls.__module__.startswith("torch.nn.modules."):
            continue
        read.add(cls)
        if _may_call_batch_norm(cls):
            found.extend(f"{where}: {call}" for call in read_class(cls).functional_batchnorms)
    return found


def _may_call_batch_norm(cls: type) -> bool:
    """Whether a method of ``cls`` may contain a call that the reading reports as
    a functional batch norm: one spelled with ``batch_norm`` (as
    :meth:`_Reader.read_uses` looks for them). The reading reads functions of
    the classes of its MRO, so a class none of whose functions' compiled code
    names ``batch_norm`` has none, and need not be read: reading every class
    of a model is most of a first fold's time when all its BNs sit in blocks.
    The code is what runs, and names every global, attribute, local and
    closure variable its source uses (every name of a call's dotted spelling)
    as Python read them (in NFKC form: a full-width ``ｂatch_norm`` compiles to
    ``batch_norm``, in whatever encoding the file declares), so no file is
    opened. Only functions have code to read (a module or builtin held by the
    class is called from a method, where the spelling would be)."""
    return any(_class_names_batch_norm(klass) for klass in cls.__mro__
               if klass is not object and klass is not nn.Module)


# Per class: a copy of its namespace, its functions with their code objects and
# the functions they wrap, and whether any of that code names ``batch_norm``;
# bounded (the oldest entry out first).
_NAMESPACES_SCANNED: collections.OrderedDict[type, tuple[dict, tuple, bool]] = collections.OrderedDict()


def _class_names_batch_norm(klass: type) -> bool:
    """Whether the code of a function ``klass`` itself defines (a method, a
    property's getter, a static or class method, and the original of a
    wrapper, which the reading reads as ``inspect.getsource`` unwraps) names
    ``batch_norm``. Scanned again when the class's namespace, a function's
    ``__code__`` or what it wraps has changed since (a method replaced, a class
    patched); a wrapper whose chain cannot be unwrapped counts as naming it
    (the reading will say what it finds)."""
    known = _NAMESPACES_SCANNED.get(klass)
    if known is not None:
        namespace, codes, answer = known
        try:
            same = namespace == vars(klass)  # identical values compare equal without running their __eq__
        except Exception:  # a changed value whose __eq__ raises
            same = False
        if same and all(function.__code__ is code and function.__dict__.get("__wrapped__") is wrapped
                        for function, code, wrapped in codes):
            return answer
    functions = []
    answer = False
    for value in vars(klass).values():
        if isinstance(value, property):
            value = value.fget
        function = getattr(value, "__func__", value)  # staticmethod, classmethod
        if isinstance(function, types.FunctionType):
            functions.append(function)
            if hasattr(function, "__wrapped__"):
                try:
                    original = inspect.unwrap(function)
                except ValueError:  # a cycle of wrappers
                    answer = True
                    continue
                if isinstance(original, types.FunctionType):
                    functions.append(original)
    answer = answer or any(_code_names_batch_norm(function.__code__) for function in functions)
    _NAMESPACES_SCANNED[klass] = (dict(vars(klass)), tuple((f, f.__code__, f.__dict__.get("__wrapped__"))
                                                           for f in functions), answer)
    if len(_NAMESPACES_SCANNED) > _CACHED_CLASSES:
        _NAMESPACES_SCANNED.popitem(last=False)
    return answer


def _code_names_batch_norm(code: types.CodeType) -> bool:
    """Whether ``code`` or a function, lambda or comprehension compiled inside it
    names something with ``batch_norm`` in its name: a global or attribute
    (``co_names``), a local (``co_varnames``) or a closure variable. Every name
    in a call's dotted spelling is one of these."""
    # One search of each code's names joined: an identifier holds no space, so none is found across two.
    return any("batch_norm" in " ".join((*c.co_names, *c.co_varnames, *c.co_cellvars, *c.co_freevars))
               for c in code_objects(code))
