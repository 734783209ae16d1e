"""copy_module against copy.deepcopy: the same objects, sharing, hooks and tensors.

Every test copies a model twice, once with ``copy.deepcopy`` (the reference)
and once with ``copy_module``, each with its own, equally seeded memo, and
walks the two copies side by side (assert_same_copy): the same types, values
and identity structure (an object reached twice in one copy is reached twice,
at the same places, in the other), the same objects shared with the original
or with the memo's seeds, and no tensor storage shared with the original.
Where deepcopy copies everything the ordinary way, the copy is also walked
beside the original (assert_sharing_mirrors_original): two places hold the
same object in the original iff they do in the copy. Outputs are compared bit
for bit on random inputs.
"""

from __future__ import annotations

import copy
import copyreg
import functools
import types
import weakref
from collections import OrderedDict

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from fusedconv.copying import _ATOMIC_TYPES, copy_module

pytestmark = pytest.mark.usefixtures("one_thread")

# Objects that deepcopy returns as they are (weakref.ref among them).
_SHARED_AS_IS = tuple(_ATOMIC_TYPES)


def _parts(obj) -> tuple[object, list, bool]:
    """A comparable summary of ``obj``, the objects it refers to (in a fixed
    order) and whether it is a plain object whose parts are its attributes."""
    if isinstance(obj, torch.Tensor):
        summary = (obj.dtype, obj.shape, obj.stride(), obj.storage_offset(), obj.device,
                   obj.requires_grad, obj.is_leaf, sorted(vars(obj)))
        return summary, [obj.grad, *_attributes(obj)], False
    if type(obj) in (dict, OrderedDict):
        attributes = _attributes(obj) if type(obj) is OrderedDict else []
        return (list(obj), sorted(vars(obj)) if attributes else None), [*obj, *obj.values(), *attributes], False
    if type(obj) in (list, tuple, torch.Size):
        return len(obj), list(obj), False
    if type(obj) in (set, frozenset):
        assert all(isinstance(item, _SHARED_AS_IS) for item in obj), "the walk compares sets of atomic items"
        return obj, [], False
    if isinstance(obj, torch.device):
        return str(obj), [], False
    if isinstance(obj, functools.partial):
        return None, [obj.func, obj.args, obj.keywords, vars(obj)], False
    if isinstance(obj, types.MethodType):
        return None, [obj.__func__, obj.__self__], False
    if hasattr(obj, "__dict__"):  # modules and plain objects
        return sorted(vars(obj)), _attributes(obj), True
    raise AssertionError(f"the walk does not know how to compare {type(obj).__name__}")


def _attributes(obj) -> list:
    return [value for _, value in sorted(vars(obj).items())]


def _reachable(roots) -> dict[int, object]:
    """Every object reachable from ``roots`` through _parts, by id (kept alive by the dict)."""
    seen: dict[int, object] = {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        if isinstance(obj, weakref.ref):
            stack.append(obj())
        elif not isinstance(obj, _SHARED_AS_IS):
            stack.extend(_parts(obj)[1])
    return seen


def _storage(tensor: torch.Tensor) -> int | None:
    return tensor.untyped_storage().data_ptr() if tensor.untyped_storage().nbytes() else None


def assert_same_copy(original, expected, actual, memo=None) -> None:
    """``actual`` is the same copy of ``original`` as the deepcopy result ``expected``.

    Both were made with ``memo`` (equal memos, not the same one). Objects of
    the original or of the memo's seeds are the very same objects in both
    copies; every other object pairs up one to one with the same type, summary
    and tensor values, so sharing is the same in both copies.
    """
    originals = _reachable([original])
    seeds = _reachable((memo or {}).values())
    _assert_mirrors(expected, actual, originals.keys() | seeds.keys(), {}, _storages(originals), by_name=False)


def assert_sharing_mirrors_original(original, expected, actual, memo=None) -> None:
    """Two places hold the same object in ``original`` iff they do in the copy ``actual``.

    What deepcopy (``expected``) kept as it was is kept, what the memo
    replaces is replaced, everything else is a copy paired one to one with its
    original, tensor storages too. An object whose class copies it its own way
    (a hook dropping its functools.wraps attributes, say) may lose or gain
    attributes; the walk follows the ones it kept.
    """
    originals = _reachable([original])
    kept_as_is = originals.keys() & _reachable([expected]).keys()
    _assert_mirrors(original, actual, kept_as_is, memo or {}, _storages(originals), by_name=True)


def _storages(objects: dict[int, object]) -> set[int]:
    return {_storage(t) for t in objects.values() if isinstance(t, torch.Tensor)} - {None}


def _assert_mirrors(left, right, identical, replaced, original_storages, by_name) -> None:
    """Walk ``left`` and ``right`` side by side.

    ``identical``: ids of objects that must be the same object on both sides;
    ``replaced``: id(object on the left) -> the object the right holds instead.
    Every other pair has the same type and summary (_parts), equal tensor
    values, and pairs up one to one, tensor storages too; with ``by_name``, plain
    objects pair the attributes they both have.
    """
    pairs: dict[int, object] = {}
    reverse: dict[int, object] = {}
    storage_pairs: dict[int, int] = {}
    storage_reverse: dict[int, int] = {}
    stack = [(left, right, "model")]
    while stack:
        lhs, rhs, path = stack.pop()
        if id(lhs) in replaced:
            assert rhs is replaced[id(lhs)], f"{path}: the memo's replacement is not used"
            continue
        if id(lhs) in identical or id(rhs) in identical:
            assert lhs is rhs, f"{path}: one side holds the object itself, the other a copy"
            continue
        assert type(lhs) is type(rhs), f"{path}: {type(lhs).__name__} vs {type(rhs).__name__}"
        if isinstance(lhs, weakref.ref):  # made while copying (a hook's reference to the new module)
            stack.append((lhs(), rhs(), f"{path}()"))
            continue
        if isinstance(lhs, _SHARED_AS_IS):  # made while copying (e.g. by a __deepcopy__), not copied
            assert lhs == rhs, f"{path}: {lhs!r} vs {rhs!r}"
            continue
        if id(lhs) in pairs or id(rhs) in reverse:
            assert pairs.get(id(lhs)) is rhs and reverse.get(id(rhs)) is lhs, f"{path}: sharing differs"
            continue
        pairs[id(lhs)], reverse[id(rhs)] = rhs, lhs
        summary, children, named = _parts(lhs)
        summary_right, children_right, _ = _parts(rhs)
        if named and by_name:
            common = set(summary) & set(summary_right)
            children = [vars(lhs)[name] for name in sorted(common)]
            children_right = [vars(rhs)[name] for name in sorted(common)]
        else:
            assert summary == summary_right, f"{path}: {summary} vs {summary_right}"
        if isinstance(lhs, torch.Tensor):
            assert torch.equal(lhs.detach(), rhs.detach()), f"{path}: values differ"
            storage, storage_right = _storage(lhs), _storage(rhs)
            assert storage_right not in original_storages, f"{path}: the copy shares storage with the original"
            if storage is not None:
                assert storage_pairs.setdefault(storage, storage_right) == storage_right, f"{path}: storages differ"
                assert storage_reverse.setdefault(storage_right, storage) == storage, f"{path}: storages differ"
        stack.extend((a, b, f"{path}/{i}") for i, (a, b) in enumerate(zip(children, children_right)))


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    assert torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def assert_same_state_dict(original: nn.Module, copied: nn.Module) -> None:
    expected, actual = original.state_dict(), copied.state_dict()
    assert list(expected) == list(actual)
    for name, value in expected.items():
        assert value.dtype == actual[name].dtype and torch.equal(value, actual[name]), name


def seeded_with_tensors(model: nn.Module) -> dict[int, object]:
    """The memo fusedconv's copy uses: every parameter and buffer kept, not cloned."""
    memo: dict[int, object] = {id(p): p for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return memo


def copies(model: nn.Module, make_memo=dict):
    """(deepcopy result, copy_module result), each from a fresh ``make_memo()``."""
    return copy.deepcopy(model, make_memo()), copy_module(model, make_memo())


def check_model(model: nn.Module, inputs: torch.Tensor, make_memo=dict) -> tuple[nn.Module, nn.Module]:
    expected, actual = copies(model, make_memo)
    assert_same_copy(model, expected, actual, make_memo())
    assert_sharing_mirrors_original(model, expected, actual, make_memo())
    assert_same_state_dict(model, actual)
    with torch.no_grad():
        reference = model(inputs)
        assert_bitwise_equal(expected(inputs), reference)
        assert_bitwise_equal(actual(inputs), reference)
    return expected, actual


# --- real models -------------------------------------------------------------

MODELS = {
    "torchvision_resnet18": lambda: torchvision.models.resnet18(),
    "torchvision_mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
    "timm_resnet18": lambda: timm.create_model("resnet18"),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seeded", [False, True], ids=["fresh_memo", "tensors_seeded"])
def test_real_models(name, seeded):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    calls = []
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, output: calls.append(module))
    make_memo = functools.partial(seeded_with_tensors, model) if seeded else dict
    expected, actual = check_model(model, torch.randn(2, 3, 32, 32), make_memo)
    # The hook (a lambda, shared as deepcopy shares functions) fired once per
    # model run (original, deepcopy, copy_module), each time on the module that ran.
    assert len(calls) == 3 and calls[0] is first_conv and calls[2] is not first_conv
    assert calls[2] is next(m for m in actual.modules() if isinstance(m, nn.Conv2d))
    if seeded:
        assert all(a is b for a, b in zip(model.parameters(), actual.parameters()))
    else:
        assert not set(map(id, model.parameters())) & set(map(id, actual.parameters()))


def test_atomic_types_are_the_ones_deepcopy_returns_as_is():
    samples = {
        type(None): None, type(Ellipsis): ..., type(NotImplemented): NotImplemented, int: 12345678,
        float: 1.5, bool: True, complex: 1j, bytes: b"ab", str: "a b", types.CodeType: _parts.__code__,
        type: nn.Conv2d, range: range(3), types.BuiltinFunctionType: len, types.FunctionType: _parts,
        weakref.ref: weakref.ref(nn.Conv2d), property: property(len), torch.dtype: torch.float16,
        torch.layout: torch.sparse_coo, torch.memory_format: torch.channels_last,
    }
    assert set(samples) == _ATOMIC_TYPES
    for sample in samples.values():
        memo: dict = {}
        assert copy.deepcopy(sample, memo) is sample
        # (deepcopy's reduce path leaves memo[id(layout)] = layout: the same object.)
        assert all(value is sample for value in memo.values())
    # torch.device is not one of them: deepcopy rebuilds it.
    device = torch.device("cpu")
    assert copy.deepcopy(device) is not device


# --- sharing, containers, odd attributes ---------------------------------------

class Owner:
    """A plain object that points back at the module holding it (a cycle)."""

    def __init__(self, module):
        self.module = module
        self.note = "plain"


class Holder(nn.Module):
    """Attributes of every container kind, with tensors, sharing and cycles in them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.again = self.conv                      # one submodule registered twice
        self.head = nn.Linear(4, 5)
        self.tail = nn.Linear(4, 5)
        self.tail.weight = self.head.weight         # tied parameters
        base = torch.randn(6, 4)
        self.tensors = [base, base[1:3], torch.randn(2)]       # two views of one storage
        self.table = {"first": base, "same": self.tensors, 7: (self.tensors, "x")}
        self.table["itself"] = self.table
        self.nested = (1, (2.0, "s"), None)          # copies to itself
        self.mixed = (self.tensors, 3)               # copies to a new tuple, memoized
        self.mixed_again = self.mixed
        cycle = []
        self.tuple_cycle = (cycle, 1)
        cycle.append(self.tuple_cycle)               # a tuple reached again through its own item
        self.names = {"a", "b"}
        self.frozen = frozenset({1, 2})
        self.ordered = OrderedDict(x=base)
        attributed = OrderedDict(y=1)
        attributed.extra = self.tensors              # OrderedDict state: deepcopy copies it
        self.attributed = attributed
        self.owner = Owner(self)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.bound = self.scale                      # bound method: deepcopy rebinds it
        self.register_buffer("scratch", torch.randn(4), persistent=False)
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))
        self.trainable = torch.randn(3, requires_grad=True)  # deepcopy copies a tensor's grad

    def scale(self, x):
        return x * 2

    def forward(self, x):
        y = self.again(self.conv(x)[:, :3]).mean((2, 3))
        y = y + self.scratch + self.tensors[1].sum()
        return self.bound(self.head(y) + self.tail(y))


def test_sharing_containers_and_attributes():
    torch.manual_seed(1)
    model = Holder().eval()
    model.trainable.grad = torch.randn(3)
    _, actual = check_model(model, torch.randn(2, 3, 8, 8))
    assert actual.conv is actual.again and actual.conv is not model.conv
    assert actual.tail.weight is actual.head.weight and actual.head.weight is not model.head.weight
    assert torch.equal(actual.trainable.grad, model.trainable.grad)
    assert actual.trainable.grad is not model.trainable.grad
    assert actual.table["same"] is actual.tensors and actual.mixed is actual.mixed_again
    assert actual.table["itself"] is actual.table and actual.table is not model.table
    assert actual.nested is model.nested and actual.mixed is not model.mixed
    assert actual.tuple_cycle[0][0] is actual.tuple_cycle
    assert actual.tensors[1].untyped_storage().data_ptr() == actual.tensors[0].untyped_storage().data_ptr()
    assert actual.owner.module is actual and actual.bound.__self__ is actual
    assert actual.attributed.extra is actual.tensors
    assert actual.frozen == model.frozen and actual.frozen is not model.frozen
    assert "scratch" not in actual.state_dict() and "scratch" in dict(actual.named_buffers())


def test_channels_last_weights_keep_their_layout():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)).eval()
    model = model.to(memory_format=torch.channels_last)
    _, actual = check_model(model, torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last))
    assert actual[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert actual[0].weight.stride() == model[0].weight.stride()


def test_parametrized_and_weight_norm_modules():
    class Symmetric(nn.Module):
        def forward(self, weight):
            return weight.triu() + weight.triu(1).transpose(-1, -2)

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)).eval()
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    weight_norm(model[1])
    expected, actual = check_model(model, torch.randn(5, 4))
    assert parametrize.is_parametrized(actual[0], "weight") and parametrize.is_parametrized(actual[1])
    assert type(actual[0]) is type(model[0])  # parametrize's per-module class
    weight = actual[0].weight
    assert torch.equal(weight, weight.T)


# --- hooks ----------------------------------------------------------------------

class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.seen: list[str] = []

    def record(self, module, args):
        self.seen.append("method pre-hook")

    def forward(self, x):
        return self.linear(x)


def _pre_hook_with_log(log, module, args):
    log.append("partial pre-hook")


def test_hooks_are_copied_and_fire_on_the_copy():
    torch.manual_seed(4)
    model = Hooked().eval()
    lambda_log: list[str] = []
    partial_log: list[str] = []
    model.register_forward_pre_hook(model.record)
    model.linear.register_forward_pre_hook(functools.partial(_pre_hook_with_log, partial_log))
    model.linear.register_forward_hook(lambda module, args, output: lambda_log.append(output.sum().item()))
    model.register_forward_hook(lambda module, args, kwargs, output: output * 3, with_kwargs=True)
    model.register_forward_pre_hook(lambda module, args: None, prepend=True)
    model.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    model.register_state_dict_post_hook(lambda module, state, prefix, local: None)
    model.register_load_state_dict_pre_hook(lambda module, *args: module.seen.append("load pre-hook"))
    x = torch.randn(2, 3)
    expected, actual = copies(model)
    assert_same_copy(model, expected, actual)
    assert_sharing_mirrors_original(model, expected, actual)

    out = actual(x)
    # The kwargs forward hook ran on the copy (the reference avoids the original's hooks).
    assert torch.equal(out, torch.nn.functional.linear(x, model.linear.weight, model.linear.bias) * 3)
    # Lambdas are shared, as deepcopy shares functions; a bound method and a
    # partial's arguments are copied, so those hooks record into the copy.
    assert len(lambda_log) == 1
    assert actual.seen == ["method pre-hook"] and model.seen == []
    copied_partial = next(iter(actual.linear._forward_pre_hooks.values()))
    assert copied_partial.args[0] == ["partial pre-hook"] and partial_log == []
    # This hook holds a weak reference to its module, remade by its __setstate__ for the copy.
    actual.load_state_dict(model.state_dict())
    assert actual.seen == ["method pre-hook", "load pre-hook"] and model.seen == []


# --- modules with their own copy protocol -----------------------------------------

class OwnDeepcopy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def __deepcopy__(self, memo):
        replica = OwnDeepcopy()
        replica.linear = copy.deepcopy(self.linear, memo)
        replica.made_by = "own __deepcopy__"
        memo[id(self)] = replica
        return replica


class DropsCache(nn.Module):
    """Its state is not a dict: deepcopy copies it whole and hands it to __setstate__."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.cache = torch.randn(3)

    def __getstate__(self):
        state = super().__getstate__()
        state["cache"] = None
        return state, "format 2"

    def __setstate__(self, state):
        attributes, version = state
        super().__setstate__(attributes)
        self.version = version


class Restores(nn.Module):
    """deepcopy restores a module through __setstate__, which may do more than update __dict__."""

    def __setstate__(self, state):
        super().__setstate__(state)
        self.restored = True


class OwnReduceEx(nn.Module):
    def __reduce_ex__(self, protocol):
        return (_made_by, ("own __reduce_ex__",))


class OwnReduce(nn.Module):
    def __reduce__(self):
        return (_made_by, ("own __reduce__",))


def _made_by(how):
    module = nn.Module()
    module.made_by = how
    return module


class NewArgs(nn.Module):
    def __new__(cls, *args):
        module = super().__new__(cls)
        if args:  # only in the copy: the original's state would overwrite it
            module.__dict__["made_by"] = args
        return module

    def __getnewargs__(self):
        return ("__getnewargs__",)


class ListModule(nn.Module, list):
    """deepcopy's reduce also copies the list's items."""


class Forwarding(nn.Module):
    """Attribute lookup falls back to a wrapped object, which has a __deepcopy__."""

    def __init__(self):
        super().__init__()
        self.inner = _Inner()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["inner"], name)


class _Inner:
    def __deepcopy__(self, memo):
        return _made_by("the wrapped object's __deepcopy__")


class Intercepting(nn.Module):
    def __getattribute__(self, name):
        if name == "__deepcopy__":
            return lambda memo: _made_by("__getattribute__")
        return super().__getattribute__(name)


class InDispatchTable(nn.Module):
    pass


class InDeepcopyDispatch(nn.Module):
    pass


def _instance_deepcopy():
    module = nn.Module()
    module.__deepcopy__ = lambda memo: _made_by("instance __deepcopy__")
    return module


def _child_named_deepcopy():
    class ReturnsMarker(nn.Module):
        def forward(self, memo):
            return _made_by("child named __deepcopy__")

    module = nn.Module()
    module.add_module("__deepcopy__", ReturnsMarker())
    return module


def _list_module():
    module = ListModule()
    module.extend([torch.randn(2), "item"])
    return module


@pytest.fixture
def registered_reducers():
    copyreg.pickle(InDispatchTable, lambda module: (_made_by, ("copyreg.dispatch_table",)))
    copy._deepcopy_dispatch[InDeepcopyDispatch] = lambda module, memo: _made_by("copy._deepcopy_dispatch")
    yield
    del copyreg.dispatch_table[InDispatchTable]
    del copy._deepcopy_dispatch[InDeepcopyDispatch]


CUSTOM = {
    "own_deepcopy": (OwnDeepcopy, "own __deepcopy__"),
    "own_reduce_ex": (OwnReduceEx, "own __reduce_ex__"),
    "own_reduce": (OwnReduce, "own __reduce__"),
    "getnewargs": (NewArgs, ("__getnewargs__",)),
    "forwarding_getattr": (Forwarding, "the wrapped object's __deepcopy__"),
    "getattribute": (Intercepting, "__getattribute__"),
    "copyreg_dispatch_table": (InDispatchTable, "copyreg.dispatch_table"),
    "deepcopy_dispatch": (InDeepcopyDispatch, "copy._deepcopy_dispatch"),
    "instance_deepcopy": (_instance_deepcopy, "instance __deepcopy__"),
    "child_named_deepcopy": (_child_named_deepcopy, "child named __deepcopy__"),
}


@pytest.mark.usefixtures("registered_reducers")
@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_modules_with_their_own_copy_protocol_are_copied_by_it(name):
    make, marker = CUSTOM[name]
    model = nn.Sequential(nn.Linear(2, 2), make())
    expected, actual = copies(model)
    assert getattr(expected[1], "made_by", None) == marker
    assert getattr(actual[1], "made_by", None) == marker
    assert_same_copy(model, expected, actual)


def test_getstate_setstate_overrides_and_list_items_are_honored():
    model = nn.Sequential(DropsCache(), _list_module(), Restores())
    expected, actual = copies(model)
    assert_same_copy(model, expected, actual)
    assert actual[0].cache is None and model[0].cache is not None and actual[0].version == "format 2"
    assert actual[2].restored and not hasattr(model[2], "restored")
    assert len(actual[1]) == 2 and actual[1][1] == "item" and torch.equal(actual[1][0], model[1][0])


def test_class_changed_between_copies_is_seen():
    class Later(nn.Module):
        pass

    model = nn.Sequential(Later())
    assert not hasattr(copy_module(model)[0], "made_by")
    Later.__deepcopy__ = lambda self, memo: _made_by("added later")
    assert copy_module(model)[0].made_by == "added later"


def test_uncopyable_attribute_raises_what_deepcopy_raises():
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].generator = (i for i in range(3))
    with pytest.raises(TypeError, match="cannot pickle 'generator' object"):
        copy.deepcopy(model)
    with pytest.raises(TypeError, match="cannot pickle 'generator' object"):
        copy_module(model)


# --- the memo ----------------------------------------------------------------------

def test_memo_seeded_with_replacements():
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(4)
    model = nn.Module()
    model.body = nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.Conv2d(4, 4, 1), bn, nn.Conv2d(4, 2, 1)).eval()
    original_weight = model.body[4].weight
    model.extra = [original_weight, bn]  # the seeded objects outside the module tree too
    model.dropped = nn.Conv2d(4, 4, 1)
    replacement_bn = nn.Identity()
    replacement_weight = nn.Parameter(torch.randn(2, 4, 1, 1))

    def make_memo():
        return {id(bn): replacement_bn, id(original_weight): replacement_weight, id(model.dropped): None}

    expected, actual = copies(model, make_memo)
    assert_same_copy(model, expected, actual, make_memo())
    assert_sharing_mirrors_original(model, expected, actual, make_memo())
    assert actual.body[1] is replacement_bn and actual.body[3] is replacement_bn and actual.extra[1] is replacement_bn
    assert actual.body[4].weight is replacement_weight and actual.extra[0] is replacement_weight
    assert actual._modules["dropped"] is None  # a memo value may be None
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert_bitwise_equal(actual.body(x), expected.body(x))


def test_memo_is_filled_as_deepcopy_fills_it():
    """The memo maps each copied original to its copy and keeps the originals
    alive (memo[id(memo)]), so it can seed a later copy that must share with
    this one even after the model is gone."""
    torch.manual_seed(6)
    shared = nn.Linear(3, 3)
    first = nn.Sequential(shared, nn.ReLU())
    memo: dict = {}
    copied_first = copy_module(first, memo)
    assert memo[id(first)] is copied_first and memo[id(shared)] is copied_first[0]
    kept = {id(obj) for obj in memo[id(memo)]}
    assert set(memo) - {id(memo)} <= kept
    reference_memo: dict = {}
    copy.deepcopy(first, reference_memo)
    assert set(reference_memo) - {id(reference_memo)} <= {id(obj) for obj in reference_memo[id(reference_memo)]}

    del first  # kept alive by the memo: the next model cannot take its id and be "found" there
    second = nn.Sequential(shared, nn.Tanh())
    copied_second = copy_module(second, memo)
    assert copied_second is not copied_first and isinstance(copied_second[1], nn.Tanh)
    assert copied_second[0] is copied_first[0]
