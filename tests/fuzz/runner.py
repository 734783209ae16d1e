"""Runs the fuzzer: many seeded models, a summary, failures grouped by kind.

``python -m tests.fuzz --minutes M --seed S [--models N] [--keep-failures DIR]``

Model ``i`` of a run with seed ``S`` is generated from seed ``S * 1_000_000 + i``,
so a run is reproducible model by model; stopping on a count (``--models``)
rather than on time makes it reproducible as a whole. ``--replay FILE`` checks
one generated file (as kept by ``--keep-failures``) again.

Everything runs in this process on one thread (the machine is shared): the
thread count, sys.modules, linecache and the temporary files are restored or
removed when the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import linecache
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .check import MODES, Failure, check_file, check_source, mode_name
from .generator import generate

SEED_STRIDE = 1_000_000


@dataclass
class Summary:
    seed: int
    models: int = 0
    bns: int = 0
    folded: dict[str, int] = field(default_factory=lambda: {mode_name(*m): 0 for m in MODES})
    fold_errors: dict[str, int] = field(default_factory=lambda: {mode_name(*m): 0 for m in MODES})
    unchecked: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failing_models(self) -> int:
        return len({f.seed for f in self.failures})

    def groups(self) -> dict[tuple[str, tuple[str, ...]], list[Failure]]:
        """Failures by (kind, trap tags of the model): one group per likely cause.

        A model often holds several traps. A failure whose trap set contains
        the trap set of a smaller group of the same kind (the empty set
        included: then the traps are not needed) is most likely that group's
        cause again, so it joins that group instead of opening a new one (the
        smallest such group, to keep causes apart). Exceptions are told apart
        by their message too (``Failure.signature``)."""
        exact: dict[tuple[str, tuple[str, ...]], list[Failure]] = defaultdict(list)
        for f in self.failures:
            exact[(f.signature, f.traps)].append(f)
        out: dict[tuple[str, tuple[str, ...]], list[Failure]] = {}
        for key in sorted(exact, key=lambda k: (len(k[1]), k)):
            kind, traps = key
            parents = [k for k in out if k[0] == kind and set(k[1]) <= set(traps)]
            target = min(parents, key=lambda k: len(k[1])) if parents else key
            out.setdefault(target, []).extend(exact[key])
        return dict(sorted(out.items(), key=lambda kv: (kv[0][0], -len(kv[1]))))


@contextlib.contextmanager
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _progress(total: int | None, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="model", file=sys.stderr, dynamic_ncols=True)


def fuzz(seed: int, *, max_models: int | None = None, max_seconds: float | None = None,
         keep_failures: str | None = None, progress: bool = False) -> Summary:
    """Generate and check models until ``max_models`` or ``max_seconds`` (whichever first)."""
    if max_models is None and max_seconds is None:
        raise ValueError("give max_models or max_seconds")
    summary = Summary(seed)
    start = time.perf_counter()
    directory = tempfile.mkdtemp(prefix="fusedconv_fuzz_")
    bar = _progress(max_models, progress)
    try:
        with _one_thread():
            i = 0
            while (max_models is None or i < max_models) and \
                    (max_seconds is None or time.perf_counter() - start < max_seconds):
                model_seed = seed * SEED_STRIDE + i
                source, _ = generate(model_seed)
                result = check_source(source, model_seed, directory)
                summary.models += 1
                summary.bns += result.bns
                summary.unchecked += result.unchecked is not None
                for mode, n in result.folded.items():
                    summary.folded[mode] += n
                for mode in result.fold_errors:
                    summary.fold_errors[mode] += 1
                summary.failures += result.failures
                if not result.failures:
                    os.remove(os.path.join(directory, f"fuzz_model_{model_seed}.py"))
                i += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(failing=summary.failing_models)
        if keep_failures and summary.failures:
            os.makedirs(keep_failures, exist_ok=True)
            for f in summary.failures:
                kept = os.path.join(keep_failures, os.path.basename(f.path))
                if not os.path.exists(kept):
                    shutil.copyfile(f.path, kept)
                f.path = kept
            with open(os.path.join(keep_failures, "failures.txt"), "w") as out:
                out.write(format_summary(summary, examples=False) + "\n\n")
                out.writelines(f"{f}\n" for f in summary.failures)
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(directory, ignore_errors=True)
        for key in [k for k in linecache.cache if k.startswith(directory)]:
            linecache.cache.pop(key, None)
    summary.seconds = time.perf_counter() - start
    return summary


def _model_code(source: str, limit: int = 40) -> str:
    """The Net class and the helpers it uses: the part of a file worth reading."""
    start = source.find("\nclass ") if "\nclass " in source else 0
    end = source.find("\ndef _randomize")
    body = source[start:end].strip("\n")
    post = re.search(r"    with torch.no_grad\(\):\n(.*?)\n    example", source, re.S)
    if post and post.group(1).strip() != "pass":
        body += "\n# in make(), after model.eval():\n" + "\n".join(
            line[8:] for line in post.group(1).splitlines())
    lines = [line for line in body.splitlines() if line.strip()]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more lines)"]
    return "\n".join(lines)


def format_summary(summary: Summary, examples: bool = True) -> str:
    lines = [
        f"fusedconv fuzz: seed {summary.seed}, {summary.models} models, {summary.bns} BatchNorms, "
        f"{summary.seconds:.0f} s",
        "  folded BNs per mode: " + ", ".join(f"{m} {n}" for m, n in summary.folded.items()),
        "  FoldErrors (models) per mode: " + ", ".join(f"{m} {n}" for m, n in summary.fold_errors.items()),
    ]
    if summary.unchecked:
        lines.append(f"  {summary.unchecked} models whose unfolded output is itself not finite: accuracy not judged")
    lines.append(f"  failures: {len(summary.failures)} in {summary.failing_models} models")
    for (kind, traps), group in summary.groups().items():
        # the example shown: the fewest traps, then the shortest source
        smallest = min(group, key=lambda f: (len(f.traps), len(f.source), f.seed))
        modes = sorted({f.mode for f in group})
        lines.append(f"\n== {kind} [{', '.join(traps) or 'no trap'}]: {len(group)} failures in "
                     f"{len({f.seed for f in group})} models, modes {', '.join(modes)}")
        where = smallest.path if os.path.exists(smallest.path) else "file not kept (use --keep-failures DIR)"
        lines.append(f"   smallest: seed {smallest.seed}, mode {smallest.mode}, {where}")
        lines.append(f"   {smallest.detail}")
        if examples:
            lines.extend("   | " + line for line in _model_code(smallest.source).splitlines())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget (default: 1, or none when --models is given)")
    parser.add_argument("--models", type=int, default=None, help="stop after this many models (deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-failures", metavar="DIR", help="copy the source files of failing models here")
    parser.add_argument("--replay", metavar="FILE", help="check one generated file again and exit")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.replay:
        with _one_thread():
            result = check_file(args.replay)
        print(f"{args.replay}: {result.bns} BNs, folded per mode {result.folded}, "
              f"FoldErrors {result.fold_errors or 'none'}")
        for f in result.failures:
            print(f"  {f}")
        return 1 if result.failures else 0
    minutes = args.minutes if args.minutes is not None or args.models is not None else 1.0
    max_seconds = None if minutes is None else minutes * 60
    summary = fuzz(args.seed, max_models=args.models, max_seconds=max_seconds,
                   keep_failures=args.keep_failures, progress=not args.no_progress)
    print(format_summary(summary))
    return 1 if summary.failures else 0
