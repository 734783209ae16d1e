"""Folding sharded models in place (fusedconv/sharded.py): FSDP2, DTensor placements,
and the ranks agreeing before anyone writes.

Each case runs on two CPU processes (gloo backend, rendezvous through a
FileStore in a fresh temporary directory: no port to find) that stay up for
the whole module, so that a case costs its own run and not two interpreters'
start. Every case compares each folded
weight and bias, gathered whole (``full_tensor()``), with the fold of an
unsharded copy of the same model (the same plan), bit for bit, and the
outputs after the fold with those before it (float32 rounding only). A case
that fails on a rank fails the test with that rank's traceback; a case that
does not finish in time (a rank waiting in a collective) fails it too, and the
processes are replaced for the next case.
"""

from __future__ import annotations

import copy
import os
import queue
import shutil
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedconv
from fusedconv.examples import randomize_batchnorm_stats

WORLD = 2
CASE_TIMEOUT = 60  # seconds; a case takes well under one
START_TIMEOUT = 60  # spawning and importing torch in each process


# --------------------------------------------------------------------------- the ranks


def _serve(rank: int, world: int, store_path: str, backend: str, tasks, results) -> None:
    """One rank: join the process group, then run each case sent until None comes."""
    torch.set_num_threads(1)  # two ranks share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world)
    results.put((rank, None))  # ready
    while (task := tasks.get()) is not None:
        case, args = task
        try:
            case(rank, *args)
            results.put((rank, None))
        except BaseException:
            results.put((rank, traceback.format_exc()))
    dist.destroy_process_group()


class Ranks:
    """Processes that each hold one rank of a process group and run cases on request."""

    def __init__(self, world: int, backend: str = "gloo"):
        context = mp.get_context("spawn")
        self.directory = tempfile.mkdtemp(prefix="fusedconv-ranks-")
        self.store_path = os.path.join(self.directory, "store")  # a fresh FileStore per group
        self.world = world
        self.tasks = [context.Queue() for _ in range(world)]
        self.results = context.Queue()
        self.processes = [context.Process(target=_serve, args=(rank, world, self.store_path, backend,
                                                               self.tasks[rank], self.results), daemon=True)
                          for rank in range(world)]
        for process in self.processes:
            process.start()
        self._collect("starting the ranks", START_TIMEOUT)
        self.healthy = True

    def _collect(self, what: str, timeout: float) -> dict[int, str | None]:
        """One report per rank, or a test failure naming the ranks that died or hung."""
        reports: dict[int, str | None] = {}
        deadline = time.monotonic() + timeout
        while len(reports) < self.world:
            try:
                rank, report = self.results.get(timeout=0.2)
                reports[rank] = report
                continue
            except queue.Empty:
                pass
            dead = [rank for rank, p in enumerate(self.processes) if p.exitcode is not None and rank not in reports]
            if dead or time.monotonic() > deadline:
                self.close()
                missing = sorted(set(range(self.world)) - reports.keys())
                why = (f"died (exit codes {[self.processes[rank].exitcode for rank in dead]})" if dead else
                       f"did not finish within {timeout} s (waiting in a collective?)")
                pytest.fail(f"{what}: rank(s) {missing} {why}{_tracebacks(reports)}", pytrace=False)
        return reports

    def run(self, case, *args) -> None:
        """Run ``case(rank, *args)`` on every rank; fail with every rank's traceback."""
        for tasks in self.tasks:
            tasks.put((case, args))
        failures = _tracebacks(self._collect(case.__name__, CASE_TIMEOUT))
        if failures:
            pytest.fail(f"{case.__name__} failed:{failures}", pytrace=False)

    def close(self) -> None:
        self.healthy = False
        for tasks in self.tasks:
            tasks.put(None)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        shutil.rmtree(self.directory, ignore_errors=True)


def _tracebacks(reports: dict[int, str | None]) -> str:
    return "".join(f"\n----- rank {rank} -----\n{report}" for rank, report in sorted(reports.items()) if report)


class RankPool:
    """CPU ranks, started at the first case and again after a case that left them unusable."""

    def __init__(self, world: int):
        self.world, self.ranks = world, None

    def run(self, case, *args) -> None:
        if self.ranks is None or not self.ranks.healthy:
            self.ranks = Ranks(self.world)
        self.ranks.run(case, *args)

    def close(self) -> None:
        if self.ranks is not None:
            self.ranks.close()


@pytest.fixture(scope="module")
def ranks():
    pool = RankPool(WORLD)
    yield pool
    pool.close()


# --------------------------------------------------------------------------- models and checks (run on the ranks)


def _net(bias: bool) -> nn.Module:
    """Every kind of fold, with channel counts that split unevenly over two ranks:
    Conv -> BN, grouped ConvTranspose -> BN, BN -> 1x1 Conv (no padding), Linear
    -> BatchNorm1d; random BN statistics (never zeros or ones)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 5, 3, bias=bias), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 6, 1, bias=bias), nn.BatchNorm2d(6),
        nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2, bias=bias), nn.BatchNorm2d(4), nn.ReLU(),
        nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1, bias=bias),
        nn.Flatten(), nn.Linear(3 * 12 * 12, 7, bias=bias), nn.BatchNorm1d(7),
    )
    return randomize_batchnorm_stats(net, torch.Generator().manual_seed(1)).eval()


NET_FOLDS = {"0": ("1",), "3": ("4",), "5": ("6",), "9": ("8",), "11": ("12",)}  # layer -> its BNs


def _input(device: str = "cpu") -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)).to(device)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _folds(plan) -> dict[str, tuple[str, ...]]:
    return {fold.layer: fold.batchnorms for fold in plan.folds}


def _class(module: nn.Module) -> type:
    """The module's class, the one fully_shard replaced for a sharded module."""
    return fusedconv.distributed.original_class(module) or type(module)


def _assert_folded_like_unsharded(model: nn.Module, unsharded: nn.Module, plan) -> None:
    """Every parameter and buffer of the folded ``model``, gathered whole, equals the
    fold of ``unsharded`` with the same plan, bit for bit."""
    reference = fusedconv.fuse(unsharded, plan=plan)
    got = {name: _whole(t) for name, t in (*model.named_parameters(), *model.named_buffers())}
    want = dict((*reference.named_parameters(), *reference.named_buffers()))
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), f"{name} differs from the unsharded fold"
    assert [_class(m) for m in model.modules()] == [type(m) for m in reference.modules()]


def _assert_close(after: torch.Tensor, before: torch.Tensor) -> None:
    """The fold changes nothing but float32 rounding (a wrong fold is off by 1e-1 and more)."""
    error = float((after.double() - before.double()).norm() / before.double().norm())
    assert error < 1e-5, f"the fold changed the output: relative difference {error:.3g}"


def _snapshot(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor]]:
    tensors = {name: _local(t).clone() for name, t in (*model.named_parameters(), *model.named_buffers())}
    return [type(m) for m in model.modules()], tensors


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    classes, tensors = snapshot
    assert [type(m) for m in model.modules()] == classes
    now = {name: _local(t) for name, t in (*model.named_parameters(), *model.named_buffers())}
    assert now.keys() == tensors.keys()
    for name, tensor in tensors.items():
        torch.testing.assert_close(now[name], tensor, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{name} changed although the fold was refused")


def _mesh(shape=(WORLD,), device: str = "cpu"):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device, shape, mesh_dim_names=("replicate", "shard")[-len(shape):])


def _distribute(model: nn.Module, mesh, weight_placement) -> nn.Module:
    """DTensor parameters through distribute_module: the layers' weights placed as
    ``weight_placement``, everything else (biases, BN parameters and statistics)
    split along its one dim, Shard(0)."""
    from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

    def partition(name, module, mesh):
        for key, param in list(module.named_parameters(recurse=False)):
            is_layer = isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
            placement = weight_placement if is_layer and key == "weight" else Shard(0)
            module.register_parameter(key, nn.Parameter(distribute_tensor(param.data, mesh, [placement])))
        for key, buffer in list(module.named_buffers(recurse=False)):
            if buffer.dim() == 1:
                module.register_buffer(key, distribute_tensor(buffer, mesh, [Shard(0)]))

    return distribute_module(model, mesh, partition)


def _gathered_output(model: nn.Module, structure: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of ``structure`` (an unsharded model of the same structure) holding
    ``model``'s values gathered whole: DTensor convolutions and BatchNorms have no
    sharding rule for every placement, so a distribute_module model runs this way."""
    structure = copy.deepcopy(structure)
    structure.load_state_dict({name: _whole(t) for name, t in model.state_dict().items()})
    with torch.no_grad():
        return structure(x)


# --------------------------------------------------------------------------- cases (each runs on every rank)


def case_fsdp_root_only(rank: int, device: str = "cpu") -> None:
    """fully_shard on the root only; after a forward the root keeps its parameters
    unsharded (reshard_after_forward=False by default for the root), which once
    made the fold write into gathered copies that the next reshard dropped."""
    from torch.distributed.fsdp import fully_shard

    from torch.distributed.tensor import DTensor

    model = _net(bias=True).to(device)
    fully_shard(model, mesh=_mesh(device=device))
    x = _input(device)
    with torch.no_grad():
        before = model(x)
    assert not isinstance(model[0].weight, DTensor)  # gathered, until the fold reshards it
    plan = fusedconv.plan(model)
    assert _folds(plan) == NET_FOLDS
    fusedconv.fuse(model, inplace=True)
    with torch.no_grad():
        after = model(x)
        assert torch.equal(model(x), after)  # every forward gathers the same folded weights
        model.load_state_dict(model.state_dict())  # what a checkpoint of the folded model does
        assert torch.equal(model(x), after)
    _assert_close(after, before)
    _assert_folded_like_unsharded(model, _net(bias=True).to(device), plan)


def case_fsdp_per_layer(rank: int) -> None:
    """fully_shard on every layer, then on the root, folded before the first
    forward (FSDP's lazy initialisation then meets the folded model). A layer
    without a bias gets one in its FSDP2 group; a BN that fully_shard was
    applied to is left with the reason, and a user hook on a sharded layer is
    still a hook."""
    from torch.distributed.fsdp import fully_shard

    model = _net(bias=True)
    model[0] = nn.Conv2d(3, 5, 3, bias=False)  # its new bias joins the FSDP2 group of model[0]
    model[11].register_forward_hook(lambda module, args, output: output)  # a user's hook
    unsharded = copy.deepcopy(model)
    mesh = _mesh()
    for index in (0, 3, 5, 6, 9, 11):
        fully_shard(model[index], mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = _input()
    with torch.no_grad():
        before = unsharded(x)
    plan = fusedconv.plan(model)
    assert _folds(plan) == {"0": ("1",), "3": ("4",), "9": ("8",)}
    reasons = {skip.module: skip.reason for skip in plan.skipped}
    assert "fully_shard was applied to it" in reasons["6"]
    assert "forward hooks" in reasons["12"]
    assert fusedconv.fuse(model, inplace=True) is model
    with torch.no_grad():
        _assert_close(model(x), before)
    _assert_folded_like_unsharded(model, unsharded, plan)


def _fully_shard(model: nn.Module, layers: tuple[str, ...], **options) -> nn.Module:
    """fully_shard on each of ``layers``, then on the root (``options`` for every call)."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh()
    for name in layers:
        fully_shard(model.get_submodule(name), mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model


# fully_shard on the root only, FSDP2's lazy initialisation run before the fold (by a
# forward where one can run, after which the root holds its parameters gathered), or on
# each layer to fold and then on the root, folded before the lazy initialisation (the
# first forward's, which then meets the new biases).
FSDP_LAYOUTS = {"root": (), "layers": tuple(NET_FOLDS)}


def _fsdp_groups(model: nn.Module) -> list:
    """The FSDP2 parameter groups of ``model``'s fully_shard modules."""
    return [group for module in fusedconv.distributed.fsdp_modules(model)
            for group in module._get_fsdp_state()._fsdp_param_groups]


def _assert_no_batchnorm(model: nn.Module) -> None:
    left = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not left, f"BatchNorms left: {left}"


def case_fsdp_new_biases(rank: int, layout: str) -> None:
    """Layers without a bias under FSDP2 (every kind of fold of _net, a BN before
    a 1x1 conv included; 5, 3 and 7 output channels, which FSDP pads over two
    ranks): each new bias joins its weight's FSDP2 group, split along dim 0 as
    FSDP2 splits any parameter; FSDP2's full state dict equals the unsharded
    fold's bit for bit, and in float64 the output changes by rounding only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor, Shard

    unsharded = _net(bias=False).double()
    model = _fully_shard(copy.deepcopy(unsharded), FSDP_LAYOUTS[layout])
    x = _input().double()
    with torch.no_grad():
        before = unsharded(x)
        if layout == "root":
            model(x)
    plan = fusedconv.plan(model)
    assert _folds(plan) == NET_FOLDS
    fusedconv.fuse(model, inplace=True)
    _assert_no_batchnorm(model)
    for name in NET_FOLDS:
        bias = model.get_submodule(name).bias
        assert isinstance(bias, DTensor) and bias.placements == (Shard(0),)
        assert any(param.sharded_param is bias for group in _fsdp_groups(model) for param in group.fsdp_params)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    reference = fusedconv.fuse(unsharded, plan=plan).state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), f"{name} differs from the unsharded fold"
    with torch.no_grad():
        after = model(x)
        model.load_state_dict(model.state_dict())  # FSDP2's post-load hook on each new bias
        assert torch.equal(model(x), after)
    error = float((after - before).norm() / before.norm())
    assert error < 1e-12, f"the fold changed the float64 output: relative difference {error:.3g}"


def case_fsdp_new_biases_mixed_precision(rank: int, layout: str) -> None:
    """A bfloat16 mixed-precision policy: FSDP2 casts the new biases with the
    weights (a bias outside its groups stayed float32, and the forward failed),
    so the folded model runs, and as the unsharded fold cast to bfloat16 does.
    With the root only, FSDP2's lazy initialisation (which sets its parameters'
    dtypes) runs before the fold; a forward cannot run it here, as the unfolded
    BNs' float32 running statistics meet bfloat16 inputs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    unsharded = _net(bias=False)
    model = _fully_shard(copy.deepcopy(unsharded), FSDP_LAYOUTS[layout],
                         mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    x = _input()
    if layout == "root":
        model._get_fsdp_state()._lazy_init()
    plan = fusedconv.plan(model)
    fusedconv.fuse(model, inplace=True)
    _assert_no_batchnorm(model)
    _assert_folded_like_unsharded(model, unsharded, plan)  # the float32 shards, before a forward gathers them
    with torch.no_grad():
        got = model(x)
        want = fusedconv.fuse(unsharded, plan=plan).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2 * float(want.abs().max()))


def case_fsdp_training_after_fold(rank: int) -> None:
    """One SGD step on the folded model (float64, fully_shard per layer and on the
    root), each rank on its half of a batch: FSDP2 reduces every gradient, the
    new biases' included, to the mean of the ranks' (a bias outside its groups
    kept each rank's own, and the ranks drifted apart), which the unsharded
    fold's gradients on the two halves match; after the step each new bias is
    the same on every rank, and moved."""
    unsharded = _net(bias=False).double()
    model = _fully_shard(copy.deepcopy(unsharded), FSDP_LAYOUTS["layers"])
    plan = fusedconv.plan(model)
    fusedconv.fuse(model, inplace=True)
    reference = fusedconv.fuse(unsharded, plan=plan)
    halves = torch.randn(2 * WORLD, 3, 8, 8, generator=torch.Generator().manual_seed(11),
                         dtype=torch.float64).chunk(WORLD)

    def loss(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(x).square().mean()

    loss(model, halves[rank]).backward()
    (sum(loss(reference, half) for half in halves) / WORLD).backward()  # FSDP2 averages over the ranks
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad.full_tensor(), reference.get_parameter(name).grad,
                                   rtol=1e-10, atol=1e-13, msg=f"{name}'s gradient is not the ranks' mean")
    new_biases = [f"{name}.bias" for name in NET_FOLDS]
    before = {name: model.get_parameter(name).full_tensor() for name in new_biases}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for name in new_biases:
        after = model.get_parameter(name).full_tensor()
        on_every_rank: list = [None] * WORLD
        dist.all_gather_object(on_every_rank, after)
        assert all(torch.equal(other, after) for other in on_every_rank), f"{name} differs across ranks"
        assert not torch.equal(after, before[name]), f"{name} did not move"
        torch.testing.assert_close(after, reference.get_parameter(name), rtol=1e-10, atol=1e-13)


def case_fsdp_new_bias_refused_or_undone(rank: int) -> None:
    """Where the new bias cannot join FSDP2's group, the BN is left with the
    reason: on a torch whose FSDPParam takes other arguments. A layer whose
    group is held gathered in the middle of a forward (set here by hand:
    fusedconv's reshard cannot shard it then) keeps its BN, bias or not. A write that fails after the biases were
    added takes them out of FSDP2's groups again, so a later fold starts clean."""
    from torch.distributed.fsdp._fully_shard import _fsdp_common, _fsdp_param

    def build() -> nn.Module:
        return _fully_shard(_net(bias=False), ("3", "5", "9", "11"))  # conv 0 in the root's group

    model, x = build(), _input()
    snapshot = _snapshot(model)
    original = _fsdp_param.FSDPParam

    class OtherFSDPParam(original):
        def __init__(self, param, module_info, mesh_info, device, mp_policy):
            raise AssertionError("fusedconv called an FSDPParam it does not know")

    _fsdp_param.FSDPParam = OtherFSDPParam
    try:
        plan = fusedconv.plan(model)
        assert _folds(plan) == {}
        reason = {skip.module: skip.reason for skip in plan.skipped}["1"]
        assert "this torch's FSDP2 is not the one fusedconv adds a parameter to (its FSDPParam takes " \
               "(param, module_info, mesh_info, device, mp_policy)" in reason
        fusedconv.fuse(model, inplace=True)
        _assert_unchanged(model, snapshot)
    finally:
        _fsdp_param.FSDPParam = original

    with torch.no_grad():
        before = model(x)
    # Mid-forward, with or without a bias: the gathered copies would be written, then dropped.
    for mid_forward in (model, _fully_shard(_net(bias=True), ("3", "5", "9", "11"))):
        with torch.no_grad():
            unfolded = mid_forward(x)  # the root keeps its parameters gathered after it
        first_bias = None if mid_forward[0].bias is None else _whole(mid_forward[0].bias).clone()
        idle_plan = fusedconv.plan(mid_forward)  # made while the root's group is idle: it folds layer 0
        assert _folds(idle_plan) == NET_FOLDS
        root_group = mid_forward._get_fsdp_state()._fsdp_param_groups[0]
        root_group._training_state = _fsdp_common.TrainingState.FORWARD
        try:
            with pytest.raises(fusedconv.FoldError, match="0: FSDP2 holds its parameters gathered, in the middle"):
                fusedconv.fuse(mid_forward, plan=idle_plan, inplace=True)
            plan = fusedconv.plan(mid_forward)
            assert "in the middle of a forward or backward" in \
                {skip.module: skip.reason for skip in plan.skipped}["1"]
            assert _folds(plan) == {name: bns for name, bns in NET_FOLDS.items() if name != "0"}
            fusedconv.fuse(mid_forward, inplace=True)
        finally:
            root_group._training_state = _fsdp_common.TrainingState.IDLE
        assert isinstance(mid_forward[1], nn.BatchNorm2d)
        assert mid_forward[0].bias is None if first_bias is None else torch.equal(_whole(mid_forward[0].bias),
                                                                                   first_bias)
        with torch.no_grad():
            _assert_close(mid_forward(x), unfolded)

    model = build()
    snapshot = _snapshot(model)
    groups = _fsdp_groups(model)
    counts = [len(group.fsdp_params) for group in groups]
    hooks = [dict(m._load_state_dict_post_hooks) for m in model.modules()]
    rescale = fusedconv.sharded.rescale_weights

    def failing_rescale(*args, **kwargs):
        raise RuntimeError("a write failed after the new biases were added")

    fusedconv.sharded.rescale_weights = failing_rescale
    try:
        with pytest.raises(RuntimeError, match="a write failed after the new biases were added"):
            fusedconv.fuse(model, inplace=True)
    finally:
        fusedconv.sharded.rescale_weights = rescale
    assert [len(group.fsdp_params) for group in groups] == counts
    assert [dict(m._load_state_dict_post_hooks) for m in model.modules()] == hooks
    _assert_unchanged(model, snapshot)
    with torch.no_grad():
        model.load_state_dict(model.state_dict())
        assert torch.equal(model(x), before)
    plan = fusedconv.plan(model)
    fusedconv.fuse(model, inplace=True)
    _assert_no_batchnorm(model)
    _assert_folded_like_unsharded(model, _net(bias=False), plan)


class ConvBN(nn.Module):
    """A block of its own class, as models shard them (fully_shard per block)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out)

    def forward(self, x):
        return self.bn(self.conv(x))


def case_fsdp_blocks(rank: int) -> None:
    """fully_shard on blocks of a class of the model's own: the code reading reads
    the original class's forward through FSDP's generated class, and each BN
    folds inside its block, whose FSDP unit goes on gathering the parameters it
    was given (the BN's included, unused)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(ConvBN(3, 5), nn.ReLU(), ConvBN(5, 4))
    model = randomize_batchnorm_stats(model, torch.Generator().manual_seed(9)).eval()
    unsharded = copy.deepcopy(model)
    mesh = _mesh()
    for block in (model[0], model[2]):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = _input()
    with torch.no_grad():
        before = model(x)
    plan = fusedconv.plan(model)
    assert plan.source == "source" and _folds(plan) == {"0.conv": ("0.bn",), "2.conv": ("2.bn",)}
    fusedconv.fuse(model, inplace=True)
    with torch.no_grad():
        _assert_close(model(x), before)
    _assert_folded_like_unsharded(model, unsharded, plan)


def case_hsdp(rank: int) -> None:
    """fully_shard on a two-dimensional mesh (HSDP: replicated along one mesh dim,
    sharded along the other)."""
    from torch.distributed.fsdp import fully_shard

    model = _net(bias=True)
    fully_shard(model, mesh=_mesh((1, WORLD)))
    assert len(model[0].weight.placements) == 2
    x = _input()
    with torch.no_grad():
        before = model(x)
    plan = fusedconv.plan(model)
    fusedconv.fuse(model, inplace=True)
    with torch.no_grad():
        _assert_close(model(x), before)
    _assert_folded_like_unsharded(model, _net(bias=True), plan)


def case_distribute_module(rank: int, placement_name: str) -> None:
    """distribute_module with the layers' weights placed as Shard(0), Shard(1) or
    Replicate, biases absent (each fold gives its layer a DTensor bias), BN
    parameters and statistics Shard(0)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placement = {"shard0": Shard(0), "shard1": Shard(1), "replicate": Replicate()}[placement_name]
    model = _distribute(_net(bias=False), _mesh(), placement)
    plan = fusedconv.plan(model)
    expected = dict(NET_FOLDS)
    if placement_name == "shard1":  # the BN before conv 9 would need the weight's columns gathered
        del expected["9"]
        assert "input channel" in {skip.module: skip.reason for skip in plan.skipped}["8"]
    assert _folds(plan) == expected
    x = _input()
    before = _gathered_output(model, _net(bias=False), x)
    fusedconv.fuse(model, inplace=True)
    new_bias = model[0].bias
    assert isinstance(new_bias, DTensor) and new_bias.device_mesh == model[0].weight.device_mesh
    assert new_bias.placements == ((Shard(0),) if placement_name == "shard0" else (Replicate(),))
    _assert_folded_like_unsharded(model, _net(bias=False), plan)
    structure = fusedconv.fuse(_net(bias=False), plan=plan)
    _assert_close(_gathered_output(model, structure, x), before)


def case_distribute_tensor_conv_transpose(rank: int) -> None:
    """distribute_tensor by hand: a grouped ConvTranspose split along its output
    channels (dim 1, inside each group), so each rank scales the columns it holds."""
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=True), nn.BatchNorm2d(6))
    randomize_batchnorm_stats(model, torch.Generator().manual_seed(3)).eval()
    unsharded = copy.deepcopy(model)
    mesh = _mesh()
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.data, mesh, [Shard(1)]))
    model[0].bias = nn.Parameter(distribute_tensor(model[0].bias.data, mesh, [Shard(0)]))
    plan = fusedconv.plan(model)
    assert _folds(plan) == {"0": ("1",)}
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    before = _gathered_output(model, unsharded, x)
    fusedconv.fuse(model, inplace=True)
    _assert_folded_like_unsharded(model, unsharded, plan)
    _assert_close(_gathered_output(model, fusedconv.fuse(unsharded, plan=plan), x), before)


def case_batchnorm_before(rank: int) -> None:
    """BNs before a 1x1 conv (no padding) and before a Linear, both split along
    their output channels: each rank sums its rows' weights times the BN shift;
    one rank holds a single row of the Linear."""
    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, groups=2), nn.Flatten(),
                          nn.BatchNorm1d(54), nn.Linear(54, 3))
    randomize_batchnorm_stats(model, torch.Generator().manual_seed(5)).eval()
    unsharded = copy.deepcopy(model)
    model = _distribute(model, _mesh(), Shard(0))
    plan = fusedconv.plan(model)
    assert _folds(plan) == {"1": ("0",), "4": ("3",)}
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    before = _gathered_output(model, unsharded, x)
    fusedconv.fuse(model, inplace=True)
    assert model[4].weight.to_local().shape[0] == (2 if rank == 0 else 1)
    _assert_folded_like_unsharded(model, unsharded, plan)
    _assert_close(_gathered_output(model, fusedconv.fuse(unsharded, plan=plan), x), before)


def case_tensor_parallel_plans(rank: int) -> None:
    """parallelize_module: ColwiseParallel and RowwiseParallel redistribute a
    Linear's input and output with hooks of their own, recognised as moving
    values only, so the BN after each Linear folds into the rank's block
    (Colwise: weight rows, Shard(0); Rowwise: weight columns, Shard(1), the
    partial sums reduced after). An output left sharded (a slice reaches the
    BN) is not recognised: that BN is left, with the reason."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def build():
        torch.manual_seed(0)
        # Flatten first: a BatchNorm1d folds into a Linear where its input is seen to be (N, C)
        model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5),
                              nn.BatchNorm1d(5), nn.Linear(5, 4), nn.BatchNorm1d(4))
        return randomize_batchnorm_stats(model, torch.Generator().manual_seed(8)).eval()

    model, unsharded = build(), build()
    parallelize_module(model, _mesh(), {"1": ColwiseParallel(output_layouts=Replicate()),
                                        "4": RowwiseParallel(input_layouts=Replicate()),
                                        "6": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = unsharded(x)
    plan = fusedconv.plan(model)
    assert _folds(plan) == {"1": ("2",), "4": ("5",)}
    assert "forward hooks" in {skip.module: skip.reason for skip in plan.skipped}["7"]
    fusedconv.fuse(model, inplace=True)
    _assert_folded_like_unsharded(model, unsharded, plan)
    with torch.no_grad():
        _assert_close(_gathered_output(model, fusedconv.fuse(build(), plan=plan), x), before)


def case_bad_statistics_on_one_rank(rank: int) -> None:
    """FSDP2 keeps BN statistics as plain buffers, one copy per rank: a negative
    variance in rank 1's copy makes every rank raise, and nothing is written."""
    from torch.distributed.fsdp import fully_shard

    model = _net(bias=True)
    fully_shard(model, mesh=_mesh())
    if rank == 1:
        with torch.no_grad():
            model[4].running_var[2] = -1.0
    snapshot = _snapshot(model)
    with pytest.raises(fusedconv.FoldError, match="running_var is negative" if rank == 1 else "failed on rank 1"):
        fusedconv.fuse(model, inplace=True)
    _assert_unchanged(model, snapshot)


def case_fsdp_ignored_weight_and_no_model_kept(rank: int) -> None:
    """A weight FSDP2 was told to ignore (``ignored_params``) is a plain tensor
    every rank holds whole, while FSDP2 holds its layer's bias: after a forward
    the layer folds like the rest (the reshard shards the bias); in the middle
    of one it keeps its BN (its bias is a gathered copy the next reshard
    drops). And nothing fusedconv keeps between folds holds a model alive:
    FSDP2 models are large."""
    import gc
    import weakref

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_common

    def build() -> nn.Module:
        model, mesh = _net(bias=True), _mesh()
        for name in ("3", "5", "9", "11"):
            fully_shard(model.get_submodule(name), mesh=mesh)
        fully_shard(model, mesh=mesh, ignored_params={model[0].weight})  # the root keeps layer 0's bias
        with torch.no_grad():
            model(_input())  # the root keeps its parameters gathered, idle
        return model

    model = build()
    plan = fusedconv.plan(model)
    assert _folds(plan) == NET_FOLDS and plan.skipped == []
    fusedconv.fuse(model, plan=plan, inplace=True)
    _assert_no_batchnorm(model)
    _assert_folded_like_unsharded(model, _net(bias=True), plan)

    mid_forward = build()
    with torch.no_grad():
        unfolded = mid_forward(_input())
    root_group = mid_forward._get_fsdp_state()._fsdp_param_groups[0]
    root_group._training_state = _fsdp_common.TrainingState.FORWARD
    try:
        fusedconv.fuse(mid_forward, inplace=True)
    finally:
        root_group._training_state = _fsdp_common.TrainingState.IDLE
    assert isinstance(mid_forward[1], nn.BatchNorm2d)
    mid_forward.reshard()
    with torch.no_grad():
        _assert_close(mid_forward(_input()), unfolded)

    planned_only = _fully_shard(_net(bias=False), ("3",))
    fusedconv.plan(planned_only)
    folded, mid_forward, planned_only = weakref.ref(model), weakref.ref(mid_forward), weakref.ref(planned_only)
    del model, root_group
    gc.collect()
    assert folded() is None and mid_forward() is None and planned_only() is None


def case_training_mode_on_one_rank(rank: int) -> None:
    """A model left in training mode on rank 0 only: the check that refuses it
    runs where every rank reaches the agreement, so every rank raises (none
    waits in a collective the other never reaches) and nothing is written."""
    from torch.distributed.fsdp import fully_shard

    model = _net(bias=True)
    fully_shard(model, mesh=_mesh())
    model.train(rank == 0)
    snapshot = _snapshot(model)
    with pytest.raises(fusedconv.FoldError, match="training mode" if rank == 0 else "failed on rank 0"):
        fusedconv.fuse(model, inplace=True)
    _assert_unchanged(model, snapshot)


def case_bad_value_in_one_shard(rank: int) -> None:
    """A NaN in rank 1's shard of a BN weight (a DTensor): the statistics are
    gathered whole, so every rank finds it and raises; nothing is written."""
    from torch.distributed.tensor import Shard

    model = _distribute(_net(bias=False), _mesh(), Shard(0))
    if rank == 1:
        with torch.no_grad():
            model[6].weight.to_local()[0] = float("nan")
    snapshot = _snapshot(model)
    with pytest.raises(fusedconv.FoldError, match="6: weight is not finite"):
        fusedconv.fuse(model, inplace=True)
    _assert_unchanged(model, snapshot)


def case_statistics_block_of_the_wrong_size_on_one_rank(rank: int) -> None:
    """A BN statistic whose local block has the wrong size on one rank only: found
    while planning, so every rank raises before any gather (a gather with
    mismatched blocks would leave the other ranks waiting)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = _mesh()
    torch.manual_seed(0)
    model = randomize_batchnorm_stats(nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5)),
                                      torch.Generator().manual_seed(1)).eval()
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.data, mesh, [Shard(0)]))
    model[0].bias = nn.Parameter(distribute_tensor(model[0].bias.data, mesh, [Shard(0)]))
    for key in ("running_mean", "running_var"):
        local = getattr(model[1], key).chunk(WORLD)[rank].clone()
        if rank == 1 and key == "running_mean":
            local = torch.cat([local, torch.ones(1)])
        model[1].register_buffer(key, DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(5,),
                                                         stride=(1,)))
    snapshot = _snapshot(model)
    with pytest.raises(fusedconv.FoldError, match="planning failed on rank 1.*local tensor has shape"
                       if rank == 0 else "1: its local tensor has shape"):
        fusedconv.fuse(model, inplace=True)
    _assert_unchanged(model, snapshot)


def case_statistics_differ_across_ranks(rank: int) -> None:
    """Statistics that are valid on each rank but not the same on all (plain buffers
    copied apart): no unsharded model corresponds, so every rank refuses."""
    from torch.distributed.fsdp import fully_shard

    model = _net(bias=True)
    fully_shard(model, mesh=_mesh())
    with torch.no_grad():
        model[1].running_mean += rank
    snapshot = _snapshot(model)
    with pytest.raises(fusedconv.FoldError, match="disagree on the BatchNorm statistics"):
        fusedconv.fuse(model, inplace=True)
    _assert_unchanged(model, snapshot)


def case_partial_placement(rank: int) -> None:
    """A weight placed as Partial (each rank holds an addend): refused on every rank,
    before any rank writes."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    model = _distribute(_net(bias=False), _mesh(), Shard(0))
    local = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(rank))
    model[9].weight = nn.Parameter(DTensor.from_local(local, model[0].weight.device_mesh, [Partial()]))
    snapshot = _snapshot(model)
    with pytest.raises(fusedconv.FoldError, match=r"9\.weight: it is a DTensor placed as .*Partial"):
        fusedconv.fuse(model, inplace=True)
    _assert_unchanged(model, snapshot)


def case_groups_split_unevenly(rank: int) -> None:
    """A BN before a grouped conv whose rows each rank holds split a group (6 rows
    in groups of 2, three rows per rank): refused on every rank, nothing written."""
    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 6, 1, groups=3))
    model = _distribute(randomize_batchnorm_stats(model, torch.Generator().manual_seed(7)).eval(), _mesh(), Shard(0))
    snapshot = _snapshot(model)
    with pytest.raises(fusedconv.FoldError, match=f"1: this rank holds rows {3 * rank} to {3 * rank + 2} of its "
                                                   "weight, which split its groups of 2 rows"):
        fusedconv.fuse(model, inplace=True)
    _assert_unchanged(model, snapshot)


def case_refused_calls(rank: int) -> None:
    """A sharded model is folded in place, without example inputs; the refusals
    need no collective, so each rank raises on its own."""
    from torch.distributed.fsdp import fully_shard

    model = _net(bias=True)
    fully_shard(model, mesh=_mesh())
    with pytest.raises(fusedconv.FoldError, match="inplace=True"):
        fusedconv.fuse(model)
    with pytest.raises(fusedconv.FoldError, match="example_inputs are not taken for a sharded model"):
        fusedconv.fuse(model, _input(), inplace=True)
    with pytest.raises(fusedconv.FoldError, match="DTensor"):
        fusedconv.fold_conv_bn(model[0], model[1])


# --------------------------------------------------------------------------- tests


def test_fsdp_root_only(ranks):
    ranks.run(case_fsdp_root_only)


def test_fsdp_per_layer(ranks):
    ranks.run(case_fsdp_per_layer)


@pytest.mark.parametrize("layout", FSDP_LAYOUTS)
def test_fsdp_new_biases(ranks, layout):
    ranks.run(case_fsdp_new_biases, layout)


@pytest.mark.parametrize("layout", FSDP_LAYOUTS)
def test_fsdp_new_biases_mixed_precision(ranks, layout):
    ranks.run(case_fsdp_new_biases_mixed_precision, layout)


def test_fsdp_training_after_fold(ranks):
    ranks.run(case_fsdp_training_after_fold)


def test_fsdp_new_bias_refused_or_undone(ranks):
    ranks.run(case_fsdp_new_bias_refused_or_undone)


def test_fsdp_blocks_of_the_models_own_class(ranks):
    ranks.run(case_fsdp_blocks)


def test_fsdp_two_dimensional_mesh(ranks):
    ranks.run(case_hsdp)


@pytest.mark.parametrize("placement", ["shard0", "shard1", "replicate"])
def test_distribute_module(ranks, placement):
    ranks.run(case_distribute_module, placement)


def test_conv_transpose_split_along_output_channels(ranks):
    ranks.run(case_distribute_tensor_conv_transpose)


def test_batchnorm_before_layer(ranks):
    ranks.run(case_batchnorm_before)


def test_tensor_parallel_plans(ranks):
    ranks.run(case_tensor_parallel_plans)


def test_bad_statistics_on_one_rank(ranks):
    ranks.run(case_bad_statistics_on_one_rank)


def test_fsdp_ignored_weight_and_no_model_kept(ranks):
    ranks.run(case_fsdp_ignored_weight_and_no_model_kept)


def test_training_mode_on_one_rank(ranks):
    ranks.run(case_training_mode_on_one_rank)


def test_bad_value_in_one_shard(ranks):
    ranks.run(case_bad_value_in_one_shard)


def test_statistics_block_of_the_wrong_size_on_one_rank(ranks):
    ranks.run(case_statistics_block_of_the_wrong_size_on_one_rank)


def test_statistics_differ_across_ranks(ranks):
    ranks.run(case_statistics_differ_across_ranks)


def test_partial_placement_refused(ranks):
    ranks.run(case_partial_placement)


def test_groups_split_mid_group_refused(ranks):
    ranks.run(case_groups_split_unevenly)


def test_copy_and_example_inputs_refused(ranks):
    ranks.run(case_refused_calls)


@pytest.mark.gpu
def test_fsdp_on_gpu_nccl():
    """FSDP2 root-only on CUDA with NCCL: one rank per GPU (a single GPU gives a
    one-rank mesh, which still runs the collectives and the CUDA kernels)."""
    world = min(WORLD, torch.cuda.device_count())
    gpu_ranks = Ranks(world, backend="nccl")
    try:
        gpu_ranks.run(case_fsdp_root_only, "cuda")
    finally:
        gpu_ranks.close()
