"""The block registry: users' own converters, lookup rules, and merges inside fuse."""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import logging
import re
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import fusedconv
from fusedconv import blocks, registry
from fusedconv.reparam import Reparameterization, bn_affine, conv_branch
from utils import float64_reference, randomize_batchnorm_stats, relative_error


class MyBlock(nn.Module):
    """A user's RepVGG-like block, unknown to fusedconv until registered."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.conv3x3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3x3 = nn.BatchNorm2d(channels)
        self.conv1x1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1x1 = nn.BatchNorm2d(channels)
        self.deployed = None

    def forward(self, x):
        if self.deployed is not None:
            return torch.relu(self.deployed(x))
        return torch.relu(self.bn3x3(self.conv3x3(x)) + self.bn1x1(self.conv1x1(x)))


def merge_my_block(block, name):
    """The README's example converter."""
    def install(conv):
        del block.conv3x3, block.bn3x3, block.conv1x1, block.bn1x1
        block.deployed = conv

    return Reparameterization(name, block.conv3x3, install, after=bn_affine(block.bn3x3),
                              branches=[conv_branch(block.conv1x1, block.bn1x1)])


@pytest.fixture
def my_block_registered():
    fusedconv.register_block(MyBlock)(merge_my_block)
    yield
    registry._CONVERTERS.pop(MyBlock)


def model_with_blocks() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        MyBlock(), blocks.RepVGGBlock(6, 6, 3, activation=nn.ReLU()), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4),
    )
    return randomize_batchnorm_stats(model, torch.Generator().manual_seed(0)).eval()


def test_registered_block_merges_with_the_rest_in_one_plan(my_block_registered):
    model = model_with_blocks()
    x = torch.randn(2, 3, 10, 10)
    plan = fusedconv.plan(model)
    assert plan.merges == ["3", "4"] and plan.num_folded == 2 and not plan.skipped
    fused = fusedconv.fuse(model)
    assert fusedconv.count_batchnorms(fused) == 0
    assert isinstance(fused[3].deployed, nn.Conv2d) and not hasattr(fused[3], "bn3x3")
    assert fused[4].deployed
    reference = float64_reference(model, (x,))
    with torch.no_grad():
        unfused, folded = relative_error(model(x), reference), relative_error(fused(x), reference)
    # Merging adds one rounding per weight to an already tiny float32 error (see test_traps.FLOOR).
    assert folded <= 4 * unfused + 4 * torch.finfo(torch.float32).eps, (folded, unfused)


def test_unregistered_block_is_left_to_the_bn_planner():
    model = model_with_blocks()
    plan = fusedconv.plan(model)
    assert plan.merges == ["4"]  # only fusedconv's own block is merged
    # MyBlock's two conv -> BN pairs still fold, as pairs; its branches stay.
    assert {(f.layer, f.after) for f in plan.folds} >= {("3.conv3x3", ("3.bn3x3",)), ("3.conv1x1", ("3.bn1x1",))}
    assert not plan.skipped


def test_lookup_is_by_exact_class(my_block_registered):
    class Derived(MyBlock):
        def forward(self, x):  # may use its branches differently
            return super().forward(x) * 2

    assert registry.converter_for(MyBlock()) is merge_my_block
    assert registry.converter_for(Derived()) is None


def test_register_block_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        fusedconv.register_block(int, merge_my_block)


def test_blocks_inside_blocks_are_the_outer_converters_business(my_block_registered):
    outer = nn.Sequential(MyBlock())
    fusedconv.register_block(nn.Sequential, lambda block, name: [])
    try:
        assert [name for name, _, _ in registry.find_blocks(nn.Sequential(outer))] == [""]
    finally:
        registry._CONVERTERS.pop(nn.Sequential)


def test_failed_merge_leaves_model_unchanged(my_block_registered):
    model = model_with_blocks()
    with torch.no_grad():
        model[4].identity.running_var[0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    for call in (lambda m: fusedconv.fuse(m, inplace=True), fusedconv.reparameterize):
        with pytest.raises(fusedconv.FoldError, match="running_var is not finite"):
            call(model)
        torch.testing.assert_close(dict(model.state_dict()), dict(before), rtol=0, atol=0, equal_nan=True)
        assert model[3].deployed is None and not model[4].deployed


def test_training_mode_block_is_refused(my_block_registered):
    model = model_with_blocks()
    model[3].train()
    with pytest.raises(fusedconv.FoldError, match=r"^3 \(MyBlock\) is in training mode"):
        fusedconv.reparameterize(model)


def _fake_zoo_module(monkeypatch, name: str, **classes) -> types.ModuleType:
    """A module ``name`` defining ``classes``, in sys.modules for this test only."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for qualname, cls in classes.items():
        setattr(module, qualname, cls)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_converters_registered_by_name_take_effect_once_their_module_is_imported(monkeypatch, caplog):
    """A zoo's converter is registered by its class's name, importing nothing; it
    takes effect at the first lookup after the module is imported (not while
    the module is still being imported, nor while it is blocked), a class the
    module does not define gets nothing with a warning, a later registration
    by name replaces an earlier one, and a converter registered for the class
    itself wins whatever the order."""
    monkeypatch.setattr(registry, "_BY_NAME", {})
    monkeypatch.setattr(registry, "_REGISTERED_BY_NAME", set())
    monkeypatch.setattr(registry, "_CONVERTERS", dict(registry._CONVERTERS))

    class ZooBlock(MyBlock):
        pass

    class OtherBlock(MyBlock):
        pass

    def mine(block, name):
        return merge_my_block(block, name)

    def later(block, name):
        return merge_my_block(block, name)

    registry.register_block_by_name("fake_zoo.blocks", "ZooBlock", merge_my_block)
    registry.register_block_by_name("fake_zoo.blocks", "Missing", merge_my_block)
    registry.register_block_by_name("fake_zoo.blocks", "OtherBlock", merge_my_block)
    registry.register_block(OtherBlock, mine)
    assert "fake_zoo.blocks" not in sys.modules
    assert registry.converter_for(ZooBlock()) is None  # not imported: not its class yet
    monkeypatch.setitem(sys.modules, "fake_zoo.blocks", None)  # an import blocked: nothing to look at
    assert registry.converter_for(ZooBlock()) is None and "fake_zoo.blocks" in registry._BY_NAME
    module = _fake_zoo_module(monkeypatch, "fake_zoo.blocks", ZooBlock=ZooBlock, OtherBlock=OtherBlock)
    module.__spec__._initializing = True  # importlib's mark while the module's code runs
    assert registry.converter_for(ZooBlock()) is None and "fake_zoo.blocks" in registry._BY_NAME
    module.__spec__._initializing = False
    with caplog.at_level(logging.WARNING, logger="fusedconv"):
        assert registry.converter_for(ZooBlock()) is merge_my_block
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["fake_zoo.blocks has no module class Missing"]
    assert registry.converter_for(OtherBlock()) is mine
    assert registry._BY_NAME == {}  # the missing class is dropped, not looked up again at every fold
    registry.register_block_by_name("fake_zoo.blocks", "ZooBlock", later)
    registry.register_block_by_name("fake_zoo.blocks", "OtherBlock", later)
    assert registry.converter_for(ZooBlock()) is later  # the later registration by name
    assert registry.converter_for(OtherBlock()) is mine  # register_block's, registered before it
    registry.register_block(ZooBlock, mine)
    assert registry.converter_for(ZooBlock()) is mine
    model = nn.Sequential(ZooBlock(), nn.ReLU()).eval()
    assert fusedconv.plan(model).merges == ["0"]


def _look_up_after(start, errors: list) -> None:
    """A converter lookup once ``start`` lets every thread go; what it raised goes to ``errors``."""
    start.wait()
    try:
        registry.converter_for(nn.Identity())
    except (KeyError, RuntimeError) as exc:  # the race raised KeyError, or "dictionary changed size"
        errors.append(exc)


def test_two_threads_register_the_converters_by_name_once(monkeypatch):
    """Two first lookups at once, on two threads, register each converter once
    and neither raises (the threads switched as often as the interpreter can)."""
    import threading

    monkeypatch.setattr(registry, "_REGISTERED_BY_NAME", set())
    monkeypatch.setattr(registry, "_CONVERTERS", dict(registry._CONVERTERS))
    classes = {f"Block{i}": type(f"Block{i}", (MyBlock,), {}) for i in range(5)}
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for round_ in range(10):
            monkeypatch.setattr(registry, "_BY_NAME", {})
            for zoo_module in range(50):
                name = f"fake_zoo.round{round_}_{zoo_module}"
                for qualname in classes:
                    registry.register_block_by_name(name, qualname, merge_my_block)
                _fake_zoo_module(monkeypatch, name, **classes)
            start, errors = threading.Barrier(2), []
            threads = [threading.Thread(target=_look_up_after, args=(start, errors)) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == [] and registry._BY_NAME == {}
            assert all(registry._CONVERTERS[cls] is merge_my_block for cls in classes.values())
    finally:
        sys.setswitchinterval(switch_interval)


def test_fusedconv_imports_no_model_zoo():
    """Importing fusedconv loads its zoo converters but none of the zoos."""
    code = "import sys, fusedconv; print(sorted(m for m in ('timm', 'ultralytics') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]"]


@pytest.mark.parametrize("zoo", ["timm", "ultralytics"])
def test_every_zoo_converter_names_a_class_of_the_installed_zoo(zoo):
    """Each built-in converter's (module, class), and each class a converter
    tells a block's parts apart by, names a module class of the installed
    package, and the converters are registered once it is imported: a misspelt
    name would leave its blocks unmerged. timm's newer models (some pairs) may
    be missing from an older timm."""
    pytest.importorskip(zoo)
    converters = importlib.import_module(f"fusedconv.thirdparty.{zoo}")
    for module, qualname in converters.CLASSES_ASKED_ABOUT:
        importlib.import_module(module)
        assert registry.imported_class(module, qualname) is not None, f"{module}.{qualname}"
    optional = getattr(converters, "PAIR_BLOCKS", ())
    for module, qualname, converter in (*converters.BLOCKS, *optional):
        if (module, qualname, converter) in optional and importlib.util.find_spec(module) is None:
            continue
        importlib.import_module(module)
        cls = registry.imported_class(module, qualname)
        assert cls is not None and issubclass(cls, nn.Module), f"{module}.{qualname}"
        registry.converter_for(nn.Identity())  # registers what is imported
        assert registry._CONVERTERS.get(cls) is converter, f"{module}.{qualname}"


def _readme_register_block_example() -> str:
    """The README's ``register_block`` example, verbatim."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"<!-- register-block-example -->\s*```python\n(.*?)```\s*<!-- /register-block-example -->",
                      readme, re.DOTALL)
    assert match, "README.md has no register-block example between its markers"
    return match.group(1)


def test_readme_register_block_example_leaves_no_batchnorm():
    namespace: dict = {}
    exec(compile(_readme_register_block_example(), "README.md (register_block example)", "exec"), namespace)
    block_class = namespace["MyBlock"]
    try:
        model = nn.Sequential(block_class(6), nn.Conv2d(6, 6, 1), block_class(6))
        model = randomize_batchnorm_stats(model, torch.Generator().manual_seed(1)).eval()
        x = torch.randn(2, 6, 9, 9)
        plan = fusedconv.plan(model)
        assert plan.merges == ["0", "2"] and not plan.skipped
        fused = fusedconv.fuse(model)
        # what the plan says is what the model holds: no BN left, no stale branch in the state dict
        assert fusedconv.count_batchnorms(fused) == 0
        assert sorted(fused.state_dict()) == ["0.deployed.bias", "0.deployed.weight", "1.bias", "1.weight",
                                              "2.deployed.bias", "2.deployed.weight"]
        reference = float64_reference(model, (x,))
        with torch.no_grad():
            unfused, folded = relative_error(model(x), reference), relative_error(fused(x), reference)
            assert folded <= 4 * unfused + 4 * torch.finfo(torch.float32).eps, (folded, unfused)
            # fusing the fused model again changes nothing
            again = fusedconv.fuse(fused)
            assert torch.equal(again(x), fused(x))
        assert sorted(again.state_dict()) == sorted(fused.state_dict())
    finally:
        registry._CONVERTERS.pop(block_class, None)


def test_index_lists_each_blocks_modules_as_a_walk_of_the_block_would(my_block_registered, each_module_walk):
    """The index cuts each block's modules from its one walk of the model; they
    must be what walking the block gives, in its order, with a module that is
    also registered outside (first there, and twice inside), a block
    registered at two paths, and the model itself as the block."""
    from fusedconv.model_index import ModelIndex
    from fusedconv.walking import submodules

    shared_act = nn.ReLU()
    first, second = MyBlock(), MyBlock()
    second.act, second.again = shared_act, shared_act  # registered twice inside, once before the block
    model = nn.Sequential(shared_act, first, nn.Conv2d(6, 6, 1), second, first).eval()
    index = ModelIndex(model)
    assert set(index.members) == {"1", "3"}
    for name in index.members:
        assert [id(m) for m in index.members[name]] == [id(m) for m in submodules(model.get_submodule(name))]
    root = MyBlock().eval()
    assert [id(m) for m in ModelIndex(root).members[""]] == [id(m) for m in submodules(root)]
    nested = ModelIndex(model, blocks={"": model, "3": second}).members  # a caller's blocks, one inside another
    assert [id(m) for m in nested["3"]] == [id(m) for m in submodules(second)]


def test_index_finds_the_modules_outside_blocks_as_the_prefix_rule_says(my_block_registered, each_module_walk):
    """``ModelIndex.outside`` (one pass in walk order) must list exactly the
    modules whose first path starts with no block's ``path + "."``: blocks
    found, caller-given blocks nested in each other or named by a second path,
    and the model itself as a block."""
    from fusedconv.model_index import ModelIndex

    shared_act = nn.ReLU()
    first, second = MyBlock(), MyBlock()
    second.act = shared_act
    inner = nn.Sequential(nn.Conv2d(6, 6, 1), second)
    model = nn.Sequential(shared_act, first, nn.Conv2d(6, 6, 1), inner, first, nn.BatchNorm2d(6)).eval()

    def by_prefix(index):
        prefixes = tuple(f"{name}." if name else "" for name in index.blocks)
        return [path for path, _ in index.modules if not (prefixes and path.startswith(prefixes))]

    for blocks in (None, {"3": inner, "3.1": second}, {"4": first}, {"1": first, "3.1": second}, {}, {"": model}):
        index = ModelIndex(model, blocks=blocks)
        assert [path for path, _ in index.outside] == by_prefix(index), blocks
    assert [path for path, _ in ModelIndex(model).outside] == ["", "0", "1", "2", "3", "3.0", "3.1", "5"]


def _model_with_odd_registrations() -> nn.Module:
    """Duplicates at several depths, a None child, a block registered twice and
    one whose Conv is also registered outside it (entangled: its insides are
    outside again)."""
    shared_conv = nn.Conv2d(6, 6, 1)
    block, tied = blocks.RepVGGBlock(6, 6, 3), blocks.RepVGGBlock(6, 6, 3)
    tied.pointwise.conv = shared_conv
    inner = nn.Sequential(nn.ReLU(), block)
    inner.add_module("gone", None)
    model = nn.Sequential(nn.Conv2d(6, 6, 3), inner, block, tied, shared_conv, nn.Sequential(inner, nn.BatchNorm2d(6)))
    return model.eval()


@pytest.mark.parametrize("build", [
    _model_with_odd_registrations,
    model_with_blocks,  # a block found and none entangled: ``outside`` is the walk's own
    lambda: __import__("torchvision").models.resnet18().eval(),
    lambda: blocks.RepVGGBlock(6, 6, 3).eval(),
], ids=["odd registrations", "blocks", "resnet18", "model is a block"])
def test_index_walk_is_named_modules(build, each_module_walk):
    """The index's one walk must give every path ``named_modules`` gives, in its
    order, the first path of each module, each block's modules as walking the
    block gives them, and as outside exactly the modules the prefix rule puts
    there (an entangled block's insides included)."""
    from fusedconv.model_index import ModelIndex, _outside_blocks
    from fusedconv.walking import submodules

    model = build()
    index = ModelIndex(model)
    if build is model_with_blocks:  # the walk's own ``outside`` is the one checked below
        assert index.blocks and not index.entangled
    every = list(model.named_modules(remove_duplicate=False))
    assert [(path, id(m)) for path, m in index.by_path.items()] == [(path, id(m)) for path, m in every]
    assert [(path, id(m)) for path, m in index.modules] == [(path, id(m)) for path, m in model.named_modules()]
    assert {key: paths for key, paths in index.paths.items()} == {
        id(m): [path for path, other in every if other is m] for _, m in model.named_modules()}
    for name, inner in index.members.items():
        assert [id(m) for m in inner] == [id(m) for m in submodules(model.get_submodule(name))]
    assert [(path, id(m)) for path, m in index.outside] == \
        [(path, id(m)) for path, m in _outside_blocks(index.modules, index.blocks)]


def test_index_refolds_an_entangled_blocks_insides(each_module_walk):
    """The walk sets a found block's modules apart; once the block turns out
    entangled, its BNs are outside again, for the ordinary rules."""
    from fusedconv.model_index import ModelIndex

    model = _model_with_odd_registrations()
    index = ModelIndex(model)
    assert "3" in index.entangled and "3" not in index.blocks
    assert "3.pointwise.bn" in index.batchnorms and "3.dense.0.conv" in index.layers


def _hook_reading_its_block(module, inputs, output):
    return output + 0 * module.identity.weight.sum()


def _register_outside(model, block):
    model.add_module("alias", block.pointwise.conv)  # also run by the Sequential, after the block


def _tie_outside(model, block):
    tied = nn.Conv2d(6, 6, 1)
    tied.weight = block.pointwise.conv.weight
    model.add_module("tied", tied)


def _hold_outside(model, block):
    model[2].kept = [block.pointwise.conv]  # an attribute of the shared activation


@pytest.mark.parametrize("entangle, why", [
    (lambda model, block: block.register_forward_hook(_hook_reading_its_block),
     "a forward hook that is called with the block"),
    (lambda model, block: block.dense[0].bn.register_forward_hook(lambda m, i, o: None),
     "its BatchNorm2d has forward hooks"),
    (_register_outside, r"its Conv2d is also registered at 'alias'"),
    (_tie_outside, "shares memory with another tensor"),
    (_hold_outside, "also reachable from an attribute, hook or class of 2"),
    (lambda model, block: None, None),  # its activation also runs outside it: only read, no entanglement
], ids=["hook on the block", "hook inside", "conv registered outside", "weight tied outside",
        "conv held outside", "activation shared"])
def test_each_reason_that_entangles_a_block(entangle, why):
    """The index looks into a block only when one of its modules is hooked,
    registered twice, held from elsewhere or sharing memory; each such reason
    must still keep the block from merging (``reparameterize`` names it, ``fuse``
    folds around it exactly), and a module registered twice that is no layer
    must not."""
    from fusedconv.model_index import ModelIndex

    act = nn.ReLU()
    block = blocks.RepVGGBlock(6, 6, 3, activation=act)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), act, block)
    entangle(model, block)
    model = randomize_batchnorm_stats(model, torch.Generator().manual_seed(5)).eval()
    index = ModelIndex(model)
    if why is None:
        assert not index.entangled and "3" in index.blocks
    else:
        assert "3" not in index.blocks
        assert re.search(why, index.entangled["3"]), index.entangled
        with pytest.raises(fusedconv.FoldError, match="^3: "):
            fusedconv.reparameterize(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    reference = float64_reference(model, (x,))
    fused = fusedconv.fuse(model)
    with torch.no_grad():
        unfused, folded = relative_error(model(x), reference), relative_error(fused(x), reference)
    assert folded <= 4 * unfused + 4 * torch.finfo(torch.float32).eps, (folded, unfused)
    assert (fusedconv.plan(model).merges == ["3"]) == (why is None)


class _StatsByProperty(nn.Module):
    """Running statistics reached in three ways other than a registered buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("stored_mean", torch.randn(4))
        self.running_var = torch.rand(4) + 0.5  # plain tensor attribute: __dict__, not _buffers

    @property
    def running_mean(self):
        return self.stored_mean


class _InstanceOnly:
    """A descriptor that answers for instances only, as many caching ones do."""

    def __get__(self, obj, cls=None):
        if obj is None:
            raise AttributeError("read it from an instance")
        return obj.stored_var


class _StatsByDescriptor(nn.Module):
    running_var = _InstanceOnly()

    def __init__(self):
        super().__init__()
        self.register_buffer("running_mean", torch.randn(4))
        self.register_buffer("stored_var", torch.rand(4) + 0.5)


class _StatsByGetattr(nn.Module):
    def __getattr__(self, name):
        if name in ("running_mean", "running_var"):
            return torch.ones(3)
        return super().__getattr__(name)


def test_statistics_are_found_wherever_attribute_lookup_finds_them():
    """The fast answer for a name registered nowhere must not hide a property,
    a plain attribute or a ``__getattr__`` that serves it."""
    from fusedconv.layers import has_running_stats

    assert has_running_stats(_StatsByProperty())
    assert has_running_stats(_StatsByGetattr())
    assert has_running_stats(_StatsByDescriptor())
    assert not has_running_stats(nn.Conv2d(3, 3, 1))
    assert has_running_stats(nn.BatchNorm2d(3))


def test_batchnorm_of_a_merged_block_used_outside_it_is_reported_left():
    """A BN registered inside a merged block and at a path outside it stays in
    the model (the merge ends only the block's use): the plan lists it as left,
    and the outputs do not change."""
    block = blocks.RepVGGBlock(6, 6, 3, activation=nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), block, block.identity)
    randomize_batchnorm_stats(model, torch.Generator().manual_seed(3)).eval()
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(4))
    reference = float64_reference(model, (x,))
    plan = fusedconv.plan(model)
    assert [s.module for s in plan.skipped] == ["2"] and "inside the block 1" in plan.skipped[0].reason
    fused = fusedconv.fuse(model)
    assert fusedconv.count_batchnorms(fused) == 1 and isinstance(fused[2], nn.BatchNorm2d)
    with torch.no_grad():
        assert relative_error(fused(x), reference) <= max(2 * relative_error(model(x), reference), 1e-6)


class _InputStatistics(nn.Module):
    """Running statistics of what passes through, kept for monitoring: named like a
    BN's, but no BatchNorm (no eps, no normalising)."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.register_buffer("running_mean", torch.randn(channels))
        self.register_buffer("running_var", torch.rand(channels) + 0.5)

    def forward(self, x):
        return x


def test_a_block_holding_statistics_that_are_no_batchnorm_merges(my_block_registered):
    """The planner computes the affine maps of a block's BNs together before the
    converters run; a module with BN-like statistics that is no BatchNorm must
    not be taken for one (it has no eps: reading it as a BN raised)."""
    model = model_with_blocks()
    model[3].monitor = _InputStatistics()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fused = fusedconv.fuse(model)
    assert fusedconv.count_batchnorms(fused) == 0
    reference = float64_reference(model, (x,))
    with torch.no_grad():
        unfused, folded = relative_error(model(x), reference), relative_error(fused(x), reference)
    assert folded <= 4 * unfused + 4 * torch.finfo(torch.float32).eps, (folded, unfused)


def test_a_batchnorm_no_converter_reads_does_not_stop_the_merge():
    """The planner computes a block's BN affine maps together before the
    converters run, as a shortcut only: a spare BN whose tensors do not fit
    together (which the merge never reads) must neither raise nor change the
    outputs; the BNs the merge reads are still checked, naming the BN."""
    model = nn.Sequential(blocks.RepVGGBlock(6, 6, 3, activation=nn.ReLU()), nn.ReLU())
    model = randomize_batchnorm_stats(model, torch.Generator().manual_seed(2)).eval()
    model[0].spare = nn.BatchNorm2d(6).eval()
    model[0].spare.weight = nn.Parameter(torch.ones(3))  # 3 gammas for 6 channels
    x = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(3))
    fused = fusedconv.fuse(model)
    assert fusedconv.plan(model).merges == ["0"]
    reference = float64_reference(model, (x,))
    with torch.no_grad():
        unfused, folded = relative_error(model(x), reference), relative_error(fused(x), reference)
    assert folded <= 4 * unfused + 4 * torch.finfo(torch.float32).eps, (folded, unfused)
    model[0].pointwise.bn.running_var[0] = float("nan")  # a BN the merge reads: its own error, by name
    with pytest.raises(fusedconv.FoldError, match=r"0.*running_var is not finite"):
        fusedconv.fuse(model)


@pytest.mark.parametrize("make, inner", [
    (lambda: blocks.RepVGGBlock(4, 4, 3, activation=nn.ReLU()), "dense.0.bn"),
    (lambda: blocks.OREPABlock(4, 4, 3), "bn"),
    (lambda: blocks.DiverseBranchBlock(4, 4, 3), "expand.bn_pad.bn"),
], ids=["repvgg", "orepa", "dbb"])
def test_a_batchnorm_in_training_mode_inside_an_eval_block_is_refused(make, inner):
    """A BN in training mode normalises with batch statistics; a merge made from
    its running ones would change the outputs. As for a lone BN, that is an
    error naming it, and the model stays as it was."""
    model = randomize_batchnorm_stats(nn.Sequential(make(), nn.ReLU()), torch.Generator().manual_seed(3)).eval()
    model[0].get_submodule(inner).train()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    for fold in (fusedconv.fuse, lambda m: fusedconv.fuse(m, inplace=True), fusedconv.reparameterize):
        with pytest.raises(fusedconv.FoldError, match=rf"^0\.{inner} \(BatchNorm2d\) is in training mode"):
            fold(model)
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
        assert model[0].get_submodule(inner).training
