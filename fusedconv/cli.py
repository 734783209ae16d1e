"""Command line interface: ``fusedconv demo``, ``fusedconv plan``, ``fusedconv fuse`` and ``fusedconv backends``.

``fusedconv demo`` builds the built-in demo network (:mod:`fusedconv.examples`),
folds it, checks the folded model against a float64 reference and prints the
numbers.  ``fusedconv plan MODULE:CALLABLE`` prints the fusion plan of any model
that a no-argument callable builds, e.g. ``torchvision.models:resnet50``.
``fusedconv fuse MODULE:CALLABLE --checkpoint IN -o OUT`` folds a checkpoint of
that model into a folded checkpoint (:func:`fusedconv.fold_checkpoint`), building
the architecture on the meta device where the callable allows it.
``fusedconv backends`` says which kernel backends can run here, and why not.

``python -m fusedconv ...`` is the same as the ``fusedconv`` console script.

Every error is one line on stderr (``fusedconv: error: ...``) and a non-zero exit
code (see ``EXIT_*``); ``--debug`` or ``FUSEDCONV_DEBUG=1`` shows the traceback
instead. Timing uses :mod:`fusedconv.timing`, shared with ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

import fusedconv
from fusedconv import kernels
from fusedconv.errors import BackendUnavailable, FoldError
from fusedconv.kernels import KernelInputError
from fusedconv.timing import Timing, format_table, measure_interleaved

logger = logging.getLogger("fusedconv")

#: Exit codes.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # the folded model is not accurate enough, or fusedconv refused (FoldError, backend)
EXIT_USAGE = 2  # bad arguments or a model that cannot be built (argparse uses 2 too)
EXIT_INTERNAL = 3  # an unexpected exception: a bug (--debug or FUSEDCONV_DEBUG=1 shows the traceback)
EXIT_INTERRUPTED = 130  # Ctrl-C

#: Environment variable that, set to anything but "" or "0", works like ``--debug``.
DEBUG_ENV = "FUSEDCONV_DEBUG"

#: ``fusedconv demo`` fails when the folded model's relative error against float64
#: is more than this many times the unfolded model's own error.
MAX_ERROR_RATIO = 1.2


class CLIError(Exception):
    """A user-facing error: printed as ``fusedconv: error: <message>``, exit code 2."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error raises :class:`CLIError` (one line on stderr
    from :func:`main`) instead of printing the usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # The subcommand's parser leaves an option it does not know to this one:
        # point to the subcommand's help, which lists its options.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            raise CLIError(f"unrecognized arguments: {' '.join(extras)} "
                           f"(see {self.prog}{' ' + command if command else ''} --help)")
        return parsed


# --------------------------------------------------------------------------- helpers


class _LogFormatter(logging.Formatter):
    """``fusedconv: warning: message``, as the command line writes its warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.name}: {record.levelname.lower()}: {super().format(record)}"


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


def _one_line(text: str) -> str:
    """A message on one line (multi-line exception messages joined with "; ")."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines) if lines else "(no message)"


def _device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"bad device {text!r} ({_one_line(exc)})") from None


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


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    """Left-aligned columns, three spaces apart (:func:`fusedconv.timing.format_table`)."""
    return format_table(rows, left=None, indent=indent, sep="   ")


_WARMUP_ROUNDS = 3  # untimed rounds before the demo's timed ones
_NOISY_SPREAD = 2.0  # the speed-up's upper quartile over its lower one beyond which the demo warns


@torch.no_grad()
def measure_latencies(models: Sequence[nn.Module], x: torch.Tensor, runs: int, warmup: int = _WARMUP_ROUNDS,
                      progress: Callable[[int], None] | None = None) -> list[Timing]:
    """Wall times of ``model(x)`` for each model, interleaved (one call of each
    per round, :func:`fusedconv.timing.measure_interleaved`): ``runs`` timed
    rounds after ``warmup`` untimed ones."""
    calls = [lambda _, m=m: m(x) for m in models]
    return measure_interleaved(calls, repeats=runs, warmup=warmup, device=x.device, progress=progress)


def paired_speedup(before: Timing, after: Timing) -> Timing:
    """The per-round ratios before / after of two interleaved timings (as a
    :class:`Timing` of ratios: median and quartiles)."""
    return Timing([b / a if a > 0 else math.inf for b, a in zip(before.samples, after.samples)])


class _Progress:
    """Progress of the demo's stages on stderr: a tqdm bar where tqdm is
    installed, else one plain line per stage. Off unless enabled."""

    def __init__(self, enabled: bool, stages: int):
        self.enabled, self.stages, self.done = enabled, stages, 0
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=stages, desc="fusedconv demo", file=sys.stderr, leave=False,
                                 bar_format="{desc}{n_fmt}/{total_fmt} {bar} {elapsed}{postfix}")

    def stage(self, text: str) -> None:
        """Start the next stage."""
        if not self.enabled:
            return
        if self._bar is not None:
            if self.done:
                self._bar.update(1)
            self._bar.set_description(f"fusedconv demo: {text}")
        else:
            print(f"fusedconv demo: [{self.done + 1}/{self.stages}] {text}", file=sys.stderr, flush=True)
        self.done += 1

    def rounds(self, total: int) -> Callable[[int], None] | None:
        """A callback for :func:`measure_interleaved`: rounds done out of ``total``."""
        if not self.enabled:
            return None
        if self._bar is not None:
            bar = self._bar
            return lambda k: bar.set_postfix_str(f"round {k}/{total}")
        marks = {max(1, round(total * f)) for f in (0.25, 0.5, 0.75, 1.0)}
        return lambda k: print(f"fusedconv demo:   {k}/{total} rounds", file=sys.stderr, flush=True) \
            if k in marks else None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


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


def _progress_enabled(args: argparse.Namespace) -> bool:
    if args.progress is not None:
        return args.progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _run_demo(args: argparse.Namespace) -> int:
    progress = _Progress(_progress_enabled(args), stages=5)
    try:
        return _demo(args, progress)
    finally:
        progress.close()


def _demo(args: argparse.Namespace, progress: _Progress) -> int:
    from fusedconv import examples

    if args.size < 8:
        raise CLIError(f"--size must be at least 8 (the demo network downsamples by 4), got {args.size}")
    device = args.device
    _check_device(device)
    if args.backend is not None:  # say so now rather than after the calibration
        kernels.choose(device, args.backend)

    progress.stage("building and calibrating the demo network")
    logger.debug("building the demo network (seed %d)", args.seed)
    model = examples.build_demo_network(args.seed).to(device)
    calib_shape = (max(args.batch, 8), examples.IN_CHANNELS, args.size, args.size)
    logger.debug("calibrating BatchNorm statistics on random %s inputs", calib_shape)
    examples.calibrate(model, calib_shape, steps=4, seed=args.seed)
    x = examples.demo_input(args.batch, seed=args.seed + 1, size=args.size).to(device)
    example_inputs = (x,) if args.dataflow == "run" else None

    progress.stage("planning")
    bns_before = fusedconv.count_batchnorms(model)
    plan = fusedconv.plan(model, example_inputs)
    logger.debug("plan: %d folds, %d skipped, source %s", len(plan.folds), len(plan.skipped), plan.source)

    progress.stage("folding")
    # The unfolded model is needed after folding (error and latency); with --inplace keep a copy.
    original = copy.deepcopy(model) if args.inplace else model
    _synchronize(device)
    start = time.perf_counter()
    fused = fusedconv.fuse(model, example_inputs, inplace=args.inplace, backend=args.backend)
    _synchronize(device)
    fold_time = time.perf_counter() - start
    logger.debug("fuse took %s", _ms(fold_time))
    if args.inplace and fused is not model:
        logger.warning("fuse(..., inplace=True) returned a new module instead of the model itself")

    progress.stage(f"checking against float64 on {args.verify_batch} images")
    bns_after = fusedconv.count_batchnorms(fused)
    # The error is measured on its own, larger batch: the demo network has only ten
    # outputs per image and the error ratio of a couple of images is mostly noise.
    x_verify = examples.demo_input(args.verify_batch, seed=args.seed + 2, size=args.size).to(device)
    report = fusedconv.verify(original, fused, (x_verify,))
    ratio = report.ratio

    progress.stage(f"timing {args.runs} interleaved rounds, after {_WARMUP_ROUNDS} untimed ones")
    before, after = measure_latencies([original, fused], x, args.runs, warmup=_WARMUP_ROUNDS,
                                      progress=progress.rounds(args.runs + _WARMUP_ROUNDS))
    speedup = paired_speedup(before, after)
    progress.close()

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
    (b1, b3), (a1, a3), (s1, s3) = before.quartiles, after.quartiles, speedup.quartiles
    print(
        _table(
            [
                ["layers folded", str(len(plan.folds))],
                ["BatchNorms", f"{bns_before} -> {bns_after}"],
                [f"error vs float64, {args.verify_batch} images", "max-abs", "relative"],
                ["  unfolded", f"{report.original.max_abs:.3e}", f"{report.original.rel:.3e}"],
                ["  folded", f"{report.fused.max_abs:.3e}", f"{report.fused.rel:.3e}"],
                ["  ratio", "", f"{ratio:.3f}", f"folded / unfolded, limit {MAX_ERROR_RATIO}"],
                [f"latency, {args.runs} interleaved runs", "before", "after", "speed-up (per run pair)"],
                ["  median", _ms(before.median), _ms(after.median), f"{speedup.median:.2f}x"],
                ["  quartiles", f"{b1 * 1e3:.2f}-{b3 * 1e3:.2f} ms", f"{a1 * 1e3:.2f}-{a3 * 1e3:.2f} ms",
                 f"{s1:.2f}-{s3:.2f}x"],
                ["fold time", _ms(fold_time)],
            ]
        )
    )
    if s3 > _NOISY_SPREAD * s1:  # the speed-up's middle half spans more than 2x: the machine was busy
        logger.warning("the latency moved a lot between runs (speed-up quartiles %.2f-%.2fx): the machine is busy; "
                       "rerun with more --runs%s, or on a quiet machine", s1, s3,
                       ", --threads 1" if device.type == "cpu" else "")
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


def build_architecture(spec: str) -> nn.Module:
    """The model of ``spec`` built on the meta device (no memory for its values),
    or on the CPU when its constructor needs values (it reads or fills them)."""
    try:
        with torch.device("meta"):
            return build_model(spec)
    except CLIError as error:
        logger.info("building %s on the meta device failed (%s); building it on the CPU", spec, error)
        return build_model(spec)


class _ByteProgress:
    """Bytes of a checkpoint read so far, on stderr: a tqdm bar where tqdm is
    installed, else a plain line at each tenth."""

    def __init__(self, enabled: bool, label: str):
        self.enabled, self.label, self._bar, self._tenths = enabled, label, None, 0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(desc=label, file=sys.stderr, leave=False, unit="B", unit_scale=True)

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.total = total
            self._bar.update(done - self._bar.n)
            return
        tenths = 10 * done // max(total, 1)
        if tenths > self._tenths:
            self._tenths = tenths
            print(f"{self.label}: {done / 1e6:.0f} of {total / 1e6:.0f} MB", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_device(device: torch.device | None) -> None:
    """Refuse, as a bad argument, a ``--device`` that no fold can compute on here."""
    reason = kernels.why_device_unavailable(device) if device is not None else None
    if reason:
        raise CLIError(f"--device {device}: {reason}")


def _working_directory_on_path() -> str | None:
    """Append the working directory to ``sys.path`` (returned) unless it is there
    already: a MODULE:CALLABLE beside the user imports, which a console script's
    path does not allow. Last, unlike ``python -m`` (which puts it first), so
    that it shadows no installed package."""
    try:
        directory = os.getcwd()
    except OSError:  # deleted under us: nothing there to import
        return None
    if directory in sys.path or "" in sys.path:
        return None
    sys.path.append(directory)
    return directory


def run_fuse(args: argparse.Namespace) -> int:
    """``fusedconv fuse MODULE:CALLABLE --checkpoint IN -o OUT``: fold a checkpoint file."""
    _check_device(args.device)
    if args.checkpoint is None:  # the factory's own weights (e.g. a pretrained model)
        model = build_model(args.spec)
        source = model.state_dict()
    else:
        model = build_architecture(args.spec)
        source = args.checkpoint
    progress = _ByteProgress(_progress_enabled(args), "fusedconv fuse")
    try:
        report = fusedconv.fold_checkpoint(model, source, args.output, device=args.device, backend=args.backend,
                                           flush_subnormals=args.flush_subnormals, progress=progress)
    finally:
        progress.close()
    plan = report.plan
    print(f"fusedconv fuse: {args.spec} -> {args.output}: {plan.num_folded} BatchNorms folded into "
          f"{len(plan.folds)} layers, {len(plan.merges)} blocks merged, {len(plan.skipped)} left; "
          f"{report.tensors} tensors, {report.checkpoint_bytes / 1e6:.1f} MB read in {report.seconds:.2f} s")
    for skip in plan.skipped:
        print(f"  left {skip.module}: {skip.reason}")
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
    common.add_argument(
        "--debug",
        action="store_true",
        help=f"debug output, and a traceback instead of a one-line error (also: {DEBUG_ENV}=1)",
    )

    parser = _ArgumentParser(
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
    demo.add_argument("--device", type=_device, default=torch.device("cpu"), help="torch device (default cpu)")
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
    demo.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr (tqdm if installed; default: when stderr is a terminal)",
    )
    demo.set_defaults(func=run_demo)

    backends = sub.add_parser(
        "backends",
        parents=[common],
        help="list the kernel backends and why any of them cannot run here",
        description="Say which of the cuda, triton, cpp and torch backends can run on the device, and why not.",
    )
    backends.add_argument(
        "--device", type=_device, default=None, help="torch device (default: cuda if there is one, else cpu)"
    )
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

    fuse = sub.add_parser(
        "fuse",
        parents=[common],
        help="fold a checkpoint of the model built by MODULE:CALLABLE into a folded checkpoint",
        description="Build the model of MODULE:CALLABLE (on the meta device where its constructor allows), "
        "fold the checkpoint IN (a .pt/.pth state dict or a .safetensors file; without --checkpoint, the "
        "model's own weights) and write the folded state dict to OUT (.pt or .safetensors by its name). "
        "Load the result with fusedconv.load_folded(model, OUT).",
    )
    fuse.add_argument("spec", metavar="MODULE:CALLABLE", help="e.g. torchvision.models:resnet50")
    fuse.add_argument("--checkpoint", metavar="IN", default=None,
                      help="the checkpoint to fold (default: the weights the callable builds the model with)")
    fuse.add_argument("-o", "--output", metavar="OUT", required=True, help="the folded checkpoint to write")
    fuse.add_argument("--device", type=_device, default=None,
                      help="where the arithmetic runs, e.g. cuda (default: where the tensors are)")
    fuse.add_argument("--backend", choices=("torch", "cpp", "cuda", "triton"), default=None,
                      help="kernel backend (default: the fastest that loads for the device)")
    fuse.add_argument("--flush-subnormals", action="store_true",
                      help="set to zero the weights that the fold makes subnormal (they slow CPU inference)")
    fuse.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="show progress on stderr (default: when stderr is a terminal)")
    fuse.set_defaults(func=run_fuse)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fusedconv")
    except Exception:  # not installed
        return getattr(fusedconv, "__version__", "unknown")


def _debug_requested(argv: Sequence[str] | None) -> bool:
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command line: one line on stderr."""
    print(f"fusedconv: warning: {_one_line(message)} [{category.__name__}]", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fusedconv`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Errors are one line on stderr and a non-zero exit code: 1 when the folded
    model fails its check or fusedconv refuses (:class:`fusedconv.FoldError`, a
    backend that cannot run), 2 for bad arguments, 3 for an unexpected exception
    (a bug: ``--debug`` or ``FUSEDCONV_DEBUG=1`` re-raises it with its traceback).
    """
    debug = _debug_requested(argv)
    handler = _StderrHandler()
    handler.setFormatter(_LogFormatter())
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    appended = None
    try:
        appended = _working_directory_on_path()
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args = build_parser().parse_args(argv)
            if args.verbose:
                logger.setLevel(logging.DEBUG)
            return args.func(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except CLIError as exc:
        print(f"fusedconv: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except FoldError as exc:
        if debug:
            raise
        print(f"fusedconv: cannot fold: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except (BackendUnavailable, KernelInputError) as exc:
        if debug:
            raise
        print(f"fusedconv: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except BrokenPipeError:  # e.g. `fusedconv plan ... | head`: stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        print("fusedconv: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        print(
            f"fusedconv: internal error: {type(exc).__name__}: {_one_line(exc)} "
            f"(a bug in fusedconv? rerun with --debug or {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        if appended is not None and appended in sys.path:  # the last one: not an equal one a model's code added
            del sys.path[len(sys.path) - 1 - sys.path[::-1].index(appended)]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
