"""Folding an FSDP2-sharded model in place on CPU ranks, against the unsharded fold.

A deep conv net (``--layers`` Conv2d(C, C, 3) + BatchNorm2d blocks, random
weights and statistics, the same on every rank) is folded in place with
``fusedconv.fuse(model, inplace=True)``. The convs have no bias, the common case:
under FSDP2 each fold adds one to the FSDP2 parameter group of the conv's weight,
on a torch whose FSDP2 internals fusedconv knows (README, "Sharded models"; the
benchmark reports any BN left).

  unsharded, 1 process      the whole model in one process
  FSDP2 per block, N ranks  every Conv+BN block and the root ``fully_shard``-ed over
                            N gloo ranks (each holds 1/N of every weight); the time is
                            the slowest rank's, between two barriers

Each repeat folds a fresh model (built and sharded outside the timed region);
medians over ``--repeats``. Ranks run one torch thread each, so the unsharded
fold runs on one thread too: the comparison is per core.

Run from the repository root:
  python benchmarks/bench_sharded.py --layers 64 --channels 256 --ranks 2 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fusedconv.examples import randomize_batchnorm_stats  # noqa: E402
from fusedconv.timing import machine_info, measure, print_machine_info, print_table  # noqa: E402

import fusedconv  # noqa: E402


def deep_net(layers: int, channels: int) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                          nn.BatchNorm2d(channels)) for _ in range(layers)])
    return randomize_batchnorm_stats(model, torch.Generator().manual_seed(1)).eval()


def _rank(rank: int, world: int, store: str, layers: int, channels: int, repeats: int, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        model = deep_net(layers, channels)
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        gc.collect()  # and no collection while timed (as fusedconv.timing.measure does)
        gc.disable()
        try:
            dist.barrier()
            start = time.perf_counter()
            fusedconv.fuse(model, inplace=True)
            dist.barrier()
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
    results.put((rank, (times[1:], fusedconv.count_batchnorms(model))))
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print_machine_info(machine_info(torch.device("cpu")))
    weights = args.layers * args.channels * args.channels * 9 * 4
    print(f"# {args.layers} Conv2d({args.channels}, {args.channels}, 3) + BatchNorm2d blocks, "
          f"{weights / 1e6:.0f} MB of float32 weights, 1 thread per process, median of {args.repeats}")

    torch.set_num_threads(1)
    single = measure(lambda model: fusedconv.fuse(model, inplace=True), repeats=args.repeats, warmup=1,
                     setup=lambda: deep_net(args.layers, args.channels)).median
    model = fusedconv.fuse(deep_net(args.layers, args.channels), inplace=True)  # for its BNs left

    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as directory:
        store = os.path.join(directory, "store")
        processes = [context.Process(target=_rank, args=(rank, args.ranks, store, args.layers, args.channels,
                                                         args.repeats, results)) for rank in range(args.ranks)]
        for process in processes:
            process.start()
        per_rank = dict(results.get(timeout=600) for _ in processes)
        for process in processes:
            process.join()
    slowest = [max(per_rank[rank][0][i] for rank in per_rank) for i in range(args.repeats)]
    sharded = statistics.median(slowest)
    left = max(bns for _, bns in per_rank.values())
    print_table(["fold in place", "ms", "vs unsharded", "BN left"], [
        ["unsharded, 1 process", f"{single * 1e3:.1f}", "1.00x", str(fusedconv.count_batchnorms(model))],
        [f"FSDP2 per block, {args.ranks} ranks (slowest)", f"{sharded * 1e3:.1f}", f"{sharded / single:.2f}x",
         str(left)],
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
