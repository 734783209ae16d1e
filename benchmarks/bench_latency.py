"""Inference latency of folded (fusedconv.fuse) vs unfolded models.

For each model, dtype and batch size: warm-up calls, then the median of --runs
timed forward passes under torch.no_grad(), unfolded and folded measured in
alternating rounds (so that drift of a shared machine hits both alike).
On CUDA each call is timed with torch.cuda.Event; float16 is added there.
The model is cast to the dtype first and then folded (fusedconv keeps dtypes).

Run from the repository root:
  python benchmarks/bench_latency.py                       # CPU, float32, batch 1 and 8
  python benchmarks/bench_latency.py --device cuda --json latency.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusedconv.timing import Timing, format_ms, machine_info, measure, print_machine_info, print_table  # noqa: E402

import fusedconv  # noqa: E402


@dataclass
class LatencyModel:
    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[int], torch.Tensor]  # batch size -> CPU float32 input


def _image_input(size: int) -> Callable[[int], torch.Tensor]:
    return lambda batch: torch.randn(batch, 3, size, size)


def _torchvision(arch: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        return getattr(torchvision.models, arch)(weights=None)

    return build


def _demo_model() -> LatencyModel | None:
    """fusedconv's built-in demo network (calibrated BN statistics, 64x64 input), if the package has one."""
    try:
        from fusedconv import examples
    except ImportError:
        return None
    return LatencyModel(
        "fusedconv demo",
        lambda: examples.calibrate(examples.build_demo_network()),
        lambda batch: examples.demo_input(batch),
    )


def latency_models(image_size: int) -> dict[str, LatencyModel]:
    models = [
        LatencyModel("resnet50", _torchvision("resnet50"), _image_input(image_size)),
        LatencyModel("mobilenet_v2", _torchvision("mobilenet_v2"), _image_input(image_size)),
    ]
    demo = _demo_model()
    if demo is not None:
        models.append(demo)
    return {m.name: m for m in models}


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def time_pair(unfolded: nn.Module, folded: nn.Module, x: torch.Tensor, args, device) -> tuple[Timing, Timing]:
    """Median-ready samples for both models, measured in alternating rounds."""
    samples_unfolded: list[float] = []
    samples_folded: list[float] = []
    rounds = max(1, min(args.rounds, args.runs))
    per_round = [args.runs // rounds + (i < args.runs % rounds) for i in range(rounds)]
    with torch.no_grad():
        for i, runs in enumerate(per_round):
            warmup = args.warmup if i == 0 else 1
            for model, samples in ((unfolded, samples_unfolded), (folded, samples_folded)):
                timing = measure(lambda _, model=model: model(x), repeats=runs, warmup=warmup, device=device,
                                 collect_garbage=False)
                samples.extend(timing.samples)
    return Timing(samples_unfolded), Timing(samples_folded)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help="resnet50, mobilenet_v2, 'fusedconv demo' (default: all available)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, float32 and float16 on CUDA")
    parser.add_argument("--runs", type=int, default=50, help="timed forward passes per model (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forward passes first")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternate unfolded/folded this many times, runs split between rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    dtypes = args.dtypes or (["float32", "float16"] if device.type == "cuda" else ["float32"])
    available = latency_models(args.image_size)
    names = args.models or list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"unknown or unavailable models {unknown}; available: {list(available)}")

    info = machine_info(device)
    print_machine_info(info)
    print(f"# runs={args.runs} warmup={args.warmup} rounds={args.rounds}; torch.no_grad; times are medians")

    results = []
    for name in names:
        spec = available[name]
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            unfolded = spec.build().eval().to(device=device, dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                folded = fusedconv.fuse(unfolded)
            bn_before, bn_left = fusedconv.count_batchnorms(unfolded), fusedconv.count_batchnorms(folded)
            for batch in args.batch_sizes:
                x = spec.make_input(batch).to(device=device, dtype=dtype)
                with torch.no_grad():
                    diff = _relative_difference(folded(x), unfolded(x))
                t_unfolded, t_folded = time_pair(unfolded, folded, x, args, device)
                result = {
                    "model": name, "dtype": dtype_name, "batch": batch, "input": list(x.shape),
                    "bn_before": bn_before, "bn_left": bn_left, "rel_diff": diff,
                    "unfolded": t_unfolded.to_json(), "folded": t_folded.to_json(),
                    "speedup": t_unfolded.median / t_folded.median,
                }
                results.append(result)
                print(f"  {name:<14} {dtype_name:<8} batch {batch:<3} unfolded {format_ms(t_unfolded.median)} ms"
                      f"  folded {format_ms(t_folded.median)} ms  speed-up {result['speedup']:.2f}x", flush=True)
            del unfolded, folded

    headers = ["model", "dtype", "batch", "BN before", "BN left", "unfolded ms", "folded ms", "speed-up",
               "rel diff"]
    rows = [[r["model"], r["dtype"], str(r["batch"]), str(r["bn_before"]), str(r["bn_left"]),
             format_ms(r["unfolded"]["median_s"], 3), format_ms(r["folded"]["median_s"], 3),
             f"{r['speedup']:.2f}x", f"{r['rel_diff']:.1e}"] for r in results]
    print()
    print_table(headers, rows, left=(0, 1))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "config": vars(args), "results": results}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
