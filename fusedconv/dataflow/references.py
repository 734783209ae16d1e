"""Which modules a Python object can reach: the ways a forward can call a child
without naming it as ``self.<child>``.

The code reading proves how often a child runs only from the calls that the
forward spells out. A child can also be called through anything else that
holds it: a bound method (``self.fwd = self.conv.forward``), a
``functools.partial``, a lambda or closure, a ``SimpleNamespace`` or dataclass,
a plain list, a module-level global, a hook. :func:`reachable_modules` walks
such an object graph and returns the ``nn.Module`` objects it can reach, or
:data:`UNKNOWN` when the walk would have to give up (too large, or an object it
cannot look into); the caller then treats every module as reachable.

Code from torch and other well-known libraries is not walked into: their
functions do not keep the caller's modules.
"""

from __future__ import annotations

import collections
import dis
import enum
import functools
import inspect
import numbers
import sys
import types
import weakref
from typing import Iterable

import torch
from torch import nn

from .. import distributed
from ..layers import MODULE_STATE
from ..walking import submodules

UNKNOWN = None
"""Returned when the walk cannot tell what an object reaches."""

# Values whose contents hold no reference to anything worth following. Their
# instance attributes may: a tensor, an enum member or an instance of a subclass
# of a number or string can carry any attribute (``t.helper = conv``), and those
# are followed. A module object's attributes are its namespace, not followed.
_ATOMS = (
    type(None), bool, numbers.Number, str, bytes, bytearray, range, slice, enum.Enum, torch.dtype,
    torch.device, torch.Size, torch.memory_format, torch.layout, torch.Tensor, types.ModuleType,
    type(Ellipsis), type(NotImplemented), torch.Generator,
)
# The exact types of most atoms without instance attributes (a model's
# configuration: class names, a yaml dict), told apart by one set lookup before
# the isinstance over _ATOMS, which checks the abstract numbers.Number on the way.
_BARE_ATOMS = frozenset({type(None), bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size})
# The exact container types whose contents are all they hold (a subclass may carry attributes).
_PLAIN_CONTAINERS = frozenset({dict, list, tuple, set, frozenset})
# Functions defined in these packages keep no reference to a caller's modules.
_LIBRARY_PREFIXES = ("torch", "torchvision", "timm", "numpy", "math", "functools", "operator", "builtins",
                     "collections", "typing", "itertools", "einops", "warnings", "logging", "ultralytics")
_BUDGET = 2000  # objects visited before giving up


def _library_function(function: types.FunctionType) -> bool:
    module = function.__module__ or ""
    return module.split(".")[0] in _LIBRARY_PREFIXES


def code_objects(code: types.CodeType) -> list[types.CodeType]:
    """``code`` and every code object compiled inside it (functions, lambdas,
    comprehensions, classes), however deep."""
    found: list[types.CodeType] = []
    stack = [code]
    while stack:
        current = stack.pop()
        found.append(current)
        stack += [const for const in current.co_consts if isinstance(const, types.CodeType)]
    return found


def _referenced_globals(code: types.CodeType, namespace: dict) -> list[object]:
    """The globals a code object (and the code nested in it) may load."""
    return [namespace[name] for current in code_objects(code) for name in current.co_names if name in namespace]


def cell_contents(function: types.FunctionType) -> list[object]:
    """What a function's closure cells hold (empty cells left out)."""
    contents = []
    for cell in function.__closure__ or ():
        try:
            contents.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return contents


def _references(obj: object) -> list[object] | None:
    """What ``obj`` holds that could lead to a module (None: cannot tell)."""
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
        return list(obj)
    if isinstance(obj, types.MethodType):
        return [obj.__self__, obj.__func__]
    if isinstance(obj, types.FunctionType):
        if _library_function(obj):
            return []
        return [*cell_contents(obj), *(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values(),
                *_referenced_globals(obj.__code__, obj.__globals__)]
    if isinstance(obj, functools.partial):
        return [obj.func, *obj.args, *obj.keywords.values()]
    if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType, types.WrapperDescriptorType,
                        types.MethodWrapperType, types.MethodDescriptorType)):
        owner = getattr(obj, "__self__", None)
        return [] if owner is None or isinstance(owner, (types.ModuleType, type)) else [owner]
    if isinstance(obj, type):  # a class's own data attributes (a module kept at class level)
        if (obj.__module__ or "").split(".")[0] in _LIBRARY_PREFIXES:
            return []
        return [value for value in vars(obj).values()
                if not isinstance(value, (types.FunctionType, staticmethod, classmethod, property))]
    if isinstance(obj, weakref.ref):
        return [obj()]
    held: list[object] = []
    if hasattr(obj, "__dict__"):
        held.extend(vars(obj).values())
    for klass in type(obj).__mro__:
        for slot in vars(klass).get("__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                held.append(getattr(obj, slot))
    if held or hasattr(obj, "__dict__"):
        return held
    module = (type(obj).__module__ or "").split(".")[0]
    # An object of a C type outside the standard library and torch: nothing to look into.
    return [] if module in _LIBRARY_PREFIXES or module in sys.stdlib_module_names else None


def _instance_attributes(atom: object) -> dict:
    """The attributes an atom carries in its own ``__dict__`` (usually none)."""
    if isinstance(atom, types.ModuleType):
        return {}
    return getattr(atom, "__dict__", None) or {}


def reachable_modules(obj: object) -> list[nn.Module] | None:
    """The ``nn.Module`` objects reachable from ``obj`` (not looking inside them),
    or :data:`UNKNOWN` when that cannot be told."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        current = stack.pop()
        kind = type(current)
        if kind in _BARE_ATOMS or id(current) in seen:
            continue
        if kind in _PLAIN_CONTAINERS:  # most of what a configuration holds: no isinstance over _ATOMS
            seen.add(id(current))
            if len(seen) > _BUDGET:
                return UNKNOWN
            stack.extend(current.keys() if kind is dict else current)
            if kind is dict:
                stack.extend(current.values())
            continue
        atom = isinstance(current, _ATOMS)
        if atom and not _instance_attributes(current):
            continue
        seen.add(id(current))
        if len(seen) > _BUDGET:
            return UNKNOWN
        if isinstance(current, nn.Module):
            found.append(current)
            continue
        held = list(_instance_attributes(current).values()) if atom else _references(current)
        if held is None:
            return UNKNOWN
        stack.extend(held)
    return found


PLAIN_TYPES = frozenset({int, float, bool, str, type(None)})  # most attributes: a layer's configuration


def forward_hooks(module: nn.Module) -> list[object]:
    """The module's forward hooks and pre-hooks, FSDP2's own left out."""
    if not (module._forward_hooks or module._forward_pre_hooks):
        return []
    fsdp_pre, fsdp_post = distributed.own_forward_hooks(module)
    return [*(hook for key, hook in module._forward_hooks.items() if key not in fsdp_post),
            *(hook for key, hook in module._forward_pre_hooks.items() if key not in fsdp_pre)]


def attribute_values(module: nn.Module) -> list[object]:
    """The values of ``module``'s instance attributes that can hold a module or a
    tensor: nn.Module's own bookkeeping and plain configuration (numbers,
    strings, tuples of them) left out; the forward hooks added. FSDP2's state
    and hooks are left out too (:mod:`fusedconv.distributed`): they hold the
    modules whose parameters FSDP manages, and never call them."""
    attributes = vars(module)
    # This runs for every attribute of every module: the plain values are left
    # out first, then the tuples of plain values (a conv's kernel_size) among
    # the few left, each test inline where a call would cost more.
    values = [value for value in map(attributes.__getitem__, attributes.keys() - MODULE_STATE)
              if type(value) not in PLAIN_TYPES]
    if values:
        values = [value for value in values
                  if not (type(value) is tuple and PLAIN_TYPES.issuperset(map(type, value)))]
    # A registered tensor's own attributes (``conv.weight.helper = other``) are
    # held by the module too.
    for registry in (module._parameters, module._buffers):
        if registry:
            values += [value for tensor in registry.values() if tensor is not None and tensor.__dict__
                       for value in tensor.__dict__.values() if type(value) not in PLAIN_TYPES]
    if not values and not (module._forward_hooks or module._forward_pre_hooks):
        return values
    fsdp_state = distributed.own_attributes(module)
    if fsdp_state:
        values = [value for value in values if not any(value is own for own in fsdp_state)]
    values.extend(forward_hooks(module))
    return values


def hook_may_use_its_module(hook: object) -> bool:
    """Whether a forward (pre-)hook may use the module it is called with: a
    function (or a bound method, or a ``functools.partial`` of either) whose
    code never reads the argument the module lands in cannot; anything else (a
    callable object, a builtin, ``*args``, code that reads its frame) may."""
    function, position = hook, 0
    while isinstance(function, functools.partial):
        if function.keywords:
            return True  # a keyword may shift which parameter receives the module
        function, position = function.func, position + len(function.args)
    if isinstance(function, types.MethodType):
        function, position = function.__func__, position + 1
    if not isinstance(function, types.FunctionType):
        return True
    code = function.__code__
    if code.co_argcount <= position:
        return bool(code.co_flags & inspect.CO_VARARGS)  # the module lands in *args
    name = code.co_varnames[position]
    if name in code.co_cellvars or not _FRAME_READERS.isdisjoint(code.co_names):
        return True  # captured by a nested function, or read through the frame or evaluated code
    for instruction in dis.get_instructions(code):
        if "FAST" in instruction.opname:  # LOAD_FAST, and the pairs of Python 3.13+ (argval a tuple of names)
            names = instruction.argval if isinstance(instruction.argval, tuple) else (instruction.argval,)
            if name in names:
                return True
    return False


# Names through which code can read a local variable without naming it.
_FRAME_READERS = frozenset({"locals", "vars", "eval", "exec", "_getframe", "currentframe", "f_locals", "getframeinfo",
                            "stack"})


def _class_values(cls: type) -> list[object]:
    """What a class holds for its instances' code to reach: its data attributes
    (``shared = [conv]`` at class level), and the default arguments of its
    functions, properties included (``def forward(self, x, side=HOLDER)``),
    dunder ones too (``__call__``). Not the functions' closures: a decorator's
    (``super()``'s cell, a wrapped ``__init__``) would lead the walk through
    whole libraries, past its budget."""
    values: list[object] = []
    for key, value in vars(cls).items():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            functions = [value.fget, value.fset, value.fdel]
        elif isinstance(value, types.FunctionType):
            functions = [value]
        else:
            if not (key.startswith("__") and key.endswith("__")) and value is not None:
                values.append(value)  # not the class's own machinery (its dict, weak references, module name...)
            continue
        for function in functions:
            if isinstance(function, types.FunctionType):
                values.extend(function.__defaults__ or ())
                values.extend((function.__kwdefaults__ or {}).values())
    return values


def _reached_by_class(kind: type) -> list[nn.Module] | None:
    """The modules that the classes of ``kind``'s MRO reach (:func:`_class_values`),
    those of torch and the other trusted libraries left out; :data:`UNKNOWN`
    when that cannot be told."""
    values = [value for cls in kind.__mro__ if cls is not object and
              (cls.__module__ or "").split(".")[0] not in _LIBRARY_PREFIXES for value in _class_values(cls)]
    return reachable_modules(values) if values else []


def modules_held_elsewhere(modules: Iterable[tuple[str, nn.Module]], *,
                           values: Iterable[list[object]] | None = None,
                           holders: dict[int, list[str]] | None = None,
                           directly: set[int] | None = None,
                           ) -> dict[int, tuple[nn.Module, str]] | None:
    """Among the modules of a model (``(path, module)``, each once), those that
    something besides the module tree can reach: id(module) -> (module, what
    holds it), or None when some holder cannot be followed. ``values``: each
    module's :func:`attribute_values` in the order of ``modules``, when the
    caller has them already;
    ``holders``, when given, is filled with id(module) -> the paths of every
    module whose attributes, hooks or class reach it, and ``directly`` with the
    ids of the modules held themselves (not only reached through a module
    above them, or as the module a hook is called with): a replacement in the
    tree does not reach such a holder.

    A module kept in an instance attribute (a bound method, a partial, a
    lambda, a list, a namespace...), in a hook of any module of the model, in a
    class attribute or a default argument of a method of a module's class
    (outside torch and the other libraries of ``_LIBRARY_PREFIXES``) can be
    called by code that neither the code reading nor the module tree shows,
    and it keeps being called after the tree's reference to it is replaced. A
    forward hook that uses the module it is called with holds that module, and
    whoever holds a module can reach every module below it.
    """
    held_elsewhere: dict[int, tuple[nn.Module, str]] = {}
    modules = list(modules)
    if values is None:
        values = [attribute_values(module) for _, module in modules]
    # What each module class reaches, walked once per class.
    by_class = {kind: _reached_by_class(kind) for kind in {type(module) for _, module in modules}}
    if any(reached is UNKNOWN for reached in by_class.values()):
        return None
    # Only a module holding values, or of a class that reaches a module, has
    # anything to follow (most modules: nothing). Its forward hooks are among its
    # values; FSDP2's own, left out there, are never followed.
    reaching = any(by_class.values())
    for (path, module), held in zip(modules, values) if reaching else \
            [(entry, held) for entry, held in zip(modules, values) if held]:
        from_class = by_class[type(module)]
        reached = reachable_modules(held) if held else []
        if reached is UNKNOWN:
            return None
        reached = reached + from_class if from_class else reached
        if directly is not None and reached:
            directly.update(id(other) for other in reached)
        if (module._forward_hooks or module._forward_pre_hooks) and \
                any(hook_may_use_its_module(hook) for hook in forward_hooks(module)):
            reached = reached + [module]  # the hook is called with the module
        if not reached:
            continue
        # Whoever holds a module reaches every module below it too (``held.conv(x)``).
        reached = [inner for outer in reached for inner in submodules(outer)]
        where = f"an attribute, hook or class of {path} ({type(module).__name__})" if path else \
            f"an attribute, hook or class of the model ({type(module).__name__})"
        for other in reached:
            held_elsewhere.setdefault(id(other), (other, where))
            if holders is not None:
                holders.setdefault(id(other), []).append(path)
    return held_elsewhere
