"""Re-parameterization blocks: what deploying buys, and what merging costs.

Sections (each prints its own table, all measured in this one run):

  latency   every block of fusedconv.blocks, branched (eval mode) vs deployed,
            one image through one block; and a RepVGG-A0-sized network built
            from RepVGGBlocks at batch 1 and 8.
  merge     time to merge every block of a network in place:
            fusedconv.reparameterize (one batched call per backend that loads)
            against a loop of block.reparameterize() (one merge per block), on
            RepVGG-A0-, RepVGG-B3- and RepLKNet-31B-sized networks built from
            the blocks; the achieved bandwidth counts one read and one write of
            every deployed weight byte, next to a copy of the same bytes.
            With timm installed: timm's repvgg_a0 merged by timm's own
            reparameterize_model against fusedconv.fuse, both on copies.
  frozen    one training step of a conv + BN stack in frozen-BN tuning mode
            (ConvBN.freeze_batchnorm) against the same stack as conv then an
            eval-mode BN: time, and the bytes autograd saves for backward
            (on a GPU also the allocator's peak).

Run from the repository root:
  python benchmarks/bench_blocks.py                     # all sections, CPU
  python benchmarks/bench_blocks.py --sections merge --networks repvgg_b3 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusedconv.timing import format_ms, machine_info, measure, print_machine_info, print_table  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import blocks, kernels  # noqa: E402
from fusedconv.registry import find_blocks  # noqa: E402


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters for every BN (not 0 and 1,
    which would make the merges trivially cheap to get right)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


# ----------------------------------------------------------------------------- networks

def repvgg(widths: list[int], depths: list[int]) -> nn.Module:
    """A RepVGG body: stages of RepVGGBlocks, the first block of each with stride 2."""
    layers, channels = [], 3
    for width, depth in zip(widths, depths):
        for i in range(depth):
            layers.append(blocks.RepVGGBlock(channels, width, 3, stride=2 if i == 0 else 1, activation=nn.ReLU()))
            channels = width
    return nn.Sequential(*layers)


def replknet(widths: list[int], depths: list[int], kernels_: list[int]) -> nn.Module:
    """A RepLKNet-like body: per block a 1x1 ConvBN, a depthwise LargeKernelConv
    (large kernel with a 5x5 beside it), a 1x1 ConvBN, then an FFN of two 1x1
    ConvBNs (4x expansion); stages joined by stride-2 ConvBNs."""
    layers: list[nn.Module] = [blocks.ConvBN(3, widths[0], 3, stride=4, activation=nn.ReLU())]
    for stage, (width, depth, kernel) in enumerate(zip(widths, depths, kernels_)):
        if stage:
            layers.append(blocks.ConvBN(widths[stage - 1], width, 3, stride=2, activation=nn.ReLU()))
        for _ in range(depth):
            layers += [
                blocks.ConvBN(width, width, 1, activation=nn.ReLU()),
                blocks.LargeKernelConv(width, width, kernel, groups=width, small_kernel=5),
                blocks.ConvBN(width, width, 1),
                blocks.ConvBN(width, 4 * width, 1, activation=nn.GELU()),
                blocks.ConvBN(4 * width, width, 1),
            ]
    return nn.Sequential(*layers)


NETWORKS: dict[str, Callable[[], nn.Module]] = {
    # RepVGG (Ding et al., 2021), table 2 widths and depths.
    "repvgg_a0": lambda: repvgg([48, 48, 96, 192, 1280], [1, 2, 4, 14, 1]),
    "repvgg_b3": lambda: repvgg([64, 192, 384, 768, 2560], [1, 4, 6, 16, 1]),
    # RepLKNet-31B (Ding et al., 2022): channels, depths and kernels of its four stages.
    "replknet_31b": lambda: replknet([128, 256, 512, 1024], [2, 2, 18, 2], [31, 29, 27, 13]),
}

BLOCKS: dict[str, Callable[[], nn.Module]] = {
    "ConvBN 3x3": lambda: blocks.ConvBN(64, 64, 3),
    "RepVGGBlock 3x3": lambda: blocks.RepVGGBlock(64, 64, 3),
    "ACBlock 3x3": lambda: blocks.ACBlock(64, 64, 3),
    "DiverseBranchBlock 3x3": lambda: blocks.DiverseBranchBlock(64, 64, 3),
    "MobileOneBlock 3x3 dw, k=4": lambda: blocks.MobileOneBlock(64, 64, 3, groups=64, num_branches=4),
    "OREPABlock 3x3": lambda: blocks.OREPABlock(64, 64, 3),
    "LargeKernelConv 31x31 dw": lambda: blocks.LargeKernelConv(64, 64, 31, groups=64),
    "DilatedReparamBlock 13x13 dw": lambda: blocks.DilatedReparamBlock(64, 64, 13, groups=64),
}


def deployed(model: nn.Module) -> nn.Module:
    return fusedconv.reparameterize(copy.deepcopy(model))


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------- sections

def latency_rows(pairs, x: torch.Tensor, args) -> list[list[str]]:
    rows = []
    with torch.no_grad():
        for name, model in pairs:
            model = randomize_statistics(model).to(args.device)
            fast = deployed(model)
            before = measure(lambda _: model(x), repeats=args.repeats, warmup=3, device=args.device)
            after = measure(lambda _: fast(x), repeats=args.repeats, warmup=3, device=args.device)
            rows.append([name, "x".join(map(str, x.shape)), format_ms(before.median, 3), format_ms(after.median, 3),
                         f"{before.median / after.median:.2f}x"])
    return rows


def section_latency(args) -> None:
    print("\n## latency: branched (eval) vs deployed, median of", args.repeats)
    x = torch.randn(1, 64, 56, 56, device=args.device)
    rows = latency_rows(((name, build()) for name, build in BLOCKS.items()), x, args)
    for batch in (1, 8):
        rows += latency_rows([("RepVGG-A0-sized network", NETWORKS["repvgg_a0"]())],
                             torch.randn(batch, 3, 224, 224, device=args.device), args)
    print_table(["block", "input", "branched ms", "deployed ms", "speed-up"], rows)


def section_merge(args) -> None:
    print(f"\n## merge: every block of a network, in place, median of {args.merge_repeats}")
    backends = [name for name, why in kernels.available_backends(args.device).items() if why is None]
    rows = []
    for name in args.networks:
        model = randomize_statistics(NETWORKS[name]()).to(args.device)
        nbytes = weight_bytes(deployed(model))
        source = torch.ones(nbytes // 4, device=args.device)
        destination = torch.zeros_like(source)
        copy_time = measure(lambda _: destination.copy_(source), repeats=args.merge_repeats, warmup=1,
                            device=args.device).median
        del source, destination
        found = len(find_blocks(model))
        rows.append([name, "copy of the same bytes", found, f"{nbytes / 1e6:.0f}", format_ms(copy_time),
                     f"{2 * nbytes / copy_time / 1e9:.1f}", "1.00"])

        def merge_each(m, backend):
            for _, block, _ in find_blocks(m):
                block.reparameterize(backend=backend)

        candidates = [(f"block.reparameterize() loop ({b})", lambda m, b=b: merge_each(m, b)) for b in backends[:1]]
        candidates += [(f"fusedconv.reparameterize ({b})", lambda m, b=b: fusedconv.reparameterize(m, backend=b))
                       for b in backends]
        for label, merge in candidates:
            seconds = measure(merge, setup=lambda: copy.deepcopy(model), repeats=args.merge_repeats,
                              device=args.device).median
            rows.append([name, label, found, f"{nbytes / 1e6:.0f}", format_ms(seconds),
                         f"{2 * nbytes / seconds / 1e9:.1f}", f"{copy_time / seconds:.2f}"])
    print_table(["network", "merge", "blocks", "MB", "median ms", "GB/s", "vs copy"], rows, left=(0, 1))
    timm_comparison(args)


def timm_comparison(args) -> None:
    try:
        import timm
        from timm.utils.model import reparameterize_model
    except ImportError:
        print("(timm not installed: no comparison with timm's reparameterize_model)")
        return
    model = randomize_statistics(timm.create_model("repvgg_a0", pretrained=False)).to(args.device)
    rows = []
    timings = {
        "timm reparameterize_model (copy)": lambda m: reparameterize_model(m),
        "fusedconv.fuse (copy)": lambda m: fusedconv.fuse(m),
        "fusedconv.fuse (in place)": lambda m: fusedconv.fuse(m, inplace=True),
    }
    results = {}
    for label, fn in timings.items():
        setup = (lambda: copy.deepcopy(model)) if "in place" in label else (lambda: model)
        results[label] = measure(fn, setup=setup, repeats=args.merge_repeats, warmup=1, device=args.device).median
    base = results["timm reparameterize_model (copy)"]
    for label, seconds in results.items():
        rows.append(["timm repvgg_a0", label, format_ms(seconds), f"{base / seconds:.2f}x"])
    print_table(["model", "tool", "median ms", "vs timm"], rows, left=(0, 1))


def saved_bytes(step: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward during ``step`` (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(storages.values())


def section_frozen(args) -> None:
    print("\n## frozen-BN tuning: one training step of 8 ConvBN(128, 128, 3) + ReLU, batch 16, 56x56")

    def stack(frozen: bool) -> nn.Module:
        layers = [blocks.ConvBN(128, 128, 3, activation=nn.ReLU()) for _ in range(8)]
        model = randomize_statistics(nn.Sequential(*layers)).train().to(args.device)
        for layer in layers:
            if frozen:
                layer.freeze_batchnorm()
            else:
                layer.bn.eval()  # the same computation: conv, then BN with its running statistics
        return model

    x = torch.randn(16, 128, 56, 56, device=args.device)
    rows = []
    for label, frozen in (("conv then eval-mode BN", False), ("ConvBN frozen-BN tuning", True)):
        model = stack(frozen)

        def step(_=None, model=model):
            model.zero_grad(set_to_none=True)
            loss = model(x).square().mean()
            loss.backward()
            return loss

        seconds = measure(step, repeats=args.repeats, warmup=2, device=args.device).median
        saved = saved_bytes(lambda model=model: model(x).square().mean())
        peak = "-"
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = f"{(torch.cuda.max_memory_allocated() - base) / 1e6:.0f}"
        rows.append([label, format_ms(seconds), f"{saved / 1e6:.0f}", peak])
    print_table(["mode", "step ms", "saved for backward MB", "GPU peak extra MB"], rows)


SECTIONS = {"latency": section_latency, "merge": section_merge, "frozen": section_frozen}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=11, help="timed repeats for latencies and steps")
    parser.add_argument("--merge-repeats", type=int, default=5, help="timed repeats for merges")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print_machine_info(machine_info(args.device))
    for section in args.sections:
        SECTIONS[section](args)


if __name__ == "__main__":
    main()
