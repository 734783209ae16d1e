"""Instructions per fold, counted by valgrind: a measure that noise cannot move.

On a shared machine a fold of a few milliseconds moves by 20-50% between runs
(bench_fold.py's wall-clock figures), which hides the change a patch makes.
This script counts the instructions the CPU executes instead, with valgrind's
cachegrind (``--cache-sim=no``: counting only). For each (model, tool) it runs
two child processes under valgrind, both building the model and folding one
deep copy untimed (the warm-up); one then folds ``--calls`` more copies. The
difference, divided by ``--calls``, is the instructions of one warm fold:
imports, model building and copying cancel out. Counts are exact for a given
interpreter, torch build and hash seed (PYTHONHASHSEED is set to 0, and
OPENBLAS_NUM_THREADS to 1: OpenBLAS's idle threads spin), so two
revisions can be compared on any machine. Instructions are not time: a torch
op's fixed overhead weighs more in time than in instructions, and memory-bound
kernels the other way round; use bench_fold.py for time.

Each child takes one to three minutes under valgrind. Run from the repository root:
  python benchmarks/bench_instructions.py --models yolo11n resnet50 --tools "fusedconv inplace" "ultralytics fuse"
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fold  # noqa: E402  (its models and tools, so that both scripts measure the same calls)

import torch  # noqa: E402

from fusedconv.timing import print_table  # noqa: E402


def _child(args) -> None:
    """``--child MODEL TOOL N``: fold 1 + N copies of MODEL with TOOL."""
    model_name, tool_name, calls = args.child[0], args.child[1], int(args.child[2])
    torch.set_num_threads(args.threads)
    spec = bench_fold.model_specs(224, args.yolo_size)[model_name]
    tool = next(t for t in bench_fold.TOOLS if t.name == tool_name)
    for module in tool.imports:
        __import__(module)
    model, example, pairs = bench_fold._prepare(spec, argparse.Namespace(check=True), torch.device("cpu"))
    copies = [copy.deepcopy(model) for _ in range(1 + args.calls)]  # as many in every child: copying cancels out
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for target in copies[:1 + calls]:
            tool.fold(target, example, pairs)


_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def count(model: str, tool: str, calls: int, args) -> int | str:
    """Instructions of the child that folds ``calls`` copies after the warm-up, or why it failed."""
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
               sys.executable, os.path.abspath(__file__), "--child", model, tool, str(calls),
               "--calls", str(args.calls), "--threads", str(args.threads), "--yolo-size", str(args.yolo_size)]
    # OpenBLAS's worker threads spin while they wait, a count that varies from run to run.
    environment = {**os.environ, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    found = _REFS.findall(done.stderr)
    if done.returncode != 0 or not found:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed (exit {done.returncode}): {tail[:70]}"
    return int(found[-1].replace(",", ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    all_models = list(bench_fold.model_specs(224, 64))
    all_tools = [t.name for t in bench_fold.TOOLS if not t.uses_example_inputs]
    parser.add_argument("--models", nargs="+", default=["yolo11n"], choices=all_models, metavar="MODEL")
    parser.add_argument("--tools", nargs="+", default=["fusedconv inplace"], choices=all_tools, metavar="TOOL")
    parser.add_argument("--calls", type=int, default=10, help="folds counted after the warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the children")
    parser.add_argument("--yolo-size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "TOOL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    if shutil.which("valgrind") is None:
        sys.exit("bench_instructions: valgrind is not installed (apt install valgrind)")
    rows = []
    for model in args.models:
        for tool in args.tools:
            spec = bench_fold.model_specs(224, args.yolo_size)[model]
            if not next(t for t in bench_fold.TOOLS if t.name == tool).applies_to(spec):
                continue
            base, more = count(model, tool, 0, args), count(model, tool, args.calls, args)
            per_call = (more - base) / args.calls if isinstance(base, int) and isinstance(more, int) else None
            rows.append([model, tool, "-" if per_call is None else f"{per_call / 1e6:.1f}",
                         base if isinstance(base, str) else more if isinstance(more, str) else ""])
            print(f"{model} / {tool}: {rows[-1][2]} M instructions per fold {rows[-1][3]}", flush=True)
    print_table(["model", "tool", "M instructions per warm fold", "note"], rows)


if __name__ == "__main__":
    main()
