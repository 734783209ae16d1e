"""Command line interface: ``fusedconv demo``, ``fusedconv plan`` and ``fusedconv backends``.

``fusedconv demo`` builds the built-in demo network (:mod:`fusedconv.examples`),
folds it, checks the folded model against a float64 reference and prints the
numbers.  ``fusedconv plan MODULE:CALLABLE`` prints the fusion plan of any model
that a no-argument callable builds, e.g. ``torchvision.models:resnet50``.
``fusedconv backends`` says which kernel backends can run here, and why not.

``python -m fusedconv ...`` is the same as the ``fusedconv`` console script.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

import fusedconv
from fusedconv import kernels

logger = logging.getLogger("fusedconv")

#: Exit codes.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # the demo ran but the folded model is not accurate enough
EXIT_USAGE = 2  # bad arguments or a model that cannot be built (argparse uses 2 too)

#: ``fusedconv demo`` fails when the folded model's relative error against float64
#: is more than this many times the unfolded model's own error.
MAX_ERROR_RATIO = 1.2


class CLIError(Exception):
    """A user-facing error: printed as ``fusedconv: error: <message>``, exit code 2."""


# --------------------------------------------------------------------------- helpers


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to the *current* ``sys.stderr`` (so that
    redirections made after it was created, e.g. by pytest's capsys, are honoured)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it
        pass


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (spaces allowed) -> ``(1, 3, 224, 224)``."""
    error = argparse.ArgumentTypeError(
        f"bad shape {text!r}: expected comma-separated positive integers such as 1,3,224,224"
    )
    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise error from None
    if any(d < 1 for d in shape):
        raise error
    return shape


def load_callable(spec: str):
    """Resolve ``"package.module:attr.path"`` to the object it names.

    Raises :class:`CLIError` with a message saying what is wrong with ``spec``.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise CLIError(
            f"bad model spec {spec!r}: expected MODULE:CALLABLE, e.g. torchvision.models:resnet50"
        )
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"bad model spec {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(
                f"bad model spec {spec!r}: {type(obj).__name__} {getattr(obj, '__name__', obj)!r} "
                f"has no attribute {part!r}"
            ) from None
    if not callable(obj):
        raise CLIError(f"bad model spec {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a callable")
    return obj


def build_model(spec: str) -> nn.Module:
    """Call the no-argument callable named by ``spec`` and return its module in eval mode."""
    factory = load_callable(spec)
    logger.debug("building model: %s()", spec)
    try:
        model = factory()
    except Exception as exc:
        raise CLIError(f"calling {spec}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(model: nn.Module, x: torch.Tensor, runs: int, warmup: int = 3) -> float:
    """Median wall time of ``model(x)`` in seconds over ``runs`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        model(x)
    _synchronize(x.device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(x)
        _synchronize(x.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    """Left-aligned columns; the first column is padded to the widest label."""
    widths = [max(len(row[i]) for row in rows if len(row) > i) for i in range(max(map(len, rows)))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append((indent + "   ".join(cells)).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- demo


def run_demo(args: argparse.Namespace) -> int:
    """``fusedconv demo``: fold the demo network and report error, latency and fold time."""
    if args.threads is None:
        return _run_demo(args)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(old_threads)


def _run_demo(args: argparse.Namespace) -> int:
    from fusedconv import examples

    if args.size < 8:
        raise CLIError(f"--size must be at least 8 (the demo network downsamples by 4), got {args.size}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")

    logger.debug("building the demo network (seed %d)", args.seed)
    model = examples.build_demo_network(args.seed).to(device)
    calib_shape = (max(args.batch, 8), examples.IN_CHANNELS, args.size, args.size)
    logger.debug("calibrating BatchNorm statistics on random %s inputs", calib_shape)
    examples.calibrate(model, calib_shape, steps=4, seed=args.seed)
    x = examples.demo_input(args.batch, seed=args.seed + 1, size=args.size).to(device)
    example_inputs = (x,) if args.dataflow == "run" else None

    bns_before = fusedconv.count_batchnorms(model)
    plan = fusedconv.plan(model, example_inputs)
    logger.debug("plan: %d folds, %d skipped, source %s", len(plan.folds), len(plan.skipped), plan.source)

    latency_before = measure_latency(model, x, args.runs)
    # verify() needs the unfolded model after folding; with --inplace keep a copy.
    original = copy.deepcopy(model) if args.inplace else model

    _synchronize(device)
    start = time.perf_counter()
    fused = fusedconv.fuse(model, example_inputs, inplace=args.inplace, backend=args.backend)
    _synchronize(device)
    fold_time = time.perf_counter() - start
    logger.debug("fuse took %s", _ms(fold_time))
    if args.inplace and fused is not model:
        logger.warning("fuse(..., inplace=True) returned a new module instead of the model itself")

    bns_after = fusedconv.count_batchnorms(fused)
    # The error is measured on its own, larger batch: the demo network has only ten
    # outputs per image and the error ratio of a couple of images is mostly noise.
    x_verify = examples.demo_input(args.verify_batch, seed=args.seed + 2, size=args.size).to(device)
    report = fusedconv.verify(original, fused, (x_verify,))
    latency_after = measure_latency(fused, x, args.runs)
    ratio = report.ratio

    params = sum(p.numel() for p in original.parameters())
    n = torch.get_num_threads()
    threads = f", {n} thread{'' if n == 1 else 's'}" if device.type == "cpu" else ""
    print(
        f"fusedconv demo: demo network ({params:,} parameters), input {args.batch}x"
        f"{examples.IN_CHANNELS}x{args.size}x{args.size}, seed {args.seed}"
    )
    print(
        f"  {device}{threads}, torch {torch.__version__}, folded "
        f"{'in place' if args.inplace else 'as a copy'}, dataflow {plan.source}, "
        f"backend {kernels.choose(device, args.backend)}"
    )
    print()
    speedup = latency_before / latency_after if latency_after > 0 else float("inf")
    print(
        _table(
            [
                ["layers folded", str(len(plan.folds))],
                ["BatchNorms", f"{bns_before} -> {bns_after}"],
                [f"error vs float64, {args.verify_batch} images", "max-abs", "relative"],
                ["  unfolded", f"{report.original.max_abs:.3e}", f"{report.original.rel:.3e}"],
                ["  folded", f"{report.fused.max_abs:.3e}", f"{report.fused.rel:.3e}"],
                ["  ratio", "", f"{ratio:.3f}", f"folded / unfolded, limit {MAX_ERROR_RATIO}"],
                [f"latency, median of {args.runs}", "before", "after"],
                ["", _ms(latency_before), _ms(latency_after), f"speed-up {speedup:.2f}x"],
                ["fold time", _ms(fold_time)],
            ]
        )
    )
    print()
    print(str(plan))
    print()
    print(f"backends on {device.type}:")
    print(kernels.backend_report(device))

    if not math.isfinite(ratio) or ratio > MAX_ERROR_RATIO:
        print(
            f"fusedconv demo: FAILED: the folded model's error is {ratio:.3f}x the unfolded "
            f"model's (limit {MAX_ERROR_RATIO})",
            file=sys.stderr,
        )
        return EXIT_CHECK_FAILED
    if bns_after:
        logger.warning("%d BatchNorm(s) were left in the demo network", bns_after)
    return EXIT_OK


# --------------------------------------------------------------------------- plan


def run_plan(args: argparse.Namespace) -> int:
    """``fusedconv plan MODULE:CALLABLE``: print the fusion plan of a model."""
    model = build_model(args.spec)
    example_inputs = None
    if args.input_shape is not None:
        try:
            param = next(model.parameters())
            dtype = param.dtype if param.is_floating_point() else torch.float32
            device = param.device
        except StopIteration:
            dtype, device = torch.float32, torch.device("cpu")
        example_inputs = (torch.randn(args.input_shape, dtype=dtype, device=device),)
        logger.debug("example input: %s %s", tuple(args.input_shape), dtype)
    plan = fusedconv.plan(model, example_inputs)
    bns = fusedconv.count_batchnorms(model)
    shape = "x".join(map(str, args.input_shape)) if args.input_shape else "none"
    print(
        f"fusedconv plan: {args.spec} ({type(model).__name__}), example input {shape}, "
        f"dataflow {plan.source}"
    )
    print(f"  {len(plan.folds)} folds, {plan.num_folded} of {bns} BatchNorms folded, {len(plan.skipped)} skipped")
    print()
    print(str(plan))
    return EXIT_OK


def run_backends(args: argparse.Namespace) -> int:
    """``fusedconv backends``: which kernel backends run here, and why the others don't."""
    print(kernels.backend_report(args.device))
    return EXIT_OK


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fusedconv`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="print debug output on stderr")

    parser = argparse.ArgumentParser(
        prog="fusedconv",
        description="Fold BatchNorm layers into the convolutions and linear layers beside them, exactly.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="fold the built-in demo network and report error, latency and fold time",
        description="Build and calibrate the built-in demo network, fold it, verify the folded "
        "model against a float64 reference and time it. Exit code 1 when the folded model's "
        f"error is more than {MAX_ERROR_RATIO}x the unfolded model's.",
    )
    demo.add_argument("--batch", type=_positive_int, default=8, help="batch size (default 8)")
    demo.add_argument("--size", type=_positive_int, default=64, help="image height and width (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="seed of weights and inputs (default 0)")
    demo.add_argument("--inplace", action="store_true", help="fold the model in place")
    demo.add_argument(
        "--verify-batch",
        type=_positive_int,
        default=64,
        help="images on which the error against float64 is measured (default 64)",
    )
    demo.add_argument("--runs", type=_positive_int, default=20, help="timed runs per latency (default 20)")
    demo.add_argument("--device", default="cpu", help="torch device (default cpu)")
    demo.add_argument(
        "--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    demo.add_argument(
        "--dataflow",
        choices=("static", "run"),
        default="static",
        help="find the dataflow without running the model (the forward code, then torch.fx where that "
        "is not enough; default) or from one run on the demo input",
    )
    demo.add_argument(
        "--backend",
        choices=kernels.BACKENDS,
        default=None,
        help="kernels that scale the weights (default: the fastest that loads, or $FUSEDCONV_BACKEND)",
    )
    demo.set_defaults(func=run_demo)

    backends = sub.add_parser(
        "backends",
        parents=[common],
        help="list the kernel backends and why any of them cannot run here",
        description="Say which of the cuda, triton, cpp and torch backends can run on the device, and why not.",
    )
    backends.add_argument("--device", default=None, help="torch device (default: cuda if there is one, else cpu)")
    backends.set_defaults(func=run_backends)

    plan = sub.add_parser(
        "plan",
        parents=[common],
        help="print the fusion plan of a model built by MODULE:CALLABLE",
        description="Import MODULE, call CALLABLE() with no arguments and print the fusion plan "
        "of the model it returns (the model is not modified).",
    )
    plan.add_argument("spec", metavar="MODULE:CALLABLE", help="e.g. torchvision.models:resnet50")
    plan.add_argument(
        "--input-shape",
        type=parse_shape,
        default=None,
        metavar="SHAPE",
        help="shape of a random example input, e.g. 1,3,224,224: the dataflow then comes from "
        "one real run instead of torch.fx",
    )
    plan.set_defaults(func=run_plan)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fusedconv")
    except Exception:  # not installed
        return getattr(fusedconv, "__version__", "unknown")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fusedconv`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"fusedconv: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except fusedconv.FoldError as exc:
        print(f"fusedconv: cannot fold: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except BrokenPipeError:  # e.g. `fusedconv plan ... | head`: stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_CHECK_FAILED
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
