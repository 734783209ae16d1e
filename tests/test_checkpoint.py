"""Folding checkpoints (issue 12, items 2, 3 and 5): ``fold_state_dict``,
``fold_checkpoint``, ``load_folded`` and ``fusedconv fuse``.

Every folded state dict is compared, bit for bit and key order included, with
``fusedconv.fuse(model).state_dict()`` of the same model built with the same
values: the checkpoint path must compute exactly what the model path computes.
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from torch import nn

import fusedconv
from fusedconv import cli
from fusedconv.blocks import RepVGGBlock
from fusedconv.examples import DemoNet, build_demo_network
from utils import assert_structure_takes_the_fold, randomize_batchnorm_stats

pytestmark = pytest.mark.usefixtures("fixed_seed")  # tests/conftest.py

# (package, builder name): torchvision and timm models, blocks included (timm's
# RepVGG and MobileOne merge through their converters).
REAL_MODELS = [("torchvision", "resnet18"), ("torchvision", "mobilenet_v3_small"),
               ("torchvision", "efficientnet_b0"), ("timm", "repvgg_a0"), ("timm", "mobileone_s0")]


def _builder(package: str, name: str):
    module = pytest.importorskip(package)
    if package == "timm":
        return lambda: module.create_model(name)
    return getattr(module.models, name)


def _real_and_meta(build, seed: int = 1):
    real = randomize_batchnorm_stats(build(), torch.Generator().manual_seed(seed)).eval()
    with torch.device("meta"):
        architecture = build()
    return real, architecture


def assert_same_state(folded: dict, expected: dict) -> None:
    assert list(folded) == list(expected)
    different = [key for key in expected if not (folded[key].dtype == expected[key].dtype
                                                 and torch.equal(folded[key], expected[key]))]
    assert not different, different[:5]


def _save(state_dict: dict, path) -> str:
    if str(path).endswith(".safetensors"):
        safetensors = pytest.importorskip("safetensors.torch")
        safetensors.save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    return str(path)


def small_model() -> nn.Module:
    """BN after convs, a BN before a conv, a merged block and a BN left unfolded."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        RepVGGBlock(8, 8, 3),
        nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1),  # a 1x1 conv pads nothing: the BN before it folds
        nn.ConvTranspose2d(6, 4, 2, stride=2, bias=False), nn.BatchNorm2d(4),
        nn.ReLU(), nn.BatchNorm2d(4),  # after an activation: left
    )


# --------------------------------------------------------------------------- fold_state_dict


@pytest.mark.parametrize("source", ["dict", ".pt", ".safetensors"])
@pytest.mark.parametrize("package,name", REAL_MODELS)
def test_fold_state_dict_is_the_fuse_of_the_model(package, name, source, tmp_path):
    real, architecture = _real_and_meta(_builder(package, name))
    expected = fusedconv.fuse(real).state_dict()
    state_dict = real.state_dict()
    given = state_dict if source == "dict" else _save(state_dict, tmp_path / f"model{source}")
    assert_same_state(fusedconv.fold_state_dict(architecture, given), expected)
    assert all(t.is_meta for t in architecture.state_dict().values())  # the architecture is not modified


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_checkpoint_dtype_is_folded_in_it(dtype):
    """A float32 architecture and a checkpoint in another dtype: the fold is the one
    of the model in the checkpoint's dtype."""
    real = randomize_batchnorm_stats(small_model(), torch.Generator().manual_seed(2)).eval().to(dtype)
    expected = fusedconv.fuse(real).state_dict()
    folded = fusedconv.fold_state_dict(small_model(), real.state_dict())
    assert_same_state(folded, expected)


def test_inputs_are_left_as_they_were():
    real = randomize_batchnorm_stats(small_model(), torch.Generator().manual_seed(3)).eval()
    architecture = small_model().train()  # any device and mode: only the structure is used
    before_arch = {k: v.clone() for k, v in architecture.state_dict().items()}
    state_dict = real.state_dict()
    before = {k: v.clone() for k, v in state_dict.items()}
    folded = fusedconv.fold_state_dict(architecture, state_dict)
    assert all(torch.equal(state_dict[k], before[k]) for k in before)
    assert all(torch.equal(architecture.state_dict()[k], before_arch[k]) for k in before_arch)
    assert architecture.training and fusedconv.count_batchnorms(architecture) == 7
    assert_same_state(folded, fusedconv.fuse(real).state_dict())
    # tensors the fold leaves alone are the input's own, not copies
    assert folded["9.running_var"] is state_dict["9.running_var"]


def test_several_batches_give_the_same_bits(monkeypatch):
    from fusedconv import checkpoint

    real = randomize_batchnorm_stats(DemoNet(), torch.Generator().manual_seed(4)).eval()
    expected = fusedconv.fuse(real).state_dict()
    monkeypatch.setattr(checkpoint, "_BATCH_BYTES", 1)  # one layer per batch
    assert_same_state(fusedconv.fold_state_dict(DemoNet(), real.state_dict()), expected)


def test_bad_statistics_raise_and_nothing_is_written(tmp_path):
    real = randomize_batchnorm_stats(small_model(), torch.Generator().manual_seed(5)).eval()
    state_dict = real.state_dict()
    state_dict["7.running_var"][2] = -0.5  # the BN after the ConvTranspose
    with pytest.raises(fusedconv.FoldError, match=r"7.*running_var.*negative|7: .*var"):
        fusedconv.fold_state_dict(small_model(), state_dict)
    source = _save(state_dict, tmp_path / "bad.pt")
    with pytest.raises(fusedconv.FoldError, match="7"):
        fusedconv.fold_checkpoint(small_model(), source, tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]  # no output, no partial file


def test_a_block_with_bad_statistics_names_the_block():
    real = randomize_batchnorm_stats(small_model(), torch.Generator().manual_seed(6)).eval()
    state_dict = real.state_dict()
    state_dict["3.dense.0.bn.running_var"][0] = float("nan")
    with pytest.raises(fusedconv.FoldError, match=r"^3"):
        fusedconv.fold_state_dict(small_model(), state_dict)


def test_keys_that_do_not_fit_are_named():
    state_dict = small_model().eval().state_dict()
    state_dict.pop("0.weight")
    state_dict["extra"] = torch.ones(1)
    state_dict["5.weight"] = torch.ones(6, 8, 3, 3)
    with pytest.raises(fusedconv.FoldError) as error:
        fusedconv.fold_state_dict(small_model(), state_dict)
    message = str(error.value)
    assert "1 missing keys (0.weight)" in message and "1 unexpected keys (extra)" in message
    assert "5.weight (6, 8, 3, 3) instead of (6, 8, 1, 1)" in message


def test_nested_checkpoints_are_found(tmp_path):
    real = randomize_batchnorm_stats(small_model(), torch.Generator().manual_seed(7)).eval()
    path = tmp_path / "train.pt"
    torch.save({"epoch": 3, "state_dict": real.state_dict(), "lr": 0.1}, path)
    assert_same_state(fusedconv.fold_state_dict(small_model(), path), fusedconv.fuse(real).state_dict())


class _Pickled:
    pass


def test_pickles_are_never_loaded_with_weights_only_false(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"weight": _Pickled()}, path)
    with pytest.raises(fusedconv.FoldError, match="weights_only=True.*refuses it.*_Pickled.*never"):
        fusedconv.fold_state_dict(small_model(), path)
    not_a_state_dict = tmp_path / "counter.pt"
    torch.save(collections.Counter(a=1), not_a_state_dict)
    with pytest.raises(fusedconv.FoldError, match="not a state dict"):
        fusedconv.fold_state_dict(small_model(), not_a_state_dict)
    with pytest.raises(fusedconv.FoldError, match="no such checkpoint"):
        fusedconv.fold_state_dict(small_model(), tmp_path / "missing.pt")


# --------------------------------------------------------------------------- files and round trips


@pytest.mark.parametrize("source_suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_fold_checkpoint_round_trip(suffix, source_suffix, tmp_path):
    real = randomize_batchnorm_stats(small_model(), torch.Generator().manual_seed(8)).eval()
    fused = fusedconv.fuse(real)
    source = _save(real.state_dict(), tmp_path / f"model{source_suffix}")
    out = tmp_path / f"folded{suffix}"
    report = fusedconv.fold_checkpoint(small_model(), source, out)
    assert report.plan.num_folded == 3 and report.plan.merges == ["3"] and len(report.skipped) == 1
    assert report.tensors == len(fused.state_dict())
    if suffix == ".safetensors":  # a file the safetensors package reads
        from safetensors.torch import load_file
        assert_same_state(load_file(str(out)), fused.state_dict())
    loaded = fusedconv.load_folded(small_model(), out)
    assert not loaded.training
    assert_same_state(loaded.state_dict(), fused.state_dict())
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))


@pytest.mark.parametrize("on_meta", [False, True])
def test_load_folded_of_a_saved_fuse(on_meta, tmp_path):
    real = randomize_batchnorm_stats(DemoNet(), torch.Generator().manual_seed(9)).eval()
    fused = fusedconv.fuse(real)
    torch.save(fused.state_dict(), tmp_path / "fused.pt")
    if on_meta:
        with torch.device("meta"):
            architecture = DemoNet()
    else:
        architecture = DemoNet()
    loaded = fusedconv.load_folded(architecture, tmp_path / "fused.pt")
    assert all(not t.is_meta for t in loaded.state_dict().values())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))
    with pytest.raises(fusedconv.FoldError, match="not a folded state dict.*missing keys"):
        fusedconv.load_folded(DemoNet(), real.state_dict())  # the unfolded one


def test_a_bad_destination_is_refused_before_any_work(tmp_path):
    with pytest.raises(fusedconv.FoldError, match=r"\.safetensors, \.pt or \.pth"):
        fusedconv.fold_checkpoint(small_model(), small_model().eval().state_dict(), tmp_path / "out.bin")


def test_file_pages_of_a_mapped_checkpoint_are_let_go(tmp_path):
    """Folding a .pt reads it through mmap; the pages of each tensor once used are
    given back, so resident file pages stay far below the file's size."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    layers = nn.Sequential(*[nn.Sequential(nn.Conv2d(128, 128, 3, bias=False), nn.BatchNorm2d(128))
                             for _ in range(40)])  # 23.6 MB of weights
    source = _save(layers.eval().state_dict(), tmp_path / "big.pt")
    size = os.path.getsize(source)
    peaks = []

    def resident_file_bytes(done, total):
        with open("/proc/self/status") as status:
            peaks.append(next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssFile")))

    start = []
    resident_file_bytes(0, 0)
    start.append(peaks.pop())
    with torch.device("meta"):
        architecture = nn.Sequential(*[nn.Sequential(nn.Conv2d(128, 128, 3, bias=False), nn.BatchNorm2d(128))
                                       for _ in range(40)])
    from fusedconv import checkpoint
    old = checkpoint._BATCH_BYTES
    checkpoint._BATCH_BYTES = 1 << 20
    try:
        fusedconv.fold_checkpoint(architecture, source, tmp_path / "out.safetensors", progress=resident_file_bytes)
    finally:
        checkpoint._BATCH_BYTES = old
    assert max(peaks) - start[0] < size / 2, (max(peaks) - start[0], size)


# --------------------------------------------------------------------------- meta structure of blocks


def test_blocks_fold_their_structure_on_meta():
    timm = pytest.importorskip("timm")
    for name in ("repvgg_a0", "mobileone_s0"):
        real, architecture = _real_and_meta(lambda: timm.create_model(name))
        structure = fusedconv.fuse(architecture.eval())
        assert_structure_takes_the_fold(structure, fusedconv.fuse(real), torch.randn(1, 3, 32, 32))


# --------------------------------------------------------------------------- regressions from review


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 3)
        self.b.weight = self.a.weight  # one weight, two layers: folding it into a would change b

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


def test_tied_weights_are_seen_on_meta():
    real = randomize_batchnorm_stats(_Tied(), torch.Generator().manual_seed(11)).eval()
    with torch.device("meta"):
        architecture = _Tied()
    assert fusedconv.plan(architecture.eval()).folds == fusedconv.plan(real).folds == []
    expected = fusedconv.fuse(real).state_dict()
    assert_same_state(fusedconv.fold_state_dict(architecture, real.state_dict()), expected)
    loaded = fusedconv.load_folded(architecture, expected)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), real(x))


def test_a_folded_file_can_be_saved_over_its_source(tmp_path):
    real = randomize_batchnorm_stats(small_model(), torch.Generator().manual_seed(12)).eval()
    path = _save(real.state_dict(), tmp_path / "model.pt")
    folded = fusedconv.fold_state_dict(small_model(), path)
    torch.save(folded, path)  # the passed-through tensors must not be views of the file being replaced
    assert_same_state(torch.load(path, weights_only=True), fusedconv.fuse(real).state_dict())


@pytest.mark.parametrize("block", ["DiverseBranchBlock", "OREPABlock"])
def test_blocks_with_non_persistent_buffers(block):
    from fusedconv import blocks

    def build():
        return nn.Sequential(getattr(blocks, block)(8, 8, 3)).eval()

    real = randomize_batchnorm_stats(build(), torch.Generator().manual_seed(13)).eval()
    assert_same_state(fusedconv.fold_state_dict(build(), real.state_dict()), fusedconv.fuse(real).state_dict())
    with torch.device("meta"):
        architecture = build()
    with pytest.raises(fusedconv.FoldError, match="identity: a non-persistent buffer.*build the architecture on the CPU"):
        fusedconv.fold_state_dict(architecture, real.state_dict())


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.tensor(2.5), persistent=False)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.scale


def test_load_folded_gives_non_persistent_buffers_their_values():
    real = randomize_batchnorm_stats(_Scaled(), torch.Generator().manual_seed(14)).eval()
    loaded = fusedconv.load_folded(_Scaled(), fusedconv.fuse(real).state_dict())
    assert loaded.scale.device.type == "cpu" and float(loaded.scale) == 2.5
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), real(x), rtol=1e-5, atol=1e-6)
    with torch.device("meta"):
        architecture = _Scaled()
    with pytest.raises(fusedconv.FoldError, match="scale: a non-persistent buffer"):
        fusedconv.load_folded(architecture, fusedconv.fuse(real).state_dict())


def test_module_versions_survive_the_round_trip(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    real = randomize_batchnorm_stats(torchvision.models.mnasnet0_5(), torch.Generator().manual_seed(15)).eval()
    folded = fusedconv.fold_state_dict(torchvision.models.mnasnet0_5(), real.state_dict())
    assert folded._metadata == fusedconv.fuse(real).state_dict()._metadata  # MNASNet refuses a load without
    x = torch.randn(1, 3, 64, 64)
    fused = fusedconv.fuse(real)
    for source in (folded, _save(folded, tmp_path / "m.safetensors")):  # safetensors keeps no versions
        loaded = fusedconv.load_folded(torchvision.models.mnasnet0_5(), source)
        assert_same_state(loaded.state_dict(), fused.state_dict())
        with torch.no_grad():  # same weights; the conv may pick another algorithm for another memory layout
            assert torch.allclose(loaded(x), fused(x), rtol=1e-5, atol=1e-6)


def test_blocks_at_two_paths_and_blocks_entangled_with_the_model():
    def twice():
        block = RepVGGBlock(4, 4, 3)
        return nn.Sequential(block, nn.ReLU(), block)

    real = randomize_batchnorm_stats(twice(), torch.Generator().manual_seed(16)).eval()
    assert_same_state(fusedconv.fold_state_dict(twice(), real.state_dict()), fusedconv.fuse(real).state_dict())

    def entangled():
        block = RepVGGBlock(8, 8, 3)
        return nn.Sequential(block.dense[0], nn.ReLU(), block)  # a branch of the block also used on its own

    real = randomize_batchnorm_stats(entangled(), torch.Generator().manual_seed(17)).eval()
    plan = fusedconv.plan(real)
    assert plan.merges == ["0"]  # the branch merges (both uses see it); the block around it cannot
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        assert torch.allclose(fusedconv.fuse(real)(x), real(x), rtol=1e-5, atol=1e-5)
    assert_same_state(fusedconv.fold_state_dict(entangled(), real.state_dict()), fusedconv.fuse(real).state_dict())
    with pytest.raises(fusedconv.FoldError, match="^2: its Conv2d is also registered at '0.conv'"):
        fusedconv.reparameterize(real)


class _Other(nn.Module):
    """Calls a conv of a block through a plain list (not registered as a child)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.convs = {"k": [conv]}

    def forward(self, x):
        return self.convs["k"][0](x)


class _ThroughATensor(nn.Module):
    """Calls a conv of a block through an attribute of a plain tensor it keeps."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.carrier = torch.zeros(1)
        self.carrier.helper = conv

    def forward(self, x):
        return x + self.carrier.helper(x)


@pytest.mark.parametrize("how,why", [
    ("tied", "holds a tensor that shares memory"),
    ("reached through an attribute", "is also reachable"),
    ("reached through a tensor's attribute", "is also reachable"),
    ("hooked inside the block", "has forward hooks"),
])
def test_a_block_a_merge_would_change_outside_itself_is_not_merged(how, why):
    block = RepVGGBlock(4, 4, 3)
    if how == "tied":
        other = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        other.weight = block.dense[0].conv.weight  # merging the block would rescale other's weight too
        model = nn.Sequential(block, other)
    elif how == "reached through an attribute":
        model = nn.Sequential(block, _Other(block.dense[0].conv))
    elif how == "reached through a tensor's attribute":
        model = nn.Sequential(block, _ThroughATensor(block.dense[0].conv))
    else:
        block.dense[0].conv.register_forward_hook(lambda module, args, output: output + 1)
        model = nn.Sequential(block, nn.ReLU())
    model = randomize_batchnorm_stats(model, torch.Generator().manual_seed(22)).eval()
    assert fusedconv.plan(model).merges == []
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fusedconv.fuse(model)(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(fusedconv.FoldError, match=f"^0: its Conv2d {why}"):
        fusedconv.reparameterize(model)


def _sliced(shape, offset: int) -> nn.Parameter:
    """A weight that views part of a buffer of its own, at an offset."""
    count = torch.Size(shape).numel()
    return nn.Parameter(torch.randn(count + offset)[offset:].view(shape))


class _Views(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c1.weight, self.c2.weight = _sliced(self.c1.weight.shape, 36), _sliced(self.c2.weight.shape, 144)

    def forward(self, x):
        return self.b2(self.c2(self.b1(self.c1(x))))


class _DataTied(_Views):
    def __init__(self):
        super().__init__()
        self.c2.weight.data = self.c1.weight.data  # a tie through .data: two Parameters, one storage


@pytest.mark.parametrize("build", [_Views, _DataTied], ids=["views of own buffers", "tied through .data"])
def test_the_meta_device_sees_what_memory_shows(build):
    """On meta, data_ptr is an offset, not an address, and ties made through
    .data or views are of storages, not of tensor objects."""
    real = randomize_batchnorm_stats(build(), torch.Generator().manual_seed(25)).eval()
    with torch.device("meta"):
        architecture = build().eval()
    assert fusedconv.plan(architecture).folds == fusedconv.plan(real).folds
    expected = fusedconv.fuse(real).state_dict()
    assert_same_state(fusedconv.fold_state_dict(real, real.state_dict()), expected)
    structure = fusedconv.fuse(architecture)
    structure.load_state_dict(expected, assign=True)


def test_a_failing_merge_undoes_what_installs_did_outside_their_blocks():
    from fusedconv.reparam import Reparameterization, bn_affine

    class Swapper(nn.Sequential):  # its install puts the merged conv in its parent's place
        pass

    class Failing(nn.Sequential):
        pass

    net = randomize_batchnorm_stats(nn.Sequential(Swapper(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
                                                  Failing(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))),
                                    torch.Generator().manual_seed(26)).eval()

    def swap(block, name):
        def install(conv):
            conv.requires_grad_(False)
            setattr(net, name, conv)
        return Reparameterization(name, block[0], install, after=bn_affine(block[1]))

    def fail(block, name):
        def install(conv):
            raise RuntimeError("install failed")
        return Reparameterization(name, block[0], install, after=bn_affine(block[1]))

    fusedconv.register_block(Swapper, swap)
    fusedconv.register_block(Failing, fail)
    try:
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with pytest.raises(RuntimeError, match="install failed"):
            fusedconv.fuse(net, inplace=True)
        assert type(net[0]) is Swapper and net[0][0].weight.requires_grad
        assert_same_state(net.state_dict(), before)
    finally:
        from fusedconv import registry
        registry._CONVERTERS.pop(Swapper)
        registry._CONVERTERS.pop(Failing)


def test_a_meta_model_with_a_real_block_is_refused():
    with torch.device("meta"):
        head = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)]
    model = nn.Sequential(*head, RepVGGBlock(8, 8, 3)).eval()
    with pytest.raises(fusedconv.FoldError, match="meta device and some are not"):
        fusedconv.fuse(model)


class _Tagged(nn.Sequential):
    def get_extra_state(self):
        return {"version": 3}

    def set_extra_state(self, state):
        self.tag = state


def test_extra_state_passes_through(tmp_path):
    real = randomize_batchnorm_stats(_Tagged(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                                     torch.Generator().manual_seed(18)).eval()
    expected = fusedconv.fuse(real).state_dict()
    folded = fusedconv.fold_state_dict(_Tagged(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), real.state_dict())
    assert list(folded) == list(expected) and folded["_extra_state"] == {"version": 3}
    fusedconv.fold_checkpoint(_Tagged(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), _save(real.state_dict(), tmp_path / "t.pt"),
                              tmp_path / "f.pt")
    loaded = fusedconv.load_folded(_Tagged(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), tmp_path / "f.pt")
    assert loaded.tag == {"version": 3}
    with pytest.raises(fusedconv.FoldError, match="_extra_state: holds a dict"):
        fusedconv.fold_checkpoint(_Tagged(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), real.state_dict(), tmp_path / "f.safetensors")


def test_written_files_are_valid_and_readable_by_others(tmp_path):
    import zipfile

    real = randomize_batchnorm_stats(small_model(), torch.Generator().manual_seed(19)).eval()
    fusedconv.fold_checkpoint(small_model(), real.state_dict(), tmp_path / "folded.pt")
    with zipfile.ZipFile(tmp_path / "folded.pt") as archive:
        assert archive.testzip() is None  # every record's CRC is right
        assert {name.split("/")[0] for name in archive.namelist()} == {"folded"}  # named as torch.save names it
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "folded.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    fusedconv.fold_checkpoint(nn.ReLU(), {}, tmp_path / "empty.pt")  # nothing to fold, nothing to write
    assert torch.load(tmp_path / "empty.pt", weights_only=True) == {}


def test_a_full_disk_or_bad_destination_writes_nothing(tmp_path, monkeypatch):
    import errno

    real = randomize_batchnorm_stats(small_model(), torch.Generator().manual_seed(20)).eval()
    outputs = tmp_path / "outputs"
    (outputs / "a_directory.pt").mkdir(parents=True)
    for bad in (outputs / "missing" / "x.pt", outputs / "a_directory.pt"):
        with pytest.raises(fusedconv.FoldError, match="cannot write there"):
            fusedconv.fold_checkpoint(small_model(), real.state_dict(), bad)
    outputs = tmp_path / "full"
    outputs.mkdir()

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    for suffix in (".pt", ".safetensors"):
        with pytest.raises(fusedconv.FoldError, match="No space left on device.*nothing was written"):
            fusedconv.fold_checkpoint(small_model(), real.state_dict(), outputs / f"out{suffix}")
    assert os.listdir(outputs) == []


def test_a_big_endian_file_folds_right(tmp_path):
    """A .pt saved on a big-endian machine: torch.load swaps its bytes inside the
    private mapping, so those pages must be kept, not dropped and read again
    unswapped."""
    numpy = pytest.importorskip("numpy")

    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 64))

    real = randomize_batchnorm_stats(build(), torch.Generator().manual_seed(21)).eval()
    little = _save(real.state_dict(), tmp_path / "little.pt")
    reader, writer = torch._C.PyTorchFileReader(little), torch._C.PyTorchFileWriter(str(tmp_path / "big.pt"))
    for name in reader.get_all_records():
        if name in ("version", ".data/version", ".data/serialization_id"):
            continue  # the writer writes its own
        data = reader.get_record(name)
        if name.endswith("byteorder"):
            data = b"big"
        elif "/data/" in name or name.startswith("data/"):  # num_batches_tracked is the only 8-byte storage
            data = numpy.frombuffer(data, dtype="<i8" if len(data) == 8 else "<f4").byteswap().tobytes()
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    del writer
    assert_same_state(torch.load(tmp_path / "big.pt", weights_only=True), real.state_dict())
    assert_same_state(fusedconv.fold_state_dict(build(), tmp_path / "big.pt"), fusedconv.fuse(real).state_dict())


# --------------------------------------------------------------------------- the command line


def test_cli_fuse_folds_a_checkpoint(tmp_path, capsys):
    real = build_demo_network(seed=3).eval()
    source = _save(real.state_dict(), tmp_path / "demo.pt")
    out = tmp_path / "demo_folded.safetensors"
    code = cli.main(["fuse", "fusedconv.examples:DemoNet", "--checkpoint", source, "-o", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "9 BatchNorms folded into 8 layers, 0 blocks merged, 0 left" in printed
    assert_same_state(fusedconv.load_folded(DemoNet(), out).state_dict(), fusedconv.fuse(real).state_dict())


def test_cli_fuse_errors_are_one_line(tmp_path, capsys):
    source = tmp_path / "pickled.pt"
    torch.save({"weight": _Pickled()}, source)
    code = cli.main(["fuse", "fusedconv.examples:DemoNet", "--checkpoint", str(source), "-o",
                     str(tmp_path / "x.pt"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == cli.EXIT_CHECK_FAILED and error.count("\n") == 1 and "weights_only" in error
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_the_device_and_backend_of_the_arithmetic(backend):
    """device= and backend= pick where and how the weights are scaled; the bits do not change."""
    real = randomize_batchnorm_stats(small_model(), torch.Generator().manual_seed(23)).eval()
    folded = fusedconv.fold_state_dict(small_model(), real.state_dict(), device="cpu", backend=backend)
    assert_same_state(folded, fusedconv.fuse(real).state_dict())


@pytest.mark.gpu
def test_fold_state_dict_on_the_gpu():
    real = randomize_batchnorm_stats(small_model(), torch.Generator().manual_seed(10)).eval()
    expected = fusedconv.fuse(real).state_dict()
    folded = fusedconv.fold_state_dict(small_model(), real.state_dict(), device="cuda")
    assert_same_state(folded, expected)
    assert all(t.device.type == "cpu" for t in folded.values())


@pytest.mark.parametrize("device", ["meta"] + ["cuda"] * (not torch.cuda.is_available()))
def test_a_device_nothing_can_compute_on_is_refused_before_anything_is_read(device, tmp_path):
    model = randomize_batchnorm_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                                      torch.Generator().manual_seed(2)).eval()
    source = _save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(fusedconv.FoldError, match=f"^device='{device}': "):
        fusedconv.fold_state_dict(model, source, device=device)
    with pytest.raises(fusedconv.FoldError, match=f"^device='{device}': "):
        fusedconv.fold_checkpoint(model, source, tmp_path / "folded.safetensors", device=device)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
    with pytest.raises(fusedconv.FoldError, match=f"^device='{device}': "):  # said before the file is opened
        fusedconv.fold_state_dict(model, str(tmp_path / "no-such-checkpoint.pt"), device=device)
