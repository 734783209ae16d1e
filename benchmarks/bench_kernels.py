"""Batched folding of a large synthetic network: every backend against a
per-layer loop and against a plain copy of the same bytes.

    python benchmarks/bench_kernels.py                      # CPU: 1,000 conv+BN layers, 1.1 GB of float32
    python benchmarks/bench_kernels.py --device cuda --dtype float16
    python benchmarks/bench_kernels.py --layers 200 --repeats 3   # a quick look

Rows, all in one run on the same weights:

* ``copy``: one device-to-device (or memory-to-memory) copy of as many bytes as
  the weights hold, the floor for any pass that reads and writes every byte;
* ``fuse_conv_bn_eval loop``: ``torch.nn.utils.fusion.fuse_conv_bn_eval`` once
  per layer, what most tools do (median of ``--loop-repeats``, by default as
  many as ``--repeats``);
* ``fusedconv <backend>``: one :func:`fusedconv.kernels.rescale_` call for all
  layers (the BN scales computed beforehand, as ``fuse`` does while planning);
* ``fusedconv <backend>, into new weights``: the new weights allocated
  (``torch.empty_like``, as ``fuse`` does for a copy) and written from the old
  ones by the same call with ``sources=``, in one pass; allocation and first
  touch of the new memory are inside the timed region, as they are in ``fuse``.

Every row is a median of the count its ``runs`` column gives, after one untimed
call that measures the memory. Bandwidth counts one read and one write of every
weight byte. Peak extra memory is what the call allocated beyond the weights
(CUDA: the allocator's peak; CPU: the process's peak resident memory, reset
before each row).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

sys.path.insert(0, os.path.dirname(__file__))
from fusedconv.timing import machine_info, measure, print_machine_info, print_table  # noqa: E402

from fusedconv import kernels  # noqa: E402
from fusedconv.affine import batchnorm_affines  # noqa: E402
from fusedconv.layers import bn_statistics  # noqa: E402


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Bytes allocated beyond what was live at the start, at the peak."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as refs:  # resets the peak resident size
                refs.write("5")
            self.start = _resident_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.extra = _resident_bytes("VmHWM") - self.start


def build_layers(count: int, in_channels: int, out_channels: int, dtype, device, seed: int):
    """``count`` Conv2d 3x3 + BatchNorm2d pairs with random weights and statistics."""
    gen = torch.Generator().manual_seed(seed)
    convs, bns = [], []
    for _ in range(count):
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        bn = nn.BatchNorm2d(out_channels)
        with torch.no_grad():
            conv.weight.normal_(generator=gen)
            bn.running_mean.normal_(generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
            # close to 1 so that repeated in-place runs stay in range
            bn.weight.uniform_(0.95, 1.05, generator=gen)
            bn.bias.normal_(generator=gen)
        convs.append(conv.to(device, dtype).eval())
        bns.append(bn.to(device, dtype).eval())
    return convs, bns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    parser.add_argument("--layers", type=int, default=1000)
    parser.add_argument("--in-channels", type=int, default=192)
    parser.add_argument("--out-channels", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=None,
                        help="repeats of the (slow) per-layer loop (default: as many as --repeats)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.loop_repeats is None:
        args.loop_repeats = args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print_machine_info(machine_info(device))

    convs, bns = build_layers(args.layers, args.in_channels, args.out_channels, dtype, device, seed=0)
    weights = [conv.weight for conv in convs]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    print(f"# {args.layers} Conv2d({args.in_channels}, {args.out_channels}, 3) + BatchNorm2d layers, "
          f"{nbytes / 1e9:.2f} GB of {args.dtype} weights on {device}")
    scales = [a.scale for a in batchnorm_affines([bn_statistics(bn, f"bn{i}") for i, bn in enumerate(bns)])]

    usable = [name for name, why_not in kernels.available_backends(device).items() if why_not is None]
    for name in usable:  # load each backend's libraries before anything is measured
        tiny = torch.ones(2, 2, device=device, dtype=dtype)
        kernels.rescale_([tiny], [scales[0][:2]], [None], [1], backend=name)
    rows, reference = [], None

    def row(name, fn, repeats):
        nonlocal reference
        # Memory from the first call: on the CPU only pages the process has not
        # touched before count, so later calls that reuse freed memory show nothing.
        with PeakMemory(device) as peak:
            fn(None)
        timing = measure(fn, repeats=repeats, device=device)
        seconds = timing.median
        reference = reference or seconds
        rows.append([name, str(repeats), f"{seconds * 1e3:.1f}", f"{2 * nbytes / seconds / 1e9:.1f}",
                     f"{reference / seconds:.2f}", f"{peak.extra / 1e6:.1f}", f"{100 * peak.extra / nbytes:.2f}%"])
        return seconds

    # Both buffers written first, so that the copy is timed without page faults.
    source = torch.full((nbytes // 4,), 0.5, dtype=torch.float32, device=device)
    destination = torch.full_like(source, 0.25)
    row("copy (same bytes)", lambda _: destination.copy_(source), args.repeats)
    del source, destination
    loop = row("fuse_conv_bn_eval loop", lambda _: [fuse_conv_bn_eval(c, b) for c, b in zip(convs, bns)],
               args.loop_repeats)
    backend_times = {}
    for name, why_not in kernels.available_backends(device).items():
        if why_not is not None:
            print(f"# {name}: {why_not}")
            continue
        backend_times[name] = row(
            f"fusedconv {name}",
            lambda _, name=name: kernels.rescale_(weights, scales, [None] * len(weights), [1] * len(weights),
                                                  backend=name),
            args.repeats,
        )
    # What fuse does for a folded copy: new weights allocated with empty_like
    # and written from the old ones in one pass. The allocation and the first
    # touch of the fresh memory (page faults on the CPU) are timed, as in fuse;
    # the new weights are returned so that freeing them is not (measure drops
    # the result outside the timed region).
    def into_new_weights(name):
        outputs = [torch.empty_like(w) for w in weights]
        kernels.rescale_(outputs, scales, [None] * len(weights), [1] * len(weights), sources=weights, backend=name)
        return outputs

    for name in backend_times:
        row(f"fusedconv {name}, into new weights", lambda _, name=name: into_new_weights(name), args.repeats)
    print()
    print_table(["", "runs", "ms", "GB/s", "vs copy", "extra MB", "extra / weights"], rows)
    print()
    for name, seconds in backend_times.items():
        print(f"fusedconv {name}: {loop / seconds:.1f}x faster than the per-layer loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
