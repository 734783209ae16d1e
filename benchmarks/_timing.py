"""Timing and machine-description helpers shared by the benchmark scripts.

One way to time things (``measure``) and one way to say where the figures
came from (``machine_info``), so that fold times and latencies are taken and
attributed the same way.
"""

from __future__ import annotations

import gc
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


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

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "samples_s": self.samples}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    device = torch.device(device)
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    samples: list[float] = []
    for i in range(warmup + repeats):
        arg = setup() if setup is not None else None
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
        del result, arg
        if i >= warmup:
            samples.append(elapsed)
    return Timing(samples)


def format_ms(seconds: float | None, digits: int = 2) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.{digits}f}"


def print_table(headers: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> None:
    """A plain, aligned text table: the columns at indices ``left`` (negative ones
    count from the end) are left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    left_set = {i % len(headers) for i in left}

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if i in left_set else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
