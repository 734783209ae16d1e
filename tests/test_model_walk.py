"""The C walk of the module tree (csrc/walk.cpp) against the Python walk it
stands in for (fusedconv.model_index._Walk._walk): on every model, the same
paths, modules, attribute values, tensors, hooks and blocks, and the same
spans of memory, module by module, whichever of the two looks at a module."""

from __future__ import annotations

import collections
import functools

import pytest
import torch
from torch import nn

from fusedconv import blocks, model_index
from fusedconv.kernels import available_backends, extension
from fusedconv.memory import memory_span, sharing_memory

NATIVE = extension.native_function("walk_modules")
needs_native = pytest.mark.skipif(NATIVE is None, reason="the extension (with its C walk) is not built")


def _walks(model: nn.Module, blocks_given=None, monkeypatch=None):
    """(the C walk, the Python walk) of ``model``; the C one also counts the
    modules it hands to the Python look."""
    handed = []
    look = model_index._Walk._look_at

    def counting_look(self, path, module):
        handed.append(path)
        return look(self, path, module)

    monkeypatch.setattr(model_index._Walk, "_look_at", counting_look)
    native = model_index._Walk(model, blocks_given)
    monkeypatch.setattr(model_index._Walk, "_look_at", look)
    monkeypatch.setattr(model_index, "native_function", lambda name: None)
    python = model_index._Walk(model, blocks_given)
    monkeypatch.undo()
    return native, python, handed


def _spans(walk) -> collections.Counter:
    """Every registered tensor's span (start, end, path), those the C walk read and the others."""
    read = collections.Counter(walk.spans)
    for path, tensor in walk.unspanned:
        span = memory_span(tensor)
        if span is not None:
            read[(*span, path)] += 1
    return read


def assert_same_walk(native, python) -> None:
    def ids(pairs):
        return [(path, id(value)) for path, value in pairs]

    assert native.paths == python.paths
    assert ids(native.by_path.items()) == ids(python.by_path.items())
    assert ids(native.modules) == ids(python.modules)
    assert [[id(v) for v in values] for values in native.values] == \
        [[id(v) for v in values] for values in python.values]
    assert ids(native.registered) == ids(python.registered)
    assert ids(native.in_attributes) == ids(python.in_attributes)
    assert native.hooked == python.hooked
    assert [(path, id(m), converter) for path, m, converter in native.found] == \
        [(path, id(m), converter) for path, m, converter in python.found]
    assert {name: [id(m) for m in inner] for name, inner in native.members.items()} == \
        {name: [id(m) for m in inner] for name, inner in python.members.items()}
    assert ids(native.outside) == ids(python.outside)
    # The spans the C walk read are memory_span's, and the sharing found is the same.
    assert not python.spans and ids(python.unspanned) == ids(python.registered)
    assert _spans(native) == _spans(python)
    assert sharing_memory(native.unspanned + native.in_attributes, spans=native.spans) == \
        sharing_memory(python.unspanned + python.in_attributes, spans=python.spans)


class _Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv.register_forward_hook(lambda module, args, output: output)
        self.register_forward_pre_hook(functools.partial(lambda tag, module, args: None, "tag"))

    def forward(self, x):
        return self.conv(x)


class _Attributes(nn.Module):
    """Tensors and modules kept in attributes, a tensor with attributes of its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.alias = self.conv.weight  # a registered tensor in an attribute
        self.cache = {"k": [self.bn.running_mean[1:]]}  # a view, nested
        self.call = self.bn.forward  # a bound method
        self.sizes = (1, 2, "x", None, 2.5)  # plain configuration
        self.bn.weight.helper = self.conv.bias  # a tensor's own attribute

    def forward(self, x):
        return self.bn(self.conv(x))


class _OddTensors(nn.Module):
    """Registered tensors whose spans Python reads: empty, meta, views, a subclass."""

    def __init__(self):
        super().__init__()
        base = torch.randn(6, 8)
        self.register_buffer("transposed", base.t())  # not contiguous
        self.register_buffer("strided", base[:, ::2])
        self.register_buffer("overlapping", base[1:3])  # shares memory with the two above
        self.register_buffer("empty", torch.empty(0, 3))
        self.register_buffer("on_meta", torch.empty(4, device="meta"))
        self.register_buffer("meta_view", self.on_meta[1:])
        self.register_buffer("scalar", torch.tensor(3.0))
        self.register_buffer("none", None)
        self.sub = nn.Parameter(torch.randn(3).as_subclass(_TensorSubclass))
        self.ints = nn.Parameter(torch.arange(4), requires_grad=False)

    def forward(self, x):
        return x


class _TensorSubclass(torch.Tensor):
    pass


class _OddPlainTensors(_OddTensors):
    """The same tensors, but for the subclass: the module is plain, and the C
    walk reads every span itself (or leaves it to Python)."""

    def __init__(self):
        super().__init__()
        del self.sub


class _OwnDict(nn.Module):
    """A class whose ``__dict__`` is not the instance dict: ``vars()`` shows a
    copy without children, while ``self._modules`` reads the real one."""

    @property
    def __dict__(self):
        shown = dict(vars(nn.Module)["__dict__"].__get__(self))  # the instance dict itself
        shown["_modules"] = {}
        return shown

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        return self.inner(x)


class _OrderedChildren(nn.Module):
    """Registries that are not plain dicts, and a None child."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1)
        self.b = nn.BatchNorm2d(2)
        self._modules = collections.OrderedDict(self._modules)
        self._modules["gone"] = None
        self._modules.move_to_end("a")  # the OrderedDict's order, not the dict's insertion order
        self._parameters = collections.OrderedDict(w=nn.Parameter(torch.randn(2)))

    def forward(self, x):
        return x


class _OwnGetattribute(nn.Conv2d):
    def __getattribute__(self, name):
        return super().__getattribute__(name)


_CLASS_LEVEL_HOOKS = collections.OrderedDict(x=lambda module, args, output: output)


class _ClassLevelRegistry(nn.Module):
    """A data descriptor of the class named like nn.Module's bookkeeping: it,
    not the instance dict, says what ``module._forward_hooks`` is."""

    @property
    def _forward_hooks(self):
        return _CLASS_LEVEL_HOOKS

    @_forward_hooks.setter
    def _forward_hooks(self, value):  # nn.Module.__init__ sets it
        pass

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv(x)


def _shared_and_tied() -> nn.Module:
    first, second = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
    second.weight = first.weight  # tied
    third = nn.Conv2d(4, 4, 1)
    third.weight.data = first.weight.data  # .data assigned across modules
    inner = nn.Sequential(first, nn.BatchNorm2d(4))
    return nn.Sequential(inner, second, third, inner, nn.Sequential(first))  # registered at several paths


def _one_trap_each() -> nn.Module:
    """Modules plain but for one thing each, which only the Python look follows."""
    in_tuple, keyed, tensor_kept = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
    in_tuple.extra = (1, nn.ReLU())  # a tuple that is not plain configuration
    vars(keyed)[7] = nn.ReLU()  # a key that is not a string
    tensor_kept.running_var.alias = in_tuple.weight  # a registered tensor's own attribute
    pre_hooked = nn.ReLU()
    pre_hooked.register_forward_pre_hook(lambda module, args: None)
    return nn.Sequential(in_tuple, keyed, tensor_kept, pre_hooked, nn.Conv2d(2, 2, 1))


def _yolo() -> nn.Module:
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    return tasks.DetectionModel("yolov8n.yaml", verbose=False)


MODELS = {
    "resnet18": lambda: __import__("torchvision").models.resnet18(),
    "mobilenet_v2": lambda: __import__("torchvision").models.mobilenet_v2(),
    "blocks": lambda: nn.Sequential(blocks.RepVGGBlock(4, 4, 3), nn.Sequential(blocks.RepVGGBlock(4, 4, 3)),
                                    blocks.DiverseBranchBlock(4, 4, 3)),
    "model is a block": lambda: blocks.RepVGGBlock(4, 4, 3),
    "hooks": _Hooked,
    "attributes": _Attributes,
    "odd tensors": _OddTensors,
    "odd plain tensors": _OddPlainTensors,
    "own __dict__": lambda: nn.Sequential(_OwnDict()),
    "ordered children": _OrderedChildren,
    "own __getattribute__": lambda: nn.Sequential(_OwnGetattribute(2, 2, 1), nn.BatchNorm2d(2)),
    "class-level registry": _ClassLevelRegistry,
    "shared and tied": _shared_and_tied,
    "one trap each": _one_trap_each,
    "yolov8n": _yolo,
}


@needs_native
@pytest.mark.parametrize("name", list(MODELS))
def test_c_walk_is_the_python_walk(name, monkeypatch):
    model = MODELS[name]().eval()
    native, python, handed = _walks(model, monkeypatch=monkeypatch)
    assert_same_walk(native, python)
    assert len(handed) < len(python.modules) or name in ("hooks", "odd tensors")


@needs_native
def test_c_walk_hands_subtle_modules_to_the_python_look(monkeypatch):
    """Plain modules are looked at in C; hooks, attributes beyond plain
    configuration, tensors that are not exact Tensors or Parameters or carry
    attributes, registries that are not dicts and classes that change attribute
    lookup go to the Python look (which the comparison above holds to the
    Python walk)."""
    _, _, handed = _walks(_Attributes().eval(), monkeypatch=monkeypatch)
    assert handed == ["", "bn"]  # the root's attributes; bn.weight's own attribute
    model = _Attributes().eval()
    del model.bn.weight.helper
    _, _, handed = _walks(model, monkeypatch=monkeypatch)
    assert handed == [""]
    _, _, handed = _walks(_one_trap_each().eval(), monkeypatch=monkeypatch)
    assert handed == ["0", "1", "2", "3"]
    _, _, handed = _walks(_Hooked().eval(), monkeypatch=monkeypatch)
    assert handed == ["", "conv"]
    _, _, handed = _walks(_OddTensors().eval(), monkeypatch=monkeypatch)
    assert handed == [""]  # the Parameter subclass
    native, _, handed = _walks(_OddPlainTensors().eval(), monkeypatch=monkeypatch)
    assert handed == [] and native.spans and native.unspanned  # spans read in C, and left to Python
    _, _, handed = _walks(nn.Sequential(_OwnDict()).eval(), monkeypatch=monkeypatch)
    assert handed == ["0"]
    _, _, handed = _walks(_OrderedChildren().eval(), monkeypatch=monkeypatch)
    assert handed == [""]
    _, _, handed = _walks(nn.Sequential(_OwnGetattribute(2, 2, 1)).eval(), monkeypatch=monkeypatch)
    assert handed == []  # its instance dict is read through getattr: still the C look
    _, _, handed = _walks(_ClassLevelRegistry().eval(), monkeypatch=monkeypatch)
    assert handed == [""]  # the class's _forward_hooks (the instance dict has none)


@needs_native
def test_c_walk_with_a_callers_blocks(monkeypatch):
    model = nn.Sequential(blocks.RepVGGBlock(4, 4, 3), nn.Sequential(blocks.RepVGGBlock(4, 4, 3))).eval()
    for given in ({"0": model[0]}, {"1": model[1], "1.0": model[1][0]}, {"": model}, {}):
        native, python, _ = _walks(model, given, monkeypatch=monkeypatch)
        assert_same_walk(native, python)


@needs_native
def test_c_walk_raises_what_the_python_walk_raises(monkeypatch):
    model = nn.Sequential(nn.Conv2d(2, 2, 1))
    model._modules[3] = nn.ReLU()  # a child name that is not a string: "0." + 3 fails in both
    with pytest.raises(TypeError) as native:
        model_index._Walk(model, None)
    monkeypatch.setattr(model_index, "native_function", lambda name: None)
    with pytest.raises(TypeError) as python:
        model_index._Walk(model, None)
    assert type(native.value) is type(python.value)


def test_c_walk_loads_with_the_extension():
    """Where the cpp backend loads, its library carries the C walk: a build
    that silently lost it would fold correctly, only slower."""
    if available_backends("cpu")["cpp"] is not None:
        pytest.skip(f"the cpp backend is unavailable: {available_backends('cpu')['cpp']}")
    assert extension.native_function("walk_modules") is not None


def test_native_helpers_can_be_switched_off(monkeypatch):
    """FUSEDCONV_NATIVE_HELPERS=0 runs fusedconv's Python code for everything
    the helpers would compute (the kernels are another matter: backend=)."""
    monkeypatch.setenv("FUSEDCONV_NATIVE_HELPERS", "0")
    assert extension.native_function("walk_modules") is None
    assert extension.native_function("bn_affines") is None
    monkeypatch.delenv("FUSEDCONV_NATIVE_HELPERS")
    assert (extension.native_function("walk_modules") is None) == (NATIVE is None)
