"""Timing and machine-description helpers: one implementation for the command
line (``fusedconv demo``) and the benchmark scripts (``benchmarks/``).

* :func:`measure` times one operation ``repeats`` times;
  :func:`measure_interleaved` times several (e.g. a model before and after
  folding) in alternating rounds, so that drift in the machine's speed (other
  processes, clock changes) falls on all of them alike;
* :class:`Timing` holds the samples: median, quartiles, interquartile range;
* :func:`format_ms`, :func:`format_table` and :func:`print_table` print them;
  :func:`machine_info` says where a figure was taken.
"""

from __future__ import annotations

import gc
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "Timing",
    "cpu_model_name",
    "format_ms",
    "format_table",
    "machine_info",
    "measure",
    "measure_interleaved",
    "print_machine_info",
    "print_table",
]


def cpu_model_name() -> str:
    """The CPU's model name from lscpu (or /proc/cpuinfo), else platform.processor()."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a figure depends on: versions, threads, CPU (and GPU when timing on one)."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": cpu_model_name(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def print_machine_info(info: dict[str, Any]) -> None:
    print("# " + ", ".join(f"{key}={value}" for key, value in info.items()), flush=True)


@dataclass
class Timing:
    """Wall-clock samples of one measured operation, in seconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        """The first and third quartiles (both the one sample when there is one)."""
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    @property
    def iqr(self) -> float:
        """Interquartile range: the spread of the middle half of the samples."""
        q1, q3 = self.quartiles
        return q3 - q1

    def to_json(self) -> dict[str, Any]:
        q1, q3 = self.quartiles
        return {"median_s": self.median, "min_s": self.min, "q1_s": q1, "q3_s": q3, "samples_s": self.samples}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn: Callable[[Any], Any], arg: Any, device: torch.device, collect_garbage: bool) -> float:
    """One call of ``fn(arg)``: garbage collected before, collector off during, in seconds."""
    if collect_garbage:
        gc.collect()
    _synchronize(device)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn(arg)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            result = fn(arg)
            elapsed = time.perf_counter() - t0
    finally:
        if gc_was_enabled:
            gc.enable()
    del result
    return elapsed


def measure(
    fn: Callable[[Any], Any],
    *,
    repeats: int,
    warmup: int = 0,
    setup: Callable[[], Any] | None = None,
    device: torch.device | str = "cpu",
    collect_garbage: bool = True,
) -> Timing:
    """Time ``fn(setup())`` ``repeats`` times after ``warmup`` untimed calls.

    ``setup`` (e.g. a deepcopy of the model) runs outside the timed region, and so
    does the freeing of what ``fn`` returns. The garbage collector is off while
    ``fn`` runs (as in ``timeit``) and, with ``collect_garbage``, run before each
    call. On CUDA each call is timed with a pair of ``torch.cuda.Event`` after a
    device synchronize, so queued work of earlier calls is not counted.
    """
    return measure_interleaved([fn], repeats=repeats, warmup=warmup, setup=setup, device=device,
                               collect_garbage=collect_garbage)[0]


def measure_interleaved(
    fns: Sequence[Callable[[Any], Any]],
    *,
    repeats: int,
    warmup: int = 0,
    setup: Callable[[], Any] | None = None,
    device: torch.device | str = "cpu",
    collect_garbage: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[Timing]:
    """Time each of ``fns`` ``repeats`` times, interleaved: round ``r`` calls every
    function once, in the order A, B, C, ... on even rounds and reversed on odd
    rounds, so that a machine getting faster or slower during the measurement
    weighs on all of them equally. Each call is timed as in :func:`measure`
    (``setup()`` gives each call its argument, outside the timed region);
    ``warmup`` untimed rounds come first. ``progress(k)``, if given, is called
    after each of the ``warmup + repeats`` rounds with ``k`` rounds done.

    Returns one :class:`Timing` per function; sample ``r`` of each comes from the
    same round, so ``a.samples[r] / b.samples[r]`` is a paired ratio.
    """
    device = torch.device(device)
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if not fns:
        return []
    samples: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeats):
        order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
        for k in order:
            arg = setup() if setup is not None else None
            elapsed = _timed_call(fns[k], arg, device, collect_garbage)
            del arg
            if i >= warmup:
                samples[k].append(elapsed)
        if progress is not None:
            progress(i + 1)
    return [Timing(s) for s in samples]


def format_ms(seconds: float | None, digits: int = 2) -> str:
    """``0.0123`` -> ``"12.30"`` (milliseconds); None -> ``"-"``."""
    return "-" if seconds is None else f"{seconds * 1e3:.{digits}f}"


def format_table(
    rows: Sequence[Sequence[Any]],
    headers: Sequence[Any] | None = None,
    *,
    left: tuple[int, ...] | None = (0,),
    indent: str = "",
    sep: str = "  ",
) -> str:
    """A plain, aligned text table. Rows may have fewer cells than the widest.
    The columns at indices ``left`` (negative ones count from the end) are
    left-aligned, the others right-aligned; ``left=None`` left-aligns all.
    With ``headers``, a rule of dashes follows the header line."""
    all_rows = [list(map(str, r)) for r in ([headers] if headers is not None else []) + list(rows)]
    if not all_rows:
        return ""
    ncols = max(map(len, all_rows))
    widths = [max((len(r[i]) for r in all_rows if len(r) > i), default=0) for i in range(ncols)]
    left_set = set(range(ncols)) if left is None else {i % ncols for i in left}

    def line(cells: list[str]) -> str:
        return (indent + sep.join(
            c.ljust(widths[i]) if i in left_set else c.rjust(widths[i]) for i, c in enumerate(cells)
        )).rstrip()

    lines = [line(r) for r in all_rows]
    if headers is not None:
        lines.insert(1, indent + sep.join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(headers: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> None:
    """Print :func:`format_table` with a header line: the columns at indices
    ``left`` (negative ones count from the end) are left-aligned, the others
    right-aligned."""
    print(format_table(rows, headers, left=left))
