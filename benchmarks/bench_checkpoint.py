"""Folding a checkpoint file against the I/O floor: time and peak memory.

Builds a synthetic deep conv net (``--layers`` Conv2d(C, C, 3) + BatchNorm2d
pairs, random weights and statistics) sized to ``--gigabytes``, saves its state
dict as a ``.pt`` in ``--dir``, then times, each in a fresh Python process so
that memory figures start clean, and each ``--repeats`` times (median):

  torch.load + torch.save   torch.load(path, weights_only=True) then torch.save of the
                            same dict to a new .pt: the I/O floor a fold cannot beat
  fold -> .safetensors      fusedconv.fold_checkpoint(model_on_meta, path, out.safetensors)
  fold -> .pt               fusedconv.fold_checkpoint(model_on_meta, path, out.pt)

Peak memory is the process's peak resident set above its resident set just
before the call (``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs``; file pages mapped from the checkpoint count), as in
bench_kernels.py. The page cache is warm after the first write of the file:
the figures measure the fold's own cost, not the disk's.

Run from the repository root (needs about 3x --gigabytes of free disk):
  python benchmarks/bench_checkpoint.py --gigabytes 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fusedconv.examples import randomize_batchnorm_stats  # noqa: E402
from fusedconv.timing import machine_info, print_machine_info, print_table  # noqa: E402


def deep_net(layers: int, channels: int) -> nn.Sequential:
    """``layers`` Conv2d(channels, channels, 3, bias=False) + BatchNorm2d + ReLU blocks."""
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                         nn.BatchNorm2d(channels), nn.ReLU()) for _ in range(layers)])


# Run in a fresh process: prints {"seconds": ..., "peak_extra_bytes": ...} as JSON.
_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
from benchmarks.bench_checkpoint import deep_net
import fusedconv

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

torch.set_num_threads({threads})
with torch.device("meta"):
    model = deep_net({layers}, {channels})
tool, source, out = {tool!r}, {source!r}, {out!r}
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
start = status("VmRSS")
t = time.perf_counter()
if tool == "torch.load + torch.save":
    torch.save(torch.load(source, weights_only=True), out)
else:
    fusedconv.fold_checkpoint(model, source, out)
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "peak_extra_bytes": status("VmHWM") - start}}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=2.0, help="checkpoint size (default 2)")
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    print_machine_info(machine_info(torch.device("cpu")))

    per_layer = args.channels * args.channels * 9 * 4
    layers = max(1, round(args.gigabytes * 1e9 / per_layer))
    root = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        source = str(Path(directory) / "model.pt")
        model = randomize_batchnorm_stats(deep_net(layers, args.channels), torch.Generator().manual_seed(0))
        torch.save(model.state_dict(), source)
        size = Path(source).stat().st_size
        del model
        print(f"# {layers} Conv2d({args.channels}, {args.channels}, 3) + BatchNorm2d layers: "
              f"a {size / 1e9:.2f} GB checkpoint, {args.threads} threads, median of {args.repeats}")
        tools = {"torch.load + torch.save": "copy.pt", "fold -> .safetensors": "folded.safetensors",
                 "fold -> .pt": "folded.pt"}
        results = {tool: [] for tool in tools}
        for _ in range(args.repeats):  # interleaved, so that a busy spell hits every tool alike
            for tool, name in tools.items():
                code = _CHILD.format(root=root, threads=args.threads, layers=layers, channels=args.channels,
                                     tool=tool, source=source, out=str(Path(directory) / name))
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                results[tool].append(json.loads(done.stdout.strip().splitlines()[-1]))
                Path(directory, name).unlink()
        floor = statistics.median(r["seconds"] for r in results["torch.load + torch.save"])
        rows = []
        for tool, runs in results.items():
            seconds = statistics.median(r["seconds"] for r in runs)
            extra = statistics.median(r["peak_extra_bytes"] for r in runs)
            rows.append([tool, f"{seconds:.2f}", f"{seconds / floor:.2f}x", f"{extra / 1e6:.0f}",
                         f"{100 * extra / size:.1f}%"])
        print_table(["tool", "seconds", "vs load+save", "peak extra MB", "of checkpoint"], rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"checkpoint_bytes": size, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
