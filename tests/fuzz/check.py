"""Checks one generated model against every contract of fusedconv.fuse.

For a model from :mod:`tests.fuzz.generator` (eval mode):

* a float64 reference output (deep copy converted to float64, same inputs) and
  the unfolded model's own relative error ``‖out−ref‖/‖ref‖``;
* ``fusedconv.plan`` then ``fusedconv.fuse`` in four modes (with/without
  example inputs × inplace True/False), each on a fresh deep copy of the
  original so that the modes cannot interact.

A mode passes when fuse either folds and the output's relative error is at
most ``max(FACTOR × unfolded error, floor(dtype))``, or raises ``FoldError``
leaving the model bit-identical. Further contracts, each its own failure kind:
copy mode never changes the caller's model; the example run (``plan`` with
inputs) never changes it; a corrupted BN (bad statistics, train mode) is never
folded; ``count_batchnorms(fused)`` equals ``len(plan.skipped)`` plus the BNs
that are not BN-like; any exception other than ``FoldError`` is a failure.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import re
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map

import fusedconv

FACTOR = 4.0
# Smallest error bound per dtype. float32/float64: 1e-5, as the brief fixes it
# (a wrong axis, lost bias or lost padding gives errors ~1e-2 or more). Half
# types: their own rounding (eps 1e-3 / 8e-3) dominates, so four ulps.
FLOOR = {
    torch.float32: 1e-5,
    torch.float64: 1e-5,
    torch.float16: 4 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps,
}
MODES = [(with_inputs, inplace) for with_inputs in (False, True) for inplace in (False, True)]


def mode_name(with_inputs: bool, inplace: bool) -> str:
    return f"{'inputs' if with_inputs else 'no-inputs'}/{'inplace' if inplace else 'copy'}"


@dataclass
class Failure:
    """One broken contract, with everything needed to reproduce it."""

    kind: str  # short, groupable: "wrong_output", "exception:RuntimeError", ...
    detail: str
    mode: str
    seed: int
    path: str
    source: str
    tags: list[str] = field(default_factory=list)

    @property
    def signature(self) -> str:
        """The kind, plus for exceptions their message with names and numbers blanked,
        so that two different errors of one type are not taken for one cause."""
        if " raised " not in self.kind and not self.kind.startswith("generator"):
            return self.kind
        message = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", self.detail)
        return f"{self.kind}: {re.sub(r'[0-9]+', 'N', message)[:100]}"

    @property
    def traps(self) -> tuple[str, ...]:
        return tuple(t for t in self.tags if t.startswith("trap:"))

    def __str__(self) -> str:
        return f"[{self.kind}] seed={self.seed} mode={self.mode} file={self.path}: {self.detail}"


@dataclass
class Result:
    """What one model gave: counts for the summary, and its failures."""

    seed: int
    bns: int = 0
    folded: dict[str, int] = field(default_factory=dict)  # mode -> BNs folded
    fold_errors: dict[str, str] = field(default_factory=dict)  # mode -> FoldError message
    failures: list[Failure] = field(default_factory=list)
    unchecked: str | None = None  # why the accuracy could not be judged (unfolded model itself unusable)


# --------------------------------------------------------------------------- loading


def load_module(path: str, name: str):
    """Import the generated file ``path`` as module ``name`` (registered in
    sys.modules, which dataclasses and inspect need; the caller removes it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


# --------------------------------------------------------------------------- state snapshots

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose equality is bit equality (NaN == NaN, -0 != +0)."""
    c = t.detach().clone()
    if c.is_floating_point() or c.is_complex():
        c = c.contiguous().view(_INT_VIEW[c.element_size()])
    return c


def snapshot(model: nn.Module) -> dict:
    """Everything about a model that fuse may not change on an error (or, in copy
    mode, ever): bits, dtype, shape, strides and identity of every parameter and
    buffer at every path, the module tree and types, training flags and attribute names."""
    snap = {}
    for path, m in model.named_modules(remove_duplicate=False):
        # by name: parametrize makes a new class for every parametrized module
        snap[(path, "type")] = f"{type(m).__module__}.{type(m).__qualname__}"
        snap[(path, "training")] = m.training
        snap[(path, "attrs")] = tuple(sorted(set(vars(m)) | set(m._parameters) | set(m._buffers)
                                             | set(m._modules)))
        for kind, tensors in (("param", m._parameters), ("buffer", m._buffers)):
            for name, t in tensors.items():
                if t is None:
                    snap[(path, kind, name)] = None
                    continue
                snap[(path, kind, name)] = (id(t), type(t), t.dtype, tuple(t.shape), t.stride(),
                                            t.requires_grad, t.is_inference(), _bits(t))
    return snap


def snapshot_diff(before: dict, after: dict, *, same_objects: bool = True) -> str | None:
    """The first difference between two snapshots, in words, or None
    (``same_objects=False``: two builds of one model, tensor identities aside)."""
    for key in before.keys() | after.keys():
        if key not in before or key not in after:
            return f"{'/'.join(map(str, key))} {'appeared' if key not in before else 'disappeared'}"
        a, b = before[key], after[key]
        if isinstance(a, tuple) and a and isinstance(a[-1], torch.Tensor):
            start = 0 if same_objects else 1
            if b is None or a[start:-1] != b[start:-1] or not torch.equal(a[-1], b[-1]):
                return f"{'/'.join(map(str, key))} changed"
        elif a != b:
            return f"{'/'.join(map(str, key))} changed ({a!r} -> {b!r})"
    return None


# --------------------------------------------------------------------------- numerics


def _float_leaves(output) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_error(output, reference) -> float:
    """‖out−ref‖/‖ref‖ in float64 over all float outputs.

    Non-finite values must sit at the same places with the same values in both
    (else the error is inf); the rest is compared on the finite entries."""
    outs, refs = _float_leaves(output), _float_leaves(reference)
    if len(outs) != len(refs) or any(o.shape != r.shape for o, r in zip(outs, refs)):
        return float("inf")
    num = den = 0.0
    for o, r in zip(outs, refs):
        o, r = o.double(), r.double()
        fo, fr = torch.isfinite(o), torch.isfinite(r)
        if not torch.equal(fo, fr) or not torch.equal(torch.isnan(o), torch.isnan(r)) or \
                not torch.equal(o[torch.isinf(o)], r[torch.isinf(r)]):
            return float("inf")
        num += float((o[fo] - r[fr]).pow(2).sum())
        den += float(r[fr].pow(2).sum())
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return (num / den) ** 0.5


def _clone_inputs(inputs: tuple) -> tuple:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def run(model: nn.Module, inputs: tuple):
    """Output of a deep copy of ``model`` (so that a train-mode BN's running
    statistics, or any other state, never change the model checked)."""
    with torch.no_grad():
        return copy.deepcopy(model)(*_clone_inputs(inputs))


def float64_reference(model: nn.Module, inputs: tuple):
    ref_model = copy.deepcopy(model).to(torch.float64)
    ref_inputs = tree_map(lambda t: t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point()
                          else t, inputs)
    with torch.no_grad():
        return ref_model(*ref_inputs)


def expected_count(model: nn.Module, plan) -> int:
    """What ``count_batchnorms`` of the folded model should say: the BN modules
    the plan leaves (``plan.skipped`` names them, one path per module; entries
    that name no module, such as functional batch norms, do not count), plus
    ``_BatchNorm`` subclasses with a forward of their own that the plan does not
    name (count_batchnorms counts every _BatchNorm, but such a module may not
    be BN-like to the rules)."""
    paths = {}
    for path, m in model.named_modules():  # first path of each module, as fusedconv names them
        paths[path] = m
    named = {s.module for s in plan.skipped if s.module in paths}
    extra = sum(1 for path, m in paths.items()
                if isinstance(m, _BatchNorm) and type(m).forward is not _BatchNorm.forward and path not in named)
    return len(named) + extra


def fresh(module, pristine: dict) -> nn.Module:
    """Another build of the generated model, checked to equal the first bit for bit."""
    model = module.make()[0]
    diff = snapshot_diff(pristine, snapshot(model), same_objects=False)
    if diff:
        raise AssertionError(f"make() is not deterministic: {diff}")  # a fuzzer bug
    return model


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


# --------------------------------------------------------------------------- the check


def check_module(module, path: str, source: str, seed: int) -> Result:
    """Run every check on the model that ``module`` (a loaded generated file) makes."""
    result = Result(seed)
    tags = list(getattr(module, "TAGS", []))

    def fail(kind, detail, mode="-"):
        result.failures.append(Failure(kind, detail, mode, seed, path, source, tags))

    model, example, test = module.make()
    result.bns = fusedconv.count_batchnorms(model)
    dtype = module.DTYPE
    # by path, not get_submodule: a class attribute may shadow a registered child
    originals = dict(model.named_modules(remove_duplicate=False))
    corrupt = {p for p, m in originals.items() if hasattr(m, "_fuzz_corrupt")}
    pristine = snapshot(model)

    reference = float64_reference(model, test)
    unfolded = run(model, test)
    e_unfolded = relative_error(unfolded, reference)
    if snapshot_diff(pristine, snapshot(model)):
        raise AssertionError("the checker itself changed the model")  # a fuzzer bug, not a library one
    bound = max(FACTOR * e_unfolded, FLOOR[dtype])
    if not e_unfolded < float("inf"):
        result.unchecked = "the unfolded model's own output is not finite where float64's is"

    for with_inputs, inplace in MODES:
        mode = mode_name(with_inputs, inplace)
        # A fresh build, not copy.deepcopy(model): deepcopy clones each Parameter
        # on its own (storage shared between weights is lost) and turns inference
        # tensors into normal ones, which would hide exactly those traps.
        m = fresh(module, pristine)
        before = snapshot(m)
        ex = _clone_inputs(example) if with_inputs else None

        # the plan alone (with inputs: the example run) must not change the model
        plan = None
        try:
            plan = fusedconv.plan(m, ex)
        except fusedconv.FoldError:
            pass
        except Exception as exc:  # noqa: BLE001 - any other type is the failure we look for
            fail(f"plan raised {type(exc).__name__}", _one_line(exc), mode)
        diff = snapshot_diff(before, snapshot(m))
        if diff:
            fail("plan changed the model" + (" (example run)" if with_inputs else ""), diff, mode)
            m = fresh(module, pristine)
            before = snapshot(m)

        try:
            fused = fusedconv.fuse(m, ex, inplace=inplace)
        except fusedconv.FoldError as exc:
            result.fold_errors[mode] = _one_line(exc)
            diff = snapshot_diff(before, snapshot(m))
            if diff:
                fail("model changed after FoldError", diff, mode)
            continue
        except Exception as exc:  # noqa: BLE001
            fail(f"fuse raised {type(exc).__name__}", _one_line(exc), mode)
            diff = snapshot_diff(before, snapshot(m))
            if diff:
                fail(f"model changed after {type(exc).__name__}", diff, mode)
            continue

        if inplace and fused is not m:
            fail("inplace=True returned another model", "", mode)
        if not inplace:
            if fused is m:
                fail("inplace=False returned the model itself", "", mode)
            diff = snapshot_diff(before, snapshot(m))
            if diff:
                fail("copy mode changed the caller's model", diff, mode)

        modules = dict(fused.named_modules(remove_duplicate=False))
        for p in sorted(corrupt):
            if p in modules and type(modules[p]) is not type(originals[p]):
                fail("corrupted BN folded", f"{p} ({originals[p]._fuzz_corrupt}) became "
                     f"{type(modules[p]).__name__}", mode)

        if plan is not None:
            result.folded[mode] = plan.num_folded
            expected = expected_count(model, plan)
            got = fusedconv.count_batchnorms(fused)
            if got != expected:
                fail("count_batchnorms(fused) != len(plan.skipped)", f"{got} != {expected}", mode)

        try:
            out = run(fused, test)
        except Exception as exc:  # noqa: BLE001
            fail(f"folded model raised {type(exc).__name__}", _one_line(exc), mode)
            continue
        if result.unchecked:
            continue
        e_fused = relative_error(out, reference)
        if not e_fused <= bound:
            fail("wrong output", f"folded error {e_fused:.3e} > bound {bound:.3e} "
                 f"(unfolded {e_unfolded:.3e})", mode)
    return result


_counter = itertools.count()


def check_source(source: str, seed: int, directory: str) -> Result:
    """Write ``source`` to a new file in ``directory``, import it, check it and
    unload it again (sys.modules entry removed; the file is left to the caller)."""
    path = os.path.join(directory, f"fuzz_model_{seed}.py")
    with open(path, "w") as f:
        f.write(source)
    return check_file(path, seed)


def check_file(path: str, seed: int | None = None) -> Result:
    """Check one generated file (also what ``--replay`` uses)."""
    with open(path) as f:
        source = f.read()
    if seed is None:
        match = re.search(r"^SEED = (\d+)", source, re.M)
        seed = int(match.group(1)) if match else -1
    name = f"_fusedconv_fuzz_{os.getpid()}_{next(_counter)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FoldWarnings, deprecations: not what is checked here
        try:
            module = load_module(path, name)
            try:
                return check_module(module, path, source, seed)
            finally:
                sys.modules.pop(name, None)
        except Exception as exc:  # noqa: BLE001 - the generated model itself is broken: a fuzzer bug
            r = Result(seed)
            r.failures.append(Failure(f"generator bug: {type(exc).__name__}", _one_line(exc), "-", seed, path,
                                      source))
            return r
