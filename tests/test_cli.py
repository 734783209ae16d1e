"""The ``fusedconv`` command line (demo, plan) and the built-in demo network."""

from __future__ import annotations

import copy
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fusedconv
from fusedconv import cli, examples
from utils import float64_reference, relative_error

SMALL_DEMO = ["demo", "--batch", "2", "--size", "16", "--runs", "2", "--threads", "1"]

# Every BN of the demo network and where it must go (layer, BNs before it, BNs after it).
DEMO_FOLDS = {
    ("stem.0", (), ("stem.1",)),
    ("depthwise.0", (), ("depthwise.1",)),
    ("dilated.0", (), ("dilated.1",)),
    ("block.conv1", ("block.bn0",), ("block.bn1",)),  # bn0 cannot go into conv0: conv0 feeds the skip
    ("block.conv2", (), ("block.bn2",)),
    ("up", (), ("up_bn",)),
    ("proj", ("pre_bn",), ()),
    ("fc", (), ("fc_bn",)),
}
DEMO_NUM_BN = 9

RESNET18_NUM_BN = 20


def parse_demo_output(text: str) -> dict:
    """The numbers of ``fusedconv demo``'s table; a missing line fails the test."""

    def find(pattern: str) -> tuple[str, ...]:
        match = re.search(pattern, text, re.MULTILINE)
        assert match, f"no line matching {pattern!r} in:\n{text}"
        return match.groups()

    folded = find(r"^\s*layers folded\s+(\d+)\s*$")
    bn_before, bn_after = find(r"^\s*BatchNorms\s+(\d+) -> (\d+)\s*$")
    unf_abs, unf_rel = find(r"^\s*unfolded\s+(\S+)\s+(\S+)\s*$")
    fol_abs, fol_rel = find(r"^\s*folded\s+(\S+)\s+(\S+)\s*$")
    (ratio,) = find(r"^\s*ratio\s+([0-9.]+|nan|inf)\s")
    (runs,) = find(r"^\s*latency, (\d+) interleaved runs\s+before\s+after\s+speed-up")
    lat_before, lat_after, speedup = find(r"^\s*median\s+([0-9.]+) ms\s+([0-9.]+) ms\s+([0-9.]+|inf)x\s*$")
    q = find(r"^\s*quartiles\s+([0-9.]+)-([0-9.]+) ms\s+([0-9.]+)-([0-9.]+) ms\s+([0-9.]+|inf)-([0-9.]+|inf)x\s*$")
    (fold_ms,) = find(r"^\s*fold time\s+([0-9.]+) ms\s*$")
    return {
        "folded": int(folded[0]),
        "bn_before": int(bn_before),
        "bn_after": int(bn_after),
        "unfolded_abs": float(unf_abs),
        "unfolded_rel": float(unf_rel),
        "folded_abs": float(fol_abs),
        "folded_rel": float(fol_rel),
        "ratio": float(ratio),
        "runs": int(runs),
        "latency_before_ms": float(lat_before),
        "latency_after_ms": float(lat_after),
        "speedup": float(speedup),
        "quartiles": tuple(map(float, q)),
        "fold_ms": float(fold_ms),
    }


def check_demo_numbers(nums: dict) -> None:
    assert nums["folded"] == len(DEMO_FOLDS)
    assert nums["bn_before"] == DEMO_NUM_BN
    assert nums["bn_after"] == 0
    # float32 against float64: small but not zero (zero would mean the reference is not float64)
    assert 0 < nums["unfolded_rel"] < 1e-5
    assert 0 < nums["folded_rel"] < 1e-5
    assert 0 < nums["unfolded_abs"] < 1e-4 and 0 < nums["folded_abs"] < 1e-4
    assert nums["ratio"] <= cli.MAX_ERROR_RATIO
    # the printed ratio is the ratio of the printed relative errors (3 significant digits each)
    assert nums["ratio"] == pytest.approx(nums["folded_rel"] / nums["unfolded_rel"], rel=0.02)
    assert nums["latency_before_ms"] > 0 and nums["latency_after_ms"] > 0
    b1, b3, a1, a3, s1, s3 = nums["quartiles"]
    # the medians lie within their quartiles (two decimals printed)
    assert b1 - 0.01 <= nums["latency_before_ms"] <= b3 + 0.01
    assert a1 - 0.01 <= nums["latency_after_ms"] <= a3 + 0.01
    assert 0 < s1 <= nums["speedup"] + 0.01 and nums["speedup"] <= s3 + 0.01
    assert nums["fold_ms"] > 0


# --------------------------------------------------------------------------- demo network


def test_demo_network_has_every_fold_kind():
    model = examples.build_demo_network(0)
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    assert any(m.groups == m.in_channels == m.out_channels > 1 for m in convs), "no depthwise conv"
    assert any(m.dilation != (1, 1) for m in convs), "no dilated conv"
    assert any(m.kernel_size == (1, 1) and m.padding == (0, 0) for m in convs), "no 1x1 conv"
    transposed = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert transposed and all(m.groups > 1 and m.out_channels // m.groups > 1 for m in transposed)
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    assert fusedconv.count_batchnorms(model) == DEMO_NUM_BN
    assert sum(p.numel() for p in model.parameters()) < 300_000
    # BN affine parameters are not the trivial 1 / 0 (they would hide a wrong axis), some gammas < 0
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        assert not torch.any(m.weight == 1) and not torch.all(m.bias == 0)
    assert any((m.weight < 0).any() for m in bns)


def test_build_demo_network_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = (examples.build_demo_network(s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stem.0.weight"], sc["stem.0.weight"])
    assert not torch.equal(sa["up_bn.weight"], sc["up_bn.weight"])


def test_calibrate_gives_real_statistics_and_eval_mode():
    model = examples.build_demo_network(0)
    params = {k: v.clone() for k, v in model.named_parameters()}
    momenta = {n: m.momentum for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    shape = (4, 3, 16, 16)
    out = examples.calibrate(model, shape, steps=2, seed=3)
    assert out is model and not model.training
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    assert {n: m.momentum for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)} == momenta

    # the running stats are the plain average of the batch stats of the calibration passes
    stem = copy.deepcopy(model.stem[0])
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(shape, generator=gen) for _ in range(2)]
    with torch.no_grad():
        ys = [stem(x) for x in xs]
    mean = sum(y.mean((0, 2, 3)) for y in ys) / 2
    var = sum(y.var((0, 2, 3), unbiased=True) for y in ys) / 2
    torch.testing.assert_close(model.stem[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.stem[1].running_var, var, rtol=1e-5, atol=1e-6)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert not torch.all(m.running_var == 1) and not torch.all(m.running_mean == 0)

    with pytest.raises(ValueError, match="batch size"):
        examples.calibrate(examples.build_demo_network(0), (1, 3, 16, 16))


def test_demo_input():
    x = examples.demo_input(3, seed=5, size=20)
    assert x.shape == (3, 3, 20, 20) and x.dtype == torch.float32
    assert torch.equal(x, examples.demo_input(3, seed=5, size=20))
    assert not torch.equal(x, examples.demo_input(3, seed=6, size=20))


@pytest.mark.parametrize("example", [False, True], ids=["fx", "run"])
def test_demo_network_plan_and_fold(example):
    model = examples.calibrate(examples.build_demo_network(0), (8, 3, 32, 32), steps=2, seed=0)
    x = examples.demo_input(2, seed=1, size=32)
    inputs = (x,) if example else None
    state = copy.deepcopy(model.state_dict())

    plan = fusedconv.plan(model, inputs)
    assert plan.source == ("run" if example else "torch.fx")
    assert {(f.layer, tuple(f.before), tuple(f.after)) for f in plan.folds} == DEMO_FOLDS
    assert plan.num_folded == DEMO_NUM_BN
    assert plan.skipped == []

    fused = fusedconv.fuse(model, inputs)
    assert fused is not model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # copy: untouched
    assert fusedconv.count_batchnorms(fused) == 0
    assert isinstance(fused.block.bn0, nn.Identity) and isinstance(fused.stem[1], nn.Identity)
    # conv0's output is also the skip: conv0 itself must not have changed
    assert torch.equal(fused.block.conv0.weight, model.block.conv0.weight)
    assert fused.block.conv0.bias is None

    ref = float64_reference(model, (x,))
    with torch.no_grad():
        err_fused = relative_error(fused(x), ref)
        err_orig = relative_error(model(x), ref)
    assert 0 < err_orig < 1e-5
    assert err_fused <= cli.MAX_ERROR_RATIO * err_orig


# --------------------------------------------------------------------------- fusedconv demo


def test_demo_in_process(capsys):
    rc = cli.main(SMALL_DEMO)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = captured.out
    assert out.startswith("fusedconv demo:")
    assert "input 2x3x16x16" in out and "copy" in out and "dataflow torch.fx" in out
    check_demo_numbers(parse_demo_output(out))
    # the plan follows the table and names the layers and BNs that were folded
    plan_text = out.split("fold time", 1)[1]
    for layer, before, after in DEMO_FOLDS:
        for name in (layer, *before, *after):
            assert name in plan_text, f"{name} missing from the printed plan"
    assert captured.err == ""  # no warnings, no debug output without --verbose
    # which backend folded, and which backends this machine has
    assert "backend cpp" in out or "backend torch" in out
    assert "backends on cpu:" in out and " torch: available" in out


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_demo_with_a_backend(capsys, backend):
    from fusedconv.kernels import available_backends

    if available_backends("cpu")[backend] is not None:
        pytest.skip(f"{backend}: {available_backends('cpu')[backend]}")
    rc = cli.main([*SMALL_DEMO, "--backend", backend])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"backend {backend}" in captured.out
    check_demo_numbers(parse_demo_output(captured.out))


def test_backends_command(capsys):
    assert cli.main(["backends", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("cuda", "triton", "cpp", "torch"):
        assert f"{name}: " in out
    assert " torch: available" in out


def test_demo_inplace_and_run_dataflow(capsys):
    rc = cli.main([*SMALL_DEMO, "--inplace", "--dataflow", "run", "--seed", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "in place" in captured.out and "dataflow run" in captured.out and "seed 3" in captured.out
    check_demo_numbers(parse_demo_output(captured.out))


def test_demo_verbose_logs_debug_lines(capsys):
    logger = logging.getLogger("fusedconv")
    handlers, level = list(logger.handlers), logger.level
    assert cli.main([*SMALL_DEMO, "--verbose"]) == 0
    assert logger.handlers == handlers and logger.level == level  # main() cleans up
    err = capsys.readouterr().err
    assert "fusedconv: debug: calibrating" in err
    assert "fusedconv: debug: fuse took" in err
    # the handler is removed again: a later quiet run prints nothing on stderr
    assert cli.main(SMALL_DEMO) == 0
    assert capsys.readouterr().err == ""


def test_demo_fails_when_the_folded_model_is_wrong(capsys, monkeypatch):
    real_fuse = fusedconv.fuse

    def slightly_wrong_fuse(*args, **kwargs):
        fused = real_fuse(*args, **kwargs)
        with torch.no_grad():  # a few ulps on one layer: about 2.5x the float32 error
            fused.proj.weight.mul_(1 + 5e-7)
        return fused

    monkeypatch.setattr(fusedconv, "fuse", slightly_wrong_fuse)
    rc = cli.main(SMALL_DEMO)
    captured = capsys.readouterr()
    ratio = parse_demo_output(captured.out)["ratio"]
    # small enough that only a limit near 1.2 catches it
    assert cli.MAX_ERROR_RATIO < ratio < 5
    assert rc == cli.EXIT_CHECK_FAILED
    assert "FAILED" in captured.err and f"{ratio:.3f}x" in captured.err

    monkeypatch.setattr(cli, "MAX_ERROR_RATIO", 5.0)
    assert cli.main(SMALL_DEMO) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*SMALL_DEMO, "--size", "4"], "--size must be at least 8"),
        (["demo", "--batch", "0"], "expected a positive integer"),
        (["demo", "--dataflow", "magic"], "invalid choice"),
        ([], "required"),
    ],
)
def test_demo_bad_arguments(capsys, argv, message):
    assert cli.main(argv) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_python_m_fusedconv_demo():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fusedconv", *SMALL_DEMO],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    check_demo_numbers(parse_demo_output(proc.stdout))


# --------------------------------------------------------------------------- fusedconv plan


def test_plan_resnet18(capsys):
    pytest.importorskip("torchvision")
    rc = cli.main(["plan", "torchvision.models:resnet18"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = captured.out
    assert "torchvision.models:resnet18 (ResNet)" in out and "dataflow source" in out
    assert f"{RESNET18_NUM_BN} folds, {RESNET18_NUM_BN} of {RESNET18_NUM_BN} BatchNorms folded, 0 skipped" in out
    for name in ("conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2", "layer4.0.downsample.0", "layer4.0.downsample.1"):
        assert re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", out), f"{name} missing:\n{out}"


def test_plan_with_input_shape_uses_a_run(capsys):
    pytest.importorskip("torchvision")
    rc = cli.main(["plan", "torchvision.models:resnet18", "--input-shape", "1,3,32,32"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "example input 1x3x32x32" in captured.out and "dataflow run" in captured.out
    assert f"{RESNET18_NUM_BN} folds, {RESNET18_NUM_BN} of {RESNET18_NUM_BN} BatchNorms folded" in captured.out


def test_plan_of_the_demo_network(capsys):
    # a factory returning a train-mode model: the CLI switches it to eval
    assert cli.main(["plan", "fusedconv.examples:build_demo_network"]) == 0
    out = capsys.readouterr().out
    assert f"{len(DEMO_FOLDS)} folds, {DEMO_NUM_BN} of {DEMO_NUM_BN} BatchNorms folded, 0 skipped" in out


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet18", "expected MODULE:CALLABLE"),
        (":resnet18", "expected MODULE:CALLABLE"),
        ("torchvision.models:", "expected MODULE:CALLABLE"),
        ("no_such_module_fusedconv:f", "cannot import module 'no_such_module_fusedconv'"),
        ("torchvision.models:no_such_model", "has no attribute 'no_such_model'"),
        ("math:pi", "not a callable"),
        ("builtins:dict", "not a torch.nn.Module"),
        ("torchvision.models:get_model", "calling torchvision.models:get_model() failed: TypeError"),
    ],
)
def test_plan_bad_spec(capsys, spec, message):
    rc = cli.main(["plan", spec])
    captured = capsys.readouterr()
    assert rc == cli.EXIT_USAGE
    assert captured.out == ""
    assert "fusedconv: error:" in captured.err and message in captured.err, captured.err


@pytest.mark.parametrize("shape", ["1,3,x", "1,0,4", ",", "1x3x8x8"])
def test_plan_bad_input_shape(capsys, shape):
    assert cli.main(["plan", "torchvision.models:resnet18", "--input-shape", shape]) == cli.EXIT_USAGE
    assert "bad shape" in capsys.readouterr().err


def test_parse_shape():
    assert cli.parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert cli.parse_shape(" 4 , 5 ") == (4, 5)
    for bad in ("1,3,x", "1x3", "1,,3", "", "1,-2"):
        with pytest.raises(Exception, match="bad shape"):
            cli.parse_shape(bad)


# --------------------------------------------------------------------------- errors, progress, timing


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_demo_backend_cuda_without_a_gpu_is_one_line(capsys):
    rc = cli.main([*SMALL_DEMO, "--backend", "cuda"])
    captured = capsys.readouterr()
    assert rc == cli.EXIT_CHECK_FAILED
    line = _one_line_error(captured.err)
    assert line.startswith("fusedconv: error:") and "cuda" in line
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_backends_on_cuda_without_a_gpu_lists_none_available(capsys):
    assert cli.main(["backends", "--device", "cuda"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("unavailable" in line for line in lines), lines
    assert any("no CUDA device" in line for line in lines)


@pytest.mark.parametrize(
    "argv",
    [["demo", "--device", "nosuchdevice"], ["demo", "--runs", "x"], ["backends", "--device", "x:y"],
     ["nosuchcommand"], [], ["demo", "--device", "meta"],
     ["fuse", "torch.nn:Identity", "-o", "never-written.pt", "--device", "meta"]]
    + [["demo", "--device", "cuda"], ["fuse", "torch.nn:Identity", "-o", "never-written.pt", "--device", "cuda"]]
    * (not torch.cuda.is_available()),
)
def test_bad_arguments_are_one_line(capsys, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == cli.EXIT_USAGE
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith("fusedconv: error:")
    if "--device" in argv and argv[argv.index("--device") + 1] in ("cuda", "meta"):
        assert line.startswith(f"fusedconv: error: --device {argv[argv.index('--device') + 1]}: ")
    assert not (tmp_path / "never-written.pt").exists()


def test_an_unknown_option_points_to_its_commands_help(capsys):
    assert cli.main(["plan", "torch.nn:Identity", "--bogus"]) == cli.EXIT_USAGE
    line = _one_line_error(capsys.readouterr().err)
    assert line == "fusedconv: error: unrecognized arguments: --bogus (see fusedconv plan --help)"


def test_a_model_in_the_working_directory_imports(capsys, tmp_path, monkeypatch):
    """As under ``python -m``, a MODULE:CALLABLE beside the user imports; the
    path is as it was afterwards."""
    (tmp_path / "my_local_model.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    before = list(sys.path)
    try:
        assert cli.main(["plan", "my_local_model:build"]) == 0
    finally:
        sys.modules.pop("my_local_model", None)
    assert "1 of 1 BatchNorms folded" in capsys.readouterr().out
    assert sys.path == before


def test_unexpected_errors_are_one_line_unless_debugging(capsys, monkeypatch):
    def broken_plan(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(fusedconv, "plan", broken_plan)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(SMALL_DEMO) == cli.EXIT_INTERNAL
    line = _one_line_error(capsys.readouterr().err)
    assert "internal error: ZeroDivisionError: a bug" in line and "--debug" in line
    with pytest.raises(ZeroDivisionError):
        cli.main([*SMALL_DEMO, "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(SMALL_DEMO)


def test_fold_errors_are_one_line(capsys, monkeypatch):
    def refusing_fuse(*args, **kwargs):
        raise fusedconv.FoldError("layer x: first line\nsecond line")

    monkeypatch.setattr(fusedconv, "fuse", refusing_fuse)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(SMALL_DEMO) == cli.EXIT_CHECK_FAILED
    line = _one_line_error(capsys.readouterr().err)
    assert line == "fusedconv: cannot fold: layer x: first line; second line"


def test_demo_progress_without_tqdm_is_plain_lines(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    assert cli.main([*SMALL_DEMO, "--progress"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "fusedconv demo: [1/5] building and calibrating the demo network"
    assert "fusedconv demo: [5/5] timing 2 interleaved rounds, after 3 untimed ones" in err
    assert err[-1] == "fusedconv demo:   5/5 rounds"  # the count reaches its total
    assert all(line.startswith("fusedconv demo: ") for line in err)


def test_demo_progress_with_tqdm(capsys):
    pytest.importorskip("tqdm")
    assert cli.main([*SMALL_DEMO, "--progress"]) == 0
    captured = capsys.readouterr()
    assert "fusedconv demo: timing" in captured.err
    check_demo_numbers(parse_demo_output(captured.out))  # stdout holds the report only


def test_measure_interleaved_alternates_and_pairs_rounds():
    from fusedconv import timing

    calls = []
    timings = timing.measure_interleaved([lambda _: calls.append("a"), lambda _: calls.append("b")],
                                         repeats=3, warmup=1)
    assert "".join(calls) == "abbaabba"  # warmup round, then 3 timed rounds, order alternating
    assert [len(t.samples) for t in timings] == [3, 3]
    t = timing.Timing([1.0, 2.0, 3.0, 4.0, 100.0])
    assert t.median == 3.0 and t.quartiles == (2.0, 4.0) and t.iqr == 2.0
    assert timing.Timing([5.0]).quartiles == (5.0, 5.0)
    ratios = cli.paired_speedup(timing.Timing([2.0, 6.0]), timing.Timing([1.0, 2.0]))
    assert ratios.samples == [2.0, 3.0]


def test_format_table():
    from fusedconv import timing

    text = timing.format_table([["a", "1"], ["bbb", "22", "x"]], ["name", "n"])
    assert text.splitlines() == ["name   n", "----  --  -", "a      1", "bbb   22  x"]
    assert timing.format_table([["x", "1"], ["yy", "2"]], left=None, indent="  ", sep="   ").splitlines() == [
        "  x    1", "  yy   2"]


# --------------------------------------------------------------------------- a missing extension


@pytest.fixture
def extension_missing(monkeypatch):
    """The cpp backend as it is when fusedconv._C was not built."""
    from fusedconv.kernels import backends

    monkeypatch.setitem(backends._loaded, "cpp", "the extension fusedconv._C was not built (simulated)")
    monkeypatch.setenv("FUSEDCONV_NATIVE_HELPERS", "0")  # nor its direct entries and helpers
    monkeypatch.setattr(backends, "_warned_missing_extension", False)
    monkeypatch.setattr(backends, "_reported", set())
    monkeypatch.delenv("FUSEDCONV_BACKEND", raising=False)


def test_missing_extension_warns_once_with_the_fix(extension_missing):
    import warnings

    from fusedconv.kernels import BackendUnavailable

    assert BackendUnavailable is fusedconv.BackendUnavailable is fusedconv.errors.BackendUnavailable
    model = examples.calibrate(examples.build_demo_network(0), (8, 3, 16, 16), steps=1, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fusedconv.fuse(model, backend="torch")  # asked for by name: no fallback, no warning
        assert caught == []
        fusedconv.fuse(model)
        fusedconv.fuse(model)
    found = [w for w in caught if issubclass(w.category, fusedconv.MissingExtensionWarning)]
    assert len(found) == 1, [str(w.message) for w in caught]
    message = str(found[0].message)
    assert "not built (simulated)" in message and "pip install --no-build-isolation" in message
    assert found[0].filename == __file__  # points at the caller's line, not inside fusedconv


def test_missing_extension_in_the_demo_is_one_warning_line(capsys, extension_missing):
    assert cli.main(SMALL_DEMO) == 0
    captured = capsys.readouterr()
    line = _one_line_error(captured.err)
    assert line.startswith("fusedconv: warning:") and "pip install --no-build-isolation" in line
    assert "MissingExtensionWarning" in line and "backend torch" in captured.out


def test_extension_for_another_torch_says_how_to_rebuild(monkeypatch):
    from fusedconv.kernels import BackendUnavailable, available_backends, extension

    if available_backends("cpu")["cpp"] is not None:
        pytest.skip("the extension is not built here")
    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    with pytest.raises(BackendUnavailable, match=r"built for torch [0-9.]+, you have 9\.9\.9: rebuild it with "
                                                 r"pip install --no-build-isolation"):
        extension.build_info()


def test_extension_sources_are_found():
    from fusedconv.kernels import extension

    directory = extension.source_dir()
    assert directory is not None and (directory / "rounding.h").is_file()
    assert (directory / "cpu" / "rescale.cpp").is_file()


def _prebuilt_library():
    from fusedconv.kernels import extension

    found = sorted(extension._PACKAGE.glob("_C*.so")) + sorted(extension._PACKAGE.glob("_C*.pyd"))
    if not found:
        pytest.skip("no prebuilt extension in the package")
    return found[0]


def test_the_prebuilt_library_loads_with_the_package():
    """Importing fusedconv loads a library built at install time (not a first
    fold), with its Python module."""
    _prebuilt_library()
    code = ("import fusedconv\nfrom fusedconv.kernels import extension\n"
            "print(sorted(key for key in extension._state if key in ('info', 'module')), "
            "extension._state['module'] is not None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['info',", "'module']", "True"]


def test_a_library_that_does_not_load_at_import_is_reported_when_needed(monkeypatch):
    """The load at import never raises; the backend that needs the library says
    why it did not load when it is asked for."""
    from fusedconv.kernels import BackendUnavailable, extension

    _prebuilt_library()
    monkeypatch.setattr(extension, "_state", {})

    def refuse(path):
        raise OSError(f"{path}: undefined symbol: _ZN3c106detail14torchCheckFail")

    monkeypatch.setattr(torch.ops, "load_library", refuse)
    extension.load_prebuilt()  # no error
    assert extension.native_function("walk_modules") is None
    with pytest.raises(BackendUnavailable, match="does not load .*undefined symbol"):
        extension.build_info()


def test_a_library_that_does_not_load_says_which_torch_it_was_built_for(monkeypatch):
    """A wheel's library built for another torch fails to load with an undefined
    symbol; the message reads the torch it was built for from the file itself."""
    from fusedconv.kernels import BackendUnavailable, extension

    library = _prebuilt_library()
    assert extension._built_for(library) == extension._torch_release(torch.__version__)  # csrc/ops.cpp's text
    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setattr(extension, "_built_for", lambda path: "2.11.0" if path == library else None)

    def refuse(path):
        raise OSError(f"{path}: undefined symbol: _ZN3c106detail14torchCheckFail\nsecond line")

    monkeypatch.setattr(torch.ops, "load_library", refuse)
    with pytest.raises(BackendUnavailable) as caught:
        extension.build_info()
    message = str(caught.value)
    assert f"it was built for torch 2.11.0, you have {torch.__version__}: rebuild it with pip install" in message
    assert "undefined symbol" in message and "second line" not in message


def test_the_torch_a_library_was_built_for_is_read_from_its_bytes(tmp_path):
    from fusedconv.kernels import extension

    library = tmp_path / "_C.so"
    library.write_bytes(b"\x7fELF\x00junk\x00fusedconv built for torch 2.12.3\x00more")
    assert extension._built_for(library) == "2.12.3"
    library.write_bytes(b"\x7fELF\x00nothing here")
    assert extension._built_for(library) is None
    assert extension._built_for(tmp_path / "missing.so") is None


@pytest.mark.parametrize("cached", [False, True], ids=["first-build", "cached"])
def test_a_build_on_first_use_warns_only_when_it_compiles(monkeypatch, cached):
    """Compiling the CPU kernels takes a minute: an ExtensionBuildWarning says so
    (a library's log is silent by default), pointing at the caller's line, and
    only when a build will run, not in every later process that loads the
    cached build. It is no MissingExtensionWarning: nothing falls back."""
    from torch.utils import cpp_extension

    from fusedconv import ExtensionBuildWarning, MissingExtensionWarning
    from fusedconv.kernels import extension

    loads = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: loads.append(kwargs["name"]))
    monkeypatch.setattr(extension, "_first_use_build_cached", lambda module, name: cached)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extension._build_on_first_use()
    compiling = [w for w in caught if issubclass(w.category, ExtensionBuildWarning)]
    assert loads == ["fusedconv_ext_cpu"]
    assert len(compiling) == (0 if cached else 1)
    assert not any(issubclass(w.category, MissingExtensionWarning) for w in caught)
    if not cached:
        assert compiling[0].filename == __file__
        assert "compiling its CPU kernels now" in str(compiling[0].message)
        assert "pip install --no-build-isolation" in str(compiling[0].message)


@pytest.mark.parametrize("noisy", [False, True], ids=["quiet", "busy"])
def test_the_demo_warns_when_its_latency_is_noise(capsys, monkeypatch, noisy):
    """Latencies of a few milliseconds on a busy machine can swing many times
    over; the demo says so instead of presenting the ratio as a finding."""
    from fusedconv.timing import Timing

    before = [0.010, 0.011, 0.010, 0.012]
    after = [0.008, 0.030, 0.002, 0.009] if noisy else [0.008, 0.0085, 0.0082, 0.0088]
    monkeypatch.setattr(cli, "measure_latencies", lambda *args, **kwargs: [Timing(before), Timing(after)])
    assert cli.main([*SMALL_DEMO, "--no-progress"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "the latency moved a lot" in line]
    assert len(warned) == noisy
    if noisy:
        assert warned[0].startswith("fusedconv: warning: ")


def test_a_cached_first_use_build_is_found(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    from fusedconv.kernels import extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = "fusedconv_ext_cpu_probe"
    assert extension._first_use_build_cached(cpp_extension, name) is False
    directory = cpp_extension._get_build_directory(name, verbose=False)
    assert directory.startswith(str(tmp_path))
    open(os.path.join(directory, name + ".so"), "wb").close()
    assert extension._first_use_build_cached(cpp_extension, name) is True


def test_the_command_line_runs_from_a_deleted_directory(capsys, tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    handlers, path = list(logging.getLogger("fusedconv").handlers), list(sys.path)
    assert cli.main(["backends", "--device", "cpu"]) == 0
    assert "torch: available" in capsys.readouterr().out
    assert logging.getLogger("fusedconv").handlers == handlers and sys.path == path
